"""fast_gpt.py against the plain path of previous_chapters.py (and the book's own model).

Every speed-up must give what the book's code gives: the same greedy tokens (one prompt,
batches with per-row end-of-text, left-padded prompts, the streamed tokens), the same loss
and gradients within float tolerance, the same weights after AdamW steps. The models: the
project's GPTModel (the book's chapter 7 code: the residual dropout is `drop_resid`), the same
with LoRA layers, and tests/book_reference.py's independent implementation, which fast_gpt
has never seen (chapter 4's name, `drop_shortcut`).
"""

import copy
import gc
import io
import math
import re
from contextlib import redirect_stdout

import book_reference as book
import pytest
import torch
from test_previous_chapters import VOCAB, first_steps, random_prompts
from torch.utils.data import DataLoader

import exercise_variants as ev
import fast_gpt as fg
import previous_chapters as pc
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn

CONTEXT = 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_cfg(tiny_cfg):
    return {**tiny_cfg, "vocab_size": VOCAB}


def project_model(cfg, seed):
    torch.manual_seed(seed)
    return pc.GPTModel(cfg).eval()


def lora_model(cfg, seed):
    model = project_model(cfg, seed)
    model.requires_grad_(False)
    ev.replace_linear_with_lora(model, rank=4, alpha=8)
    with torch.no_grad():  # B starts at zero: give the LoRA layers a real effect
        for module in model.modules():
            if isinstance(module, ev.LoRALayer):
                module.B.normal_(0.0, 0.05)
    return model.eval()


def book_model(cfg, seed):
    torch.manual_seed(seed)
    return book.GPTModel(cfg).eval()


MODELS = {"project": project_model, "lora": lora_model, "book_reference": book_model}
model_kinds = pytest.mark.parametrize("kind", list(MODELS))


def padded_batch(seed):
    """Three rows of different real lengths, padded (-100 targets) as the chapter pads them."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB - 1, (n,), generator=gen).tolist() for n in (20, 9, 14)]
    return custom_collate_fn(seqs, pad_token_id=VOCAB - 1)


########################################################################################
# Generation: the same tokens as the book's loop
########################################################################################

@model_kinds
@pytest.mark.parametrize("n_rows, prompt_len, new_tokens", [(1, 7, 20), (3, 12, 16), (2, 50, 30)],
                         ids=["single", "batch", "past-context"])
def test_greedy_tokens_equal_the_plain_loop(small_cfg, kind, n_rows, prompt_len, new_tokens):
    model = MODELS[kind](small_cfg, seed=1)
    prompts = random_prompts(n_rows, prompt_len, seed=1)
    plain = pc.generate(model, prompts, new_tokens, CONTEXT)
    fast = fg.generate(model, prompts, new_tokens, CONTEXT)
    assert fast.shape == (n_rows, prompt_len + new_tokens)
    assert torch.equal(fast, plain)
    assert len(set(fast[0, prompt_len:].tolist())) > 3  # a real path, not one token repeated
    if kind == "book_reference" and n_rows == 1:
        assert torch.equal(fast, book.generate(model, prompts, new_tokens, CONTEXT))


def test_batched_rows_stop_on_their_own(small_cfg):
    model = project_model(small_cfg, seed=0)
    prompts = random_prompts(6, 10, seed=0)
    steps = 24
    news = pc.generate(model, prompts, steps, CONTEXT)[:, 10:].tolist()
    firsts = [first_steps(row) for row in news]
    # rows i, j and a token that reaches row i before row j
    i, j, eos = next((i, j, t) for i in range(6) for j in range(6) for t in firsts[i]
                     if i != j and t in firsts[j] and firsts[i][t] < firsts[j][t])
    never = next(r for r in range(6) if eos not in firsts[r])
    for rows in ([i, j], [i, never]):
        plain = pc.generate(model, prompts[rows], steps, CONTEXT, eos_id=eos)
        fast = fg.generate(model, prompts[rows], steps, CONTEXT, eos_id=eos)
        assert torch.equal(fast, plain)
        assert fast[0, 10 + firsts[i][eos]:].eq(eos).all()  # the finished row is padded with eos
    assert fast.shape == (2, 10 + steps)


def test_generate_batch_left_padded_equals_one_by_one(small_cfg):
    model = project_model(small_cfg, seed=11)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 60, 12, 31)]
    max_new = 10
    alone = pc.generate(model, torch.tensor([prompts[0]]), max_new, CONTEXT)[0, 5:].tolist()
    eos = next(t for t, s in first_steps(alone).items() if s >= 4)  # row 0 stops at step >= 4

    expected = [pc.generate(model, torch.tensor([p]), max_new, CONTEXT, eos_id=eos)[0, len(p):].tolist()
                for p in prompts]
    assert len(expected[0]) == first_steps(alone)[eos] < max_new
    assert any(len(e) == max_new for e in expected)
    assert fg.generate_batch(model, prompts, max_new, CONTEXT, eos_id=eos) == expected
    # a pad id that is a real token changes nothing: the padding is masked out
    assert fg.generate_batch(model, prompts, max_new, CONTEXT, eos_id=eos, pad_id=7) == expected
    # many prompts, sorted by length into batches of 3, come back in their order
    many = prompts + [prompts[2][:7], prompts[1][10:]]
    want = expected + [fg.generate_batch(model, [p], max_new, CONTEXT, eos) [0] for p in many[4:]]
    assert fg.generate_answer_ids(model, many, max_new, CONTEXT, eos, batch_size=3) == want


@model_kinds
def test_generate_stream_yields_generates_tokens(small_cfg, kind):
    model = MODELS[kind](small_cfg, seed=6)
    prompt = random_prompts(1, 6, seed=6)
    new = fg.generate(model, prompt, 15, CONTEXT)[0, 6:].tolist()
    streamed = list(fg.generate_stream(model, prompt, 15, CONTEXT))
    assert streamed == new and all(type(t) is int for t in streamed)

    eos, k = next((t, s) for t, s in first_steps(new).items() if s >= 3)
    assert list(fg.generate_stream(model, prompt, 15, CONTEXT, eos_id=eos)) == new[:k]
    assert pc.generate(model, prompt, 15, CONTEXT, eos_id=eos)[0, 6:].tolist() == new[:k]
    assert list(fg.generate_stream(model, prompt, 15, CONTEXT, eos_id=new[0])) == []
    with pytest.raises(ValueError, match="one prompt"):
        next(fg.generate_stream(model, random_prompts(2, 6, seed=6), 5, CONTEXT))


def test_sampling_draws_the_plain_loops_tokens(small_cfg):
    model = project_model(small_cfg, seed=9)
    prompt = random_prompts(1, 6, seed=9)
    torch.manual_seed(42)
    plain = pc.generate(model, prompt, 15, CONTEXT, temperature=1.5, top_k=5)
    torch.manual_seed(42)
    fast = fg.generate(model, prompt, 15, CONTEXT, temperature=1.5, top_k=5)
    torch.manual_seed(42)
    streamed = list(fg.generate_stream(model, prompt, 15, CONTEXT, temperature=1.5, top_k=5))
    assert torch.equal(fast, plain)
    assert streamed == plain[0, 6:].tolist()
    greedy = pc.generate(model, prompt, 15, CONTEXT)
    assert not torch.equal(plain, greedy)  # it really sampled


def test_sample_next_token_greedy_top_k_and_huge_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 0.0]])
    assert fg.sample_next_token(logits).tolist() == [[1], [0]]
    assert fg.sample_next_token(logits, top_k=2).tolist() == [[1], [0]]
    torch.manual_seed(0)
    draws = torch.cat([fg.sample_next_token(logits, temperature=10.0, top_k=2) for _ in range(200)], 1)
    assert set(draws[0].tolist()) == {1, 3} and set(draws[1].tolist()) == {0, 2}  # each row's own top 2

    huge = torch.tensor([[1e4, 0.0, -1e4, 9990.0], [-1e4, 1e4, 1e4 - 1, 0.0]])
    for temperature in (0.5, 1.0, 100.0):
        for top_k in (None, 3):
            with torch.no_grad():
                tok = fg.sample_next_token(huge.clone(), temperature=temperature, top_k=top_k)
            assert tok.shape == (2, 1)
            assert tok[0, 0].item() in {0, 3} and tok[1, 0].item() in {1, 2}
    # temperature 0.5 turns a gap of 10 into 20 nats: effectively certain
    assert fg.sample_next_token(huge[:1], temperature=0.5).item() == 0


def test_batched_sampling_draws_the_plain_loops_tokens(small_cfg):
    """Top-k and temperature on a batch: fast_gpt's sampling and previous_chapters.generate's
    inline code draw the same tokens for the same seed."""
    model = project_model(small_cfg, seed=19)
    prompts = random_prompts(3, 8, seed=19)
    torch.manual_seed(7)
    plain = pc.generate(model, prompts, 12, CONTEXT, temperature=1.2, top_k=8)
    torch.manual_seed(7)
    fast = fg.generate(model, prompts, 12, CONTEXT, temperature=1.2, top_k=8)
    assert torch.equal(fast, plain)
    assert not torch.equal(plain, pc.generate(model, prompts, 12, CONTEXT))  # it really sampled


def test_hidden_states_with_cache_match_a_full_forward(small_cfg):
    model = project_model(small_cfg, seed=8)
    seq = random_prompts(2, 30, seed=8)
    cache = fg.KVCache(model, 2, 30)
    with torch.no_grad():
        parts = [fg.hidden_states(model, seq[:, :20], cache)]
        parts += [fg.hidden_states(model, seq[:, t:t + 1], cache) for t in range(20, 30)]
        full = fg.hidden_states(model, seq)
        logits = model(seq)
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.out_head(full), logits, atol=1e-5, rtol=1e-5)


########################################################################################
# Both names of the residual dropout: drop_resid (chapters 6, 7) and drop_shortcut (4, 5)
########################################################################################

class Scale(torch.nn.Module):
    """A deterministic stand-in for the residual dropout: a path that skipped it, or called
    another module, would give other tokens and losses."""

    def forward(self, x):
        return 0.75 * x


def test_the_two_models_name_the_dropout_differently(small_cfg):
    ours, ref = project_model(small_cfg, seed=0), book_model(small_cfg, seed=0)
    for block in ours.trf_blocks:
        assert not hasattr(block, "drop_shortcut") and fg.residual_dropout(block) is block.drop_resid
    for block in ref.trf_blocks:
        assert not hasattr(block, "drop_resid") and fg.residual_dropout(block) is block.drop_shortcut
    del ours.trf_blocks[0].drop_resid
    with pytest.raises(AttributeError, match="drop_resid, drop_shortcut"):
        fg.hidden_states(ours, random_prompts(1, 4, seed=0))


@pytest.mark.parametrize("kind, name", [("project", "drop_resid"), ("book_reference", "drop_shortcut")])
def test_fast_paths_use_the_residual_dropout_by_either_name(small_cfg, kind, name):
    model = MODELS[kind](small_cfg, seed=20)
    prompts = [random_prompts(1, n, seed=20 + n)[0].tolist() for n in (5, 17, 9, 30)]
    unscaled = pc.generate(model, torch.tensor([prompts[0]]), 12, CONTEXT)
    for block in model.trf_blocks:
        setattr(block, name, Scale())
    assert not torch.equal(pc.generate(model, torch.tensor([prompts[0]]), 12, CONTEXT), unscaled)

    # Greedy answers, one prompt and batched (left-padded), as the plain loop gives them
    alone = pc.generate(model, torch.tensor([prompts[0]]), 12, CONTEXT)
    assert torch.equal(fg.generate(model, torch.tensor([prompts[0]]), 12, CONTEXT), alone)
    eos = next(t for t, s in first_steps(alone[0, 5:].tolist()).items() if s >= 3)
    expected = [pc.generate(model, torch.tensor([p]), 12, CONTEXT, eos_id=eos)[0, len(p):].tolist()
                for p in prompts]
    assert len(expected[0]) < 12  # one answer stops at eos
    assert fg.generate_answer_ids(model, prompts, 12, CONTEXT, eos, batch_size=3) == expected

    # The packed loss and its gradients
    model.train()
    inputs, targets = padded_batch(seed=20)
    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = fg.calc_loss_batch_packed(inputs, targets, model, "cpu")
    packed.backward()
    assert packed.item() == pytest.approx(loss.item(), abs=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


########################################################################################
# Loss and gradients
########################################################################################

@model_kinds
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "whole-batch"])
def test_packed_loss_and_gradients_equal_calc_loss_batch(small_cfg, kind, pack, monkeypatch):
    # pack=False: what a CUDA GPU runs (fast_gpt.packs_rows), forced here on the CPU
    monkeypatch.setattr(fg, "packs_rows", lambda device: pack)
    model = MODELS[kind](small_cfg, seed=12).train()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, targets = padded_batch(seed=12)
    assert (targets == -100).sum() >= 10

    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    packed = fg.calc_loss_batch_packed(inputs, targets, model, "cpu")
    packed.backward()

    assert packed.item() == pytest.approx(loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads.values())
    # the sum and the count it comes from
    loss_sum, count = fg.loss_sum_and_count(inputs, targets, model, "cpu")
    assert count.item() == (targets != -100).sum().item()
    assert (loss_sum / count).item() == pytest.approx(loss.item(), abs=1e-5)
    # the model is used, not changed
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())


def test_rows_are_packed_everywhere_but_on_a_cuda_gpu():
    assert fg.packs_rows(torch.device("cpu")) and fg.packs_rows(torch.device("mps"))
    assert not fg.packs_rows(torch.device("cuda")) and not fg.packs_rows(torch.device("cuda:1"))


def test_loss_loader_and_evaluation_equal_the_plain_ones(small_cfg):
    model = project_model(small_cfg, seed=13)
    batches = [padded_batch(seed=s) for s in range(3)]
    with torch.no_grad():
        for n in (None, 1, 2, 99):
            assert fg.calc_loss_loader_fast(batches, model, "cpu", n) == pytest.approx(
                pc.calc_loss_loader(batches, model, "cpu", n), rel=1e-5)
    assert math.isnan(fg.calc_loss_loader_fast([], model, "cpu"))
    model.train()
    fast = fg.evaluate_model_fast(model, batches, batches[1:], "cpu", eval_iter=2)
    plain = pc.evaluate_model(model, batches, batches[1:], "cpu", eval_iter=2)
    assert fast == pytest.approx(plain, rel=1e-5)
    assert model.training  # back in training mode, as evaluate_model leaves it


def test_compiled_blocks_give_the_same_loss(small_cfg):
    model = project_model(small_cfg, seed=14).train()
    inputs, targets = padded_batch(seed=14)
    eager = fg.calc_loss_batch_packed(inputs, targets, model, "cpu").item()
    keys = list(model.state_dict())
    fg.compile_blocks(model, backend="eager")  # dynamo's tracing without code generation: quick
    assert fg.calc_loss_batch_packed(inputs, targets, model, "cpu").item() == pytest.approx(eager, abs=1e-6)
    assert list(model.state_dict()) == keys and type(model) is pc.GPTModel  # not patched
    prompt = random_prompts(1, 5, seed=14)
    assert torch.equal(fg.generate(model.eval(), prompt, 5, CONTEXT), pc.generate(model, prompt, 5, CONTEXT))
    # fast_gpt remembers the blocks weakly: a deleted model leaves nothing behind
    assert all(block in fg._COMPILED_BLOCKS for block in model.trf_blocks)
    before = len(fg._COMPILED_BLOCKS)
    del model
    gc.collect()
    assert len(fg._COMPILED_BLOCKS) == before - small_cfg["n_layers"]


########################################################################################
# Training
########################################################################################

@pytest.fixture(scope="module")
def loaders(instruction_data, tokenizer):
    """Real instruction batches: 12 training entries (3 batches of 4), 8 validation entries."""
    collate = lambda batch: custom_collate_fn(batch, allowed_max_length=40)  # noqa: E731
    train = DataLoader(InstructionDataset(instruction_data[:12], tokenizer), batch_size=4,
                       collate_fn=collate)
    val = DataLoader(InstructionDataset(instruction_data[12:20], tokenizer), batch_size=4,
                     collate_fn=collate)
    return train, val


@pytest.mark.parametrize("kind, num_epochs, start_context",
                         [("project", 2, "Below is an instruction"), ("lora", 1, None)])
def test_train_model_fast_equals_train_model_simple(tiny_cfg, loaders, tokenizer, kind, num_epochs,
                                                    start_context):
    train_loader, val_loader = loaders
    start = MODELS[kind](tiny_cfg, seed=15)
    results, weights, printed = {}, {}, {}
    for name, train in (("plain", pc.train_model_simple), ("fast", fg.train_model_fast)):
        model = copy.deepcopy(start)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=5e-3, weight_decay=0.1)
        out = io.StringIO()
        with redirect_stdout(out):
            results[name] = train(model, train_loader, val_loader, optimizer, "cpu", num_epochs,
                                  eval_freq=2, eval_iter=1, start_context=start_context,
                                  tokenizer=tokenizer)
        weights[name] = model.state_dict()
        printed[name] = out.getvalue().splitlines()

    plain, fast = results["plain"], results["fast"]
    assert len(fast[0]) == (3 if num_epochs == 2 else 2)  # steps 0, 2 (, 4)
    assert fast[2] == plain[2]  # the same tokens seen
    assert fast[0] == pytest.approx(plain[0], rel=1e-4) and fast[1] == pytest.approx(plain[1], rel=1e-4)
    assert fast[0][-1] < fast[0][0]  # it learned
    # Every weight moved about 3 to 6 steps x lr = 1.5e-2 to 3e-2; the two agree to 1e-4 (AdamW divides by
    # the gradient's root mean square, so float noise in tiny gradients becomes visible). The
    # key biases are left out: their exact gradient is zero (a key bias adds the same amount
    # to a query's every score, which softmax ignores), so both runs move them by noise alone.
    moved = 0
    for key, value in weights["plain"].items():
        if not key.endswith("att.W_key.bias"):
            torch.testing.assert_close(weights["fast"][key], value, atol=1e-4, rtol=0)
        moved += (value - start.state_dict()[key]).abs().max() > 1e-2
    assert moved >= 10
    # the same printed lines: the same evaluations (to 3 decimals) and the same samples
    pattern = re.compile(r"Ep \d \(Step \d{6}\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}")
    evaluations = [True, True, False, True, False] if start_context else [True, True]
    assert [bool(pattern.fullmatch(line)) for line in printed["fast"]] == evaluations
    assert printed["fast"] == printed["plain"]


def test_make_optimizer_fused_over_trainable_parameters(small_cfg):
    model = lora_model(small_cfg, seed=16)
    optimizer = fg.make_optimizer(model, lr=1e-3, weight_decay=0.1)
    params = optimizer.param_groups[0]["params"]
    assert len(params) == 2 * sum(isinstance(m, ev.LinearWithLoRA) for m in model.modules())
    assert all(p.requires_grad for p in params)
    assert optimizer.defaults["fused"] is True  # this torch has a fused AdamW for CPUs
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.1
    with torch.device("meta"):  # no fused kernels for the meta device: the plain AdamW
        meta = pc.GPTModel(small_cfg)
    assert not fg.make_optimizer(meta, 1e-3, 0.1).defaults["fused"]
