"""Which device a command runs on, and what moves between devices: one policy for all commands.

The chapter's `get_device()` (gpt_instruction_finetuning.py) picks CUDA, else Apple's GPU on
PyTorch 2.9 and newer, else the CPU: before 2.9, PyTorch computed this chapter's losses wrong
on MPS. `best_device()` makes the same choice for the commands that do not take the chapter's
function (chat, web chat, DPO), and `--device NAME` asks for one device. A device that this
machine or this PyTorch build does not have, or MPS on a PyTorch older than `MPS_MIN_TORCH`,
is a `DeviceError` (one line, exit code 2) that says what to do instead, before any work.

Two more rules keep results right whatever the device:
- `sampling_device`: random draws (torch.multinomial) run on the CPU when the model is on MPS,
  where torch.multinomial can pick tokens of probability zero.
- `to_cpu`: what is saved to a .pth file holds CPU tensors only, so that the book's plain
  `torch.load(path)` reads it on a machine without the GPU it was trained on.
"""

import copy
import re

import torch

from instructkit.errors import BadInputError

# The first PyTorch release whose MPS backend computes the chapter's losses right; the chapter's
# get_device() compares against this same value
MPS_MIN_TORCH = (2, 9)


class DeviceError(BadInputError):
    """The requested device is not available here."""


def torch_version(version=None):
    """(major, minor) of `version` (default: the installed torch), e.g. "2.8.0+cpu" -> (2, 8)."""
    version = torch.__version__ if version is None else version
    # the leading digits of the first two parts: a pre-release such as "2.10a0" has letters
    major, minor = (re.match(r"\d*", part).group() or "0" for part in str(version).split(".")[:2])
    return int(major), int(minor)


def mps_torch_ok():
    """Whether this PyTorch computes the chapter's losses right on MPS (MPS_MIN_TORCH or newer)."""
    return torch_version() >= MPS_MIN_TORCH


def check_mps_torch():
    """DeviceError unless this PyTorch is new enough for MPS, saying how to upgrade."""
    if not mps_torch_ok():
        needed = ".".join(map(str, MPS_MIN_TORCH))
        raise DeviceError(
            f"MPS needs PyTorch {needed} or newer, and this is torch {torch.__version__}: earlier "
            f"versions compute wrong losses on Apple GPUs. Upgrade with "
            f'pip install --upgrade "torch>={needed}", or use --device cpu.')


def best_device():
    """The chapter's automatic choice: CUDA, else MPS on a new-enough PyTorch, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available() and mps_torch_ok():
        return torch.device("mps")
    return torch.device("cpu")


def choose_device(name=None, test_mode=False, default=None):
    """--device `name`, checked; without it, the CPU in test mode, else `default()` (the
    chapter's get_device, when the caller passes it), else best_device()."""
    if name is None:
        if test_mode:
            return torch.device("cpu")
        return default() if default is not None else best_device()
    try:
        kind = torch.device(name).type
    except RuntimeError:  # torch's own message for a name it does not know
        raise DeviceError(f"--device {name!r} is not a device: use cuda, mps or cpu.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but is not available: this PyTorch build or "
                          "machine has no CUDA GPU. Use --device cpu (or mps on a Mac).")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("MPS was requested but is not available (it needs an Apple "
                              "silicon Mac). Use --device cpu.")
        check_mps_torch()  # the same guard as the automatic choice
    return torch.device(name)


def sampling_device(device):
    """Where to draw random tokens for a model on `device`: the CPU for MPS, whose
    torch.multinomial can return tokens of probability zero (seen up to torch 2.13), so that
    top-k sampling could leave the top k; `device` itself everywhere else (no copy)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def to_cpu(value):
    """`value` (a state dict, or dicts and lists of them) with every tensor on the CPU.

    torch.save records each tensor's device, and torch.load puts it back there, so a file
    saved from a GPU fails to load on a machine without one unless the reader passes
    map_location. Tensors already on the CPU are kept as they are (no copy) and containers
    keep their type and attributes (a state dict's `_metadata`), so the file is otherwise the
    same.
    """
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "cpu" else value.detach().cpu()
    if isinstance(value, dict):
        moved = copy.copy(value)  # same type, same attributes
        for key, item in value.items():
            moved[key] = to_cpu(item)
        return moved
    if isinstance(value, list):
        return [to_cpu(item) for item in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(to_cpu(item) for item in value)
    return value
