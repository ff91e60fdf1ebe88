"""checkpoints.py: RNG states, atomic files, pruning, the newest file, refusals."""

import os
import random

import numpy as np
import pytest
import torch

from instructkit.checkpoints import (
    CheckpointError,
    check_identity,
    checkpoint_path,
    identity_differences,
    list_checkpoints,
    load_checkpoint,
    move_aside_another_runs,
    newest_checkpoint,
    prune_checkpoints,
    restore,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from instructkit.safe_files import save_state_dict


def draws():
    return (torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist(), np.random.randn())


def test_rng_states_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(rng_states(), tmp_path / "rng.pth")
    expected = draws()
    draws()  # move every generator on
    set_rng_states(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert draws() == expected


def small_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_and_restore_model_optimizer_progress(tmp_path):
    model, optimizer = small_model_and_optimizer()
    progress = {"epoch": 1, "position": 3, "step": 9, "tokens_seen": 100, "wall_seconds": 1.5}
    metrics = [{"step": 0, "train_loss": 1.0}]
    path = save_checkpoint(checkpoint_path(tmp_path, "run", 9), model, optimizer, progress, metrics,
                           {"data": "abc"})
    assert path.name == "run-step0000009.pth"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file

    checkpoint = load_checkpoint(path)  # weights_only=True: plain values and tensors only
    assert checkpoint["progress"] == progress and checkpoint["metrics"] == metrics
    assert checkpoint["scaler"] is None

    fresh, fresh_optimizer = torch.nn.Linear(3, 2), None
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    restore(checkpoint, fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg_sq"],
                       optimizer.state_dict()["state"][0]["exp_avg_sq"])


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pth")
    model, _ = small_model_and_optimizer()
    save_state_dict(model.state_dict(), tmp_path / "model.pth")  # a finished model's weights
    with pytest.raises(CheckpointError, match="weights only and cannot be resumed"):
        load_checkpoint(tmp_path / "model.pth")


def test_identity_differences_name_each_field():
    saved = {"model_config": {"emb_dim": 64, "n_layers": 2}, "dataset_sha256": "aa",
             "config": {"lr": 5e-5, "lora_rank": None}}
    current = {"model_config": {"emb_dim": 64, "n_layers": 4}, "dataset_sha256": "bb",
               "config": {"lr": 5e-5, "lora_rank": 8, "mask_instructions": True}}
    assert identity_differences(saved, current) == [
        "config.lora_rank: None in the checkpoint, 8 now",
        "config.mask_instructions: (absent) in the checkpoint, True now",
        "dataset_sha256: 'aa' in the checkpoint, 'bb' now",
        "model_config.n_layers: 2 in the checkpoint, 4 now",
    ]
    assert identity_differences(saved, saved) == []
    check_identity({"identity": saved}, saved)  # the same: accepted
    with pytest.raises(CheckpointError, match=r"x.pth belongs to a different run:\n  config.lora_rank"):
        check_identity({"identity": saved}, current, "x.pth")


def test_newest_and_pruning_follow_the_steps_not_the_file_times(tmp_path):
    for i, step in enumerate((30, 10, 20)):  # a copied folder: the times say nothing of the steps
        path = checkpoint_path(tmp_path, "run", step)
        path.write_bytes(b"x")
        os.utime(path, ns=(i * 10**9, i * 10**9))
    checkpoint_path(tmp_path, "run-lora8", 99).write_bytes(b"x")  # another run's, left alone
    (tmp_path / "run-stepx.pth").write_bytes(b"x")  # not a checkpoint name

    assert [p.name for p in list_checkpoints(tmp_path, "run")] == [
        "run-step0000010.pth", "run-step0000020.pth", "run-step0000030.pth"]
    assert newest_checkpoint(tmp_path, "run").name == "run-step0000030.pth"
    deleted = prune_checkpoints(tmp_path, "run", keep=2)
    assert [p.name for p in deleted] == ["run-step0000010.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run-lora8-step0000099.pth", "run-step0000020.pth", "run-step0000030.pth", "run-stepx.pth"]
    assert prune_checkpoints(tmp_path, "run", keep=None) == []
    with pytest.raises(ValueError, match="at least 1"):
        prune_checkpoints(tmp_path, "run", keep=0)


def test_no_checkpoint_to_resume_says_what_to_do(tmp_path):
    checkpoint_path(tmp_path, "other", 5).write_bytes(b"x")
    with pytest.raises(CheckpointError, match="No checkpoint named run-step\\*.pth") as error:
        newest_checkpoint(tmp_path, "run")
    assert "other-step0000005.pth" in str(error.value) and "start without --resume" in str(error.value)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        newest_checkpoint(tmp_path / "missing", "run")


def test_another_runs_checkpoint_of_the_same_name_is_moved_aside_not_overwritten(tmp_path, capsys):
    """Two runs of one stem with other settings save step 9 under one name: the second moves
    the first's file aside (with a note) before it writes, so nothing of the first is lost."""
    model, optimizer = small_model_and_optimizer()
    progress = {"epoch": 1, "position": 0, "step": 9, "tokens_seen": 0, "wall_seconds": 0.0}
    path = save_checkpoint(checkpoint_path(tmp_path, "run", 9), model, optimizer, progress, [],
                           {"config": {"lr": 1.0}})
    first = path.read_bytes()
    assert move_aside_another_runs(path, {"config": {"lr": 1.0}}) is None  # its own: overwritten
    assert path.read_bytes() == first

    moved = move_aside_another_runs(path, {"config": {"lr": 0.5}})
    assert moved == tmp_path / "run-step0000009.pth.other-run" and moved.read_bytes() == first
    assert not path.exists() and list_checkpoints(tmp_path, "run") == []  # no longer this stem's
    assert (f"Note: {path} was a checkpoint of another run (other settings or data): moved it to "
            f"run-step0000009.pth.other-run rather than overwrite it") in capsys.readouterr().out

    save_checkpoint(path, model, optimizer, progress, [], {"config": {"lr": 2.0}})
    again = move_aside_another_runs(path, {"config": {"lr": 0.5}})
    assert again.name == "run-step0000009.pth.other-run-1" and moved.read_bytes() == first
    path.write_bytes(b"not a checkpoint")  # unreadable: not a run's, overwritten as before
    assert move_aside_another_runs(path, {"config": {"lr": 0.5}}) is None
