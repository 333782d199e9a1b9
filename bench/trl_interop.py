"""MRPO inside TRL: TRL's DPOTrainer trained on `precompute.py --export-trl` rows, checked against mrpo.py.

TRL is a benchmark-only dependency: run this in the virtualenv that bench/bench_trl.py's docstring sets up
(trl==1.16.0, datasets==5.2.0, seeing the project's packages):

    venv-trl/bin/python bench/trl_interop.py                  # 16 hh-rlhf pairs, references smollm2 + gemma3
    venv-trl/bin/python bench/trl_interop.py --pairs 32

1. precompute.py scores the first PAIRS pairs of --data with SmolLM2-135M-Instruct and Gemma 3 270M and exports
   the virtual reference (ARWC, CTRO with eps_max 0.1, Prop. 1) as ref_chosen_logps / ref_rejected_logps columns
   (all under --work, default runs/trl_interop/; a rerun scores nothing).
2. TRL's own reference 1: a DPOTrainer with precompute_ref_log_probs=True on the same rows, without our columns,
   scores SmolLM2 itself; per response its log-prob against the cache's, its tokens against precompute.encode's,
   and one unpadded forward of its tokens to tell a difference of tokens from one of arithmetic.
3. MRPO in TRL: a DPOTrainer (policy SmolLM2 = reference 1 + LoRA r=16, beta 0.1, sigmoid, fp32) on the exported
   rows, one optimizer step over all of them, whose logged metrics are those of step 0 (the policy is still
   reference 1 when the pairs are scored), printed beside mrpo.mrpo_loss on the cache.

How TRL 1.16.0 is made to use our columns: it has no switch for rows that already hold them. With
precompute_ref_log_probs=True its __init__ scores its own reference; with False every step runs the reference. So
the trainer is built with False (and a peft_config, so that no reference copy is loaded), then told through the
attribute its loss reads that the batch carries them: trainer.precompute_ref_logps = True. Its collator passes
ref_chosen_logps / ref_rejected_logps through. fp32 also needs bf16=False: DPOConfig defaults to bf16 autocast, on
CPU too.
"""

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mrpo  # noqa: E402
import precompute  # noqa: E402

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")


def trainer(rows, tokenizer, args, precompute_ref, out):
    """A DPOTrainer on `rows` (dicts), a fresh SmolLM2 + LoRA policy, one optimizer step over all of them."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    model, _ = precompute.load_model(args.model, dtype="fp32")
    config = DPOConfig(output_dir=out, per_device_train_batch_size=args.micro_batch, max_steps=1,
                       gradient_accumulation_steps=len(rows) // args.micro_batch, learning_rate=5e-4, beta=args.beta,
                       loss_type=["sigmoid"], precompute_ref_log_probs=precompute_ref, max_length=None,
                       bf16=False, use_cpu=True, logging_steps=1, report_to=[], save_strategy="no",
                       dataloader_num_workers=0, seed=0)
    return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


@torch.no_grad()
def tail_logps(model, ids, n):
    """Log-probs (n,) of the last n tokens of `ids` under `model`: one forward of the sequence alone, no padding."""
    x = torch.tensor([ids])
    logps = torch.log_softmax(model(input_ids=x).logits[0, -n - 1:-1].float(), dim=-1)
    return logps.gather(-1, x[0, -n:, None])[:, 0].double()


def compare_tokenization(pairs, trl_dataset, cache, tokenizer, model):
    """Per response, TRL's prompt and completion tokens against precompute.encode's. Returns (counts by kind, the
    extra tokens TRL scores, and per response (R,): TRL - cache, TRL - one unpadded forward of TRL's own tokens, and
    that forward minus its extra tokens - cache)."""
    kinds, extras, diffs = {}, set(), []
    for i, pair in enumerate(pairs):
        row = trl_dataset[i]
        for side in ("chosen", "rejected"):
            ours = precompute.encode(tokenizer, pair["prompt"], pair[side])
            prompt, completion, theirs = ours.ids[:ours.start], ours.ids[ours.start:], row[f"{side}_ids"]
            if row["prompt_ids"] != prompt or theirs[:len(completion)] != completion:
                kind = "prompt or completion differs"
            else:
                kind = "same tokens" if theirs == completion else "TRL scores extra tokens after ours"
                extras.add(tokenizer.decode(theirs[len(completion):]))
            kinds[kind] = kinds.get(kind, 0) + 1
            alone = tail_logps(model, row["prompt_ids"] + theirs, len(theirs))  # (len(theirs),)
            trl, cached = row[f"ref_{side}_logps"], float(cache[f"{side}_logps"][0, i])
            diffs.append((trl - cached, trl - alone.sum(), alone[:len(completion)].sum() - cached))
    return kinds, extras, torch.tensor(diffs, dtype=torch.float64).T


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", default=os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"),
                       help="JSONL preference pairs (default: the bundled multi-turn hh-rlhf pairs)")
    group.add_argument("--pairs", type=int, default=16, help="the first PAIRS pairs of --data")
    group.add_argument("--work", default=os.path.join(ROOT, "runs", "trl_interop"),
                       help="where the pairs, the cache, the exported rows and TRL's output go")
    group = parser.add_argument_group("Model and loss")
    group.add_argument("--model", default="smollm2", help="the policy, reference 1")
    group.add_argument("--refs", nargs="+", default=["smollm2", "gemma3"], help="the references, --model first")
    group.add_argument("--beta", type=float, default=0.1, help="DPO's beta, both sides")
    group.add_argument("--micro-batch", type=int, default=8, help="pairs per forward in TRL (divides --pairs)")
    group.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.pairs % args.micro_batch or args.refs[0] != args.model:
        parser.error("--micro-batch must divide --pairs, and --refs must start with --model (the policy)")
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")
    print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}\nCPU: {cpu}, {args.threads} "
          f"threads", flush=True)

    # 1. Reference log-probs of both references, and the exported virtual reference
    os.makedirs(args.work, exist_ok=True)
    data, refs, rows_path = (os.path.join(args.work, n) for n in ("pairs.jsonl", "refs.safetensors", "trl.jsonl"))
    pairs = precompute.read_pairs(args.data)[:args.pairs]
    with precompute.atomic_write(data, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", refs, "--refs", *args.refs,
                    "--export-trl", rows_path, "--alpha", "arwc", "--eps-max", "0.1"], cwd=ROOT, check=True)
    cache = precompute.load_cache(refs, pairs, data)
    rows = [json.loads(line) for line in open(rows_path)]
    tokenizer = precompute.load_tokenizer(args.model)

    # 2. TRL's own reference 1 on the same rows, against the cache's
    theirs = trainer(pairs, tokenizer, args, True, os.path.join(args.work, "trl-ref"))
    trl_ref = theirs.train_dataset
    kinds, extras, (diffs, batched, same_tokens) = compare_tokenization(pairs, trl_ref, cache, tokenizer, theirs.model)
    print(f"\nreference 1 ({args.model}), TRL's own log-probs against the cache, {len(diffs)} responses of "
          f"{len(pairs)} pairs: max |diff| {diffs.abs().max():.4f} nats, mean {diffs.abs().mean():.4f}, "
          f"{int((diffs.abs() > 1e-3).sum())} differ by > 1e-3")
    print(f"  tokens: {kinds}; what TRL scores beyond ours: {sorted(extras)}")
    print(f"  one unpadded forward of TRL's tokens without those, against the cache: max |diff| "
          f"{same_tokens.abs().max():.1e} nats; TRL's padded batches of {args.micro_batch} pairs against that "
          f"forward: max |diff| {batched.abs().max():.1e}")
    trl_chosen = torch.tensor(trl_ref["ref_chosen_logps"])  # TRL's policy log-probs at step 0 (policy = reference 1)
    trl_rejected = torch.tensor(trl_ref["ref_rejected_logps"])
    del theirs

    # 3. MRPO in TRL: our virtual reference as its reference, TRL's step 0 against mrpo.mrpo_loss
    ours = trainer(rows, tokenizer, args, False, os.path.join(args.work, "trl-mrpo"))
    ours.precompute_ref_logps = True  # read ref_chosen_logps / ref_rejected_logps from the batch, never run a reference
    ours.train()
    logged = next(entry for entry in ours.state.log_history if "rewards/margins" in entry)
    rc, rr = cache["chosen_logps"], cache["rejected_logps"]
    print(f"\nMRPO (ARWC, eps_max 0.1, beta {args.beta}, sigmoid), step 0, mean over the {len(rows)} pairs:")
    print(f"  {'':44s}" + "".join(f"{m:>18s}" for m in METRICS))
    for name, (pc, pr) in (("mrpo.mrpo_loss, policy = cache's reference 1", (rc[0], rr[0])),
                           ("mrpo.mrpo_loss, policy = TRL's reference 1", (trl_chosen, trl_rejected))):
        losses, chosen, rejected = mrpo.mrpo_loss(pc, pr, rc, rr, args.beta, alpha="arwc", eps_max=0.1)
        values = [losses.mean(), chosen.mean(), rejected.mean(), (chosen - rejected).mean()]
        print(f"  {name:44s}" + "".join(f"{float(v):18.6f}" for v in values))
    print(f"  {'TRL DPOTrainer on the exported rows':44s}" + "".join(f"{logged[m]:18.6f}" for m in METRICS))


if __name__ == "__main__":
    main()
