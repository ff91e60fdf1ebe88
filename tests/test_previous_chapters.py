"""previous_chapters.py: the book's data loader, GPT model, generation, loss, training, weight
assignment and loss plot (and exercise 7.4's LoRA on that model).

An independent implementation of the book's model and loops lives in book_reference.py
(structured as the book's chapter 4); the project's model must load its checkpoints and
compute what it computes. A section calls every function of the book's file as the book's
notebooks and scripts call it, and checks that it does what the book's does.
"""

import ast
import copy
import itertools
import math
import re
from pathlib import Path

import book_reference as book
import matplotlib
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import exercise_variants as ev
import previous_chapters as pc
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn
from instructkit.gpt2_sizes import gpt2_config

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


def test_signatures_are_the_books():
    """No speed-up parameters: the book's signatures (plot_losses' two are marked fixes)."""
    import inspect

    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(pc.generate) == ["model", "idx", "max_new_tokens", "context_size", "temperature",
                                   "top_k", "eos_id"]
    assert params(pc.train_model_simple) == ["model", "train_loader", "val_loader", "optimizer",
                                             "device", "num_epochs", "eval_freq", "eval_iter",
                                             "start_context", "tokenizer"]
    assert params(pc.calc_loss_loader) == ["data_loader", "model", "device", "num_batches"]
    assert params(pc.evaluate_model) == ["model", "train_loader", "val_loader", "device", "eval_iter"]
    assert params(pc.GPTModel.forward) == ["self", "in_idx"]
    assert params(pc.MultiHeadAttention.forward) == ["self", "x"]
    assert params(pc.TransformerBlock.forward) == ["self", "x"]


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
# Sizes
########################################################################################

def test_gpt2_medium_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = pc.GPTModel(gpt2_config("gpt2-medium (355M)"))
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
    new = pc.generate(model, prompt, 15, 64)[0, 6:].tolist()
    # the first token whose first appearance is at step >= 3 becomes the end-of-text id
    eos, k = next((t, s) for t, s in first_steps(new).items() if s >= 3)

    out = pc.generate(model, prompt, 15, 64, eos_id=eos)
    assert out[0].tolist() == prompt[0].tolist() + new[:k]
    assert torch.equal(out, book.generate(ref, prompt, 15, 64, eos_id=eos))
    # eos already at the first step: only the prompt comes back
    out = pc.generate(model, prompt, 15, 64, eos_id=new[0])
    assert torch.equal(out, prompt)


def test_batched_rows_stop_on_their_own(small_cfg):
    model = make_model(small_cfg, seed=0)
    prompts = random_prompts(6, 10, seed=0)
    steps = 24
    news = pc.generate(model, prompts, steps, 64)[:, 10:].tolist()
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

    out = pc.generate(model, prompts[[i, j]], steps, 64, eos_id=eos)
    # row i stops first and is padded with eos; generation ends when row j produces eos
    assert out.shape == (2, 10 + kj)
    assert out[0, 10:].tolist() == news[i][:ki] + [eos] * (kj - ki)
    assert out[1, 10:].tolist() == news[j][:kj]

    # a row that never produces eos keeps going while the finished one is padded
    never = next(r for r in range(len(news)) if eos not in firsts[r])
    out = pc.generate(model, prompts[[i, never]], steps, 64, eos_id=eos)
    assert out.shape == (2, 10 + steps)
    assert out[0, 10:].tolist() == news[i][:ki] + [eos] * (steps - ki)
    assert out[1, 10:].tolist() == news[never]


@pytest.mark.parametrize("prompt_len, new_tokens", [(7, 20), (50, 40), (63, 5)],
                         ids=["short", "past-context", "at-context"])
def test_generate_equals_the_books_loop(small_cfg, prompt_len, new_tokens):
    model = make_model(small_cfg, seed=7)
    prompt = random_prompts(1, prompt_len, seed=7)
    out = pc.generate(model, prompt, new_tokens, 64)
    assert out.shape == (1, prompt_len + new_tokens)
    assert torch.equal(out, book.generate(book_copy(model, small_cfg), prompt, new_tokens, 64))


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
    assert torch.equal(book.generate(ref, prompt, 15, 64, temperature=1.5, top_k=5), out1)

    with torch.no_grad():
        logits = model(out1[:, :-1])[0, 5:]  # the logits each new token was drawn from
    new = out1[0, 6:]
    kth = torch.topk(logits, 5).values[:, -1]
    assert (logits[torch.arange(15), new] >= kth).all()
    assert (new != logits.argmax(-1)).any()  # it really sampled


def test_batched_top_k_keeps_each_rows_own_candidates(small_cfg):
    """The marked fix: the book's `top_logits[:, -1]` cannot broadcast against a batch's logits."""
    model = make_model(small_cfg, seed=9)
    prompts = random_prompts(3, 6, seed=9)
    greedy = pc.generate(model, prompts, 10, 64)
    torch.manual_seed(0)  # top_k=1 leaves one candidate per row: sampling is greedy
    assert torch.equal(pc.generate(model, prompts, 10, 64, temperature=1.0, top_k=1), greedy)

    torch.manual_seed(1)
    sampled = pc.generate(model, prompts, 10, 64, temperature=2.0, top_k=4)
    with torch.no_grad():
        logits = model(sampled[:, :-1])[:, 5:]  # (3, 10, vocab): the logits of each new token
    new = sampled[:, 6:]
    kth = torch.topk(logits, 4).values[..., -1]
    assert (logits.gather(-1, new[..., None])[..., 0] >= kth).all()  # each within its row's top 4
    assert not torch.equal(sampled, greedy)  # it really sampled


def test_generate_text_simple_equals_greedy_generate(small_cfg):
    model = make_model(small_cfg, seed=10)
    prompts = random_prompts(2, 9, seed=10)
    simple = pc.generate_text_simple(model, prompts, 10, 64)
    assert simple.shape == (2, 19)
    assert torch.equal(simple, pc.generate(model, prompts, 10, 64))


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


def _train(model, loaders, tokenizer):
    train_loader, val_loader = loaders
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
    # A short start context keeps the two 50-token samples inside the 64-token context (fast).
    return pc.train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=2,
                                 eval_freq=3, eval_iter=1, start_context="Below is an instruction",
                                 tokenizer=tokenizer)


def test_train_model_simple_lowers_loss_and_reports(tiny_cfg, train_val_loaders, tokenizer, capsys):
    train_loader, val_loader = train_val_loaders
    assert len(train_loader) == 4
    x, y = next(iter(train_loader))
    assert x.shape == (4, 48) and (y == -100).any()  # truncated to 48 tokens, padded
    model = make_model(tiny_cfg, seed=15)
    with torch.no_grad():
        before = pc.calc_loss_loader(train_loader, model, "cpu")

    capsys.readouterr()
    train_losses, val_losses, tokens_seen = _train(model, train_val_loaders, tokenizer)
    printed = capsys.readouterr().out
    with torch.no_grad():
        after = pc.calc_loss_loader(train_loader, model, "cpu")

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


def test_plot_losses_writes_png_and_pdf(tmp_path, monkeypatch):
    """The marked keywords: another file and format, no file at all, closed instead of shown."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
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
    fig = pc.plot_losses(*args, save_path=None, show=False)  # drawn, saved nowhere
    assert fig.axes[0].get_ylabel() == "Loss"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.pdf", "loss.png"]


########################################################################################
# Weight assignment
########################################################################################

def test_assign_checks_shapes():
    import numpy as np

    left = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError) as err:
        pc.assign(left, np.zeros((3, 2), dtype=np.float32))
    assert str(err.value) == "Shape mismatch. Left: torch.Size([2, 3]), Right: (3, 2)"  # the book's words

    right = np.arange(6, dtype=np.float32).reshape(2, 3)
    new = pc.assign(left, right)
    assert isinstance(new, nn.Parameter) and new.requires_grad and new.dtype == torch.float32
    assert new.tolist() == right.tolist()
    right[0, 0] = 99.0
    assert new[0, 0].item() == 0.0  # a copy, not a view of the array


########################################################################################
# The book's calls: each function called as the book's notebooks and scripts call it
########################################################################################

def test_create_dataloader_v1_gives_the_books_windows(instruction_data):
    """Chapter 2: `create_dataloader_v1(raw_text, batch_size=8, max_length=4, stride=4,
    shuffle=False)`: windows of max_length tokens every `stride` tokens, targets one ahead."""
    import tiktoken

    txt = "Every effort moves you forward. " + " ".join(e["output"] for e in instruction_data[:40])
    ids = tiktoken.get_encoding("gpt2").encode(txt)
    starts = range(0, len(ids) - 4, 4)
    assert len(starts) > 3 * 8  # several full batches, and a partial one dropped

    loader = pc.create_dataloader_v1(txt, batch_size=8, max_length=4, stride=4, shuffle=False)
    batches = list(loader)
    assert len(batches) == len(starts) // 8  # drop_last=True: the partial batch is dropped
    inputs, targets = batches[0]
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == (8, 4)
    assert inputs[0].tolist() == [6109, 3626, 6100, 345]  # "Every effort moves you"
    assert targets[0].tolist()[:3] == [3626, 6100, 345]
    for b, (inputs, targets) in enumerate(batches):
        for row in range(8):
            i = starts[8 * b + row]
            assert inputs[row].tolist() == ids[i:i + 4]
            assert targets[row].tolist() == ids[i + 1:i + 5]

    # The first example of chapter 2: batch_size=1, max_length=4, stride=1, shuffle=False
    first, second = itertools.islice(pc.create_dataloader_v1(txt, batch_size=1, max_length=4, stride=1,
                                                             shuffle=False), 2)
    assert first[0].tolist() == [ids[0:4]] and first[1].tolist() == [ids[1:5]]
    assert second[0].tolist() == [ids[1:5]]

    # The defaults (batch 4, 256 tokens, stride 128, shuffled, drop_last) and the dataset itself
    dataset = pc.GPTDatasetV1(txt, tiktoken.get_encoding("gpt2"), max_length=256, stride=128)
    assert len(dataset) == len(range(0, len(ids) - 256, 128))
    assert len(pc.create_dataloader_v1(txt)) == len(dataset) // 4
    x, y = dataset[1]
    assert x.tolist() == ids[128:384] and y.tolist() == ids[129:385]
    torch.manual_seed(0)
    shuffled = torch.cat([x for x, _ in pc.create_dataloader_v1(txt, batch_size=1, max_length=4, stride=4)])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(tuple(ids[i:i + 4]) for i in starts)
    assert shuffled.tolist() != [ids[i:i + 4] for i in starts]  # shuffle=True by default


def test_generate_called_the_books_way_stops_like_the_book(tiny_cfg, tokenizer):
    """Chapter 7: `generate(model=model, idx=text_to_token_ids(input_text, tokenizer),
    max_new_tokens=..., context_size=..., eos_id=50256)`, one prompt: the text ends before the
    end-of-text token, as the book's `if idx_next == eos_id: break` ends it."""
    model = make_model(tiny_cfg, seed=17)
    ref = book_copy(model, tiny_cfg)
    input_text = "Below is an instruction that describes a task."
    idx = pc.text_to_token_ids(input_text, tokenizer)
    n = idx.shape[1]
    new = pc.generate(model=model, idx=idx, max_new_tokens=20, context_size=tiny_cfg["context_length"])
    new = new[0, n:].tolist()
    eos, k = next((t, s) for t, s in first_steps(new).items() if s >= 3)

    token_ids = pc.generate(model=model, idx=idx, max_new_tokens=20,
                            context_size=tiny_cfg["context_length"], eos_id=eos)
    assert token_ids[0].tolist() == idx[0].tolist() + new[:k]
    assert torch.equal(token_ids, book.generate(ref, idx, 20, tiny_cfg["context_length"], eos_id=eos))
    generated_text = pc.token_ids_to_text(token_ids, tokenizer)
    assert generated_text == input_text + tokenizer.decode(new[:k])

    # Chapter 5: top-k and temperature for one prompt; the same draws as the book's loop
    torch.manual_seed(123)
    sampled = pc.generate(model=model, idx=pc.text_to_token_ids("Every effort moves you", tokenizer),
                          max_new_tokens=15, context_size=tiny_cfg["context_length"], top_k=25,
                          temperature=1.4)
    torch.manual_seed(123)
    expected = book.generate(ref, pc.text_to_token_ids("Every effort moves you", tokenizer), 15,
                             tiny_cfg["context_length"], temperature=1.4, top_k=25)
    assert sampled.shape == (1, 4 + 15) and torch.equal(sampled, expected)


def test_generate_text_simple_and_the_sample_called_the_books_way(tiny_cfg, tokenizer, capsys):
    """Chapters 4 and 5: `generate_text_simple(model=model, idx=..., max_new_tokens=...,
    context_size=...)` and `generate_and_print_sample(model, tokenizer, device, start_context)`."""
    model = make_model(tiny_cfg, seed=18)
    ref = book_copy(model, tiny_cfg)
    start_context = "Every effort moves you"
    encoded = pc.text_to_token_ids(start_context, tokenizer)
    out = pc.generate_text_simple(model=model, idx=encoded, max_new_tokens=10,
                                  context_size=tiny_cfg["context_length"])
    assert torch.equal(out, book.generate(ref, encoded, 10, tiny_cfg["context_length"]))

    model.train()
    pc.generate_and_print_sample(model, tokenizer, "cpu", start_context)
    sample = book.generate(ref, encoded, 50, tiny_cfg["context_length"])
    assert capsys.readouterr().out == tokenizer.decode(sample[0].tolist()).replace("\n", " ") + "\n"
    assert model.training  # back in training mode, as the book leaves it


def test_plot_losses_called_the_books_way_saves_loss_plot_pdf_and_shows(tmp_path, monkeypatch):
    """Chapter 7: `plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses)` writes
    loss-plot.pdf into the working directory and calls plt.show(), leaving the figure open."""
    matplotlib.use("Agg")  # plt.show() draws nowhere
    import matplotlib.pyplot as plt

    shown = []
    real_show = plt.show
    monkeypatch.setattr(plt, "show", lambda *a, **k: (shown.append(plt.gcf()), real_show(*a, **k)))
    monkeypatch.chdir(tmp_path)
    train_losses, val_losses = [3.0, 2.0, 1.5, 1.2, 1.0], [3.1, 2.2, 1.9, 1.8, 1.8]
    tokens_seen = [0, 100, 200, 300, 400]
    num_epochs = 2
    epochs_tensor = torch.linspace(0, num_epochs, len(train_losses))
    before = set(plt.get_fignums())

    pc.plot_losses(epochs_tensor, tokens_seen, train_losses, val_losses)

    assert [p.name for p in tmp_path.iterdir()] == ["loss-plot.pdf"]
    assert (tmp_path / "loss-plot.pdf").read_bytes()[:5] == b"%PDF-"
    (new,) = set(plt.get_fignums()) - before  # the book's figure stays open after plt.show()
    assert len(shown) == 1 and shown[0].number == new
    fig = plt.figure(new)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["Training loss", "Validation loss"]
    assert fig.axes[0].get_xlabel() == "Epochs" and fig.axes[1].get_xlabel() == "Tokens seen"
    plt.close(fig)


def test_the_books_signatures_and_defaults():
    """Every function and class of the book's file, with the book's parameters and defaults
    (plot_losses' two extra keywords are marked changes)."""
    import inspect

    def signature(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    empty = inspect.Parameter.empty
    assert signature(pc.GPTDatasetV1.__init__) == [(n, empty) for n in
                                                   ("self", "txt", "tokenizer", "max_length", "stride")]
    assert signature(pc.create_dataloader_v1) == [("txt", empty), ("batch_size", 4), ("max_length", 256),
                                                  ("stride", 128), ("shuffle", True), ("drop_last", True),
                                                  ("num_workers", 0)]
    assert signature(pc.generate)[4:] == [("temperature", 0.0), ("top_k", None), ("eos_id", None)]
    assert signature(pc.plot_losses) == [(n, empty) for n in
                                         ("epochs_seen", "tokens_seen", "train_losses", "val_losses")] \
        + [("save_path", "loss-plot.pdf"), ("show", True)]
    assert signature(pc.MultiHeadAttention.__init__)[1:] == [
        ("d_in", empty), ("d_out", empty), ("context_length", empty), ("dropout", empty),
        ("num_heads", empty), ("qkv_bias", False)]
    book_names = ["GPTDatasetV1", "create_dataloader_v1", "MultiHeadAttention", "LayerNorm", "GELU",
                  "FeedForward", "TransformerBlock", "GPTModel", "generate_text_simple", "generate",
                  "train_model_simple", "evaluate_model", "generate_and_print_sample", "assign",
                  "load_weights_into_gpt", "text_to_token_ids", "token_ids_to_text", "calc_loss_batch",
                  "calc_loss_loader", "plot_losses"]
    tree = ast.parse(Path(pc.__file__).read_text(encoding="utf-8"))
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert defined == book_names  # all of the book's definitions, in its order, and nothing else


def test_the_residual_dropout_is_named_as_in_chapter_7(tiny_cfg):
    block = pc.GPTModel(tiny_cfg).trf_blocks[0]
    assert isinstance(block.drop_resid, nn.Dropout) and not hasattr(block, "drop_shortcut")


########################################################################################
# LoRA (exercise 7.4)
########################################################################################

def test_lora_layer_shapes_and_formula():
    torch.manual_seed(0)
    lora = ev.LoRALayer(6, 10, rank=3, alpha=4)
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
    ev.replace_linear_with_lora(model, rank=4, alpha=8)

    assert isinstance(model.out_head, ev.LinearWithLoRA)
    assert isinstance(model.trf_blocks[1].ff.layers[2], ev.LinearWithLoRA)
    assert sum(isinstance(m, ev.LinearWithLoRA) for m in model.modules()) == n_linear
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


def test_lora_parameter_counts_on_gpt2_medium():
    with torch.device("meta"):
        model = pc.GPTModel(gpt2_config("gpt2-medium (355M)"))
        total = sum(p.numel() for p in model.parameters())
        model.requires_grad_(False)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
        ev.replace_linear_with_lora(model, rank=16, alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 406_286_336
    assert trainable == 7_898_384
    assert sum(p.numel() for p in model.parameters()) == total + trainable

