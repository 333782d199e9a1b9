#!/usr/bin/env bash
# The demo behind `make demo`: precompute the two default references on the bundled data, train DPO and MRPO from
# the same seed, evaluate the base model, DPO and MRPO on the held-out pairs, and print where the time went.
#
#   bash demo.sh              # outputs in runs/demo/ (refs_*.safetensors, dpo/, mrpo/, eval.json, times.txt)
#   PY=python bash demo.sh    # another interpreter than .venv/bin/python
#
# Demo hyperparameters (CPU): LoRA r=16 on SmolLM2-135M-Instruct, batches of 8 pairs (2 rows of 4: the pairs are
# short, and rows of 4 score them faster than one pair per forward), 60 steps (1.6 epochs of the 300 training
# pairs), lr 5e-4 (the paper uses 1e-5 for 7B models and 3 epochs; a 135M model and a few minutes need a larger
# step), fp32, the dtype reference 1 is scored in, so the policy starts at it exactly. Every stage is resumable:
# rerun the script and finished stages are skipped, a killed training continues from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
OUT=runs/demo
mkdir -p "$OUT"
: > "$OUT/times.txt"

stage() {  # stage NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; record the seconds it took
    local name=$1 done_file=$2
    shift 2
    local t0=$SECONDS
    if [ -e "$done_file" ]; then
        echo "== $name: $done_file exists, skipped"
    else
        echo "== $name"
        "$@"
    fi
    printf '%-16s %5d s\n' "$name" $((SECONDS - t0)) >> "$OUT/times.txt"
}

again() {  # the flag that lets a training stage rerun into its folder: continue a checkpoint, or start afresh
    if [ -e "$1/latest" ]; then echo --resume; else echo --overwrite; fi
}
TRAIN=(--data data/train.jsonl --refs "$OUT/refs_train.safetensors" --eval-data data/test.jsonl
       --eval-refs "$OUT/refs_test.safetensors" --seed 0 --lr 5e-4 --warmup-steps 5 --batch-size 8
       --max-steps 60 --eval-every 30 --save-every 30 --dtype fp32)
start=$SECONDS
stage "precompute train" "$OUT/refs_train.safetensors" \
    "$PY" precompute.py --data data/train.jsonl --out "$OUT/refs_train.safetensors" --row-pairs 4
stage "precompute test" "$OUT/refs_test.safetensors" \
    "$PY" precompute.py --data data/test.jsonl --out "$OUT/refs_test.safetensors" --row-pairs 4
stage "train dpo" "$OUT/dpo/adapter_model.safetensors" \
    "$PY" train.py --loss dpo "${TRAIN[@]}" --out-dir "$OUT/dpo" "$(again "$OUT/dpo")"
stage "train mrpo" "$OUT/mrpo/adapter_model.safetensors" \
    "$PY" train.py --loss mrpo "${TRAIN[@]}" --out-dir "$OUT/mrpo" "$(again "$OUT/mrpo")"
stage "eval" "$OUT/never" "$PY" eval.py --data data/test.jsonl --refs "$OUT/refs_test.safetensors" \
    --adapters base "$OUT/dpo" "$OUT/mrpo" --out "$OUT/eval.json"
printf '%-16s %5d s\n' "total" $((SECONDS - start)) >> "$OUT/times.txt"

echo
echo "Where the time went:"
cat "$OUT/times.txt"
echo
"$PY" - "$OUT/eval.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"Held-out preference accuracy and mean reward margin ({report['pairs']} pairs, beta {report['beta']}):")
print(f"{'policy':<16} {'accuracy':>9} {'margin':>9}   (implicit reward against reference 1; against the "
      f"virtual reference: accuracy, margin)")
for name, r in report["policies"].items():
    label = {"base": "base model"}.get(name, name.rsplit("/", 1)[-1].upper())
    print(f"{label:<16} {r['ref1/accuracy']:9.3f} {r['ref1/margin']:9.4f}   ({r['virtual/accuracy']:.3f}, "
          f"{r['virtual/margin']:.4f})")
print("reference models' own accuracy (log-prob of chosen > rejected): "
      + ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in report["references"]))
EOF
