"""Training precision that fits the hardware: `--precision auto|fp32|bf16|fp16`.

Not in the book: the book trains in float32. Half precision halves the memory traffic of
the matrix multiplies, but not every device has it:
- bfloat16 has float32's exponent range, so it needs no loss scaling; NVIDIA GPUs have bf16
  hardware from compute capability 8.0 (Ampere: A100, RTX 30xx, L4) on. Older GPUs (T4, V100,
  Colab's free GPU) only emulate it, slowly.
- float16 runs on every CUDA GPU, but small gradients underflow in it: a gradient scaler
  multiplies the loss before the backward pass and divides the gradients again.
- On the CPU and on Apple's MPS, float32 is the safe default (bf16 autocast exists on the CPU
  and can be asked for; fp16 training needs a CUDA GPU here).

`auto` picks bf16 where the GPU has it, fp16 with a scaler on older CUDA GPUs, fp32 elsewhere.
The weights always stay float32 (autocast casts inside the forward pass only).
"""

import contextlib
from dataclasses import dataclass

import torch

from instructkit.errors import BadInputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(BadInputError):
    """The requested precision does not run on this device."""


def cuda_bf16_supported(device):
    """True on NVIDIA GPUs with bfloat16 hardware (compute capability 8.0 or newer)."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


@dataclass(frozen=True)
class Precision:
    """What training runs in: 'fp32', 'bf16' or 'fp16' on a device type, and why."""

    name: str
    device_type: str
    reason: str

    @property
    def dtype(self):
        return _DTYPES[self.name]

    def autocast(self):
        """The context for forward passes: autocast to bf16/fp16, or nothing for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """A GradScaler for fp16 (small gradients would underflow without it), else None."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)

    def describe(self):
        kinds = {"fp32": "float32", "bf16": "bfloat16 autocast",
                 "fp16": "float16 autocast with a gradient scaler"}
        return f"Precision: {self.name} ({kinds[self.name]}; {self.reason})"


def resolve_precision(requested, device, bf16_supported=cuda_bf16_supported):
    """The Precision for `requested` ('auto', 'fp32', 'bf16', 'fp16') on `device`.

    `bf16_supported(device) -> bool` is asked only for CUDA devices; tests pass a stub.
    Raises PrecisionError, saying what to use instead, for a combination that cannot run.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    kind = device.type
    if kind == "cuda":
        has_bf16 = bf16_supported(device)
        if requested == "auto":
            if has_bf16:
                return Precision("bf16", kind, "auto: this GPU has bfloat16 hardware")
            return Precision("fp16", kind, "auto: this GPU has no bfloat16 hardware")
        if requested == "bf16" and not has_bf16:
            raise PrecisionError(
                "This GPU has no bfloat16 hardware (it needs compute capability 8.0, e.g. A100, "
                "L4, RTX 30xx). Use --precision fp16 (or auto, which picks it) or fp32.")
        return Precision(requested, kind, "requested")
    if requested == "auto":
        return Precision("fp32", kind, f"auto: float32 on {kind.upper()}")
    if requested == "fp16":
        raise PrecisionError(f"fp16 training needs a CUDA GPU; on {kind.upper()} use "
                             f"--precision fp32 (or bf16).")
    if requested == "bf16" and kind != "cpu":
        raise PrecisionError(f"bf16 training is supported on CUDA GPUs and the CPU here, not on "
                             f"{kind.upper()}; use --precision fp32.")
    return Precision(requested, kind, "requested")
