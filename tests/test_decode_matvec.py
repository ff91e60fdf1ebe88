"""Decoding's matrix-vector products (instructkit/parallel_matvec.py) through fast_gpt.

Forced parallel and forced plain, whatever the calibration would pick: fp32 greedy tokens
equal previous_chapters.generate's (batch 1 and batched, with the KV cache and past the
context length where the window is recomputed), on the project's model and on a LoRA model.
The calibration's choice is cached and overridden by the environment variable and by the
commands' flag. The bf16 decode mode runs. No timing is asserted: the calibration's decision
rule is checked on given timings.
"""

import pytest
import torch
import torch.nn.functional as F
from test_chat import ENTRIES, MAX_NEW, book_answer, chat_main, save_model
from test_fast_gpt import CONTEXT, MODELS
from test_previous_chapters import random_prompts

import fast_gpt as fg
import previous_chapters as pc
from instructkit import parallel_matvec as pm
from instructkit.errors import BadInputError
from instructkit.native_decode import decoder_for

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_decode_state")


@pytest.fixture
def small_cfg(tiny_cfg):
    from test_previous_chapters import VOCAB

    # emb_dim 64: the 64-row weights split into two blocks of 32 rows (BLOCK_ALIGN = 16)
    return {**tiny_cfg, "vocab_size": VOCAB, "emb_dim": 64}


@pytest.fixture
def split_blocks(monkeypatch):
    """The shapes of the weights that went through a SplitWeight (the real product runs)."""
    calls = []
    real = pm.SplitWeight.__call__

    def counting(self, x):
        calls.append(self.shape)
        return real(self, x)

    monkeypatch.setattr(pm.SplitWeight, "__call__", counting)
    return calls


@pytest.mark.parametrize("mode", ["parallel", "plain"])
@pytest.mark.parametrize("kind", ["project", "lora"])
@pytest.mark.parametrize("n_rows, prompt_len, new_tokens", [(1, 7, 20), (3, 12, 16), (2, 50, 30)],
                         ids=["single", "batch", "past-context"])
def test_forced_paths_give_the_plain_loops_tokens(small_cfg, split_blocks, mode, kind, n_rows,
                                                  prompt_len, new_tokens):
    model = MODELS[kind](small_cfg, seed=2)
    prompts = random_prompts(n_rows, prompt_len, seed=2)
    expected = pc.generate(model, prompts, new_tokens, CONTEXT)
    pm.set_mode(mode)
    assert torch.equal(fg.generate(model, prompts, new_tokens, CONTEXT), expected)
    assert len(set(expected[0, prompt_len:].tolist())) > 3  # a real path, not one token repeated
    if mode == "plain":
        assert split_blocks == []
    else:  # every linear layer was split, the output head (VOCAB rows) included
        shapes = set(split_blocks)
        d = small_cfg["emb_dim"]
        assert (d, d) in shapes  # queries, keys, values and the attention's output
        assert (small_cfg["vocab_size"], small_cfg["emb_dim"]) in shapes
        assert (4 * small_cfg["emb_dim"], small_cfg["emb_dim"]) in shapes
        assert (small_cfg["emb_dim"], 4 * small_cfg["emb_dim"]) in shapes


@pytest.mark.parametrize("mode", ["parallel", "plain"])
def test_forced_paths_in_left_padded_batches(small_cfg, split_blocks, mode):
    model = MODELS["lora"](small_cfg, seed=3)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 40, 12)]
    eos = small_cfg["vocab_size"] - 1
    expected = [pc.generate(model, torch.tensor([p]), 12, CONTEXT, eos_id=eos)[0, len(p):].tolist()
                for p in prompts]
    pm.set_mode(mode)
    assert fg.generate_batch(model, prompts, 12, CONTEXT, eos_id=eos) == expected
    assert bool(split_blocks) == (mode == "parallel")


def test_the_split_product_equals_f_linear():
    torch.manual_seed(0)
    weight, bias = torch.randn(101, 48), torch.randn(101)  # 101 rows: a remainder for 2 and 3 runs
    for shape in ((1, 1, 48), (3, 1, 48), (2, 48)):
        x = torch.randn(shape)
        for blocks in (2, 3, 200):  # 200 runs: more than the rows, all of them the remainder
            for b in (bias, None):
                got = pm.SplitWeight(weight, b, blocks)(x)
                assert got.shape == (*shape[:-1], 101) and got.is_contiguous()
                torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.fixture
def two_threads():
    """auto calibrates only where there is a second thread (one_thread restores the count)."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def test_the_calibration_is_cached_and_reused(small_cfg, two_threads):
    model = MODELS["project"](small_cfg, seed=4)
    prompts = random_prompts(1, 6, seed=4)
    # this model in fp32 at batch 1: the native step is offered too (tests/test_native_decode.py)
    native = decoder_for(model, 1)
    chooser = pm.MatvecChooser(torch.device("cpu"), 1, native=native)
    assert chooser.choice() is None  # nothing measured yet
    # fewer decode steps than the calibration needs: the timings wait for the next call
    fg.generate(model, prompts, 1 + pm.CALIBRATION_STEPS, CONTEXT)
    assert chooser.key not in pm.CHOICES and pm._timings[chooser.key]
    rest = (len(chooser.candidates) - 1) * pm.CALIBRATION_STEPS  # the steps still to time
    fg.generate(model, prompts, 1 + rest, CONTEXT)
    choice = pm.CHOICES[chooser.key]
    assert choice in ("parallel", "plain", "native") and chooser.key not in pm._timings
    assert pm.MatvecChooser(torch.device("cpu"), 1, native=native).choice() == choice
    assert f"batch 1, 2 threads (plain/parallel/native): {choice}" in pm.calibration_report()[0]
    # another batch size, or without the native step, is measured on its own
    assert pm.MatvecChooser(torch.device("cpu"), 3).choice() is None
    assert pm.MatvecChooser(torch.device("cpu"), 1).choice() is None
    torch.set_num_threads(1)
    # one thread and no native step: nothing to split, auto stays plain without measuring
    assert pm.MatvecChooser(torch.device("cpu"), 1).choice() == "plain"


def test_the_decision_rule_keeps_the_split_only_when_clearly_faster():
    def decide(plain, parallel):
        key = ("cpu", "test", 1, 2, ("plain", "parallel"))
        for a, b in zip(plain, parallel, strict=True):
            pm.record(key, "plain", a)
            pm.record(key, "parallel", b)
        return pm.CHOICES.pop(key)

    assert decide([10, 10, 11, 10], [8, 8, 9, 8]) == "parallel"
    assert decide([10, 10, 11, 10], [9.8, 9.7, 9.9, 9.8]) == "plain"  # within the margin
    assert decide([10, 10, 11, 10], [12, 12, 13, 12]) == "plain"
    # one lucky fast step among slow ones is not enough
    assert decide([10, 10, 10, 10], [7, 14, 14, 14]) == "plain"


def test_env_variable_and_flag_override_the_cached_choice(monkeypatch, two_threads):
    cpu = torch.device("cpu")
    key = pm.MatvecChooser(cpu, 1).key
    pm.CHOICES[key] = "parallel"
    chooser = pm.MatvecChooser(cpu, 1)
    assert chooser.choice() == "parallel" and chooser.current() is chooser.parallel
    pm.CHOICES[key] = "plain"
    chooser = pm.MatvecChooser(cpu, 1)
    assert chooser.choice() == "plain" and chooser.current() is chooser.plain
    pm.CHOICES[key] = "parallel"
    monkeypatch.setenv(pm.ENV_VAR, "plain")
    assert pm.MatvecChooser(cpu, 1).choice() == "plain"
    pm.set_mode("parallel")  # the flag wins over the environment variable
    assert pm.MatvecChooser(cpu, 1).choice() == "parallel"
    pm.set_mode(None)
    monkeypatch.setenv(pm.ENV_VAR, "fastest")
    with pytest.raises(BadInputError, match=pm.ENV_VAR):
        pm.MatvecChooser(cpu, 1)
    with pytest.raises(BadInputError, match="unknown decode matvec mode"):
        pm.set_mode("fastest")
    monkeypatch.delenv(pm.ENV_VAR)
    # not a CPU, or many rows: the library's own products, whatever the mode
    pm.set_mode("parallel")
    assert pm.MatvecChooser(torch.device("meta"), 1).choice() == "plain"
    assert pm.MatvecChooser(cpu, pm.MAX_ROWS + 1).choice() == "plain"


def test_the_commands_flags_set_the_mode_and_dtype():
    from instructkit.chat import build_arg_parser as chat_parser
    from instructkit.finetune_config import parse_finetune_args
    from instructkit.web_chat import build_arg_parser as web_parser

    args = chat_parser().parse_args(["m.pth", "--decode-matvec", "plain", "--decode-dtype", "bf16"])
    assert pm.apply_decode_arguments(args) is torch.bfloat16
    assert pm.current_mode() == "plain"
    args = web_parser().parse_args(["m.pth", "--decode-matvec", "parallel"])
    assert pm.apply_decode_arguments(args) is None and pm.current_mode() == "parallel"
    config, _ = parse_finetune_args(["--decode-dtype", "bf16", "--decode-matvec", "auto"])
    assert (config.decode_dtype, config.decode_matvec) == ("bf16", "auto")
    with pytest.raises(SystemExit):
        chat_parser().parse_args(["m.pth", "--decode-dtype", "fp8"])


@pytest.mark.parametrize("mode", ["parallel", "plain"])
def test_bf16_decoding_runs_and_stays_close(small_cfg, mode):
    model = MODELS["lora"](small_cfg, seed=5)
    prompts = random_prompts(2, 10, seed=5)
    pm.set_mode(mode)
    fp32 = fg.generate(model, prompts, 16, CONTEXT)
    bf16 = fg.generate(model, prompts, 16, CONTEXT, decode_dtype=torch.bfloat16)
    assert bf16.shape == fp32.shape and torch.equal(bf16[:, :10], prompts)
    assert torch.equal(bf16[:, 10], fp32[:, 10])  # the first token comes from the fp32 prefill
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model is untouched
    # the copies are made once, and made again when the weights change in place
    linear = model.out_head.linear
    first = pm.decode_weights(linear, torch.bfloat16)[0]
    assert first.dtype == torch.bfloat16 and pm.decode_weights(linear, torch.bfloat16)[0] is first
    with torch.no_grad():
        linear.weight.mul_(2)
    again = pm.decode_weights(linear, torch.bfloat16)[0]
    assert again is not first
    torch.testing.assert_close(again.float(), linear.weight, rtol=1e-2, atol=1e-3)


def test_bf16_answers_through_generate_responses(small_cfg, tokenizer):
    from gpt_instruction_finetuning import ALPACA
    from instructkit.answers import generate_responses

    model = MODELS["project"]({**small_cfg, "vocab_size": 50257}, seed=6)
    entries = [{"instruction": "Name a color.", "input": ""},
               {"instruction": "Rewrite the sentence.", "input": "The car is fast."}]
    answers = generate_responses(model, entries, tokenizer, ALPACA, max_new_tokens=8,
                                 progress=False, decode_dtype=torch.bfloat16)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def tiny_chat_model(folder, tokenizer):
    """A saved tiny model for the chat command: (its file, a question, the book's answer)."""
    from instructkit.gpt2_sizes import TEST_MODE_CONFIG

    torch.manual_seed(123)
    tiny_model = pc.GPTModel(TEST_MODE_CONFIG).eval()
    entry = ENTRIES[1]
    return save_model(folder, "tiny-sft", tiny_model), entry, book_answer(tiny_model, tokenizer, entry)


def test_the_chat_command_with_the_decode_flags(tmp_path, tokenizer, capsys, monkeypatch):
    """chat --decode-matvec parallel: the book's answer; --decode-dtype bf16: an answer too."""
    model_file, entry, expected = tiny_chat_model(tmp_path, tokenizer)
    code, out, err = chat_main(capsys, monkeypatch, model_file, entry["instruction"],
                               "--max-new-tokens", MAX_NEW, "--decode-matvec", "parallel")
    assert code == 0, err
    assert out == expected + "\n" and pm.current_mode() == "parallel"
    code, out, err = chat_main(capsys, monkeypatch, model_file, entry["instruction"],
                               "--max-new-tokens", MAX_NEW, "--decode-dtype", "bf16")
    assert code == 0, err
    assert out.endswith("\n") and len(out) > 1
    monkeypatch.setenv(pm.ENV_VAR, "fastest")  # a bad variable: one line, exit 2
    pm.set_mode(None)
    code, out, err = chat_main(capsys, monkeypatch, model_file, entry["instruction"])
    assert code == 2 and err.strip() == (f"error: {pm.ENV_VAR}='fastest': expected one of "
                                         f"auto, plain, parallel, native")
