"""Download GPT-2's weights and read them into NumPy arrays (chapter 7, section 7.5).

`download_and_load_gpt2("355M", "gpt2")` fetches the weights into `gpt2/355M` (resuming
interrupted downloads, reusing finished ones without touching the network) and returns
`(settings, params)`: the model's `hparams.json` and a nested dict of weight arrays, in
OpenAI's layout, whichever source the weights came from, so the book's
`load_weights_into_gpt(gpt, params)` loads them all.

Not in the book: three sources (`WEIGHT_SOURCES`):
- "openai": OpenAI's TensorFlow checkpoint (seven files; TensorFlow needed to read it);
- "hub-book": the book's PyTorch state dicts on the Hugging Face hub
  (`rasbt/gpt2-from-scratch-pytorch`, `.safetensors` preferred, `.pth` read with weights_only);
- "hub-openai": OpenAI's weights as converted on the hub (`openai-community/gpt2`, ...).
"auto" takes whatever is complete on disk, else "hub-openai", which needs no TensorFlow.
This file holds the choice and OpenAI's source; the hub sources are in hub_weights.py
(`HF_ENDPOINT` names a mirror), the resumable downloads in downloads.py, and the tokenizer
built from the vocabulary files downloaded with the weights in gpt2_tokenizer.py. Their
public names stay importable from here.
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from instructkit.downloads import (  # noqa: F401 (importable from here, as before the split)
    CheckpointError,
    DownloadError,
    describe_failure,
    download_file,
    download_first,
    file_sha256,
)
from instructkit.gpt2_sizes import GPT2_SIZES
from instructkit.gpt2_tokenizer import GPT2_PAT_STR, gpt2_bpe_ranks, tokenizer_from_folder  # noqa: F401
from instructkit.hub import (  # noqa: F401
    BOOK_HUB_REPO,
    HF_DEFAULT_ENDPOINT,
    HF_ENDPOINT_ENV_VAR,
    HUB_OPENAI_WEIGHTS,
    HUB_SOURCES,
    HUB_TOKENIZER_FILES,
    OPENAI_HUB_REPOS,
    download_hub_files,
    files_present,
    hub_files,
    load_hub_weights,
)

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
FILENAMES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
PRIMARY_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BACKUP_BASE_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
MIRROR_ENV_VAR = "GPT2_MIRROR_URL"
# Byte sizes of OpenAI's files, checked before a download gets its final name. From the book's
# own download tests (rasbt/LLMs-from-scratch, ch05/01_main-chapter-code/tests.py) for 124M
# and 355M. encoder.json, vocab.bpe and checkpoint are the same three files in every folder
# (equal sizes in both lists; the checkpoint file's 77 bytes are two fixed lines). For 774M and
# 1558M two more sizes follow from the published ones (tests/test_gpt_download.py checks that they
# give the 124M and 355M numbers): model.ckpt.data holds the float32 parameters and nothing
# else (4 bytes x 124,439,808 and x 354,823,168 parameters), and hparams.json is the five
# settings as json.dumps(..., indent=2) writes them, with a newline. Their .index and .meta
# files are checked against the length the server announces only. No sha256 is published.
_SAME_IN_EVERY_FOLDER = {"checkpoint": 77, "encoder.json": 1042301, "vocab.bpe": 456318}
OPENAI_FILE_SIZES = {
    "124M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 90, "model.ckpt.data-00000-of-00001": 497759232,
             "model.ckpt.index": 5215, "model.ckpt.meta": 471155},
    "355M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 91, "model.ckpt.data-00000-of-00001": 1419292672,
             "model.ckpt.index": 10399, "model.ckpt.meta": 926519},
    "774M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 91,
             "model.ckpt.data-00000-of-00001": 3096120320},  # 774,030,080 parameters
    "1558M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 91,
              "model.ckpt.data-00000-of-00001": 6230444800},  # 1,557,611,200 parameters
}

WEIGHT_SOURCES = ("auto", "openai") + HUB_SOURCES


def download_and_load_gpt2(model_size, models_dir, mirror_url=None, *, base_urls=None, source="auto",
                           hub_endpoint=None, expected_sizes=None):
    """Fetch GPT-2 `model_size` ('124M' ... '1558M') into `models_dir/model_size` and load it.

    `source` is one of WEIGHT_SOURCES (see `choose_weights_source`). For "openai" the sources
    are, in order: `mirror_url` (else the GPT2_MIRROR_URL environment variable), then
    `base_urls` (default: OpenAI's server, then the book's backup), each serving
    `<base>/<model_size>/<file>`, each file checked against `expected_sizes` (default: the
    known sizes, OPENAI_FILE_SIZES). The hub sources use `hub_endpoint` (else HF_ENDPOINT,
    else huggingface.co). Returns `(settings, params)` in OpenAI's layout for every source.
    """
    source, path = download_gpt2(model_size, models_dir, source, mirror_url=mirror_url,
                                 base_urls=base_urls, hub_endpoint=hub_endpoint,
                                 expected_sizes=expected_sizes)
    return load_gpt2(path) if source == "openai" else load_hub_weights(path)


def download_gpt2(model_size, models_dir, source="auto", *, mirror_url=None, base_urls=None,
                  hub_endpoint=None, expected_sizes=None):
    """The download half of `download_and_load_gpt2` (same arguments): `(source, path)`, the
    concrete source and its files on disk (OpenAI's folder, or a hub weights file), with
    the tokenizer's files beside them. Nothing is read, so no TensorFlow is needed yet."""
    source = choose_weights_source(source, model_size, models_dir)
    if source == "openai":
        return source, download_gpt2_files(model_size, models_dir, mirror_url, base_urls=base_urls,
                                           expected_sizes=expected_sizes)
    return source, download_hub_files(model_size, models_dir, source, hub_endpoint)


def choose_weights_source(source, model_size, models_dir):
    """The concrete source for `source`: itself, or for "auto" the first source complete on
    disk in `models_dir/model_size` (no network needed), else "hub-openai" (no TensorFlow)."""
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"source must be one of {', '.join(WEIGHT_SOURCES)}; got {source!r}")
    _check_model_size(model_size)
    if source != "auto":
        return source
    model_dir = Path(models_dir) / model_size
    for candidate in WEIGHT_SOURCES[1:]:
        files = [(name,) for name in FILENAMES] if candidate == "openai" else hub_files(candidate, model_size)
        if all(files_present(model_dir, names) for names in files):
            return candidate
    return "hub-openai"


def download_gpt2_files(model_size, models_dir, mirror_url=None, *, base_urls=None, expected_sizes=None):
    """Make sure OpenAI's seven checkpoint files are complete in `models_dir/model_size`.

    Files already there are kept as they are (no network access at all): a file only ever
    gets its final name after a complete download of the expected size. Returns the folder.
    """
    _check_model_size(model_size)
    model_dir = Path(models_dir) / model_size
    missing = [name for name in FILENAMES if not (model_dir / name).is_file()]
    if not missing:
        return model_dir

    if mirror_url is None:
        mirror_url = os.environ.get(MIRROR_ENV_VAR) or None
    if base_urls is None:
        base_urls = (PRIMARY_BASE_URL, BACKUP_BASE_URL)
    if expected_sizes is None:
        expected_sizes = OPENAI_FILE_SIZES[model_size]
    sources = ([mirror_url] if mirror_url else []) + list(base_urls)
    advice = (f"or set the {MIRROR_ENV_VAR} environment variable (or pass mirror_url=) to a mirror "
              f"serving <mirror>/<model size>/<file>, or choose a hub source (source='hub-openai')")
    for name in missing:
        urls = [f"{base.rstrip('/')}/{model_size}/{name}" for base in sources]
        download_first(urls, model_dir / name, expected_size=expected_sizes.get(name), advice=advice)
    return model_dir


def _check_model_size(model_size):
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}; got {model_size!r}")


def load_gpt2(model_dir):
    """Read `hparams.json` and the TensorFlow checkpoint in `model_dir`: `(settings, params)`."""
    model_dir = Path(model_dir)
    hparams = model_dir / "hparams.json"
    try:
        settings = json.loads(hparams.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{hparams} does not exist: no GPT-2 model in {model_dir}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{hparams} is corrupt ({err}); delete the folder {model_dir} to download it again"
        ) from None
    return settings, load_gpt2_params_from_tf_ckpt(model_dir, settings)


def load_gpt2_params_from_tf_ckpt(ckpt_path, settings):
    """Read every `model/...` variable of a GPT-2 TensorFlow checkpoint into nested dicts.

    `ckpt_path` is a checkpoint prefix (`.../model.ckpt`) or the folder holding it. Returns
    `{"wte", "wpe", "g", "b", "blocks": [per-layer dicts]}` with singleton dimensions squeezed.
    """
    tf = _import_tensorflow()
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        model_dir = ckpt_path
        latest = tf.train.latest_checkpoint(str(model_dir))
        if latest is None:
            raise CheckpointError(
                f"no TensorFlow checkpoint in {model_dir} (it needs the files 'checkpoint' and "
                "'model.ckpt.*'); download it with download_and_load_gpt2"
            )
        ckpt_path = Path(latest)
    else:
        model_dir = ckpt_path.parent

    n_layer = settings["n_layer"]
    params = {"blocks": [{} for _ in range(n_layer)]}
    try:
        for name, _ in tf.train.list_variables(str(ckpt_path)):
            if not name.startswith("model/"):
                continue
            array = np.squeeze(tf.train.load_variable(str(ckpt_path), name))
            _insert(params, name, array, n_layer)
    except CheckpointError:
        raise
    except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as err:
        # TensorFlow's reader raises OpError subclasses, or ValueError, IndexError (a short
        # read) or RuntimeError translated from its C++ status codes.
        summary = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read the checkpoint {ckpt_path} ({type(err).__name__}: {summary}). "
            f"The files in {model_dir} are probably truncated or corrupt: "
            "delete that folder and run the download again."
        ) from None

    missing = [key for key in ("wte", "wpe", "g", "b") if key not in params]
    missing += [f"model/h{i}" for i, block in enumerate(params["blocks"]) if not block]
    if missing:
        raise CheckpointError(
            f"the checkpoint {ckpt_path} lacks {', '.join(missing)}; is it a GPT-2 checkpoint "
            f"with n_layer={n_layer}?"
        )
    return params


def check_hparams(settings, model, where="hparams.json"):
    """Raise CheckpointError when `settings` (OpenAI's hparams) are not GPT-2 size `model`.

    `model` is any name of a GPT-2 size ('gpt2-small', 'gpt2-small (124M)' or '124M').
    """
    short = next(s for s, (book, folder, *_) in GPT2_SIZES.items() if model in (s, book, folder))
    _, _, emb_dim, n_layers, n_heads = GPT2_SIZES[short]
    found = (settings.get("n_embd"), settings.get("n_layer"), settings.get("n_head"))
    if found != (emb_dim, n_layers, n_heads):
        actual = next((s for s, (_, _, e, n, h) in GPT2_SIZES.items() if (e, n, h) == found), None)
        advice = f"choose {actual}, or" if actual else "not a GPT-2 size:"
        raise CheckpointError(
            f"{where} says n_embd {found[0]}, n_layer {found[1]}, n_head {found[2]} "
            f"({actual or 'no GPT-2 size'}), but {short} was chosen: {advice} delete that "
            f"folder to download {short}"
        )


def check_checkpoint_folder(model_dir, model):
    """Before any download: if `model_dir` holds an `hparams.json`, it must be GPT-2 size `model`.

    Cheap, so a command line can run it first. Returns the settings, or None without the file.
    """
    hparams = Path(model_dir) / "hparams.json"
    if not hparams.is_file():
        return None
    try:
        settings = json.loads(hparams.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{hparams} is corrupt ({err}); delete the folder {model_dir}") from None
    check_hparams(settings, model, where=str(hparams))
    return settings


def _insert(params, name, array, n_layer):
    """Put one checkpoint variable, e.g. `model/h3/attn/c_attn/w`, in its place in `params`."""
    parts = name.split("/")[1:]
    target = params
    if re.fullmatch(r"h\d+", parts[0]):
        layer = int(parts[0][1:])
        if layer >= n_layer:
            raise CheckpointError(f"checkpoint variable {name} but hparams say n_layer={n_layer}")
        target, parts = params["blocks"][layer], parts[1:]
    elif parts[0] == "ln_f":  # the final layer norm goes to params["g"], params["b"]
        parts = parts[1:]
    for key in parts[:-1]:
        target = target.setdefault(key, {})
    target[parts[-1]] = array


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up chatter
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            "Reading OpenAI's TensorFlow checkpoint (weights source 'openai') needs TensorFlow: "
            "pip install -r requirements-tf.txt (Python 3.10-3.13). Or choose a source that needs "
            "no TensorFlow: source='hub-openai' or 'hub-book' (command line: --weights-source hub-openai)."
        ) from err
    return tf
