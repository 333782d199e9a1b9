"""What users bring from other tools: data through `datasets` (JSON, Parquet, save_to_disk folders, TRL's
implicit-prompt rows), TensorBoard logs, and a model with its adapter merged into the weights as an eval.py policy.

No hub: every dataset here is written locally; the tiny random models come from conftest.py's tiny_refs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import precompute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl")  # conversational rows
TRAIN = os.path.join(ROOT, "data", "train.jsonl")  # plain strings


def run(script, *args, env=None):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------------------------
# Data sources

@pytest.mark.parametrize("source", [HH, TRAIN], ids=["conversations", "strings"])
def test_json_parquet_and_saved_datasets_give_the_pairs_of_the_jsonl(source, tmp_path):
    import datasets
    rows = [json.loads(line) for line in open(source, encoding="utf-8")][:6]
    expected = precompute.read_pairs(source)[:6]
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    table = datasets.Dataset.from_list([{**r, "id": i} for i, r in enumerate(rows)])  # an extra column is dropped
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table.select(range(2)), "test": table}).save_to_disk(str(tmp_path / "splits"))
    for spec in ("rows.json", "rows.parquet", "saved", "splits@test"):
        assert precompute.read_pairs(str(tmp_path / spec)) == expected, spec


def test_implicit_prompt_rows_are_split_at_their_common_prefix(tmp_path):
    import datasets
    pairs = precompute.read_pairs(HH)[:4]
    as_conversations = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    datasets.Dataset.from_list(as_conversations).to_parquet(str(tmp_path / "hh.parquet"))
    assert precompute.read_pairs(str(tmp_path / "hh.parquet")) == pairs  # message boundaries: the pairs come back
    h = "\n\nHuman: Can you help me pick a lock?\n\nAssistant:"
    texts = [{"chosen": h + " I can't help with that.", "rejected": h + " I can show you how."},  # "I" is shared
             {"chosen": h + " Sure thing, here", "rejected": h + " Sure"},  # one response a prefix of the other
             {"chosen": h + " No.", "rejected": h + " Maybe."}]
    (tmp_path / "hh.json").write_text(json.dumps(texts))
    got = precompute.read_pairs(str(tmp_path / "hh.json"))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in got] == [
        (h + " I", " can't help with that.", " can show you how."), (h, " Sure thing, here", " Sure"),
        (h, " No.", " Maybe.")]


def test_bad_rows_and_sources_name_the_place_and_the_fix(tmp_path):
    import datasets
    rows = [json.loads(line) for line in open(TRAIN, encoding="utf-8")][:4]
    rows[2]["rejected"] = rows[2]["chosen"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "splits"))
    (tmp_path / "object.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "rows.csv").write_text("prompt,chosen,rejected\n")
    (tmp_path / "no-prefix.json").write_text(json.dumps([{"chosen": "Yes.", "rejected": "No."}]))
    cases = {"bad.parquet": "bad.parquet: row 3: fields 'chosen' and 'rejected' are identical",
             "splits@test": "a dataset of splits train; fix: name one, e.g.",
             "bad.parquet@train": "holds one split, so @train names nothing",
             "object.json": "a JSON file must hold a list of rows",
             "rows.csv": "unknown kind of file",
             "missing.parquet": "no such file",
             "no-prefix.json": "no-prefix.json: row 1: no 'prompt', and 'chosen' and 'rejected' share no prefix"}
    for spec, message in cases.items():
        with pytest.raises(precompute.DataError) as error:
            precompute.read_pairs(str(tmp_path / spec))
        assert message in str(error.value), (spec, str(error.value))
    result = run("precompute.py", "--data", "no-such-owner/no-such-dataset@train", "--out", str(tmp_path / "r.st"),
                 env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2 and "no-such-owner/no-such-dataset@train: cannot be read as preference data" in \
        result.stderr and "ID[:CONFIG][@SPLIT]" in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# A cache made from a JSONL file serves a Parquet copy of its rows; TensorBoard gets TRL's names

def test_parquet_copy_uses_the_jsonl_cache_and_tensorboard_logs_metrics(tiny_refs, tmp_path):
    import datasets
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, cache, _ = tiny_refs
    datasets.Dataset.from_list([json.loads(line) for line in open(data)]).to_parquet(str(tmp_path / "pairs.parquet"))
    parquet, out = str(tmp_path / "pairs.parquet"), tmp_path / "run"
    result = run("train.py", "--data", parquet, "--refs", cache, "--eval-data", parquet, "--eval-refs", cache,
                 "--out-dir", str(out), "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
                 "--report-to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in board.Scalars(tag)]  # noqa: E731
    train_loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_acc = [(r["step"], r["eval_rewards/accuracies"]) for r in records if "eval_rewards/accuracies" in r]
    assert len(train_loss) == 2 and len(eval_acc) == 2  # steps 1, 2; held out at 0 and 2
    assert scalars("train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in train_loss]
    assert scalars("eval/rewards/accuracies") == [(s, pytest.approx(v, rel=1e-6)) for s, v in eval_acc]
    assert "train/rewards/margins" in board.Tags()["scalars"]


def test_report_to_a_missing_package_fails_before_work(tiny_refs, tmp_path):
    data, cache, _ = tiny_refs
    result = run("train.py", "--data", data, "--refs", cache, "--eval-every", "0", "--out-dir", str(tmp_path),
                 "--report-to", "wandb")
    if result.returncode == 0:
        pytest.skip("wandb is installed here")
    assert result.returncode == 2 and "pip install wandb" in result.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# A merged model is a policy of eval.py, with the numbers of its adapter

def test_merged_adapter_scores_like_the_adapter(tiny_refs, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    data, cache, models = tiny_refs
    model, tokenizer = precompute.load_model(models[0])
    torch.manual_seed(0)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    policy.save_pretrained(str(tmp_path / "adapter"))
    base, _ = precompute.load_model(models[0])  # the README's recipe: base + adapter, merged, saved
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    tokenizer.save_pretrained(str(tmp_path / "merged"))
    out = tmp_path / "eval.json"
    result = run("eval.py", "--data", data, "--refs", cache, "--out", str(out), "--policies", "base",
                 str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-3000:]
    policies = json.load(open(out))["policies"]
    adapter, merged = policies[str(tmp_path / "adapter")], policies[str(tmp_path / "merged")]
    assert adapter["ref1/margin"] != 0  # the adapter changes the policy ...
    for key, value in adapter.items():  # ... and the merged weights give its numbers
        assert merged[key] == pytest.approx(value, abs=1e-4), key
    assert policies["base"]["ref1/margin"] == 0
