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
Hub files come from `<endpoint>/<repo>/resolve/main/<file>`; the `HF_ENDPOINT` environment
variable names a mirror, as for the hub's own tools. `tokenizer_from_folder(folder)` builds
tiktoken's GPT-2 tokenizer from the vocabulary files downloaded with the weights.
"""

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2_sizes import GPT2_SIZES

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
# (equal sizes in both lists; the checkpoint file's 77 bytes are two fixed lines), so they are
# checked for 774M and 1558M too; those two sizes' other files are checked against the
# length the server announces only. No sha256 is published for these files.
_SAME_IN_EVERY_FOLDER = {"checkpoint": 77, "encoder.json": 1042301, "vocab.bpe": 456318}
OPENAI_FILE_SIZES = {
    "124M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 90, "model.ckpt.data-00000-of-00001": 497759232,
             "model.ckpt.index": 5215, "model.ckpt.meta": 471155},
    "355M": {**_SAME_IN_EVERY_FOLDER, "hparams.json": 91, "model.ckpt.data-00000-of-00001": 1419292672,
             "model.ckpt.index": 10399, "model.ckpt.meta": 926519},
    "774M": dict(_SAME_IN_EVERY_FOLDER),
    "1558M": dict(_SAME_IN_EVERY_FOLDER),
}

WEIGHT_SOURCES = ("auto", "openai", "hub-book", "hub-openai")
HF_ENDPOINT_ENV_VAR = "HF_ENDPOINT"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
BOOK_HUB_REPO = "rasbt/gpt2-from-scratch-pytorch"
# OpenAI's folder name -> the hub repository of OpenAI's converted weights (and tokenizer).
OPENAI_HUB_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
HUB_OPENAI_WEIGHTS = "model.safetensors"
HUB_TOKENIZER_FILES = ("vocab.json", "merges.txt")
GPT2_HEAD_DIM = 64  # every GPT-2 size has 64-wide heads: n_head = n_embd // 64
TIMEOUT_S = 30  # per connection attempt and per read, not for the whole file
CHUNK_SIZE = 1 << 20
PART_SUFFIX = ".part"


class DownloadError(RuntimeError):
    """A file could not be downloaded (completely) from any source."""


class CheckpointError(RuntimeError):
    """The checkpoint on disk is missing, truncated or not a GPT-2 checkpoint."""


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
    source = choose_weights_source(source, model_size, models_dir)
    if source == "openai":
        download_gpt2_files(model_size, models_dir, mirror_url, base_urls=base_urls,
                            expected_sizes=expected_sizes)
        return load_gpt2(Path(models_dir) / model_size)
    weights = download_hub_files(model_size, models_dir, source, hub_endpoint)
    return load_hub_weights(weights)


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
        if all(_present(model_dir, names) for names in _source_files(candidate, model_size)):
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


def download_hub_files(model_size, models_dir, source, hub_endpoint=None):
    """Make sure a hub source's weights and tokenizer files are complete in `models_dir/model_size`.

    `source` is "hub-book" or "hub-openai". Files already there are used without any network
    access. Returns the path of the weights file.
    """
    _check_model_size(model_size)
    endpoint = (hub_endpoint or os.environ.get(HF_ENDPOINT_ENV_VAR) or HF_DEFAULT_ENDPOINT).rstrip("/")
    model_dir = Path(models_dir) / model_size
    advice = (f"or set the {HF_ENDPOINT_ENV_VAR} environment variable to a mirror of the Hugging Face "
              "hub (e.g. HF_ENDPOINT=https://hf-mirror.com)")
    for names in _source_files(source, model_size):
        if _present(model_dir, names):
            continue
        failures = []
        for name in names:  # alternatives, in order of preference
            urls = [f"{endpoint}/{_hub_repo(source, model_size, name)}/resolve/main/{name}"]
            try:
                download_first(urls, model_dir / name, advice=advice)
                break
            except DownloadError as err:
                if not err.not_found:  # a cut or failing download: resume it, not another file
                    raise
                failures.append(str(err))
        else:
            raise DownloadError("\n".join(failures))
    return next(model_dir / name for name in _source_files(source, model_size)[0]
                if (model_dir / name).is_file())


def _source_files(source, model_size):
    """The files a source needs, each as a tuple of alternatives: weights first."""
    if source == "openai":
        return [(name,) for name in FILENAMES]
    if source == "hub-book":
        stem = _book_hub_stem(model_size)
        weights = (f"{stem}.safetensors", f"{stem}.pth")
    elif source == "hub-openai":
        weights = (HUB_OPENAI_WEIGHTS,)
    else:
        raise ValueError(f"not a concrete weights source: {source!r}")
    return [weights] + [(name,) for name in HUB_TOKENIZER_FILES]


def _book_hub_stem(model_size):
    """'124M' -> 'gpt2-small-124M', the book's file names on the hub."""
    return next(f"{short}-{folder}" for short, (_, folder, *_) in GPT2_SIZES.items() if folder == model_size)


def _hub_repo(source, model_size, name):
    if source == "hub-book" and name not in HUB_TOKENIZER_FILES:
        return BOOK_HUB_REPO
    return OPENAI_HUB_REPOS[model_size]  # the tokenizer files sit beside OpenAI's converted weights


def _present(model_dir, names):
    return any((model_dir / name).is_file() for name in names)


def _check_model_size(model_size):
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {', '.join(MODEL_SIZES)}; got {model_size!r}")


def download_first(urls, destination, *, expected_size=None, sha256=None, advice=None):
    """Download `destination` from the first of `urls` that delivers it whole (and verified).

    A cut download resumes from the next URL; a file of the wrong size or sha256 is dropped
    and the next URL tried. Raises DownloadError listing every URL and why it failed.
    """
    failures, not_found = [], True
    for url in urls:
        try:
            return download_file(url, destination, expected_size=expected_size, sha256=sha256)
        except (OSError, http.client.HTTPException, DownloadError) as err:
            failures.append((url, describe_failure(err)))
            not_found &= isinstance(err, urllib.error.HTTPError) and err.code == 404
    error = DownloadError(_failure_message(destination, failures, advice))
    error.not_found = not_found  # every source answered 404: the file does not exist there
    raise error


def download_file(url, destination, *, expected_size=None, sha256=None, timeout=TIMEOUT_S,
                  chunk_size=CHUNK_SIZE):
    """Download `url` to `destination` through `<destination>.part`, resuming that if present.

    The temporary file is renamed to `destination` only once its size matches the size the
    server announced, and `expected_size` and `sha256` when given. A cut download raises
    DownloadError (or urllib's errors) and leaves the partial file for the next attempt to
    resume; a file of the wrong size or hash is deleted, since this source serves another file.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
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
            if expected_size is not None and total is not None and total != expected_size:
                part.unlink(missing_ok=True)
                raise DownloadError(_wrong_size(destination, total, expected_size))
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
        if expected_size is not None and size != expected_size:
            part.unlink()
            raise DownloadError(_wrong_size(destination, size, expected_size))
        if sha256 is not None and (digest := file_sha256(part)) != sha256:
            part.unlink()
            raise DownloadError(f"{destination.name} has sha256 {digest}, expected {sha256}")
        part.replace(destination)
        return destination
    raise DownloadError("the server rejected resuming the partial download twice")


def file_sha256(path):
    """The sha256 hex digest of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _wrong_size(destination, size, expected_size):
    return f"serves {size:,} bytes for {destination.name}, expected {expected_size:,} bytes"


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


def load_hub_weights(path):
    """Read a hub weights file into `(settings, params)` in OpenAI's layout.

    `path` is the book's state dict (`tok_emb.weight`, `trf_blocks.0.att.W_query.weight`, ...)
    or OpenAI's weights as converted on the hub (`wte.weight`, `h.0.attn.c_attn.weight`, ...,
    with or without a `transformer.` prefix), as `.safetensors` or `.pth`. The settings are
    read off the array shapes; GPT-2's heads are 64 wide in every size.
    """
    path = Path(path)
    arrays = _read_weights_file(path)
    keys = {key.removeprefix("transformer.") for key in arrays}
    try:
        if "tok_emb.weight" in keys:
            params = _params_from_book_state_dict(arrays)
        elif "wte.weight" in keys:
            params = _params_from_hub_gpt2(arrays)
        else:
            raise CheckpointError(f"{path} holds neither the book's GPTModel weights nor GPT-2's hub "
                                  f"layout (first keys: {', '.join(sorted(arrays)[:3])})")
        _check_complete(params)
    except KeyError as err:
        raise CheckpointError(f"{path} lacks the weight {err.args[0]}: delete it and run the download "
                              "again") from None
    n_vocab, n_embd = params["wte"].shape
    settings = {"n_vocab": n_vocab, "n_ctx": params["wpe"].shape[0], "n_embd": n_embd,
                "n_head": max(n_embd // GPT2_HEAD_DIM, 1), "n_layer": len(params["blocks"])}
    return settings, params


def _read_weights_file(path):
    """{name: float32 NumPy array} from a `.safetensors` or `.pth` file (no code is unpickled)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}
        import torch

        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state_dict.items()}
    except ImportError as err:
        raise ImportError(f"Reading {path.name} needs {err.name}: pip install {err.name}") from err
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as err:  # noqa: BLE001 (safetensors and unpickling raise many types)
        raise CheckpointError(
            f"cannot read {path} ({type(err).__name__}: {str(err).strip()[:200]}); it is probably "
            "truncated or corrupt: delete it and run the download again"
        ) from None


def _params_from_hub_gpt2(arrays):
    """`h.3.attn.c_attn.weight` (HF Conv1D, (in, out) like OpenAI's) -> params['blocks'][3]..."""
    params = {"blocks": []}
    for key, array in arrays.items():
        name = key.removeprefix("transformer.")
        if name in ("wte.weight", "wpe.weight"):
            params[name[:3]] = array
        elif name.startswith("ln_f."):
            params["g" if name.endswith("weight") else "b"] = array
        elif m := re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", name):
            _block(params, m[1]).setdefault(m[2], {})["g" if m[3] == "weight" else "b"] = array
        elif m := re.fullmatch(r"h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.(weight|bias)", name):
            _block(params, m[1]).setdefault(m[2], {}).setdefault(m[3], {})[m[4][0]] = array
        # anything else (attention mask buffers `h.N.attn.bias`, a tied `lm_head`) is not a weight
    return params


def _params_from_book_state_dict(arrays):
    """GPTModel's state dict (nn.Linear weights are (out, in)) -> OpenAI's layout ((in, out))."""
    params = {"wte": arrays["tok_emb.weight"], "wpe": arrays["pos_emb.weight"],
              "g": arrays["final_norm.scale"], "b": arrays["final_norm.shift"], "blocks": []}
    n_layer = len({key.split(".")[1] for key in arrays if key.startswith("trf_blocks.")})
    for i in range(n_layer):
        def get(name, i=i):
            return arrays[f"trf_blocks.{i}.{name}"]

        qkv = ("att.W_query", "att.W_key", "att.W_value")
        params["blocks"].append({
            "attn": {
                "c_attn": {"w": np.concatenate([get(f"{n}.weight").T for n in qkv], axis=-1),
                           "b": np.concatenate([get(f"{n}.bias") for n in qkv], axis=-1)},
                "c_proj": {"w": get("att.out_proj.weight").T, "b": get("att.out_proj.bias")},
            },
            "mlp": {
                "c_fc": {"w": get("ff.layers.0.weight").T, "b": get("ff.layers.0.bias")},
                "c_proj": {"w": get("ff.layers.2.weight").T, "b": get("ff.layers.2.bias")},
            },
            "ln_1": {"g": get("norm1.scale"), "b": get("norm1.shift")},
            "ln_2": {"g": get("norm2.scale"), "b": get("norm2.shift")},
        })
    return params


def _check_complete(params):
    """Raise KeyError naming the first weight missing from an OpenAI-layout params dict."""
    for key, name in (("wte", "wte"), ("wpe", "wpe"), ("g", "ln_f/g"), ("b", "ln_f/b")):
        if key not in params:
            raise KeyError(name)  # OpenAI's name for it
    for i, block in enumerate(params["blocks"]):
        for path in ("attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b", "mlp/c_fc/w",
                     "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b", "ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b"):
            entry = block
            for part in path.split("/"):
                if part not in entry:
                    raise KeyError(f"h{i}/{path}")
                entry = entry[part]


def _block(params, index):
    blocks = params["blocks"]
    while len(blocks) <= int(index):
        blocks.append({})
    return blocks[int(index)]


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


def tokenizer_from_folder(folder):
    """tiktoken's GPT-2 Encoding from the vocabulary files beside downloaded weights.

    The folder holds OpenAI's `encoder.json` + `vocab.bpe`, or the hub's `vocab.json` +
    `merges.txt` (the same two files under other names). No network is needed.
    """
    import tiktoken

    folder = Path(folder)
    for encoder, merges in (("encoder.json", "vocab.bpe"), HUB_TOKENIZER_FILES):
        if (folder / encoder).is_file() and (folder / merges).is_file():
            ranks = gpt2_bpe_ranks(folder / encoder, folder / merges)
            return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": len(ranks)})
    raise FileNotFoundError(f"{folder} holds neither encoder.json + vocab.bpe nor vocab.json + "
                            "merges.txt (GPT-2's tokenizer files); download the weights first")


# GPT-2's pre-tokenizer pattern, tiktoken's r50k_pat_str (used by its "gpt2" encoding).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s"""


def gpt2_bpe_ranks(encoder_path, merges_path):
    """{token bytes: rank} from GPT-2's vocabulary (JSON) and merges (text) files.

    Both files spell bytes as printable characters (GPT-2's byte-to-unicode table). The ranks
    are the 256 single bytes, then one per merge in file order; they must equal the ids in the
    vocabulary, which is checked.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_order = printable + [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte |= {chr(256 + n): b for n, b in enumerate(byte_order[len(printable):])}

    def to_bytes(text):
        return bytes(char_to_byte[c] for c in text)

    ranks = {bytes([b]): rank for rank, b in enumerate(byte_order)}
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    merges = [line.split() for line in lines if line.strip() and not line.startswith("#version")]
    for rank, (first, second) in enumerate(merges, start=len(ranks)):
        ranks[to_bytes(first) + to_bytes(second)] = rank
    vocab = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
    ids = {to_bytes(token): i for token, i in vocab.items() if token not in ("<|endoftext|>",)}
    if ids != ranks:
        raise ValueError(f"{encoder_path} and {merges_path} do not belong together "
                         "(the vocabulary's ids differ from the merge order)")
    return ranks


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


def describe_failure(err):
    """One line on why a download failed, for a list of the sources tried."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot connect: {err.reason}"
    if isinstance(err, DownloadError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _failure_message(destination, failures, advice):
    tried = "\n".join(f"  {url}: {reason}" for url, reason in failures)
    return (
        f"could not download {destination.name!r} from any source. Tried:\n{tried}\n"
        "Check your internet connection and run it again (a partial download resumes), "
        f"{advice + ', ' if advice else ''}or place the file by hand in {destination.parent}."
    )
