"""Tests of eval.py as a subprocess: the base model and a LoRA adapter on a few bundled pairs, every number checked
against an independent computation in the test, plus --generate and bad input.

The adapter is made here with peft (random LoRA weights on SmolLM2), not by train.py, so these tests do not depend on
training. The reference cache is made with precompute.py's command line and cached (conftest.py's reference_cache).
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import mrpo
import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "data", "train.jsonl")
BETA = 0.1



def plain_logp(model, encoded):
    """One sequence alone, full logits, summed response log-probs: independent of eval.py's pair_logps."""
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([encoded.ids])).logits[0].float().log_softmax(-1)
    return float(sum(logps[t - 1, encoded.ids[t]] for t in range(encoded.start, len(encoded.ids))))


@pytest.fixture(scope="module")
def setup(smollm2, reference_cache, tmp_path_factory):
    """6 bundled pairs, their cache, and a random LoRA adapter saved in peft's format, with its policy log-probs."""
    from peft import LoraConfig, get_peft_model
    data, cache = reference_cache(precompute.read_pairs(TRAIN)[10:16])
    model, tokenizer = smollm2
    torch.manual_seed(0)
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False, task_type="CAUSAL_LM"))
    policy.eval()
    adapter = str(tmp_path_factory.mktemp("adapter"))
    policy.save_pretrained(adapter)
    pairs = precompute.read_pairs(data)
    logps = {}
    for name, m in (("base", model), ("adapter", policy)):
        out = [plain_logp(m, precompute.encode(tokenizer, p["prompt"], p[f]))
               for p in pairs for f in ("chosen", "rejected")]
        logps[name] = torch.tensor(out[0::2]), torch.tensor(out[1::2])
    return data, cache, adapter, logps


def evaluate(data, cache, out, *extra, check=True):
    result = subprocess.run([sys.executable, "eval.py", "--data", data, "--refs", cache, "--out", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def accuracy(chosen, rejected, beta=1.0):
    """Right = chosen > rejected; a tie within 1e-4 nats of log-prob counts half (eval.py's rule)."""
    def score(c, r):
        d = (c - r) / beta
        return 0.5 if abs(d) < 1e-4 else 1.0 if d > 0 else 0.0
    return sum(score(c, r) for c, r in zip(chosen.tolist(), rejected.tolist())) / len(chosen)


def test_eval_matches_an_independent_computation(setup, tmp_path):
    data, cache, adapter, logps = setup
    out = tmp_path / "eval.json"
    result = evaluate(data, cache, out, "--adapters", "base", adapter, "--beta", str(BETA))
    report = json.load(open(out))
    from safetensors.torch import load_file
    refs = load_file(cache)
    rc, rr = refs["chosen_logps"], refs["rejected_logps"]  # (K, N)

    # References' own accuracy straight from the cache.
    assert [r["name"] for r in report["references"]] == ["smollm2", "gemma3"]
    for k, r in enumerate(report["references"]):
        assert r["accuracy"] == pytest.approx(accuracy(rc[k], rr[k]))

    for name, key in (("base", "base"), (adapter, "adapter")):
        pc, pr = logps[key]
        got = report["policies"][name]
        # against reference 1: beta * (log pi - log pi_ref1)
        want_c, want_r = BETA * (pc - rc[0]), BETA * (pr - rr[0])
        assert got["ref1/margin"] == pytest.approx(float((want_c - want_r).mean()), abs=1e-4)
        assert got["own/accuracy"] == pytest.approx(accuracy(pc, pr))
        assert got["logps/chosen"] == pytest.approx(float(pc.mean()), abs=1e-3)
        # against the virtual reference of MRPO (its defaults: ARWC, eps_max 0.1, CTRO on)
        _, vc, vr = mrpo.mrpo_loss(pc, pr, rc, rr, BETA)
        assert got["virtual/margin"] == pytest.approx(float((vc - vr).mean()), abs=1e-4)
        if key == "adapter":
            assert got["ref1/accuracy"] == pytest.approx(accuracy(want_c, want_r, BETA))
            assert got["virtual/accuracy"] == pytest.approx(accuracy(vc, vr, BETA))

    base = report["policies"]["base"]
    # The base model IS reference 1: rewards against it are 0, every pair a tie (= chance, 0.5), and its own
    # preference is reference 1's.
    assert base["ref1/accuracy"] == 0.5 and abs(base["ref1/margin"]) < 1e-4
    assert base["own/accuracy"] == report["references"][0]["accuracy"]
    assert report["policies"][adapter]["ref1/margin"] != 0
    assert "acc(ref1)" in result.stdout and "eval.py: 2 policies on 6 pairs" in result.stdout


def test_generate_writes_policy_beside_base(setup, tmp_path):
    data, cache, adapter, _ = setup
    out = tmp_path / "eval.json"
    evaluate(data, cache, out, "--adapters", adapter, "--generate", "2", "--max-new-tokens", "4")
    path = json.load(open(out))["generations"]
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 2
    assert all(isinstance(r["base"], str) and isinstance(r[adapter], str) and r["prompt"] for r in rows)


def test_bad_input(setup, tmp_path):
    data, cache, adapter, _ = setup
    out = tmp_path / "eval.json"

    result = evaluate(data, str(tmp_path / "none.safetensors"), out, check=False)
    assert result.returncode == 2 and "no reference cache" in result.stderr and "precompute.py" in result.stderr

    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(data).readlines()[:5]))  # one row fewer than the cache
    result = evaluate(str(other), cache, out, check=False)
    assert result.returncode == 2 and "holds 6 rows" in result.stderr and "precompute.py" in result.stderr

    result = evaluate(data, cache, out, "--alpha", "1,2,3", check=False)
    assert result.returncode == 2 and "K=2" in result.stderr

    result = evaluate(data, cache, out, "--adapters", str(tmp_path / "no-adapter"), check=False)
    assert result.returncode == 2 and "adapter_config.json" in result.stderr
    assert not out.exists()


def test_alpha_is_validated_like_train(tiny_refs, tmp_path):
    """eval.py reads --alpha with train.py's parser (precompute.parse_alpha): negative weights, a zero sum: errors."""
    data, cache, _ = tiny_refs
    for text, message in (("-1,2", "non-negative"), ("0,0", "positive sum")):
        result = evaluate(data, cache, tmp_path / "eval.json", f"--alpha={text}", check=False)
        assert result.returncode == 2 and message in result.stderr and "K=2" in result.stderr


def test_base_model_scores_chance_against_reference_1(tiny_refs, tmp_path):
    """The tiny reference 1 as the policy, scored in the cache's rows: every reward against itself is exactly 0, a
    tie, which counts half (mrpo.reward_accuracy, the metric train.py logs too)."""
    data, cache, _ = tiny_refs
    evaluate(data, cache, tmp_path / "eval.json")
    base = json.load(open(tmp_path / "eval.json"))["policies"]["base"]
    assert base["ref1/accuracy"] == 0.5 and base["ref1/margin"] == 0.0
