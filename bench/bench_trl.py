"""Side-by-side benchmark: train.py's training step vs TRL's DPOTrainer, same pairs, model, LoRA and batch, one run.

TRL is a benchmark-only dependency (not in requirements.txt). Install it beside the project's pins, e.g. in its own
virtualenv that sees the project's packages, so nothing of the project's environment is changed:

    python3 -m venv venv-trl && echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \\
        > venv-trl/lib/python3.11/site-packages/project.pth     # run with the project's python
    venv-trl/bin/pip install trl==1.16.0 datasets==5.2.0 -c requirements.txt
    venv-trl/bin/python bench/bench_trl.py                       # fp32 and bf16, 48 hh-rlhf pairs, 2 threads
    venv-trl/bin/python bench/bench_trl.py --dtypes bf16 --threads 16

Both sides: SmolLM2-135M-Instruct, LoRA r=16 (alpha 32) on q/k/v/o/gate/up/down projections, DPO with beta 0.1,
8 pairs per optimizer step, one epoch of the 48 pairs (6 steps), reference log-probs computed before training (ours
by precompute.py, TRL's by precompute_ref_log_probs=True), median step time of steps 2-6. Each side runs in its own
process, one after the other, under the same thread count and the same glibc allocator settings (freed memory kept
for reuse, as precompute.keep_freed_memory sets it in train.py: MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
1 GiB in both environments; --default-malloc leaves TRL's without them):
- ours: `python train.py --loss dpo ...` itself, the script's real step, timed by train.py (step_time in
  metrics.jsonl: forward, loss, backward, clipping, AdamW step);
- TRL: DPOTrainer.train(), timed from on_step_begin to on_step_end of a callback (the same work).
bf16: ours loads the weights in bf16 (LoRA weights float32), TRL gets the same bf16 model and bf16=True.

It prints per dtype: s/step of each and the ratio train.py/TRL (goal <= 0.10); for train.py's step the share of
padding among the tokens it computes (goal <= 5%), the tokens it computes vs the tokens of the 2B sequences, the
step's FLOPs and their fraction of this machine's bf16 matmul peak, measured here with a large bf16 matmul
(goal >= 25%), and the peak RSS of each process.

FLOPs of a step (counted, not measured): forward = 2 * (weights of the decoder's linear layers) per computed token
+ 4 * (attention width) * (keys each query attends) per layer + 2 * V * H per scored token (output layer); the
backward through frozen weights costs one forward again (activation gradients; the LoRA weight gradients are
r/H of that, left out). So a step = 2 forwards. Padding and masked attention are not counted: they are waste.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import precompute  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_peak(seconds=3.0, n=2048):
    """Measured bf16 matmul FLOP/s of this machine: the best of repeated (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    best, end = 0.0, time.time() + seconds
    a @ b
    while time.time() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def cpu_model():
    """(lscpu's model name, whether the CPU has AMX): which matrix units the measured peak comes from."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU", False
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return model, " amx_" in out or "amx_bf16" in out


def step_flops(model, encoded_pairs):
    """(FLOPs of one training step, tokens computed, tokens of the sequences) on these pairs (or sets: the prompt
    once, every response after it); see the docstring."""
    config = model.config
    decoder = model.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    computed = sequences = keys = scored = 0
    for group in encoded_pairs:
        P = precompute.shared_prefix(*group)
        for j, e in enumerate(group):
            first = 0 if j == 0 else P  # the shared prompt is computed with the first response only
            computed += len(e.ids) - first
            sequences += len(e.ids)
            keys += sum(p + 1 for p in range(first, len(e.ids)))  # causal keys of each computed token
            scored += len(e.ids) - max(e.start, 1)
    forward = (2 * linear * computed + 4 * width * keys * config.num_hidden_layers
               + 2 * config.vocab_size * config.hidden_size * scored)
    return 2 * forward, computed, sequences


def run(command, env):
    """Run a command; return its peak resident set size in bytes (VmHWM, read until it exits). Fails loudly."""
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while child.poll() is None:
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")])
            except OSError:  # it just exited
                pass
            time.sleep(0.2)
        if child.returncode:
            log.seek(0)
            sys.exit(f"bench_trl: {' '.join(command[:3])} ... failed:\n{log.read()[-4000:]}")
    return peak


TRL_CHILD = r'''
import json, sys, time, torch
sys.path.insert(0, ROOT)
import precompute
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model, tokenizer = precompute.load_model(args["model"], dtype=args["dtype"])
rows = precompute.read_pairs(args["data"])[:args["pairs"]]
times = []

class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k):
        self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        times.append(time.perf_counter() - self.t0)

config = DPOConfig(output_dir=args["out"], per_device_train_batch_size=args["batch_size"], max_steps=args["steps"],
                   learning_rate=5e-4, beta=0.1, precompute_ref_log_probs=True, bf16=args["dtype"] == "bf16",
                   use_cpu=args["device"] == "cpu", logging_steps=1, report_to=[], save_strategy="no",
                   max_length=512, dataloader_num_workers=0, seed=0)
trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=args["targets"],
                                            task_type="CAUSAL_LM"),
                     callbacks=[Timer()])
trainer.train()
json.dump(times, open(args["out"] + "/times.json", "w"))
'''.replace("ROOT", repr(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"),
                       help="JSONL preference pairs (default: the bundled multi-turn hh-rlhf pairs)")
    group.add_argument("--pairs", type=int, default=48, help="pairs used (the first PAIRS of --data): one epoch")
    group.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    group.add_argument("--row-pairs", type=int, default=1,
                       help="ours: pairs per row of reference 1 (precompute.py --row-pairs; train.py runs one forward "
                            "per row)")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="smollm2", help="policy/reference model spec")
    group.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    group.add_argument("--device", default="cpu", help="cpu or cuda")
    group.add_argument("--threads", type=int, default=2, help="torch threads of both sides (the issue used 2)")
    group.add_argument("--default-malloc", action="store_true", help="leave TRL's process under glibc's default "
                       "allocator (train.py still calls precompute.keep_freed_memory at its start)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench_trl: TRL is not installed. It is a benchmark-only dependency; install it without touching "
                 "the project's pins: pip install trl==1.16.0 datasets==5.2.0 -c requirements.txt (see the top of "
                 "bench/bench_trl.py for a separate virtualenv)")
    torch.set_num_threads(args.threads)
    steps = args.pairs // args.batch_size
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if not args.default_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 30))

    work = tempfile.mkdtemp(prefix="bench_trl-")
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for row in precompute.read_pairs(args.data)[:args.pairs]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    peak = bf16_peak()
    model, tokenizer = precompute.load_model(args.model)
    encoded = [(precompute.encode(tokenizer, p["prompt"], p["chosen"]),
                precompute.encode(tokenizer, p["prompt"], p["rejected"])) for p in precompute.read_pairs(data)]
    cpu, amx = cpu_model()
    print(f"{len(encoded)} pairs of {args.data}, {args.batch_size} per step, {steps} steps, {args.model} + LoRA r=16 "
          f"on {len(TARGETS)} projections, {args.threads} threads, {args.device}; {cpu} (AMX: {'yes' if amx else 'no'})"
          f", measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    for dtype in args.dtypes:
        refs = os.path.join(work, f"refs-{dtype}.safetensors")
        run([sys.executable, "precompute.py", "--data", data, "--refs", args.model, "--dtype", dtype,
             "--device", args.device, "--row-pairs", str(args.row_pairs), "--out", refs], env)
        out = os.path.join(work, f"ours-{dtype}")
        ours_rss = run([sys.executable, "train.py", "--loss", "dpo", "--data", data, "--refs", refs,
                           "--dtype", dtype, "--device", args.device, "--batch-size", str(args.batch_size),
                           "--max-steps", str(steps), "--eval-every", "0", "--lr", "5e-4", "--warmup-steps", "0",
                           "--save-every", str(10 ** 6), "--out-dir", out], env)
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        ours = [r["step_time"] for r in records if "step_time" in r]
        # the FLOPs of the batches train.py ran: the cache's rows in its data order (seed 0), as train.py orders them
        rows = precompute.load_cache(refs, precompute.read_pairs(data))["rows"]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        per_step = args.batch_size // args.row_pairs
        flops = [step_flops(model, [encoded[i] for j in order[s * per_step:(s + 1) * per_step] for i in rows[j]])
                 for s in range(steps)]
        trl_out = os.path.join(work, f"trl-{dtype}")
        os.makedirs(trl_out)
        trl_rss = run([sys.executable, "-c", TRL_CHILD, json.dumps(
            {"model": args.model, "dtype": dtype, "data": data, "pairs": args.pairs, "batch_size": args.batch_size,
             "steps": steps, "out": trl_out, "threads": args.threads, "device": args.device, "targets": TARGETS})],
            env)
        theirs = json.load(open(os.path.join(trl_out, "times.json")))
        ours_s, theirs_s = statistics.median(ours[1:]), statistics.median(theirs[1:])
        fraction = statistics.median(f / t for (f, _, _), t in zip(flops[1:], ours[1:])) / peak
        computed, sequences = sum(f[1] for f in flops), sum(f[2] for f in flops)
        print(f"{dtype}: train.py {ours_s:.2f} s/step, TRL {theirs_s:.2f} s/step, ratio train.py/TRL "
              f"{ours_s / theirs_s:.3f} (goal <= 0.10) | train.py step: padding 0.0% of computed tokens "
              f"(rows of {args.row_pairs} pairs, one forward each; goal <= 5%), {computed} tokens computed for "
              f"{sequences} sequence tokens "
              f"({1 - computed / sequences:.0%} saved by sharing prompts), "
              f"{statistics.median(f[0] for f in flops) / 1e9:.0f} GFLOP/step, {fraction:.1%} of the bf16 matmul peak "
              f"(goal >= 25%) | process peak RSS: train.py {ours_rss / 2**20:.0f} MiB, TRL {trl_rss / 2**20:.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
