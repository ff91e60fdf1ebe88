"""Write the arrays of a small GPT-2 checkpoint in the two Hugging Face hub layouts, for tests.

`arrays` is what `gpt2_checkpoint.write_gpt2_checkpoint` returns ({OpenAI variable name:
array}), so all three layouts hold the very same numbers:
- `write_hub_openai_weights`: OpenAI's weights as converted on the hub (`openai-community/gpt2`),
  HF's GPT2Model names, Conv1D weights kept (in, out), plus the attention-mask buffers the
  real files carry;
- `write_book_state_dict`: the book's GPTModel state dict (`rasbt/gpt2-from-scratch-pytorch`),
  nn.Linear weights (out, in), q/k/v split, the mask buffers and the tied output head.
Also `write_hub_tokenizer_files`, the hub's `vocab.json` + `merges.txt` from OpenAI's files,
and `write_hub_model_folder`, a whole "hub-openai" model folder made without TensorFlow (for
runs of the chapter where TensorFlow is not installed).
"""

import json
from pathlib import Path

import numpy as np


def hub_openai_arrays(arrays, n_layer, prefix=""):
    """{HF GPT2Model key: array}; `prefix` 'transformer.' as in GPT2LMHeadModel's files."""
    out = {f"{prefix}wte.weight": arrays["model/wte"], f"{prefix}wpe.weight": arrays["model/wpe"],
           f"{prefix}ln_f.weight": arrays["model/ln_f/g"], f"{prefix}ln_f.bias": arrays["model/ln_f/b"]}
    n_ctx = arrays["model/wpe"].shape[0]
    for i in range(n_layer):
        h, key = f"model/h{i}", f"{prefix}h.{i}"
        for layer in ("ln_1", "ln_2"):
            out[f"{key}.{layer}.weight"] = arrays[f"{h}/{layer}/g"]
            out[f"{key}.{layer}.bias"] = arrays[f"{h}/{layer}/b"]
        for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = layer.replace("/", ".")
            out[f"{key}.{name}.weight"] = np.squeeze(arrays[f"{h}/{layer}/w"], axis=0)  # (in, out)
            out[f"{key}.{name}.bias"] = arrays[f"{h}/{layer}/b"]
        # the causal-mask buffer HF's older GPT-2 files carry: not a weight, must be skipped
        out[f"{key}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
    return out


def book_state_dict_arrays(arrays, n_layer):
    """{GPTModel state-dict key: array}, as previous_chapters.GPTModel names its parameters."""
    wte = arrays["model/wte"]
    n_embd, n_ctx = wte.shape[1], arrays["model/wpe"].shape[0]
    out = {"tok_emb.weight": wte, "pos_emb.weight": arrays["model/wpe"]}
    for i in range(n_layer):
        h, key = f"model/h{i}", f"trf_blocks.{i}"
        w = np.squeeze(arrays[f"{h}/attn/c_attn/w"], axis=0)  # (in, 3 * out): q, k, v side by side
        b = arrays[f"{h}/attn/c_attn/b"]
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[f"{key}.att.{name}.weight"] = w[:, j * n_embd:(j + 1) * n_embd].T
            out[f"{key}.att.{name}.bias"] = b[j * n_embd:(j + 1) * n_embd]
        out[f"{key}.att.out_proj.weight"] = np.squeeze(arrays[f"{h}/attn/c_proj/w"], axis=0).T
        out[f"{key}.att.out_proj.bias"] = arrays[f"{h}/attn/c_proj/b"]
        out[f"{key}.att.mask"] = np.triu(np.ones((n_ctx, n_ctx), np.float32), k=1)
        out[f"{key}.ff.layers.0.weight"] = np.squeeze(arrays[f"{h}/mlp/c_fc/w"], axis=0).T
        out[f"{key}.ff.layers.0.bias"] = arrays[f"{h}/mlp/c_fc/b"]
        out[f"{key}.ff.layers.2.weight"] = np.squeeze(arrays[f"{h}/mlp/c_proj/w"], axis=0).T
        out[f"{key}.ff.layers.2.bias"] = arrays[f"{h}/mlp/c_proj/b"]
        out[f"{key}.norm1.scale"] = arrays[f"{h}/ln_1/g"]
        out[f"{key}.norm1.shift"] = arrays[f"{h}/ln_1/b"]
        out[f"{key}.norm2.scale"] = arrays[f"{h}/ln_2/g"]
        out[f"{key}.norm2.shift"] = arrays[f"{h}/ln_2/b"]
    out["final_norm.scale"] = arrays["model/ln_f/g"]
    out["final_norm.shift"] = arrays["model/ln_f/b"]
    out["out_head.weight"] = wte.copy()  # tied to the token embedding, stored separately
    return out


def save_weights(named_arrays, path):
    """Write {name: array} as `.safetensors` (safetensors) or `.pth` (torch.save of tensors)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.tensor(np.ascontiguousarray(v)) for k, v in named_arrays.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def write_hub_tokenizer_files(openai_folder, folder):
    """The hub's vocab.json (compact JSON) and merges.txt, from OpenAI's encoder.json and vocab.bpe."""
    openai_folder, folder = Path(openai_folder), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = json.loads((openai_folder / "encoder.json").read_text(encoding="utf-8"))
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")),
                                       encoding="utf-8")
    merges = (openai_folder / "vocab.bpe").read_text(encoding="utf-8").rstrip("\n")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")  # no newline at the end


def write_hub_model_folder(folder, tokenizer_dir, n_vocab=50257, n_ctx=256, n_embd=64, n_layer=2, seed=123):
    """A random GPT-2 in the "hub-openai" layout in `folder` (model.safetensors, vocab.json,
    merges.txt from OpenAI's files in `tokenizer_dir`), as `download_and_load_gpt2` leaves it.
    No TensorFlow needed; the head count read back is n_embd // 64. Returns the arrays."""
    from gpt2_checkpoint import random_gpt2_arrays

    arrays = random_gpt2_arrays(n_vocab, n_ctx, n_embd, n_layer, seed)
    save_weights(hub_openai_arrays(arrays, n_layer), Path(folder) / "model.safetensors")
    write_hub_tokenizer_files(tokenizer_dir, folder)
    return arrays
