"""precision.resolve_precision for every device kind, with stubs for the GPU's capability."""

import warnings

import pytest
import torch

from instructkit.precision import (
    PRECISIONS,
    Precision,
    PrecisionError,
    cuda_bf16_supported,
    resolve_precision,
)


def has_bf16(device):
    return True


def no_bf16(device):
    return False


def never_asked(device):
    raise AssertionError("the bf16 capability is only asked for CUDA devices")


@pytest.mark.parametrize("device, requested, capability, expected", [
    ("cuda", "auto", has_bf16, "bf16"),     # A100, L4, RTX 30xx and newer
    ("cuda", "auto", no_bf16, "fp16"),      # T4, V100: fp16 with a gradient scaler
    ("cuda:1", "auto", no_bf16, "fp16"),
    ("cuda", "fp32", no_bf16, "fp32"),
    ("cuda", "fp16", has_bf16, "fp16"),
    ("cuda", "bf16", has_bf16, "bf16"),
    ("cpu", "auto", never_asked, "fp32"),
    ("mps", "auto", never_asked, "fp32"),
    ("cpu", "fp32", never_asked, "fp32"),
    ("cpu", "bf16", never_asked, "bf16"),   # CPU bf16 autocast exists, on request only
    ("mps", "fp32", never_asked, "fp32"),
])
def test_resolution_per_device_kind(device, requested, capability, expected):
    precision = resolve_precision(requested, device, bf16_supported=capability)
    assert precision.name == expected
    assert precision.device_type == torch.device(device).type
    with warnings.catch_warnings():  # a CUDA GradScaler on a machine without CUDA warns
        warnings.simplefilter("ignore", UserWarning)
        assert (precision.grad_scaler() is not None) == (expected == "fp16")
    assert precision.describe().startswith(f"Precision: {expected} (")
    assert ("auto" in precision.reason) == (requested == "auto")


@pytest.mark.parametrize("device, requested, capability, message", [
    ("cuda", "bf16", no_bf16, "no bfloat16 hardware"),
    ("cpu", "fp16", never_asked, "fp16 training needs a CUDA GPU"),
    ("mps", "fp16", never_asked, "fp16 training needs a CUDA GPU"),
    ("mps", "bf16", never_asked, "use --precision fp32"),
    ("cpu", "fp8", never_asked, "Unknown precision 'fp8'"),
])
def test_impossible_combinations_are_refused_with_advice(device, requested, capability, message):
    with pytest.raises(PrecisionError, match=message):
        resolve_precision(requested, device, bf16_supported=capability)


def test_capability_query_reads_the_compute_capability(monkeypatch):
    """The default query: bf16 hardware from compute capability 8.0 (Ampere) on."""
    for capability, expected in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert cuda_bf16_supported(torch.device("cuda")) is expected


def test_fast_gpt_autocast_uses_bf16_only_with_bf16_hardware(monkeypatch):
    from fast_gpt import uses_bf16

    assert uses_bf16("cuda", bf16_supported=has_bf16) is True
    assert uses_bf16("cuda:1", bf16_supported=no_bf16) is False
    assert uses_bf16("cpu", bf16_supported=never_asked) is False
    assert uses_bf16(torch.device("mps"), bf16_supported=never_asked) is False
    # A T4 (compute capability 7.5): torch.cuda.is_bf16_supported() says yes (emulated, slow);
    # the default query, precision.cuda_bf16_supported, says no.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert uses_bf16("cuda") is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))  # A100
    assert uses_bf16("cuda") is True


def test_autocast_really_runs_in_the_chosen_dtype_on_the_cpu():
    a = torch.ones(2, 2)
    with resolve_precision("bf16", "cpu").autocast():
        assert (a @ a).dtype == torch.bfloat16
    with resolve_precision("auto", "cpu").autocast():
        assert (a @ a).dtype == torch.float32
    assert Precision("fp16", "cuda", "requested").dtype == torch.float16
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
