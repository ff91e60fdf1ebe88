"""instructkit/devices.py: one device policy for every command, and sampling on MPS.

This machine has no Apple GPU, so MPS is emulated: `torch.backends.mps.is_available` and
`torch.__version__` are replaced for the length of a test. Every check runs before any tensor
reaches the device, so the commands stop at the same line they would stop at on a Mac.
"""

import pytest
import torch

import fast_gpt
from instructkit import devices
from instructkit.devices import (
    MPS_MIN_TORCH,
    DeviceError,
    best_device,
    choose_device,
    sampling_device,
    torch_version,
)

UPGRADE = 'pip install --upgrade "torch>=2.9"'


def pretend_mac(monkeypatch, version):
    """An Apple silicon Mac (MPS available, no CUDA) with torch `version` installed."""
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def assert_old_torch_error(message, version):
    """The one-line refusal: which torch, why, how to upgrade, the alternative."""
    assert "\n" not in message.strip()
    assert f"torch {version}" in message
    assert "MPS needs PyTorch 2.9 or newer" in message
    assert "wrong losses" in message
    assert UPGRADE in message and "--device cpu" in message


@pytest.mark.parametrize(("version", "expected"), [
    ("2.8.0", (2, 8)), ("2.9.0+cpu", (2, 9)), ("2.10.0a0+git1234", (2, 10)), ("2.13.1", (2, 13)),
    ("3.0", (3, 0)),
])
def test_torch_version_reads_major_and_minor(version, expected):
    assert torch_version(version) == expected


@pytest.mark.parametrize("version", ["2.4.1", "2.8.0+cpu", "1.13.1"])
def test_device_mps_on_an_old_torch_is_a_clear_error(monkeypatch, version):
    pretend_mac(monkeypatch, version)
    with pytest.raises(DeviceError) as raised:
        choose_device("mps")
    assert raised.value.exit_code == 2
    assert_old_torch_error(str(raised.value), version)
    with pytest.raises(DeviceError, match="MPS needs PyTorch 2.9"):
        choose_device("mps:0", test_mode=True)  # a named device is checked in test mode too
    # the automatic choice on the same Mac falls back to the CPU, as the chapter's does
    assert choose_device(None) == torch.device("cpu")


@pytest.mark.parametrize("version", ["2.9.0", "2.10.0a0+git", "2.13.0"])
def test_device_mps_on_a_new_enough_torch_passes(monkeypatch, version):
    pretend_mac(monkeypatch, version)
    assert choose_device("mps") == torch.device("mps")
    assert choose_device(None) == torch.device("mps")  # chat, web chat, DPO: best_device()
    assert choose_device(None, test_mode=True) == torch.device("cpu")


def test_mps_missing_is_still_its_own_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS was requested but is not available"):
        choose_device("mps")


@pytest.mark.parametrize("version", ["2.8.2", "2.9.0", "2.12.0"])
@pytest.mark.parametrize("cuda", [False, True])
def test_best_device_is_the_chapters_get_device(monkeypatch, version, cuda):
    """The chapter's get_device() keeps its own arithmetic (the notebook shows it); both
    choose alike on each side of MPS_MIN_TORCH."""
    from gpt_instruction_finetuning import get_device

    pretend_mac(monkeypatch, version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert best_device() == get_device()
    expected = "cuda" if cuda else ("mps" if torch_version(version) >= MPS_MIN_TORCH else "cpu")
    assert best_device().type == expected


def test_finetuning_command_refuses_mps_on_an_old_torch(monkeypatch, tmp_path, shared_data, capsys):
    from instructkit.finetune import cli

    pretend_mac(monkeypatch, "2.8.0")
    code = cli(["--test_mode", "--data", str(shared_data / "instruction-data.json"),
                "--output-dir", str(tmp_path), "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert_old_torch_error(err, "2.8.0")
    assert not list(tmp_path.glob("*.pth"))  # refused before any work


def test_dpo_command_refuses_mps_on_an_old_torch(monkeypatch, tmp_path, shared_data, capsys):
    from instructkit.dpo_train import cli

    pretend_mac(monkeypatch, "2.8.0")
    code = cli(["--test-mode", "--device", "mps", "--output-dir", str(tmp_path),
                "--data", str(shared_data / "instruction-data-with-preference.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert_old_torch_error(err, "2.8.0")


def test_chats_refuse_mps_on_an_old_torch(monkeypatch, tmp_path, capsys):
    """Both chats choose the device before they load the model file (after checking that it
    is one: a file that is there and not empty), so any such file will do."""
    from instructkit import chat, web_chat

    pretend_mac(monkeypatch, "2.7.1")
    (tmp_path / "any.pth").write_bytes(b"not loaded")
    assert chat.main([str(tmp_path / "any.pth"), "Hi", "--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert_old_torch_error(err, "2.7.1")

    pytest.importorskip("gradio")
    assert web_chat.main([str(tmp_path / "any.pth"), "--device", "mps"]) == 2
    assert_old_torch_error(capsys.readouterr().err, "2.7.1")
    with pytest.raises(DeviceError, match="MPS needs PyTorch 2.9"):  # the notebook's entry point
        web_chat.launch(str(tmp_path / "any.pth"), device="mps")


def test_sampling_draws_on_the_cpu_for_mps_only():
    assert sampling_device(torch.device("mps")) == torch.device("cpu")
    assert sampling_device("mps:0") == torch.device("cpu")
    assert sampling_device("cuda:1") == torch.device("cuda:1")
    assert sampling_device("cpu") == torch.device("cpu")


def test_sample_next_token_draws_where_sampling_device_says(monkeypatch):
    """sample_next_token asks sampling_device where to draw; when that is another device
    (the CPU, for a model on MPS) the probabilities go there for torch.multinomial and the
    token comes back to the logits' device. With no second device here, the meta device
    stands in for the other one: the draw is recorded, and answered on the CPU."""
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0], [3.0, 0.0, 0.0, 2.0]])
    asked, drawn_on = [], []

    def other_device(device):
        asked.append(torch.device(device))
        return torch.device("meta")

    def recording_multinomial(probs, num_samples):
        drawn_on.append(probs.device)
        return torch.zeros(probs.shape[0], num_samples, dtype=torch.long)

    monkeypatch.setattr(devices, "sampling_device", other_device)
    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    token = fast_gpt.sample_next_token(logits, temperature=1.0, top_k=2)
    assert asked == [torch.device("cpu")] and drawn_on == [torch.device("meta")]
    assert token.device == logits.device and token.shape == (2, 1)


def test_sampling_on_the_cpu_is_the_plain_draw():
    """No copy where the device draws itself: the same tokens as torch.multinomial for the
    same seed (the book's generate draws this way)."""
    logits = torch.randn(3, 50)
    torch.manual_seed(5)
    tokens = torch.cat([fast_gpt.sample_next_token(logits, temperature=0.8) for _ in range(20)], 1)
    probs = torch.softmax((logits / 0.8) - (logits / 0.8).max(dim=-1, keepdim=True).values, dim=-1)
    torch.manual_seed(5)
    expected = torch.cat([torch.multinomial(probs, num_samples=1) for _ in range(20)], 1)
    assert torch.equal(tokens, expected)
