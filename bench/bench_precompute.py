"""Benchmark of reference scoring: tokens/s, per reference model and dtype.

    python bench/bench_precompute.py                                   # default models, bf16 and fp32, train set
    python bench/bench_precompute.py --refs smollm2 --dtypes bf16 --rows 100
    python bench/bench_precompute.py --compile                         # each decoder layer compiled, as --compile
    python bench/bench_precompute.py --device cuda --refs Qwen/Qwen2.5-7B-Instruct --load-in-4bit --dtypes bf16

It scores the chosen and rejected responses of --rows pairs as precompute.py scores references 2, 3, ... (each
model's own format, pairs sorted by length, --batch-size pairs per precompute.pair_logps call: shared prompts, the
pairs of a call packed into one row, attention pair by pair, no padding, float32 log-probs);
--batch-size 1 is how reference 1 is scored in rows of one pair, precompute.py's default. It prints one line per
(model, dtype): model load time, tokens/s counting the tokens of both sequences of each pair (prompt + response, the
prompt twice), the share of those tokens that sharing the prompt saves, and the FLOPs of its forwards (counted as
bench_trl.py counts a forward) as a fraction of this machine's bf16 matmul peak, measured in the same run; first the
CPU model and whether it has AMX. It starts as precompute.py does, with precompute.keep_freed_memory()
(--default-malloc: without it, to see what that saves). --compile compiles every decoder layer as the scripts'
--compile does; the warm-up forward before the timed ones then includes the compilation, and its time is printed.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import precompute  # noqa: E402
from bench_trl import bf16_peak, cpu_model, step_flops  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "train.jsonl"), help="JSONL preference pairs")
    group.add_argument("--rows", type=int, default=None, help="use only the first ROWS pairs (default: all)")
    group.add_argument("--max-length", type=int, default=512, help="most tokens of prompt + response")
    group.add_argument("--max-prompt-length", type=int, default=256, help="most prompt tokens kept when truncating")
    group = parser.add_argument_group("Model")
    group.add_argument("--refs", nargs="+", default=precompute.DEFAULT_REFS, help="reference models to time")
    group.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"],
                       help="dtypes to time each model in")
    group.add_argument("--load-in-4bit", action="store_true", help="load in 4 bit (bitsandbytes NF4)")
    group.add_argument("--compile", action="store_true", help="torch.compile each decoder layer, as --compile")
    group.add_argument("--device", default="cpu", help="torch device")
    group.add_argument("--cache-dir", default=precompute.default_cache_dir(), help="GGUF safetensors cache")
    group = parser.add_argument_group("Scoring")
    group.add_argument("--batch-size", type=int, default=8, help="pairs per pair_logps call")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it is (precompute.py "
                       "calls precompute.keep_freed_memory at its start; this shows scoring without it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        precompute.keep_freed_memory()

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    pairs = precompute.read_pairs(args.data)[:args.rows]
    cpu, amx = cpu_model()
    peak = bf16_peak() if args.device == "cpu" else None
    print(f"{len(pairs)} pairs from {args.data}, batch size {args.batch_size}, {torch.get_num_threads()} threads, "
          f"device {args.device}; {cpu} (AMX: {'yes' if amx else 'no'}), "
          f"{'glibc default malloc' if args.default_malloc else 'keep_freed_memory'}"
          + (f", measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s" if peak else ""))
    shares = []
    for spec in args.refs:
        for dtype in args.dtypes:
            t0 = time.time()
            model, tokenizer = precompute.load_model(spec, dtype, load_in_4bit=args.load_in_4bit, device=args.device,
                                                     cache_dir=args.cache_dir)
            load_s = time.time() - t0
            if args.compile:
                precompute.compile_layers(model)
            encoded = precompute.encode_pairs(tokenizer, pairs, args.max_length, args.max_prompt_length)
            batches = precompute.chunks(precompute.length_order(encoded), args.batch_size)
            tokens = sum(len(c.ids) + len(r.ids) for c, r in encoded)  # both sequences, the prompt counted twice
            computed = sum(len(c.ids) + len(r.ids) - precompute.shared_prefix(c, r) for c, r in encoded)
            flops = step_flops(model, encoded)[0] / 2  # a training step is two forwards' worth
            with torch.inference_mode():  # warm-up: first-call allocations and kernel selection (and compilation)
                t0 = time.time()
                precompute.pair_logps(model, [encoded[i] for i in batches[0]])
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                warmup_s = time.time() - t0
                t0 = time.time()
                for b in tqdm(batches, desc=f"{spec} {dtype}", unit="batch", leave=False):
                    precompute.pair_logps(model, [encoded[i] for i in b])
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.time() - t0
            shares.append(1 - computed / tokens)
            print(f"{spec:>14} {dtype:>5}{' compiled' * args.compile}: load {load_s:5.1f}s, first forward "
                  f"{warmup_s:.1f}s | {tokens / seconds:7.0f} tokens/s "
                  f"({tokens} sequence tokens in {seconds:.1f}s, mean length {tokens / (2 * len(encoded)):.0f}) | "
                  f"{computed} tokens computed: shared prompts save {shares[-1]:.1%}, padding 0.0% "
                  f"(pairs packed into rows) | {flops / 1e9:.0f} GFLOP"
                  + (f", {flops / seconds / peak:.1%} of the bf16 peak" if peak else ""), flush=True)
            del model
    print(f"done: {len(shares)} runs; tokens/s counts the tokens of both sequences of every pair (the unit of the "
          f"padded version), so it includes the saving of computing each shared prompt once")

if __name__ == "__main__":
    main()
