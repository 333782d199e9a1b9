"""Benchmark of one training step on sets against the same data as pairs: B sets of 4 graded answers, trained with
the set loss (mrpo.mrpo_set_loss, the N = 4 answers after one shared prompt in one packed row per set), against all
6 (better, worse) pairs of each set trained with the pair loss (mrpo.mrpo_loss, 6 packed pairs per set: each answer
computed three times, each prompt six). Same model, LoRA, references (K = 2, cached log-probs), one run.

    python bench/bench_sets.py                                   # SmolLM2 + LoRA on CPU, 2 MT-bench sets, fp32
    python bench/bench_sets.py --dtype bf16 --max-length 512
    python bench/bench_sets.py --device cuda --model Qwen/Qwen2.5-7B-Instruct --load-in-4bit --dtype bf16

A step is train.py's: response_logps of the batch, the loss, backward, clipping, an AdamW step on the LoRA weights.
Timing: the two are interleaved round by round, median step time of each. Memory: on CUDA the peak allocated memory
of the step; everywhere the bytes of the tensors autograd saves for backward (exact, the part that grows with the
tokens a step computes). Prints the CPU model, the tokens each side computes and the ratios sets / pairs.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mrpo  # noqa: E402
import precompute  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "mt-bench-sets", "train.jsonl"))
    parser.add_argument("--sets", type=int, default=2, help="sets per step (their pairs: 6 each)")
    parser.add_argument("--max-length", type=int, default=320, help="most tokens of prompt + answer")
    parser.add_argument("--model", default="smollm2", help="policy base model spec")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each (after one warmup)")
    args = parser.parse_args()
    precompute.keep_freed_memory()  # as the scripts start

    from peft import LoraConfig, get_peft_model
    device = torch.device(args.device)
    model, tokenizer = precompute.load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                                             device=args.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    _, sets = precompute.read_data(args.data)
    sets = [s for s in sets if len(set(s["scores"])) == 4][:args.sets]  # four different grades: 6 pairs each
    pairs = [p for s in sets for p in precompute.set_to_pairs(s, "all")]
    encoded_sets = precompute.encode_pairs(tokenizer, sets, args.max_length, args.max_length // 3)
    encoded_pairs = precompute.encode_pairs(tokenizer, pairs, args.max_length, args.max_length // 3)
    with torch.no_grad(), autocast:
        ref1 = torch.stack(precompute.response_logps(model, encoded_sets).float().split(4))  # (B, 4)
    ref = torch.stack([ref1, ref1 * 1.05])  # (K=2, B, 4): reference 2 a little less sure of every answer
    scores = torch.tensor([s["scores"] for s in sets], dtype=torch.float32)
    mask = torch.ones_like(scores, dtype=torch.bool)
    b, i, j = mrpo.set_pairs(scores, mask, "all")  # the pairs in set_to_pairs' order
    saved = [0, set()]

    def pack(t):
        if t.untyped_storage().data_ptr() not in saved[1]:
            saved[1].add(t.untyped_storage().data_ptr())
            saved[0] += t.untyped_storage().nbytes()
        return t

    def step(kind):
        saved[0], saved[1] = 0, set()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            if kind == "sets":
                logps = torch.stack(precompute.response_logps(model, encoded_sets).split(4))  # (B, 4)
                losses = mrpo.mrpo_set_loss(logps, ref, scores, mask, 0.1)[0]
            else:
                chosen, rejected = precompute.pair_logps(model, encoded_pairs)  # (6B,) each
                losses = mrpo.mrpo_loss(chosen, rejected, ref[:, b, i], ref[:, b, j], 0.1)[0]
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measured(kind):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(kind)
        if device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
        return time.perf_counter() - t0, None

    kinds = ("sets", "pairs")
    for kind in kinds:
        measured(kind)  # warmup
    times, peaks, saved_bytes = {k: [] for k in kinds}, {k: 0 for k in kinds}, {k: 0 for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            seconds, peak = measured(kind)
            times[kind].append(seconds)
            peaks[kind], saved_bytes[kind] = max(peaks[kind], peak or 0), max(saved_bytes[kind], saved[0])
    computed = {"sets": sum(precompute._packed_length(g) for g in encoded_sets),
                "pairs": sum(precompute._packed_length(g) for g in encoded_pairs)}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{args.model} {args.dtype}{' 4-bit' if args.load_in_4bit else ''} + LoRA r=16 on {device} ({cpu}, "
          f"{torch.get_num_threads()} threads): {len(sets)} sets of 4 = {len(pairs)} pairs, --max-length "
          f"{args.max_length}, median of {args.rounds} steps")
    for kind in kinds:
        t = statistics.median(times[kind])
        print(f"{kind:<6} {t:7.3f} s/step ({min(times[kind]):.2f}-{max(times[kind]):.2f})  {computed[kind]:6d} "
              f"tokens computed  saved for backward {saved_bytes[kind] / 2**20:8.1f} MiB"
              + (f"  peak {peaks[kind] / 2**20:8.1f} MiB" if device.type == "cuda" else ""))
    ratio = statistics.median(times["sets"]) / statistics.median(times["pairs"])
    print(f"bench_sets: sets / pairs: time {ratio:.3f}, tokens computed {computed['sets'] / computed['pairs']:.3f}, "
          f"memory saved for backward {saved_bytes['sets'] / saved_bytes['pairs']:.3f}"
          + (f", peak memory {peaks['sets'] / max(1, peaks['pairs']):.3f}" if device.type == "cuda" else ""))


if __name__ == "__main__":
    main()
