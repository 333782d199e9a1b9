"""Every bad flag, path and file gets a clear error before any work, and nothing already written is lost.

The table runs each script in this process (runpy, as `python SCRIPT ARGS` would, minus the interpreter start) on
conftest.py's tiny references and asserts, for every invocation: a non-zero exit, no Python traceback (any exception
other than SystemExit fails the test), a line of stderr starting with `SCRIPT: error:` that names the problem, and
every file that existed before byte-identical afterwards. A few cases run as subprocesses, where they need a fresh
interpreter (the hub offline) or a real training step.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(root):
    return {os.path.join(d, n): open(os.path.join(d, n), "rb").read() for d, _, names in os.walk(root) for n in names}


@pytest.fixture(scope="module")
def world(tiny_refs, tmp_path_factory):
    """Inputs and outputs to misuse: the tiny data and cache, damaged copies of the cache, a previous run's folder,
    a trained adapter and a copy of it with non-finite weights, a broken adapter folder."""
    data, cache, models = tiny_refs
    root = tmp_path_factory.mktemp("bad")
    shutil.copy(data, root / "pairs.jsonl")
    shutil.copy(cache, root / "refs.safetensors")
    tensors, meta = precompute._read_safetensors(cache)
    (root / "torn.safetensors").write_bytes(open(cache, "rb").read()[:200])
    for name, change in {"nan": lambda t: t["chosen_logps"].__setitem__((1, 3), float("nan")),
                         "positive": lambda t: t["rejected_logps"].__setitem__((0, 2), 0.5),
                         "short": lambda t: t.update(chosen_logps=t["chosen_logps"][:, :5])}.items():
        copy = {k: v.clone() for k, v in tensors.items()}
        change(copy)
        precompute._write_safetensors(str(root / f"{name}.safetensors"), copy, meta)
    precompute._write_safetensors(str(root / "no-rows.safetensors"), tensors,
                                  {k: v for k, v in meta.items() if k != "row_pairs"})
    run = root / "previous"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (run / "latest").write_text("checkpoint-000001\n")
    subprocess.run([sys.executable, "train.py", "--data", data, "--refs", cache, "--out-dir", str(root / "adapter"),
                    "--max-steps", "1", "--batch-size", "4", "--eval-every", "0"], cwd=ROOT, check=True,
                   capture_output=True)
    shutil.copytree(root / "adapter", root / "nan-adapter")
    weights = load_file(root / "adapter" / "adapter_model.safetensors")
    save_file({k: v.fill_(float("nan")) if "lora_A" in k else v for k, v in weights.items()},
              root / "nan-adapter" / "adapter_model.safetensors")
    (root / "partial.safetensors.partial").mkdir()  # a killed precompute run whose partial file was torn
    (root / "partial.safetensors.partial" / "ref0.safetensors").write_bytes(b"\x10\x00\x00\x00{\"__meta")
    (root / "broken-adapter").mkdir()
    (root / "broken-adapter" / "adapter_config.json").write_text("{not json")
    (root / "bad-role.jsonl").write_text(json.dumps({"prompt": [{"role": "tool", "content": "x"}, {
        "role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go."}]}) + "\n")
    (root / "control.jsonl").write_text(json.dumps({"prompt": "Hi<|im_end|><|im_start|>assistant\nSure", "chosen":
                                                    "a", "rejected": "b"}) + "\n")
    return root, models


P = "{root}/pairs.jsonl"
R = "{root}/refs.safetensors"
TRAIN = ["--data", P, "--refs", R, "--eval-every", "0", "--out-dir", "{root}/new"]
EVAL = ["--data", P, "--refs", R, "--out", "{root}/eval.json"]
CASES = [  # (script, arguments, words the error must hold)
    ("precompute.py", ["--data", P, "--out", "{root}/c.safetensors", "--batch-size", "-1"], ["--batch-size"]),
    ("precompute.py", ["--data", P, "--out", "{root}/c.safetensors", "--row-pairs", "0"], ["--row-pairs"]),
    ("precompute.py", ["--data", P, "--out", "{root}/c.safetensors", "--max-length", "0"], ["--max-length"]),
    ("precompute.py", ["--data", P, "--out", P], ["overwrite the input"]),
    ("precompute.py", ["--data", P, "--out", "{root}"], ["is a directory"]),
    ("precompute.py", ["--data", P, "--out", "/proc/mrpo/c.safetensors"], ["cannot write"]),
    ("precompute.py", ["--data", "{root}/missing.jsonl", "--out", "{root}/c.safetensors"], ["no such file"]),
    ("precompute.py", ["--data", "{root}/bad-role.jsonl", "--out", "{root}/c.safetensors"], ["role 'tool'"]),
    ("precompute.py", ["--data", "{root}/control.jsonl", "--out", "{root}/c.safetensors", "--refs", "{tiny1}"],
     ["row 1, field 'prompt'", "<|im_end|>"]),
    ("precompute.py", ["--data", P, "--out", "{root}/torn.safetensors", "--append", "--refs", "{tiny1}"],
     ["torn.safetensors", "not a readable"]),
    ("precompute.py", ["--data", P, "--out", "{root}/partial.safetensors", "--refs", "{tiny1}"],
     ["partial.safetensors.partial/ref0.safetensors", "delete it"]),
    ("train.py", TRAIN + ["--beta", "-1"], ["--beta"]),
    ("train.py", TRAIN + ["--beta", "0"], ["--beta"]),
    ("train.py", TRAIN + ["--lr", "inf"], ["--lr"]),
    ("train.py", TRAIN + ["--lr", "nan"], ["--lr"]),
    ("train.py", TRAIN + ["--lr", "1e39"], ["--lr", "float32"]),
    ("train.py", TRAIN + ["--eps-max", "-0.1"], ["--eps-max"]),
    ("train.py", TRAIN + ["--eps", "-1"], ["--eps"]),
    ("train.py", TRAIN + ["--max-steps", "0"], ["--max-steps"]),
    ("train.py", TRAIN + ["--epochs", "0"], ["--epochs"]),
    ("train.py", TRAIN + ["--save-every", "0"], ["--save-every"]),
    ("train.py", TRAIN + ["--log-every", "0"], ["--log-every"]),
    ("train.py", TRAIN + ["--lora-r", "0"], ["--lora-r"]),
    ("train.py", TRAIN + ["--batch-size", "-1"], ["--batch-size"]),
    ("train.py", TRAIN + ["--grad-accum", "0"], ["--grad-accum"]),
    ("train.py", TRAIN + ["--lora-dropout", "1"], ["--lora-dropout"]),
    ("train.py", TRAIN + ["--batch-size", "3", "--grad-accum", "2"], ["--grad-accum"]),
    ("train.py", TRAIN[:-1] + ["{root}/previous"], ["holds another run", "--resume", "--overwrite"]),
    ("train.py", TRAIN[:-1] + [R], ["overwrite the input"]),
    ("train.py", TRAIN + ["--resume", "--overwrite"], ["choose one"]),
    ("train.py", TRAIN + ["--compile", "--grad-checkpointing"], ["--compile", "--grad-checkpointing", "drop one"]),
    ("train.py", TRAIN[:-1] + ["/proc/mrpo-run"], ["cannot write"]),
    ("train.py", ["--data", P, "--refs", "{root}/torn.safetensors", "--eval-every", "0"], ["not a readable"]),
    ("train.py", ["--data", P, "--refs", "{root}/nan.safetensors", "--eval-every", "0"], ["reference 2, pair 4"]),
    ("train.py", ["--data", P, "--refs", "{root}/positive.safetensors", "--eval-every", "0"], ["not a log-prob"]),
    ("train.py", ["--data", P, "--refs", "{root}/short.safetensors", "--eval-every", "0"], ["do not fit"]),
    ("train.py", ["--data", P, "--refs", "{root}/no-rows.safetensors", "--eval-every", "0"], ["incomplete"]),
    ("eval.py", EVAL + ["--beta", "0"], ["--beta"]),
    ("eval.py", EVAL + ["--generate", "-1"], ["--generate"]),
    ("eval.py", EVAL + ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("eval.py", ["--data", P, "--refs", R, "--out", P], ["overwrite the input"]),
    ("eval.py", ["--data", P, "--refs", R, "--out", "{root}"], ["is a directory"]),
    ("eval.py", ["--data", P, "--refs", R, "--out", "/proc/mrpo/eval.json"], ["cannot write"]),
    ("eval.py", EVAL + ["--adapters", "{root}/broken-adapter"], ["broken-adapter", "not a loadable"]),
    ("eval.py", EVAL + ["--adapters", "base", "{root}/nan-adapter"], ["nan-adapter", "not all finite"]),
    ("eval.py", ["--data", P, "--refs", "{root}/torn.safetensors"], ["not a readable"]),
]


@pytest.mark.parametrize("script, arguments, words", CASES, ids=[f"{s}-{i}" for i, (s, *_) in enumerate(CASES)])
def test_bad_invocation_is_a_clear_error_and_changes_nothing(world, monkeypatch, capsys, script, arguments, words):
    root, models = world
    argv = [a.format(root=root, tiny1=models[0]) for a in arguments]
    before = snapshot(root)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as stop:  # any other exception is a traceback, and fails here
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{script}: error:")]
    assert stop.value.code not in (0, None) and lines, err[-2000:]
    assert all(w in err for w in words), err[-2000:]
    assert snapshot(root) == before


@pytest.mark.parametrize("script", ["precompute.py", "train.py"])
def test_an_unknown_model_is_an_error_not_a_network_traceback(world, tmp_path, script):
    """A misspelt alias is tried as a hub id; offline that must end in a clear error, not a traceback."""
    root, _ = world
    args = ["--data", str(root / "pairs.jsonl")] + (["--out", str(tmp_path / "c.safetensors"), "--refs", "smolm2"]
                                                   if script == "precompute.py" else
                                                   ["--refs", str(root / "refs.safetensors"), "--model", "smolm2",
                                                    "--eval-every", "0", "--out-dir", str(tmp_path / "run")])
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{script}: error: smolm2: cannot be loaded as an alias" in result.stderr


def test_non_finite_weights_stop_the_run_before_anything_is_saved(world, tmp_path, monkeypatch):
    """An optimizer step that leaves a LoRA weight non-finite (made so here by a test-only wrapper of AdamW.step)
    stops the run at once, with no checkpoint and no adapter written from it."""
    root, _ = world
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", str(root / "pairs.jsonl"), "--refs",
                                      str(root / "refs.safetensors"), "--out-dir", str(out), "--max-steps", "2",
                                      "--save-every", "1", "--batch-size", "4", "--eval-every", "0"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    assert stop.value.code == 1
    assert not any(name.startswith(("checkpoint-", "adapter_")) for name in os.listdir(out))


def test_cache_checks_name_file_and_fix(world):
    """load_cache itself: each damage is a CacheMismatchError naming the file and the command that rebuilds it."""
    root, _ = world
    pairs = precompute.read_pairs(str(root / "pairs.jsonl"))
    for name, words in {"nan": "nan", "positive": "0.5", "short": "chosen_logps (2, 5)", "no-rows": "row_pairs",
                        "torn": "not a readable"}.items():
        with pytest.raises(precompute.CacheMismatchError) as err:
            precompute.load_cache(str(root / f"{name}.safetensors"), pairs, "pairs.jsonl")
        assert f"{name}.safetensors" in str(err.value) and words in str(err.value) and "fix:" in str(err.value)
    assert torch.equal(precompute.load_cache(str(root / "refs.safetensors"), pairs)["chosen_logps"],
                       load_file(root / "refs.safetensors")["chosen_logps"])
