"""Compare set-level and pairwise training on sets of 4 graded answers: MPO (against reference 1), MRPO on sets
(mrpo_set_loss: two references, ARWC, CTRO), DPO on every (better, worse) pair of each set, and DPO on each set's
best against its worst answer (how UltraFeedback-style sets are usually binarised), over several seeds.

    python bench/compare_sets.py                       # 4 methods x 3 seeds, then the table
    python bench/compare_sets.py --seeds 0 --methods mpo dpo-best-worst   # a part of it

Data: data/mt-bench-sets (60 training and 20 test MT-bench prompts, each with four answers graded 1-10 by GPT-4).
References: SmolLM2-135M-Instruct (reference 1: the policy starts as it) and Gemma 3 270M, scored once by
precompute.py in bf16 for the sets and for the pairs made from them (--set-pairs). Every run trains the same LoRA
policy for the same number of optimizer steps, each step on the same number of prompts: 4 sets, or their pairs (24
with --set-pairs all, 4 with best_worst). Answers are truncated to fit --max-length tokens, as on CPU they must be.

Reported per method, mean +- standard deviation over the seeds, by eval.py on the 20 held-out sets (the sets whose
grades are not all equal), after training:
* own pairwise / top-1 / tau: how the policy's own log-probs rank each set's answers (pairs of different grades
  ranked right, ties half; the share of its top answers that have the best grade; Kendall's tau-b);
* ref-1 pairwise: the same pairwise accuracy for the implicit reward beta (log pi - log pi_ref1) against reference 1,
  the policy's start (0.5 before training, exactly);
* time per run (training and evaluation).

Resumable: each run writes OUT/runs/METHOD-sSEED/result.json when done (and its evaluation beside it); run the
same command again after a kill and finished runs are skipped, an interrupted one starts again. The table goes to
stdout and to --results (JSON).
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
import precompute  # noqa: E402

REFS = ["smollm2", "gemma3"]
METHODS = {  # name -> (--set-pairs of the data, train.py flags, prompts per step -> batch size)
    "mpo": (None, ["--loss", "mpo"], 1),
    "mrpo-sets": (None, ["--loss", "mrpo", "--alpha", "arwc"], 1),
    "dpo-all-pairs": ("all", ["--loss", "dpo", "--grad-accum", "6"], 6),  # 3x the tokens of a set: 6 micro-batches
    "dpo-best-worst": ("best_worst", ["--loss", "dpo"], 1),
}
METRICS = {"own pairwise": "own/pairwise_accuracy", "own top-1": "own/top1_accuracy", "own tau": "own/kendall_tau_b",
           "ref-1 pairwise": "ref1/pairwise_accuracy"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data-dir", default=os.path.join(ROOT, "data", "mt-bench-sets"))
parser.add_argument("--out", default=os.path.join(ROOT, "runs", "compare-sets"), help="caches and runs")
parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "compare_sets.json"))
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
parser.add_argument("--sets-per-step", type=int, default=4, help="prompts per step (all-pairs: their 6 pairs each)")
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--max-length", type=int, default=320)
parser.add_argument("--max-prompt-length", type=int, default=128)
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="of the references and the policy")
args = parser.parse_args()
python = sys.executable
data = {split: os.path.join(args.data_dir, f"{split}.jsonl") for split in ("train", "test")}


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def cache(split, set_pairs):
    """The reference cache of a split, as sets or as pairs made from them; made by precompute.py if missing."""
    path = os.path.join(args.out, f"refs_{split}_{set_pairs or 'sets'}.safetensors")
    try:
        precompute.load_cache(path, precompute.read_data(data[split], set_pairs)[1], data[split])
        return path
    except precompute.InputError:
        pass
    cmd = [python, "precompute.py", "--data", data[split], "--refs", *REFS, "--dtype", args.dtype, "--out", path,
           "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length)]
    cmd += ["--set-pairs", set_pairs] if set_pairs else []
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return path


def run_method(method, seed):
    """Train one run and evaluate it on the held-out sets; returns its result dict."""
    directory = os.path.join(args.out, "runs", f"{method}-s{seed}")
    done = os.path.join(directory, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    set_pairs, flags, per_prompt = METHODS[method]
    cmd = [python, "train.py", "--data", data["train"], "--refs", cache("train", set_pairs), "--dtype", args.dtype,
           "--lr", str(args.lr), "--batch-size", str(args.sets_per_step * per_prompt), "--max-steps", str(args.steps),
           "--warmup-steps", "2", "--eval-every", "0", "--save-every", str(args.steps), "--seed", str(seed),
           "--out-dir", directory, "--overwrite", *flags] + (["--set-pairs", set_pairs] if set_pairs else [])
    print(f"[{method} seed {seed}]: {' '.join(cmd)}", file=sys.stderr)
    t0 = time.time()
    if not os.path.isfile(os.path.join(directory, "adapter_model.safetensors")):  # else trained, not evaluated yet
        subprocess.run(cmd, cwd=ROOT, check=True)
    report = directory + ".eval.json"
    subprocess.run([python, "eval.py", "--data", data["test"], "--refs", cache("test", None), "--dtype", args.dtype,
                    "--policies", directory, "--out", report], cwd=ROOT, check=True)
    final = json.load(open(report))["policies"][directory]
    records = [json.loads(line) for line in open(os.path.join(directory, "metrics.jsonl"))]
    result = {"method": method, "seed": seed, "seconds": round(time.time() - t0, 1),
              "train_steps_seconds": round(sum(r.get("step_time", 0.0) for r in records), 1),
              "train_tokens": sum(r.get("tokens", 0) for r in records), **{n: final[k] for n, k in METRICS.items()}}
    write_json(done, result)
    for name in os.listdir(directory):  # keep the metrics, the evaluation and the result; drop the weights
        if name.startswith("checkpoint-") or name.startswith("adapter_"):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return result


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


results = [run_method(method, seed) for seed in args.seeds for method in args.methods]
base_report = os.path.join(args.out, "eval_base.json")  # the untrained policy (reference 1) and the references
if not os.path.isfile(base_report):
    subprocess.run([python, "eval.py", "--data", data["test"], "--refs", cache("test", None), "--dtype", args.dtype,
                    "--policies", "base", "--out", base_report], cwd=ROOT, check=True)
base = json.load(open(base_report))
table = [{"method": "reference 1 (SmolLM2), untrained", **{n: [base["policies"]["base"][k], 0.0]
                                                         for n, k in METRICS.items()}, "seconds": None, "runs": 0}]
table += [{"method": f"reference {k + 1} ({r['name']}), untrained", "seconds": None, "runs": 0,
           **{n: [r[key], 0.0] if key in r else None for n, key in METRICS.items()}}  # own ranking only
          for k, r in enumerate(base["references"]) if k > 0]
for method in args.methods:
    runs = [x for x in results if x["method"] == method]
    table.append({"method": method, **{n: list(mean_std([x[n] for x in runs])) for n in METRICS},
                  "seconds": statistics.mean(x["seconds"] for x in runs), "runs": len(runs)})

lines = [f"| method | {' | '.join(METRICS)} | s/run |", "|---" * (len(METRICS) + 2) + "|"]
for row in table:
    cells = ["" if row[n] is None else f"{row[n][0]:.3f} ± {row[n][1]:.3f}" if row["runs"] > 1
             else f"{row[n][0]:.3f}" for n in METRICS]
    seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
    lines.append(f"| {row['method']} | {' | '.join(cells)} | {seconds} |")
print("\n".join(lines))
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "unknown")
write_json(args.results, {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "cpu": cpu,
                          "settings": vars(args), "runs": results, "table": table, "markdown": "\n".join(lines)})
