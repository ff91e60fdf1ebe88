"""precision.resolve_precision for every device kind, with stubs for the GPU's compute
capability; TensorFloat-32 through torch's current API."""

import warnings

import pytest
import torch

from instructkit.precision import (
    PRECISIONS,
    Precision,
    PrecisionError,
    cuda_bf16_supported,
    enable_tf32,
    resolve_precision,
    set_tf32,
    tf32,
)


def has_bf16(device):
    return True


def no_bf16(device):
    return False


def ampere(device):
    return (8, 0)


def turing(device):
    return (7, 5)


def pascal(device):
    return (6, 1)


def never_asked(device):
    raise AssertionError("the GPU's capability is only asked for CUDA devices")


@pytest.mark.parametrize("device, requested, capability, expected", [
    ("cuda", "auto", ampere, "bf16"),     # A100, L4, RTX 30xx and newer
    ("cuda", "auto", turing, "fp16"),     # T4, V100: fp16 with a gradient scaler
    ("cuda:1", "auto", turing, "fp16"),
    ("cuda", "auto", pascal, "fp32"),     # P100, GTX 10xx: no tensor cores
    ("cuda", "fp32", turing, "fp32"),
    ("cuda", "fp16", ampere, "fp16"),
    ("cuda", "fp16", pascal, "fp16"),     # asked for: it runs (slowly), with a note
    ("cuda", "bf16", ampere, "bf16"),
    ("cpu", "auto", never_asked, "fp32"),
    ("mps", "auto", never_asked, "fp32"),
    ("cpu", "fp32", never_asked, "fp32"),
    ("cpu", "bf16", never_asked, "bf16"),   # CPU bf16 autocast exists, on request only
    ("mps", "fp32", never_asked, "fp32"),
])
def test_resolution_per_device_kind(device, requested, capability, expected):
    precision = resolve_precision(requested, device, capability=capability)
    assert precision.name == expected
    assert precision.device_type == torch.device(device).type
    with warnings.catch_warnings():  # a CUDA GradScaler on a machine without CUDA warns
        warnings.simplefilter("ignore", UserWarning)
        assert (precision.grad_scaler() is not None) == (expected == "fp16")
    assert precision.describe().startswith(f"Precision: {expected} (")
    assert ("auto" in precision.reason) == (requested == "auto")


@pytest.mark.parametrize("device, requested, capability, message", [
    ("cuda", "bf16", turing, r"GPU \(compute capability 7\.5\) has no bfloat16 hardware"),
    ("cuda", "bf16", pascal, "Use --precision fp16 or fp32"),
    ("cpu", "fp16", never_asked, "fp16 training needs a CUDA GPU"),
    ("mps", "fp16", never_asked, "fp16 training needs a CUDA GPU"),
    ("mps", "bf16", never_asked, "use --precision fp32"),
    ("cpu", "fp8", never_asked, "Unknown precision 'fp8'"),
])
def test_impossible_combinations_are_refused_with_advice(device, requested, capability, message):
    with pytest.raises(PrecisionError, match=message):
        resolve_precision(requested, device, capability=capability)


@pytest.mark.parametrize("capability, name, scaler, reason", [
    ((6, 1), "fp32", False, "compute capability 6.1 has no tensor cores"),  # GTX 1080, P40
    ((7, 5), "fp16", True, "compute capability 7.5 has float16 tensor cores"),  # T4
    ((8, 0), "bf16", False, "compute capability 8.0 has bfloat16 hardware"),  # A100
])
def test_auto_follows_the_compute_capability_torch_reports(monkeypatch, capability, name, scaler,
                                                           reason):
    """`auto` with torch's own capability query (mocked: this machine has no GPU)."""
    asked = []

    def get_device_capability(device=None):
        asked.append(torch.device(device))
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    precision = resolve_precision("auto", "cuda:1")
    assert asked == [torch.device("cuda:1")]  # the GPU that trains, not GPU 0
    assert (precision.name, precision.device_type) == (name, "cuda")
    with warnings.catch_warnings():  # a CUDA GradScaler on a machine without CUDA warns
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(precision.grad_scaler(), torch.amp.GradScaler) is scaler
    assert precision.reason.startswith(f"auto: {reason}")
    assert reason in precision.describe()


def test_fp16_asked_for_on_a_gpu_without_tensor_cores_runs_with_a_note(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    precision = resolve_precision("fp16", "cuda")
    assert precision.name == "fp16"
    assert "note: compute capability 6.1 has no tensor cores" in precision.describe()


def test_tf32_is_set_through_the_current_api_without_warnings():
    """torch 2.9's fp32_precision switches, not the deprecated allow_tf32 flags."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning (a deprecation) fails the test
            set_tf32(False)
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
            assert torch.backends.cuda.matmul.allow_tf32 is False
            enable_tf32()
            assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
            with tf32(False):
                assert matmul.fp32_precision == "ieee"
            assert matmul.fp32_precision == "tf32"  # restored after the block
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_tf32_falls_back_to_the_old_flags_on_an_older_torch(monkeypatch):
    """torch before 2.9 (requirements allow 2.5) has only allow_tf32."""
    from types import SimpleNamespace

    import instructkit.precision as precision_module

    matmul, cudnn = SimpleNamespace(allow_tf32=False), SimpleNamespace(allow_tf32=False)
    old_backends = SimpleNamespace(cuda=SimpleNamespace(matmul=matmul), cudnn=cudnn)
    monkeypatch.setattr(precision_module, "torch", SimpleNamespace(backends=old_backends))
    with tf32(True):
        assert matmul.allow_tf32 is True and cudnn.allow_tf32 is True
    assert matmul.allow_tf32 is False and cudnn.allow_tf32 is False


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
