"""Shared test setup: no network, real data and the real tokenizer.

The data (the chapter's datasets and GPT-2's two tokenizer files) is found in
`../shared/data` beside the repository when present, else in the folder the environment
variable CH07_TEST_DATA names, else it is downloaded once into a user cache folder, each file
verified by its sha256 (see `find_test_data`). With the data on disk no test touches the network.

On a reader's machine tiktoken downloads its two GPT-2 files on first use. Here we seed a
tiktoken cache folder from the data's gpt2-tokenizer folder before any test imports tiktoken.
tiktoken names each cached file by the SHA-1 of its download URL.
"""

import atexit
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat modules live at the repository root

from instructkit.instruction_data import CHAPTER_DATASET, PREFERENCE_DATASET  # noqa: E402 (needs the path above)

TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
DATA_ENV_VAR = "CH07_TEST_DATA"
# The test data: path in the data folder -> (URLs in order, sha256).
TEST_DATA_FILES = {
    **{d.file_name: (d.urls, d.sha256) for d in (CHAPTER_DATASET, PREFERENCE_DATASET)},
    "instruction-data-with-response.json": (  # beside the chapter's data in the book's repository
        [url.replace(CHAPTER_DATASET.file_name, "instruction-data-with-response.json")
         for url in CHAPTER_DATASET.urls],
        "aced320504c77c98d957316eb9f3460945256226c36b5e9752bf7d49585eb943"),
    "gpt2-tokenizer/encoder.json": (
        [TIKTOKEN_URL + "encoder.json"], "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2-tokenizer/vocab.bpe": (
        [TIKTOKEN_URL + "vocab.bpe"], "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def user_cache_folder():
    """Where downloaded test data is kept between runs (per user, outside the repository)."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llms-from-scratch-ch07" / "test-data"


def find_test_data(shared=ROOT.parent / "shared" / "data", environ=os.environ, cache=None,
                   files=TEST_DATA_FILES):
    """The test data folder: `shared` if it exists, else $CH07_TEST_DATA, else `cache` (default:
    the user cache folder), where missing files are downloaded once and checked by sha256.

    A download that fails is a warning, not an error: the tests needing that file skip.
    """
    if shared.is_dir():
        return shared
    if environ.get(DATA_ENV_VAR):
        return Path(environ[DATA_ENV_VAR])
    from instructkit.downloads import DownloadError, download_first

    cache = Path(cache) if cache is not None else user_cache_folder()
    for name, (urls, sha256) in files.items():
        if not (cache / name).is_file():
            try:
                download_first(urls, cache / name, sha256=sha256)
            except DownloadError as err:
                warnings.warn(f"test data {name} is missing: {err}", stacklevel=2)
    return cache


SHARED_DATA = find_test_data()  # the data folder, wherever it was found
TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"


def _session_temp_folder():
    # Every temporary file of the session (the tests', pytest's, torchrun's, the commands' and
    # notebook kernels') goes in one folder, removed when the session ends: an interrupted or
    # crashed test leaves nothing behind in the system's temporary folder.
    root = tempfile.mkdtemp(prefix="instructkit-tests-")
    for name in ("TMPDIR", "TEMP", "TMP"):  # children: TMPDIR on POSIX, TEMP/TMP on Windows
        os.environ[name] = root
    tempfile.tempdir = root
    atexit.register(shutil.rmtree, root, ignore_errors=True)


_session_temp_folder()


def _seed_tiktoken_cache():
    if not TOKENIZER_DIR.is_dir() or "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
    for name in ("encoder.json", "vocab.bpe"):
        key = hashlib.sha1((TIKTOKEN_URL + name).encode()).hexdigest()
        shutil.copyfile(TOKENIZER_DIR / name, cache / key)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # inherited by notebook kernels and CLIs


_seed_tiktoken_cache()


def _native_decode_folder():
    # fast_gpt's native decode step is compiled once per session into the session's folder
    # (not the user's cache), for the tests and every command or kernel they start.
    os.environ.setdefault("INSTRUCTKIT_NATIVE_DIR", tempfile.mkdtemp(prefix="native-decode-"))


_native_decode_folder()


def _let_children_hear_ctrl_c():
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: every command a test starts would then shrug off the
    # Ctrl-C the interrupt tests send. A handled signal is reset to its default on exec, so
    # handling it here gives each child Python's usual KeyboardInterrupt again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_let_children_hear_ctrl_c()


@pytest.fixture(scope="session")
def shared_data():
    missing = [name for name in TEST_DATA_FILES if not (SHARED_DATA / name).is_file()]
    if missing:
        pytest.skip(f"test data missing in {SHARED_DATA}: {', '.join(missing)} (no ../shared/data, "
                    f"no {DATA_ENV_VAR} folder, and the download failed)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def instruction_data(shared_data):
    """The chapter's 1,100 entries, loaded from the local copy."""
    with open(shared_data / "instruction-data.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def data_file(instruction_data, tmp_path_factory):
    """The chapter's first 40 entries as a JSON file (34 train, 4 test, 2 validation): the
    small data the command-line runs finetune on. Read only."""
    path = tmp_path_factory.mktemp("data") / "data.json"
    path.write_text(json.dumps(instruction_data[:40]), encoding="utf-8")
    return path


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


@pytest.fixture
def fresh_decode_state(monkeypatch):
    """Decoding as a fresh process has it, before and after the test: no --decode-matvec mode,
    no INSTRUCTKIT_DECODE_MATVEC, no cached calibration, the native library not yet loaded."""
    from instructkit import native_decode
    from instructkit import parallel_matvec as pm

    def reset():
        pm.set_mode(None)
        pm.reset_calibration()
        native_decode.reset()

    monkeypatch.delenv(pm.ENV_VAR, raising=False)
    reset()
    yield
    reset()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's spinning makes
    them many times slower: one thread for a test module, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
