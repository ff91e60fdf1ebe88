"""previous_chapters.py: the book's GPT model, generation, loss, training, weight assignment, LoRA.

The book's own code lives in book_reference.py (written independently, structured as the
book's chapter 4); the project's model must load its checkpoints and compute what it computes.
"""

import copy
import math
import re

import book_reference as book
import matplotlib
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import previous_chapters as pc
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn

VOCAB = 1024  # the generation and model tests need no real token ids: a small vocabulary is faster


# Tiny models: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_cfg(tiny_cfg):
    """tiny_cfg (context 64) with a small vocabulary."""
    return {**tiny_cfg, "vocab_size": VOCAB}


def make_model(cfg, seed=123, **overrides):
    torch.manual_seed(seed)
    return pc.GPTModel({**cfg, **overrides}).eval()


def book_copy(model, cfg):
    """A book-reference model holding exactly `model`'s weights."""
    ref = book.GPTModel(cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def random_prompts(n_rows, n_tokens, seed, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_rows, n_tokens), generator=gen)


def first_steps(tokens):
    """{token: the first step at which it appears} for a list of generated tokens."""
    steps = {}
    for step, tok in enumerate(tokens):
        steps.setdefault(tok, step)
    return steps


def padded_batch(seed=0, vocab=VOCAB):
    """Two rows of different real lengths, padded as custom_collate_fn pads them."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in (20, 9)]
    return custom_collate_fn(seqs, pad_token_id=vocab - 1)


########################################################################################
# The model: state-dict compatibility and the book's numbers
########################################################################################

def test_state_dict_keys_equal_the_books(tiny_cfg):
    ours, ref = pc.GPTModel(tiny_cfg), book.GPTModel(tiny_cfg)
    keys = list(ours.state_dict())
    assert keys == list(ref.state_dict())
    for n in range(tiny_cfg["n_layers"]):
        assert f"trf_blocks.{n}.att.mask" in keys
    assert "out_head.bias" not in keys
    assert "final_norm.scale" in keys and "final_norm.shift" in keys
    mask = ours.state_dict()["trf_blocks.0.att.mask"]
    ctx = tiny_cfg["context_length"]
    assert torch.equal(mask, torch.triu(torch.ones(ctx, ctx), diagonal=1))


def test_load_state_dict_both_ways_gives_equal_logits(small_cfg):
    batch = random_prompts(2, 17, seed=1)

    ours = make_model(small_cfg, seed=1)
    ref = book.GPTModel(small_cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # ours -> book
    torch.testing.assert_close(ours(batch), ref(batch), atol=1e-5, rtol=1e-5)

    torch.manual_seed(2)
    ref2 = book.GPTModel(small_cfg).eval()
    ours2 = pc.GPTModel(small_cfg).eval()
    ours2.load_state_dict(ref2.state_dict(), strict=True)  # book -> ours
    with torch.no_grad():
        torch.testing.assert_close(ours2(batch), ref2(batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(batch), ours2(batch))  # the weights really moved


def test_logits_and_loss_equal_the_books(small_cfg):
    model = make_model(small_cfg, seed=3)
    ref = book_copy(model, small_cfg)
    inputs, targets = padded_batch(seed=3)
    assert (targets == -100).any()
    with torch.no_grad():
        logits = model(inputs)
        assert logits.shape == (2, inputs.shape[1], small_cfg["vocab_size"])
        torch.testing.assert_close(logits, ref(inputs), atol=1e-5, rtol=1e-5)
        loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
        ref_loss = book.calc_loss_batch(inputs, targets, ref, "cpu")
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


@pytest.mark.parametrize("train_mode", [False, True])
def test_sdpa_and_explicit_attention_agree(small_cfg, train_mode):
    sdpa = make_model(small_cfg, seed=4)
    explicit = pc.GPTModel({**small_cfg, "use_sdpa": False})
    explicit.load_state_dict(sdpa.state_dict(), strict=True)
    assert sdpa.trf_blocks[0].att.use_sdpa and not explicit.trf_blocks[0].att.use_sdpa
    sdpa.train(train_mode)
    explicit.train(train_mode)
    batch = random_prompts(3, 40, seed=4)
    torch.testing.assert_close(sdpa(batch), explicit(batch), atol=1e-5, rtol=1e-5)
    # and the explicit path is the book's
    torch.testing.assert_close(explicit(batch), book_copy(sdpa, small_cfg).train(train_mode)(batch),
                               atol=1e-5, rtol=1e-5)


def test_book_components_match():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3
    torch.testing.assert_close(pc.GELU()(x), book.GELU()(x), atol=1e-6, rtol=1e-5)
    ours, ref = pc.LayerNorm(16), book.LayerNorm(16)
    with torch.no_grad():
        for p in (*ours.parameters(), *ref.parameters()):
            p.copy_(torch.linspace(-1, 2, 16))
    assert ours.eps == 1e-5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    out = pc.LayerNorm(16)(x)  # scale 1, shift 0: zero mean, unit (biased) variance
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)


########################################################################################
# Sizes and configs
########################################################################################

def test_gpt2_config_sizes_and_unknown_name():
    cfg = pc.gpt2_config("gpt2-medium (355M)")
    assert cfg == {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True,
                   "emb_dim": 1024, "n_layers": 24, "n_heads": 16}
    assert pc.gpt2_config("gpt2-xl (1558M)")["n_heads"] == 25
    with pytest.raises(ValueError, match="gpt2-huge"):
        pc.gpt2_config("gpt2-huge")


def test_gpt2_medium_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = pc.GPTModel(pc.gpt2_config("gpt2-medium (355M)"))
    assert model.out_head.weight.is_meta
    assert sum(p.numel() for p in model.parameters()) == 406_286_336


########################################################################################
# Generation
########################################################################################

def test_greedy_generation_is_deterministic_and_the_books(small_cfg):
    model = make_model(small_cfg, seed=5)
    ref = book_copy(model, small_cfg)
    prompt = random_prompts(1, 8, seed=5)
    out1 = pc.generate(model, prompt, max_new_tokens=12, context_size=64)
    out2 = pc.generate(model, prompt, max_new_tokens=12, context_size=64)
    assert out1.shape == (1, 20)
    assert torch.equal(out1[:, :8], prompt)
    assert torch.equal(out1, out2)
    assert torch.equal(out1, book.generate(ref, prompt, 12, 64))
    assert torch.equal(out1, pc.generate_text_simple(model, prompt, 12, 64))
    assert len(set(out1[0, 8:].tolist())) > 3  # a real path, not one token repeated


def test_generate_stops_before_eos_like_the_book(small_cfg):
    model = make_model(small_cfg, seed=6)
    ref = book_copy(model, small_cfg)
    prompt = random_prompts(1, 6, seed=6)
    new = pc.generate(model, prompt, 15, 64, use_cache=False)[0, 6:].tolist()
    # the first token whose first appearance is at step >= 3 becomes the end-of-text id
    eos, k = next((t, s) for t, s in first_steps(new).items() if s >= 3)

    for use_cache in (True, False):
        out = pc.generate(model, prompt, 15, 64, eos_id=eos, use_cache=use_cache)
        assert out[0].tolist() == prompt[0].tolist() + new[:k]
    assert torch.equal(out, book.generate(ref, prompt, 15, 64, eos_id=eos))
    # eos already at the first step: only the prompt comes back
    out = pc.generate(model, prompt, 15, 64, eos_id=new[0])
    assert torch.equal(out, prompt)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_rows_stop_on_their_own(small_cfg, use_cache):
    model = make_model(small_cfg, seed=0)
    prompts = random_prompts(6, 10, seed=0)
    steps = 24
    news = pc.generate(model, prompts, steps, 64, use_cache=False)[:, 10:].tolist()
    firsts = [first_steps(row) for row in news]
    found = None
    for i in range(len(news)):
        for j in range(len(news)):
            shared = [t for t in firsts[i] if t in firsts[j] and firsts[i][t] < firsts[j][t]]
            if i != j and shared:
                found = (i, j, shared[0])
                break
        if found:
            break
    assert found, "no token reaches two rows at different steps; choose another seed"
    i, j, eos = found
    ki, kj = firsts[i][eos], firsts[j][eos]

    out = pc.generate(model, prompts[[i, j]], steps, 64, eos_id=eos, use_cache=use_cache)
    # row i stops first and is padded with eos; generation ends when row j produces eos
    assert out.shape == (2, 10 + kj)
    assert out[0, 10:].tolist() == news[i][:ki] + [eos] * (kj - ki)
    assert out[1, 10:].tolist() == news[j][:kj]

    # a row that never produces eos keeps going while the finished one is padded
    never = next(r for r in range(len(news)) if eos not in firsts[r])
    out = pc.generate(model, prompts[[i, never]], steps, 64, eos_id=eos, use_cache=use_cache)
    assert out.shape == (2, 10 + steps)
    assert out[0, 10:].tolist() == news[i][:ki] + [eos] * (steps - ki)
    assert out[1, 10:].tolist() == news[never]


@pytest.mark.parametrize(
    "n_rows, prompt_len, new_tokens",
    [(1, 7, 20), (3, 12, 16), (1, 50, 40), (2, 63, 5)],
    ids=["single", "batch", "past-context", "at-context"],
)
def test_kv_cache_gives_the_uncached_tokens(small_cfg, n_rows, prompt_len, new_tokens):
    model = make_model(small_cfg, seed=7)
    prompts = random_prompts(n_rows, prompt_len, seed=7)
    cached = pc.generate(model, prompts, new_tokens, 64)  # use_cache=True is the default
    uncached = pc.generate(model, prompts, new_tokens, 64, use_cache=False)
    assert cached.shape == (n_rows, prompt_len + new_tokens)
    assert torch.equal(cached, uncached)
    if n_rows == 1:
        assert torch.equal(cached, book.generate(book_copy(model, small_cfg), prompts, new_tokens, 64))


def test_hidden_states_with_cache_match_a_full_forward(small_cfg):
    model = make_model(small_cfg, seed=8)
    seq = random_prompts(2, 30, seed=8)
    cache = model.new_kv_cache(2, 30)
    with torch.no_grad():
        parts = [model.hidden_states(seq[:, :20], cache)]
        parts += [model.hidden_states(seq[:, t:t + 1], cache) for t in range(20, 30)]
        full = model.hidden_states(seq)
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_respects_top_k(small_cfg):
    model = make_model(small_cfg, seed=9)
    ref = book_copy(model, small_cfg)
    prompt = random_prompts(1, 6, seed=9)
    torch.manual_seed(42)
    out1 = pc.generate(model, prompt, 15, 64, temperature=1.5, top_k=5)
    torch.manual_seed(42)
    out2 = pc.generate(model, prompt, 15, 64, temperature=1.5, top_k=5)
    assert torch.equal(out1, out2)
    torch.manual_seed(42)
    assert torch.equal(pc.generate(model, prompt, 15, 64, temperature=1.5, top_k=5, use_cache=False), out1)
    torch.manual_seed(42)
    assert torch.equal(book.generate(ref, prompt, 15, 64, temperature=1.5, top_k=5), out1)

    with torch.no_grad():
        logits = model(out1[:, :-1])[0, 5:]  # the logits each new token was drawn from
    new = out1[0, 6:]
    kth = torch.topk(logits, 5).values[:, -1]
    assert (logits[torch.arange(15), new] >= kth).all()
    assert (new != logits.argmax(-1)).any()  # it really sampled


def test_sample_next_token_greedy_top_k_and_huge_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 4.0, 0.0]])
    assert pc.sample_next_token(logits).tolist() == [[1], [0]]
    assert pc.sample_next_token(logits, top_k=2).tolist() == [[1], [0]]
    torch.manual_seed(0)
    draws = torch.cat([pc.sample_next_token(logits, temperature=10.0, top_k=2) for _ in range(200)], 1)
    assert set(draws[0].tolist()) == {1, 3} and set(draws[1].tolist()) == {0, 2}

    huge = torch.tensor([[1e4, 0.0, -1e4, 9990.0], [-1e4, 1e4, 1e4 - 1, 0.0]])
    for temperature in (0.5, 1.0, 100.0):
        for top_k in (None, 3):
            with torch.no_grad():
                tok = pc.sample_next_token(huge.clone(), temperature=temperature, top_k=top_k)
            assert tok.shape == (2, 1)
            assert tok[0, 0].item() in {0, 3} and tok[1, 0].item() in {1, 2}
    # temperature 0.5 turns a gap of 10 into 20 nats: effectively certain
    assert pc.sample_next_token(huge[:1], temperature=0.5).item() == 0


def test_generate_text_simple_equals_greedy_generate(small_cfg):
    model = make_model(small_cfg, seed=10)
    prompts = random_prompts(2, 9, seed=10)
    simple = pc.generate_text_simple(model, prompts, 10, 64)
    assert simple.shape == (2, 19)
    assert torch.equal(simple, pc.generate(model, prompts, 10, 64))
    assert torch.equal(simple, pc.generate(model, prompts, 10, 64, use_cache=False))


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_generate_batch_equals_one_by_one(small_cfg, use_cache, use_sdpa):
    model = make_model(small_cfg, seed=11, use_sdpa=use_sdpa)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 60, 12, 31)]
    max_new = 10
    # make row 0 stop at step 4: its greedy token there is the end-of-text id
    alone = pc.generate(model, torch.tensor([prompts[0]]), max_new, 64, use_cache=False)[0, 5:].tolist()
    eos = next(t for t, s in first_steps(alone).items() if s >= 4)

    expected = []
    for p in prompts:
        out = pc.generate(model, torch.tensor([p]), max_new, 64, eos_id=eos, use_cache=False)
        expected.append(out[0, len(p):].tolist())
    assert len(expected[0]) == first_steps(alone)[eos] < max_new
    assert any(len(e) == max_new for e in expected)

    answers = pc.generate_batch(model, prompts, max_new, 64, eos_id=eos, use_cache=use_cache)
    assert answers == expected


########################################################################################
# Text <-> token ids
########################################################################################

def test_text_token_ids_round_trip(tokenizer):
    text = "Every effort moves you forward.\n\n### Response:\nCafé, naïve — fine."
    ids = pc.text_to_token_ids(text, tokenizer)
    assert ids.shape == (1, len(tokenizer.encode(text)))
    assert ids.dtype == torch.long
    assert pc.token_ids_to_text(ids, tokenizer) == text
    assert pc.text_to_token_ids("<|endoftext|>", tokenizer).tolist() == [[50256]]
    assert pc.text_to_token_ids("Hello<|endoftext|>", tokenizer)[0, -1].item() == 50256
    assert pc.text_to_token_ids("Every effort moves you", tokenizer).tolist() == [[6109, 3626, 6100, 345]]


########################################################################################
# Loss
########################################################################################

def test_fast_loss_equals_plain_loss_and_gradients(small_cfg):
    model = make_model(small_cfg, seed=12).train()
    inputs, targets = padded_batch(seed=12)
    assert (targets == -100).sum() >= 10

    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fast = pc.calc_loss_batch_fast(inputs, targets, model, "cpu")
    fast.backward()

    assert fast.item() == pytest.approx(loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert grads["out_head.weight"].abs().sum() > 0


def _batches(model_seed=0, n=3):
    """A list of (inputs, targets) batches, as calc_loss_loader takes from a DataLoader."""
    out = []
    for s in range(n):
        gen = torch.Generator().manual_seed(100 + s)
        seqs = [torch.randint(0, VOCAB - 1, (int(k),), generator=gen).tolist() for k in (6 + s, 10)]
        out.append(custom_collate_fn(seqs, pad_token_id=VOCAB - 1))
    return out


def test_calc_loss_loader_num_batches(small_cfg):
    model = make_model(small_cfg, seed=13)
    batches = _batches()
    with torch.no_grad():
        losses = [pc.calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
        assert len(set(losses)) == 3
        assert pc.calc_loss_loader(batches, model, "cpu", num_batches=2) == pytest.approx(sum(losses[:2]) / 2)
        assert pc.calc_loss_loader(batches, model, "cpu", num_batches=1) == pytest.approx(losses[0])
        assert pc.calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(losses) / 3)
        assert pc.calc_loss_loader(batches, model, "cpu", num_batches=99) == pytest.approx(sum(losses) / 3)
        assert math.isnan(pc.calc_loss_loader([], model, "cpu"))
        assert math.isnan(pc.calc_loss_loader(DataLoader([], batch_size=2), model, "cpu", num_batches=5))


def test_initial_loss_is_near_uniform(tiny_cfg):
    model = make_model(tiny_cfg, seed=14)
    with torch.no_grad():
        model.out_head.weight.normal_(0.0, 0.02)
    inputs, targets = padded_batch(seed=14)
    with torch.no_grad():
        loss = pc.calc_loss_loader([(inputs, targets)], model, "cpu")
    assert math.log(50257) == pytest.approx(10.825, abs=1e-3)
    assert abs(loss - math.log(50257)) < 0.5


########################################################################################
# Training
########################################################################################

@pytest.fixture(scope="module")
def train_val_loaders(instruction_data, tokenizer):
    """Real instruction batches: 16 training entries (4 batches of 4), 8 validation entries."""
    collate = lambda batch: custom_collate_fn(batch, allowed_max_length=48)  # noqa: E731
    train = InstructionDataset(instruction_data[:16], tokenizer)
    val = InstructionDataset(instruction_data[16:24], tokenizer)
    train_loader = DataLoader(train, batch_size=4, shuffle=False, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=4, shuffle=False, collate_fn=collate)
    return train_loader, val_loader


def _train(model, loaders, tokenizer, fast):
    train_loader, val_loader = loaders
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    # A short start context keeps the two 50-token samples inside the 64-token context (fast).
    return pc.train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2,
                                 eval_freq=3, eval_iter=1, start_context="Below is an instruction",
                                 tokenizer=tokenizer, fast=fast)


def test_train_model_simple_lowers_loss_and_reports(tiny_cfg, train_val_loaders, tokenizer, capsys):
    train_loader, val_loader = train_val_loaders
    assert len(train_loader) == 4
    x, y = next(iter(train_loader))
    assert x.shape == (4, 48) and (y == -100).any()  # truncated to 48 tokens, padded
    model = make_model(tiny_cfg, seed=15)
    start_weights = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = pc.calc_loss_loader(train_loader, model, "cpu")

    results = {}
    for fast in (True, False):
        model.load_state_dict(start_weights)
        capsys.readouterr()
        results[fast] = _train(model, train_val_loaders, tokenizer, fast=fast)
        if fast:
            with torch.no_grad():
                after = pc.calc_loss_loader(train_loader, model, "cpu")
            printed = capsys.readouterr().out

    train_losses, val_losses, tokens_seen = results[True]
    # 2 epochs x 4 steps = steps 0..7; evaluated at steps 0, 3 and 6
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 3
    sizes = [x.numel() for x, _ in train_loader] * 2
    assert tokens_seen == [sum(sizes[:s + 1]) for s in (0, 3, 6)]
    assert after < before - 1.0
    assert train_losses[-1] < train_losses[0]
    assert all(math.isfinite(v) for v in train_losses + val_losses)

    lines = printed.splitlines()
    pattern = re.compile(r"Ep (\d) \(Step (\d{6})\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})")
    evals = [pattern.fullmatch(line) for line in lines if line.startswith("Ep ")]
    assert all(evals) and [(m[1], m[2]) for m in evals] == [("1", "000000"), ("1", "000003"), ("2", "000006")]
    assert evals[0][3] == f"{train_losses[0]:.3f}" and evals[2][4] == f"{val_losses[2]:.3f}"
    samples = [line for line in lines if not line.startswith("Ep ")]
    assert len(samples) == 2  # one generated sample per epoch, on one line
    assert all(line.startswith("Below is an instruction") for line in samples)
    assert lines.index(samples[0]) == 2  # after epoch 1's two evaluations

    slow_train, slow_val, slow_tokens = results[False]
    assert slow_tokens == tokens_seen
    assert slow_train == pytest.approx(train_losses, rel=1e-4)
    assert slow_val == pytest.approx(val_losses, rel=1e-4)


def test_plot_losses_writes_png_and_pdf(tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = torch.linspace(0, 2, 5)
    args = (epochs, [0, 100, 200, 300, 400], [3.0, 2.0, 1.5, 1.2, 1.0], [3.1, 2.2, 1.9, 1.8, 1.8])
    fig = pc.plot_losses(*args, save_path=tmp_path / "loss.png", show=False)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed, not left open
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["Training loss", "Validation loss"]
    assert fig.axes[1].get_xlabel() == "Tokens seen"
    pc.plot_losses(*args, save_path=str(tmp_path / "loss.pdf"), show=False)
    assert (tmp_path / "loss.pdf").read_bytes()[:5] == b"%PDF-"


########################################################################################
# Weight assignment
########################################################################################

def test_assign_checks_shapes():
    left = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError) as err:
        pc.assign(left, torch.zeros(3, 2))
    assert "(2, 3)" in str(err.value) and "(3, 2)" in str(err.value)

    import numpy as np

    right = np.arange(6, dtype=np.float64).reshape(2, 3)
    new = pc.assign(left, right)
    assert isinstance(new, nn.Parameter) and new.dtype == torch.float32
    assert new.tolist() == right.tolist()
    right[0, 0] = 99.0
    assert new[0, 0].item() == 0.0  # a copy, not a view of the array


########################################################################################
# LoRA (exercise 7.4)
########################################################################################

def test_lora_layer_shapes_and_formula():
    torch.manual_seed(0)
    lora = pc.LoRALayer(6, 10, rank=3, alpha=4)
    assert lora.A.shape == (6, 3) and lora.B.shape == (3, 10)
    assert torch.count_nonzero(lora.B) == 0 and torch.count_nonzero(lora.A) > 0
    x = torch.randn(2, 6)
    assert torch.equal(lora(x), torch.zeros(2, 10))
    with torch.no_grad():
        lora.B.normal_()
    torch.testing.assert_close(lora(x), 4 * (x @ lora.A @ lora.B))


def test_lora_only_a_and_b_train_and_start_as_no_op(small_cfg):
    model = make_model(small_cfg, seed=16)
    base = copy.deepcopy(model)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    model.requires_grad_(False)
    pc.replace_linear_with_lora(model, rank=4, alpha=8)

    assert isinstance(model.out_head, pc.LinearWithLoRA)
    assert isinstance(model.trf_blocks[1].ff.layers[2], pc.LinearWithLoRA)
    assert sum(isinstance(m, pc.LinearWithLoRA) for m in model.modules()) == n_linear
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora.A", "lora.B")) for n in trainable)
    assert len(trainable) == 2 * n_linear

    batch = random_prompts(2, 12, seed=16)
    with torch.no_grad():
        assert torch.equal(model(batch), base(batch))

    inputs, targets = padded_batch(seed=16)
    model.train()
    loss = pc.calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    assert model.out_head.linear.weight.grad is None
    assert model.out_head.lora.B.grad.abs().sum() > 0
    model.zero_grad()
    fast = pc.calc_loss_batch_fast(inputs, targets, model, "cpu")
    assert fast.item() == pytest.approx(loss.item(), abs=1e-5)


def test_lora_parameter_counts_on_gpt2_medium():
    with torch.device("meta"):
        model = pc.GPTModel(pc.gpt2_config("gpt2-medium (355M)"))
        total = sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
        pc.replace_linear_with_lora(model, rank=16, alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 406_286_336
    assert trainable == 7_898_384
    assert sum(p.numel() for p in model.parameters()) == total + trainable


def test_generate_with_cache_works_on_a_lora_model(small_cfg):
    model = make_model(small_cfg, seed=17)
    model.requires_grad_(False)
    pc.replace_linear_with_lora(model, rank=4, alpha=8)
    prompt = random_prompts(1, 6, seed=17)
    uncached = pc.generate(model, prompt, 8, 64, use_cache=False)
    assert torch.equal(pc.generate(model, prompt, 8, 64), uncached)
