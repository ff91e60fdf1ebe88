"""Training precision that fits the hardware: `--precision auto|fp32|bf16|fp16`.

Not in the book: the book trains in float32. Half precision halves the memory traffic of
the matrix multiplies, but not every device has it:
- bfloat16 has float32's exponent range, so it needs no loss scaling; NVIDIA GPUs have bf16
  hardware from compute capability 8.0 (Ampere: A100, RTX 30xx, L4) on. Older GPUs (T4, V100,
  Colab's free GPU) only emulate it, slowly.
- float16 runs on every CUDA GPU, but small gradients underflow in it: a gradient scaler
  multiplies the loss before the backward pass and divides the gradients again. It is fast
  only with tensor cores, from compute capability 7.0 (Volta: V100; Turing: T4, RTX 20xx).
  Pascal and Maxwell GPUs (P100, GTX 10xx, compute capability 5.x and 6.x) have none: there
  fp16 saves some memory but no time, and costs the scaler's skipped steps, so `auto` keeps
  float32 there (`--precision fp16` still runs on them, on request).
- On the CPU and on Apple's MPS, float32 is the safe default (bf16 autocast exists on the CPU
  and can be asked for; fp16 training needs a CUDA GPU here).

`auto` picks bf16 at compute capability 8.0 and above, fp16 with a scaler at 7.x, fp32 below
7.0 and on the CPU and MPS. The weights always stay float32 (autocast casts inside the forward
pass only). `enable_tf32()` lets float32 matrix products on a CUDA GPU use TensorFloat-32.
"""

import contextlib
from dataclasses import dataclass

import torch

from instructkit.errors import BadInputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(BadInputError):
    """The requested precision does not run on this device."""


def cuda_capability(device):
    """The CUDA GPU's compute capability as (major, minor), e.g. (7, 5) for a T4."""
    return tuple(torch.cuda.get_device_capability(device))


def cuda_bf16_supported(device):
    """True on NVIDIA GPUs with bfloat16 hardware (compute capability 8.0 or newer)."""
    major, _minor = cuda_capability(device)
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


def resolve_precision(requested, device, capability=None):
    """The Precision for `requested` ('auto', 'fp32', 'bf16', 'fp16') on `device`.

    `capability(device) -> (major, minor)` is asked only for CUDA devices (default:
    torch.cuda.get_device_capability). Raises PrecisionError, saying what to use instead, for a
    combination that cannot run.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    kind = device.type
    if kind == "cuda":
        major, minor = (capability or cuda_capability)(device)
        level = f"compute capability {major}.{minor}"
        if requested == "auto":
            if major >= 8:
                return Precision("bf16", kind, f"auto: {level} has bfloat16 hardware")
            if major == 7:
                return Precision("fp16", kind, f"auto: {level} has float16 tensor cores but no "
                                               f"bfloat16 hardware")
            return Precision("fp32", kind, f"auto: {level} has no tensor cores, so half "
                                           f"precision would gain nothing")
        if requested == "bf16" and major < 8:
            raise PrecisionError(
                f"This GPU ({level}) has no bfloat16 hardware (it needs compute capability 8.0, "
                f"e.g. A100, L4, RTX 30xx). Use --precision fp16 or fp32 (or auto).")
        if requested == "fp16" and major < 7:
            return Precision("fp16", kind, f"requested; note: {level} has no tensor cores, so "
                                           f"fp16 saves memory but little or no time")
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


def _tf32_switches():
    """[(object, attribute, value when on, value when off)] for float32 matrix products and
    convolutions: torch 2.9's `fp32_precision`, or on an older torch its `allow_tf32` flags
    (still there in new torch, but deprecated: they are not touched where the new ones exist)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return [(matmul, "fp32_precision", "tf32", "ieee"), (conv, "fp32_precision", "tf32", "ieee")]
    return [(matmul, "allow_tf32", True, False), (cudnn, "allow_tf32", True, False)]


def set_tf32(enabled):
    """Let float32 matrix products and convolutions on CUDA GPUs use TensorFloat-32 (or not);
    returns the previous settings, for `restore_tf32`.

    TF32 keeps float32's range with a 10-bit mantissa: on GPUs from Ampere (compute capability
    8.0) on, float32 matrix products then run on the tensor cores, several times faster, with
    rounding that training does not notice.
    """
    previous = []
    for owner, name, on, off in _tf32_switches():
        previous.append((owner, name, getattr(owner, name)))
        setattr(owner, name, on if enabled else off)
    return previous


def restore_tf32(previous):
    """Put back the settings that `set_tf32` returned."""
    for owner, name, value in previous:
        setattr(owner, name, value)


def enable_tf32():
    """TensorFloat-32 for float32 matrix products and convolutions on CUDA GPUs, from now on."""
    set_tf32(True)


@contextlib.contextmanager
def tf32(enabled):
    """TensorFloat-32 on (or off) inside the block, the previous settings restored after."""
    previous = set_tf32(enabled)
    try:
        yield
    finally:
        restore_tf32(previous)
