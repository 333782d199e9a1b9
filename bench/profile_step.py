"""Where the time of a training step goes: matrix multiplies, attention, elementwise work, log-softmax, optimizer.

    python bench/profile_step.py                                 # SmolLM2 + LoRA, 8 hh-rlhf pairs, bf16 and fp32
    python bench/profile_step.py --dtypes bf16 --row-pairs 1 --threads 16
    python bench/profile_step.py --dtypes bf16 --compile                 # torch.compile of the decoder layers
    python bench/profile_step.py --dtypes bf16 --attention eager         # transformers' eager attention per pair
    python bench/profile_step.py --dtypes bf16 --flash-backward          # sdpa's own backward in bf16 too
    python bench/profile_step.py --device cuda --model Qwen/Qwen2.5-7B-Instruct --dtypes bf16
    python bench/profile_step.py --data data/mt-bench-sets/train.jsonl --batch-size 4 --row-pairs 1 \
        --max-length 320 --max-prompt-length 128 --dtypes bf16          # 4 sets of 4 answers, as compare_sets.py
    python bench/profile_step.py --data data/mt-bench-sets/train.jsonl ... --split-tokens 100000  # each set whole

The step is train.py's: precompute.response_logps over the pairs of one batch (in rows of --row-pairs pairs, shared
prompts, the output layer at scored positions only), mrpo.dpo_loss against reference log-probs (sets of scored
answers: mrpo.mpo_loss), backward, gradient clipping and the AdamW step of the LoRA weights, under the autocast
train.py uses, after precompute.keep_freed_memory as every script starts (--default-malloc: without it). After two
warmup steps a few steps are timed as they run, then as many again under torch.profiler (which slows them: the
shares are of the profiled time); each operator's own time (self time, so nothing is counted twice) goes to one
category:

- matmul: aten::mm, addmm, bmm, matmul and the 4-bit kernels (the dense work);
- attention: scaled_dot_product_attention and the kernels it dispatches to (flash, math), flex attention (the
  16-bit CPU backward, precompute.attention_backward, is matrix multiplies and a softmax: matmul, elementwise);
- log-softmax: the output layer's log_softmax, its backward and the gather of the targets;
- optimizer: AdamW's kernels and gradient clipping (foreach / fused);
- elementwise: every other aten operator (norms, RoPE, SiLU, casts, copies, index, cat);
- overhead: the step's wall time that no operator accounts for (Python, autograd, dispatch).

It prints the CPU model and whether it has AMX, this machine's bf16 matmul peak measured in the same run (the best
of repeated 2048 x 2048 products), the step's FLOPs (counted as bench_trl.py counts them) and their fraction of
that peak, the share of each category, and whether the first step's log-probs equal those of the no-grad forward
before it (the exact start train.py checks). --compile compiles every decoder layer and prints the same, with the
time of the first forward and step (the compilations). Goal (issue "speed where matrix multiplies are fast"):
outside matmul <= 20% of the bf16 step, and >= 25% of the peak.
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import mrpo  # noqa: E402
import precompute  # noqa: E402
from bench_trl import TARGETS, bf16_peak, cpu_model, step_flops  # noqa: E402

CATEGORIES = ["matmul", "attention", "log-softmax", "optimizer", "elementwise", "overhead"]


def category(name):
    """The category of a profiler event's name (an aten operator, or a kernel name on CUDA)."""
    n = name.lower()
    if any(k in n for k in ("attention", "flash", "sdpa", "flex")):
        return "attention"
    if any(k in n for k in ("log_softmax", "gather", "logsumexp")):
        return "log-softmax"
    if any(k in n for k in ("adam", "_foreach", "clip_grad")):
        return "optimizer"
    if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "gemm", "int4", "4bit",
                            "aten::linear", "mkldnn", "onednn")):
        return "matmul"
    return "elementwise"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"),
                       help="JSONL preference pairs or sets of scored answers (default: the bundled multi-turn hh-rlhf "
                       "pairs)")
    group.add_argument("--batch-size", type=int, default=8, help="pairs (or sets) per step")
    group.add_argument("--row-pairs", type=int, default=8, help="pairs (or sets) per forward (train.py: the cache's "
                       "rows)")
    group.add_argument("--max-length", type=int, default=512, help="tokens of a prompt and response (truncation)")
    group.add_argument("--max-prompt-length", type=int, default=256, help="tokens of a prompt (truncation)")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="smollm2", help="policy model spec (alias, hub id, directory, .gguf)")
    group.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    group.add_argument("--steps", type=int, default=4, help="timed steps, then as many profiled, after 2 warmups")
    group.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="the attention each pair runs "
                       "with: torch's scaled_dot_product_attention (the default of the scripts) or transformers' eager "
                       "one (q k^T, a float32 softmax, times v)")
    group.add_argument("--flash-backward", action="store_true", help="differentiate sdpa by its own flash backward in "
                       "16 bit on CPU too, as fp32 does (empties precompute.MATH_BACKWARD; the scripts' 16-bit CPU "
                       "training uses precompute.attention_backward)")
    group.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (dynamic shapes; "
                       "the attention between pairs stays eager), to see what it saves and whether the start stays "
                       "exact; with it the fused kernels count as overhead")
    group.add_argument("--split-tokens", type=int, default=precompute.SPLIT_TOKENS, help="sets of more than two "
                       "answers packed longer than this are attended answer by answer (precompute.SPLIT_TOKENS, "
                       "default %(default)s); a larger value attends each set in one block")
    group.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is (the scripts "
                       "call precompute.keep_freed_memory at their start; this shows the step without it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        precompute.keep_freed_memory()
    from peft import LoraConfig, get_peft_model
    cpu, amx = cpu_model()
    peak = bf16_peak() if args.device == "cpu" else None
    kind, pairs = precompute.read_data(args.data)
    pairs = pairs[:args.batch_size]
    print(f"profile_step: {cpu} (AMX: {'yes' if amx else 'no'}), {args.threads} threads, {args.device}, "
          f"{'glibc default malloc' if args.default_malloc else 'keep_freed_memory'}; "
          + (f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s" if peak else ""), flush=True)
    if args.flash_backward:
        precompute.MATH_BACKWARD = {}
    precompute.SPLIT_TOKENS = args.split_tokens
    for dtype in args.dtypes:
        model, tokenizer = precompute.load_model(args.model, dtype=dtype, device=args.device)
        model.config.use_cache = False
        model.set_attn_implementation(args.attention)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        for module in model.modules():  # as train.py: no float32 cast of each LoRA input under bf16 autocast
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = dtype != "bf16"
        if args.compile:  # every decoder layer, as the scripts' --compile
            precompute.compile_layers(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        encoded = precompute.encode_pairs(tokenizer, pairs, args.max_length, args.max_prompt_length)
        rows = precompute.chunks(list(range(len(encoded))), args.row_pairs)
        width = max(len(group) for group in encoded)  # W: 2 for pairs, the largest set
        mask = torch.tensor([[j < len(group) for j in range(width)] for group in encoded])  # (B, W)
        scores = torch.tensor([row["scores"] + [0.0] * (width - len(row["scores"])) for row in pairs],
                              dtype=torch.float32) if kind == "sets" else None  # (B, W), 0 in masked slots
        t0 = time.perf_counter()
        with torch.no_grad(), precompute.autocast(args.device, dtype):  # as precompute.py scores reference 1
            ref = torch.cat([precompute.response_table(model, [encoded[i] for i in r], width) for r in rows])  # (B, W)
        first_forward = time.perf_counter() - t0

        def step():
            """One optimizer step; returns the policy's summed log-probs (B, W) in the order of ref."""
            out = []
            for r in rows:
                with precompute.autocast(args.device, dtype):
                    table = precompute.response_table(model, [encoded[i] for i in r], width)  # (pairs of the row, W)
                if kind == "sets":
                    loss = mrpo.mpo_loss(table, ref[r], scores[r], mask[r], 0.1)[0]
                else:  # a reference 1 nat below the policy on y_w, so that the loss is not at its ln 2 start
                    loss = mrpo.dpo_loss(table[:, 0], table[:, 1], ref[r, 0] - 1, ref[r, 1], 0.1)[0]
                (loss.sum() / len(encoded)).backward()
                out.append(table.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device != "cpu":
                torch.cuda.synchronize()
            return torch.cat(out)

        t0 = time.perf_counter()
        start = step()  # LoRA B = 0: the policy is the base model, so this is the exact start of train.py
        first_step = time.perf_counter() - t0
        step()
        times = []
        for _ in range(args.steps):  # timed without the profiler, which slows the step down
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if args.device != "cpu" else [])
        profiled = []
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                profiled.append(time.perf_counter() - t0)
        total = sum(profiled)
        shares = dict.fromkeys(CATEGORIES, 0.0)
        for event in prof.key_averages():  # on CUDA the kernels' device time, on the CPU the aten operators'
            if args.device != "cpu":
                shares[category(event.key)] += event.self_device_time_total / 1e6
            elif event.key.startswith("aten::"):
                shares[category(event.key)] += event.self_cpu_time_total / 1e6
        shares["overhead"] = max(0.0, total - sum(shares.values()))
        flops = step_flops(model.get_base_model(), encoded)[0]
        seconds = statistics.median(times)
        line = " | ".join(f"{name} {shares[name] / total:.0%}" for name in CATEGORIES)
        run = dtype + (" compiled" if args.compile else "") + (", flash backward" if args.flash_backward else "") \
            + (", eager attention" if args.attention == "eager" else "") + (f", {kind}" if kind == "sets" else "") \
            + (f", split over {args.split_tokens} tokens" if kind == "sets" else "")
        print(f"{run}: {seconds:.3f} s/step (median of {args.steps}), "
              f"{flops / 1e9:.0f} GFLOP/step" + (f", {flops / seconds / peak:.1%} of the bf16 peak" if peak else "")
              + f" | profiled ({total / sum(times):.2f}x the time): {line} | outside matmul "
              f"{1 - shares['matmul'] / total:.0%} (goal <= 20%)", flush=True)
        diff = (start - ref).abs().max().item()
        print(f"  first no-grad forward {first_forward:.1f} s, first step {first_step:.1f} s"
              + (" (both compile)" if args.compile else "") + f"; exact start (the first step's log-probs equal "
              f"the no-grad forward's, as train.py requires of reference 1): "
              + ("yes" if torch.equal(start, ref) else f"NO, max |difference| {diff:.3g} nat"), flush=True)
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        print("  top operators by self time: " + ", ".join(
            f"{e.key} {e.self_cpu_time_total / 1e6 / total:.0%}" for e in top))
        del model, optimizer


if __name__ == "__main__":
    main()
