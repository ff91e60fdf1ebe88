"""The decode steps' shortcuts (fast_gpt.py, instructkit/fast_llm.py) are the models' own
arithmetic to the bit: fewer calls, not other numbers.

A batch-1 decode step pays about as much for each call as for a small kernel, so the fast
paths cut calls: one F.rms_norm for llama3.RMSNorm's eight, RoPE tables prepared once per
forward pass, one tensor per layer in the KV cache, no call to a dropout that is the
identity. Each is checked here against the code it replaces with torch.equal, and each test
also checks that the shortcut really ran (a test of a path never taken could not fail).
"""

import pytest
import torch
import torch.nn as nn

import fast_gpt
from instructkit import fast_llm
from instructkit.llama3 import RMSNorm, apply_rope, compute_rope_params


@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 1, 960), (1, 4, 1, 64)])
def test_rms_norm_in_float32_is_one_fused_call_equal_to_the_module(shape, monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.scale.normal_()
    x = torch.randn(shape) * 3
    calls = []
    fused = torch.nn.functional.rms_norm
    monkeypatch.setattr(fast_llm.F, "rms_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert torch.equal(fast_llm.rms_norm(norm, x), norm(x))
    assert calls == [1]


def test_rms_norm_in_bfloat16_is_the_module(monkeypatch):
    """The module computes in float32 and casts back before scaling: not F.rms_norm's order."""
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-6, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)

    def refuse(*args, **kwargs):
        raise AssertionError("F.rms_norm called on bfloat16")

    monkeypatch.setattr(fast_llm.F, "rms_norm", refuse)
    assert torch.equal(fast_llm.rms_norm(norm, x), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("freq_config", [None, {"factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_context_length": 16}])
def test_rope_tables_turn_like_apply_rope_to_the_bit(dtype, freq_config):
    torch.manual_seed(0)
    cos, sin = compute_rope_params(16, 10_000, 64, freq_config)
    x = torch.randn(3, 4, 5, 16).to(dtype)  # (batch, heads, n_tokens, head_dim)
    shared = torch.tensor([7, 8, 9, 10, 11])  # the same positions in every row
    per_row = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [20, 21, 22, 23, 24]])
    for positions in (shared, per_row):
        tables = fast_llm.RopeTables(cos[positions], sin[positions])
        expected = apply_rope(x, cos[positions], sin[positions])
        assert torch.equal(tables.rotate(x), expected)
        assert torch.equal(tables.rotate(x), expected)  # again, with the tables already cast
        assert tables.cos.dtype == dtype


def test_kv_cache_appends_per_layer_and_returns_views():
    cfg = {"vocab_size": 50, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 3,
           "drop_rate": 0.0, "qkv_bias": True}
    import previous_chapters as pc

    model = pc.GPTModel(cfg)
    cache = fast_gpt.KVCache(model, batch_size=2, max_len=6)
    assert len(cache.keys) == 3 and cache.keys[0].shape == (2, 2, 6, 4)
    first_k, first_v = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    keys, values = cache.append(1, first_k, first_v)
    assert torch.equal(keys, first_k) and torch.equal(values, first_v)
    cache.length = 4  # what the forward pass does after all its layers
    new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = cache.append(1, new_k, new_v)
    assert torch.equal(keys, torch.cat((first_k, new_k), dim=2))
    assert torch.equal(values, torch.cat((first_v, new_v), dim=2))
    assert keys.data_ptr() == cache.keys[1].data_ptr()  # a view of the cache, not a copy


class Halve(nn.Module):
    def forward(self, x):
        return x / 2


def test_dropout_is_skipped_only_where_it_is_the_identity():
    x = torch.ones(1000)
    dropout = nn.Dropout(0.5)
    dropout.eval()
    assert fast_gpt.apply_dropout(dropout, x) is x  # not even called
    dropout.train()
    torch.manual_seed(0)
    dropped = fast_gpt.apply_dropout(dropout, x)
    assert (dropped == 0).any() and (dropped == 2).any()
    other = Halve().eval()  # any other module in the dropout's place is called
    assert torch.equal(fast_gpt.apply_dropout(other, x), x / 2)
