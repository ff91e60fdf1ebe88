"""training.TrainingRun: the chapter's loop, stopped and resumed, equals one run.

Tiny real GPTs on the chapter's real data and the real tokenizer, on the CPU in float32:
interrupted runs (by `max_steps`, by Ctrl-C in the middle of a step, from a periodic
checkpoint) continue to the same losses and bit-identical weights as an uninterrupted run.
"""

import contextlib
import io
import signal
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from fast_gpt import train_model_fast
from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn
from instructkit.checkpoints import CheckpointError, list_checkpoints, load_checkpoint
from instructkit.precision import Precision
from instructkit.run_record import read_metrics
from instructkit.training import (
    RESUME_NEWEST,
    CheckpointPlan,
    TrainingInterrupted,
    TrainingRun,
    draw_epoch_seed,
    epoch_order,
)
from previous_chapters import GPTModel, train_model_simple

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}
SEED = 7
EPOCHS, EVAL_FREQ, EVAL_ITER = 2, 2, 1
N_BATCHES = 6  # 12 training entries, batches of 2: 12 steps in all
IDENTITY = {"model_config": CFG, "dataset_sha256": "0" * 64, "config": {"lr": 5e-4, "seed": SEED}}


def build(instruction_data, tokenizer, shuffle=True, optimizer_class=torch.optim.AdamW, cfg=CFG,
          collate=custom_collate_fn):
    """A fresh model, optimizer and the chapter's loaders, all seeded as the CLI seeds them."""
    collate = partial(collate, allowed_max_length=CFG["context_length"])
    torch.manual_seed(SEED)
    model = GPTModel(cfg)
    optimizer = optimizer_class(model.parameters(), lr=5e-4, weight_decay=0.1)
    train_loader = DataLoader(InstructionDataset(instruction_data[:12], tokenizer), batch_size=2,
                              shuffle=shuffle, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(InstructionDataset(instruction_data[12:16], tokenizer), batch_size=2,
                            collate_fn=collate)
    return model, optimizer, train_loader, val_loader


def make_run(instruction_data, tokenizer, folder, save_every=None, keep=3, identity=IDENTITY,
             optimizer_class=torch.optim.AdamW, precision=None):
    model, optimizer, train_loader, val_loader = build(instruction_data, tokenizer,
                                                       optimizer_class=optimizer_class)
    plan = CheckpointPlan(folder, "tiny-sft", identity, save_every=save_every, keep=keep)
    return TrainingRun(model, optimizer, train_loader, val_loader, "cpu", seed=SEED,
                       precision=precision, checkpoints=plan,
                       metrics_path=folder / "tiny-sft.metrics.jsonl", progress=False)


def train(run, max_steps=None):
    """Run training; return (losses, printed stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        losses = run.train(EPOCHS, EVAL_FREQ, EVAL_ITER, None, None, max_steps=max_steps)
    return losses, out.getvalue()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def baseline(instruction_data, tokenizer, tmp_path_factory):
    """One uninterrupted run, checkpointing every 4 steps and keeping the last 2."""
    folder = tmp_path_factory.mktemp("baseline")
    run = make_run(instruction_data, tokenizer, folder, save_every=4, keep=2)
    losses, printed = train(run)
    return {"run": run, "losses": losses, "printed": printed, "weights": weights(run.model),
            "folder": folder, "metrics": read_metrics(folder / "tiny-sft.metrics.jsonl")}


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_epoch_order_draws_what_iterating_the_dataloader_draws(shuffle, drop_last):
    loader = DataLoader(range(10), batch_size=3, shuffle=shuffle, drop_last=drop_last)
    torch.manual_seed(5)
    batches = [batch.tolist() for batch in loader]
    after = torch.rand(4)  # where the loader leaves torch's RNG

    torch.manual_seed(5)
    seed = draw_epoch_seed(shuffle)
    order = epoch_order(10, seed) if shuffle else list(range(10))
    assert batches == [order[i:i + 3] for i in range(0, 3 * len(loader), 3)]
    assert len(batches) == (3 if drop_last else 4)
    assert torch.equal(torch.rand(4), after)  # the same draws, in the same number
    assert sorted(order) == list(range(10)) and epoch_order(10, seed) == epoch_order(10, seed)


def test_a_loader_whose_order_it_cannot_reproduce_is_refused():
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters())
    for loader in (DataLoader(range(4), batch_size=2, shuffle=True, generator=torch.Generator()),
                   DataLoader(range(4), batch_size=2, sampler=[3, 2, 1, 0])):
        with pytest.raises(ValueError, match=r"DataLoader\(dataset, batch_size, shuffle=True or False"):
            TrainingRun(model, optimizer, loader, loader, "cpu", progress=False)


def test_trains_on_the_chapters_batches(instruction_data, tokenizer):
    """The chapter's train loader after torch.manual_seed(123): TrainingRun trains on the
    batches the book's loop iterates (116 batches: [8, 61], [8, 76], [8, 73], [8, 68], ...,
    [8, 69]), also with an evaluation (which draws from the same RNG) after step 0."""
    shapes = []

    def collate(batch, **kwargs):
        inputs, targets = custom_collate_fn(batch, **kwargs)
        shapes.append(list(inputs.shape))
        return inputs, targets

    collate = partial(collate, allowed_max_length=1024)
    train_data, val_data = instruction_data[:935], instruction_data[935:990]  # the chapter's split
    train_loader = DataLoader(InstructionDataset(train_data, tokenizer), batch_size=8,
                              collate_fn=collate, shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(InstructionDataset(val_data, tokenizer), batch_size=8, collate_fn=collate)
    torch.manual_seed(123)
    books = [list(inputs.shape) for inputs, _ in train_loader]
    assert len(books) == 116

    torch.manual_seed(123)
    model = GPTModel({**CFG, "context_length": 1024})
    run = TrainingRun(model, torch.optim.AdamW(model.parameters(), lr=5e-4), train_loader,
                      val_loader, "cpu", seed=123, progress=False)
    shapes.clear()
    with contextlib.redirect_stdout(io.StringIO()):  # 4 steps (each costs ~1 s here)
        run.train(1, eval_freq=1000, eval_iter=1, start_context=None, tokenizer=None, max_steps=4)
    trained = shapes[:1] + shapes[3:]  # after step 0 the evaluation read a train and a val batch
    assert trained == books[:4] == [[8, 61], [8, 76], [8, 73], [8, 68]]
    order = epoch_order(935, run.state.epoch_seed)  # the rest of the epoch, as it would train
    shapes.clear()
    for start in range(0, 8 * 116, 8):
        collate([train_loader.dataset[i] for i in order[start:start + 8]])
    assert shapes == books and shapes[-1] == [8, 69]


def test_baseline_runs_all_steps_and_prints_the_chapters_lines(baseline):
    run = baseline["run"]
    assert run.finished and run.state.step == EPOCHS * N_BATCHES
    lines = baseline["printed"].splitlines()
    steps = [0, 2, 4, 6, 8, 10]
    assert [line.split(":")[0] for line in lines] == [
        f"Ep {1 + s // N_BATCHES} (Step {s:06d})" for s in steps]
    train_losses, val_losses, tokens_seen = baseline["losses"]
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(steps)
    assert train_losses[-1] < train_losses[0]


@pytest.mark.parametrize(("save_every", "keep"), [(0, 3), (5, 0), (-1, None)])
def test_a_plan_that_never_saves_or_keeps_nothing_is_refused(tmp_path, save_every, keep):
    """Both command lines build their CheckpointPlan from --save-every and --keep."""
    with pytest.raises(CheckpointError, match=r"^--keep and --save-every must be at least 1\.$"):
        CheckpointPlan(tmp_path, "tiny-sft", IDENTITY, save_every=save_every, keep=keep)
    CheckpointPlan(tmp_path, "tiny-sft", IDENTITY, save_every=None, keep=None)  # never, all


def test_resume_or_start_as_the_command_lines_use_it(instruction_data, tokenizer, tmp_path, capsys):
    """--resume PATH, --resume (the newest) and no --resume (a fresh start that names the
    checkpoints an earlier run left behind)."""
    fresh = make_run(instruction_data, tokenizer, tmp_path)
    assert fresh.resume_or_start(None) is None
    assert capsys.readouterr().out == ""  # no earlier checkpoints: nothing to say
    train(fresh, max_steps=2)
    train(make_run(instruction_data, tokenizer, tmp_path), max_steps=3)
    first, newest = list_checkpoints(tmp_path, "tiny-sft")

    again = make_run(instruction_data, tokenizer, tmp_path)
    assert again.resume_or_start(None) is None and again.state.step == 0
    assert capsys.readouterr().out == (f"Note: {tmp_path} holds checkpoints of an earlier run of "
                                       f"tiny-sft; this run starts afresh (pass --resume to "
                                       f"continue that one).\n")
    run = make_run(instruction_data, tokenizer, tmp_path)
    assert run.resume_or_start(RESUME_NEWEST) == newest and run.state.step == 3
    run = make_run(instruction_data, tokenizer, tmp_path)
    assert run.resume_or_start(str(first)) == first and run.state.step == 2


@pytest.mark.parametrize("k", [3, N_BATCHES])  # mid-epoch, and at the epoch's end
def test_stop_after_k_steps_then_resume_equals_uninterrupted(baseline, instruction_data, tokenizer,
                                                              tmp_path, k):
    first = make_run(instruction_data, tokenizer, tmp_path)
    losses, printed = train(first, max_steps=k)
    assert not first.finished and first.state.step == k
    assert [p.name for p in list_checkpoints(tmp_path, "tiny-sft")] == [f"tiny-sft-step{k:07d}.pth"]
    assert printed == "".join(baseline["printed"].splitlines(keepends=True)[:len(losses[0])])

    second = make_run(instruction_data, tokenizer, tmp_path)  # a new process would build anew
    assert second.resume_if_any() == tmp_path / f"tiny-sft-step{k:07d}.pth"
    resumed_losses, resumed_printed = train(second)

    assert second.finished
    assert resumed_losses == baseline["losses"]  # exactly, before and after the resume
    assert printed + resumed_printed == baseline["printed"]
    assert_same_weights(second.model, baseline["weights"])
    assert second.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        baseline["run"].optimizer.state_dict()["state"][0]["exp_avg"])


class CtrlCAtStep(torch.optim.AdamW):
    """AdamW during whose 5th step Ctrl-C arrives: the SIGINT handler that training installed
    runs there, as the interpreter runs it when the signal comes. (No real signal: it would go
    to pytest's own process. A real one goes to the command in test_finetune_resume.)"""

    calls = 0

    def step(self, closure=None):
        CtrlCAtStep.calls += 1
        if CtrlCAtStep.calls == 5:
            handler = signal.getsignal(signal.SIGINT)
            assert handler not in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN, None), \
                "training installed no Ctrl-C handler"
            handler(signal.SIGINT, None)  # in the middle of this step
        return super().step(closure)


def test_ctrl_c_mid_step_saves_after_that_step_and_resumes_exactly(
        baseline, instruction_data, tokenizer, tmp_path, capsys):
    CtrlCAtStep.calls = 0
    handler_before = signal.getsignal(signal.SIGINT)
    first = make_run(instruction_data, tokenizer, tmp_path, optimizer_class=CtrlCAtStep)
    with pytest.raises(TrainingInterrupted) as stopped:
        first.train(EPOCHS, EVAL_FREQ, EVAL_ITER, None, None)
    saved = tmp_path / "tiny-sft-step0000005.pth"
    assert stopped.value.checkpoint == saved and stopped.value.step == 5
    assert stopped.value.signum == signal.SIGINT
    assert f"--resume {saved}" in str(stopped.value)
    assert "Ctrl-C: stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is restored

    second = make_run(instruction_data, tokenizer, tmp_path)
    second.resume(saved)
    losses, _ = train(second)
    assert losses == baseline["losses"]
    assert_same_weights(second.model, baseline["weights"])


class CtrlCTwiceWhileSaving(torch.optim.AdamW):
    """AdamW whose state is read for its `at_save`-th checkpoint while two signals arrive, one
    after the other: the handler training installed runs there twice, as the interpreter runs
    it (see CtrlCAtStep). The first asks to stop after the step, the second stops at once."""

    at_save, signum, saves = 2, signal.SIGINT, 0

    def state_dict(self):
        cls = type(self)
        cls.saves += 1
        if cls.saves == cls.at_save:
            handler = signal.getsignal(cls.signum)
            handler(cls.signum, None)  # asks to stop after this step
            handler(cls.signum, None)  # stops at once: this checkpoint is not written
        return super().state_dict()


@pytest.mark.parametrize(("at_save", "signum"), [(2, signal.SIGINT), (1, signal.SIGTERM)])
def test_a_second_signal_during_a_checkpoint_write_names_the_checkpoint_saved_before(
        instruction_data, tokenizer, tmp_path, capsys, at_save, signum):
    CtrlCTwiceWhileSaving.at_save, CtrlCTwiceWhileSaving.signum = at_save, signum
    CtrlCTwiceWhileSaving.saves = 0
    run = make_run(instruction_data, tokenizer, tmp_path, save_every=2,
                   optimizer_class=CtrlCTwiceWhileSaving)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(run)
    cut_step = 2 * at_save  # a checkpoint every 2 steps: the one cut is of step 2 * at_save
    err = capsys.readouterr().err
    assert (f"Training interrupted during the write of the checkpoint of step {cut_step}; that "
            f"was not saved.") in err.splitlines()
    assert stopped.value.signum == signum  # the exit code: 130 for Ctrl-C, 143 for SIGTERM
    # nothing half-written is left; the checkpoint of the step before stays
    saved = [tmp_path / f"tiny-sft-step{step:07d}.pth" for step in range(2, cut_step, 2)]
    assert sorted(tmp_path.glob("*.pth")) == saved
    assert list(tmp_path.glob(".*.tmp")) == []
    if saved:
        assert stopped.value.checkpoint == saved[-1] and stopped.value.checkpoint_step == cut_step - 2
        assert str(stopped.value) == (
            f"Training stopped during the write of the checkpoint of step {cut_step}, which was "
            f"not saved; the latest checkpoint is the one of step {cut_step - 2}, {saved[-1]}. "
            f"Resume from it: --resume {saved[-1]} on the command line, or "
            f"TrainingRun.resume({str(saved[-1])!r}).")
        resumed = make_run(instruction_data, tokenizer, tmp_path, save_every=2)
        assert resumed.resume_if_any() == saved[-1]
    else:
        assert stopped.value.checkpoint is None
        assert str(stopped.value) == (
            f"Training stopped during the write of the checkpoint of step {cut_step}, which was "
            f"not saved; no checkpoint was saved before it: start over.")


def test_periodic_checkpoints_are_pruned_and_one_resumes_exactly(baseline, instruction_data,
                                                                 tokenizer, tmp_path):
    names = [p.name for p in list_checkpoints(baseline["folder"], "tiny-sft")]
    assert names == ["tiny-sft-step0000008.pth", "tiny-sft-step0000012.pth"]  # every 4, keep 2
    checkpoint = load_checkpoint(baseline["folder"] / names[0])
    assert checkpoint["progress"] == {**checkpoint["progress"], "epoch": 1, "position": 2, "step": 8}

    run = make_run(instruction_data, tokenizer, tmp_path)
    run.resume(baseline["folder"] / names[0])
    losses, printed = train(run)
    assert losses == baseline["losses"]
    assert printed.splitlines() == baseline["printed"].splitlines()[-2:]  # steps 8 and 10
    assert_same_weights(run.model, baseline["weights"])


def test_metrics_rows_equal_printed_and_returned_losses_also_after_resume(baseline, instruction_data,
                                                                          tokenizer, tmp_path):
    rows = baseline["metrics"]
    train_losses, val_losses, tokens_seen = baseline["losses"]
    assert [r["train_loss"] for r in rows] == train_losses
    assert [r["val_loss"] for r in rows] == val_losses
    assert [r["tokens_seen"] for r in rows] == tokens_seen
    assert [f"Ep {r['epoch']} (Step {r['step']:06d}): Train loss {r['train_loss']:.3f}, "
            f"Val loss {r['val_loss']:.3f}" for r in rows] == baseline["printed"].splitlines()
    assert [r["epochs_seen"] for r in rows] == [e + p / N_BATCHES for e in (0, 1) for p in (1, 3, 5)]
    assert all(r["lr"] == 5e-4 for r in rows)
    assert all(b["seconds"] > a["seconds"] > 0 for a, b in zip(rows, rows[1:], strict=False))

    # An interrupted run's file loses the rows after its checkpoint; the resumed one matches.
    first = make_run(instruction_data, tokenizer, tmp_path)
    train(first, max_steps=4)
    metrics_file = tmp_path / "tiny-sft.metrics.jsonl"
    with open(metrics_file, "a") as f:  # a row written after the checkpoint, before a crash
        f.write('{"step": 4, "epoch": 1, "train_loss": 99.0}\n')
    second = make_run(instruction_data, tokenizer, tmp_path)
    second.resume()
    train(second)
    resumed = read_metrics(metrics_file)
    without_time = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed]
    assert without_time == [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_mismatched_checkpoint_is_refused_naming_the_difference(baseline, instruction_data,
                                                                tokenizer):
    other = {**IDENTITY, "model_config": {**CFG, "emb_dim": 32}, "dataset_sha256": "1" * 64}
    run = make_run(instruction_data, tokenizer, baseline["folder"], identity=other)
    with pytest.raises(CheckpointError) as refused:
        run.resume()
    message = str(refused.value)
    assert "model_config.emb_dim: 16 in the checkpoint, 32 now" in message
    assert f"dataset_sha256: '{'0' * 64}' in the checkpoint, '{'1' * 64}' now" in message
    assert "lr" not in message  # only the differences are named
    assert run.state.step == 0  # nothing was loaded


@pytest.mark.parametrize("shuffle", [True, False])
def test_same_batches_losses_and_printed_lines_as_train_model_fast(instruction_data, tokenizer,
                                                                   shuffle):
    """train_model_fast iterates the DataLoader, as the book's loop does. After the same
    torch.manual_seed, TrainingRun collates the same batches in the same sequence (training and
    evaluation, over two epochs) and, with dropout drawing from the same RNG in between, gets
    the same losses, printed text and weights, exactly."""
    cfg = {**CFG, "drop_rate": 0.1}

    def run_loop(train):
        collated = []

        def collate(batch, **kwargs):
            collated.append([list(item) for item in batch])
            return custom_collate_fn(batch, **kwargs)

        model, optimizer, train_loader, val_loader = build(instruction_data, tokenizer, shuffle,
                                                           cfg=cfg, collate=collate)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            losses = train(model, optimizer, train_loader, val_loader)
        return losses, collated, out.getvalue(), weights(model)

    expected = run_loop(lambda model, optimizer, train_loader, val_loader: train_model_fast(
        model, train_loader, val_loader, optimizer, "cpu", EPOCHS, EVAL_FREQ, EVAL_ITER, "Give me",
        tokenizer))
    mine = run_loop(lambda model, optimizer, train_loader, val_loader: TrainingRun(
        model, optimizer, train_loader, val_loader, "cpu", progress=False).train(
        EPOCHS, EVAL_FREQ, EVAL_ITER, "Give me", tokenizer))

    losses, collated, printed, final_weights = mine
    assert len(collated) == len(expected[1]) == EPOCHS * N_BATCHES + 6 * 2  # 6 evaluations
    assert collated == expected[1]
    assert losses == expected[0] and printed == expected[2]
    assert printed.count("Ep ") == 6 and "Give me" in printed
    for key, value in expected[3].items():
        assert torch.equal(final_weights[key], value), key


def test_losses_equal_the_books_train_model_simple_within_float_rounding(instruction_data, tokenizer):
    model, optimizer, train_loader, val_loader = build(instruction_data, tokenizer, shuffle=False)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = train_model_simple(model, train_loader, val_loader, optimizer, "cpu", 1,
                                      EVAL_FREQ, EVAL_ITER, None, None)
    model2, optimizer2, train_loader2, val_loader2 = build(instruction_data, tokenizer, shuffle=False)
    run = TrainingRun(model2, optimizer2, train_loader2, val_loader2, "cpu", seed=SEED, progress=False)
    losses, _ = train(run)  # two epochs: the first equals the book's one epoch
    for mine, books in zip(losses, expected, strict=True):
        assert mine[:len(books)] == pytest.approx(books, rel=1e-5)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_runs_resume_exactly_too(instruction_data, tokenizer, tmp_path, name):
    """Autocast, and for fp16 the gradient scaler, whose state the checkpoint carries. On the
    CPU, where torch has both (--precision refuses fp16 there as slow); a GPU runs the same
    code with the device type "cuda"."""
    precision = Precision(name, "cpu", "test")
    full = make_run(instruction_data, tokenizer, tmp_path / "full", precision=precision)
    expected, _ = train(full)
    first = make_run(instruction_data, tokenizer, tmp_path / "part", precision=precision)
    train(first, max_steps=5)
    second = make_run(instruction_data, tokenizer, tmp_path / "part", precision=precision)
    checkpoint = load_checkpoint(second.resume())
    losses, _ = train(second)

    assert losses == expected
    assert_same_weights(second.model, weights(full.model))
    if name == "fp16":
        assert checkpoint["scaler"] == first.scaler.state_dict()
        assert checkpoint["scaler"]["_growth_tracker"] == 5  # steps since the scale last changed
        assert second.scaler.state_dict() == full.scaler.state_dict()
    else:
        assert checkpoint["scaler"] is None and second.scaler is None
