"""A local folder of Hugging Face hub files -> a from-scratch Qwen3 or Llama 3 model.

Not in the book. One job: read what a hub repository holds (`config.json`, and the weights
as one `model.safetensors` or sharded with `model.safetensors.index.json`) into
qwen3.Qwen3Model or llama3.Llama3Model. Downloading the folder is another module's job.
- `read_config_json(folder)`: the hub's config.json as a dict;
- `model_family(config_json)`: "qwen3", "llama" (Llama 3.x, SmolLM2) or "gpt2", from
  `model_type`; GPT-2 keeps its own loaders (instructkit/hub.py, gpt2_weights.py);
- `model_config(config_json, dtype=None, context_length=None)`: the model's config dict
  (llama3.py's keys), for every size of each family: the old layout (`rope_theta`,
  `rope_scaling`, `torch_dtype`) and transformers 5's (`rope_parameters`, `dtype`);
- `hub_weight_names(cfg)`: {the model's parameter name: the hub's tensor name};
- `load_hub_model(folder, dtype=None, device="cpu", context_length=None) -> (model, cfg)`.

Memory: the model is built on the meta device (no random initialisation, no memory), then
given empty storage on `device`, and each tensor is read from the files and copied in one
at a time (safetensors' safe_open, the file opened for that tensor only), so the weights
are never held twice: loading SmolLM2-135M in float32 (513 MB of weights) peaks at the
weights plus its largest tensor (the 113 MB embedding). A tied model
(`tie_word_embeddings`) has one matrix for the embedding and the output head; a file that
also stores `lm_head.weight` for it (Qwen3-1.7B's does) has that copy ignored, as
transformers ignores it. Missing, unexpected or misshaped tensors, a damaged file or a
config this code cannot honour are one CheckpointError line.
"""

import json
from pathlib import Path

import torch

from instructkit.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FAMILIES = ("gpt2", "qwen3", "llama")
# Buffers that older hub checkpoints store beside the weights; recomputed here, never read
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_config_json(folder):
    """The hub's config.json of `folder` as a dict; a CheckpointError if missing or broken."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model folder from the hub has a config.json") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def model_family(config_json):
    """"qwen3", "llama" or "gpt2", from config.json's `model_type`."""
    model_type = config_json.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} in config.json is not supported: "
                              f"this project runs {', '.join(FAMILIES)}")
    return model_type


def _dtype(value):
    """torch.float32 from "float32", torch.bfloat16 from "bfloat16" (or a torch.dtype)."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype {value!r} in config.json is not a floating-point torch dtype")
    return dtype


def _rope_settings(config_json):
    """(rope base, Llama 3 frequency scaling or None) from either config.json layout."""
    params = config_json.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5: the base and the scaling in one dict
        theta, scaling = params.get("rope_theta", 10_000.0), params
    else:  # the hub's usual files: rope_theta beside rope_scaling (null or a dict)
        theta, scaling = config_json.get("rope_theta", 10_000.0), config_json.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(f"RoPE scaling {rope_type!r} in config.json is not supported "
                              "(only none and Llama 3's)")
    return float(theta), {
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_context_length": int(scaling["original_max_position_embeddings"]),
    }


def _check_supported(config_json, family):
    """A CheckpointError for the options of these families that the models do not have."""
    unsupported = []
    if config_json.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config_json['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config_json.get(flag):
            unsupported.append(f"{flag}: true")
    if config_json.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported.append("partial_rotary_factor")
    if unsupported:
        raise CheckpointError(f"config.json of this {family} model asks for {', '.join(unsupported)}, "
                              "which the from-scratch model does not implement")


def model_config(config_json, dtype=None, context_length=None):
    """The model's config dict (llama3.py's keys) from the hub's config.json.

    dtype: the weights' dtype (a torch.dtype or its name); None takes config.json's
    (`torch_dtype`, or `dtype` in transformers 5), float32 if it names none.
    context_length: fewer positions than `max_position_embeddings` (smaller RoPE tables,
    and the longest input the chapter's code will give the model); None for all of them.
    """
    family = model_family(config_json)
    if family == "gpt2":
        raise CheckpointError("this folder holds a GPT-2 model: GPT-2 loads through the project's "
                              "GPT-2 path (previous_chapters.GPTModel), not hub_model_files")
    _check_supported(config_json, family)
    try:
        emb_dim = int(config_json["hidden_size"])
        n_heads = int(config_json["num_attention_heads"])
        rope_base, rope_freq = _rope_settings(config_json)
        max_positions = int(config_json["max_position_embeddings"])
        cfg = {
            "vocab_size": int(config_json["vocab_size"]),
            "context_length": max_positions if context_length is None else min(context_length, max_positions),
            "emb_dim": emb_dim,
            "n_heads": n_heads,
            "n_layers": int(config_json["num_hidden_layers"]),
            "hidden_dim": int(config_json["intermediate_size"]),
            # Qwen3 gives it (128 at every size); Llama's files may not: emb_dim // n_heads
            "head_dim": int(config_json.get("head_dim") or emb_dim // n_heads),
            "n_kv_groups": int(config_json.get("num_key_value_heads") or n_heads),
            "rope_base": rope_base,
            "rope_freq": rope_freq,
            "norm_eps": float(config_json.get("rms_norm_eps", 1e-6)),  # transformers' default
            "qk_norm": family == "qwen3",
            "tie_embeddings": bool(config_json.get("tie_word_embeddings", False)),
            "dtype": _dtype(dtype if dtype is not None else
                            config_json.get("torch_dtype") or config_json.get("dtype") or "float32"),
        }
    except KeyError as e:
        raise CheckpointError(f"config.json of this {family} model has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json of this {family} model has a bad value ({e})") from None
    if family == "qwen3" and rope_freq is not None:
        raise CheckpointError("config.json of this qwen3 model asks for Llama 3's RoPE scaling, "
                              "which Qwen3 does not have")
    return cfg


def model_class(family):
    """Qwen3Model or Llama3Model (imported here: only a caller that builds one pays for it)."""
    if family == "qwen3":
        from instructkit.qwen3 import Qwen3Model

        return Qwen3Model
    from instructkit.llama3 import Llama3Model

    return Llama3Model


def hub_weight_names(cfg):
    """{the model's parameter name: the hub's tensor name}, for every parameter of the model."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight"}
    for i in range(cfg["n_layers"]):
        ours, theirs = f"trf_blocks.{i}", f"model.layers.{i}"
        names.update({
            f"{ours}.att.W_query.weight": f"{theirs}.self_attn.q_proj.weight",
            f"{ours}.att.W_key.weight": f"{theirs}.self_attn.k_proj.weight",
            f"{ours}.att.W_value.weight": f"{theirs}.self_attn.v_proj.weight",
            f"{ours}.att.out_proj.weight": f"{theirs}.self_attn.o_proj.weight",
            f"{ours}.ff.fc1.weight": f"{theirs}.mlp.gate_proj.weight",
            f"{ours}.ff.fc2.weight": f"{theirs}.mlp.up_proj.weight",
            f"{ours}.ff.fc3.weight": f"{theirs}.mlp.down_proj.weight",
            f"{ours}.norm1.scale": f"{theirs}.input_layernorm.weight",
            f"{ours}.norm2.scale": f"{theirs}.post_attention_layernorm.weight",
        })
        if cfg.get("qk_norm"):
            names[f"{ours}.att.q_norm.scale"] = f"{theirs}.self_attn.q_norm.weight"
            names[f"{ours}.att.k_norm.scale"] = f"{theirs}.self_attn.k_norm.weight"
    if not cfg.get("tie_embeddings"):
        names["out_head.weight"] = "lm_head.weight"
    return names


def weight_files(folder):
    """{hub tensor name: the safetensors file holding it}, from the index or the single file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {name: folder / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single} cannot be read as safetensors ({e})") from None


def _check_names(expected, stored, tied, folder, family):
    """A CheckpointError naming what is missing or unexpected (a few of each, and how many)."""
    missing = sorted(set(expected) - set(stored))
    extra = set(stored) - set(expected) - ({"lm_head.weight"} if tied else set())
    extra = sorted(n for n in extra if not n.endswith(IGNORED_SUFFIXES))
    if missing or extra:
        def few(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = ([f"missing {len(missing)} tensors ({few(missing)})"] if missing else []) + \
                ([f"{len(extra)} unexpected ({few(extra)})"] if extra else [])
        raise CheckpointError(f"the weights in {folder} do not fit its config.json ({family}): "
                              + "; ".join(parts))


def _read_tensor(path, name, shape):
    """One tensor of a safetensors file, its shape checked.

    The file is opened for this tensor alone: safetensors maps the whole file into memory,
    and the pages read stay counted in the process's memory while it is open, so a file
    kept open for every tensor would show the weights twice at the peak.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():  # the index names a shard that is not there
        raise CheckpointError(f"{path} is missing: {INDEX_FILE} lists it (an incomplete download?)")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e})") from None
    if tensor.shape != shape:
        raise CheckpointError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, the "
                              f"config.json asks for {tuple(shape)}")
    return tensor


def empty_hub_model(folder, dtype=None, device="cpu", context_length=None):
    """(model, cfg, family): the from-scratch model of `folder`'s config.json, its parameters
    allocated on `device` but not filled (no weights read, no random initialisation); the
    RoPE tables are computed. For loading weights into it: the hub's (load_hub_model) or a
    finetuned state dict (model_files)."""
    cfg, family = _config_and_family(folder, dtype, context_length)
    return _empty_model(cfg, family, device), cfg, family


def _config_and_family(folder, dtype, context_length):
    """(model_config's dict, model_family) of `folder`'s config.json, read once."""
    config_json = read_config_json(Path(folder))
    return model_config(config_json, dtype, context_length), model_family(config_json)


def _empty_model(cfg, family, device):
    """empty_hub_model's model, from the config dict it has worked out."""
    with torch.device("meta"):  # the structure only: no memory, no random initialisation
        model = model_class(family)(cfg)
    model.to_empty(device=device)
    if cfg["tie_embeddings"]:  # to_empty gives each module its own storage: tie them again
        from instructkit.llama3 import tie_output_head

        tie_output_head(model)
    from instructkit.llama3 import rope_tables

    model.cos, model.sin = (table.to(device) for table in rope_tables(cfg))  # the buffers, recomputed
    return model


def load_hub_model(folder, dtype=None, device="cpu", context_length=None):
    """(model, cfg): the from-scratch model of `folder`'s config.json with its hub weights.

    dtype, context_length: see model_config (None: the config's dtype and every position).
    The weights are converted to the model's dtype as they are copied in.
    """
    folder = Path(folder)
    cfg, family = _config_and_family(folder, dtype, context_length)
    names = hub_weight_names(cfg)
    files = weight_files(folder)
    _check_names(names.values(), files, cfg["tie_embeddings"], folder, family)

    model = _empty_model(cfg, family, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in names.items():
            params[ours].copy_(_read_tensor(files[theirs], theirs, params[ours].shape))
    return model, cfg
