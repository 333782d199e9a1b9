"""train.py, precompute.py and eval.py under torchrun: 2 processes on CPU (Gloo) against 1 process.

Each run is a subprocess, `python -m torch.distributed.run --standalone --nproc_per_node 2 SCRIPT ...` (torchrun),
one thread per process, on conftest.py's two tiny random Llamas (tiny_refs: 8 pairs). The yardstick is always the
same command without torchrun, which is the scripts' code path of before torchrun support:
- train.py: a step's batch is split over the ranks, each rank's loss is divided by the whole batch, the LoRA gradients
  are summed over ranks once per step: the losses, the metrics and the adapter equal the 1-process ones up to float32
  rounding (the sums are added in another order), with --grad-accum 1 and 2; --stop-after/--resume under 2 processes
  gives the same result, a 1-process checkpoint resumes under 2 processes, and --alpha swcw and tsw keep the same
  weighting state on every rank.
- precompute.py: the file of 2 processes is byte-identical to that of 1 (the batches are dealt to the ranks whole, so
  each is computed exactly as one process computes it), also after a 2-process run killed part-way and resumed under
  2 processes or under 1.
- eval.py: the same JSON, to the bit (batches dealt whole, too).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens/s", "step_time")
TRAIN_RUN = ["--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-3", "--min-lr", "1e-4", "--max-steps", "3",
             "--eval-every", "3", "--save-every", "100"]  # 3 steps of 4 of the 8 pairs: crosses an epoch boundary


def run(script, *args, procs=2, check=True):
    """`python SCRIPT ARGS` (procs=1) or the same under torchrun with `procs` processes; one thread each."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)  # in case pytest itself runs under torchrun
    result = subprocess.run([sys.executable, *launcher, script, *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def train(tiny_refs, out_dir, *extra, procs=2, check=True):
    data, cache, _ = tiny_refs
    return run("train.py", "--data", data, "--refs", cache, "--eval-data", data, "--eval-refs", cache,
               "--out-dir", out_dir, *TRAIN_RUN, *extra, procs=procs, check=check)


def records(out_dir):
    """metrics.jsonl without the timing fields and the step-0 check (which covers rank 0's share of the batch)."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if "check/ref1_max_abs_diff" not in r]


def assert_same_run(a, b, exact=False):
    """Two train.py output directories hold the same metrics and adapter: exactly, or up to float32 rounding."""
    ra, rb = records(a), records(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb] and len(ra) == 5  # eval 0, steps 1-3, eval 3
    for x, y in zip(ra, rb):
        for k in x:
            assert x[k] == (y[k] if exact else pytest.approx(y[k], rel=1e-5, abs=1e-6)), (x["step"], k)
    wa, wb = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# train.py

@pytest.fixture(scope="module")
def one(tiny_refs, tmp_path_factory):
    """The yardstick: 3 MRPO steps in one process."""
    out = tmp_path_factory.mktemp("one")
    train(tiny_refs, out, procs=1)
    return out


@pytest.fixture(scope="module")
def two(tiny_refs, tmp_path_factory):
    """The same 3 steps in two processes."""
    out = tmp_path_factory.mktemp("two")
    result = train(tiny_refs, out)
    assert "2 processes" in result.stderr
    return out


def test_two_processes_train_like_one(one, two):
    assert_same_run(two, one)
    assert json.load(open(os.path.join(two, "config.json")))["world_size"] == 2
    before = load_file(os.path.join(one, "adapter_model.safetensors"))
    assert any(not torch.all(v == 0) for k, v in before.items() if "lora_B" in k)  # the LoRA weights did move
    assert not os.path.exists(os.path.join(two, "checkpoint-000001"))  # one writer: only the final checkpoint
    assert sorted(p for p in os.listdir(two) if p.startswith("checkpoint-")) == ["checkpoint-000003"]


@pytest.mark.parametrize("flags", [["--alpha", "swcw", "--window", "2"],
                                   ["--loss", "dpo", "--alpha", "tsw", "--val-data", "DATA", "--tsw-subset", "4"]])
def test_weighting_state_is_the_same_on_every_rank(tiny_refs, tmp_path, flags):
    """SWCW's window reads the whole batch and TSW's reward the validation accuracy summed over the ranks: the weights,
    TSW's choices and posteriors, and the adapter are the 1-process run's."""
    flags = [tiny_refs[0] if f == "DATA" else f for f in flags]
    train(tiny_refs, tmp_path / "one", *flags, procs=1)
    train(tiny_refs, tmp_path / "two", *flags)
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_two_processes_with_grad_accum_2(tiny_refs, one, tmp_path):
    """Each rank's 2 pairs in 2 micro-batches of 1; the gradients are summed over ranks once, after both."""
    train(tiny_refs, tmp_path, "--grad-accum", "2")
    assert_same_run(tmp_path, one)


def test_a_rank_without_pairs_still_joins_the_step(tiny_refs, tmp_path):
    """Batches of 1 pair: rank 1 never has a pair, yet sends its (zero) gradients and metrics every step."""
    one_pair = ["--batch-size", "1", "--max-steps", "2", "--eval-every", "0"]  # later flags win over TRAIN_RUN's
    train(tiny_refs, tmp_path / "one", *one_pair, procs=1)
    train(tiny_refs, tmp_path / "two", *one_pair)
    a, b = (records(tmp_path / d) for d in ("one", "two"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6) for k in x)
    wa, wb = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_stop_and_resume_under_two_processes(tiny_refs, two, tmp_path):
    train(tiny_refs, tmp_path, "--stop-after", "1")
    assert [r["step"] for r in records(tmp_path)] == [0, 1]
    result = train(tiny_refs, tmp_path, "--resume")
    assert "resumed from" in result.stderr
    assert_same_run(tmp_path, two, exact=True)  # the same split, the same order of additions: the same bits


def test_one_process_checkpoint_resumes_under_two(tiny_refs, one, tmp_path):
    train(tiny_refs, tmp_path, "--stop-after", "1", procs=1)
    train(tiny_refs, tmp_path, "--resume")
    assert_same_run(tmp_path, one)


# ---------------------------------------------------------------------------------------------------------------
# precompute.py: batches of 2 pairs, so that each of the 2 processes scores 2 of the 4 batches of each reference

def precompute(tiny_refs, out, *extra, procs=2, check=True):
    data, _, models = tiny_refs
    return run("precompute.py", "--data", data, "--refs", *models, "--batch-size", "2", "--out", out, *extra,
               procs=procs, check=check)


@pytest.fixture(scope="module")
def one_cache(tiny_refs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "one.safetensors"
    precompute(tiny_refs, out, procs=1)
    return out


def test_two_processes_write_the_bytes_of_one(tiny_refs, one_cache, tmp_path):
    result = precompute(tiny_refs, tmp_path / "two.safetensors")
    assert "2 processes" in result.stdout
    assert (tmp_path / "two.safetensors").read_bytes() == one_cache.read_bytes()
    assert not os.path.exists(tmp_path / "two.safetensors.partial")


def test_killed_two_process_precompute_resumes(tiny_refs, one_cache, tmp_path):
    out = tmp_path / "refs.safetensors"
    killed = precompute(tiny_refs, out, "--stop-after-batches", "1", check=False)
    assert killed.returncode != 0 and not out.exists()
    partial = tmp_path / "refs.safetensors.partial"
    # each rank stops after its first batch; the first to stop ends the other, which may not have written yet
    assert os.listdir(partial) and set(os.listdir(partial)) <= {"ref0.rank0.safetensors", "ref0.rank1.safetensors"}
    shutil.copytree(partial, tmp_path / "copy.safetensors.partial")
    precompute(tiny_refs, out)  # resumed under 2 processes
    assert out.read_bytes() == one_cache.read_bytes()
    precompute(tiny_refs, tmp_path / "copy.safetensors", procs=1)  # the same partial files, resumed by 1 process
    assert (tmp_path / "copy.safetensors").read_bytes() == one_cache.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# eval.py

def test_two_processes_evaluate_like_one(tiny_refs, two, tmp_path):
    data, cache, _ = tiny_refs
    args = ["--data", data, "--refs", cache, "--adapters", "base", two]  # rows of 1 pair
    run("eval.py", *args, "--out", tmp_path / "one.json", procs=1)
    run("eval.py", *args, "--out", tmp_path / "two.json")
    a, b = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert a == b
    assert a["policies"][str(two)]["ref1/margin"] != 0  # the trained adapter, not the base model twice
