"""Shared test setup: no network, real data and the real tokenizer from ../shared/data.

On a reader's machine tiktoken downloads its two GPT-2 files on first use. Here the network
is closed, so we seed a tiktoken cache folder from ../shared/data/gpt2-tokenizer (when it
exists) before any test imports tiktoken. tiktoken names each cached file by the SHA-1 of
its download URL.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"

sys.path.insert(0, str(ROOT))  # the flat modules live at the repository root


def _seed_tiktoken_cache():
    if not TOKENIZER_DIR.is_dir() or "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    for name in ("encoder.json", "vocab.bpe"):
        key = hashlib.sha1((TIKTOKEN_URL + name).encode()).hexdigest()
        shutil.copyfile(TOKENIZER_DIR / name, cache / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # inherited by notebook kernels and CLIs


_seed_tiktoken_cache()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def instruction_data(shared_data):
    """The chapter's 1,100 entries, loaded from the local copy."""
    with open(shared_data / "instruction-data.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tokenizer():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def tiny_cfg():
    """A GPT small enough for unit tests (the real vocabulary, so real token ids work)."""
    return {
        "vocab_size": 50257,
        "context_length": 64,
        "emb_dim": 32,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": True,
    }


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's spinning makes
    them many times slower: one thread for a test module, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
