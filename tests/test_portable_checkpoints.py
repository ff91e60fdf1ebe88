"""Checkpoints and model files move between machines (checkpoints.py, safe_files.py, devices.py).

A run stopped on a machine with GPUs continues on one with fewer GPUs or none, and the
reverse; every .pth the project writes loads with the book's plain `torch.load(path)` on a
machine without the device it was saved from. This machine has one CPU and no GPU, so each
test says how it stands in for the other machine.
"""

import contextlib
import io
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.serialization
from conftest import ROOT
from torch.utils.data import DataLoader

from gpt_instruction_finetuning import InstructionDataset, custom_collate_fn
from instructkit.checkpoints import load_checkpoint, restore, save_checkpoint
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.model_files import load_finetuned_model
from instructkit.safe_files import save_state_dict
from instructkit.training import CheckpointPlan, TrainingRun
from previous_chapters import GPTModel

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}
SEED = 11
IDENTITY = {"model_config": CFG, "dataset_sha256": "0" * 64, "config": {"seed": SEED}}
EPOCHS, STEPS, STOP_AT = 1, 4, 2  # 8 entries in batches of 2: stopped after 2 of 4 steps


def make_run(instruction_data, tokenizer, folder):
    """A tiny real training run on the chapter's data, on the CPU, checkpointing into `folder`."""
    collate = partial(custom_collate_fn, allowed_max_length=CFG["context_length"])
    torch.manual_seed(SEED)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    train_loader = DataLoader(InstructionDataset(instruction_data[:8], tokenizer), batch_size=2,
                              shuffle=True, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(InstructionDataset(instruction_data[8:10], tokenizer), batch_size=2,
                            collate_fn=collate)
    plan = CheckpointPlan(folder, "tiny-sft", IDENTITY)
    return TrainingRun(model, optimizer, train_loader, val_loader, "cpu", seed=SEED,
                       checkpoints=plan, progress=False)


def train(run, max_steps=None):
    with contextlib.redirect_stdout(io.StringIO()):
        losses = run.train(EPOCHS, 1, 1, None, None, max_steps=max_steps)
    return losses


@pytest.fixture(scope="module")
def uninterrupted(instruction_data, tokenizer, tmp_path_factory):
    run = make_run(instruction_data, tokenizer, tmp_path_factory.mktemp("whole"))
    losses = train(run)
    return losses, {k: v.clone() for k, v in run.model.state_dict().items()}


def stopped_checkpoint(instruction_data, tokenizer, folder):
    """Train STOP_AT steps and stop; return the checkpoint written."""
    first = make_run(instruction_data, tokenizer, folder)
    train(first, max_steps=STOP_AT)
    assert first.state.step == STOP_AT
    return first.last_checkpoint


def assert_finishes_as_uninterrupted(run, uninterrupted):
    losses, weights = uninterrupted
    assert train(run) == losses
    for key, value in weights.items():
        assert torch.equal(run.model.state_dict()[key], value), key


def cuda_states(n):
    """n distinct stand-ins for torch.cuda.get_rng_state() (16-byte ByteTensors)."""
    return [torch.arange(16, dtype=torch.uint8) + 16 * i for i in range(n)]


class Gpus:
    """torch.cuda as a machine with `count` GPUs sees it, for the RNG calls checkpoints.py
    makes. set_rng_state on a GPU index this machine lacks raises IndexError, as torch does
    for a device that does not exist (what set_rng_state_all hit on fewer GPUs)."""

    def __init__(self, monkeypatch, count):
        self.count, self.restored = count, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        # set_rng_state_all calls torch.cuda.random's set_rng_state, so that one too
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)

    def set_rng_state(self, new_state, device="cuda"):
        index = device if isinstance(device, int) else (torch.device(device).index or 0)
        if index >= self.count:
            raise IndexError(f"no GPU {index}: this machine has {self.count}")
        self.restored.append((index, new_state.clone()))


@pytest.mark.parametrize(("saved", "here"), [(8, 1), (8, 2), (2, 4), (3, 3)])
def test_rng_states_restore_for_the_gpus_this_machine_has(instruction_data, tokenizer, tmp_path,
                                                          monkeypatch, uninterrupted, saved, here):
    """A checkpoint saved with `saved` GPUs' RNG states resumes where torch.cuda reports
    `here` GPUs (mocked): the first min(saved, here) states go to GPUs 0, 1, ...; GPUs beyond
    the saved ones are left alone (their seeded state). The run then finishes on the CPU with
    the uninterrupted run's losses and weights."""
    path = stopped_checkpoint(instruction_data, tokenizer, tmp_path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["rng"]["cuda"] is None  # saved here, without CUDA
    checkpoint["rng"]["cuda"] = cuda_states(saved)  # as a machine with `saved` GPUs saves it
    save_state_dict(checkpoint, path)

    second = make_run(instruction_data, tokenizer, tmp_path)
    with monkeypatch.context() as patch:
        gpus = Gpus(patch, here)
        assert second.resume(path) == path
    n = min(saved, here)
    assert [index for index, _ in gpus.restored] == list(range(n))
    assert all(torch.equal(state, expected)
               for (_, state), expected in zip(gpus.restored, cuda_states(saved)[:n], strict=True))
    assert_finishes_as_uninterrupted(second, uninterrupted)


def test_no_cuda_restores_no_gpu_state(instruction_data, tokenizer, tmp_path, monkeypatch):
    path = stopped_checkpoint(instruction_data, tokenizer, tmp_path)
    checkpoint = load_checkpoint(path)
    checkpoint["rng"]["cuda"] = cuda_states(2)
    save_state_dict(checkpoint, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: pytest.fail("no CUDA here"))
    assert make_run(instruction_data, tokenizer, tmp_path).resume(path) == path


@contextlib.contextmanager
def saved_as_on_cuda():
    """torch.save writes each storage's device as its location tag ("cpu", "cuda:0") and
    torch.load puts it back there. With the tag function answering "cuda:0", torch.save writes
    exactly the file a CUDA machine writes when given GPU tensors (the data bytes are the same),
    which is what this project's files were before save_state_dict moved tensors to the CPU,
    and what other tools still write."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        yield
    finally:
        torch.serialization.location_tag = real


def test_a_checkpoint_saved_on_cuda_resumes_on_the_cpu(instruction_data, tokenizer, tmp_path,
                                                      uninterrupted):
    path = stopped_checkpoint(instruction_data, tokenizer, tmp_path)
    checkpoint = load_checkpoint(path)
    with saved_as_on_cuda():
        torch.save(checkpoint, path)
    if not torch.cuda.is_available():  # the file really is a CUDA file
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path)

    second = make_run(instruction_data, tokenizer, tmp_path)
    assert second.resume(path) == path  # checkpoints.load_checkpoint maps it onto the CPU
    assert second.optimizer.state_dict()["state"][0]["exp_avg"].device == torch.device("cpu")
    assert_finishes_as_uninterrupted(second, uninterrupted)


def test_a_model_file_saved_on_cuda_loads_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(TEST_MODE_CONFIG).eval()  # a width whose number of heads is known
    path = tmp_path / "tiny-sft.pth"
    with saved_as_on_cuda():
        torch.save(model.state_dict(), path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path)
    loaded, _, _ = load_finetuned_model(path)  # model_files maps it onto the CPU
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_cpu_checkpoint_restores_onto_another_device(tmp_path):
    """The reverse way: the file's tensors are on the CPU and the model is elsewhere. With no
    GPU here, the meta device stands in for it: restore leaves the optimizer's state beside
    the model's parameters, on the model's device, not the file's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "run-step0000001.pth", model, optimizer, {"step": 1}, [], {})

    elsewhere = torch.nn.Linear(3, 2, device="meta")
    elsewhere_optimizer = torch.optim.AdamW(elsewhere.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="meta parameter"):  # copying into meta is a no-op
        restore(load_checkpoint(path), elsewhere, elsewhere_optimizer)
    for param in elsewhere.parameters():
        state = elsewhere_optimizer.state[param]
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"


class ClaimsCuda(torch.Tensor):
    """A tensor that says it lives on GPU 0: torch.save would pickle its class (which
    torch.load's weights_only mode refuses), so a file written with one left in it cannot be
    read by plain torch.load. `.cpu()` gives the plain CPU tensor, as for a real GPU tensor."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def detach(self):
        return self

    def cpu(self):
        return self.as_subclass(torch.Tensor).clone()


def on_gpu(state):
    return {key: value.as_subclass(ClaimsCuda) if isinstance(value, torch.Tensor) else value
            for key, value in state.items()}


def storage_locations(path):
    """The device tag of every storage in a .pth file (map_location is called with each)."""
    seen = []

    def record(storage, location):
        seen.append(location)
        return storage

    torch.load(path, map_location=record)
    return seen


def test_saved_files_hold_cpu_tensors_that_plain_torch_load_reads(tmp_path, monkeypatch):
    """Model files (-sft.pth, -dpo.pth, LoRA adapters) and checkpoints all go through
    safe_files.save_state_dict: given tensors on a GPU (ClaimsCuda stands in for them), it
    writes CPU tensors, so the book's `torch.load(path)` (weights_only=True by default) reads
    them on a machine without that GPU; the state dict's `_metadata` stays as it was."""
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    plain = model.state_dict()
    gpu_state = type(plain)(on_gpu(plain))
    gpu_state._metadata = plain._metadata
    assert all(v.device.type == "cuda" for v in gpu_state.values())

    path = tmp_path / "tiny-sft.pth"
    save_state_dict(gpu_state, path)
    loaded = torch.load(path)
    assert set(storage_locations(path)) == {"cpu"}
    assert type(loaded) is type(plain) and loaded._metadata == plain._metadata
    assert loaded.keys() == plain.keys()
    assert all(type(loaded[k]) is torch.Tensor and torch.equal(loaded[k], v) for k, v in plain.items())

    # A checkpoint of a model on a GPU: weights and optimizer state alike
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    monkeypatch.setattr(model, "state_dict", lambda: on_gpu(plain))
    opt_state = optimizer.state_dict()
    gpu_optimizer = type("OnGpu", (), {"state_dict": lambda self: {
        "state": {i: on_gpu(s) for i, s in opt_state["state"].items()},
        "param_groups": opt_state["param_groups"]}})()
    path = save_checkpoint(tmp_path / "run-step0000001.pth", model, gpu_optimizer, {"step": 1},
                           [], {})
    checkpoint = torch.load(path)
    assert set(storage_locations(path)) == {"cpu"}
    assert torch.equal(checkpoint["optimizer"]["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])


def test_every_pth_is_written_through_save_state_dict():
    """The package and the chapter's files call torch.save in one place only (save_state_dict),
    so no other writer can leave GPU tensors in a file."""
    writers = []
    for path in [*ROOT.glob("*.py"), *(ROOT / "instructkit").glob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\btorch\.save\(", line):
                writers.append(f"{Path(path).relative_to(ROOT)}:{number}")
    assert len(writers) == 1 and writers[0].startswith("instructkit/safe_files.py:"), writers
