"""Benchmark of train.py under torchrun: training tokens/s of 1 process against 2, and the scaling efficiency.

    python bench/bench_distributed.py                          # SmolLM2 + LoRA on CPU, 32 bundled pairs
    python bench/bench_distributed.py --steps 12 --batch-size 16

It runs train.py itself, unchanged, as a subprocess, on the first --pairs pairs of the bundled training set with
reference 1 only (SmolLM2, fp32; the reference cache is made first by precompute.py, not timed), in three ways:

    1 process,  1 thread     python train.py ...                       (OMP_NUM_THREADS=1)
    1 process,  2 threads    python train.py ...                       (OMP_NUM_THREADS=2)
    2 processes, 1 thread    torchrun --nproc_per_node 2 train.py ...  (OMP_NUM_THREADS=1, Gloo)

and reads tokens/s from metrics.jsonl: the tokens of the step's whole batch (all ranks) over the step's wall time,
which includes the all-reduce of the LoRA gradients and of the metrics. The first step (warm-up) is left out; the
figure is the median over the other steps. All three runs train on the same pairs in the same order.

Which comparison is fair. On a 2-core CPU the data-parallel question is "1 core per process, twice the processes":
scaling efficiency = tokens/s(2 processes x 1 thread) / (2 x tokens/s(1 process x 1 thread)), 1.0 being perfect.
The practical question on the same 2 cores is whether 2 processes of 1 thread beat 1 process of 2 threads (the
ratio printed last). On GPUs the first is what matters: each process has a GPU of its own. CPU timings on a shared
machine are noisy; run it when nothing else runs.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "train.jsonl"), help="JSONL preference pairs")
    group.add_argument("--pairs", type=int, default=32, help="how many of its pairs to train on")
    group.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step (the global batch)")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="smollm2", help="policy (and reference 1) spec: alias, hub id, directory")
    group = parser.add_argument_group("Benchmark")
    group.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    import precompute
    work = tempfile.mkdtemp(prefix="bench-distributed-")
    data, cache = os.path.join(work, "pairs.jsonl"), os.path.join(work, "refs.safetensors")
    with open(data, "w", encoding="utf-8") as f:
        for row in precompute.read_pairs(args.data)[:args.pairs]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"reference cache of {args.pairs} pairs under {args.model} (not timed) ...", file=sys.stderr)
    subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", cache, "--refs", args.model],
                   cwd=ROOT, check=True, capture_output=True)

    train = ["train.py", "--data", data, "--refs", cache, "--eval-every", "0", "--save-every", "100000",
             "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--lr", "5e-4",
             "--warmup-steps", "0", "--device", "cpu"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"1 process x 1 thread": ([], 1), "1 process x 2 threads": ([], 2), "2 processes x 1 thread": (torchrun, 1)}
    speed = {}
    for name, (launcher, threads) in runs.items():
        out = os.path.join(work, name.replace(" ", "_"))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("RANK", None)
        print(f"{name} ...", file=sys.stderr)
        result = subprocess.run([sys.executable, *launcher, *train, "--out-dir", out], cwd=ROOT, env=env,
                                capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{name}: train.py failed:\n{result.stderr[-3000:]}")
        steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        steps = [r for r in steps if "tokens/s" in r]
        speed[name] = statistics.median(r["tokens/s"] for r in steps[1:])
        tokens = statistics.median(r["tokens"] for r in steps[1:])
        print(f"{name:<24} {speed[name]:8.0f} tokens/s  (median of steps 2-{len(steps)}, {tokens:.0f} tokens/step)")

    one, two, threads = speed["1 process x 1 thread"], speed["2 processes x 1 thread"], speed["1 process x 2 threads"]
    print(f"scaling efficiency, 2 processes x 1 thread / (2 x 1 process x 1 thread): {two / (2 * one):.2f}")
    print(f"2 processes x 1 thread / 1 process x 2 threads (the same 2 cores): {two / threads:.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
