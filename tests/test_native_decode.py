"""The whole GPT-2 decode step in C (instructkit/native_decode.py, native_decode.c).

Built with this machine's compiler into a test folder. Its logits equal the plain path's to
float32 rounding, and are bit-identical for 1 and 2 threads; forced, its greedy tokens equal
previous_chapters.generate's (batch 1, past the context length too, with and without
biases, on shapes that leave remainders in every loop); the KV cache it writes equals the
plain path's. It is offered only where it applies, the calibration can pick it, and a machine
without a compiler (or whose compiler fails) gets the other paths, or one line where the user
forced it. No timing is asserted.
"""

import os

import pytest
import torch
from test_chat import MAX_NEW, chat_main
from test_decode_matvec import tiny_chat_model
from test_fast_gpt import CONTEXT, MODELS
from test_previous_chapters import VOCAB, random_prompts

import fast_gpt as fg
import previous_chapters as pc
from instructkit import native_decode as nd
from instructkit import parallel_matvec as pm
from instructkit.errors import BadInputError
from instructkit.fast_llm import fast_path

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_decode_state")


# emb_dim 72 (not a multiple of 16), 3 heads of 24, hidden 288, VOCAB 1024 + 3 rows: every
# loop of the C code has a remainder
ODD = {"vocab_size": VOCAB + 3, "context_length": CONTEXT, "emb_dim": 72, "n_heads": 3,
       "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture
def small_cfg(tiny_cfg):
    return {**tiny_cfg, "vocab_size": VOCAB}


@pytest.fixture
def native_steps(monkeypatch):
    """How many decode steps ran in C (the real step runs)."""
    calls = []
    real = nd.NativeDecoder.step

    def counting(self, token, kv_cache):
        calls.append(kv_cache.length)
        return real(self, token, kv_cache)

    monkeypatch.setattr(nd.NativeDecoder, "step", counting)
    return calls


def next_logits(model, prompt, native):
    """The logits after `prompt` (1, n), its last token through the plain path or the C step
    (native), and the KV cache they filled; the prompt's other tokens are the prefill of the
    model's own fast path (fast_gpt, or fast_llm for Qwen3 and Llama)."""
    family = fast_path(model)
    with torch.inference_mode():
        cache = fg.KVCache(model, 1, CONTEXT)
        family.hidden_states(model, prompt[:, :-1], cache)
        if native:
            decoder = nd.decoder_for(model, 1)
            assert decoder is not None, nd.unavailable_reason()
            return decoder.step(prompt[:, -1:], cache), cache
        hidden = family.hidden_states(model, prompt[:, -1:], cache)
        return fg.last_position_logits(model.out_head, hidden), cache


def assert_the_native_step_equals_the_plain_one(model, prompt):
    """Logits within 1e-5, and the keys and values in the cache (this position's included)."""
    n = prompt.shape[1]
    expected, plain_cache = next_logits(model, prompt, native=False)
    got, native_cache = next_logits(model, prompt, native=True)
    assert got.shape == (1, model.out_head.out_features)
    assert native_cache.length == plain_cache.length == n
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in ("keys", "values"):
        for native, plain in zip(getattr(native_cache, name), getattr(plain_cache, name), strict=True):
            torch.testing.assert_close(native[:, :, :n], plain[:, :, :n])


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_and_cache_equal_the_plain_paths(qkv_bias):
    model = MODELS["project"]({**ODD, "qkv_bias": qkv_bias}, seed=11)
    assert_the_native_step_equals_the_plain_one(model, random_prompts(1, 30, seed=11))


# Llama 3 / SmolLM2 and Qwen3 layouts: 6 query heads of 12 on 3 key/value heads (GQA), odd
# widths; Qwen3's head size is not emb_dim // n_heads and it normalises queries and keys
LLAMA = {"vocab_size": VOCAB + 3, "context_length": CONTEXT, "emb_dim": 60, "n_heads": 6,
         "n_layers": 2, "hidden_dim": 100, "head_dim": None, "n_kv_groups": 3, "rope_base": 500.0,
         "rope_freq": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_context_length": 16},
         "norm_eps": 1e-5, "qk_norm": False, "tie_embeddings": True, "dtype": torch.float32}
QWEN3 = {**LLAMA, "head_dim": 16, "rope_freq": None, "norm_eps": 1e-6, "tie_embeddings": False}


def llama_family_model(kind, seed, **changes):
    from instructkit.llama3 import Llama3Model
    from instructkit.qwen3 import Qwen3Model

    torch.manual_seed(seed)
    model = Llama3Model({**LLAMA, **changes}) if kind == "llama" else Qwen3Model({**QWEN3, **changes})
    with torch.no_grad():  # norms' scales away from 1, so that a missed scale shows
        for name, param in model.named_parameters():
            if name.endswith("scale"):
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_llama_and_qwen3_logits_and_cache_equal_the_plain_paths(kind):
    model = llama_family_model(kind, seed=21)
    assert_the_native_step_equals_the_plain_one(model, random_prompts(1, 30, seed=21))
    assert model.out_head.weight is not None and (kind == "llama") == (
        model.out_head.weight is model.tok_emb.weight)  # tied (Llama) and untied (Qwen3) heads


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_llama_and_qwen3_forced_native_tokens(kind, native_steps):
    from instructkit import fast_llm

    # untied: a tiny random model with a tied head tends to repeat its last token
    model = llama_family_model(kind, seed=22, tie_embeddings=False)
    prompts = random_prompts(1, 9, seed=22)
    pm.set_mode("plain")
    expected = fast_llm.generate(model, prompts, 20, CONTEXT)
    pm.set_mode("native")
    assert torch.equal(fast_llm.generate(model, prompts, 20, CONTEXT), expected)
    assert native_steps == list(range(9, 28)) and len(set(expected[0, 9:].tolist())) > 3
    model.final_norm = torch.nn.LayerNorm(LLAMA["emb_dim"])
    assert nd.layout_problem(model) == "a module the C step does not compute: LayerNorm"


def test_the_threads_split_rows_not_sums():
    """Each row's dot product is added in the same order whatever the thread count."""
    model = MODELS["project"](ODD, seed=12)
    prompt = random_prompts(1, 20, seed=12)
    one, _ = next_logits(model, prompt, native=True)
    torch.set_num_threads(2)
    try:
        two, _ = next_logits(model, prompt, native=True)
    finally:
        torch.set_num_threads(1)  # this module's other tests run on one thread (one_thread)
    assert torch.equal(one, two)


@pytest.mark.parametrize("cfg", [ODD, {**ODD, "emb_dim": 64, "n_heads": 4, "qkv_bias": False}],
                         ids=["odd-shapes", "no-bias"])
@pytest.mark.parametrize("prompt_len, new_tokens", [(7, 20), (50, 30)], ids=["single", "past-context"])
def test_forced_native_gives_the_plain_loops_tokens(cfg, native_steps, prompt_len, new_tokens):
    model = MODELS["project"](cfg, seed=13)
    prompts = random_prompts(1, prompt_len, seed=13)
    expected = pc.generate(model, prompts, new_tokens, CONTEXT)
    pm.set_mode("native")
    assert torch.equal(fg.generate(model, prompts, new_tokens, CONTEXT), expected)
    assert len(set(expected[0, prompt_len:].tolist())) > 3  # a real path, not one token repeated
    # every decode step within the context ran in C; past it the window is recomputed
    assert native_steps == list(range(prompt_len, min(CONTEXT, prompt_len + new_tokens - 1)))


def test_the_book_repositorys_model_takes_the_native_path(small_cfg, native_steps):
    model = MODELS["book_reference"](small_cfg, seed=14)
    prompts = random_prompts(1, 9, seed=14)
    expected = pc.generate(model, prompts, 12, CONTEXT)
    pm.set_mode("native")
    assert torch.equal(fg.generate(model, prompts, 12, CONTEXT), expected)
    assert len(native_steps) == 11


def test_offered_only_where_it_applies(small_cfg, native_steps):
    model = MODELS["project"](small_cfg, seed=15)
    assert nd.layout_problem(model) is None and nd.decoder_for(model, 1) is not None
    assert nd.decoder_for(model, 2) is None
    assert nd.decoder_for(model, 1, decode_dtype=torch.bfloat16) is None
    assert nd.decoder_for(model, 1, pad_mask=torch.ones(1, 3, dtype=torch.bool)) is None
    assert nd.layout_problem(MODELS["lora"](small_cfg, seed=15)) == \
        "a module the C step does not compute: LinearWithLoRA"
    # a hook on a module the C code stands in for would not run; on the embeddings it does
    handle = model.trf_blocks[1].norm2.register_forward_hook(lambda *args: None)
    assert nd.layout_problem(model) == "a LayerNorm has forward hooks, which the C step would skip"
    handle.remove()
    handle = model.tok_emb.register_forward_pre_hook(lambda *args: None)
    assert nd.layout_problem(model) is None
    handle.remove()
    dropout = MODELS["project"]({**small_cfg, "drop_rate": 0.1}, seed=15)
    assert "training" in nd.layout_problem(dropout.train()) and nd.layout_problem(dropout.eval()) is None
    assert nd.layout_problem(model.train()) is None  # no dropout to apply: training mode is the same
    assert "float32" in nd.layout_problem(model.eval().to(torch.bfloat16))
    # forced native where it does not apply: the split products, the same tokens
    lora = MODELS["lora"](small_cfg, seed=15)
    prompts = random_prompts(1, 8, seed=15)
    expected = pc.generate(lora, prompts, 10, CONTEXT)
    pm.set_mode("native")
    assert pm.MatvecChooser(torch.device("cpu"), 1).choice() == "parallel"
    assert torch.equal(fg.generate(lora, prompts, 10, CONTEXT), expected)
    batch = random_prompts(3, 8, seed=15)
    assert torch.equal(fg.generate(model.float(), batch, 10, CONTEXT),
                       pc.generate(model, batch, 10, CONTEXT))
    assert native_steps == []


def test_the_calibration_can_pick_it(small_cfg, native_steps):
    model = MODELS["project"](small_cfg, seed=16)
    prompts = random_prompts(1, 6, seed=16)
    native = nd.decoder_for(model, 1)
    key = pm.MatvecChooser(torch.device("cpu"), 1, native=native).key
    assert key[-1] == ("plain", "native")  # one thread: nothing to split
    expected = pc.generate(model, prompts, 2 * pm.CALIBRATION_STEPS + 2, CONTEXT)
    assert torch.equal(fg.generate(model, prompts, 2 * pm.CALIBRATION_STEPS + 2, CONTEXT), expected)
    assert pm.CHOICES[key] in ("plain", "native") and len(native_steps) >= pm.CALIBRATION_STEPS
    assert f"1 threads (plain/native): {pm.CHOICES[key]}" in pm.calibration_report()[0]


def test_the_environment_variable_forces_it_and_the_flag_wins(small_cfg, monkeypatch):
    cpu, native = torch.device("cpu"), nd.decoder_for(MODELS["project"](small_cfg, seed=19), 1)
    monkeypatch.setenv(pm.ENV_VAR, "native")
    chooser = pm.MatvecChooser(cpu, 1, native=native)
    # past the context a whole window is recomputed: through the split products
    assert chooser.choice() == "native" and chooser.current() is chooser.parallel
    with chooser.step() as path:
        assert path is native
    assert pm.MatvecChooser(cpu, 1).choice() == "parallel"  # where it does not apply
    pm.set_mode("plain")
    assert pm.MatvecChooser(cpu, 1, native=native).choice() == "plain"


@pytest.mark.parametrize("mode", ["plain", "parallel"])
def test_a_forced_mode_or_a_batch_never_builds_the_library(small_cfg, monkeypatch, mode):
    def no_build():
        raise AssertionError("the C library was loaded")

    monkeypatch.setattr(nd, "load_library", no_build)
    model = MODELS["project"](small_cfg, seed=20)
    batch = random_prompts(2, 6, seed=20)
    assert torch.equal(fg.generate(model, batch, 6, CONTEXT), pc.generate(model, batch, 6, CONTEXT))
    pm.set_mode(mode)
    prompt = random_prompts(1, 6, seed=20)
    assert torch.equal(fg.generate(model, prompt, 6, CONTEXT), pc.generate(model, prompt, 6, CONTEXT))


def test_the_decision_rule_over_three_paths():
    key = ("cpu", "test", 1, 2, ("plain", "parallel", "native"))

    def decide(plain, parallel, native):
        for a, b, c in zip(plain, parallel, native, strict=True):
            for path, seconds in (("plain", a), ("parallel", b), ("native", c)):
                pm.record(key, path, seconds)
        return pm.CHOICES.pop(key)

    assert decide([10] * 4, [8] * 4, [6] * 4) == "native"
    assert decide([10] * 4, [6] * 4, [8] * 4) == "parallel"
    assert decide([10] * 4, [9.9] * 4, [12] * 4) == "plain"  # within the margin, or slower
    assert decide([10] * 4, [8] * 4, [5, 14, 14, 14]) == "parallel"  # one lucky step is not enough


def test_the_library_is_built_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv(nd.DIR_ENV_VAR, str(tmp_path / "lib"))
    compiler = nd.find_compiler()
    assert compiler is not None  # CI's machine has gcc
    first = nd.build(compiler, nd.native_dir())
    stamp = first.stat().st_mtime_ns
    assert nd.build(compiler, nd.native_dir()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no half-written file
    assert nd.load_library() is not None and nd.unavailable_reason() is None


def test_no_compiler_leaves_the_other_paths(tmp_path, monkeypatch, small_cfg, capsys, tokenizer):
    monkeypatch.setenv(nd.DIR_ENV_VAR, str(tmp_path / "lib"))
    monkeypatch.setattr(nd, "find_compiler", lambda environ=os.environ: None)
    model = MODELS["project"](small_cfg, seed=17)
    assert nd.decoder_for(model, 1) is None
    assert nd.unavailable_reason() == "no C compiler found (set CC, or install gcc or clang)"
    prompts = random_prompts(1, 6, seed=17)
    assert torch.equal(fg.generate(model, prompts, 8, CONTEXT), pc.generate(model, prompts, 8, CONTEXT))
    pm.set_mode("native")
    with pytest.raises(BadInputError, match="^--decode-matvec native: no C compiler found"):
        fg.generate(model, prompts, 8, CONTEXT)


def test_windows_gets_the_other_paths(monkeypatch, small_cfg):
    import sys

    monkeypatch.setattr(sys, "platform", "win32")
    assert nd.decoder_for(MODELS["project"](small_cfg, seed=18), 1) is None
    assert nd.unavailable_reason() == "no native decode on Windows (it needs gcc or clang and OpenMP)"


def test_a_failing_compiler_is_named_and_leaves_no_file(tmp_path, monkeypatch):
    folder = tmp_path / "lib"
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="could not compile native_decode.c: cc: error: unrecog"):
        nd.build([str(broken)], folder)
    assert list(folder.iterdir()) == []
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv(nd.DIR_ENV_VAR, str(folder))
    assert nd.load_library() is None and "could not compile" in nd.unavailable_reason()


def test_the_chat_command_forced_native(tmp_path, tokenizer, capsys, monkeypatch, native_steps):
    """chat --decode-matvec native: the book's answer, through the C step."""
    model_file, entry, expected = tiny_chat_model(tmp_path, tokenizer)
    code, out, err = chat_main(capsys, monkeypatch, model_file, entry["instruction"],
                               "--max-new-tokens", MAX_NEW, "--decode-matvec", "native")
    assert code == 0, err
    assert out == expected + "\n" and native_steps
    monkeypatch.setattr(nd, "find_compiler", lambda environ=os.environ: None)
    nd.reset()
    code, out, err = chat_main(capsys, monkeypatch, model_file, entry["instruction"],
                               "--decode-matvec", "native")
    assert code == 2 and err.strip() == ("error: --decode-matvec native: no C compiler found (set "
                                         "CC, or install gcc or clang); use auto, parallel or plain")
