"""Where GPT-2's pretrained weights come from, and whether the files on disk are whole.

Not in the book. The machinery behind the book's three functions in gpt_download.py
(`download_and_load_gpt2`, `download_file`, `load_gpt2_params_from_tf_ckpt`):
- the weight sources, `WEIGHT_SOURCES`, and the choice among them (`choose_weights_source`):
  "openai" is OpenAI's TensorFlow checkpoint (seven files, TensorFlow needed to read it);
  "hub-book" and "hub-openai" are copies on the Hugging Face hub (hub.py), read without
  TensorFlow; "auto" takes whatever is complete on disk, else "hub-openai";
- OpenAI's seven files: the hosts to try (`openai_base_urls`, with a mirror first), their
  known sizes (`OPENAI_FILE_SIZES`), one file's download (`download_gpt2_file`), and the
  download alone, before anything is read (`download_gpt2`, for the command lines);
- reading them safely: `import_tensorflow`, `read_hparams`, and `checked_tf_checkpoint` around
  the book's reading loop, so that a cut or damaged checkpoint is one clear CheckpointError;
- checks before a run: `check_hparams`, `check_checkpoint_folder`.
The resumable downloads themselves are in downloads.py. This module never imports
gpt_download.py, which imports it.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

from instructkit.downloads import download_first
from instructkit.errors import CheckpointError
from instructkit.file_checks import check_reusable
from instructkit.gpt2_sizes import GPT2_SIZES
from instructkit.hub import HUB_SOURCES, download_hub_files, files_present, hub_files

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
# The book's two hosts (gpt_download.download_and_load_gpt2 names them too; a test checks that
# both places agree).
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
OPENAI_ADVICE = (f"or set the {MIRROR_ENV_VAR} environment variable (or pass mirror_url=) to a mirror "
                 f"serving <mirror>/<model size>/<file>, or choose a hub source (source='hub-openai')")

WEIGHT_SOURCES = ("auto", "openai") + HUB_SOURCES


#####################################
# Which source
#####################################

def choose_weights_source(source, model_size, models_dir):
    """The concrete source for `source`: itself, or for "auto" the first source complete on
    disk in `models_dir/model_size` (no network needed), else "hub-openai" (no TensorFlow)."""
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"source must be one of {', '.join(WEIGHT_SOURCES)}; got {source!r}")
    check_model_size(model_size)
    if source != "auto":
        return source
    model_dir = Path(models_dir) / model_size
    for candidate in WEIGHT_SOURCES[1:]:
        files = [(name,) for name in FILENAMES] if candidate == "openai" else hub_files(candidate, model_size)
        if all(files_present(model_dir, names) for names in files):
            return candidate
    return "hub-openai"


def check_model_size(model_size):
    """ValueError naming the four sizes unless `model_size` is OpenAI's folder name of one."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}; got {model_size!r}")


#####################################
# Downloading OpenAI's files
#####################################

def download_gpt2(model_size, models_dir, source="auto", *, mirror_url=None, base_urls=None,
                  hub_endpoint=None, expected_sizes=None):
    """Download GPT-2 `model_size` from `source` (one of WEIGHT_SOURCES), reading nothing.

    The same arguments as gpt_download.download_and_load_gpt2, which also reads the files;
    this half needs no TensorFlow, so a command can download first and read later. Returns
    `(source, path)`: the concrete source and its files on disk (OpenAI's folder, or a hub
    weights file), with the tokenizer's files beside them. Complete files are kept as they are.
    """
    source = choose_weights_source(source, model_size, models_dir)
    if source == "openai":
        return source, download_gpt2_files(model_size, models_dir, mirror_url, base_urls=base_urls,
                                           expected_sizes=expected_sizes)
    return source, download_hub_files(model_size, models_dir, source, hub_endpoint)


def download_gpt2_files(model_size, models_dir, mirror_url=None, *, base_urls=None, expected_sizes=None):
    """Make sure OpenAI's seven checkpoint files are complete in `models_dir/model_size`.

    Files already there are kept as they are (no network access at all) once they pass their
    checks: a file only ever gets its final name after a complete, checked download of the
    expected size. Returns the folder.
    """
    check_model_size(model_size)
    model_dir = Path(models_dir) / model_size
    hosts = openai_base_urls((PRIMARY_BASE_URL, BACKUP_BASE_URL), mirror_url, base_urls)
    sizes = openai_file_sizes(model_size, expected_sizes)
    for name in FILENAMES:
        urls = [f"{host}/{model_size}/{name}" for host in hosts]
        download_gpt2_file(urls[0], model_dir / name, urls[1:], expected_size=sizes.get(name))
    return model_dir


def openai_base_urls(hosts, mirror_url=None, base_urls=None):
    """The hosts serving `<host>/<model size>/<file>` to try, in order, without trailing slashes.

    A mirror first (`mirror_url`, else the GPT2_MIRROR_URL environment variable), then
    `base_urls` when given, else `hosts` (the book's main host and its backup).
    """
    if mirror_url is None:
        mirror_url = os.environ.get(MIRROR_ENV_VAR) or None
    urls = ([mirror_url] if mirror_url else []) + list(hosts if base_urls is None else base_urls)
    if not urls:
        raise ValueError("no host to download GPT-2's files from: base_urls is empty and no mirror is set")
    return [url.rstrip("/") for url in urls]


def openai_file_sizes(model_size, expected_sizes=None):
    """{file name: bytes} that OpenAI's files of `model_size` must have: `expected_sizes` when
    given (a file it leaves out is checked against the announced length only), else the known
    sizes, OPENAI_FILE_SIZES."""
    return OPENAI_FILE_SIZES[model_size] if expected_sizes is None else expected_sizes


def download_gpt2_file(url, destination, backup_url=None, *, expected_size=None):
    """Make sure `destination` is complete: kept as it is when there, else downloaded.

    A file already at `destination` is used without any network access when it passes the
    content checks a download gets (file_checks.py); a bad one is moved aside
    with a line on stderr and downloaded again. Otherwise the file comes from `url`, else from
    `backup_url` (one URL, or a list tried in order), through `<destination>.part`: a cut
    download resumes on the next attempt, and a file of another size than the server
    announced or `expected_size` is never renamed. Raises DownloadError naming every URL
    tried and why each failed. Returns the path.
    """
    destination = Path(destination)
    if check_reusable(destination):
        return destination
    if backup_url is None:
        backups = []
    elif isinstance(backup_url, str):
        backups = [backup_url]
    else:
        backups = list(backup_url)
    return download_first([url, *backups], destination, expected_size=expected_size, advice=OPENAI_ADVICE,
                          mirror_setting=MIRROR_ENV_VAR)


#####################################
# Reading OpenAI's checkpoint
#####################################

def import_tensorflow():
    """The `tensorflow` module, quiet at start-up; ImportError saying how to install it or
    avoid it (the hub sources) when it is missing."""
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


def read_hparams(model_dir):
    """The settings in `model_dir/hparams.json` (n_vocab, n_ctx, n_embd, n_head, n_layer).

    CheckpointError, one line saying what to do, when the file is missing, cut or damaged.
    """
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
    if not isinstance(settings, dict) or not isinstance(settings.get("n_layer"), int):
        raise CheckpointError(f"{hparams} does not give GPT-2's settings (no n_layer); delete the "
                              f"folder {model_dir} to download it again")
    return settings


# What TensorFlow's checkpoint reader raises on a cut or damaged file: its OpError subclasses
# (DataLossError, ...), or ValueError, IndexError (a short read) or RuntimeError translated
# from its C++ status codes. Only TensorFlow's calls run where these are caught.
def _read_errors(tf):
    return (tf.errors.OpError, ValueError, IndexError, RuntimeError)


@contextmanager
def checked_tf_checkpoint(ckpt_path, settings, params):
    """Around the book's loop that reads a GPT-2 TensorFlow checkpoint into `params`.

    Yields the checkpoint's prefix (`.../model.ckpt`; `ckpt_path` may be that, or the folder
    holding it). Before the loop, the variable names are checked: GPT-2's (`model/...`), and
    no block beyond `settings["n_layer"]`. A TensorFlow error while reading, and a checkpoint
    that leaves part of `params` empty, become one CheckpointError saying what to do.
    """
    tf = import_tensorflow()
    ckpt_path, model_dir = _checkpoint_prefix(tf, ckpt_path)
    try:
        names = [name for name, _ in tf.train.list_variables(ckpt_path)]
    except _read_errors(tf) as err:
        raise _unreadable(ckpt_path, model_dir, err) from None
    n_layer = settings["n_layer"]
    _check_variable_names(names, ckpt_path, n_layer)
    try:
        yield ckpt_path
    except _read_errors(tf) as err:
        raise _unreadable(ckpt_path, model_dir, err) from None

    missing = [key for key in ("wte", "wpe", "g", "b") if key not in params]
    missing += [f"model/h{i}" for i, block in enumerate(params["blocks"]) if not block]
    if missing:
        raise CheckpointError(
            f"the checkpoint {ckpt_path} lacks {', '.join(missing)}; is it a GPT-2 checkpoint "
            f"with n_layer={n_layer}?"
        )


def _checkpoint_prefix(tf, ckpt_path):
    """(checkpoint prefix as a string, its folder) for a prefix or a folder."""
    if ckpt_path is None:  # what tf.train.latest_checkpoint returns for a folder without one
        raise CheckpointError("no TensorFlow checkpoint (tf.train.latest_checkpoint found none); "
                              "download it with download_and_load_gpt2")
    path = Path(ckpt_path)
    if not path.is_dir():
        return str(path), path.parent
    try:
        latest = tf.train.latest_checkpoint(str(path))
    except _read_errors(tf):  # an empty or damaged 'checkpoint' file
        latest = None
    if latest is None:
        raise CheckpointError(
            f"no TensorFlow checkpoint in {path} (it needs the files 'checkpoint' and "
            "'model.ckpt.*', whole: delete the folder and download it again with download_and_load_gpt2)"
        )
    return latest, path


def _check_variable_names(names, ckpt_path, n_layer):
    """CheckpointError unless every name is a GPT-2 weight's, in a block below `n_layer`."""
    for name in names:
        parts = name.split("/")
        if parts[0] != "model" or len(parts) < 2 or (parts[1].startswith("h") and not parts[1][1:].isdigit()):
            raise CheckpointError(f"the checkpoint {ckpt_path} holds {name!r}, not a GPT-2 weight "
                                  "(GPT-2's are model/wte, model/h0/..., model/ln_f/...)")
        if parts[1].startswith("h") and int(parts[1][1:]) >= n_layer:
            raise CheckpointError(f"checkpoint variable {name} but hparams say n_layer={n_layer}")


def _unreadable(ckpt_path, model_dir, err):
    summary = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"cannot read the checkpoint {ckpt_path} ({type(err).__name__}: {summary}). "
        f"The files in {model_dir} are probably truncated or corrupt: "
        "delete that folder and run the download again."
    )


#####################################
# Checks before a run
#####################################

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
    settings = read_hparams(model_dir)
    check_hparams(settings, model, where=str(hparams))
    return settings
