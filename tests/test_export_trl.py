"""Tests of `precompute.py --export-trl`: MRPO as DPO against a precomputed virtual reference, the form in which
TRL's DPOTrainer (or any DPO trainer that reads ref_chosen_logps / ref_rejected_logps) can train it.

No TRL here: the claim is about the numbers. The exported columns are mrpo.virtual_reference_pair of the cache's
tensors, bit for bit; DPO against them is MRPO on the cache, values and gradients, for every loss type; an OUT that
is already scored is exported without scoring; the weightings that cannot be exported are refused before any work,
naming the flag; a failed export leaves no half-written file. The references are the two tiny random Llamas of
conftest.tiny_refs (reference 2 far from reference 1, so CTRO clips).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mrpo
import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["precompute.py"] + argv)
    precompute.main()


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def scored(tmp_path, tiny_refs):
    """(data, a copy of tiny_refs' cache, its models, flags that name them): exports may write beside the copy."""
    data, cache, models = tiny_refs
    out = str(tmp_path / "refs.safetensors")
    shutil.copy(cache, out)
    return data, out, models, ["--data", data, "--out", out, "--refs", *models]


def test_score_then_export_in_one_run_and_export_alone_scores_nothing(tmp_path, monkeypatch, capsys, tiny_refs):
    data, _, models = tiny_refs
    out, first, second = (str(tmp_path / n) for n in ("refs.safetensors", "a.jsonl", "b.jsonl"))
    common = ["--data", data, "--out", out, "--refs", *models]
    result = subprocess.run([sys.executable, "precompute.py", *common, "--export-trl", first], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 8 pairs x 2 refs" in result.stdout and f"wrote {first}: 8 pairs" in result.stdout
    stamp = os.stat(out).st_mtime_ns
    run_main(monkeypatch, common + ["--export-trl", second])  # OUT is this command's cache: no model is loaded
    printed = capsys.readouterr().out
    assert f"wrote {out}" not in printed and f"wrote {second}: 8 pairs" in printed
    assert os.stat(out).st_mtime_ns == stamp and open(first).read() == open(second).read()


EXPORTS = {  # flags of precompute.py -> the keyword arguments of mrpo.virtual_reference_pair they mean
    "arwc": ([], {}),
    "uniform_fixed_eps": (["--alpha", "uniform", "--eps", "0.05"], {"alpha": "uniform", "eps": 0.05}),
    "weights_no_clip": (["--alpha", "0.3,0.7", "--no-clip"], {"alpha": [0.3, 0.7], "clip": False}),
    "vdw": (["--alpha", "vdw", "--eps-max", "0.3"], {"alpha": "vdw", "eps_max": 0.3}),
    "vaw": (["--alpha", "vaw"], {"alpha": "vaw"}),
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_exported_columns_are_the_virtual_reference_and_dpo_on_them_is_mrpo(tmp_path, monkeypatch, scored,
                                                                             tiny_refs, case):
    data, out, _, common = scored
    flags, kw = EXPORTS[case]
    if kw.get("alpha") in ("vdw", "vaw"):  # validation pairs: the fixture's own (a test; keep them apart in real use)
        flags = flags + ["--val-data", data, "--val-refs", tiny_refs[1]]
    path = str(tmp_path / "trl.jsonl")
    run_main(monkeypatch, common + ["--export-trl", path] + flags)
    rows, cache = read_jsonl(path), precompute.load_cache(out, precompute.read_pairs(data))
    rc, rr = cache["chosen_logps"], cache["rejected_logps"]  # (K, N)
    if kw.get("alpha") in ("vdw", "vaw"):
        kw = {**kw, "alpha": getattr(mrpo, f"{kw['alpha']}_weights")(rc, rr)}
    # the pairs exactly as in --data, in its order, and only the two columns added
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == read_jsonl(data)
    assert all(sorted(r) == ["chosen", "prompt", "ref_chosen_logps", "ref_rejected_logps", "rejected"] for r in rows)
    virtual_chosen, virtual_rejected = mrpo.virtual_reference_pair(rc, rr, **kw)
    exported_chosen = torch.tensor([r["ref_chosen_logps"] for r in rows])
    exported_rejected = torch.tensor([r["ref_rejected_logps"] for r in rows])
    assert torch.equal(exported_chosen, virtual_chosen) and torch.equal(exported_rejected, virtual_rejected)
    if kw.get("clip", True):  # the tiny reference 2 lies far from reference 1: CTRO must have clipped something
        assert not torch.equal(virtual_chosen, mrpo.virtual_reference_pair(rc, rr, **{**kw, "clip": False})[0])
    # DPO against the exported columns is MRPO on the cache, for every loss type: values and policy gradients
    torch.manual_seed(0)
    policy_chosen, policy_rejected = rc[0] + torch.randn(len(rows)), rr[0] + torch.randn(len(rows))
    for loss_type in mrpo.LOSS_TYPES:
        for smoothing in (0.0, 0.1) if loss_type in ("sigmoid", "robust") else (0.0,):
            results = []
            for loss, refs in ((mrpo.mrpo_loss, (rc, rr)), (mrpo.dpo_loss, (exported_chosen, exported_rejected))):
                pc, pr = policy_chosen.clone().requires_grad_(), policy_rejected.clone().requires_grad_()
                extra = kw if loss is mrpo.mrpo_loss else {}
                losses, chosen_rewards, rejected_rewards = loss(pc, pr, *refs, 0.1, loss_type=loss_type,
                                                                label_smoothing=smoothing, **extra)
                losses.sum().backward()
                results.append((losses.detach(), chosen_rewards, rejected_rewards, pc.grad, pr.grad))
            for got, want in zip(*results):
                assert torch.equal(got, want), (loss_type, smoothing)


def other_refs_cache(tmp_path, cache):
    """A copy of `cache` that claims other references (names changed), to stand for a validation cache of others."""
    tensors, meta = precompute._read_safetensors(cache)
    refs = json.loads(meta["refs"])
    meta = {**meta, "refs": json.dumps([{**r, "name": r["name"] + "-other"} for r in refs])}
    path = str(tmp_path / "other.safetensors")
    precompute._write_safetensors(path, tensors, meta)
    return path


REFUSED = {  # flags -> words the message must hold (each names the flag)
    "multi_dpo": (["--loss", "multi_dpo"], "--loss multi_dpo cannot be exported"),
    "swcw": (["--alpha", "swcw"], "--alpha swcw cannot be exported"),
    "tsw": (["--alpha", "tsw"], "--alpha tsw cannot be exported"),
    "vdw_without_validation": (["--alpha", "vdw"], "--val-refs go with --alpha vdw"),
    "validation_without_vdw": (["--val-data", "DATA", "--val-refs", "CACHE"], "--val-refs go with --alpha vdw"),
    "three_weights_for_two_refs": (["--alpha", "1,2,3"], "--alpha '1,2,3' gives 3 weights but there are K=2"),
    "eps_max_above_1": (["--eps-max", "2"], "--eps-max 2.0: must be between 0 and 1"),
    "export_over_the_cache": (["--export-trl", "OUT"], "would overwrite the cache --out"),
    "val_refs_of_other_refs": (["--alpha", "vaw", "--val-data", "DATA", "--val-refs", "OTHER"],
                               "other references than"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_exported_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys, scored, case):
    data, out, _, common = scored
    flags, words = REFUSED[case]
    flags = [{"DATA": data, "CACHE": out + ".val", "OUT": out}.get(f, f) for f in flags]
    if "OTHER" in flags:
        flags[flags.index("OTHER")] = other_refs_cache(tmp_path, out)
    path = str(tmp_path / "trl.jsonl")
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, common + ["--export-trl", path] + flags)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and words in message and "fix:" in message, message
    assert message.startswith("precompute.py: error: ") and not os.path.exists(path)
    assert precompute.load_cache(out, precompute.read_pairs(data))  # the cache is untouched


def test_refused_in_a_subprocess_exits_non_zero(tmp_path, scored):
    _, _, _, common = scored
    path = str(tmp_path / "trl.jsonl")
    result = subprocess.run([sys.executable, "precompute.py", *common, "--export-trl", path, "--loss", "multi_dpo"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--loss multi_dpo cannot be exported" in result.stderr
    assert not os.path.exists(path)


def test_a_failed_export_leaves_no_half_written_file(tmp_path, monkeypatch, scored):
    """The write fails after two rows: OUT.jsonl keeps its old content and no temporary file is left behind."""
    _, _, _, common = scored
    path = tmp_path / "trl.jsonl"
    path.write_text("old\n")

    class Poisoned:
        def tolist(self):
            return [-1.0, -2.0, object()] + [-3.0] * 5  # the third row cannot be written as JSON

    chosen = mrpo.virtual_reference_pair
    monkeypatch.setattr(mrpo, "virtual_reference_pair", lambda *a, **k: (chosen(*a, **k)[0], Poisoned()))
    with pytest.raises(TypeError):
        run_main(monkeypatch, common + ["--export-trl", str(path)])
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["refs.safetensors", "trl.jsonl"]
