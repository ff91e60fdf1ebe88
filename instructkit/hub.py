"""GPT-2's weights from the Hugging Face hub, read into OpenAI's layout without TensorFlow.

Not in the book. Two hub sources (gpt2_weights.py chooses among all sources):
- "hub-book": the book's PyTorch state dicts (`rasbt/gpt2-from-scratch-pytorch`,
  `.safetensors` preferred, `.pth` read with weights_only);
- "hub-openai": OpenAI's weights as converted on the hub (`openai-community/gpt2`, ...).
Files come from `<endpoint>/<repo>/resolve/main/<file>`; the `HF_ENDPOINT` environment
variable names a mirror, as for the hub's own tools. The tokenizer's `vocab.json` and
`merges.txt` come along (gpt2_tokenizer.py reads them). `load_hub_weights` turns either
layout into the nested dict of NumPy arrays that the book's `load_weights_into_gpt` takes;
`download_and_load_from_hub` does both steps for gpt_download.download_and_load_gpt2.
"""

import os
import re
from pathlib import Path

import numpy as np

from instructkit.downloads import CheckpointError, DownloadError, download_first
from instructkit.file_checks import check_reusable
from instructkit.gpt2_sizes import GPT2_SIZES

HUB_SOURCES = ("hub-book", "hub-openai")
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
MIRROR_ADVICE = (f"or set the {HF_ENDPOINT_ENV_VAR} environment variable to a mirror of the Hugging Face "
                 "hub (e.g. HF_ENDPOINT=https://hf-mirror.com)")
GPT2_HEAD_DIM = 64  # every GPT-2 size has 64-wide heads: n_head = n_embd // 64


def download_and_load_from_hub(model_size, models_dir, source, hub_endpoint=None):
    """A hub source's GPT-2 `model_size`, downloaded into `models_dir/model_size` unless complete
    there, and read: `(settings, params)` in OpenAI's layout, as from OpenAI's checkpoint."""
    return load_hub_weights(download_hub_files(model_size, models_dir, source, hub_endpoint))


def download_hub_files(model_size, models_dir, source, hub_endpoint=None):
    """Make sure a hub source's weights and tokenizer files are complete in `models_dir/model_size`.

    `source` is "hub-book" or "hub-openai". Files already there are used without any network
    access once they pass file_checks.py's checks; a bad one is moved aside (with a line on
    stderr) and downloaded again. Returns the path of the weights file.
    """
    endpoint = endpoint_url(hub_endpoint)
    model_dir = Path(models_dir) / model_size
    advice = MIRROR_ADVICE
    for names in hub_files(source, model_size):
        if any(check_reusable(model_dir / name) for name in names):
            continue
        failures = []
        for name in names:  # alternatives, in order of preference
            urls = [f"{endpoint}/{_hub_repo(source, model_size, name)}/resolve/main/{name}"]
            try:
                download_first(urls, model_dir / name, advice=advice, mirror_setting=HF_ENDPOINT_ENV_VAR)
                break
            except DownloadError as err:
                if not err.not_found:  # a cut or failing download: resume it, not another file
                    raise
                failures.append(str(err))
        else:
            raise DownloadError("\n".join(failures))
    return next(model_dir / name for name in hub_files(source, model_size)[0]
                if (model_dir / name).is_file())


def endpoint_url(hub_endpoint=None):
    """The hub's address: `hub_endpoint`, else $HF_ENDPOINT, else huggingface.co (no final /)."""
    return (hub_endpoint or os.environ.get(HF_ENDPOINT_ENV_VAR) or HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_files(source, model_size):
    """The files a hub source needs, each as a tuple of alternatives: weights first."""
    if model_size not in OPENAI_HUB_REPOS:
        raise ValueError(f"model_size must be one of {', '.join(OPENAI_HUB_REPOS)}; got {model_size!r}")
    if source == "hub-book":
        stem = _book_hub_stem(model_size)
        weights = (f"{stem}.safetensors", f"{stem}.pth")
    elif source == "hub-openai":
        weights = (HUB_OPENAI_WEIGHTS,)
    else:
        raise ValueError(f"not a hub weights source: {source!r}")
    return [weights] + [(name,) for name in HUB_TOKENIZER_FILES]


def _book_hub_stem(model_size):
    """'124M' -> 'gpt2-small-124M', the book's file names on the hub."""
    return next(f"{short}-{folder}" for short, (_, folder, *_) in GPT2_SIZES.items() if folder == model_size)


def _hub_repo(source, model_size, name):
    if source == "hub-book" and name not in HUB_TOKENIZER_FILES:
        return BOOK_HUB_REPO
    return OPENAI_HUB_REPOS[model_size]  # the tokenizer files sit beside OpenAI's converted weights


def files_present(model_dir, names):
    """Whether `model_dir` holds one of the alternatives `names`."""
    return any((model_dir / name).is_file() for name in names)


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
