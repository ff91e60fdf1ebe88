"""Llama 3 from scratch (Llama 3.2 1B/3B, SmolLM2 135M/360M/1.7B), in the style of chapter 4.

Not in the book's chapter 7; the book's repository builds the same model in
ch05/07_gpt_to_llama/standalone-llama32.ipynb, and this file keeps its class and attribute
names (`Llama3Model`, `tok_emb`, `trf_blocks`, `final_norm`, `out_head`, `att`, `ff`,
`norm1`, `norm2`, `W_query`, `W_key`, `W_value`, `out_proj`, `fc1`, `fc2`, `fc3`) so that
code written for one reads the other. What changes against chapter 4's GPT, top to bottom:
- RMSNorm instead of LayerNorm: no mean subtracted, no shift, only a learned scale;
- no position embedding layer: rotary position embeddings (RoPE) turn each query and key by
  an angle that grows with its position, so attention scores depend on relative distance.
  Llama 3 stretches the slow frequencies for long contexts (`rope_freq`);
- grouped-query attention: several query heads share one key/value head, so the keys and
  values (and a KV cache) are smaller;
- a SwiGLU feed-forward (three linear layers, SiLU gate) instead of Linear-GELU-Linear;
- no biases and no dropout anywhere; the output head may share the token embedding's
  weights (`tie_embeddings`, as in Llama 3.2 and SmolLM2).

Qwen3 (qwen3.py) is the same architecture plus a normalisation of queries and keys, so the
building blocks below serve both files. The arithmetic follows Hugging Face `transformers`
step by step (RMSNorm in float32, then cast, then scaled; scores scaled before the float32
softmax; RoPE tables cast to the model's dtype), so the logits agree with it to float
rounding (tests/test_other_llms.py: within 1e-5 in float32).

The config dict (from the hub's config.json: instructkit/hub_model_files.py):
  vocab_size, context_length, emb_dim, n_heads, n_layers, hidden_dim (the feed-forward's
  width), head_dim (None: emb_dim // n_heads), n_kv_groups (key/value heads), rope_base,
  rope_freq (None, or Llama 3's scaling: factor, low_freq_factor, high_freq_factor,
  original_context_length), norm_eps, qk_norm, tie_embeddings, dtype.
"""

import math

import torch
import torch.nn as nn


class FeedForward(nn.Module):
    """SwiGLU: silu(fc1(x)) gates fc2(x), and fc3 projects back to the embedding size."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)  # the gate
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], dtype=cfg["dtype"], bias=False)  # the values
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], dtype=cfg["dtype"], bias=False)

    def forward(self, x):
        # (batch, n_tokens, emb_dim) -> (batch, n_tokens, hidden_dim) -> (batch, n_tokens, emb_dim)
        return self.fc3(nn.functional.silu(self.fc1(x)) * self.fc2(x))


class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then multiply by a learned scale.

    Computed in float32 whatever the model's dtype (a bfloat16 mean of squares loses too
    much), cast back, then scaled: the order transformers uses, so the results match.
    """

    def __init__(self, emb_dim, eps=1e-5, dtype=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim, dtype=dtype))

    def forward(self, x):
        input_dtype = x.dtype
        x = x.to(torch.float32)
        mean_square = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        return self.scale * x.to(input_dtype)


def compute_rope_params(head_dim, theta_base=10_000, context_length=4096, freq_config=None):
    """The cosine and sine tables of RoPE: two (context_length, head_dim) float32 tensors.

    Each pair of dimensions (i, i + head_dim/2) turns at its own frequency theta_base^(-2i/d):
    the first pairs fast, the last ones slowly. Row p holds the angles of position p.
    freq_config: Llama 3's scaling, which slows down the low frequencies (wavelengths longer
    than the original context) by `factor` and blends smoothly in between, so a model
    trained on short texts reads long ones.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    if freq_config is not None:
        factor = freq_config["factor"]
        low, high = freq_config["low_freq_factor"], freq_config["high_freq_factor"]
        original = freq_config["original_context_length"]
        wavelen = 2 * math.pi / inv_freq
        # Slow waves (longer than original / low) are stretched by `factor`; fast waves
        # (shorter than original / high) are kept
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        # In between: a linear blend of the stretched and the kept frequency
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_between = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(in_between, blended, scaled)

    positions = torch.arange(context_length, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim // 2)
    angles = torch.cat([angles, angles], dim=1)  # both halves of a pair turn by the same angle
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x (batch, heads, n_tokens, head_dim) by the angles of its positions.

    cos, sin: the table rows of these positions, (n_tokens, head_dim) when every row of the
    batch has the same positions, or (batch, n_tokens, head_dim) when each has its own (a
    left-padded batch). The rotation mixes dimension i with i + head_dim/2.
    """
    cos = cos.to(x.dtype).unsqueeze(-3)  # a heads axis: (1 or batch, 1, n_tokens, head_dim)
    sin = sin.to(x.dtype).unsqueeze(-3)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GroupedQueryAttention(nn.Module):
    """Causal self-attention where `num_heads` query heads share `num_kv_groups` key/value heads.

    qk_norm (Qwen3): an RMSNorm over each head's dimensions on the queries and the keys,
    before RoPE, which keeps the attention scores in a stable range.
    """

    def __init__(self, d_in, num_heads, num_kv_groups, head_dim=None, qk_norm=False,
                 norm_eps=1e-6, dtype=None):
        super().__init__()
        if num_heads % num_kv_groups:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_groups ({num_kv_groups})")
        if head_dim is None:
            if d_in % num_heads:
                raise ValueError(f"d_in ({d_in}) must be a multiple of num_heads ({num_heads}) "
                                 "when head_dim is not given")
            head_dim = d_in // num_heads

        self.num_heads = num_heads
        self.num_kv_groups = num_kv_groups
        self.group_size = num_heads // num_kv_groups  # query heads per key/value head
        self.head_dim = head_dim
        self.d_out = num_heads * head_dim
        self.scaling = head_dim ** -0.5

        self.W_query = nn.Linear(d_in, self.d_out, bias=False, dtype=dtype)
        self.W_key = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.W_value = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(self.d_out, d_in, bias=False, dtype=dtype)

        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, cos, sin):
        """Queries (b, num_heads, n, head_dim), keys and values (b, num_kv_groups, n, head_dim).

        The queries and keys are normalised (qk_norm) and turned by RoPE. (fast_llm.py's
        `project` is the same arithmetic in fewer calls, for its decode steps.)
        """
        b, num_tokens, _ = x.shape
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        return apply_rope(queries, cos, sin), apply_rope(keys, cos, sin), values

    def forward(self, x, mask, cos, sin):
        """x (batch, n_tokens, d_in); mask (n_tokens, n_tokens) bool, True where a query must
        not look (the future); cos, sin: the RoPE rows of the n_tokens positions."""
        b, num_tokens, _ = x.shape
        queries, keys, values = self.project(x, cos, sin)

        # Each key/value head serves group_size query heads: repeat it for them, in order
        # ([K1, K2] -> [K1, K1, K2, K2] for a group size of 2)
        keys = keys.repeat_interleave(self.group_size, dim=1)  # (b, num_heads, n, head_dim)
        values = values.repeat_interleave(self.group_size, dim=1)

        attn_scores = (queries @ keys.transpose(2, 3)) * self.scaling  # (b, num_heads, n, n)
        attn_scores = attn_scores.masked_fill(mask, -torch.inf)
        attn_weights = torch.softmax(attn_scores, dim=-1, dtype=torch.float32).to(queries.dtype)

        context = (attn_weights @ values).transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward, each with a shortcut connection (no dropout)."""

    def __init__(self, cfg):
        super().__init__()
        self.att = GroupedQueryAttention(
            d_in=cfg["emb_dim"],
            num_heads=cfg["n_heads"],
            num_kv_groups=cfg["n_kv_groups"],
            head_dim=cfg["head_dim"],
            qk_norm=cfg.get("qk_norm", False),
            norm_eps=cfg["norm_eps"],
            dtype=cfg["dtype"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"])
        self.norm2 = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"])

    def forward(self, x, mask, cos, sin):
        shortcut = x
        x = self.att(self.norm1(x), mask, cos, sin)  # (batch, n_tokens, emb_dim)
        x = x + shortcut

        shortcut = x
        x = self.ff(self.norm2(x))
        return x + shortcut


def rope_tables(cfg):
    """(cos, sin) for the model's context length, with the config's frequency scaling."""
    head_dim = cfg["head_dim"] or cfg["emb_dim"] // cfg["n_heads"]
    return compute_rope_params(head_dim, cfg["rope_base"], cfg["context_length"], cfg.get("rope_freq"))


def tie_output_head(model):
    """Make the output head use the token embedding's matrix (one parameter, not a copy)."""
    model.out_head.weight = model.tok_emb.weight


class Llama3Model(nn.Module):
    """Token embedding, transformer blocks, final RMSNorm and output head; RoPE in the blocks."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        # A ModuleList: each block takes the mask and the RoPE tables besides x
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        if cfg.get("tie_embeddings", False):
            tie_output_head(self)

        # Computed once for every position; not saved with the weights (persistent=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = cfg

    def forward(self, in_idx):
        x = self.tok_emb(in_idx)  # (batch, n_tokens, emb_dim)
        num_tokens = x.shape[1]
        # True above the diagonal: the future positions a query must not see
        mask = torch.triu(torch.ones(num_tokens, num_tokens, device=x.device, dtype=torch.bool), diagonal=1)
        cos, sin = self.cos[:num_tokens], self.sin[:num_tokens]
        for block in self.trf_blocks:
            x = block(x, mask, cos, sin)
        x = self.final_norm(x)
        return self.out_head(x)  # (batch, n_tokens, vocab_size)
