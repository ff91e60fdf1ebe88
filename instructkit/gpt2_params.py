"""Whether GPT-2 parameters in OpenAI's layout fit a model in the book's layout.

`previous_chapters.load_weights_into_gpt` (the book's loader) copies OpenAI's arrays into the
model one by one. On a checkpoint that does not fit, the book's loop either stops halfway
(a half-loaded model, an error naming two shapes but not the parameter, an IndexError for a
checkpoint with more blocks) or, for a model with more blocks than the checkpoint, finishes
and leaves the last blocks random without a word. `check_params_fit` runs before the first
copy and refuses such a checkpoint with one error naming the checkpoint's parameter.

This module only reads shapes: it imports neither torch nor the book's files.
"""

from instructkit.errors import CheckpointError


class WeightsMismatchError(CheckpointError, ValueError):
    """Parameters that do not fit the model.

    A CheckpointError (a command prints one line and exits with 2) and a ValueError, the
    error the book's `assign` raises on a shape mismatch, which callers already catch.
    """


def check_params_fit(gpt, params):
    """Raise WeightsMismatchError unless `params` fits `gpt` everywhere the book's loader looks.

    gpt: a GPTModel in the book's layout (tok_emb, pos_emb, trf_blocks[i].{att, ff, norm1,
        norm2}, final_norm, out_head), before any LoRA layers are added.
    params: OpenAI's nested dict ("wte", "wpe", "blocks"[i]{"attn", "mlp", "ln_1", "ln_2"},
        "g", "b"), as gpt_download.download_and_load_gpt2 returns it.
    """
    if "blocks" not in params:
        raise WeightsMismatchError("The checkpoint has no 'blocks': not GPT-2's parameter layout")
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise WeightsMismatchError(f"The checkpoint has {len(params['blocks'])} blocks, "
                                   f"the model {len(gpt.trf_blocks)}: check the model size")
    for keys, expected in expected_shapes(gpt):
        name = param_name(keys)
        value = params
        for key in keys:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                raise WeightsMismatchError(f"The checkpoint has no {name}: not GPT-2's "
                                           "parameter layout") from None
        if expected is None:  # the model has no such parameter
            raise WeightsMismatchError(
                f"{name}: the checkpoint has query/key/value biases and the model has none; "
                "GPT-2 needs a model built with qkv_bias=True")
        if tuple(value.shape) != expected:
            raise WeightsMismatchError(f"{name}: the checkpoint's shape {tuple(value.shape)} "
                                       f"does not fit the model's {expected}")


def expected_shapes(gpt):
    """Yield (keys into params, the shape the model needs there), in the book loader's order.

    OpenAI stores each linear layer's weight as (in, out), the transpose of torch's (out, in),
    and the query, key and value weights side by side in one (in, 3 * out) array. None for
    the query/key/value bias of a model built without one (qkv_bias=False).
    """
    yield ("wpe",), shape(gpt.pos_emb.weight)
    yield ("wte",), shape(gpt.tok_emb.weight)
    for b, block in enumerate(gpt.trf_blocks):
        att, ff = block.att, block.ff
        out_dim, in_dim = shape(att.W_query.weight)
        yield ("blocks", b, "attn", "c_attn", "w"), (in_dim, 3 * out_dim)
        yield ("blocks", b, "attn", "c_attn", "b"), None if att.W_query.bias is None else (3 * out_dim,)
        yield ("blocks", b, "attn", "c_proj", "w"), shape(att.out_proj.weight)[::-1]
        yield ("blocks", b, "attn", "c_proj", "b"), shape(att.out_proj.bias)
        yield ("blocks", b, "mlp", "c_fc", "w"), shape(ff.layers[0].weight)[::-1]
        yield ("blocks", b, "mlp", "c_fc", "b"), shape(ff.layers[0].bias)
        yield ("blocks", b, "mlp", "c_proj", "w"), shape(ff.layers[2].weight)[::-1]
        yield ("blocks", b, "mlp", "c_proj", "b"), shape(ff.layers[2].bias)
        for ln, norm in (("ln_1", block.norm1), ("ln_2", block.norm2)):
            yield ("blocks", b, ln, "g"), shape(norm.scale)
            yield ("blocks", b, ln, "b"), shape(norm.shift)
    yield ("g",), shape(gpt.final_norm.scale)
    yield ("b",), shape(gpt.final_norm.shift)
    yield ("wte",), shape(gpt.out_head.weight)  # the output head shares the token embedding


def shape(tensor):
    return tuple(tensor.shape)


def param_name(keys):
    """("blocks", 3, "attn", "c_attn", "w") -> "blocks[3].attn.c_attn.w"."""
    name = ""
    for key in keys:
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    return name
