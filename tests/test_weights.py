"""OpenAI's weights in GPTModel give the logits of an independent NumPy GPT-2 forward pass.

A tiny random checkpoint in OpenAI's layout goes through the real reader (the book's
`download_and_load_gpt2` on a complete folder, so `load_gpt2_params_from_tf_ckpt`) and
`load_weights_into_gpt`; the reference below is
written from GPT-2's definition, straight from the raw parameter arrays, in float64.
"""

import numpy as np
import pytest
import torch
from gpt2_checkpoint import write_gpt2_checkpoint

import fast_gpt
from gpt_download import download_and_load_gpt2
from previous_chapters import GPTModel, assign, load_weights_into_gpt

HPARAMS = {"n_vocab": 96, "n_ctx": 16, "n_embd": 16, "n_head": 4, "n_layer": 2}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "124M"
    write_gpt2_checkpoint(folder, **HPARAMS, seed=1)
    settings, params = download_and_load_gpt2(model_size="124M", models_dir=folder.parent)  # no network
    assert settings == HPARAMS
    return settings, params


def model_config(settings, **overrides):
    return {
        "vocab_size": settings["n_vocab"],
        "context_length": settings["n_ctx"],
        "emb_dim": settings["n_embd"],
        "n_heads": settings["n_head"],
        "n_layers": settings["n_layer"],
        "drop_rate": 0.0,
        "qkv_bias": True,
        **overrides,
    }


# ---- the reference: GPT-2 in NumPy, one sequence at a time ----


def layer_norm(x, g, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance
    return g * (x - mean) / np.sqrt(var + eps) + b


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_self_attention(x, attn, n_head):
    n_tokens, n_embd = x.shape
    head_dim = n_embd // n_head
    qkv = x @ attn["c_attn"]["w"] + attn["c_attn"]["b"]  # (T, 3E): q, k, v side by side
    q, k, v = np.split(qkv, 3, axis=-1)
    q, k, v = (m.reshape(n_tokens, n_head, head_dim).transpose(1, 0, 2) for m in (q, k, v))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim)  # (H, T, T)
    future = np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    out = softmax(scores) @ v  # (H, T, D)
    out = out.transpose(1, 0, 2).reshape(n_tokens, n_embd)
    return out @ attn["c_proj"]["w"] + attn["c_proj"]["b"]


def mlp(x, p):
    return gelu(x @ p["c_fc"]["w"] + p["c_fc"]["b"]) @ p["c_proj"]["w"] + p["c_proj"]["b"]


def numpy_gpt2_logits(token_ids, params, n_head):
    params = _float64(params)
    x = params["wte"][token_ids] + params["wpe"][np.arange(len(token_ids))]
    for block in params["blocks"]:
        x = x + causal_self_attention(
            layer_norm(x, block["ln_1"]["g"], block["ln_1"]["b"]), block["attn"], n_head
        )
        x = x + mlp(layer_norm(x, block["ln_2"]["g"], block["ln_2"]["b"]), block["mlp"])
    x = layer_norm(x, params["g"], params["b"])
    return x @ params["wte"].T  # GPT-2 ties the output head to the token embedding


def _float64(tree):
    if isinstance(tree, dict):
        return {key: _float64(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_float64(value) for value in tree]
    return np.asarray(tree, dtype=np.float64)


# ---- the tests ----


def fast_gpt_logits(model, in_idx):
    """fast_gpt's forward pass (fused kernels) over the same model: logits at every position."""
    return model.out_head(fast_gpt.hidden_states(model, in_idx))


@pytest.mark.parametrize("forward", [GPTModel.__call__, fast_gpt_logits], ids=["book", "fast_gpt"])
def test_loaded_model_matches_the_numpy_forward_pass(gpt2, forward):
    settings, params = gpt2
    torch.manual_seed(0)
    model = GPTModel(model_config(settings))
    load_weights_into_gpt(model, params)
    model.eval()

    rng = np.random.default_rng(0)
    batch = rng.integers(0, settings["n_vocab"], size=(3, settings["n_ctx"]))
    with torch.no_grad():
        logits = forward(model, torch.tensor(batch)).numpy()
        short = forward(model, torch.tensor(batch[:1, :5])).numpy()
    assert logits.shape == (3, settings["n_ctx"], settings["n_vocab"])
    for row, ids in enumerate(batch):
        expected = numpy_gpt2_logits(ids, params, settings["n_head"])
        np.testing.assert_allclose(logits[row], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        short[0], numpy_gpt2_logits(batch[0, :5], params, settings["n_head"]), rtol=0, atol=1e-5
    )
    assert np.abs(logits).max() > 0.1  # the comparison is not between near-zero numbers


def test_every_parameter_is_overwritten(gpt2):
    settings, params = gpt2
    model = GPTModel(model_config(settings))
    load_weights_into_gpt(model, params)
    state = model.state_dict()
    np.testing.assert_array_equal(state["tok_emb.weight"].numpy(), params["wte"])
    np.testing.assert_array_equal(state["out_head.weight"].numpy(), params["wte"])
    np.testing.assert_array_equal(state["pos_emb.weight"].numpy(), params["wpe"])
    np.testing.assert_array_equal(state["final_norm.scale"].numpy(), params["g"])
    w = params["blocks"][1]["attn"]["c_attn"]["w"]  # (in, 3 * out)
    n_embd = settings["n_embd"]
    np.testing.assert_array_equal(state["trf_blocks.1.att.W_key.weight"].numpy(), w[:, n_embd : 2 * n_embd].T)
    np.testing.assert_array_equal(
        state["trf_blocks.1.ff.layers.2.weight"].numpy(), params["blocks"][1]["mlp"]["c_proj"]["w"].T
    )
    assert all(p.requires_grad for p in model.parameters())


def test_assign_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"Left: torch.Size\(\[2, 3\]\), Right: \(3, 2\)"):
        assign(torch.zeros(2, 3), np.zeros((3, 2), dtype=np.float32))
    assert tuple(assign(torch.zeros(2, 3), np.ones((2, 3))).shape) == (2, 3)


def test_loading_into_a_model_of_the_wrong_size_names_the_parameter(gpt2):
    settings, params = gpt2
    wider = GPTModel(model_config(settings, emb_dim=2 * settings["n_embd"]))
    with pytest.raises(ValueError, match="wpe") as excinfo:
        load_weights_into_gpt(wider, params)
    assert str((settings["n_ctx"], settings["n_embd"])) in str(excinfo.value)

    deeper = GPTModel(model_config(settings, n_layers=settings["n_layer"] + 1))
    with pytest.raises(ValueError, match="blocks"):
        load_weights_into_gpt(deeper, params)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("change, message", [
    ({"n_layers": 1}, "The checkpoint has 2 blocks, the model 1: check the model size"),
    ({"n_layers": 3}, "The checkpoint has 2 blocks, the model 3: check the model size"),
    ({"vocab_size": 95}, "wte: the checkpoint's shape (96, 16) does not fit the model's (95, 16)"),
    ({"context_length": 32}, "wpe: the checkpoint's shape (16, 16) does not fit the model's (32, 16)"),
    ({"qkv_bias": False}, "blocks[0].attn.c_attn.b: the checkpoint has query/key/value biases and the "
                          "model has none; GPT-2 needs a model built with qkv_bias=True"),
], ids=["shallower", "deeper", "vocabulary", "context", "no-qkv-bias"])
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_copy(gpt2, change, message):
    """One error naming the checkpoint's parameter (one line and exit 2 from a command: a
    CheckpointError), and the model keeps its weights: nothing was half loaded."""
    from instructkit.errors import CheckpointError

    _, params = gpt2
    torch.manual_seed(0)
    model = GPTModel(model_config(HPARAMS, **change))
    before = _state(model)
    with pytest.raises(CheckpointError) as excinfo:
        load_weights_into_gpt(model, params)
    assert str(excinfo.value) == message
    assert isinstance(excinfo.value, ValueError)  # what the book's assign raises, too
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_parameter_of_another_shape_deep_inside_is_named(gpt2):
    """The checkpoint's parameter, by its place in OpenAI's layout, with both shapes."""
    from instructkit.gpt2_params import WeightsMismatchError

    settings, params = gpt2
    model = GPTModel(model_config(settings))
    blocks = [dict(block) for block in params["blocks"]]
    blocks[1] = {**blocks[1], "mlp": {**blocks[1]["mlp"], "c_proj": {
        "w": params["blocks"][1]["mlp"]["c_proj"]["w"][:-1], "b": params["blocks"][1]["mlp"]["c_proj"]["b"]}}}
    with pytest.raises(WeightsMismatchError, match=r"^blocks\[1\]\.mlp\.c_proj\.w: the checkpoint's "
                       r"shape \(63, 16\) does not fit the model's \(64, 16\)$"):
        load_weights_into_gpt(model, {**params, "blocks": blocks})
    without_g = {k: v for k, v in params.items() if k != "g"}
    with pytest.raises(WeightsMismatchError, match="^The checkpoint has no g: not GPT-2's parameter layout$"):
        load_weights_into_gpt(model, without_g)
    load_weights_into_gpt(model, params)  # the untouched checkpoint fits
