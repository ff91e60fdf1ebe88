"""Qwen3 from scratch (Qwen3 0.6B, 1.7B and the larger dense sizes), in the style of chapter 4.

Not in the book's chapter 7; the book's repository builds the same model in
ch05/11_qwen3/standalone-qwen3.ipynb, whose class and attribute names this file keeps
(`Qwen3Model`, `tok_emb`, `trf_blocks`, `final_norm`, `out_head`, and inside the blocks
`att`, `ff`, `norm1`, `norm2`, `q_norm`, `k_norm`).

Qwen3 is built from the same parts as Llama 3, which llama3.py defines and explains:
RMSNorm, rotary position embeddings (RoPE), grouped-query attention, a SwiGLU feed-forward,
no biases, no dropout. What is Qwen3's own:
- QK-norm: inside attention, the queries and the keys of every head go through an RMSNorm
  over the head's dimensions before RoPE (`att.q_norm`, `att.k_norm`), which keeps the
  attention scores from growing large during training;
- the head size is given by the config (128 for every size) instead of emb_dim // n_heads:
  Qwen3-0.6B has 16 heads of 128 on a 1,024-wide embedding, so attention works in 2,048
  dimensions and `out_proj` maps them back to 1,024;
- RoPE without Llama 3's frequency scaling, with a base of 1,000,000 for a 32k-40k context;
- a 151,936-token vocabulary: the output head is the largest single matrix, and the small
  sizes share it with the token embedding (`tie_embeddings`).

The config dict is llama3.py's, with qk_norm True (instructkit/hub_model_files.py builds it
from the hub's config.json).
"""

import torch
import torch.nn as nn

from instructkit.llama3 import RMSNorm, TransformerBlock, rope_tables, tie_output_head


class Qwen3Model(nn.Module):
    """Token embedding, transformer blocks with QK-norm, final RMSNorm and output head."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.get("rope_freq") is not None:
            raise ValueError("Qwen3 uses plain RoPE: rope_freq (Llama 3's scaling) must be None")
        cfg = {**cfg, "qk_norm": True}  # what makes the shared blocks Qwen3's
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=cfg["dtype"])
        # A ModuleList: each block takes the mask and the RoPE tables besides x
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], eps=cfg["norm_eps"], dtype=cfg["dtype"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=cfg["dtype"])
        if cfg.get("tie_embeddings", False):
            tie_output_head(self)  # one matrix for tokens in and tokens out

        # RoPE's angles for every position, computed once (head_dim wide, not emb_dim // n_heads)
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
