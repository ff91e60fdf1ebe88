"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Not in the book: the book's training loop keeps its state in memory only, so Ctrl-C or a
crash loses it all. A checkpoint is one file, written atomically (safe_files), holding:

    {"format": "ch07-training-checkpoint", "version": 1,
     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
     "scaler": GradScaler state (fp16) or None,
     "progress": {"epoch", "position", "epoch_seed", "step", "tokens_seen", "wall_seconds"},
     "metrics": [{"step", "epoch", "epochs_seen", "tokens_seen", "train_loss", "val_loss",
                  "lr", "seconds"}, ...],     # every evaluation so far
     "rng": {"torch", "cuda" (list, one per GPU) or None, "python", "numpy"},
     "identity": {"model_config": ..., "dataset_sha256": ..., "config": ...}}

`position` is the next batch in epoch `epoch`'s data order, the permutation of `epoch_seed`
(drawn from torch's RNG as DataLoader(shuffle=True) draws it: training.epoch_order),
so neither the order nor the checkpoint depends on how many processes trained. Only plain
Python values and CPU tensors are stored (safe_files.save_state_dict moves GPU tensors to the
CPU), so `torch.load(path)` (weights_only=True) reads it on any machine. A checkpoint moves
between machines: it loads onto the CPU, `restore` copies the weights onto the model's device
and the optimizer puts its state beside its parameters, and `set_rng_states` restores as many
GPUs' RNG states as both machines have.

Files are named `<stem>-step<step>.pth` inside a checkpoint folder. Runs of other settings
or data may share a stem (and a folder): `checkpoint_identity` reads a file's identity without
loading its tensors, `newest_checkpoint` finds the one with the highest step of this run's
identity (whatever the files' times say: a copied folder or a restored backup changes those),
and `prune_checkpoints` keeps the K highest steps of this run's identity and never touches
another run's.
"""

import glob
import pickle
import random
import re
import sys
from pathlib import Path

import torch

from instructkit.errors import CheckpointError  # noqa: F401 (raised here, importable)
from instructkit.safe_files import move_aside, remove_file, save_state_dict

FORMAT = "ch07-training-checkpoint"
VERSION = 2  # 2: the epoch order is the DataLoader's, drawn with "epoch_seed"


def checkpoint_path(folder, stem, step):
    return Path(folder) / f"{stem}-step{step:07d}.pth"


def _step_of(path, stem):
    match = re.fullmatch(re.escape(stem) + r"-step(\d+)\.pth", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder, stem):
    """The checkpoints named after `stem` in `folder`, lowest step first (whatever their
    identity; see `own_checkpoints`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{glob.escape(stem)}-step*.pth") if _step_of(p, stem) is not None]
    return sorted(found, key=lambda p: (_step_of(p, stem), p.name))


_IDENTITIES = {}  # (path, size, mtime_ns) -> identity, so that pruning reads each file once
_UNREADABLE = object()


def checkpoint_identity(path):
    """The identity a checkpoint file records (see the module docstring), read without loading
    its tensors (torch.load with mmap); None for a file that is not a readable checkpoint."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = _read_identity(path)
    identity = _IDENTITIES[key]
    return None if identity is _UNREADABLE else identity


def _read_identity(path):
    for mmap in (True, False):  # mmap: the tensors stay on disk (a file of the zip format)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError):
            continue
        if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
            return checkpoint.get("identity")
        return _UNREADABLE
    return _UNREADABLE


def own_checkpoints(folder, stem, identity=None):
    """The checkpoints of `stem` in `folder` whose identity equals `identity` (None: all of the
    stem) on its keys (the preflight knows only part of a run's identity), lowest step first."""
    found = list_checkpoints(folder, stem)
    if identity is None:
        return found
    return [p for p in found if identity_part(checkpoint_identity(p), identity) == identity]


def identity_part(saved, identity):
    """`saved` (a checkpoint's identity, or None) restricted to the keys of `identity`."""
    return None if saved is None else {key: saved.get(key) for key in identity}


def newest_checkpoint(folder, stem, identity=None):
    """The checkpoint of `stem` in `folder` with the highest step, of this run's `identity`
    when given; CheckpointError when there is none (naming how the others differ)."""
    found = own_checkpoints(folder, stem, identity)
    if found:
        return found[-1]
    readable = [p for p in list_checkpoints(folder, stem) if checkpoint_identity(p) is not None]
    if identity is not None and readable:  # the stem's, saved with other settings or data
        check_identity({"identity": identity_part(checkpoint_identity(readable[-1]), identity)},
                       identity, readable[-1])
    others = sorted(p.name for p in Path(folder).glob("*-step*.pth")) if Path(folder).is_dir() else []
    hint = f" It holds checkpoints of other runs: {', '.join(others[:5])}." if others else ""
    raise CheckpointError(f"No checkpoint named {stem}-step*.pth in {folder} to resume from.{hint} "
                          f"Pass its path to --resume, or start without --resume.")


def prune_checkpoints(folder, stem, keep, identity=None, spare=()):
    """Delete all but the `keep` highest-step checkpoints of `stem` (None keeps all); with
    `identity`, only among this run's (another run's checkpoints are never touched). The files
    in `spare` (the one just written) stay whatever their step. Returns the deleted."""
    if keep is None:
        return []
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (got {keep})")
    spare = {Path(p) for p in spare}
    old = [p for p in own_checkpoints(folder, stem, identity)[:-keep] if p not in spare]
    for path in old:
        remove_file(path, missing_ok=True)  # retried while Windows' virus scan holds it
    return old


#####################################
# Random number generators
#####################################

def rng_states():
    """Every RNG a training step may draw from, as plain values and tensors."""
    python_state = random.getstate()
    states = {"torch": torch.get_rng_state(),
              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
              "python": [python_state[0], list(python_state[1]), python_state[2]],
              "numpy": None}
    try:
        import numpy as np
    except ImportError:
        return states
    state = np.random.get_state(legacy=False)
    states["numpy"] = {"key": torch.from_numpy(state["state"]["key"].astype("int64")),
                       "pos": int(state["state"]["pos"]), "has_gauss": int(state["has_gauss"]),
                       "gauss": float(state["gauss"])}
    return states


def set_rng_states(states):
    """Put back the RNG states that rng_states() saved, on this machine's GPUs.

    "cuda" holds one state per GPU the saving process saw (GPU 0's is the one a single
    process draws from). A checkpoint moves between machines: each GPU that both machines
    have gets its saved state back, the first min(saved, here) of them; GPUs beyond the saved
    ones keep the state torch.manual_seed gave them at the start of the run, and saved states
    beyond this machine's GPUs are left unused (a CPU-only machine uses none).

    Under torchrun the main process saves, so the list holds the states that process saw: its
    own GPU's as it drew from it, the other GPUs' as seeded. Every process restores the list
    the same way, so the main process gets its GPU's state back and the others their seeded
    one. Training draws nothing from the GPUs' generators (the chapter's models have no
    dropout, drop_rate 0.0), so the losses resume the same either way.
    """
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if states["numpy"] is not None:
        import numpy as np

        saved = states["numpy"]
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": saved["key"].numpy().astype("uint32"), "pos": saved["pos"]},
                             "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})


#####################################
# Saving and loading
#####################################

def move_aside_another_runs(path, identity, out=None):
    """Before this run (of `identity`) writes checkpoint `path`: a checkpoint already there of
    another run (the same name, other settings or data) is renamed to `<name>.other-run`
    (`-1`, `-2`, ...), with a note, instead of being overwritten. Returns the new path or None."""
    path = Path(path)
    saved = checkpoint_identity(path)
    if saved is None or saved == identity:  # nothing there, unreadable, or this run's own
        return None
    target = move_aside(path, "other-run")
    print(f"Note: {path} was a checkpoint of another run (other settings or data): moved it to "
          f"{target.name} rather than overwrite it (rename it back to resume that run).",
          file=out or sys.stdout)
    return target


def save_checkpoint(path, model, optimizer, progress, metrics, identity, scaler=None):
    """Write a checkpoint atomically to `path` (see the module docstring for the layout)."""
    checkpoint = {
        "format": FORMAT, "version": VERSION,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": dict(progress), "metrics": [dict(row) for row in metrics],
        "rng": rng_states(), "identity": identity,
    }
    save_state_dict(checkpoint, path)
    return Path(path)


def load_checkpoint(path, mmap=False):
    """Read a checkpoint onto the CPU; CheckpointError when it is missing or not one of ours.
    `mmap`: the tensors stay in the file until used (a quick look at its identity)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}).") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (a finished "
                              f"model's .pth holds weights only and cannot be resumed).")
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {checkpoint.get('version')}; "
                              f"this code reads version {VERSION}.")
    return checkpoint


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def identity_differences(saved, current):
    """Lines naming each field where two identities differ, e.g. "model_config.emb_dim: 64 -> 32"."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    missing = object()
    lines = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        old, new = saved_flat.get(key, missing), current_flat.get(key, missing)
        if old != new:
            old_text = "(absent)" if old is missing else repr(old)
            new_text = "(absent)" if new is missing else repr(new)
            lines.append(f"{key}: {old_text} in the checkpoint, {new_text} now")
    return lines


def check_identity(checkpoint, identity, path="checkpoint"):
    """Refuse a checkpoint of a different model, data or config, naming every difference."""
    differences = identity_differences(checkpoint["identity"], identity)
    if differences:
        raise CheckpointError(
            f"{path} belongs to a different run:\n  " + "\n  ".join(differences) +
            "\nResume with the settings it was saved with, or start a fresh run without --resume.")


def restore(checkpoint, model, optimizer, scaler=None):
    """Load the weights, optimizer, scaler and RNG states of `checkpoint` (already checked)."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"])
