"""Sets of N scored completions through the three scripts: reading and refusing sets, scoring every completion with
the prompt once, training with the set losses from an exact start, ranking metrics in eval.py, and pairs as the
sets {chosen: 1, rejected: 0}. Tiny random models (conftest.py's tiny_refs) on the bundled MT-bench sets.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = {"MRPO_SHAPE_PROBE": "0.05", "PYTHONPATH": os.path.join(ROOT, "tests", "shape_probe")}  # test_exact_start.py
SETS = os.path.join(ROOT, "data", "mt-bench-sets", "train.jsonl")
LENGTHS = ["--max-length", "160", "--max-prompt-length", "96"]  # MT-bench answers are long: short rows, fast tests


def run(script, *args, env=None, check=True):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def sets(tiny_refs, tmp_path_factory):
    """6 MT-bench sets (one with four equal grades), a set of 3 among them, their cache of both tiny references, and
    the tiny models; the cache as the shape probe makes it is the fixture probe_cache."""
    root = tmp_path_factory.mktemp("sets")
    rows = [json.loads(line) for line in open(SETS, encoding="utf-8")]
    tie = next(r for r in rows if len(set(r["scores"])) == 1)
    rows = [r for r in rows if len(set(r["scores"])) > 1][:5] + [tie]
    rows[1] = {**rows[1], "completions": rows[1]["completions"][:3], "scores": rows[1]["scores"][:3]}
    data, cache = write(root / "sets.jsonl", rows), str(root / "sets.safetensors")
    run("precompute.py", "--data", data, "--out", cache, "--refs", *tiny_refs[2], *LENGTHS, "--batch-size", "2")
    return data, cache, tiny_refs[2]


@pytest.fixture(scope="module")
def probe_cache(sets, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("probe") / "sets.safetensors")
    run("precompute.py", "--data", sets[0], "--out", cache, "--refs", *sets[2], *LENGTHS, "--batch-size", "2",
        env=PROBE)
    return cache


def test_bad_sets_are_refused_with_file_row_and_field(tmp_path):
    good = json.loads(open(SETS, encoding="utf-8").readline())
    cases = {"one completion": ({**good, "completions": good["completions"][:1], "scores": [1]},
                                "field 'completions' must be a list of at least 2 responses"),
             "lengths differ": ({**good, "scores": good["scores"][:3]}, "field 'scores' must be a list of 4 numbers"),
             "nan score": ({**good, "scores": [1, float("nan"), 2, 3]}, "field 'scores[1]' is nan"),
             "bool score": ({**good, "scores": [True, 1, 2, 3]}, "field 'scores[0]' is True"),
             "empty completion": ({**good, "completions": good["completions"][:3] + [[{"role": "assistant",
                                                                                      "content": " "}]]},
                                  "field 'completions[3]' is an empty response"),
             "a pair among sets": ({"prompt": "Hi", "chosen": "Hello", "rejected": "Go"},
                                   "a row of pairs in a file of sets")}
    for name, (row, message) in cases.items():
        path = write(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(precompute.DataError) as error:
            precompute.read_data(path)
        assert f"{path}:2: " in str(error.value) and message in str(error.value), (name, str(error.value))
    with pytest.raises(precompute.DataError, match="holds sets of scored completions, not pairs"):
        precompute.read_pairs(SETS)


def test_every_completion_is_scored_as_it_would_be_alone(sets):
    """The cache's (K, N, W) log-probs: each completion against a plain forward of that sequence alone (no probe
    here: the plain forward has other shapes), zeros after a set's last completion, scores and mask from the data."""
    data, cache_path, models = sets
    kind, rows = precompute.read_data(data)
    cache = precompute.load_cache(cache_path, rows, data)
    assert kind == cache["kind"] == "sets" and cache["logps"].shape == (2, 6, 4)
    assert cache["mask"][1].tolist() == [True, True, True, False] and cache["logps"][:, 1, 3].eq(0).all()
    assert cache["scores"][0].tolist() == [float(x) for x in rows[0]["scores"]]
    model, tokenizer = precompute.load_model(models[1])
    encoded = precompute.encode_pairs(tokenizer, rows, 160, 96)
    with torch.no_grad():
        for i, group in enumerate(encoded):
            assert len({tuple(e.ids[:precompute.shared_prefix(*group)]) for e in group}) == 1
            for j, e in enumerate(group):
                logits = model(input_ids=torch.tensor([e.ids])).logits[0].float().log_softmax(-1)
                alone = sum(float(logits[t - 1, e.ids[t]]) for t in range(e.start, len(e.ids)))
                assert float(cache["logps"][1, i, j]) == pytest.approx(alone, abs=2e-3), (i, j)
                assert int(cache["tokens"][1, i, j]) == len(e.ids) - e.start


def test_set_training_starts_exactly_and_eval_reads_chance(sets, probe_cache, tmp_path):
    """MRPO on sets under the shape probe: the step-0 check is 0, the held-out ranking metrics against reference 1
    are those of all-zero rewards (pairwise 0.5; tau 0 in eval.py's base row) at step 0; the tie set is counted,
    not a nan."""
    data, cache = sets[0], probe_cache
    out = tmp_path / "run"
    run("train.py", "--loss", "mrpo", "--data", data, "--refs", cache, "--eval-data", data, "--eval-refs", cache,
        "--batch-size", "6", "--max-steps", "2", "--eval-every", "2", "--lr", "1e-3", "--out-dir", out, env=PROBE)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    check = next(r for r in records if "check/ref1_max_abs_diff" in r)
    assert check["check/ref1_max_abs_diff"] == 0.0 and check["check/sequences"] == 6 * 4 - 1  # the set of 3
    start = next(r for r in records if r["step"] == 0 and "eval_loss" in r)
    assert start["eval_ref1/set_accuracies"] == 0.5  # the rewards against reference 1 are all exactly 0
    assert start["eval_sets/with_preference"] == pytest.approx(5 / 6)
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))  # no nan anywhere
    report = tmp_path / "eval.json"
    run("eval.py", "--data", data, "--refs", cache, "--policies", "base", out, "--out", report, env=PROBE)
    policies = json.load(open(report))["policies"]
    assert policies["base"]["ref1/pairwise_accuracy"] == 0.5 and policies["base"]["ref1/kendall_tau_b"] == 0.0
    assert policies[str(out)]["ref1/pairwise_accuracy"] != 0.5  # trained at lr 1e-3: the ranking moved
    references = json.load(open(report))["references"]
    assert policies["base"]["own/pairwise_accuracy"] == references[0]["own/pairwise_accuracy"]


def test_a_pair_is_the_set_chosen_1_rejected_0(tiny_refs, tmp_path):
    """The same 8 pairs as pairs and as sets of 2 with scores (1, 0): the same cache values, and MRPO on the sets
    (mrpo_set_loss) takes the steps MRPO on the pairs (mrpo_loss) takes."""
    data, cache, models = tiny_refs
    as_sets = write(tmp_path / "as_sets.jsonl", precompute.as_sets(precompute.read_pairs(data)))
    set_cache = str(tmp_path / "as_sets.safetensors")
    run("precompute.py", "--data", as_sets, "--out", set_cache, "--refs", *models)
    pair_cache = precompute.load_cache(cache, precompute.read_pairs(data), data)
    set_values = precompute.load_cache(set_cache, precompute.read_data(as_sets)[1], as_sets)["logps"]
    assert torch.equal(set_values[:, :, 0], pair_cache["chosen_logps"])
    assert torch.equal(set_values[:, :, 1], pair_cache["rejected_logps"])
    losses = {}
    for name, (d, c) in {"pairs": (data, cache), "sets": (as_sets, set_cache)}.items():
        run("train.py", "--loss", "mrpo", "--data", d, "--refs", c, "--batch-size", "4", "--max-steps", "3",
            "--eval-every", "0", "--lr", "1e-3", "--warmup-steps", "1", "--out-dir", tmp_path / name)
        losses[name] = [r["loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if "loss" in r]
    assert losses["sets"] == pytest.approx(losses["pairs"], rel=1e-4) and losses["pairs"][0] != losses["pairs"][2]


def test_set_pairs_gives_every_better_worse_pair_or_best_against_worst(sets, tmp_path):
    data, _, models = sets
    rows = precompute.read_data(data)[1]
    expected = {"all": sum(sum(a > b for a in r["scores"] for b in r["scores"]) for r in rows),
                "best_worst": sum(len(set(r["scores"])) > 1 for r in rows)}
    for mode, n in expected.items():
        kind, pairs = precompute.read_data(data, mode)
        assert kind == "pairs" and len(pairs) == n
        cache = tmp_path / f"{mode}.safetensors"
        run("precompute.py", "--data", data, "--set-pairs", mode, "--out", cache, "--refs", models[0], *LENGTHS)
        run("train.py", "--loss", "dpo", "--data", data, "--set-pairs", mode, "--refs", cache, "--batch-size", "2",
            "--max-steps", "1", "--eval-every", "0", "--out-dir", tmp_path / mode)
    first = rows[0]
    best = first["scores"].index(max(first["scores"]))
    assert precompute.read_data(data, "best_worst")[1][0]["chosen"] == first["completions"][best]
    refused = run("train.py", "--loss", "dpo", "--data", data, "--refs", tmp_path / "all.safetensors",
                  "--eval-every", "0", "--out-dir", tmp_path / "x", check=False)
    assert refused.returncode == 2 and "--set-pairs all|best_worst" in refused.stderr
