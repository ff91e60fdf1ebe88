"""Download OpenAI's GPT-2 checkpoints and read them into NumPy arrays (chapter 7, section 7.5).

`download_and_load_gpt2("355M", "gpt2")` fetches the seven checkpoint files into `gpt2/355M`
(resuming interrupted downloads, reusing finished ones without touching the network) and
returns `(settings, params)`: the model's `hparams.json` and a nested dict of weight arrays.
TensorFlow is needed only to read the checkpoint, and is imported only then.
"""

import http.client
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

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
TIMEOUT_S = 30  # per connection attempt and per read, not for the whole file
CHUNK_SIZE = 1 << 20
PART_SUFFIX = ".part"


class DownloadError(RuntimeError):
    """A file could not be downloaded (completely) from any source."""


class CheckpointError(RuntimeError):
    """The checkpoint on disk is missing, truncated or not a GPT-2 checkpoint."""


def download_and_load_gpt2(model_size, models_dir, mirror_url=None, *, base_urls=None):
    """Fetch the GPT-2 checkpoint `model_size` into `models_dir/model_size` and load it.

    Sources, in order: `mirror_url` (else the GPT2_MIRROR_URL environment variable), then
    `base_urls` (default: OpenAI's server, then the book's backup). Each source serves the
    files at `<base>/<model_size>/<file>`. Returns `(settings, params)`.
    """
    download_gpt2_files(model_size, models_dir, mirror_url, base_urls=base_urls)
    return load_gpt2(Path(models_dir) / model_size)


def download_gpt2_files(model_size, models_dir, mirror_url=None, *, base_urls=None):
    """Make sure the seven checkpoint files are complete in `models_dir/model_size`.

    Files already there are kept as they are (no network access at all): a file only ever
    gets its final name after a complete download. Returns the model folder.
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}; got {model_size!r}")
    model_dir = Path(models_dir) / model_size
    missing = [name for name in FILENAMES if not (model_dir / name).is_file()]
    if not missing:
        return model_dir

    if mirror_url is None:
        mirror_url = os.environ.get(MIRROR_ENV_VAR) or None
    if base_urls is None:
        base_urls = (PRIMARY_BASE_URL, BACKUP_BASE_URL)
    sources = ([mirror_url] if mirror_url else []) + list(base_urls)

    model_dir.mkdir(parents=True, exist_ok=True)
    for name in missing:
        failures = []
        for base in sources:
            url = f"{base.rstrip('/')}/{model_size}/{name}"
            try:
                download_file(url, model_dir / name)
                break
            except (OSError, http.client.HTTPException, DownloadError) as err:
                failures.append((url, _reason(err)))
        else:
            raise DownloadError(_failure_message(name, model_dir, failures))
    return model_dir


def download_file(url, destination, *, timeout=TIMEOUT_S, chunk_size=CHUNK_SIZE):
    """Download `url` to `destination` through `<destination>.part`, resuming that if present.

    The temporary file is renamed to `destination` only once its size matches the size the
    server announced. Raises DownloadError (or urllib's errors) otherwise, leaving the
    partial file in place for the next attempt to resume.
    """
    destination = Path(destination)
    part = destination.with_name(destination.name + PART_SUFFIX)
    for _ in range(2):  # a second pass only after discarding a partial file the server rejects
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "gpt_download.py"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # the partial file is not a prefix of this file
                err.close()
                part.unlink()
                continue
            raise
        with response:
            length = _int_header(response, "Content-Length")
            if offset and response.status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    part.unlink()
                    continue
                if total is None and length is not None:
                    total = offset + length
                mode = "ab"
            else:  # 200: the server ignored the Range header, so start again from zero
                offset, total, mode = 0, length, "wb"
            with (
                open(part, mode) as file,
                tqdm(
                    total=total, initial=offset, unit="iB", unit_scale=True, desc=destination.name
                ) as progress,
            ):
                while chunk := response.read(chunk_size):
                    file.write(chunk)
                    progress.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"incomplete download: {size:,} of {total:,} bytes")
        part.replace(destination)
        return destination
    raise DownloadError("the server rejected resuming the partial download twice")


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
            "Reading OpenAI's GPT-2 checkpoint needs TensorFlow: pip install tensorflow (or tensorflow-cpu)"
        ) from err
    return tf


def _int_header(response, name):
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


def _parse_content_range(value):
    """`bytes 100-199/200` -> (100, 200); the total is None when the server sends `*`."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    total = match.group(2)
    return int(match.group(1)), None if total == "*" else int(total)


def _reason(err):
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot connect: {err.reason}"
    if isinstance(err, DownloadError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _failure_message(name, model_dir, failures):
    tried = "\n".join(f"  {url}: {reason}" for url, reason in failures)
    return (
        f"could not download {name!r} from any source. Tried:\n{tried}\n"
        "Check your internet connection and run it again (a partial download resumes), "
        f"or set the {MIRROR_ENV_VAR} environment variable (or pass mirror_url=) to a mirror "
        f"serving <mirror>/<model size>/<file>, or place the files by hand in {model_dir}."
    )
