"""Benchmark of reference scoring: tokens/s and the share of padding, per reference model and dtype.

    python bench/bench_precompute.py                                   # default models, bf16 and fp32, train set
    python bench/bench_precompute.py --refs smollm2 --dtypes bf16 --rows 100
    python bench/bench_precompute.py --device cuda --refs Qwen/Qwen2.5-7B-Instruct --load-in-4bit --dtypes bf16

It scores the chosen and rejected responses of --rows pairs exactly as precompute.py does (each model's own format,
length-sorted batches, right padding, float32 log-probs) and prints one line per (model, dtype): model load time,
tokens/s counting only real tokens (prompt + response; padding excluded), and the padding share of the batches that
were run, next to the share that batches in file order would have had. Goal: padding <= 10% of tokens.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import precompute  # noqa: E402


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
    group.add_argument("--device", default="cpu", help="torch device")
    group.add_argument("--cache-dir", default=precompute.default_cache_dir(), help="GGUF safetensors cache")
    group = parser.add_argument_group("Scoring")
    group.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    pairs = precompute.read_pairs(args.data)[:args.rows]
    print(f"{len(pairs)} pairs from {args.data}, batch size {args.batch_size}, {torch.get_num_threads()} threads, "
          f"device {args.device}")
    paddings = []
    for spec in args.refs:
        for dtype in args.dtypes:
            t0 = time.time()
            model, tokenizer = precompute.load_model(spec, dtype, load_in_4bit=args.load_in_4bit, device=args.device,
                                                     cache_dir=args.cache_dir)
            load_s = time.time() - t0
            encoded = precompute.encode_pairs(tokenizer, pairs, args.max_length, args.max_prompt_length)
            lengths = [len(e.ids) for e in encoded]
            batches = precompute.length_batches(lengths, args.batch_size)
            in_order = [list(range(i, min(i + args.batch_size, len(encoded))))
                        for i in range(0, len(encoded), args.batch_size)]
            with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
                warm = precompute.collate([encoded[i] for i in batches[0]])
                precompute.sequence_logps(model, *(x.to(args.device) for x in warm))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.time()
                for b in tqdm(batches, desc=f"{spec} {dtype}", unit="batch", leave=False):
                    batch = precompute.collate([encoded[i] for i in b])
                    precompute.sequence_logps(model, *(x.to(args.device) for x in batch))
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.time() - t0
            paddings.append(precompute.padding_share(encoded, batches))
            print(f"{spec:>14} {dtype:>5}: load {load_s:5.1f}s | {sum(lengths) / seconds:7.0f} tokens/s "
                    f"({sum(lengths)} tokens in {seconds:.1f}s, mean length {sum(lengths) / len(lengths):.0f}) | "
                  f"padding {paddings[-1]:5.1%} length-sorted, "
                  f"{precompute.padding_share(encoded, in_order):5.1%} in file order", flush=True)
            del model
    print(f"done: {len(paddings)} runs, worst length-sorted padding {max(paddings):.1%} (goal <= 10%)")


if __name__ == "__main__":
    main()
