"""train.py's reference weightings beyond ARWC (--alpha vdw | vaw | swcw | tsw), the single-reference controls
(--use-refs), mean per-token log-probs (--logps mean), and precompute.py --append, on conftest.py's two tiny random
Llamas (8 pairs, batch 4: 2 steps per epoch). Expected values are computed here from the cache file with plain Python
or mrpo's loss functions, independently of train.py's code path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mrpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens/s", "step_time")


def train(tiny_refs, out_dir, *extra, check=True):
    data, cache, _ = tiny_refs
    cmd = [sys.executable, "train.py", "--data", data, "--refs", cache, "--out-dir", str(out_dir), "--batch-size", "4",
           "--warmup-steps", "1", "--lr", "1e-3", "--eval-every", "0", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def steps(out_dir):
    """The training records of metrics.jsonl, in order, without their timing fields."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if "loss" in r]


def margins(cache):
    """Plain-Python margins m_k(i) = chosen - rejected of every reference k and pair i, from the cache file."""
    tensors = load_file(cache)
    return [[c - r for c, r in zip(cs, rs)] for cs, rs in zip(tensors["chosen_logps"].tolist(),
                                                              tensors["rejected_logps"].tolist())]


def normalised(scores):
    return [s / sum(scores) for s in scores]


def first_batches(cache, seed=0, batch=4):
    """The pair indices of epoch 0's batches: train.py's documented order, the cache's rows (of 1 pair here) in a
    permutation seeded by seed * 100003."""
    rows = load_file(cache)["rows"].tolist()  # rows of one pair: the pairs in the cache's row order
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003)).tolist()
    return [[rows[j] for j in order[i:i + batch]] for i in range(0, len(rows), batch)]


def test_swcw_weights_each_step_from_the_batches_before_it(tiny_refs, tmp_path):
    train(tiny_refs, tmp_path, "--loss", "mrpo", "--alpha", "swcw", "--window", "2", "--max-steps", "3")
    rows, m = steps(tmp_path), margins(tiny_refs[1])
    first, second = first_batches(tiny_refs[1])
    assert rows[0]["alpha"] == [0.5, 0.5]  # step 1: no batch trained on yet, not its own batch
    want = normalised([sum(abs(mk[i]) for i in first) for mk in m])  # step 2: batch 1 only
    assert rows[1]["alpha"] == pytest.approx(want, rel=1e-5)
    want = normalised([sum(abs(mk[i]) for i in first + second) for mk in m])  # step 3: the window holds batches 1, 2
    assert rows[2]["alpha"] == pytest.approx(want, rel=1e-5)
    assert rows[1]["alpha"] != pytest.approx(rows[2]["alpha"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["vdw", "vaw"])
def test_vdw_and_vaw_fix_the_weights_from_the_validation_cache(tiny_refs, tmp_path, strategy):
    data, cache, _ = tiny_refs
    train(tiny_refs, tmp_path, "--loss", "mrpo", "--alpha", strategy, "--val-data", data, "--val-refs", cache,
          "--batch-size", "8", "--max-steps", "1")
    m = margins(cache)
    scores = [sum(abs(x) for x in mk) for mk in m] if strategy == "vdw" else [sum(x > 0 for x in mk) for mk in m]
    want = normalised(scores)
    config = json.load(open(tmp_path / "config.json"))
    assert config["fixed_alpha"] == pytest.approx(want, rel=1e-5)
    # ... and they reach the loss: at step 1 the policy is reference 1, so the loss is the cache's against itself
    refs = load_file(cache)
    rc, rr = refs["chosen_logps"], refs["rejected_logps"]
    loss = float(mrpo.mrpo_loss(rc[0], rr[0], rc, rr, 0.1, alpha=torch.tensor(want))[0].mean())
    assert steps(tmp_path)[0]["loss"] == pytest.approx(loss, abs=1e-5)
    assert abs(loss - float(mrpo.mrpo_loss(rc[0], rr[0], rc, rr, 0.1)[0].mean())) > 1e-4  # not ARWC's


def test_tsw_rewards_posteriors_and_exact_resume(tiny_refs, tmp_path):
    data = tiny_refs[0]
    flags = ["--loss", "dpo", "--alpha", "tsw", "--val-data", data, "--tsw-subset", "4", "--tsw-prior", "2,3",
             "--max-steps", "4"]
    train(tiny_refs, tmp_path / "whole", *flags)
    rows = steps(tmp_path / "whole")
    a, b = [2.0, 2.0], [3.0, 3.0]
    for r in rows:  # the posterior after each step, rebuilt from the logged choices and rewards
        k = r["tsw/reference"] - 1
        assert r["tsw/reward"] == int(r["tsw/val_accuracy_after"] > r["tsw/val_accuracy_before"])
        a[k], b[k] = a[k] + r["tsw/reward"], b[k] + 1 - r["tsw/reward"]
        assert r["tsw/posterior_mean"] == pytest.approx([x / (x + y) for x, y in zip(a, b)])
    train(tiny_refs, tmp_path / "split", *flags, "--stop-after", "2")
    train(tiny_refs, tmp_path / "split", *flags, "--resume")
    assert steps(tmp_path / "split") == rows
    x, y = load_file(tmp_path / "split" / "adapter_model.safetensors"), \
        load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_dpo_against_reference_2_is_mrpo_with_all_weight_on_it(tiny_refs, tmp_path):
    cache = tiny_refs[1]
    refs = load_file(cache)
    rc, rr = refs["chosen_logps"], refs["rejected_logps"]
    want = float(mrpo.dpo_loss(rc[0], rr[0], rc[1], rr[1], 0.1)[0].mean())  # policy = reference 1, vs reference 2
    assert abs(want - float(mrpo.dpo_loss(rc[0], rr[0], rc[0], rr[0], 0.1)[0].mean())) > 1e-3
    for name, flags in (("dpo2", ["--loss", "dpo", "--use-refs", "2"]),
                        ("onehot", ["--loss", "mrpo", "--alpha", "0,1", "--no-clip"])):
        train(tiny_refs, tmp_path / name, *flags, "--batch-size", "8", "--max-steps", "1")
        step1 = steps(tmp_path / name)[0]
        assert step1["loss"] == pytest.approx(want, abs=1e-5), name
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        check = next(r for r in rows if "check/ref1_max_abs_diff" in r)
        assert check["check/ref1_max_abs_diff"] < 1e-3  # the policy still starts at reference 1


def test_logps_mean_divides_each_model_by_its_own_token_count(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    train(tiny_refs, tmp_path, "--loss", "mrpo", "--logps", "mean", "--batch-size", "8", "--max-steps", "1",
          "--eval-data", data, "--eval-refs", cache, "--eval-every", "1")
    refs = load_file(cache)
    rc, rr = refs["chosen_logps"] / refs["chosen_tokens"], refs["rejected_logps"] / refs["rejected_tokens"]
    assert (refs["chosen_tokens"] > 1).all() and not torch.equal(refs["chosen_tokens"], refs["rejected_tokens"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    start = next(r for r in rows if "eval_loss" in r)  # step 0: the policy is reference 1
    assert start["eval_logps/chosen"] == pytest.approx(float(rc[0].mean()), abs=1e-5)
    assert start["eval_ref1/accuracies"] == 0.5  # its rewards against reference 1 are all ties
    own = [1.0 if c > r else 0.0 if c < r else 0.5 for c, r in zip(rc[0].tolist(), rr[0].tolist())]
    assert start["eval_policy/accuracies"] == pytest.approx(sum(own) / len(own))
    step1 = steps(tmp_path)[0]
    assert step1["loss"] == pytest.approx(float(mrpo.mrpo_loss(rc[0], rr[0], rc, rr, 0.1)[0].mean()), abs=1e-5)


@pytest.mark.parametrize("flags,words", [
    (["--alpha", "vdw"], ["--val-data", "--val-refs"]),
    (["--alpha", "tsw", "--loss", "dpo"], ["--val-data"]),
    (["--alpha", "tsw", "--val-data", "DATA"], ["--loss dpo"]),
    (["--loss", "dpo", "--alpha", "uniform"], ["--use-refs"]),
    (["--use-refs", "1,3"], ["--use-refs", "from 1 to 2"]),
    (["--use-refs", "2,2"], ["distinct"]),
    (["--window", "0", "--alpha", "swcw"], ["--window"]),
])
def test_bad_weighting_flags_are_clear_errors(tiny_refs, tmp_path, flags, words):
    flags = [tiny_refs[0] if f == "DATA" else f for f in flags]
    result = train(tiny_refs, tmp_path, *flags, "--max-steps", "1", check=False)
    assert result.returncode == 2 and all(w in result.stderr for w in words), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_precompute_append_grows_a_cache_without_rescoring(tiny_refs, tmp_path):
    data, cache, models = tiny_refs
    out = str(tmp_path / "refs.safetensors")
    run = lambda *flags: subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", out, *flags],  # noqa
                                        cwd=ROOT, capture_output=True, text=True)
    assert run("--refs", models[0]).returncode == 0
    # Reference 1's row must be copied, not re-scored: mark it, then append reference 2.
    from precompute import _read_safetensors, _write_safetensors
    tensors, meta = _read_safetensors(out)
    tensors["chosen_logps"][0, 0] = -123.0  # a log-prob no model gave it
    _write_safetensors(out, tensors, meta)
    result = run("--refs", models[1], "--append")
    assert result.returncode == 0, result.stderr[-2000:]
    grown, whole = load_file(out), load_file(cache)
    assert float(grown["chosen_logps"][0, 0]) == -123.0
    grown["chosen_logps"][0, 0] = whole["chosen_logps"][0, 0]
    assert grown.keys() == whole.keys() and all(torch.equal(grown[k], whole[k]) for k in whole)
    again = run("--refs", models[1], "--append")
    assert again.returncode != 0 and "already holds" in again.stderr
    assert torch.equal(load_file(out)["rejected_logps"], grown["rejected_logps"])  # untouched
    other = run("--refs", models[1], "--append", "--data", os.path.join(ROOT, "data", "test.jsonl"))
    assert other.returncode != 0 and "row 1" in other.stderr
