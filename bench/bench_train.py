"""Benchmark of one training step: DPO vs MRPO with K = 1, 2, 4, 8 references, same model, same batch, one run.

    python bench/bench_train.py                                  # SmolLM2 + LoRA on CPU, 8 bundled pairs
    python bench/bench_train.py --dtype bf16 --rounds 10
    python bench/bench_train.py --device cuda --model Qwen/Qwen2.5-7B-Instruct --load-in-4bit --dtype bf16

A step is what train.py does per optimizer step on a batch that is one row of the cache: precompute.pair_logps over
the chosen and rejected responses of the batch (shared prompts, the pairs packed into one row), summed float32
log-probs, the loss from mrpo.py against K cached reference log-probs, backward, gradient clipping and an AdamW step
on the LoRA weights. The K reference log-probs are synthetic (reference 1's log-probs plus noise): MRPO never runs a
reference model, so K only changes the (K, B) tensors that enter the loss.

Timing: the configurations are interleaved round by round (DPO, K=1, K=2, ...) and the median step time of each
is reported, so slow drifts of the machine hit all of them alike. Memory: on CUDA the peak allocated memory of the
step (torch.cuda.max_memory_allocated); on CPU the peak resident set size during the step above the size before it,
sampled every millisecond from /proc/self/statm (noisy: the allocator decides when pages go back). Exact on any
device: the bytes of the tensors autograd saves for backward in the step ("saved"), and the time of the loss function
alone (forward + backward on the log-prob tensors), which is all that K changes.
Goal: MRPO/DPO step time <= 1.02, peak memory independent of K.
"""

import argparse
import os
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mrpo  # noqa: E402
import precompute  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "train.jsonl"), help="JSONL preference pairs")
    group.add_argument("--batch-size", type=int, default=8, help="pairs per step (the paper's batch: 8)")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="smollm2", help="policy base model spec (alias, hub id, directory, .gguf)")
    group.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="weights and autocast dtype")
    group.add_argument("--load-in-4bit", action="store_true", help="4-bit base model (bitsandbytes NF4)")
    group.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    group.add_argument("--device", default="cpu", help="torch device")
    group.add_argument("--cache-dir", default=precompute.default_cache_dir(), help="GGUF safetensors cache")
    group = parser.add_argument_group("Benchmark")
    group.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of references for MRPO")
    group.add_argument("--rounds", type=int, default=6, help="timed steps per configuration (after one warmup)")
    args = parser.parse_args()
    precompute.keep_freed_memory()  # as the scripts start

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    device = torch.device(args.device)
    model, tokenizer = precompute.load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                             device=args.device, cache_dir=args.cache_dir)
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():  # the CPU repack guard, as in train.py
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    pairs = precompute.read_pairs(args.data)[:args.batch_size]
    B = len(pairs)
    encoded = [(precompute.encode(tokenizer, p["prompt"], p["chosen"]),
                precompute.encode(tokenizer, p["prompt"], p["rejected"])) for p in pairs]
    with torch.no_grad(), autocast:
        ref1 = torch.cat(precompute.pair_logps(model, encoded)).float()  # (2B,) chosen, then rejected
    g = torch.Generator().manual_seed(0)
    max_k = max(args.ks)
    noise = torch.randn(max_k, 2 * B, generator=g).to(device) * 5  # other references: within ~5 nats
    noise[0] = 0
    refs = ref1[None, :] + noise - noise.abs()  # (max_k, 2B), row 0 = reference 1, all <= reference 1 + 0

    saved = [0, set()]  # bytes of the tensors autograd keeps for backward in one step (distinct storages)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in saved[1]:
            saved[1].add(storage.data_ptr())
            saved[0] += storage.nbytes()
        return t

    def step(loss_name, K):
        saved[0], saved[1] = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast:
                logps = torch.cat(precompute.pair_logps(model, encoded))  # (2B,)
            rc, rr = refs[:K, :B], refs[:K, B:]  # (K, B)
            losses, _, _ = mrpo.compute_loss(loss_name, logps[:B], logps[B:], rc, rr, 0.1)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def measured(loss_name, K):
        """(seconds, peak bytes above the start) of one step."""
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(loss_name, K)
            torch.cuda.synchronize()
            return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
        base, peak, done = rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        step(loss_name, K)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        return seconds, max(peak[0], rss()) - base

    def loss_only(loss_name, K, repeats=200):
        """Seconds of the loss alone (forward + backward on (B,) policy and (K, B) reference log-probs)."""
        pc = refs[0, :B].clone().requires_grad_()
        pr = refs[0, B:].clone().requires_grad_()
        t0 = time.perf_counter()
        for _ in range(repeats):
            losses, _, _ = mrpo.compute_loss(loss_name, pc, pr, refs[:K, :B], refs[:K, B:], 0.1)
            losses.mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats

    configs = [("dpo", 1)] + [("mrpo", K) for K in args.ks]
    for loss_name, K in configs:  # warmup
        measured(loss_name, K)
    times = {c: [] for c in configs}
    memory = {c: 0 for c in configs}
    saved_bytes = {c: 0 for c in configs}
    from tqdm import tqdm
    for _ in tqdm(range(args.rounds), desc="rounds", dynamic_ncols=True):
        for c in configs:
            seconds, peak = measured(*c)
            times[c].append(seconds)
            memory[c] = max(memory[c], peak)
            saved_bytes[c] = max(saved_bytes[c], saved[0])
    loss_seconds = {c: loss_only(*c) for c in configs}

    tokens = sum(len(c.ids) + len(r.ids) for c, r in encoded)
    computed = sum(len(c.ids) + len(r.ids) - precompute.shared_prefix(c, r) for c, r in encoded)
    dpo_time, dpo_mem = statistics.median(times[("dpo", 1)]), memory[("dpo", 1)]
    print(f"{args.model} {args.dtype}{' 4-bit' if args.load_in_4bit else ''} + LoRA r={args.lora_r} on {device}, "
          f"batch {B} pairs ({2 * B} sequences, {tokens} tokens, {computed} computed), "
          f"median of {args.rounds} steps")
    dpo_saved, dpo_loss = saved_bytes[("dpo", 1)], loss_seconds[("dpo", 1)]
    peak_name = "peak MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"{'loss':<10} {'step s':>7} {'min-max s':>13} {'time/DPO':>8} {'saved MiB':>9} {'saved/DPO':>9} "
          f"{peak_name:>12} {'mem/DPO':>7} {'loss ms':>7} {'loss/step':>9}")
    for c in configs:
        t, m, sv, ls = statistics.median(times[c]), memory[c], saved_bytes[c], loss_seconds[c]
        name = "dpo" if c[0] == "dpo" else f"mrpo K={c[1]}"
        print(f"{name:<10} {t:7.3f} {min(times[c]):6.2f}-{max(times[c]):<6.2f} {t / dpo_time:8.3f} "
              f"{sv / 2**20:9.1f} {sv / max(dpo_saved, 1):9.4f} {m / 2**20:12.1f} {m / max(dpo_mem, 1):7.3f} "
              f"{ls * 1e3:7.3f} {ls / t:9.1e}")
    worst = max(statistics.median(times[c]) for c in configs[1:]) / dpo_time
    extra = max(loss_seconds[c] for c in configs[1:]) - dpo_loss
    saved_spread = max(saved_bytes[c] for c in configs) / max(1, min(saved_bytes[c] for c in configs))
    print(f"bench_train: worst MRPO/DPO median step time {worst:.3f} (goal <= 1.02); the loss itself adds at most "
          f"{extra * 1e3:.3f} ms = {extra / dpo_time:.1e} of a DPO step; memory saved for backward max/min over "
          f"DPO and all K {saved_spread:.4f} (goal: independent of K)")


if __name__ == "__main__":
    main()
