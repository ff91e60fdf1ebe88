"""The chapter's training loop as a run that can stop and continue exactly.

Not in the book: `train_model_simple` (chapter 5) keeps everything in memory. `TrainingRun`
runs the same loop (the same printed `Ep 1 (Step 000000): Train loss ..., Val loss ...` lines,
the same `eval_freq` and `eval_iter`, the same returned losses) and adds:
- the book's batch order, kept across a restart: each epoch's order is drawn from torch's
  global RNG exactly as iterating `DataLoader(shuffle=True)` draws it (`draw_epoch_seed`,
  `epoch_order`), so after the same `torch.manual_seed` the run trains on the chapter's
  batches. The epoch's seed goes into the checkpoint, so a resumed run continues the same
  order, and every process (DDP) trains on its share of it;
- checkpoints every `save_every` steps and on Ctrl-C (checkpoints.py), and `resume()`; on
  the CPU in float32 a resumed run's losses and weights equal an uninterrupted run's;
- a tqdm bar over the steps with the time left; evaluation lines print above it;
- a metrics file appended at each evaluation (run_record.MetricsLog);
- precision from precision.py (bf16/fp16 autocast, a gradient scaler for fp16).

In a notebook:

    torch.manual_seed(123)  # as the chapter does before training: the batch order draws from it
    run = TrainingRun(model, optimizer, train_loader, val_loader, device,
                      checkpoints=CheckpointPlan("checkpoints", "gpt2-medium355M-sft", identity,
                                                 save_every=50))
    run.resume_if_any()  # continues its checkpoint of the highest step, if there is one
    train_losses, val_losses, tokens_seen = run.train(num_epochs=2, eval_freq=5, eval_iter=5,
                                                      start_context=..., tokenizer=tokenizer)
"""

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from instructkit.checkpoints import (
    CheckpointError,
    check_identity,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    move_aside_another_runs,
    newest_checkpoint,
    own_checkpoints,
    prune_checkpoints,
    restore,
    save_checkpoint,
)
from instructkit.distributed import SingleProcess
from instructkit.precision import resolve_precision
from instructkit.run_guard import SIGBREAK, Terminated, as_ctrl_c
from instructkit.run_record import MetricsLog
from instructkit.safe_files import retry_while_disk_full

RESUME_NEWEST = "newest"  # --resume without a path: the run's checkpoint with the highest step


def draw_epoch_seed(shuffle):
    """What iterating a DataLoader (no `generator` given) draws from torch's global RNG when an
    epoch starts, in the same sequence, so that later draws (dropout, the evaluations, the next
    epoch) match the book's loop: the iterator's base seed (for worker processes; unused here),
    then, when the loader shuffles, RandomSampler's seed for this epoch's permutation. Returns
    the last value drawn."""
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # _BaseDataLoaderIter
    if shuffle:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler.__iter__
    return seed


def epoch_order(n_items, seed):
    """RandomSampler's permutation of range(n_items) for a drawn `seed` (see draw_epoch_seed)."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed)).tolist()


def shuffles(loader):
    """Whether `loader` shuffles (RandomSampler) or reads in order; ValueError for a loader
    whose order TrainingRun does not reproduce."""
    sampler, n_items = loader.sampler, len(loader.dataset)
    plain_random = (isinstance(sampler, RandomSampler) and sampler.generator is None
                    and not sampler.replacement and sampler.num_samples == n_items)
    if (type(loader.batch_sampler) is not BatchSampler or loader.generator is not None
            or not (plain_random or isinstance(sampler, SequentialSampler))):
        raise ValueError("TrainingRun reproduces the order of DataLoader(dataset, batch_size, "
                         "shuffle=True or False, drop_last=...) seeded by torch.manual_seed; build "
                         "the train loader that way (no sampler, batch_sampler or generator).")
    return plain_random


@dataclass
class CheckpointPlan:
    """Where and how often to checkpoint, and what a resumed checkpoint must match.

    `identity`: plain JSON values (model config, dataset sha256, the training settings that
    change results); a checkpoint whose identity differs is refused, naming the fields.
    `keep`: how many checkpoints stay (None keeps all).
    `wait_for_space`: what to do when the disk is full (safe_files.retry_while_disk_full), e.g.
    safe_files.ask_at_terminal(...); None raises DiskFullError at once.
    """

    folder: Path
    stem: str
    identity: dict
    save_every: int | None = None
    keep: int | None = 3
    wait_for_space: Callable | None = None

    def __post_init__(self):
        if (self.keep is not None and self.keep < 1) or (self.save_every is not None
                                                         and self.save_every < 1):
            raise CheckpointError("--keep and --save-every must be at least 1.")


@dataclass
class TrainState:
    """Where the run is: the next batch is `position` in epoch `epoch`'s order, drawn with
    `epoch_seed` (None until the epoch starts); `step` steps are done. `metrics` holds one row
    per evaluation (run_record.METRIC_KEYS)."""

    epoch: int = 0
    position: int = 0
    epoch_seed: int | None = None
    step: int = 0
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    metrics: list = field(default_factory=list)

    def progress(self):
        return {"epoch": self.epoch, "position": self.position, "epoch_seed": self.epoch_seed,
                "step": self.step, "tokens_seen": self.tokens_seen,
                "wall_seconds": self.wall_seconds}

    def losses(self):
        """(train_losses, val_losses, tokens_seen), as train_model_simple returns them."""
        return ([row["train_loss"] for row in self.metrics], [row["val_loss"] for row in self.metrics],
                [row["tokens_seen"] for row in self.metrics])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped training at a step boundary; `checkpoint` is the file
    saved (or None); `signum` the signal, for the exit code (130 or 143).

    `cut`: None, or what a second Ctrl-C stopped halfway ("step 7", "the write of the
    checkpoint of step 6"),
    which was not saved; `checkpoint` is then the latest one that exists (saved earlier, or
    resumed from), of step `checkpoint_step`, or None when there is none.
    """

    def __init__(self, step, checkpoint, signum=signal.SIGINT, cut=None, checkpoint_step=None):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.cut, self.checkpoint_step = cut, checkpoint_step
        resume = (f"Resume from it: --resume {checkpoint} on the command line, or "
                  f"TrainingRun.resume({str(checkpoint)!r}).")
        if cut is not None:
            message = f"Training stopped during {cut}, which was not saved; " + (
                "no checkpoint was saved before it: start over." if checkpoint is None else
                f"the latest checkpoint is the one of step {checkpoint_step}, {checkpoint}. {resume}")
        elif checkpoint is None:
            message = f"Training stopped after step {step}; no checkpoint was configured."
        else:
            message = f"Training stopped after step {step}; checkpoint saved as {checkpoint}. {resume}"
        super().__init__(message)


class _StopOnCtrlC:
    """The first Ctrl-C (or SIGTERM, what `kill` and job schedulers send) asks the loop to stop
    after the current step (a step cut halfway would leave the weights and optimizer out of
    step); a second one stops at once."""

    # Windows' Ctrl-Break (SIGBREAK) too, as Ctrl-C (see run_guard).
    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([SIGBREAK] if SIGBREAK is not None else []))

    def __init__(self, enabled):
        self.enabled, self.requested, self.signum, self._previous = enabled, False, None, {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt if as_ctrl_c(signum) == signal.SIGINT else Terminated(signum)
        self.requested, self.signum = True, as_ctrl_c(signum)
        name = "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step to save a checkpoint "
              "(press Ctrl-C again to stop at once, without one).", file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handler) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


class TrainingRun:
    """One finetuning run: the model, its optimizer and loaders, and where training stands.

    `train_loader` supplies the dataset, collate function, batch size and drop_last, and
    whether to shuffle: the batches are those iterating it would yield, drawn from torch's
    global RNG at the same moments (see draw_epoch_seed). The evaluations iterate the loaders
    as the book's do. `seed`: when given, torch.manual_seed(seed) here, as the chapter seeds
    right before training (a resume then restores the checkpoint's RNG states).

    What one step and one evaluation compute are the methods `_train_step`, `_evaluate` (a dict
    of metrics for the row) and `_evaluation_line`: a subclass overrides them to train another
    objective with the same loop (dpo_train.DPOTrainingRun).
    """

    def __init__(self, model, optimizer, train_loader, val_loader, device, seed=None,
                 precision=None, checkpoints=None, metrics_path=None, distributed=None,
                 progress=True):
        self.model, self.optimizer = model, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.shuffle = shuffles(train_loader)
        if seed is not None:
            torch.manual_seed(seed)
        self.device = torch.device(device)
        self.precision = precision or resolve_precision("auto", self.device)
        self.scaler = self.precision.grad_scaler()
        self.checkpoints = checkpoints
        self.distributed = distributed or SingleProcess()
        self.is_main = self.distributed.is_main
        self.metrics = MetricsLog(metrics_path) if metrics_path is not None and self.is_main else None
        self.progress = progress
        self.state = TrainState()
        self.last_checkpoint = None  # the latest checkpoint saved or resumed from
        self.last_checkpoint_step = None  # its step
        self.saving = False  # whether a checkpoint is being written
        self.resumed_from = None
        self.finished = False

    #####################################
    # Checkpoints
    #####################################

    def save(self):
        """Checkpoint the run as it stands (the main process writes it) and prune old ones."""
        plan = self.checkpoints
        if plan is None:
            raise CheckpointError("This run has no CheckpointPlan: nowhere to save.")
        path = checkpoint_path(plan.folder, plan.stem, self.state.step)
        model, optimizer = self.distributed.checkpoint_view(self.model, self.optimizer)
        self.saving = True  # until it is done, a second Ctrl-C cuts this checkpoint, not a step
        if self.is_main:
            move_aside_another_runs(path, plan.identity)  # never overwrite another run's
            retry_while_disk_full(lambda: save_checkpoint(
                path, model, optimizer, self.state.progress(), self.state.metrics, plan.identity,
                self.scaler), plan.wait_for_space)
            # whole on disk from here: the one a Ctrl-C during the pruning names
            self.last_checkpoint, self.last_checkpoint_step = path, self.state.step
            # only this run's identity: another run's checkpoints of the same name stay
            prune_checkpoints(plan.folder, plan.stem, plan.keep, plan.identity, spare=[path])
        self.distributed.barrier()  # the file is whole before any process goes on
        self.last_checkpoint, self.last_checkpoint_step = path, self.state.step
        self.saving = False
        return path

    def resume(self, path=None):
        """Continue from checkpoint `path` (None: this run's with the highest step, whatever the
        files' times), refusing one saved for another model, data or config."""
        plan = self.checkpoints
        if plan is None:
            raise CheckpointError("Resuming needs a CheckpointPlan (its identity is checked).")
        path = newest_checkpoint(plan.folder, plan.stem, plan.identity) if path is None else Path(path)
        checkpoint = load_checkpoint(path)
        check_identity(checkpoint, plan.identity, path)
        restore(checkpoint, *self.distributed.checkpoint_view(self.model, self.optimizer, gather=False),
                self.scaler)
        self.state = TrainState(**checkpoint["progress"], metrics=checkpoint["metrics"])
        self.resumed_from = self.last_checkpoint = path
        self.last_checkpoint_step = self.state.step
        if self.is_main:
            print(f"Resuming from {path}: epoch {self.state.epoch + 1}, after step {self.state.step}.")
        return path

    def resume_or_start(self, resume):
        """The command lines' `--resume`: continue checkpoint `resume` (RESUME_NEWEST: this
        run's with the highest step), or, with None, start afresh and say so when an earlier run of the
        same stem left checkpoints (a later --resume would otherwise pick one of those)."""
        if resume is not None:
            return self.resume(None if resume == RESUME_NEWEST else resume)
        plan = self.checkpoints
        if self.is_main and plan is not None and list_checkpoints(plan.folder, plan.stem):
            print(f"Note: {plan.folder} holds checkpoints of an earlier run of {plan.stem}; this "
                  f"run starts afresh (pass --resume to continue that one).")
        return None

    def resume_if_any(self):
        """Resume from this run's checkpoint with the highest step when there is one; return its
        path or None."""
        plan = self.checkpoints
        if plan is None or not own_checkpoints(plan.folder, plan.stem, plan.identity):
            return None
        return self.resume()

    #####################################
    # The loop
    #####################################

    def _epoch_order(self):
        """This epoch's order: drawn at its start (the processes agree on it), or, after a
        resume in the middle of it, the checkpoint's."""
        if self.state.epoch_seed is None:
            self.state.epoch_seed = self.distributed.agree(draw_epoch_seed(self.shuffle))
        n_items = len(self.train_loader.dataset)
        return epoch_order(n_items, self.state.epoch_seed) if self.shuffle else list(range(n_items))

    def _train_step(self, batch_indices):
        dataset, collate = self.train_loader.dataset, self.train_loader.collate_fn
        input_batch, target_batch = collate([dataset[i] for i in self.distributed.share(batch_indices)])
        self.optimizer.zero_grad()
        with self.precision.autocast():
            loss = self.distributed.backward_loss(*self.distributed.loss_sum_and_count(
                input_batch, target_batch, self.model, self.device))
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.state.tokens_seen += self.distributed.padded_tokens(input_batch)

    def _evaluate(self, eval_iter):
        """evaluate_model's train and val loss, in this run's precision, as a metrics dict."""
        self.model.eval()
        with torch.inference_mode(), self.precision.autocast():
            train_loss, val_loss = (
                self.distributed.calc_loss_loader(loader, self.model, self.device, eval_iter)
                for loader in (self.train_loader, self.val_loader))
        self.model.train()
        return {"train_loss": train_loss, "val_loss": val_loss}

    def _evaluation_line(self, row):
        """The line printed at an evaluation: train_model_simple's."""
        return (f"Ep {row['epoch']} (Step {row['step']:06d}): "
                f"Train loss {row['train_loss']:.3f}, Val loss {row['val_loss']:.3f}")

    def _record(self, row, write):
        self.state.metrics.append(row)
        if self.metrics is not None:
            self.metrics.append(row)
        if self.is_main:
            write(self._evaluation_line(row))

    def train(self, num_epochs, eval_freq, eval_iter, start_context, tokenizer, max_steps=None):
        """Train up to `num_epochs` (or until `max_steps` steps in all); return train_model_simple's
        (train_losses, val_losses, tokens_seen), including those before a resume.

        Ctrl-C stops after the current step, saves a checkpoint and raises TrainingInterrupted.
        A second Ctrl-C stops at once, in a step or a checkpoint's write, which is lost: the
        TrainingInterrupted then says so (`cut`) and names the latest checkpoint saved before.
        `max_steps` stops the same way without an exception (a checkpoint is saved when planned).
        With `save_every`, the finished run is checkpointed too.
        """
        from tqdm import tqdm

        from instructkit.fast_llm import fast_path

        state, plan = self.state, self.checkpoints
        n_batches, batch_size = len(self.train_loader), self.train_loader.batch_size
        total = num_epochs * n_batches if max_steps is None else min(num_epochs * n_batches, max_steps)
        if self.metrics is not None:
            self.metrics.start(state.metrics)
        clock = time.perf_counter() - state.wall_seconds
        self.finished, self.saving = False, False
        bar = tqdm(total=total, initial=min(state.step, total), desc="Training", unit="step",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        with bar, _StopOnCtrlC(enabled=plan is not None) as ctrl_c:
            try:
                while state.epoch < num_epochs:
                    order = self._epoch_order()
                    self.model.train()
                    while state.position < n_batches:
                        stop = self.distributed.any(ctrl_c.requested)
                        if stop or (max_steps is not None and state.step >= max_steps):
                            state.wall_seconds = time.perf_counter() - clock
                            saved = self.save() if plan is not None else None
                            if stop:
                                raise TrainingInterrupted(state.step, saved,
                                                          ctrl_c.signum or signal.SIGINT)
                            return state.losses()
                        start = state.position * batch_size
                        self._train_step(order[start:start + batch_size])
                        state.position += 1
                        state.step += 1
                        bar.update(1)
                        global_step = state.step - 1  # the book's step counter starts at -1
                        if global_step % eval_freq == 0:
                            self._record({
                                "step": global_step, "epoch": state.epoch + 1,
                                "epochs_seen": state.epoch + state.position / n_batches,
                                "tokens_seen": state.tokens_seen, **self._evaluate(eval_iter),
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "seconds": time.perf_counter() - clock}, tqdm.write)
                        if plan is not None and plan.save_every and state.step % plan.save_every == 0:
                            state.wall_seconds = time.perf_counter() - clock
                            self.save()
                    if start_context is not None:
                        with self.distributed.full_weights(self.model), tqdm.external_write_mode():
                            if self.is_main:
                                # fast_gpt's, or fast_llm's for Qwen3/Llama
                                fast_path(self.model).print_sample(self.model, tokenizer, self.device,
                                                                   start_context)
                    state.epoch, state.position, state.epoch_seed = state.epoch + 1, 0, None
            except KeyboardInterrupt as e:
                if isinstance(e, TrainingInterrupted):
                    raise
                # A second Ctrl-C: what it cut is lost; the checkpoints saved before it are not
                cut = (f"the write of the checkpoint of step {state.step}" if self.saving
                       else f"step {state.step + 1}")
                if self.is_main:
                    print(f"\nTraining interrupted during {cut}; that was not saved.",
                          file=sys.stderr)
                self.saving = False
                raise TrainingInterrupted(
                    state.step, self.last_checkpoint, getattr(e, "signum", signal.SIGINT), cut=cut,
                    checkpoint_step=self.last_checkpoint_step) from e
        state.wall_seconds = time.perf_counter() - clock
        self.finished = True
        if plan is not None and plan.save_every and state.step % plan.save_every:
            self.save()  # the trained state, for a Ctrl-C in what follows (e.g. the answers)
        return state.losses()
