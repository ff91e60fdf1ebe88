"""Tiny random Qwen3 and Llama models saved the way the Hugging Face hub holds them, for tests.

Built with `transformers` (a test dependency only) and written with `save_pretrained`:
`config.json` plus safetensors weights, the layout instructkit/hub_model_files.py reads. The
kinds, each chosen for what it exercises:
- "qwen3": Qwen3 with QK-norm, a head_dim (32) that is not hidden_size / heads (16), tied
  embeddings (as Qwen3-0.6B and 1.7B), one `model.safetensors`;
- "llama-tied": Llama with tied embeddings and plain RoPE, head_dim derived (as SmolLM2);
- "llama3-scaled": Llama with Llama 3's RoPE frequency scaling and an untied output head,
  saved sharded (`model.safetensors.index.json` and several shard files).
All are small (hidden 64, 2 layers, vocabulary 300): building the three takes a second or two
once transformers is imported. Import transformers only through these functions, so that a
test module that does not use them pays nothing.
"""

import json
from pathlib import Path

VOCAB = 300
EOS_ID = 2  # the models' end-of-text id: the collate's padding in the chapter's loss tests
BOS_ID = 1

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "initializer_range": 0.2,  # larger than the default 0.02, so the logits spread out
}

# kind -> (transformers class name, config class name, config values, save_pretrained kwargs)
KINDS = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              {**_COMMON, "head_dim": 32, "rope_theta": 1_000_000.0, "tie_word_embeddings": True}, {}),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig",
                   {**_COMMON, "rope_theta": 10_000.0, "tie_word_embeddings": True,
                    "rms_norm_eps": 1e-5}, {}),
    "llama3-scaled": ("LlamaForCausalLM", "LlamaConfig",
                      {**_COMMON, "rope_theta": 10_000.0, "tie_word_embeddings": False,
                       # a short original context, so that low, medium and high frequencies
                       # of the 16-wide heads are all present and scaled differently
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32}},
                      {"max_shard_size": "60KB"}),
}


def build_hf_model(kind, seed=0, attn="eager"):
    """A random transformers model of `kind` (see KINDS), float32, in eval mode.

    attn: transformers' attention implementation; "eager" (its explicit softmax, the
    reference the project's models are compared with), or "sdpa".
    """
    import torch
    import transformers

    model_class, config_class, values, _ = KINDS[kind]
    config = getattr(transformers, config_class)(**values)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).float().eval()
    with torch.no_grad():  # RMSNorm scales start at one: make them part of the test
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_hub_model(kind, folder, seed=0):
    """Build `kind` and save it as a hub repository folder; returns (folder, the HF model)."""
    folder = Path(folder)
    model = build_hf_model(kind, seed)
    model.save_pretrained(folder, safe_serialization=True, **KINDS[kind][3])
    return folder, model


def read_config(folder):
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
