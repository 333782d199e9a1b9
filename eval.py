r"""Preference accuracy and reward margin of a base model and of LoRA adapters trained by train.py, on held-out pairs.

CPU demo (what `make demo` runs after training):

    python eval.py --data data/test.jsonl --refs runs/demo/refs_test.safetensors \
        --adapters base runs/demo/dpo runs/demo/mrpo --out runs/demo/eval.json

One GPU, a 7B policy in 4 bit (the adapters of train.py's QLoRA runs; the base model is reference 1):

    python eval.py --data test.jsonl --refs runs/refs_test.safetensors --device cuda --dtype bf16 --load-in-4bit \
        --adapters base runs/dpo-7b runs/mrpo-7b --out runs/eval-7b.json --generate 20

Several GPUs: the same command under `torchrun --standalone --nproc_per_node 8 eval.py ...` (no --device). Nothing
to resume: evaluation is one pass, and the JSON is written atomically at the end.

For each policy pi (the base model, base + adapter, or a merged model): the accuracy (a tie counts half) and mean
margin of the implicit rewards beta log(pi / pi_ref) against reference 1 (ref1: the base model scores 0.5 and 0; the
paper's "preference accuracy" of DPO runs) and MRPO's virtual reference (virtual: Prop. 1, CTRO, --alpha; that of
MRPO runs), the accuracy of its own log-probs (own; each reference's too); on sets pairwise, top-1 accuracy, tau-b.

Writes --out (JSON: every number, the settings) and, with --generate N, the greedy responses of every policy to the
first N prompts beside the base model's in OUT's stem + .generations.jsonl.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import mrpo
from precompute import (InputError, atomic_write, autocast, check_flags, check_paths, check_same_format, compile_layers,
                        default_cache_dir, encode_pairs, fail, finish_distributed, gather, generation_prompt,
                        init_distributed, load_cache, load_model, parse_alpha, read_data, resolve_device,
                        response_table)

RANKING = ("pairwise_accuracy", "top1_accuracy", "kendall_tau_b")  # of a set (mrpo.set_ranking_metrics)

# ----------------------------------------------------------------------------------------------------------------
# Config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument_group("Data").add_argument
arg("--data", required=True, help="held-out pairs or sets of scored completions: a .jsonl, .json or .parquet file, "
    "a save_to_disk folder, or a dataset id ID[:CONFIG][@SPLIT] (read_data)")
arg("--set-pairs", choices=["all", "best_worst"], help="sets as pairs, as precompute.py --set-pairs did")
arg("--refs", required=True, help="reference cache of --data written by precompute.py (.safetensors)")
arg = parser.add_argument_group("Model").add_argument
arg("--model", default=None, help="base model spec; default: reference 1 of --refs")
arg("--policies", "--adapters", dest="adapters", nargs="+", default=["base"], help="'base' (no adapter), LoRA "
    "adapters (train.py's --out-dir), models with an adapter merged in")
arg("--dtype", choices=["bf16", "fp32"], default="fp32", help="weights and autocast dtype")
arg("--load-in-4bit", action="store_true", help="load the base model in 4 bit (bitsandbytes NF4)")
arg("--compile", action="store_true", help="torch.compile each decoder layer, as precompute.py --compile scored the "
    "cache (then the base row is exact); generation stays eager")
arg("--cache-dir", default=default_cache_dir(), help="where precompute.py caches converted models")
arg("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda ...")
arg = parser.add_argument_group("Reward").add_argument
arg("--beta", type=float, default=0.1, help="beta of the implicit reward beta * log(pi / pi_ref)")
arg("--alpha", default="arwc", help="virtual reference weights: arwc, uniform, or K numbers")
arg("--eps-max", type=float, default=0.1, help="CTRO bound of the adaptive eps (Eq. 9)")
arg("--eps", type=float, default=None, help="a fixed CTRO eps instead of the adaptive one")
arg("--no-clip", action="store_true", help="no CTRO clipping in the virtual reference")
arg = parser.add_argument_group("Output").add_argument
arg("--out", default="runs/eval.json", help="JSON file of all numbers (written atomically)")
arg("--generate", type=int, default=0, help="write greedy responses to the first N prompts")
arg("--max-new-tokens", type=int, default=64, help="most tokens generated per response")
args = parser.parse_args()
check_flags(args, beta=">0", eps_max="[0,1]", eps="[0,1]", generate=">=0", max_new_tokens="int>=1")
generations_path = os.path.splitext(args.out)[0] + ".generations.jsonl" if args.generate else None
check_paths([args.data, args.refs, args.model, *args.adapters], [args.out, generations_path])

(rank, world), t_start = init_distributed(), time.time()  # torchrun: rank r scores rows r, r + world, ...; 0 writes
device = resolve_device(args.device)  # under torchrun on GPUs: cuda:LOCAL_RANK
try:
    kind, pairs = read_data(args.data, args.set_pairs)
    cache = load_cache(args.refs, pairs, args.data)
except InputError as e:
    fail(e)
ref_logps, scores, mask = cache["logps"], cache["scores"], cache["mask"]  # (K, N, W), (N, W), (N, W)
(K, N, W), ref1, sets = ref_logps.shape, cache["refs"][0], kind == "sets"  # pairs: W = 2 (chosen, rejected)
try:
    alpha = parse_alpha(args.alpha, K)  # the same parser as train.py's
except ValueError as e:
    fail(f"{e} (K={K}: the references in {args.refs})")

def read_config(path):
    """The config.json in directory `path` (train.py's resolved config, or a transformers model's), else {}."""
    return json.load(open(config)) if os.path.isfile(config := os.path.join(path, "config.json")) else {}

lora_dirs = list(dict.fromkeys(p for p in args.adapters if os.path.isfile(os.path.join(p, "adapter_config.json"))))
merged_dirs = [p for p in args.adapters if p not in lora_dirs and "model_type" in read_config(p)]  # adapter merged in
for path in [p for p in args.adapters if p not in ["base", *lora_dirs, *merged_dirs]]:
    fail(f"--policies {path}: neither adapter_config.json nor a model's config.json there; fix: give the --out-dir "
         f"of a finished train.py run, a merged model's directory, or 'base' for the model without adapter")

# ----------------------------------------------------------------------------------------------------------------
# Model: the base model once, every adapter loaded into it by name, merged models beside it

spec = args.model or ref1["name"]
load_options = dict(dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=str(device), cache_dir=args.cache_dir)
merged = {}  # merged model directory -> its model, beside the base model
try:  # each model checked to format text as reference 1 did
    model, tokenizer = load_model(spec, **load_options)
    check_same_format(spec, tokenizer, ref1, args.refs)
    encoded = encode_pairs(tokenizer, pairs, ref1["max_length"], ref1["max_prompt_length"], args.data)
    for path in merged_dirs:
        merged[path], merged_tokenizer = load_model(path, **load_options)
        check_same_format(path, merged_tokenizer, ref1, args.refs)
except InputError as e:
    fail(e)
names = {path: f"policy{i}" for i, path in enumerate(lora_dirs)}  # adapter directory -> peft adapter name
for path in lora_dirs:
    if (trained_on := read_config(path).get("model", spec)) != spec:  # train.py's resolved config, beside the adapter
        fail(f"{path} was trained on base model {trained_on}, not {spec}; fix: pass --model {trained_on}")
    from peft import PeftModel
    try:  # the first adapter makes the model a PeftModel, the others join it
        if path == lora_dirs[0]:
            model = PeftModel.from_pretrained(model, path, adapter_name=names[path])
        else:
            model.load_adapter(path, adapter_name=names[path])
    except Exception as e:  # peft and safetensors raise many kinds for a broken folder
        fail(f"--adapters {path}: not a loadable LoRA adapter ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             f"fix: give the --out-dir of a finished train.py run")
    if not all(bool(torch.isfinite(w).all()) for n, w in model.named_parameters() if f".{names[path]}." in n):
        fail(f"--adapters {path}: its LoRA weights are not all finite, so every number of it would be made up; fix: "
             f"retrain it (train.py stops before saving non-finite weights)")
model.eval()
if args.compile:
    for m in [model, *merged.values()]:
        compile_layers(m)

@contextlib.contextmanager
def policy(path):
    """Policy `path` without gradients: a merged model, the base model (adapters off), or base + that adapter."""
    if path in names:
        model.set_adapter(names[path])
    with model.disable_adapter() if path == "base" and names else contextlib.nullcontext(), torch.no_grad():
        yield merged.get(path, model)

def policy_logps(path):
    """log pi(y|x) of every response under policy `path`: (N, W) float32, 0 after a set's last completion. Scored in
    the cache's rows, so the base model gives the cached reference-1 log-probs bit for bit."""
    out, mine = torch.zeros(N, W), []  # mine: the rows this rank scored
    with policy(path) as pi:
        for row in tqdm(cache["rows"][rank::world], desc=path, leave=False, dynamic_ncols=True, disable=rank != 0):
            with autocast(device, args.dtype):
                out[row] = response_table(pi, [encoded[i] for i in row], W).cpu()
            mine += row
    for idx, x in gather((mine, out[mine])):  # every rank's share, on every rank
        out[idx] = x
    return out

# ----------------------------------------------------------------------------------------------------------------
# Evaluate every policy, write the JSON and print the table

def metrics(values, beta=1.0):
    """(N, W) implicit rewards with their beta, or log-probs (beta = 1), measured: for pairs the accuracy (train.py's
    mrpo.reward_accuracy) and mean margin; for sets mrpo.set_ranking_metrics, over the sets with a preference."""
    if sets:
        m = mrpo.set_ranking_metrics(values, scores, mask, beta)
        return {k: float(m[k][m["has_preference"]].mean()) for k in RANKING}
    chosen, rejected = values.unbind(1)  # (N,) each
    return {"accuracy": float(mrpo.reward_accuracy(chosen, rejected, beta).mean()),
            "margin": float((chosen - rejected).mean())}

def evaluate(logps):
    """The metrics of a policy's (N, W) log-probs as rewards against reference 1 and MRPO's virtual reference (of
    mrpo_loss or mrpo_set_loss), and of the log-probs themselves (own/; pairs: accuracy, then mean log-probs)."""
    options = dict(alpha=alpha, eps_max=args.eps_max, eps=args.eps, clip=not args.no_clip)
    if sets:
        virtual = mrpo.mrpo_set_loss(logps, ref_logps, scores, mask, args.beta, **options)[1]  # (N, W)
    else:  # the cache's own (K, N) tensors: a strided view of logps can round differently in the sums over k
        virtual = torch.stack(mrpo.mrpo_loss(*logps.unbind(1), cache["chosen_logps"], cache["rejected_logps"],
                                             args.beta, **options)[1:], 1)  # (N, 2)
    out = {f"{view}/{k}": v for view, values, beta in (("ref1", args.beta * (logps - ref_logps[0]), args.beta),
                                                       ("virtual", virtual, args.beta), ("own", logps, 1.0))
           for k, v in metrics(values, beta).items() if (view, k) != ("own", "margin")}
    means = {} if sets else {"logps/chosen": float(logps[:, 0].mean()), "logps/rejected": float(logps[:, 1].mean())}
    return {**out, **means}

results = {path: evaluate(policy_logps(path))
           for path in tqdm(args.adapters, desc="policies", dynamic_ncols=True, disable=rank != 0)}
references = [{"name": r["name"], **({f"own/{n}": v for n, v in metrics(ref_logps[k]).items()} if sets else {
    "accuracy": metrics(ref_logps[k])["accuracy"], "logps/chosen": float(cache["chosen_logps"][k].mean()),
    "logps/rejected": float(cache["rejected_logps"][k].mean())})} for k, r in enumerate(cache["refs"])]  # own columns
finish_distributed()  # under torchrun the other ranks are done (they scored their share); rank 0 generates, writes
if rank != 0:
    sys.exit(0)

if args.generate:
    rows = [dict(p) for p in pairs[:args.generate]]
    for row in tqdm(rows, desc="generate", dynamic_ncols=True):
        input_ids = torch.tensor([generation_prompt(tokenizer, row["prompt"], ref1["max_length"],  # the model's format
                                                    ref1["max_prompt_length"], args.max_new_tokens)], device=device)
        for path in ["base"] + [p for p in args.adapters if p != "base"]:
            with policy(path) as pi, autocast(device, args.dtype), torch.compiler.set_stance("force_eager"):
                out = pi.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
            row[path] = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    with atomic_write(generations_path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

report = {**{k: getattr(args, k) for k in ("data", "refs", "dtype", "load_in_4bit", "compile", "beta", "alpha",
                                           "eps_max", "eps")},
          "clip": not args.no_clip, "pairs": N, "model": spec, "policies": results, "references": references,
          "generations": generations_path}
with atomic_write(args.out, "w") as f:
    f.write(json.dumps(report, indent=2) + "\n")

width = max(len(p) for p in args.adapters + ["policy"])
head = {"accuracy": "acc", "margin": "margin", **dict(zip(RANKING, ("pairwise", "top-1", "tau"))),
        "own": "own" if sets else "own log-prob"}  # a column's header: metric(view)
columns = [(f"{v}/{k}", f"{head[k]}({head.get(v, v)})") for v in ("ref1", "virtual", "own")
           for k in (RANKING if sets else ("accuracy", "margin")) if (v, k) != ("own", "margin")]  # (key, header)
print("  ".join([f"{'policy':<{width}}"] + [h for _, h in columns]))
for path, r in results.items():
    print("  ".join([f"{path:<{width}}"] + [f"{r[k]:{len(h)}.{4 if 'margin' in k else 3}f}" for k, h in columns]))
own = [f"own/{k}" for k in RANKING] if sets else ["accuracy"]
print(f"references (own {'pairwise accuracy, top-1, tau' if sets else 'accuracy: log-prob of chosen > rejected'}): "
      + ", ".join(r["name"] + "".join(f" {r[k]:.3f}" for k in own) for r in references))
print(f"eval.py: {len(results)} policies on {N} pairs of {args.data} in {time.time() - t_start:.0f}s -> {args.out}"
      + (f", generations in {generations_path}" if generations_path else ""))
