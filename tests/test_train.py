"""Tests of train.py: a tiny end-to-end run as a subprocess, resume equivalence, learning on an easy slice, the 4-bit
LoRA gradient check, a NaN stop, and bad input.

The runs that learn, load 4 bit or check the cache use SmolLM2 (reference 1, the policy) and Gemma 3 (reference 2) on a
handful of bundled pairs; their reference cache is made once with precompute.py's command line and kept under
$MRPO_CACHE/test-refs/ (conftest.py's reference_cache fixture). Resume, the NaN stop and the other mechanics run on two
tiny random Llamas (conftest.py's tiny_refs), which exercise the same code in a fraction of the time.
"""

import copy
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mrpo
import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "data", "train.jsonl")
TIMING = ("tokens/s", "step_time")  # the only fields allowed to differ between two identical runs



@pytest.fixture(scope="module")
def easy(reference_cache):
    """8 helpful-vs-evasive pairs of the bundled training set (the easiest kind) and their reference cache."""
    evasions = {" " + e for e in runpy.run_path(os.path.join(ROOT, "data", "make_pairs.py"))["EVASIONS"]}
    rows = [p for p in precompute.read_pairs(TRAIN) if p["rejected"] in evasions][:8]
    assert len(rows) == 8
    return reference_cache(rows)


def train(data, cache, out_dir, *extra, check=True):
    """Run train.py as a subprocess on (data, cache), held out = the same pairs; returns CompletedProcess."""
    cmd = [sys.executable, "train.py", "--data", data, "--refs", cache, "--eval-data", data, "--eval-refs", cache,
           "--out-dir", str(out_dir), "--batch-size", "4", "--warmup-steps", "1", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


# ---------------------------------------------------------------------------------------------------------------
# A short run end to end: metrics, the step-0 check, learning, the adapter

@pytest.fixture(scope="module")
def easy_run(easy, tmp_path_factory):
    """12 MRPO steps of 4 pairs on the easy slice, lr 1e-3 (higher than the paper's, to learn in a few steps)."""
    out = tmp_path_factory.mktemp("easy_run")
    data, cache = easy
    result = train(data, cache, out, "--loss", "mrpo", "--lr", "1e-3", "--max-steps", "12", "--eval-every", "6",
                   "--save-every", "6")
    return out, result


def test_metrics_use_dpo_trl_names_and_step0_matches_reference1(easy_run, easy):
    out, result = easy_run
    rows = records(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "lr", "tokens/s", "step_time"):
        assert all(isinstance(r[name], float) for r in train_rows), name
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    # At step 0 the policy is reference 1 (same model, fp32): its log-probs equal the cached ones.
    check = next(r for r in rows if "check/ref1_max_abs_diff" in r)
    assert check["check/ref1_max_abs_diff"] < 1e-3
    assert "WARNING" not in result.stderr
    # The held-out loss at step 0 is the loss of the policy = reference 1 against the cache.
    assert abs(evals[0]["eval_logps/chosen"] - float(load_file(easy[1])["chosen_logps"][0].mean())) < 1e-3
    assert "train.py: mrpo, steps 1-12 of 12" in result.stdout


def test_loss_decreases_and_accuracy_rises_on_easy_slice(easy_run):
    out, _ = easy_run
    rows = [r for r in records(out) if "loss" in r]
    first, last = rows[:4], rows[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.05
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/margins") > 0
    evals = [r for r in records(out) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_adapter_loads_with_peft_and_changes_the_policy(easy_run, smollm2, easy):
    from peft import PeftModel
    out, _ = easy_run
    base, tokenizer = smollm2
    pairs = precompute.read_pairs(easy[0])[:2]
    enc = [(precompute.encode(tokenizer, p["prompt"], p["chosen"]), precompute.encode(tokenizer, p["prompt"],
                                                                                      p["rejected"])) for p in pairs]
    with torch.no_grad():
        before = torch.stack(precompute.pair_logps(base, enc), dim=1).flatten()  # c0 r0 c1 r1
        policy = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
        policy.eval()
        after = torch.stack(precompute.pair_logps(policy, enc), dim=1).flatten()
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    loaded = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0
    for name, tensor in saved.items():  # peft drops the adapter name from saved keys
        match = [v for k, v in loaded.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name
    assert (after - before).abs().max() > 1e-3
    # the trained policy prefers the chosen responses more than the base model does (implicit reward margin > 0)
    margins = (after[0::2] - before[0::2]) - (after[1::2] - before[1::2])
    assert float(margins.mean()) > 0


# ---------------------------------------------------------------------------------------------------------------
# Resume: stop after step n, resume to 2n; identical to an uninterrupted 2n run

def test_resume_is_identical_to_an_uninterrupted_run(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    # lora dropout > 0 so that the restored RNG state matters; batch 2 so 4 steps cover two epochs' worth of order
    common = ["--loss", "mrpo", "--lr", "5e-4", "--max-steps", "4", "--batch-size", "2", "--eval-every", "2",
              "--save-every", "100", "--lora-dropout", "0.1"]
    stopped = train(data, cache, tmp_path / "a", *common, "--stop-after", "2")
    assert "stopped after step 2" in stopped.stderr
    assert [r["step"] for r in records(tmp_path / "a") if "loss" in r] == [1, 2]
    resumed = train(data, cache, tmp_path / "a", *common, "--resume")
    assert "resumed from" in resumed.stderr
    train(data, cache, tmp_path / "b", *common)

    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "a")) == strip(records(tmp_path / "b"))
    a = load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "b", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    train(data, cache, tmp_path, "--max-steps", "2", "--stop-after", "1", "--eval-every", "0")
    result = train(data, cache, tmp_path, "--max-steps", "2", "--eval-every", "0", "--beta", "0.5", "--resume",
                   check=False)
    assert result.returncode == 2
    assert "--beta 0.5 (was 0.1)" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# A non-finite loss stops the run; the last checkpoint stays intact

def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    # An absurd learning rate: the weights overflow after the first update and the second loss is not finite.
    result = train(data, cache, tmp_path, "--loss", "dpo", "--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0",
                   "--max-steps", "3", "--save-every", "1", "--eval-every", "0", check=False)
    assert result.returncode == 1
    assert "at step 2" in result.stderr and "checkpoint-000001" in result.stderr
    assert open(os.path.join(tmp_path, "latest")).read().strip() == "checkpoint-000001"
    state = torch.load(os.path.join(tmp_path, "checkpoint-000001", "trainer_state.pt"), weights_only=False)
    assert state["step"] == 1
    assert load_file(os.path.join(tmp_path, "checkpoint-000001", "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(tmp_path, "adapter_model.safetensors"))  # no final adapter


# ---------------------------------------------------------------------------------------------------------------
# 4-bit: LoRA gradients after an eval pass equal those of a dense model holding the same dequantized weights

def lora_grads_after_eval_pass(dense_base, tokenizer, pairs, guard):
    """LoRA gradients of (4-bit model, dense twin with its dequantized weights) after a no-grad eval forward."""
    import bitsandbytes as bnb
    from peft import (LoraConfig, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training,
                      set_peft_model_state_dict)
    quantized, _ = precompute.load_model("smollm2", dtype="fp32", load_in_4bit=True)
    dense = copy.deepcopy(dense_base)
    dense_modules = dict(dense.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            dense_modules[name].weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            module.support_avx512bf16_for_cpu = not guard  # guard=False restores bitsandbytes' default here
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM")  # random A and B, so every LoRA weight gets a gradient
    torch.manual_seed(0)
    quantized = get_peft_model(quantized, LoraConfig(**config))
    dense = get_peft_model(dense, LoraConfig(**config))
    set_peft_model_state_dict(dense, get_peft_model_state_dict(quantized))
    batch = [(precompute.encode(tokenizer, p["prompt"], p["chosen"]), precompute.encode(tokenizer, p["prompt"],
                                                                                        p["rejected"])) for p in pairs]
    quantized.eval()
    with torch.no_grad():  # the evaluation pass that makes bitsandbytes repack its weights on AVX512-BF16 CPUs
        precompute.pair_logps(quantized, batch)
    grads = []
    for model in (quantized, dense):
        model.train()
        sum(precompute.pair_logps(model, batch)).sum().backward()
        grads.append({n: p.grad if p.grad is not None else torch.zeros_like(p)
                      for n, p in model.named_parameters() if p.requires_grad})
    return grads


def relative_error(a, b):
    return max(float((a[k] - b[k]).abs().max()) / float(b[k].abs().max()) for k in b)


def test_4bit_lora_gradients_match_dense_after_eval_pass(smollm2, pairs_small):
    model, tokenizer = smollm2
    quantized, dense = lora_grads_after_eval_pass(model, tokenizer, pairs_small[:2], guard=True)
    assert quantized.keys() == dense.keys() and len(dense) > 0
    assert relative_error(quantized, dense) < 1e-3


def test_4bit_guard_matters_on_avx512bf16_cpus(smollm2, pairs_small):
    from bitsandbytes.functional import has_avx512bf16
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks, so the guard changes nothing here")
    model, tokenizer = smollm2
    quantized, dense = lora_grads_after_eval_pass(model, tokenizer, pairs_small[:2], guard=False)
    assert relative_error(quantized, dense) > 0.1  # without the guard the gradients are wrong


def test_4bit_training_runs_and_warns_about_the_reference_mismatch(easy, tmp_path):
    data, cache = easy
    result = train(data, cache, tmp_path, "--load-in-4bit", "--max-steps", "2", "--eval-every", "1")
    assert "WARNING" in result.stderr and "fp32/none" in result.stderr  # fp32 cache vs a 4-bit policy
    rows = records(tmp_path)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert os.path.isfile(os.path.join(tmp_path, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error that says what to do (these fail before any model is loaded)

def test_bad_input(easy, tmp_path):
    data, cache = easy

    def error(*extra, eval_set=True):
        cmd = [sys.executable, "train.py", "--data", data, "--refs", cache, "--out-dir", str(tmp_path), *extra]
        if eval_set:
            cmd += ["--eval-data", data, "--eval-refs", cache]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2, result.stderr[-2000:]
        return result.stderr

    missing = str(tmp_path / "nope.safetensors")
    message = error("--refs", missing)
    assert missing in message and "python precompute.py" in message

    other = tmp_path / "other.jsonl"  # the same pairs with row 3 changed: the cache no longer matches
    rows = open(data).read().splitlines()
    row = json.loads(rows[2])
    row["chosen"] += " Really."
    rows[2] = json.dumps(row)
    other.write_text("\n".join(rows) + "\n")
    message = error("--data", str(other))
    assert "row 3" in message and str(other) in message and "precompute.py" in message

    message = error("--alpha", "0.2,0.3,0.5")
    assert "K=2" in message and "3 weights" in message

    message = error("--loss", "ipo")
    assert "invalid choice: 'ipo'" in message and "mrpo" in message

    message = error(eval_set=False)
    assert "no held-out set" in message and "--eval-data" in message and "--eval-every 0" in message

    message = error("--eval-data", str(tmp_path / "missing.jsonl"), "--eval-refs", cache, eval_set=False)
    assert "missing.jsonl" in message and "no such file" in message

    message = error("--resume")
    assert "no checkpoint" in message


def test_refuses_a_policy_that_tokenizes_differently(easy, tmp_path):
    data, cache = easy
    result = subprocess.run([sys.executable, "train.py", "--data", data, "--refs", cache, "--eval-every", "0",
                             "--model", "gemma3", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "formats text differently from reference 1" in result.stderr and "tokenizer" in result.stderr


def test_cache_metadata_is_what_train_reads(easy):
    """The fields train.py relies on are in the cache precompute.py writes (a guard against contract drift)."""
    with safe_open(easy[1], framework="pt") as f:
        refs = json.loads(f.metadata()["refs"])
    for field in ("name", "tokenizer", "chat_template_sha256", "format", "bos_token_id", "eos_token_id", "dtype",
                  "quantization", "max_length", "max_prompt_length"):
        assert field in refs[0], field
    assert [r["name"] for r in refs] == ["smollm2", "gemma3"]


# ---------------------------------------------------------------------------------------------------------------
# Fast runs on two tiny random Llamas with SmolLM2's tokenizer (conftest.py's tiny_refs): 8 pairs, batch 4, so 2 steps
# per epoch. Reference 1's config has attention_dropout 0.5, which train.py must switch off.

TINY_RUN = ["--lr", "1e-3", "--max-steps", "4", "--eval-every", "2", "--min-lr", "1e-4", "--save-every", "100"]
strip_timing = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731


def adapter(out_dir):
    return load_file(os.path.join(out_dir, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_run(tiny_refs, tmp_path_factory):
    """4 MRPO steps (2 epochs) on the tiny models, uninterrupted: the yardstick of the tests below."""
    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_refs[0], tiny_refs[1], out, *TINY_RUN)
    return out


def test_tiny_run_reaches_min_lr_and_attention_dropout_is_off(tiny_run):
    rows = records(tiny_run)
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert lrs[0] == pytest.approx(1e-3 / 2) and lrs[1] == pytest.approx(1e-3)  # warmup 1 step, then the peak
    assert lrs[-1] == pytest.approx(1e-4)  # the last optimizer step uses --min-lr
    # In train mode the policy's log-probs equal the cache's (scored in eval mode): no dropout of any kind is left,
    # although reference 1's config asks for attention_dropout 0.5.
    check = next(r for r in rows if "check/ref1_max_abs_diff" in r)
    assert check["check/ref1_max_abs_diff"] < 1e-3


def test_fresh_run_refuses_or_overwrites_old_outputs_and_resume_crosses_an_epoch_boundary(tiny_refs, tiny_run,
                                                                                           tmp_path):
    data, cache, _ = tiny_refs
    out = tmp_path / "a"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # a previous run's outputs
    (out / "adapter_model.safetensors").write_bytes(b"old")
    (out / "checkpoint-000009").mkdir()
    (out / "latest").write_text("checkpoint-000009\n")
    (out / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = train(data, cache, out, *TINY_RUN, "--stop-after", "1", check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert {p: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and (out / "checkpoint-000009").is_dir()
    train(data, cache, out, *TINY_RUN, "--stop-after", "1", "--overwrite")
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-000001"]
    assert [r["step"] for r in records(out)] == [0, 0, 1]

    metrics = (out / "metrics.jsonl").read_text()
    lines = metrics.splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + '{"step": 0, "ev\n' + "".join(lines[1:]))  # damaged inside
    result = train(data, cache, out, *TINY_RUN, "--resume", check=False)
    assert result.returncode == 2 and f"{out / 'metrics.jsonl'}, line 2" in result.stderr

    # killed while writing the next record: the torn last line is dropped
    (out / "metrics.jsonl").write_text(metrics + '{"step": 2, "epoch": 1.0, "loss": 0.69')
    resumed = train(data, cache, out, *TINY_RUN, "--resume")  # steps 2-4: the end of epoch 0, then epoch 1
    assert "resumed from" in resumed.stderr
    assert strip_timing(records(out)) == strip_timing(records(tiny_run))
    a, b = adapter(out), adapter(tiny_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(out / "checkpoint-000004" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4


def test_resume_refuses_a_checkpoint_that_needs_unpickling_code(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    train(data, cache, tmp_path, *TINY_RUN, "--stop-after", "1", "--eval-every", "0")
    marker = tmp_path / "code-ran"
    state_path = tmp_path / "checkpoint-000001" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["extra"] = Payload(str(marker))  # an object whose unpickling runs code
    torch.save(state, state_path)
    result = train(data, cache, tmp_path, *TINY_RUN, "--eval-every", "0", "--resume", check=False)
    assert not marker.exists()
    assert result.returncode == 2 and "trainer_state.pt" in result.stderr and "weights_only" in result.stderr


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_grad_accum_2_gives_the_same_update_as_1(tiny_refs, tiny_run, tmp_path):
    train(tiny_refs[0], tiny_refs[1], tmp_path, *TINY_RUN, "--grad-accum", "2")
    a, b = adapter(tmp_path), adapter(tiny_run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for r, s in zip(records(tmp_path), records(tiny_run)):
        assert r["step"] == s["step"] and r.get("loss", 0) == pytest.approx(s.get("loss", 0), abs=1e-5)


LOSS_RUNS = {"dpo": ["--loss", "dpo"], "multi_dpo --no-clip": ["--loss", "multi_dpo", "--no-clip"],
             "mean_ref --eps": ["--loss", "mean_ref", "--eps", "0.002"], "mrpo --eps": ["--loss", "mrpo", "--eps",
                                                                                      "0.002"],
             "mrpo --loss-type robust": ["--loss", "mrpo", "--loss-type", "robust", "--label-smoothing", "0.2"],
             "dpo --loss-type ipo": ["--loss", "dpo", "--loss-type", "ipo"]}


@pytest.mark.parametrize("run", sorted(LOSS_RUNS))
def test_loss_options_reach_the_loss(tiny_refs, tmp_path, run):
    """One step over all 8 pairs: the policy is reference 1, so the step-1 loss is the loss of the cached reference-1
    log-probs against the cache, computed here with the flags' values (and different from the defaults' loss)."""
    data, cache, _ = tiny_refs
    train(data, cache, tmp_path, *LOSS_RUNS[run], "--batch-size", "8", "--max-steps", "1", "--eval-every", "0")
    step1 = next(r for r in records(tmp_path) if "loss" in r)
    refs = load_file(cache)
    rc, rr = refs["chosen_logps"], refs["rejected_logps"]
    args = LOSS_RUNS[run]
    value = lambda flag, default: type(default)(args[args.index(flag) + 1]) if flag in args else default  # noqa
    options = dict(eps=value("--eps", 0.0) if "--eps" in args else None, clip="--no-clip" not in args,
                   loss_type=value("--loss-type", "sigmoid"), label_smoothing=value("--label-smoothing", 0.0))
    want = float(mrpo.compute_loss(args[1], rc[0], rr[0], rc, rr, 0.1, **options)[0].mean())
    assert step1["loss"] == pytest.approx(want, abs=1e-5)
    if args[1] != "dpo" or "--loss-type" in args:
        assert abs(want - float(mrpo.compute_loss(args[1], rc[0], rr[0], rc, rr, 0.1)[0].mean())) > 1e-4
    if args[1] == "dpo":  # the policy is reference 1: every reward is exactly 0, a tie, which counts half
        assert step1["rewards/accuracies"] == 0.5


def test_eps_with_no_clip_is_an_error(tiny_refs, tmp_path):
    result = train(tiny_refs[0], tiny_refs[1], tmp_path, "--eps", "0.1", "--no-clip", check=False)
    assert result.returncode == 2 and "--eps" in result.stderr and "--no-clip" in result.stderr


def test_bf16_4bit_run_keeps_the_trainable_4bit_layout(tiny_refs, tmp_path):
    """A --dtype bf16 --load-in-4bit run, with train.py run in-process (runpy) so that its model can be inspected:
    the model train.py trains keeps bitsandbytes' AVX512-BF16 repacking off."""
    data, cache, models = tiny_refs
    args = ["--data", data, "--refs", cache, "--eval-data", data, "--eval-refs", cache, "--out-dir", str(tmp_path),
            "--batch-size", "4", "--max-steps", "2", "--eval-every", "1", "--dtype", "bf16", "--load-in-4bit"]
    code = ("import json, runpy, sys; sys.argv = ['train.py'] + json.loads(sys.argv[1]); "
            "g = runpy.run_path('train.py', run_name='__main__'); "
            "flags = [m.support_avx512bf16_for_cpu for m in g['model'].modules() "
            "if hasattr(m, 'support_avx512bf16_for_cpu')]; print('FLAGS', len(flags), any(flags))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    n, any_on = result.stdout.split("FLAGS")[1].split()
    assert int(n) > 0 and any_on == "False"
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path) if "loss" in r)
    assert os.path.isfile(os.path.join(tmp_path, "adapter_model.safetensors"))


def test_load_model_keeps_the_trainable_4bit_layout_in_every_script(tiny_refs):
    """precompute.py and eval.py score with the layout train.py trains with (bitsandbytes' repacked layout computes
    with another kernel; test_4bit_guard_matters_on_avx512bf16_cpus shows what it does to the LoRA gradients)."""
    model, _ = precompute.load_model(tiny_refs[2][0], load_in_4bit=True)
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(flags) > 0 and not any(flags)
