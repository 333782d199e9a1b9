r"""Train a policy by DPO, MRPO, Multi-DPO or Mean-Ref with LoRA, optionally on a 4-bit base model (QLoRA).

The policy starts as reference 1 (the first model in the reference cache) and is trained through LoRA adapters
(peft). The K reference models are not loaded: their log-probs come from the cache that precompute.py wrote, so
training holds one model in memory whatever K is. Each optimizer step reads a batch of pairs, runs each pair's shared
prompt once with its chosen and rejected responses after it (the pairs packed into one row, no padding), sums the
response-token log-probs in float32 (precompute.pair_logps, the same code that scored the references) and applies a
loss from mrpo.py.

CPU demo (what `make demo` runs; the bundled data and the two embedded references):

    python precompute.py --data data/train.jsonl --out runs/demo/refs_train.safetensors
    python precompute.py --data data/test.jsonl  --out runs/demo/refs_test.safetensors
    python train.py --loss mrpo --data data/train.jsonl --refs runs/demo/refs_train.safetensors \
        --eval-data data/test.jsonl --eval-refs runs/demo/refs_test.safetensors \
        --lr 5e-4 --max-steps 60 --out-dir runs/demo/mrpo

One GPU, a 7B policy loaded in 4 bit (QLoRA), references precomputed the same way (see precompute.py):

    python train.py --loss mrpo --data train.jsonl --refs runs/refs_train.safetensors \
        --eval-data test.jsonl --eval-refs runs/refs_test.safetensors --device cuda --dtype bf16 \
        --load-in-4bit --grad-checkpointing --batch-size 8 --grad-accum 4 --out-dir runs/mrpo-7b

Several GPUs, one process each (data parallel, torch.distributed; the README's "More than one GPU"): the same
command under torchrun, without --device; --batch-size is the whole batch of a step, split over the GPUs:

    torchrun --standalone --nproc_per_node 8 train.py --loss mrpo ... --load-in-4bit --batch-size 64 --grad-accum 4

Which references, and how they are weighted (arXiv:2512.10040's weightings; formulas in mrpo.py):

    --use-refs 1,3                   train on a subset of the cache's references (the policy starts at reference 1)
    --loss dpo --use-refs 2          single-reference DPO against reference 2, the control to beat
    --alpha vdw | vaw                fixed weights from the references' margins on held-out pairs: --val-data VAL.jsonl
                                     --val-refs its cache (keep VAL apart from --data and --eval-data)
    --alpha swcw --window W          weights of each step from the references' confidence on the W batches before it
    --loss dpo --alpha tsw           Thompson sampling: each step DPO against one sampled reference, rewarded when the
                                     policy's accuracy on --tsw-subset random pairs of --val-data rises
    --logps mean                     mean per-token log-probs instead of sums (the follow-up study's choice)

SWCW's window and TSW's posteriors and sampler are saved in checkpoints and resume exactly. Under torchrun every rank
holds the same weighting state: SWCW reads the whole batch from the cache, TSW's validation accuracy is summed over
the ranks and its sampler draws alike on every rank.

Under torchrun rank r takes pairs r, r + world, ... of each step's batch and divides its loss by the whole batch; the
LoRA gradients are summed over the ranks once per optimizer step, so the update is a one-process run's (up to float
rounding); rank 0 writes every file. Every rank resumes from the same checkpoint, with rank 0's RNG state: that is
the one-process run's as long as --lora-dropout is 0 (with dropout the ranks draw alike masks for different pairs).

Resume an interrupted run: the same command plus --resume. It continues from the latest checkpoint in --out-dir
(LoRA adapter, optimizer, RNG states, step, data order); on CPU the metrics and the final adapter are identical to
those of a run that was never interrupted.

Outputs in --out-dir: metrics.jsonl (one JSON record per logged step, DPO/TRL metric names; held-out records use
TRL's eval_ prefix), config.json (the resolved configuration), checkpoint-NNNNNN/ (the latest checkpoint, written
atomically), and the final adapter (adapter_config.json, adapter_model.safetensors), which loads with
peft.PeftModel.from_pretrained(base_model, out_dir).

Where this departs from the paper's setup, and why
--------------------------------------------------
- Learning rate: the paper uses 1e-5 (the default here). The CPU demo trains a 135M model for a few minutes on
  300 pairs, so it uses 5e-4: with 1e-5 the LoRA adapters barely move in 60 steps.
- LoRA: the paper fine-tunes with LoRA through its trainer's defaults; here rank, alpha, dropout and target modules
  are flags (defaults r=16, alpha=32, dropout 0, all attention and MLP projections).
- Dropout in the base model is switched off (as in the DPO reference code), so that the log-probs of a pair do not
  depend on the random state and, at step 0, equal the cached reference-1 log-probs exactly.
- Batches are drawn by a seeded random permutation of the pairs each epoch (not grouped by length): simplest to
  reason about; packing the pairs into rows leaves no padding either way.
- The schedule is linear warmup then cosine decay to --min-lr over the whole run (--max-steps, or --epochs); the last
  optimizer step uses --min-lr.
- rewards/accuracies counts a tie (a reward margin under 1e-4 nats) as half a correct pair, not as wrong as TRL does,
  so that the policy at step 0, equal to reference 1 under DPO, scores 0.5; mrpo.reward_accuracy, shared with eval.py.

Shapes: B pairs in a (micro-)batch, K references, T tokens. Log-probs are summed over response tokens, float32.
"""

import argparse
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
from precompute import (CacheMismatchError, DataError, autocast, default_cache_dir, encode_pairs, load_cache,
                        load_model, load_tokenizer, model_identity, read_pairs, resolve_device, row_logps)
from precompute import finish_distributed, gather, init_distributed

# ----------------------------------------------------------------------------------------------------------------
# Config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
group = parser.add_argument_group("Data")
group.add_argument("--data", required=True, help="training pairs, JSONL with prompt/chosen/rejected per line")
group.add_argument("--refs", required=True, help="reference cache of --data written by precompute.py (.safetensors)")
group.add_argument("--eval-data", default=None, help="held-out pairs (JSONL); needed unless --eval-every 0")
group.add_argument("--eval-refs", default=None, help="reference cache of --eval-data written by precompute.py")
group.add_argument("--val-data", default=None,
                   help="validation pairs (JSONL) for --alpha vdw, vaw and tsw; keep them apart from --data and "
                        "--eval-data")
group.add_argument("--val-refs", default=None, help="reference cache of --val-data (for --alpha vdw and vaw)")
group.add_argument("--use-refs", default=None,
                   help="comma-separated 1-based indices of the cache's references that the loss uses, in that order "
                        "(default: all). The policy still starts as reference 1 of the cache: --loss dpo --use-refs 3 "
                        "is DPO against reference 3")
group = parser.add_argument_group("Model")
group.add_argument("--model", default=None,
                   help="policy base model spec (alias, hub id, directory, .gguf); default: reference 1 of --refs. "
                        "Its tokenizer and chat template must be reference 1's")
group.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32",
                   help="weights and autocast dtype of the base model; LoRA weights and log-probs stay float32")
group.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4 bit (bitsandbytes NF4): QLoRA")
group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
group.add_argument("--cache-dir", default=default_cache_dir(), help="where precompute.py caches converted models")
group = parser.add_argument_group("LoRA")
group.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
group.add_argument("--lora-alpha", type=float, default=32, help="LoRA scaling numerator (scale = alpha / r)")
group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
group.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names that get adapters, or 'all-linear'")
group = parser.add_argument_group("Loss")
group.add_argument("--loss", choices=sorted(mrpo.LOSSES), default="mrpo",
                   help="dpo (the first reference of --use-refs only, or the one --alpha tsw picks), mrpo (Eq. 7), "
                        "multi_dpo (Eq. 11), mean_ref (arithmetic mixture)")
group.add_argument("--beta", type=float, default=0.1, help="DPO/MRPO temperature beta")
group.add_argument("--alpha", default="arwc",
                   help="reference weights: arwc (Eq. 10, per example), uniform, K comma-separated numbers, or "
                        "vdw / vaw (fixed from --val-refs), swcw (from the last --window batches), tsw (--loss dpo "
                        "against one reference a Thompson sampler picks each step; needs --val-data)")
group.add_argument("--window", type=int, default=1, help="--alpha swcw: how many past batches set the weights")
group.add_argument("--tsw-prior", default="5,5", help="--alpha tsw: the Beta(a, b) prior of every reference, 'a,b'")
group.add_argument("--tsw-subset", type=int, default=16,
                   help="--alpha tsw: validation pairs drawn each step to judge whether the step helped")
group.add_argument("--logps", choices=["sum", "mean"], default="sum",
                   help="sequence log-probs: summed over response tokens (the paper) or their mean per token; mean "
                        "divides each model's sum by its own token count (the cache stores the references' counts)")
group.add_argument("--eps-max", type=float, default=0.1, help="CTRO bound eps_max of the adaptive eps (Eq. 9)")
group.add_argument("--eps", type=float, default=None, help="a fixed CTRO eps instead of the adaptive one")
group.add_argument("--no-clip", action="store_true", help="turn CTRO clipping (Eq. 8) off")
group = parser.add_argument_group("Optimization")
group.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (paper: 1e-5; the CPU demo uses 5e-4)")
group.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
group.add_argument("--warmup-steps", type=int, default=10, help="optimizer steps of linear warmup")
group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the LoRA weights")
group.add_argument("--batch-size", type=int, default=8,
                   help="pairs per optimizer step, in whole rows of the cache (precompute.py --row-pairs; default 1 "
                        "pair per row): a multiple of the rows' size")
group.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step, each of whole rows (divides the rows of a batch)")
group.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
group.add_argument("--epochs", type=float, default=3, help="passes over the data (ignored with --max-steps)")
group.add_argument("--max-steps", type=int, default=None, help="optimizer steps of the whole run (sets the schedule)")
group.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout")
group = parser.add_argument_group("Run")
group.add_argument("--out-dir", default="runs/train", help="where metrics, checkpoints and the adapter go")
group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
group.add_argument("--eval-every", type=int, default=20, help="evaluate on the held-out set every N steps (0: never)")
group.add_argument("--no-eval-at-start", action="store_true",
                   help="skip the evaluation before step 1 (the policy is reference 1 then: same numbers every run)")
group.add_argument("--log-every", type=int, default=1, help="write a metrics record every N steps")
group.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
group.add_argument("--stop-after", type=int, default=None,
                   help="end the process after this step, as if it were killed, without changing the schedule "
                        "(to split a run in pieces; continue with --resume)")
group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
args = parser.parse_args()


def fail(message):
    """Stop with a message that says what is wrong and what to do."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


rank, world = init_distributed()  # under torchrun: this process's rank of `world`; (0, 1) without it
device = resolve_device(args.device)  # under torchrun on GPUs: cuda:LOCAL_RANK
if args.no_clip and args.eps is not None:
    fail(f"--eps {args.eps} sets the CTRO trust region, which --no-clip turns off; fix: drop one of --eps and "
         f"--no-clip")
if args.eval_every and not (args.eval_data and args.eval_refs):
    fail("no held-out set: pass --eval-data TEST.jsonl and --eval-refs its cache (python precompute.py "
         "--data TEST.jsonl --out CACHE.safetensors), or --eval-every 0 to train without evaluation")
if args.eval_refs and not args.eval_data:
    fail("--eval-refs needs --eval-data (the JSONL file the cache was computed from)")
if not args.eval_refs and args.eval_data:
    fail(f"--eval-data {args.eval_data} needs --eval-refs: its reference cache (python precompute.py --data "
         f"{args.eval_data} --out CACHE.safetensors)")
if args.alpha in ("vdw", "vaw") and not (args.val_data and args.val_refs):
    fail(f"--alpha {args.alpha} fixes the weights from the references' margins on validation pairs: pass --val-data "
         f"VAL.jsonl and --val-refs its cache (python precompute.py --data VAL.jsonl --refs <the same references> "
         f"--out VAL_CACHE.safetensors); keep VAL apart from --data and --eval-data")
if args.alpha == "tsw" and not args.val_data:
    fail("--alpha tsw rewards a reference when the policy's accuracy on validation pairs rises after a step: pass "
         "--val-data VAL.jsonl (held-out pairs, apart from --data and --eval-data)")
if args.alpha == "tsw" and args.loss != "dpo":
    fail(f"--alpha tsw trains DPO against the one reference it samples each step, so it needs --loss dpo "
         f"(got --loss {args.loss})")
if args.loss == "dpo" and args.alpha not in ("arwc", "tsw"):
    fail(f"--loss dpo uses one reference (the first of --use-refs), so --alpha {args.alpha} would weigh nothing; fix: "
         f"--loss mrpo, multi_dpo or mean_ref with --alpha {args.alpha}, or --use-refs K for DPO against reference K")
if args.val_refs and not args.val_data:
    fail("--val-refs needs --val-data (the JSONL file the cache was computed from)")
if args.window < 1 or args.tsw_subset < 1:
    fail(f"--window ({args.window}) and --tsw-subset ({args.tsw_subset}) must be at least 1")
quant = "4bit" if args.load_in_4bit else None
os.makedirs(args.out_dir, exist_ok=True)
torch.manual_seed(args.seed)
random.seed(args.seed)

# ----------------------------------------------------------------------------------------------------------------
# Data: pairs, their cached reference log-probs (K, N), and the policy's encoding of each response

try:
    pairs = read_pairs(args.data)
    cache = load_cache(args.refs, pairs, args.data)
    eval_pairs = read_pairs(args.eval_data) if args.eval_data else []
    eval_cache = load_cache(args.eval_refs, eval_pairs, args.eval_data) if args.eval_data else None
    val_pairs = read_pairs(args.val_data) if args.val_data else []
    val_cache = load_cache(args.val_refs, val_pairs, args.val_data) if args.val_refs else None
except (DataError, CacheMismatchError) as e:
    fail(str(e))
K_cache, N = cache["chosen_logps"].shape
ref1 = cache["refs"][0]
data_rows, row_pairs = cache["rows"], cache["row_pairs"]  # the rows reference 1 was scored in: the unit of a batch
if args.batch_size % row_pairs:
    fail(f"--batch-size {args.batch_size} is not a multiple of the {row_pairs} pairs per row of {args.refs}: a batch "
         f"is whole rows, the rows reference 1 was scored in; fix: --batch-size "
         f"{row_pairs * max(1, args.batch_size // row_pairs)}, or rebuild the cache with a --row-pairs that divides "
         f"{args.batch_size}")
rows_per_step = args.batch_size // row_pairs
if rows_per_step % args.grad_accum:
    fail(f"--grad-accum {args.grad_accum} must divide the {rows_per_step} rows of a batch (--batch-size "
         f"{args.batch_size} in rows of {row_pairs} pairs)")
try:
    use = [int(k) - 1 for k in args.use_refs.split(",")] if args.use_refs else list(range(K_cache))
except ValueError:
    fail(f"--use-refs {args.use_refs!r}: expected comma-separated reference numbers, e.g. --use-refs 1,3")
if not use or len(set(use)) != len(use) or not all(0 <= k < K_cache for k in use):
    fail(f"--use-refs {args.use_refs!r}: give distinct numbers from 1 to {K_cache}, the references in {args.refs} "
         f"({', '.join(r['name'] for r in cache['refs'])})")
K = len(use)
names = [cache["refs"][k]["name"] for k in use]


def same_reference(a, b):
    """Two caches' records of a reference agree on all but what may differ between two data files' caches."""
    per_data = ("batch_size", "truncated_rows", "straddled_rows")
    return {k: v for k, v in a.items() if k not in per_data} == {k: v for k, v in b.items() if k not in per_data}


for path, other in ((args.eval_refs, eval_cache), (args.val_refs, val_cache)):
    # the references the loss uses (and reference 1, the policy's start) must be the same in every cache
    if other is not None and not all(k < len(other["refs"]) and same_reference(cache["refs"][k], other["refs"][k])
                                      for k in sorted({0, *use})):
        fail(f"{path} was computed with other references or settings ({[r['name'] for r in other['refs']]}) than "
             f"{args.refs} ({[r['name'] for r in cache['refs']]}); fix: rerun precompute.py on its data with the "
             f"same --refs, --dtype and lengths")


def ref_logps(c, refs=use):
    """A cache's (chosen, rejected) log-probs of references `refs` (0-based; default --use-refs), (len(refs), N) each,
    per token if --logps mean; (None, None) for no cache."""
    if c is None:
        return None, None
    chosen, rejected = c["chosen_logps"][refs], c["rejected_logps"][refs]
    if args.logps == "mean":
        chosen = chosen / c["chosen_tokens"][refs].clamp(min=1)
        rejected = rejected / c["rejected_tokens"][refs].clamp(min=1)
    return chosen, rejected


ref_chosen_logps, ref_rejected_logps = ref_logps(cache)  # (K, N) each, the loss's references
eval_chosen, eval_rejected = ref_logps(eval_cache)  # (K, M) each
(eval_ref1_chosen,), (eval_ref1_rejected,) = ref_logps(eval_cache, [0]) if eval_cache else ([None], [None])
ref1_chosen_sums, ref1_rejected_sums = cache["chosen_logps"][0], cache["rejected_logps"][0]  # the step-0 check's
weighting = None  # a SlidingWindowWeights or ThompsonSamplingWeights object for --alpha swcw / tsw
if args.alpha in ("vdw", "vaw"):
    val_chosen, val_rejected = ref_logps(val_cache)
    alpha = (mrpo.vdw_weights if args.alpha == "vdw" else mrpo.vaw_weights)(val_chosen, val_rejected)  # (K,)
    alpha_text = ", ".join(f"{n} {a:.3f}" for n, a in zip(names, alpha.tolist()))
    print(f"train.py: --alpha {args.alpha} from {len(val_pairs)} pairs of {args.val_data}: {alpha_text}",
          file=sys.stderr)
elif args.alpha == "swcw":
    alpha, weighting = None, mrpo.SlidingWindowWeights(K, args.window)
elif args.alpha == "tsw":
    try:
        prior = tuple(float(x) for x in args.tsw_prior.split(","))
        alpha, weighting = None, mrpo.ThompsonSamplingWeights(K, prior, seed=args.seed)
    except ValueError as e:
        fail(f"--tsw-prior {args.tsw_prior!r}: expected 'a,b' with a, b > 0 ({e})")
else:
    try:
        alpha = mrpo.parse_alpha(args.alpha, K)  # the same parser as eval.py's
    except ValueError as e:
        fail(f"{e} (K={K}: the references {', '.join(names)} of {args.refs})")
if args.loss != "dpo" and K == 1:
    print(f"train.py: warning: one reference ({names[0]}), so --loss {args.loss} is DPO", file=sys.stderr)

spec = args.model or ref1["name"]
tokenizer = load_tokenizer(spec, args.cache_dir)
identity = model_identity(spec, tokenizer, args.dtype, quant)
for field in ("tokenizer", "chat_template_sha256", "format", "bos_token_id", "eos_token_id"):
    if identity[field] != ref1[field]:
        fail(f"the policy {spec} formats text differently from reference 1 ({ref1['name']}) of {args.refs}: "
             f"{field} {identity[field]!r} vs {ref1[field]!r}. The policy starts as reference 1 and must tokenize "
             f"exactly like it; fix: drop --model, or precompute with --refs {spec} ... first")
max_length, max_prompt_length = ref1["max_length"], ref1["max_prompt_length"]


def encode_all(pairs, path):
    """[(chosen Encoded, rejected Encoded)] in the policy's (= reference 1's) format and truncation."""
    try:
        sequences = encode_pairs(tokenizer, pairs, max_length, max_prompt_length, path)
    except DataError as e:
        fail(str(e))
    return list(zip(sequences[0::2], sequences[1::2]))


encoded, eval_encoded = encode_all(pairs, args.data), encode_all(eval_pairs, args.eval_data)
val_encoded = encode_all(val_pairs, args.val_data)
steps_per_epoch = math.ceil(len(data_rows) / rows_per_step)
total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)


def epoch_order(epoch):
    """The data order of one epoch: a permutation of the row indices, seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    return torch.randperm(len(data_rows), generator=g).tolist()


def batch_rows(step):
    """The rows (lists of pair indices) of optimizer step `step` (0-based); an epoch's last batch may be smaller."""
    epoch, i = divmod(step, steps_per_epoch)
    return [data_rows[j] for j in epoch_order(epoch)[i * rows_per_step:(i + 1) * rows_per_step]]


# ----------------------------------------------------------------------------------------------------------------
# Model: base (optionally 4-bit) + LoRA adapters; the optimizer over the LoRA weights only

from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

model, _ = load_model(spec, dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=str(device),
                      cache_dir=args.cache_dir)
model.config.use_cache = False
for config in (model.config, model.config.get_text_config()):  # deterministic log-probs (see the docstring)
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)  # e.g. attention_dropout, read by the attention in train mode
for module in model.modules():  # LoRA's own dropout is added below, after this
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
    for key, value in list(vars(module).items()):  # modules copy their config's rate at init (attention_dropout)
        if "dropout" in key and isinstance(value, float):
            setattr(module, key, 0.0)
# The base model keeps the dtypes precompute.py scored reference 1 in. peft's prepare_model_for_kbit_training is not
# used: it upcasts every 16-bit weight of a 4-bit model (norms, embeddings, output layer) to float32, which moves the
# policy's log-probs away from the cached reference-1 ones (0.9 nats on 130-token dialogues in bf16 + 4 bit) and adds
# 1 GB for a 7B model. Of the rest it does, get_peft_model freezes the base weights, and non-reentrant checkpointing
# needs no input gradients.
if args.grad_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                         target_modules=targets, task_type="CAUSAL_LM"))
# Under bf16 autocast, peft's cast of each LoRA input to float32 only adds two copies per layer and pass: autocast runs
# the LoRA matmuls in bf16 anyway (the values are the same).
for module in model.modules():
    if hasattr(module, "cast_input_dtype_enabled"):
        module.cast_input_dtype_enabled = args.dtype != "bf16"
params = [p for p in model.parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in params)
if world > 1:  # every rank starts from rank 0's LoRA weights (they are seeded alike anyway; DDP does the same)
    for p in params:
        dist.broadcast(p.data, src=0)
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def get_lr(step):
    """Linear warmup to --lr over --warmup-steps, then cosine decay to --min-lr at the last step (total_steps - 1)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, total_steps - 1 - args.warmup_steps)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (args.lr - args.min_lr)


def policy_logps(encs, rows):
    """Log-probs of the chosen and the rejected responses of the B pairs of `rows` (lists of indices into encs), one
    forward per row, by precompute.row_logps: the code and the rows that scored reference 1 (shared prompts, no
    padding). Returns (chosen (B,), rejected (B,), tokens of the 2B sequences), summed over the response tokens
    (the step-0 check compares these with the cache), or not: see per_token."""
    with autocast(device, args.dtype):
        chosen, rejected = row_logps(model, encs, rows)
    return chosen, rejected, sum(len(encs[i][0].ids) + len(encs[i][1].ids) for row in rows for i in row)


def per_token(chosen, rejected, encs):
    """--logps mean: summed log-probs (B,) of the policy divided by its response token counts; else unchanged."""
    if args.logps == "sum":
        return chosen, rejected
    count = torch.tensor([[len(c.ids) - c.start, len(r.ids) - r.start] for c, r in encs], dtype=torch.float32,
                         device=chosen.device).clamp(min=1)  # (B, 2)
    return chosen / count[:, 0], rejected / count[:, 1]


def loss_terms(rows, encs, ref_chosen, ref_rejected, loss=args.loss, weights=None):
    """Forward the pairs of `rows` and apply the loss against references (K', N) with weights alpha (default: the
    run's): (losses (B,), metric sums dict, tokens, summed policy log-probs (chosen (B,), rejected (B,)))."""
    idx = [i for row in rows for i in row]  # the pairs, in the order row_logps returns them
    sums_c, sums_r, tokens = policy_logps(encs, rows)
    pc, pr = per_token(sums_c, sums_r, [encs[i] for i in idx])
    rc, rr = ref_chosen[:, idx].to(device), ref_rejected[:, idx].to(device)  # (K', B)
    losses, chosen_rewards, rejected_rewards = mrpo.compute_loss(
        loss, pc, pr, rc, rr, args.beta, alpha=alpha if weights is None else weights, eps_max=args.eps_max,
        eps=args.eps, clip=not args.no_clip)
    sums = {"loss": losses.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": mrpo.reward_accuracy(chosen_rewards, rejected_rewards, args.beta).sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum(),
            "policy/accuracies": mrpo.reward_accuracy(pc.detach(), pr.detach()).sum()}  # log pi(y_w) > log pi(y_l)
    return losses, sums, tokens, (sums_c.detach(), sums_r.detach())


def step_weights():
    """(loss, alpha, refs) of the coming step: refs are the reference rows (of ref_chosen_logps) the loss sees.
    TSW samples its reference here (one draw per step); SWCW reads the batches already trained on."""
    if args.alpha == "tsw":
        k, _ = weighting.choose()
        return "dpo", None, [k]
    if args.alpha == "swcw":
        return args.loss, weighting.alpha(), list(range(K))
    return args.loss, alpha, list(range(K))


def eval_weights():
    """(loss, alpha, refs) for evaluation: the run's weights as they stand, without drawing from TSW's sampler
    (it evaluates DPO against the reference with the highest posterior mean)."""
    if args.alpha == "tsw":
        return "dpo", None, [int(weighting.posterior_mean().argmax())]
    return step_weights()


@torch.no_grad()
def val_accuracy(idx):
    """Preference accuracy of the policy's own log-probs (log pi(y_w) > log pi(y_l), ties half) on validation pairs
    idx, in eval mode; under torchrun each rank scores its share and all get the total. TSW's reward signal."""
    model.eval()
    mine = idx[rank::world]
    correct = 0.0
    if mine:  # no exactness needed here (no reference involved): rows of the training cache's size
        pc, pr, _ = policy_logps(val_encoded, [mine[i:i + row_pairs] for i in range(0, len(mine), row_pairs)])
        correct = float(mrpo.reward_accuracy(*per_token(pc, pr, [val_encoded[i] for i in mine])).sum())
    model.train()
    return sum(gather(correct)) / len(idx)


@torch.no_grad()
def evaluate():
    """Mean loss and reward metrics on the held-out set, in eval mode (TRL's eval_ names)."""
    model.eval()
    loss, weights, refs = eval_weights()
    totals = {}
    for row in tqdm(eval_cache["rows"][rank::world], desc="eval", leave=False, dynamic_ncols=True, disable=rank != 0):
        idx = row  # the rows reference 1 was scored in: at step 0 every reward against it is exactly 0
        _, sums, _, (sums_c, sums_r) = loss_terms([row], eval_encoded, eval_chosen[refs], eval_rejected[refs], loss,
                                                  weights)
        # The implicit reward against reference 1 of the cache (the policy's start), whatever the loss's references:
        # one yardstick for every run of a comparison.
        pc, pr = per_token(sums_c, sums_r, [eval_encoded[i] for i in idx])
        r1c, r1r = eval_ref1_chosen[idx].to(pc.device), eval_ref1_rejected[idx].to(pc.device)
        sums["ref1/accuracies"] = mrpo.reward_accuracy(pc - r1c, pr - r1r).sum()
        sums["ref1/margins"] = args.beta * ((pc - r1c) - (pr - r1r)).sum()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    parts = gather(totals)  # under torchrun each rank scored every world-th row; rank 0 always has one
    totals = {k: sum(part.get(k, 0.0) for part in parts) for k in parts[0]}
    model.train()
    return {f"eval_{k}": v / len(eval_pairs) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp directory, then renamed into place; a pointer file names the latest one

config = {**vars(args), "model": spec, "device": str(device), "K": K, "N": N, "refs_identity": cache["refs"],
          "use_refs_names": names, "fixed_alpha": alpha.tolist() if torch.is_tensor(alpha) else alpha,
          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "trainable_params": n_trainable,
          "torch": torch.__version__, "world_size": world}
RUN_FLAGS = {"resume", "stop_after", "eval_every", "log_every", "save_every", "device",
             "no_eval_at_start"}
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")


def write_json(path, obj):
    """Write JSON atomically: a temp file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def save_adapter(directory):
    """The LoRA adapter in peft's format (adapter_config.json + adapter_model.safetensors), atomically per file."""
    tmp = tempfile.mkdtemp(dir=args.out_dir, prefix=".tmp-adapter-")
    model.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    shutil.rmtree(tmp)


def save_checkpoint(step):
    name = f"checkpoint-{step:06d}"
    tmp = tempfile.mkdtemp(dir=args.out_dir, prefix=f".tmp-{name}-")
    model.save_pretrained(tmp)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng,
                "schedule": {"lr": get_lr(step), "warmup_steps": args.warmup_steps, "total_steps": total_steps},
                "data_order": epoch_order(step // steps_per_epoch),
                "weighting": weighting.state_dict() if weighting else None}, os.path.join(tmp, "trainer_state.pt"))
    write_json(os.path.join(tmp, "config.json"), config)
    final = os.path.join(args.out_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd, pointer = tempfile.mkstemp(dir=args.out_dir, prefix=".tmp-latest-")
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    os.replace(pointer, os.path.join(args.out_dir, "latest"))
    for old in os.listdir(args.out_dir):  # keep only the latest checkpoint
        if old.startswith("checkpoint-") and old != name:
            shutil.rmtree(os.path.join(args.out_dir, old), ignore_errors=True)
    return final


step = 0
if args.resume:
    pointer = os.path.join(args.out_dir, "latest")
    if not os.path.isfile(pointer):
        fail(f"--resume: no checkpoint in {args.out_dir} (no 'latest' file); fix: run without --resume")
    ckpt_dir = os.path.join(args.out_dir, open(pointer).read().strip())
    saved = json.load(open(os.path.join(ckpt_dir, "config.json")))
    changed = [k for k in vars(args) if k not in RUN_FLAGS and json.loads(json.dumps(saved.get(k), default=str))
               != json.loads(json.dumps(config[k], default=str))]
    if changed:
        fail(f"--resume: these settings differ from the run in {ckpt_dir}: "
             + ", ".join(f"--{k.replace('_', '-')} {config[k]!r} (was {saved.get(k)!r})" for k in changed)
             + "; fix: resume with the original flags, or start a new --out-dir")
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
    step = state["step"]
    if state["data_order"] != epoch_order(step // steps_per_epoch):
        fail(f"--resume: the data order saved in {ckpt_dir} differs from this run's; was --data or --seed changed?")
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    # Drop records past the checkpoint (the interrupted run may have logged steps it did not save).
    lines = open(metrics_path).read().splitlines(keepends=True) if os.path.exists(metrics_path) else []
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by the kill while it was being written: drop it
                break
            fail(f"--resume: {metrics_path}, line {i + 1} is not JSON ({line[:60]!r}); fix: delete or repair that "
                 f"line, then resume")
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if rank == 0:
        fd, tmp = tempfile.mkstemp(dir=args.out_dir, prefix=".tmp-metrics-")
        with os.fdopen(fd, "w") as f:
            f.writelines(kept)
        os.replace(tmp, metrics_path)
        print(f"resumed from {ckpt_dir} at step {step}", file=sys.stderr)
elif rank == 0:  # a fresh run: remove a previous run's outputs, so none of them is mistaken for this run's
    for old in os.listdir(args.out_dir):
        if old.startswith(("checkpoint-", ".tmp-")) or old in ("latest", "metrics.jsonl", "adapter_config.json",
                                                                "adapter_model.safetensors"):
            path = os.path.join(args.out_dir, old)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
if rank == 0:  # under torchrun rank 0 writes every file (config, metrics, checkpoints, adapter); the others none
    write_json(os.path.join(args.out_dir, "config.json"), config)
    metrics_file = open(metrics_path, "a")
if world > 1:  # every rank has read the checkpoint before rank 0 writes anything new
    dist.barrier()


def log(record):
    if rank == 0:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()


def check_start(scored):
    """At step 0 the policy IS reference 1: its log-probs of the step's pairs, scored [(pair indices, chosen,
    rejected)] per micro-batch of this rank, must equal the cached reference-1 ones bit for bit when the cache was
    made in the same dtype and quantization (the same rows, the same code). Logs the largest |difference| over all
    ranks as check/ref1_max_abs_diff and warns unless it is 0 (or, with other settings, under 0.5 nats)."""
    diff, n = 0.0, 0
    for idx, chosen, rejected in scored:
        diff = max(diff, float((chosen - ref1_chosen_sums[idx]).abs().max()),
                   float((rejected - ref1_rejected_sums[idx]).abs().max()))
        n += 2 * len(idx)
    parts = gather((diff, n))
    diff, n = max(d for d, _ in parts), sum(m for _, m in parts)
    same = (ref1["dtype"], ref1["quantization"]) == (args.dtype, quant or "none")
    tol = 0.0 if same else 0.5
    log({"step": 0, "check/ref1_max_abs_diff": diff, "check/sequences": n})
    message = f"step-0 check: policy vs cached reference-1 log-probs, max |diff| = {diff:.2e} nats over {n} sequences"
    if diff > tol:
        cause = (f" The cache was computed in {ref1['dtype']}/{ref1['quantization']}, the policy runs in "
                 f"{args.dtype}/{quant or 'none'}: precompute with the same --dtype and quantization for an exact "
                 f"start." if not same else " Same rows, dtype and quantization: the kernels are not deterministic "
                 f"on this device.")
        message = (f"\n{'!' * 100}\nWARNING: {message} exceeds {tol}: the policy does not start at reference 1, so "
                   f"the DPO/MRPO rewards are biased from the first step.{cause}\n{'!' * 100}")
    if rank == 0:
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Training loop (counted in optimizer steps)

if rank == 0:
    print(f"train.py: {args.loss} on {N} pairs, K={K} references ({', '.join(names)}), "
          f"policy {spec} + LoRA r={args.lora_r} ({n_trainable / 1e6:.2f}M trainable), {total_steps} steps of "
          f"{args.batch_size} pairs ({rows_per_step} rows of {row_pairs}), {args.dtype}{' 4-bit' if args.load_in_4bit else ''} on {device}"
          + (f", {world} processes" if world > 1 else ""), file=sys.stderr)
model.train()
if step == 0 and args.eval_every and not args.no_eval_at_start:
    log({"step": 0, **evaluate()})
t_start, start_step = time.time(), step
last_saved = None
bar = tqdm(total=total_steps, initial=step, desc=args.loss, unit="step", dynamic_ncols=True, disable=rank != 0)
while step < total_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    batch = batch_rows(step)  # the whole batch of the step, the same on every rank
    idx = [i for row in batch for i in row]  # its pairs
    mine = batch[rank::world]  # this rank's rows (under torchrun rows rank, rank + world, ...; else all of them)
    micro = max(1, math.ceil(len(mine) / args.grad_accum))  # rows per micro-batch (an epoch's last batch is short)
    loss_name, weights, refs = step_weights()  # the same on every rank (TSW's sampler is seeded alike)
    if args.alpha == "tsw":  # a fresh random validation subset per step, seeded by (seed, step): resumes exactly
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)
        subset = torch.randperm(len(val_pairs), generator=g)[:args.tsw_subset].tolist()
        accuracy_before = val_accuracy(subset)
    totals, tokens, scored = {}, 0, []
    for m in range(0, len(mine), micro):
        losses, sums, n_tokens, (pc, pr) = loss_terms(mine[m:m + micro], encoded, ref_chosen_logps[refs],
                                                      ref_rejected_logps[refs], loss_name, weights)
        loss = losses.sum() / len(idx)  # mean over the whole batch, whatever the micro-batch and rank split
        if not torch.isfinite(loss):
            where = f"the latest checkpoint {last_saved}" if last_saved else "no checkpoint was written yet"
            print(f"train.py: error: the loss is {float(loss)} at step {step + 1} (pairs "
                  f"{[i + 1 for row in mine[m:m + micro] for i in row]} of "
                  f"{args.data}); stopping without saving: {where} is intact. Fix: lower --lr, keep "
                  f"--grad-clip on, or check those rows and the cache; resume with --resume", file=sys.stderr)
            sys.exit(1)
        loss.backward()
        if step == 0:
            scored.append(([i for row in mine[m:m + micro] for i in row], pc.float().cpu(), pr.float().cpu()))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        tokens += n_tokens
    if world > 1:
        # The gradient of the step is the SUM over ranks of their gradients (each rank divided by the whole batch,
        # len(idx), above), summed once per optimizer step, after all micro-batches: one all_reduce of the LoRA
        # gradients flattened into one buffer (a few MB to tens of MB), as DistributedDataParallel would do with one
        # bucket. Not DDP itself: its hooks run through its own forward, and pair_logps calls the decoder inside
        # the peft model directly. A rank without pairs in this step (an epoch's short last batch) sends zeros.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    if step == 0:
        check_start(scored)
    parts = gather((totals, tokens))  # metric sums over ranks (rank 0 always has pairs; [(totals, tokens)] alone)
    totals, tokens = {k: sum(t.get(k, 0.0) for t, _ in parts) for k in parts[0][0]}, sum(n for _, n in parts)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        print(f"train.py: error: the gradient norm is {float(grad_norm)} at step {step + 1}; stopping without "
              f"saving ({last_saved or 'no checkpoint yet'} is intact). Fix: lower --lr", file=sys.stderr)
        sys.exit(1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    chosen_weights = {}  # what set this step's reference weights, for the metrics record
    if args.alpha == "swcw":
        weighting.update(ref_chosen_logps[:, idx], ref_rejected_logps[:, idx])  # after the step: never its own batch
        chosen_weights = {"alpha": weights.tolist()}
    elif args.alpha == "tsw":
        accuracy_after = val_accuracy(subset)
        weighting.update(refs[0], accuracy_after > accuracy_before)  # reward: the accuracy strictly rose
        chosen_weights = {"tsw/reference": use[refs[0]] + 1, "tsw/reward": int(accuracy_after > accuracy_before),
                          "tsw/val_accuracy_before": accuracy_before, "tsw/val_accuracy_after": accuracy_after,
                          "tsw/posterior_mean": weighting.posterior_mean().tolist()}
    step += 1
    dt = time.time() - t0
    record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
              **{k: v / len(idx) for k, v in totals.items()}, "lr": lr, "grad_norm": float(grad_norm),
              "tokens": tokens, "tokens/s": tokens / dt, "step_time": dt, **chosen_weights}
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
        bar.close()
        if rank == 0:
            print(f"train.py: stopped after step {step} (--stop-after); continue with the same command and --resume",
                  file=sys.stderr)
        finish_distributed()
        sys.exit(0)
bar.close()
if rank == 0:
    metrics_file.close()
    save_adapter(args.out_dir)

    final = [json.loads(line) for line in open(metrics_path)]
    train_records = [r for r in final if "loss" in r]
    eval_records = [r for r in final if "eval_loss" in r]
    summary = (f"train.py: {args.loss}, steps {start_step + 1}-{step} of {total_steps} in "
               f"{time.time() - t_start:.0f}s")
    if train_records:
        summary += (f" | train loss {train_records[0]['loss']:.4f} -> {train_records[-1]['loss']:.4f}, "
                    f"accuracy {train_records[-1]['rewards/accuracies']:.2f}")
    if eval_records:
        summary += (f" | eval accuracy {eval_records[0]['eval_rewards/accuracies']:.3f} -> "
                    f"{eval_records[-1]['eval_rewards/accuracies']:.3f}, margin "
                    f"{eval_records[-1]['eval_rewards/margins']:.4f}")
    print(summary + f" | adapter in {args.out_dir}")
finish_distributed()
