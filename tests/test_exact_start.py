"""The policy starts exactly at reference 1, by construction: the same rows, the same code, the same bits.

precompute.py scores reference 1 one row of the cache per forward; train.py batches whole rows and eval.py scores
the same rows, so the policy's first forward multiplies exactly the matrices reference 1's did. To make any other
layout visible on every machine (not only where the kernels happen to round rows differently), every run here loads
its models with the shape probe of tests/shape_probe/sitecustomize.py: each linear layer adds an offset that depends
on how many rows it multiplies at once and on each row's place among them. Under the probe, scoring the same pairs
in other rows moves their log-probs by about a nat (checked below, as the test's own control); the design must still
give a step-0 difference of exactly 0 in fp32, bf16 and bf16 + 4 bit, for batches of 8 and 4 pairs, --grad-accum 2,
two processes under torchrun, and rows of 1 pair with a batch of 5; eval.py's base row must read margin 0 and
accuracy 0.5 exactly. A last test runs a real-width model (SmolLM2, hidden size 576) the same way.
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = {"MRPO_SHAPE_PROBE": "0.05", "PYTHONPATH": os.path.join(ROOT, "tests", "shape_probe"), "OMP_NUM_THREADS": "1"}
CONFIGS = {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"], "bf16-4bit": ["--dtype", "bf16", "--load-in-4bit"]}


def run(script, *args, procs=1):
    """`python SCRIPT ARGS` under the shape probe, or under torchrun with `procs` processes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    env = {k: v for k, v in os.environ.items() if k != "RANK"} | PROBE
    result = subprocess.run([sys.executable, *launcher, script, *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def start_check(out_dir):
    """(check/ref1_max_abs_diff, check/sequences, the step-0 eval record) of a train.py run."""
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    check = next(r for r in records if "check/ref1_max_abs_diff" in r)
    evals = [r for r in records if r["step"] == 0 and "eval_loss" in r]
    return check["check/ref1_max_abs_diff"], check["check/sequences"], evals[0] if evals else None


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory):
    """16 real multi-turn dialogue pairs (hh-rlhf-harmless) and a small random Llama (hidden size 64, so that 4-bit
    quantization applies) saved with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("dialogues")
    tokenizer = precompute.load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model_dir = str(root / "model")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = str(root / "pairs.jsonl")
    rows = precompute.read_pairs(os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"))[:16]
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return data, model_dir


def precompute_refs(dialogues, out, row_pairs, flags):
    data, model_dir = dialogues
    run("precompute.py", "--data", data, "--out", out, "--refs", model_dir, "--row-pairs", row_pairs, *flags)
    return out


def test_the_probe_shows_other_rows(dialogues, tmp_path):
    """The control: the same pairs scored in rows of 2 and in rows of 4 get other reference-1 log-probs under the
    probe (by far more than float rounding), so an exact start below is not the probe being inactive."""
    four = load_file(precompute_refs(dialogues, tmp_path / "four.safetensors", 4, CONFIGS["fp32"]))
    two = load_file(precompute_refs(dialogues, tmp_path / "two.safetensors", 2, CONFIGS["fp32"]))
    assert float((four["chosen_logps"] - two["chosen_logps"]).abs().max()) > 0.1


@pytest.mark.parametrize("config", CONFIGS)
def test_start_is_exact_for_any_batch_accumulation_and_processes(dialogues, tmp_path, config):
    """Rows of 4 pairs: a batch of 16 (4 rows) with --grad-accum 2 (2 rows per micro-batch), the same batch over 2
    processes (2 rows each), and batches of 8 and 4 all start at reference 1 exactly; so does the held-out evaluation
    at step 0 (rewards against reference 1 all 0)."""
    flags = CONFIGS[config]
    data, _ = dialogues
    cache = precompute_refs(dialogues, tmp_path / "refs.safetensors", 4, flags)
    common = ["--data", data, "--refs", cache, "--max-steps", "1", *flags]
    result = run("train.py", *common, "--batch-size", 16, "--grad-accum", 2, "--eval-data", data, "--eval-refs",
                 cache, "--out-dir", tmp_path / "accum")
    diff, sequences, evaluation = start_check(tmp_path / "accum")
    assert (diff, sequences) == (0.0, 32) and "WARNING" not in result.stderr  # same dtype and quantization: no warning
    assert evaluation["eval_ref1/margins"] == 0.0 and evaluation["eval_ref1/accuracies"] == 0.5
    run("train.py", *common, "--batch-size", 16, "--eval-every", 0, "--out-dir", tmp_path / "two", procs=2)
    assert start_check(tmp_path / "two")[:2] == (0.0, 32)  # both ranks' shares
    if config == "fp32":
        for batch in (8, 4):
            run("train.py", *common, "--batch-size", batch, "--eval-every", 0, "--out-dir", tmp_path / f"b{batch}")
            assert start_check(tmp_path / f"b{batch}")[:2] == (0.0, 2 * batch)


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_base_row_is_exact(dialogues, tmp_path, config):
    """eval.py's base model against reference 1: every reward exactly 0, so margin 0.0 and accuracy 0.5."""
    flags = CONFIGS[config]
    data, _ = dialogues
    cache = precompute_refs(dialogues, tmp_path / "refs.safetensors", 4, flags)
    run("eval.py", "--data", data, "--refs", cache, "--adapters", "base", "--out", tmp_path / "eval.json", *flags)
    base = json.load(open(tmp_path / "eval.json"))["policies"]["base"]
    assert base["ref1/margin"] == 0.0 and base["ref1/accuracy"] == 0.5


def test_rows_of_one_pair_take_any_batch_size(dialogues, tmp_path):
    """Rows of 1 pair (precompute.py's default): a batch of 5 starts exactly too."""
    data, _ = dialogues
    cache = precompute_refs(dialogues, tmp_path / "refs.safetensors", 1, CONFIGS["bf16"])
    run("train.py", "--data", data, "--refs", cache, "--max-steps", "1", "--batch-size", 5, "--eval-every", 0,
        "--out-dir", tmp_path / "five", *CONFIGS["bf16"])
    assert start_check(tmp_path / "five")[:2] == (0.0, 10)


def test_start_is_exact_with_smollm2(tmp_path):
    """A real-width model: SmolLM2-135M-Instruct in bf16 on 8 dialogue pairs, rows of 4, a batch of 8, probe on."""
    data = tmp_path / "pairs.jsonl"
    rows = precompute.read_pairs(os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"))[:8]
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    cache = tmp_path / "refs.safetensors"
    run("precompute.py", "--data", data, "--out", cache, "--refs", "smollm2", "--row-pairs", 4, "--dtype", "bf16")
    run("train.py", "--data", data, "--refs", cache, "--max-steps", 1, "--batch-size", 8, "--eval-every", 0,
        "--dtype", "bf16", "--out-dir", tmp_path / "run")
    assert start_check(tmp_path / "run")[:2] == (0.0, 16)


def test_compiled_scripts_start_exactly(dialogues, tmp_path):
    """--compile in all three scripts (bf16, rows of 4, a batch of 8): each layer's compiled training graph gives the
    bits of the compiled no-grad graph that scored reference 1, so the step-0 check reads 0 and the held-out rewards
    and eval.py's base row are exactly 0. Control: under the probe a compiled layer adds its own offset, so the same
    pairs scored eager get other log-probs, and an exact start here means both sides ran compiled."""
    data, _ = dialogues
    flags = [*CONFIGS["bf16"], "--compile"]
    cache = precompute_refs(dialogues, tmp_path / "compiled.safetensors", 4, flags)
    eager = load_file(precompute_refs(dialogues, tmp_path / "eager.safetensors", 4, CONFIGS["bf16"]))
    assert float((load_file(cache)["chosen_logps"] - eager["chosen_logps"]).abs().max()) > 0.1
    run("train.py", "--data", data, "--refs", cache, "--max-steps", 1, "--batch-size", 8, "--eval-data", data,
        "--eval-refs", cache, "--out-dir", tmp_path / "run", *flags)
    diff, sequences, evaluation = start_check(tmp_path / "run")
    assert (diff, sequences) == (0.0, 16)
    assert evaluation["eval_ref1/margins"] == 0.0 and evaluation["eval_ref1/accuracies"] == 0.5
    run("eval.py", "--data", data, "--refs", cache, "--adapters", "base", "--out", tmp_path / "eval.json", *flags)
    base = json.load(open(tmp_path / "eval.json"))["policies"]["base"]
    assert base["ref1/margin"] == 0.0 and base["ref1/accuracy"] == 0.5
