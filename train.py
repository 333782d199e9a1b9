r"""Train a policy by DPO, MRPO, Multi-DPO or Mean-Ref with LoRA, optionally on a 4-bit base model (QLoRA).

The policy starts as reference 1 of the cache precompute.py wrote and is trained through LoRA adapters (peft). The K
references are not loaded: their log-probs come from the cache, so training holds one model whatever K is. A step
takes --batch-size pairs as whole rows of the cache, the rows reference 1 was scored in, so that the policy starts at
reference 1 exactly (docs/exact-start.md); precompute.response_table scores them and a loss of mrpo.py applies.
Sets of scored completions, --alpha vdw|vaw|swcw|tsw and torchrun: README.md and docs/distributed.md.

CPU demo (what `make demo` runs; the bundled data and the two embedded references):

    python precompute.py --data data/train.jsonl --out runs/demo/refs_train.safetensors --row-pairs 4
    python precompute.py --data data/test.jsonl  --out runs/demo/refs_test.safetensors --row-pairs 4
    python train.py --loss mrpo --data data/train.jsonl --refs runs/demo/refs_train.safetensors \
        --eval-data data/test.jsonl --eval-refs runs/demo/refs_test.safetensors --lr 5e-4 --max-steps 60 \
        --out-dir runs/demo/mrpo

One GPU, a 7B policy loaded in 4 bit (QLoRA), the references precomputed with --row-pairs 2 (see precompute.py):

    python train.py --loss mrpo --data train.jsonl --refs runs/refs_train.safetensors \
        --eval-data test.jsonl --eval-refs runs/refs_test.safetensors --device cuda --dtype bf16 \
        --load-in-4bit --grad-checkpointing --batch-size 8 --grad-accum 4 --out-dir runs/mrpo-7b

Resume an interrupted run: the same command plus --resume continues from the latest checkpoint in --out-dir (LoRA
adapter, optimizer, RNG states, step, data order, weighting state); on CPU the metrics and the final adapter are
identical to those of a run that was never interrupted.

Writes into --out-dir: metrics.jsonl (a JSON record per logged step under DPO/TRL's metric names, eval_ for the
held-out ones, and check/ref1_max_abs_diff: the policy's step-0 log-probs against the cached reference 1),
config.json (the resolved configuration), checkpoint-NNNNNN/ (the latest checkpoint, written atomically) and the
final adapter (adapter_config.json, adapter_model.safetensors: peft.PeftModel.from_pretrained loads it).

Shapes: B pairs (or sets) of a batch, W responses each (a pair: chosen, rejected), K references, N pairs of the data.
"""

import argparse
import importlib.util
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import mrpo
from precompute import (InputError, atomic_write, autocast, check_flags, check_paths, check_same_format, chunks,
                        compile_layers, default_cache_dir, encode_pairs, fail, finish_distributed, gather,
                        init_distributed, load_cache, load_model, load_tokenizer, parse_alpha, quantization, read_data,
                        resolve_device, response_table)

# ----------------------------------------------------------------------------------------------------------------
# Config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument_group("Data").add_argument
arg("--data", required=True, help="training pairs or sets of scored completions: .jsonl, .json, .parquet, a "
    "save_to_disk folder or a dataset id ID[:CONFIG][@SPLIT]")
arg("--set-pairs", choices=["all", "best_worst"], help="train on sets as pairs (as precompute.py --set-pairs made the "
    "caches): every (better, worse) pair, or best against worst")
arg("--refs", required=True, help="reference cache of --data written by precompute.py (.safetensors)")
arg("--eval-data", help="held-out pairs (as --data); needed unless --eval-every 0")
arg("--eval-refs", help="reference cache of --eval-data")
arg("--val-data", help="validation pairs for --alpha vdw, vaw and tsw, apart from --data and --eval-data")
arg("--val-refs", help="reference cache of --val-data (for --alpha vdw and vaw)")
arg("--use-refs", help="1-based indices of the references the loss uses, in order (default: all); the policy still "
    "starts as reference 1: --loss dpo --use-refs 3 is DPO against reference 3")
arg = parser.add_argument_group("Model").add_argument
arg("--model", help="policy base model (default: reference 1 of --refs), with reference 1's tokenizer and template")
arg("--dtype", choices=["bf16", "fp32"], default="fp32", help="base model weights and autocast (LoRA, log-probs: fp32)")
arg("--load-in-4bit", action="store_true", help="load the base model in 4 bit (bitsandbytes NF4): QLoRA")
arg("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
arg("--compile", action="store_true", help="torch.compile each decoder layer (as precompute.py --compile scored "
    "reference 1: then the start is exact); up to a minute of compiling, cached on disk")
arg("--cache-dir", default=default_cache_dir(), help="where precompute.py caches converted models")
arg = parser.add_argument_group("LoRA").add_argument
arg("--lora-r", type=int, default=16, help="LoRA rank")
arg("--lora-alpha", type=float, default=32, help="LoRA scaling numerator (scale = alpha / r)")
arg("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
arg("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="modules that get "
    "adapters, or 'all-linear'")
arg = parser.add_argument_group("Loss").add_argument
arg("--loss", choices=sorted(mrpo.LOSSES) + ["mpo"], default="mrpo", help="dpo (the first of --use-refs, or the one "
    "--alpha tsw picks), mrpo (Eq. 7), multi_dpo (Eq. 11), mean_ref; sets: mpo (first of --use-refs) or mrpo")
arg("--set-weighting", choices=["none", "deviation", "signed"], default="none", help="sets: weights w_i of mpo_loss")
arg("--gamma", type=float, default=1.0, help="sets: w_i = exp(gamma |r_i - mean r|), signed: exp(gamma (r_i - mean r))")
arg("--beta", type=float, default=0.1, help="DPO/MRPO temperature beta")
arg("--loss-type", choices=mrpo.LOSS_TYPES, default="sigmoid", help="loss of a pair's reward margin: sigmoid (DPO, "
    "Eq. 5), ipo, hinge or robust (rDPO)")
arg("--label-smoothing", type=float, default=0.0, help="flipped-label rate in [0, 0.5): cDPO (sigmoid), rDPO (robust)")
arg("--alpha", default="arwc", help="reference weights: arwc (Eq. 10), uniform, K comma-separated numbers, vdw / vaw "
    "(from --val-refs), swcw (from the last --window batches), tsw (--loss dpo, a Thompson-sampled reference a step)")
arg("--window", type=int, default=1, help="--alpha swcw: how many past batches set the weights")
arg("--tsw-prior", default="5,5", help="--alpha tsw: the Beta(a, b) prior of every reference, 'a,b'")
arg("--tsw-subset", type=int, default=16, help="--alpha tsw: validation pairs drawn each step to judge it")
arg("--logps", choices=["sum", "mean"], default="sum", help="sum of the response's log-probs (the paper) or mean")
arg("--eps-max", type=float, default=0.1, help="CTRO bound eps_max of the adaptive eps (Eq. 9)")
arg("--eps", type=float, help="a fixed CTRO eps instead of the adaptive one")
arg("--no-clip", action="store_true", help="turn CTRO clipping (Eq. 8) off")
arg = parser.add_argument_group("Optimization").add_argument
arg("--lr", type=float, default=1e-5, help="peak learning rate (paper: 1e-5; the CPU demo uses 5e-4)")
arg("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
arg("--warmup-steps", type=int, default=10, help="optimizer steps of linear warmup")
arg("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the LoRA weights")
arg("--batch-size", type=int, default=8, help="pairs per step, whole rows of the cache (precompute.py --row-pairs)")
arg("--grad-accum", type=int, default=1, help="micro-batches per step, each of whole rows")
arg("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
arg("--epochs", type=float, default=3, help="passes over the data (ignored with --max-steps)")
arg("--max-steps", type=int, help="optimizer steps of the whole run (sets the schedule)")
arg("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout")
arg = parser.add_argument_group("Run").add_argument
arg("--out-dir", default="runs/train", help="where metrics, checkpoints and the adapter go")
arg("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
arg("--overwrite", action="store_true", help="start afresh in an --out-dir holding another run, deleting its outputs")
arg("--eval-every", type=int, default=20, help="evaluate on the held-out set every N steps (0: never)")
arg("--no-eval-at-start", action="store_true", help="skip the evaluation before step 1 (of reference 1 itself)")
arg("--log-every", type=int, default=1, help="write a metrics record every N steps")
arg("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
arg("--stop-after", type=int, help="end the process after this step as if killed, the schedule unchanged (--resume)")
arg("--report-to", choices=["none", "tensorboard", "wandb"], default="none", help="also log to TensorBoard "
    "(--out-dir/tensorboard/) or W&B (WANDB_PROJECT, default mrpo) as train/<metric> and eval/<metric>")
arg("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
args = parser.parse_args()
check_flags(args, lora_r="int>=1", lora_alpha=">0", lora_dropout="[0,1)", beta=">0", window="int>=1",
            tsw_subset="int>=1", eps_max="[0,1]", eps="[0,1]", label_smoothing="[0,0.5)", lr=">0", min_lr=">=0",
            warmup_steps=">=0", weight_decay=">=0", batch_size="int>=1", grad_accum="int>=1", grad_clip=">=0",
            epochs=">0", max_steps="int>=1", seed="any", eval_every=">=0", log_every="int>=1", save_every="int>=1",
            stop_after="int>=1")
check_paths([args.data, args.refs, args.eval_data, args.eval_refs, args.val_data, args.val_refs, args.model],
            [args.out_dir + os.sep])
rank, world = init_distributed()  # under torchrun: this process's rank of `world`; (0, 1) without it
device = resolve_device(args.device)  # under torchrun on GPUs: cuda:LOCAL_RANK

def refuse(checks):
    """fail() with the message of the first (wrong, message) that holds: flags that contradict each other."""
    for wrong, message in checks:
        if wrong:
            fail(message)

refuse([(args.no_clip and args.eps is not None, f"--eps {args.eps} sets the CTRO trust region, which --no-clip turns "
         f"off; fix: drop one of --eps and --no-clip"),
        (args.eval_refs and not args.eval_data, "--eval-refs needs --eval-data (the data of the cache)"),
        (args.val_refs and not args.val_data, "--val-refs needs --val-data (the data of the cache)"),
        (args.eval_every and not (args.eval_data and args.eval_refs), "no held-out set: pass --eval-data TEST.jsonl "
         "and --eval-refs its cache (python precompute.py --data TEST.jsonl --out CACHE.safetensors), or "
         "--eval-every 0 to train without evaluation"),
        (args.alpha in ("vdw", "vaw") and not (args.val_data and args.val_refs), f"--alpha {args.alpha} fixes the "
         f"weights from the references' margins on validation pairs: pass --val-data VAL.jsonl and --val-refs its "
         f"cache (precompute.py with the same references); keep VAL apart from --data and --eval-data"),
        (args.alpha == "tsw" and not args.val_data, "--alpha tsw rewards a reference when the policy's accuracy on "
         "validation pairs rises after a step: pass --val-data VAL.jsonl (apart from --data and --eval-data)"),
        (args.alpha == "tsw" and args.loss != "dpo", f"--alpha tsw trains DPO against the one reference it samples "
         f"each step, so it needs --loss dpo (got --loss {args.loss})"),
        (args.loss == "dpo" and args.alpha not in ("arwc", "tsw"), f"--loss dpo uses one reference (the first of "
         f"--use-refs), so --alpha {args.alpha} would weigh nothing; fix: --loss mrpo, multi_dpo or mean_ref with "
         f"--alpha {args.alpha}, or --use-refs K for DPO against reference K"),
        (args.compile and args.grad_checkpointing, "--compile and --grad-checkpointing do not go together (the layers' "
         "recomputed forward would be traced inside the compiled backward); fix: drop one"),
        (args.resume and args.overwrite, "--resume continues the run in --out-dir, --overwrite deletes it; fix: "
         "choose one"),
        (args.label_smoothing and args.loss_type in ("ipo", "hinge"), f"--label-smoothing is the flip rate of "
         f"--loss-type sigmoid (cDPO) or robust (rDPO), not of {args.loss_type}; fix: drop it"),
        (args.report_to != "none" and not importlib.util.find_spec(args.report_to), f"--report-to {args.report_to}: "
         f"the {args.report_to} package is not installed; fix: pip install {args.report_to}, or drop the flag")])
previous_run = [n for n in os.listdir(args.out_dir) if n.startswith(("checkpoint-", ".tmp-")) or n in (
    "latest", "metrics.jsonl", "adapter_config.json", "adapter_model.safetensors", "tensorboard")]
if previous_run and not (args.resume or args.overwrite):  # nothing of another run is deleted without being asked
    fail(f"{args.out_dir} holds another run ({', '.join(sorted(previous_run)[:4])}); fix: --resume to continue it, "
         f"--overwrite to delete it and start afresh, or another --out-dir")
quant = quantization(args.load_in_4bit)
torch.manual_seed(args.seed)
random.seed(args.seed)

# ----------------------------------------------------------------------------------------------------------------
# Data: pairs (or sets), their cached reference log-probs (K, N, W), the rows of a batch, the policy's encodings

try:
    (kind, pairs), (_, eval_pairs), (_, val_pairs) = (read_data(p, args.set_pairs) if p else (None, []) for p in
                                                      (args.data, args.eval_data, args.val_data))
    sets = kind == "sets"  # rows of W scored completions: set-level losses, ranking metrics
    refuse([(sets and args.loss not in ("mpo", "mrpo"), f"{args.data} holds sets of scored completions: train them "
             f"with --loss mpo or mrpo, or as pairs with --set-pairs all|best_worst (--loss {args.loss}), from a "
             f"cache that precompute.py made with the same --set-pairs"),
            (not sets and args.loss == "mpo", "--loss mpo is set-level: give --data sets of scored completions (on "
             "a pair it is DPO: --loss dpo)"),
            (sets and args.alpha in ("vdw", "vaw", "swcw", "tsw"), f"--alpha {args.alpha} weighs references on "
             f"pairs; on sets use arwc (set ARWC), uniform or fixed numbers"),
            (sets and args.loss_type != "sigmoid", "--loss-type is a loss of a pair's margin; the set losses have "
             "their own form (mrpo.mpo_loss): drop it")])
    cache, eval_cache, val_cache = (load_cache(path, rows, data) if path else None for path, rows, data in (
        (args.refs, pairs, args.data), (args.eval_refs, eval_pairs, args.eval_data),
        (args.val_refs, val_pairs, args.val_data)))
except InputError as e:
    fail(e)
(K_cache, N), ref1, data_rows, row_pairs = cache["logps"].shape[:2], cache["refs"][0], cache["rows"], cache["row_pairs"]
try:
    use = [int(k) - 1 for k in args.use_refs.split(",")] if args.use_refs else list(range(K_cache))
except ValueError:
    fail(f"--use-refs {args.use_refs!r}: expected comma-separated reference numbers, e.g. --use-refs 1,3")
if not use or len(set(use)) != len(use) or not all(0 <= k < K_cache for k in use):
    fail(f"--use-refs {args.use_refs!r}: give distinct numbers from 1 to {K_cache}, the references in {args.refs} "
         f"({', '.join(r['name'] for r in cache['refs'])})")
K, names = len(use), [cache["refs"][k]["name"] for k in use]
for path, other in ((args.eval_refs, eval_cache), (args.val_refs, val_cache)):
    per_data = ("batch_size", "truncated_rows", "straddled_rows")  # may differ between two data files' caches
    same = [{k: v for k, v in a.items() if k not in per_data} for a in (cache["refs"] + (other or {}).get("refs", []))]
    if other and not all(k < len(other["refs"]) and same[k] == same[K_cache + k] for k in sorted({0, *use})):
        fail(f"{path} was computed with other references or settings ({[r['name'] for r in other['refs']]}) than "
             f"{args.refs} ({[r['name'] for r in cache['refs']]}); fix: rerun precompute.py on its data with the "
             f"same --refs, --dtype and lengths")
if args.batch_size % row_pairs or (args.batch_size // row_pairs) % args.grad_accum:
    fail(f"--batch-size {args.batch_size} must be whole rows of {row_pairs} pairs (the rows of {args.refs}), and "
         f"--grad-accum {args.grad_accum} must divide those rows; fix: --batch-size a multiple of "
         f"{row_pairs * args.grad_accum}, or rebuild the cache with another precompute.py --row-pairs")

def ref_logps(c, refs=use):
    """A cache's log-probs of references `refs` (0-based): (len(refs), N, W), per token if --logps mean."""
    return c["logps"][refs] / c["tokens"][refs].clamp(min=1) if args.logps == "mean" else c["logps"][refs]

def chosen_rejected(x):
    """Pairs' (K', N, 2) -> (chosen, rejected), (K', N) each, contiguous (as the losses and weightings take them)."""
    return tuple(t.contiguous() for t in x.unbind(-1))

swcw_refs = chosen_rejected(ref_logps(cache)) if args.alpha == "swcw" else None  # (K, N) each: SWCW's update
eval_ref1 = ref_logps(eval_cache, [0]) if eval_cache else None  # the yardstick of every run: the policy's start
alpha, weighting = None, mrpo.SlidingWindowWeights(K, args.window) if args.alpha == "swcw" else None  # or TSW's
if args.alpha in ("vdw", "vaw"):
    alpha = (mrpo.vdw_weights if args.alpha == "vdw" else mrpo.vaw_weights)(*chosen_rejected(ref_logps(val_cache)))
    print(f"train.py: --alpha {args.alpha} from {len(val_pairs)} pairs of {args.val_data}: "
          + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, alpha.tolist())), file=sys.stderr)
elif args.alpha == "tsw":
    try:
        weighting = mrpo.ThompsonSamplingWeights(K, tuple(map(float, args.tsw_prior.split(","))), seed=args.seed)
    except ValueError as e:
        fail(f"--tsw-prior {args.tsw_prior!r}: expected 'a,b' with a, b > 0 ({e})")
elif args.alpha != "swcw":
    try:
        alpha = parse_alpha(args.alpha, K)  # the same parser as eval.py's
    except ValueError as e:
        fail(f"{e} (K={K}: the references {', '.join(names)} of {args.refs})")
if args.loss != "dpo" and K == 1:
    print(f"train.py: warning: one reference ({names[0]}), so --loss {args.loss} is DPO", file=sys.stderr)
spec = args.model or ref1["name"]
try:
    tokenizer = load_tokenizer(spec, args.cache_dir)
    check_same_format(spec, tokenizer, ref1, args.refs)
    encoded, eval_encoded, val_encoded = (encode_pairs(tokenizer, p, ref1["max_length"], ref1["max_prompt_length"],
                                                       path) for p, path in ((pairs, args.data), (eval_pairs,
                                                       args.eval_data), (val_pairs, args.val_data)))
except InputError as e:
    fail(e)
rows_per_step = args.batch_size // row_pairs
steps_per_epoch = math.ceil(len(data_rows) / rows_per_step)
total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)

def epoch_order(epoch):
    """The data order of one epoch: a permutation of the row indices, seeded by (seed, epoch)."""
    return torch.randperm(len(data_rows), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch)).tolist()

def batch_rows(step):
    """The rows (lists of pair indices) of optimizer step `step` (0-based); an epoch's last batch may be smaller."""
    epoch, i = divmod(step, steps_per_epoch)
    return [data_rows[j] for j in epoch_order(epoch)[i * rows_per_step:(i + 1) * rows_per_step]]

def pairs_of(rows):
    """The pair indices of rows, in order."""
    return [i for row in rows for i in row]

def mine(items):
    """This process's share of rows or pairs: under torchrun items rank, rank + world, ...; all without it."""
    return items[rank::world]

# ----------------------------------------------------------------------------------------------------------------
# Model: base (optionally 4-bit) + LoRA adapters; the optimizer over the LoRA weights only

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

model, _ = load_model(spec, dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=str(device),
                      cache_dir=args.cache_dir)
model.config.use_cache = False
# Dropout off in the base model (as in the DPO reference code): a pair's log-probs then do not depend on the random
# state, and at step 0 they equal the cached reference-1 ones. Modules copy their config's rates at init, so both go.
for holder in [model.config, model.config.get_text_config(), *model.modules()]:
    for key, value in list(vars(holder).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(holder, key, 0.0)
    if isinstance(holder, torch.nn.Dropout):
        holder.p = 0.0
# The base model keeps the dtypes reference 1 was scored in: peft's prepare_model_for_kbit_training is not used, as it
# upcasts every 16-bit weight of a 4-bit model to float32 (other log-probs than the cache's, and 1 GB more for 7B).
if args.grad_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))
for module in model.modules():  # under bf16 autocast peft's float32 cast of each LoRA input changes no value
    if hasattr(module, "cast_input_dtype_enabled"):
        module.cast_input_dtype_enabled = args.dtype != "bf16"
if args.compile:
    compile_layers(model)
params = [p for p in model.parameters() if p.requires_grad]
if world > 1:  # every rank starts from rank 0's LoRA weights (they are seeded alike anyway; DDP does the same)
    for p in params:
        dist.broadcast(p.data, src=0)
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
config = {**vars(args), "model": spec, "device": str(device), "K": K, "N": N, "refs_identity": cache["refs"],
          "use_refs_names": names, "fixed_alpha": alpha.tolist() if torch.is_tensor(alpha) else alpha,
          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "torch": torch.__version__,
          "trainable_params": sum(p.numel() for p in params), "world_size": world}
RUN_FLAGS = {"resume", "overwrite", "stop_after", "eval_every", "log_every", "save_every", "device", "compile",
             "no_eval_at_start"}  # the flags that may change when a run is resumed
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

# ----------------------------------------------------------------------------------------------------------------
# Helpers: schedule, loss, evaluation, the step-0 check, weightings, gradients across processes, files

def get_lr(step):
    """Linear warmup to --lr over --warmup-steps, then cosine decay to --min-lr at the last step (total_steps - 1)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)

def loss_terms(rows, encs, c, refs, loss=args.loss, weights=None):
    """Forward the pairs (or sets) of `rows`, one forward per row, and apply the loss against the references `refs`
    (positions among --use-refs) of cache c (None: zeros) with weights alpha (default: the run's). Returns (losses
    (B,), metric sums, tokens, (policy log-probs (B, W) as the loss saw them, their sums), pair indices)."""
    idx, width = pairs_of(rows), c["logps"].shape[2] if c is not None else 2
    with autocast(device, args.dtype):
        sums = policy = torch.cat([response_table(model, [encs[i] for i in row], width) for row in rows])  # (B, W)
    if args.logps == "mean":  # each sum over the policy's own response token count
        count = torch.tensor([[len(e.ids) - e.start for e in encs[i]] + [1] * (width - len(encs[i])) for i in idx])
        policy = sums / count.to(device).clamp(min=1)
    ref = ref_logps(c, [use[k] for k in refs])[:, idx].to(device) if c is not None else \
        torch.zeros(1, len(idx), width, device=device)  # (K', B, W)
    losses, metrics = (set_terms if sets else pair_terms)(policy, sums, ref, c, idx, loss,
                                                          alpha if weights is None else weights)
    return losses, metrics, sum(len(e.ids) for i in idx for e in encs[i]), (policy.detach(), sums.detach()), idx

def pair_terms(policy, sums, ref, c, idx, loss, weights):
    """loss_terms on pairs: mrpo.compute_loss and DPO/TRL's metrics summed over the B pairs (and policy/accuracies:
    how often log pi(y_w) > log pi(y_l))."""
    (pc, pr), (rc, rr) = policy.unbind(1), chosen_rejected(ref)  # (B,), (K', B)
    losses, chosen, rejected = mrpo.compute_loss(
        loss, pc, pr, rc, rr, args.beta, alpha=weights, eps_max=args.eps_max, eps=args.eps, clip=not args.no_clip,
        loss_type=args.loss_type, label_smoothing=args.label_smoothing)
    pc, pr = pc.detach(), pr.detach()
    return losses, {"loss": losses.detach().sum(), "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                    "rewards/accuracies": mrpo.reward_accuracy(chosen, rejected, args.beta).sum(),
                    "rewards/margins": (chosen - rejected).sum(), "logps/chosen": pc.sum(),
                    "logps/rejected": pr.sum(), "policy/accuracies": mrpo.reward_accuracy(pc, pr).sum()}

def set_terms(policy, sums, ref, c, idx, loss, weights):
    """loss_terms on sets: the set-level loss (mpo_loss against the first reference, mrpo_set_loss against all) and
    ranking metrics summed over the sets that have a preference (means() divides them by their number)."""
    scores, mask = c["scores"][idx].to(device), c["mask"][idx].to(device)  # (B, W) each
    if loss == "mpo":
        losses, rewards, has = mrpo.mpo_loss(policy, ref[0], scores, mask, args.beta, args.set_weighting, args.gamma)
    else:
        losses, rewards, has = mrpo.mrpo_set_loss(policy, ref, scores, mask, args.beta, alpha=weights,
                                                  eps_max=args.eps_max, eps=args.eps, clip=not args.no_clip,
                                                  weighting=args.set_weighting, gamma=args.gamma)
    ranked = mrpo.set_ranking_metrics(rewards, scores, mask, args.beta)
    own = mrpo.set_ranking_metrics(policy.detach(), scores, mask)
    to_ref1 = mrpo.set_ranking_metrics(sums.detach() - c["logps"][0, idx].to(device), scores, mask)
    over = lambda m, key: (m[key] * has).sum()  # noqa: E731  a metric summed over the sets with a preference
    better = mask[:, :, None] & mask[:, None, :] & (scores[:, :, None] > scores[:, None, :])  # (B, W, W): i over j
    margins = ((rewards[:, :, None] - rewards[:, None, :]) * better).sum((1, 2)) / better.sum((1, 2)).clamp(min=1)
    return losses, {"loss": losses.detach().sum(), "sets/with_preference": has.sum(),
                    "rewards/accuracies": over(ranked, "pairwise_accuracy"),
                    "rewards/top1_accuracies": over(ranked, "top1_accuracy"),
                    "rewards/kendall_tau": over(ranked, "kendall_tau_b"), "rewards/margins": (margins * has).sum(),
                    "policy/accuracies": over(own, "pairwise_accuracy"),
                    "ref1/set_accuracies": over(to_ref1, "pairwise_accuracy")}

def add(totals, sums):
    for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals

def means(parts, n):
    """Metric sums of every rank (gather's list) -> means over n pairs (ranking metrics: over the sets with one)."""
    totals = {k: sum(part.get(k, 0.0) for part in parts) for k in parts[0]}
    m = totals.get("sets/with_preference")
    return {k: v / (m if m and k.startswith(("rewards/", "policy/", "ref1/")) else n) for k, v in totals.items()}

def step_weights(evaluating=False):
    """(loss, alpha, refs) of the coming step, refs the references the loss sees (positions among --use-refs). TSW
    samples its reference here (one draw per step); evaluation takes the one of highest posterior mean instead."""
    if args.alpha == "tsw":
        return "dpo", None, [int(weighting.posterior_mean().argmax()) if evaluating else weighting.choose()[0]]
    return args.loss, weighting.alpha() if args.alpha == "swcw" else alpha, list(range(K))

@torch.no_grad()
def val_accuracy(idx):
    """TSW's reward signal: the preference accuracy of the policy's own log-probs (ties half) on validation pairs idx,
    in eval mode, over all ranks' shares (no reference involved, so any rows do)."""
    model.eval()
    sums = loss_terms(chunks(mine(idx), row_pairs), val_encoded, None, [0], "dpo")[1] if mine(idx) else {}
    model.train()
    return sum(gather(float(sums.get("policy/accuracies", 0.0)))) / len(idx)

@torch.no_grad()
def evaluate():
    """Mean loss and reward metrics on the held-out set, in eval mode, scored in the eval cache's rows (TRL's eval_
    names); ref1/ names: the implicit reward against reference 1 whatever the loss's references (0 at step 0)."""
    model.eval()
    loss, weights, refs = step_weights(evaluating=True)
    totals = {}
    for row in tqdm(mine(eval_cache["rows"]), desc="eval", leave=False, dynamic_ncols=True, disable=rank != 0):
        _, sums, _, (policy, _), idx = loss_terms([row], eval_encoded, eval_cache, refs, loss, weights)
        if not sets:
            chosen, rejected = (policy - eval_ref1[0, idx].to(device)).unbind(1)  # log-ratios to reference 1, (B,)
            sums["ref1/accuracies"] = mrpo.reward_accuracy(chosen, rejected).sum()
            sums["ref1/margins"] = args.beta * (chosen - rejected).sum()
        add(totals, sums)
    model.train()  # under torchrun each rank scored every world-th row; rank 0 always has one
    return {f"eval_{k}": v for k, v in means(gather(totals), len(eval_pairs)).items()}

def check_start(scored):
    """At step 0 the policy IS reference 1: its log-prob sums of this rank's micro-batches ([(pair indices, (B, W))])
    equal the cache's bit for bit if it was made in the same dtype, quantization and compilation. Logs the largest
    |diff| over all ranks; warns unless 0."""
    parts = gather((max([0.0] + [float((x.cpu() - cache["logps"][0, idx]).abs().max()) for idx, x in scored]),
                    sum(len(encoded[i]) for idx, _ in scored for i in idx)))
    diff, n = max(d for d, _ in parts), sum(m for _, m in parts)
    log({"step": 0, "check/ref1_max_abs_diff": diff, "check/sequences": n})
    same = (ref1["dtype"], ref1["quantization"], ref1["compiled"]) == (args.dtype, quant, args.compile)
    message = f"step-0 check: policy vs cached reference-1 log-probs, max |diff| = {diff:.2e} nats over {n} sequences"
    if diff > (0.0 if same else 0.5):
        cause = (f"The cache was computed in {ref1['dtype']}/{ref1['quantization']}"
                 f"{' compiled' * ref1['compiled']}, the policy runs in {args.dtype}/{quant}"
                 f"{' compiled' * args.compile}: precompute with the same --dtype, quantization and --compile for an "
                 f"exact start." if
                 not same else "Same rows, dtype and quantization: the kernels are not deterministic on this device.")
        message = (f"\n{'!' * 100}\nWARNING: {message}: the policy does not start at reference 1, so the DPO/MRPO "
                   f"rewards are biased from the first step. {cause}\n{'!' * 100}")
    if rank == 0:
        print(message, file=sys.stderr)

def tsw_before(step):
    """--alpha tsw, before a step: (a validation subset drawn afresh, seeded by (seed, step) so that a resumed run
    draws the same, the policy's accuracy on it); None for the other weightings."""
    if args.alpha != "tsw":
        return None
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    subset = torch.randperm(len(val_pairs), generator=g)[:args.tsw_subset].tolist()
    return subset, val_accuracy(subset)

def update_weighting(batch, weights, refs, before):
    """After the optimizer step: SWCW's window takes the step's batch (so a batch never weighs itself), TSW rewards
    its reference when the validation accuracy strictly rose. Returns what set the step's weights, for the record."""
    if args.alpha == "swcw":
        weighting.update(*(x[:, pairs_of(batch)] for x in swcw_refs))
        return {"alpha": weights.tolist()}
    if args.alpha != "tsw":
        return {}
    subset, accuracy_before = before
    accuracy_after = val_accuracy(subset)
    weighting.update(refs[0], accuracy_after > accuracy_before)
    return {"tsw/reference": use[refs[0]] + 1, "tsw/reward": int(accuracy_after > accuracy_before),
            "tsw/val_accuracy_before": accuracy_before, "tsw/val_accuracy_after": accuracy_after,
            "tsw/posterior_mean": weighting.posterior_mean().tolist()}

def sum_gradients():
    """Under torchrun: the step's gradient is the SUM of the ranks' (each divided by the whole batch), one all_reduce
    of the flat LoRA gradients, as DDP with one bucket (DDP's hooks need its own forward, which response_logps does
    not call). A rank without pairs this step (an epoch's short last batch) sends zeros."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)

def stop(what, step):
    """A non-finite loss or gradient: stop before anything is saved from it; the latest checkpoint stays intact."""
    print(f"train.py: error: {what} at step {step + 1}; stopping without saving: "
          f"{last_saved or 'no checkpoint was written yet'} is intact. Fix: lower --lr, keep --grad-clip on, or check "
          f"those rows and the cache; resume with --resume", file=sys.stderr)
    sys.exit(1)

def write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)

def save_adapter(directory):
    """The LoRA adapter in peft's format (adapter_config.json, adapter_model.safetensors), each file atomically."""
    tmp = tempfile.mkdtemp(dir=args.out_dir, prefix=".tmp-adapter-")
    model.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    shutil.rmtree(tmp)

def save_checkpoint(step):
    """checkpoint-NNNNNN/ (adapter, trainer state, config) made in a temp directory and renamed into place, then the
    'latest' pointer; older checkpoints are removed. Returns its path."""
    name = f"checkpoint-{step:06d}"
    tmp, final = tempfile.mkdtemp(dir=args.out_dir, prefix=f".tmp-{name}-"), os.path.join(args.out_dir, name)
    save_adapter(tmp)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng,
                "schedule": {"lr": get_lr(step), "warmup_steps": args.warmup_steps, "total_steps": total_steps},
                "data_order": epoch_order(step // steps_per_epoch),
                "weighting": weighting.state_dict() if weighting else None}, os.path.join(tmp, "trainer_state.pt"))
    write_json(os.path.join(tmp, "config.json"), config)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with atomic_write(os.path.join(args.out_dir, "latest"), "w") as f:
        f.write(name + "\n")
    for old in os.listdir(args.out_dir):  # keep only the latest checkpoint
        if old.startswith("checkpoint-") and old != name:
            shutil.rmtree(os.path.join(args.out_dir, old), ignore_errors=True)
    return final

def latest_checkpoint():
    """The latest checkpoint of --out-dir, refused unless it was written with the same flags (but RUN_FLAGS)."""
    pointer = os.path.join(args.out_dir, "latest")
    if not os.path.isfile(pointer):
        fail(f"--resume: no checkpoint in {args.out_dir} (no 'latest' file); fix: run without --resume")
    ckpt_dir = os.path.join(args.out_dir, open(pointer).read().strip())
    try:
        saved = json.load(open(os.path.join(ckpt_dir, "config.json")))
    except (OSError, json.JSONDecodeError) as e:
        fail(f"--resume: {ckpt_dir} has no readable config.json ({e}); fix: start a new --out-dir (or --overwrite)")
    saved, now = (json.loads(json.dumps(c, default=str)) for c in (saved, config))  # as config.json holds them
    changed = [k for k in vars(args) if k not in RUN_FLAGS and saved.get(k) != now[k]]
    if changed:
        fail(f"--resume: these settings differ from the run in {ckpt_dir}: " + ", ".join(
            f"--{k.replace('_', '-')} {config[k]!r} (was {saved.get(k)!r})" for k in changed)
            + "; fix: resume with the original flags, or start a new --out-dir")
    return ckpt_dir

def resume():
    """Restore the latest checkpoint (adapter, optimizer, weighting, RNG states), cut metrics.jsonl back to it."""
    ckpt_dir = latest_checkpoint()
    from safetensors.torch import load_file
    set_peft_model_state_dict(model, load_file(os.path.join(ckpt_dir, "adapter_model.safetensors")))
    try:  # tensors and plain Python data only: loading runs no code from the file
        state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), weights_only=True)
    except pickle.UnpicklingError as e:
        fail(f"--resume: {os.path.join(ckpt_dir, 'trainer_state.pt')} does not load with torch.load(weights_only=True)"
             f" ({str(e).splitlines()[0]}); it was not written by this train.py. Fix: start a new --out-dir")
    optimizer.load_state_dict(state["optimizer"])
    if weighting is not None:  # SWCW's window or TSW's posteriors and sampler state
        weighting.load_state_dict(state["weighting"])
    if state["data_order"] != epoch_order(state["step"] // steps_per_epoch):
        fail(f"--resume: the data order saved in {ckpt_dir} differs from this run's; was --data or --seed changed?")
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    truncate_metrics(state["step"])
    if rank == 0:
        print(f"resumed from {ckpt_dir} at step {state['step']}", file=sys.stderr)
    return state["step"]

def truncate_metrics(step):
    """On resume: drop the metrics records past the checkpoint's step (the interrupted run may have logged steps it
    did not save) and a last line torn by the kill; any other line that is not JSON is damage, an error."""
    lines = open(metrics_path).read().splitlines(keepends=True) if os.path.exists(metrics_path) else []
    kept = []
    for i, line in enumerate(lines):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                fail(f"--resume: {metrics_path}, line {i + 1} is not JSON ({line[:60]!r}); fix: delete or repair "
                     f"that line, then resume")
    if rank == 0:
        with atomic_write(metrics_path, "w") as f:
            f.writelines(kept)

def open_reporter(kind, step):
    """--report-to: a function that sends a metrics record to TensorBoard or W&B (None for none) under TRL's names,
    train/<name> and eval/<name> (metrics.jsonl's eval_<name>). A resumed run continues the same curves."""
    scalars = lambda record: {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v  # noqa: E731
                              for k, v in record.items() if k != "step" and type(v) in (int, float)}
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.out_dir, "tensorboard"), purge_step=step or None)

        def report(record):
            for name, value in scalars(record).items():
                writer.add_scalar(name, value, record["step"])
            writer.flush()
        return report
    if kind == "wandb":
        import wandb
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mrpo"), dir=args.out_dir, config=config,
                         name=os.path.basename(os.path.abspath(args.out_dir)))
        return lambda record: run.log(scalars(record), step=record["step"])
    return None

def log(record):
    if rank == 0:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if reporter:
            reporter(record)

# ----------------------------------------------------------------------------------------------------------------
# Training loop (counted in optimizer steps)

if not args.resume and rank == 0:  # a fresh run with --overwrite: none of the previous run's outputs is left behind
    for name in previous_run:
        path = os.path.join(args.out_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
step = resume() if args.resume else 0
if rank == 0:  # under torchrun rank 0 writes every file (config, metrics, checkpoints, adapter); the others none
    write_json(os.path.join(args.out_dir, "config.json"), config)
    metrics_file, reporter = open(metrics_path, "a"), open_reporter(args.report_to, step)
    print(f"train.py: {args.loss} on {N} pairs, K={K} references ({', '.join(names)}), policy {spec} + LoRA "
          f"r={args.lora_r} ({config['trainable_params'] / 1e6:.2f}M trainable), {total_steps} steps of "
          f"{args.batch_size} pairs ({rows_per_step} rows of {row_pairs}), {args.dtype}"
          f"{' 4-bit' if args.load_in_4bit else ''} on {device}" + (f", {world} processes" if world > 1 else ""),
          file=sys.stderr)
if world > 1:  # every rank has read the checkpoint before rank 0 writes anything new
    dist.barrier()
model.train()
if step == 0 and args.eval_every and not args.no_eval_at_start:
    log({"step": 0, **evaluate()})
t_start, start_step, last_saved = time.time(), step, None
bar = tqdm(total=total_steps, initial=step, desc=args.loss, unit="step", dynamic_ncols=True, disable=rank != 0)
while step < total_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    batch = batch_rows(step)  # the whole batch of the step, the same on every rank
    n_pairs, rows = len(pairs_of(batch)), mine(batch)  # this rank's rows
    loss_name, weights, refs = step_weights()  # the same on every rank (TSW's sampler is seeded alike)
    before = tsw_before(step)
    totals, tokens, scored = {}, 0, []
    for micro in chunks(rows, max(1, math.ceil(len(rows) / args.grad_accum))):  # micro-batches of whole rows
        losses, sums, n_tokens, (_, sequence_sums), idx = loss_terms(micro, encoded, cache, refs, loss_name, weights)
        loss = losses.sum() / n_pairs  # the whole batch's mean, however it is split
        if not torch.isfinite(loss):
            stop(f"the loss is {float(loss)} (pairs {[i + 1 for i in idx]} of {args.data})", step)
        loss.backward()
        scored += [(idx, sequence_sums)] if step == 0 else []
        totals, tokens = add(totals, sums), tokens + n_tokens
    if step == 0:
        check_start(scored)
    if world > 1:
        sum_gradients()
    parts = gather((totals, tokens))  # metric sums over ranks
    totals, tokens = means([t for t, _ in parts], n_pairs), sum(n for _, n in parts)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        stop(f"the gradient norm is {float(grad_norm)}", step)
    optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in params):  # nothing is saved from non-finite weights
        stop("the updated LoRA weights are not finite", step)
    optimizer.zero_grad(set_to_none=True)
    chosen_weights = update_weighting(batch, weights, refs, before)  # what set this step's reference weights
    step, dt = step + 1, time.time() - t0
    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), **totals, "lr": lr,
              "grad_norm": float(grad_norm), "tokens": tokens, "tokens/s": tokens / dt, "step_time": dt,
              **chosen_weights}
    if step % args.log_every == 0 or step == total_steps:
        log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                        margin=f"{record['rewards/margins']:.3f}", lr=f"{lr:.1e}")
    bar.update(1)
    if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
        result = evaluate()
        log({"step": step, **result})
        bar.write(f"step {step}: eval loss {result['eval_loss']:.4f}, accuracy "
                  f"{result['eval_rewards/accuracies']:.3f}, margin {result['eval_rewards/margins']:.4f}")
    if rank == 0 and (step % args.save_every == 0 or step == total_steps or step == args.stop_after):
        last_saved = save_checkpoint(step)  # the weights and the optimizer state are the same on every rank
    if step == args.stop_after and step < total_steps:
        break
bar.close()
if step < total_steps:  # --stop-after
    if rank == 0:
        print(f"train.py: stopped after step {step} (--stop-after); continue with the same command and --resume",
              file=sys.stderr)
    finish_distributed()
    sys.exit(0)
if rank == 0:
    metrics_file.close()
    save_adapter(args.out_dir)
    records = [json.loads(line) for line in open(metrics_path)]
    train, held_out = [r for r in records if "loss" in r][-1:], [r for r in records if "eval_loss" in r][-1:]
    print(f"train.py: {args.loss}, steps {start_step + 1}-{step} of {total_steps} in {time.time() - t_start:.0f}s"
          + "".join(f" | train loss {r['loss']:.4f}, accuracy {r['rewards/accuracies']:.2f}" for r in train)
          + "".join(f" | eval accuracy {r['eval_rewards/accuracies']:.3f}, margin {r['eval_rewards/margins']:.4f}"
                    for r in held_out) + f" | adapter in {args.out_dir}")
finish_distributed()
