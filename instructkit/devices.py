"""Which device a command runs on: `--device`, checked, or the chapter's own choice.

The chapter's `get_device()` (gpt_instruction_finetuning.py) picks CUDA, else Apple's GPU on
PyTorch 2.9 and newer, else the CPU. `--device NAME` asks for one; a device this machine or
this PyTorch build does not have is a `DeviceError` (one line, exit code 2) that says what to
use instead, before any work.
"""

import torch

from instructkit.errors import BadInputError


class DeviceError(BadInputError):
    """The requested device is not available here."""


def choose_device(name=None, test_mode=False, default=None):
    """--device `name` checked for availability; without it, the CPU in test mode, else
    `default()` (the chapter's get_device, when the caller passes it), else the CPU."""
    if name is None:
        if test_mode or default is None:
            return torch.device("cpu")
        return default()
    try:
        kind = torch.device(name).type
    except RuntimeError:  # torch's own message for a name it does not know
        raise DeviceError(f"--device {name!r} is not a device: use cuda, mps or cpu.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but is not available: this PyTorch build or "
                          "machine has no CUDA GPU. Use --device cpu (or mps on a Mac).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was requested but is not available (it needs an Apple "
                          "silicon Mac). Use --device cpu.")
    return torch.device(name)
