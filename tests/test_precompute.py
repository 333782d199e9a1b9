"""Tests of precompute.py: data validation, encoding and the prompt/response split, padding-free log-probs, the cache
file, resuming, and a smoke test of the command line.

The model tests use the two embedded default references (fixtures in conftest.py), in fp32, on a few bundled pairs.
The independent reference for log-probs is the slow way: one sequence at a time, no padding, a log-softmax over
every position of the full logits, summed by a Python loop over the response positions.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import precompute
from precompute import (CacheMismatchError, DataError, Encoded, encode, length_order, load_cache, pack_row,
                        pair_fingerprint, pair_logps, read_pairs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "data", "train.jsonl")
TOL = 1e-4  # fp32: batched vs one-at-a-time summed log-probs agree to ~2e-5 nats here; allow 1e-4 (absolute)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"prompt": "Question: What is 2 + 2?\nAnswer:", "chosen": " 4.", "rejected": " 5."})


# ---------------------------------------------------------------------------------------------------------------
# Data: every bad input names file, line and field

BAD_ROWS = {  # name: (line 2 of the file, field named in the message, words in the message)
    "malformed_json": ('{"prompt": "Q", "chosen": "a", "rejected": "b"', None, "malformed JSON"),
    "not_an_object": ('["Q", "a", "b"]', None, "expected a JSON object"),
    "missing_field": ('{"prompt": "Q", "chosen": "a"}', "rejected", "missing"),
    "non_string_field": ('{"prompt": "Q", "chosen": 4, "rejected": "b"}', "chosen", "must be a string"),
    "null_field": ('{"prompt": null, "chosen": "a", "rejected": "b"}', "prompt", "must be a string"),
    "empty_response": ('{"prompt": "Q", "chosen": "a", "rejected": "  "}', "rejected", "empty response"),
    "empty_prompt": ('{"prompt": "", "chosen": "a", "rejected": "b"}', "prompt", "empty prompt"),
    "identical": ('{"prompt": "Q", "chosen": " same", "rejected": " same"}', "chosen", "identical"),
    "mixed_forms": ('{"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}', "prompt",
                    "mix strings and message lists"),
    "bad_message": ('{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}], '
                    '"rejected": [{"role": "assistant", "content": "b"}]}', "prompt", "must be a message"),
    "prompt_not_user_last": ('{"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], '
                             '"chosen": [{"role": "assistant", "content": "a"}], '
                             '"rejected": [{"role": "assistant", "content": "b"}]}', "prompt", "end with a user turn"),
    "empty_conversational_response": ('{"prompt": [{"role": "user", "content": "Q"}], "chosen": [], '
                                      '"rejected": [{"role": "assistant", "content": "b"}]}', "chosen", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_names_file_line_field(tmp_path, case):
    row, field, words = BAD_ROWS[case]
    path = write_lines(tmp_path / f"{case}.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2:"), message  # file and 1-based line
    assert words in message, message
    assert "fix:" in message, message
    if field is not None:
        assert f"'{field}'" in message, message


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="no rows"):
        read_pairs(write_lines(tmp_path / "blank.jsonl", ["", "  "]))


def test_read_pairs_accepts_both_forms_and_blank_lines(tmp_path):
    conv = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}],
            "score": 3}
    pairs = read_pairs(write_lines(tmp_path / "ok.jsonl", [GOOD, "", json.dumps(conv)]))
    assert len(pairs) == 2
    assert pairs[0] == json.loads(GOOD)
    assert pairs[1] == {k: conv[k] for k in ("prompt", "chosen", "rejected")}  # extra keys dropped


def test_bundled_data_is_valid_and_disjoint():
    train, test = read_pairs(TRAIN), read_pairs(os.path.join(ROOT, "data", "test.jsonl"))
    assert len(train) >= 250 and len(test) >= 80
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert all(isinstance(p[f], str) for p in train + test for f in ("prompt", "chosen", "rejected"))


def test_bundled_data_is_reproducible(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_pairs.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "test.jsonl"):
        with open(os.path.join(ROOT, "data", name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), f"data/{name} differs from what data/make_pairs.py writes"


def test_pair_fingerprint():
    pair = json.loads(GOOD)
    assert pair_fingerprint(pair) == pair_fingerprint(dict(reversed(list(pair.items()))))  # key order irrelevant
    assert pair_fingerprint(pair) != pair_fingerprint({**pair, "chosen": " 4"})
    assert pair_fingerprint(pair) != pair_fingerprint({"prompt": pair["chosen"], "chosen": pair["prompt"],
                                                       "rejected": pair["rejected"]})


# ---------------------------------------------------------------------------------------------------------------
# Padding and batching, without a model

def test_pack_row_scores_from_lengths_not_pad_id():
    # id 2 is EOS and pad for SmolLM2: a sequence that ends with it must keep it as a scored token
    pairs = [(Encoded([1, 5, 6, 7, 2], 3, False), Encoded([1, 2, 9, 2, 2, 2], 2, False))]
    row = pack_row(pairs)
    assert row.targets.tolist() == [7, 2, 9, 2, 2, 2]
    assert row.sequence.tolist() == [0, 0, 1, 1, 1, 1]


def test_length_order_covers_every_pair_once_longest_first():
    lengths = [5, 30, 7, 30, 12, 1, 9, 22, 3]  # the two responses of pair i: i tokens of shared prompt each
    pairs = [(Encoded(list(range(n + 2)), 1, False), Encoded(list(range(n + 2)), 1, False)) for n in lengths]
    order = length_order(pairs)
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order[:2] == [1, 3]  # ties by index: deterministic


# ---------------------------------------------------------------------------------------------------------------
# The cache file

def make_cache(path, pairs, K=2, data="data/x.jsonl"):
    chosen, rejected = -torch.rand(K, len(pairs)), -torch.rand(K, len(pairs)) - 1
    refs = [{"name": f"ref{k}"} for k in range(K)]
    meta = {"format": precompute.CACHE_FORMAT["pairs"], "refs": json.dumps(refs), "data": data, "row_pairs": "1",
            "fingerprints": json.dumps([pair_fingerprint(p) for p in pairs])}
    tokens = torch.ones(K, len(pairs))
    precompute._write_safetensors(str(path), {"chosen_logps": chosen, "rejected_logps": rejected, "rows":
                                              torch.arange(len(pairs)), "chosen_tokens": tokens,
                                              "rejected_tokens": tokens}, meta)
    return chosen, rejected


def test_cache_roundtrip_and_deterministic_bytes(tmp_path, pairs_small):
    chosen, rejected = make_cache(tmp_path / "a.safetensors", pairs_small)
    cache = load_cache(str(tmp_path / "a.safetensors"), pairs_small)
    assert torch.equal(cache["chosen_logps"], chosen) and torch.equal(cache["rejected_logps"], rejected)
    assert [r["name"] for r in cache["refs"]] == ["ref0", "ref1"]
    meta = {"format": "x", "b": "2", "a": "1"}
    precompute._write_safetensors(str(tmp_path / "b1"), {"t": chosen}, meta)
    precompute._write_safetensors(str(tmp_path / "b2"), {"t": chosen}, dict(reversed(list(meta.items()))))
    assert (tmp_path / "b1").read_bytes() == (tmp_path / "b2").read_bytes()


def test_mismatched_cache_is_refused(tmp_path, pairs_small):
    path = str(tmp_path / "refs.safetensors")
    make_cache(path, pairs_small)
    changed = [dict(p) for p in pairs_small]
    changed[3]["chosen"] += " Indeed."
    with pytest.raises(CacheMismatchError) as err:
        load_cache(path, changed, data_path="data/new.jsonl")
    message = str(err.value)
    assert path in message and "row 4" in message and "data/new.jsonl" in message
    assert "python precompute.py --data data/new.jsonl --refs ref0 ref1 --out " + path in message
    with pytest.raises(CacheMismatchError, match="holds 8 rows but the data has 7"):
        load_cache(path, pairs_small[:7])
    with pytest.raises(CacheMismatchError, match="holds 8 rows but the data has 9"):
        load_cache(path, pairs_small + pairs_small[:1])
    precompute._write_safetensors(path, {"chosen_logps": torch.zeros(1, 8)}, {"format": "other"})
    with pytest.raises(CacheMismatchError, match="not an mrpo reference cache"):
        load_cache(path, pairs_small)
    # sets are attended otherwise than when the pairs' format was written: a sets cache of that format is refused
    precompute._write_safetensors(path, {"logps": torch.zeros(1, 8, 3)}, {"format": precompute.CACHE_FORMAT["pairs"],
                                                                          "kind": "sets"})
    with pytest.raises(CacheMismatchError, match=f"expected '{precompute.CACHE_FORMAT['sets']}'"):
        load_cache(path, pairs_small)


# ---------------------------------------------------------------------------------------------------------------
# Real models: the split, and batched == one at a time

def slow_logp(model, encoded):
    """One sequence, no padding, full log-softmax, Python sum over the response positions."""
    with torch.no_grad():
        logits = model(torch.tensor([encoded.ids])).logits[0].float().log_softmax(-1)
    return sum(float(logits[t - 1, encoded.ids[t]]) for t in range(encoded.start, len(encoded.ids)))


@pytest.mark.parametrize("family", ["smollm2", "gemma3", "qwen"])
def test_batched_equals_one_at_a_time(request, family, pairs_small):
    model, tokenizer = request.getfixturevalue(family)
    encoded = precompute.encode_pairs(tokenizer, pairs_small)  # 8 pairs of different lengths, one batch
    assert len({len(e.ids) for pair in encoded for e in pair}) > 3
    with torch.no_grad():
        chosen, rejected = pair_logps(model, encoded)
        batched = torch.stack([chosen, rejected], dim=1).flatten()  # chosen_0, rejected_0, ...
    alone = torch.tensor([slow_logp(model, e) for pair in encoded for e in pair])
    assert torch.allclose(batched, alone, atol=TOL, rtol=0), (batched - alone).abs().max()


@pytest.mark.parametrize("family", ["smollm2", "gemma3", "qwen"])
def test_split_scores_exactly_the_response(request, family, pairs_small):
    model, tokenizer = request.getfixturevalue(family)
    for pair in pairs_small[:4]:
        for field in ("chosen", "rejected"):
            e = encode(tokenizer, pair["prompt"], pair[field])
            assert not e.truncated and not e.straddled
            # no response token lost and nothing but the response (+ end of turn: <|im_end|> = EOS, or EOS) scored
            assert tokenizer.decode(e.ids[e.start:]) == pair[field] + tokenizer.eos_token
            # no prompt token scored: everything before start is the prompt in the model's own format
            if family in ("smollm2", "qwen"):  # chat models: the prompt is the rendered user turn
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}],
                                                         tokenize=False, add_generation_prompt=True)
                assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")
            else:
                rendered = tokenizer.bos_token + pair["prompt"]
                assert e.ids[0] == tokenizer.bos_token_id == 2  # Gemma needs BOS
            assert tokenizer.decode(e.ids[:e.start]) == rendered
            assert e.ids[-1] == tokenizer.eos_token_id
            assert pack_row([(e, e)]).targets.tolist() == e.ids[e.start:] * 2  # scored: the response, both sides


def test_chat_split_matches_full_render(smollm2, pairs_small):
    """Under the chat template, prompt + response tokens decode to the full conversation minus template filler."""
    _, tokenizer = smollm2
    pair = pairs_small[0]
    e = encode(tokenizer, pair["prompt"], pair["chosen"])
    full = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]},
                                          {"role": "assistant", "content": pair["chosen"]}], tokenize=False)
    assert full == tokenizer.decode(e.ids) + "\n"  # the "\n" after <|im_end|> is filler, not scored


@pytest.mark.parametrize("family", ["smollm2", "gemma3"])
def test_conversational_rows(request, family):
    _, tokenizer = request.getfixturevalue(family)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    chosen = [{"role": "assistant", "content": "Paris."}]
    e = encode(tokenizer, prompt, chosen)
    if family == "smollm2":  # a string row is the same as one user and one assistant message
        assert e == encode(tokenizer, prompt[0]["content"], chosen[0]["content"])
        assert tokenizer.decode(e.ids[e.start:]) == "Paris." + tokenizer.eos_token
    else:  # no chat template: rendered as plain "User: ...\nAssistant:" text
        assert tokenizer.decode(e.ids[:e.start]) == "<bos>User: What is the capital of France?\nAssistant:"
        assert tokenizer.decode(e.ids[e.start:]) == " Paris." + tokenizer.eos_token


def test_truncation_keeps_prompt_end_and_response_start(smollm2):
    _, tokenizer = smollm2
    prompt = "Question: " + " ".join(f"word{i}" for i in range(200)) + "\nAnswer:"
    response = " " + " ".join(f"reply{i}" for i in range(200))
    full = encode(tokenizer, prompt, response, max_length=4096, max_prompt_length=2048)
    e = encode(tokenizer, prompt, response, max_length=120, max_prompt_length=80)
    assert e.truncated and not full.truncated
    assert len(e.ids) == 120 and e.start == 80
    assert e.ids[0] == tokenizer.bos_token_id  # BOS kept
    assert e.ids[1:80] == full.ids[full.start - 79:full.start]  # the END of the prompt
    assert e.ids[80:] == full.ids[full.start:full.start + 40]  # the START of the response (EOS cut away)
    short = encode(tokenizer, "Question: Hi?\nAnswer:", response, max_length=120, max_prompt_length=80)
    assert short.truncated and short.ids[:short.start] == encode(tokenizer, "Question: Hi?\nAnswer:", " x").ids[
        :short.start]  # a short prompt is kept whole; the response fills the rest
    assert len(short.ids) == 120


def test_pair_logps_is_differentiable_and_float32(smollm2, pairs_small):
    model, tokenizer = smollm2
    encoded = precompute.encode_pairs(tokenizer, pairs_small[:2])
    logps = torch.cat(pair_logps(model, encoded))
    assert logps.requires_grad and logps.dtype == torch.float32
    weight = model.get_input_embeddings().weight
    grad, = torch.autograd.grad(logps.sum(), weight)
    assert grad.abs().sum() > 0
    bf16, _ = precompute.load_model("smollm2", dtype="bf16")
    with torch.no_grad():
        logps_bf16 = torch.cat(pair_logps(bf16, encoded))
    assert logps_bf16.dtype == torch.float32
    assert torch.allclose(logps_bf16, logps.detach(), atol=0.5 + 0.05 * logps.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# The command line: resume, truncation report, smoke test

def run_main(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["precompute.py"] + argv)
    precompute.main()


def test_resume_gives_identical_file(tmp_path, monkeypatch, capsys, pairs_small, smollm2):
    data = write_lines(tmp_path / "six.jsonl", [json.dumps(p) for p in pairs_small[:6]])
    common = ["--data", data, "--refs", "smollm2", "--batch-size", "2"]
    straight, resumed = str(tmp_path / "straight.safetensors"), str(tmp_path / "resumed.safetensors")
    run_main(monkeypatch, common + ["--out", straight])
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, common + ["--out", resumed, "--stop-after-batches", "2"])
    assert stop.value.code == 3 and not os.path.exists(resumed)
    assert os.path.exists(resumed + ".partial/ref0.safetensors")
    run_main(monkeypatch, common + ["--out", resumed])
    assert "(resumed)" not in capsys.readouterr().out  # 4 of 6 batches were still to do
    assert open(straight, "rb").read() == open(resumed, "rb").read()
    assert not os.path.exists(resumed + ".partial")
    # the cache holds what pair_logps gives for the same rows
    cache = load_cache(straight, read_pairs(data))
    model, tokenizer = smollm2
    with torch.no_grad():
        chosen, _ = pair_logps(model, [(encode(tokenizer, p["prompt"], p["chosen"]),
                                        encode(tokenizer, p["prompt"], p["rejected"])) for p in pairs_small[:6]])
    assert torch.allclose(cache["chosen_logps"][0], chosen, atol=TOL, rtol=0)
    assert cache["refs"][0]["name"] == "smollm2" and cache["refs"][0]["format"] == "chat_template"


def test_truncation_is_reported(tmp_path, monkeypatch, capsys, pairs_small):
    data = write_lines(tmp_path / "four.jsonl", [json.dumps(p) for p in pairs_small[:4]])
    out = str(tmp_path / "refs.safetensors")
    run_main(monkeypatch, ["--data", data, "--refs", "smollm2", "--out", out, "--max-length", "40",
                           "--max-prompt-length", "30"])
    captured = capsys.readouterr()
    assert "smollm2: 4 of 4 rows truncated" in captured.err
    assert "truncated 4" in captured.out
    assert load_cache(out, read_pairs(data))["refs"][0]["truncated_rows"] == 4


def test_cli_smoke(tmp_path, pairs_small):
    data = write_lines(tmp_path / "three.jsonl", [json.dumps(p) for p in pairs_small[:3]])
    out = tmp_path / "refs.safetensors"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "precompute.py"), "--data", data, "--refs",
                             "smollm2", "--out", str(out), "--batch-size", "4"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: 3 pairs x 1 refs")
    cache = load_cache(str(out), read_pairs(data))
    assert cache["chosen_logps"].shape == (1, 3) and torch.all(cache["chosen_logps"] < 0)
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, '{"prompt": "Q", "chosen": "a"}'])
    result = subprocess.run([sys.executable, os.path.join(ROOT, "precompute.py"), "--data", bad, "--out",
                             str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and f"{bad}:2: field 'rejected' is missing" in result.stderr


def test_not_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not UTF-8")):
        read_pairs(str(path))


def test_device_auto_is_the_default_and_means_cuda_else_cpu(tmp_path, monkeypatch, tiny_refs):
    """--device auto, as in train.py and eval.py (precompute.resolve_device for all three); it is the default."""
    assert precompute.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert precompute.resolve_device("cpu") == torch.device("cpu")
    data, cache, models = tiny_refs
    out = str(tmp_path / "refs.safetensors")
    run_main(monkeypatch, ["--data", data, "--refs", *models, "--out", out, "--device", "auto"])
    assert open(out, "rb").read() == open(cache, "rb").read()  # the fixture's cache, made without --device
