"""Compare the ways of using K references on real data: DPO against each reference alone, MRPO with the paper's
ARWC and with the weightings of arXiv:2512.10040 (uniform, VDW, VAW, SWCW, TSW), Multi-DPO, Mean-Ref, and MRPO
without CTRO (the paper's Table 5 ablation), over several seeds.

    python bench/compare_weightings.py                 # the whole sweep (needs Qwen's packages, see the README)
    python bench/compare_weightings.py --seeds 0 --methods dpo-smollm2 mrpo-arwc   # a part of it

Data: the bundled Anthropic HH-RLHF harmless pairs (data/hh-rlhf-harmless): training pairs from the start of its
train split, validation pairs (VDW, VAW, TSW) from its end, disjoint from them, test pairs from its test split.
References: SmolLM2-135M-Instruct (reference 1: the policy starts as it), Gemma 3 270M, Qwen2.5-Coder-0.5B-Instruct,
scored once in bf16 by precompute.py. Every run trains the same LoRA policy with the same data order per seed,
learning rate and steps; only the loss and the weights differ.

Reported per method, on the test pairs after training, mean +- standard deviation over the seeds:
* policy acc: held-out accuracy of the policy's own log-probs, log pi(y_w|x) > log pi(y_l|x) (ties half);
* ref-1 reward acc / margin: the implicit reward beta (log pi - log pi_ref1) against reference 1, the policy's start,
  for every method (so methods with other references are measured with one yardstick);
* time per run (training and the final evaluation).

Resumable: each run keeps its outputs in OUT/runs/METHOD-sSEED/ and writes result.json when done; run the same
command again after a kill and finished runs are skipped, an interrupted one resumes from its last checkpoint.
The table goes to stdout and to --results (JSON, with every run's numbers and the command), which the tutorial plots.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mrpo  # noqa: E402
import precompute  # noqa: E402

REFS = ["smollm2", "gemma3", "qwen2.5-coder"]
VAL = ["--val-data", "{val}", "--val-refs", "{val_refs}"]
METHODS = {  # name -> train.py flags
    "dpo-smollm2": ["--loss", "dpo", "--use-refs", "1"],
    "dpo-gemma3": ["--loss", "dpo", "--use-refs", "2"],
    "dpo-qwen2.5-coder": ["--loss", "dpo", "--use-refs", "3"],
    "mrpo-arwc": ["--loss", "mrpo", "--alpha", "arwc"],
    "mrpo-uniform": ["--loss", "mrpo", "--alpha", "uniform"],
    "mrpo-vdw": ["--loss", "mrpo", "--alpha", "vdw", *VAL],
    "mrpo-vaw": ["--loss", "mrpo", "--alpha", "vaw", *VAL],
    "mrpo-swcw": ["--loss", "mrpo", "--alpha", "swcw", "--window", "1"],
    "tsw": ["--loss", "dpo", "--alpha", "tsw", "--val-data", "{val}", "--tsw-subset", "16"],
    "multi-dpo": ["--loss", "multi_dpo", "--alpha", "arwc"],
    "mean-ref": ["--loss", "mean_ref", "--alpha", "uniform"],
    "mrpo-arwc-no-ctro": ["--loss", "mrpo", "--alpha", "arwc", "--no-clip"],
}
METRICS = {"policy acc": "eval_policy/accuracies", "ref-1 reward acc": "eval_ref1/accuracies",
           "ref-1 margin": "eval_ref1/margins"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data-dir", default=os.path.join(ROOT, "data", "hh-rlhf-harmless"))
parser.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"), help="splits, caches and runs")
parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "compare_weightings.json"))
parser.add_argument("--train-pairs", type=int, default=256)
parser.add_argument("--val-pairs", type=int, default=64)
parser.add_argument("--test-pairs", type=int, default=128)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="of the references and the policy")
args = parser.parse_args()
python = sys.executable


def write_lines(path, lines):
    """Write a split file only if it is missing or differs (atomically), so existing caches stay valid."""
    text = "".join(lines)
    if os.path.isfile(path) and open(path, encoding="utf-8").read() == text:
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# Splits and reference caches (precompute.py resumes a killed scoring by itself)
os.makedirs(args.out, exist_ok=True)
train_rows = open(os.path.join(args.data_dir, "train.jsonl"), encoding="utf-8").readlines()
test_rows = open(os.path.join(args.data_dir, "test.jsonl"), encoding="utf-8").readlines()
if args.train_pairs + args.val_pairs > len(train_rows) or args.test_pairs > len(test_rows):
    sys.exit(f"error: {args.data_dir} has {len(train_rows)} train and {len(test_rows)} test pairs; ask for fewer")
splits = {"train": train_rows[:args.train_pairs], "val": train_rows[len(train_rows) - args.val_pairs:],
          "test": test_rows[:args.test_pairs]}
paths = {}
for split, rows in splits.items():
    data, cache = os.path.join(args.out, f"{split}.jsonl"), os.path.join(args.out, f"refs_{split}.safetensors")
    write_lines(data, rows)
    paths[split], paths[f"{split}_refs"] = data, cache
    try:
        precompute.load_cache(cache, precompute.read_pairs(data), data)
        continue  # up to date
    except precompute.InputError:
        pass
    cmd = [python, "precompute.py", "--data", data, "--refs", *REFS, "--dtype", args.dtype, "--out", cache]
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_method(method, seed):
    """Train one run (resuming it if it was interrupted); returns its result dict."""
    directory = os.path.join(args.out, "runs", f"{method}-s{seed}")
    done = os.path.join(directory, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    flags = [f.format(**paths) for f in METHODS[method]]
    cmd = [python, "train.py", "--data", paths["train"], "--refs", paths["train_refs"], "--eval-data", paths["test"],
           "--eval-refs", paths["test_refs"], "--dtype", args.dtype, "--lr", str(args.lr), "--batch-size",
           str(args.batch_size), "--max-steps", str(args.steps), "--warmup-steps", "2", "--eval-every",
           str(args.steps), "--no-eval-at-start", "--save-every", "4", "--seed", str(seed), "--out-dir", directory,
           *flags]
    resume = os.path.isfile(os.path.join(directory, "latest"))
    print(f"[{method} seed {seed}]{' resuming' if resume else ''}: {' '.join(cmd)}", file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd + (["--resume"] if resume else ["--overwrite"]), cwd=ROOT, check=True)  # a killed run's rest
    records = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    final = [r for r in records if "eval_loss" in r][-1]
    result = {"method": method, "seed": seed, "seconds": round(time.time() - t0, 1), "resumed": resume,
              **{name: final[key] for name, key in METRICS.items()},
              "train_steps_seconds": round(sum(r.get("step_time", 0.0) for r in records), 1)}
    for key in ("alpha", "tsw/posterior_mean"):  # what the weighting ended with, for the discussion
        last = [r[key] for r in records if key in r]
        if last:
            result[key] = last[-1]
    config = json.load(open(os.path.join(directory, "config.json")))
    if config.get("fixed_alpha") and not isinstance(config["fixed_alpha"], str):
        result["alpha"] = config["fixed_alpha"]
    write_json(done, result)
    for name in os.listdir(directory):  # keep the metrics and the result; the adapter and checkpoints are large
        if name.startswith("checkpoint-") or name.startswith("adapter_"):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return result


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


results = []
for seed in args.seeds:  # seed by seed: a partial sweep already covers every method
    for method in args.methods:
        results.append(run_method(method, seed))

# The references themselves on the test pairs (no training): their own accuracy; reference 1 is the policy's start.
test_cache = precompute.load_cache(paths["test_refs"], precompute.read_pairs(paths["test"]), paths["test"])
c, r = test_cache["chosen_logps"], test_cache["rejected_logps"]
own = [float(mrpo.reward_accuracy(c[k], r[k]).mean()) for k in range(len(REFS))]  # ties half, as in train.py
table = [{"method": f"reference {k + 1} ({name}), untrained", "policy acc": [own[k], 0.0],
          "ref-1 reward acc": [0.5, 0.0] if k == 0 else None, "ref-1 margin": [0.0, 0.0] if k == 0 else None,
          "seconds": None, "runs": 0} for k, name in enumerate(REFS)]
for method in args.methods:
    runs = [x for x in results if x["method"] == method]
    table.append({"method": method, **{name: list(mean_std([x[name] for x in runs])) for name in METRICS},
                  "seconds": statistics.mean(x["seconds"] for x in runs), "runs": len(runs)})

lines = [f"| method | {' | '.join(METRICS)} | s/run |", "|---" * (len(METRICS) + 2) + "|"]
for row in table:
    cells = ["" if row[name] is None else f"{row[name][0]:.3f} ± {row[name][1]:.3f}" if row["runs"] > 1
             else f"{row[name][0]:.3f}" for name in METRICS]
    seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
    lines.append(f"| {row['method']} | {' | '.join(cells)} | {seconds} |")
print("\n".join(lines))
total = sum(x["seconds"] for x in results)
print(f"{len(results)} runs, {total / 60:.0f} min of training and evaluation; {len(args.seeds)} seeds; "
      f"{args.steps} steps of {args.batch_size} pairs; {args.train_pairs} train / {args.val_pairs} val / "
      f"{args.test_pairs} test pairs")
write_json(args.results, {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                          "settings": {k: v for k, v in vars(args).items() if k not in ("out", "results", "data_dir")},
                          "references": REFS, "table": table, "runs": results, "markdown": "\n".join(lines),
                          "total_minutes": round(total / 60, 1)})
