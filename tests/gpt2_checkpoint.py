"""Write a small random GPT-2 checkpoint in OpenAI's exact layout, for tests.

`write_gpt2_checkpoint(folder)` writes the seven files OpenAI serves per model size (a
TensorFlow 1 checkpoint saved by `tf.compat.v1.train.Saver`, `hparams.json`, and placeholder
tokenizer files) and returns the arrays it saved, by checkpoint variable name.
"""

import json
from pathlib import Path

import numpy as np

CHECKPOINT_FILE = 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'


def gpt2_variable_shapes(n_vocab, n_ctx, n_embd, n_layer):
    """Checkpoint variable names and shapes, as in OpenAI's GPT-2 checkpoints."""
    shapes = {"model/wte": (n_vocab, n_embd), "model/wpe": (n_ctx, n_embd)}
    for i in range(n_layer):
        h = f"model/h{i}"
        shapes |= {
            f"{h}/ln_1/g": (n_embd,),
            f"{h}/ln_1/b": (n_embd,),
            f"{h}/attn/c_attn/w": (1, n_embd, 3 * n_embd),
            f"{h}/attn/c_attn/b": (3 * n_embd,),
            f"{h}/attn/c_proj/w": (1, n_embd, n_embd),
            f"{h}/attn/c_proj/b": (n_embd,),
            f"{h}/ln_2/g": (n_embd,),
            f"{h}/ln_2/b": (n_embd,),
            f"{h}/mlp/c_fc/w": (1, n_embd, 4 * n_embd),
            f"{h}/mlp/c_fc/b": (4 * n_embd,),
            f"{h}/mlp/c_proj/w": (1, 4 * n_embd, n_embd),
            f"{h}/mlp/c_proj/b": (n_embd,),
        }
    shapes |= {"model/ln_f/g": (n_embd,), "model/ln_f/b": (n_embd,)}
    return shapes


def random_gpt2_arrays(n_vocab=64, n_ctx=16, n_embd=8, n_layer=2, seed=0):
    """{OpenAI variable name: float32 array} of a random GPT-2, made with NumPy alone."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in gpt2_variable_shapes(n_vocab, n_ctx, n_embd, n_layer).items():
        if name.endswith("/g"):  # layer-norm scales near one, like trained ones
            array = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            array = 0.2 * rng.standard_normal(shape)
        arrays[name] = array.astype(np.float32)
    return arrays


def write_gpt2_checkpoint(folder, n_vocab=64, n_ctx=16, n_embd=8, n_head=2, n_layer=2, seed=0):
    """Write a random GPT-2 checkpoint into `folder`; return {variable name: numpy array}.

    Skips the calling test where TensorFlow is not installed (requirements-tf.txt)."""
    import pytest

    tf = pytest.importorskip("tensorflow", reason="writing OpenAI's checkpoint layout needs TensorFlow")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = random_gpt2_arrays(n_vocab, n_ctx, n_embd, n_layer, seed)

    graph = tf.Graph()
    with graph.as_default():
        variables = {
            name: tf.compat.v1.Variable(array, name=name.replace("/", "_")) for name, array in arrays.items()
        }
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"), write_meta_graph=True)
    (folder / "checkpoint").write_text(CHECKPOINT_FILE, encoding="utf-8")

    hparams = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    (folder / "hparams.json").write_text(json.dumps(hparams, indent=2), encoding="utf-8")
    encoder = {f"tok{i}": i for i in range(n_vocab)}
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\nt o\nto k\n", encoding="utf-8")
    return arrays
