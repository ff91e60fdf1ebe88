"""preflight and run_guard: the checks before the long work, and what an interruption says."""

import errno
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from portable import WINDOWS, is_root
from small_disk import small_tmpfs, unwritable_folder

from instructkit import preflight as pf
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, gpt2_config
from instructkit.run_guard import RunProgress, exit_code, os_error_line, signals_interrupt
from instructkit.safe_files import DiskFullError
from previous_chapters import GPTModel

DEFAULTS = {"epochs": 2, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.1, "max_length": 1024,
            "seed": 123, "eval_freq": 5, "eval_iter": 5, "lora_rank": None, "lora_alpha": None,
            "max_new_tokens": 256, "model": "gpt2-small"}


########################################################################################
# Numeric flags
########################################################################################

def test_defaults_and_edges_pass():
    pf.check_ranges(SimpleNamespace(**DEFAULTS))
    edges = {"epochs": 0, "batch_size": 1, "lr": 1e-12, "weight_decay": 0.0, "max_length": 1,
             "seed": 0, "lora_rank": 1, "lora_alpha": 0.5, "max_new_tokens": 1}
    pf.check_ranges(SimpleNamespace(**{**DEFAULTS, **edges}))
    pf.check_ranges(SimpleNamespace())  # settings a config lacks are not checked


@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 0, "--batch-size must be at least 1 (got 0)"),
    ("max_length", 0, "--max-length must be at least 1 (got 0)"),
    ("lr", -1.0, "--lr must be greater than 0 (got -1.0)"),
    ("lr", 0.0, "--lr must be greater than 0 (got 0.0)"),
    ("lr", float("nan"), "--lr must be a finite number (got nan)"),
    ("weight_decay", float("inf"), "--weight-decay must be a finite number (got inf)"),
    ("weight_decay", -0.1, "--weight-decay must be at least 0 (got -0.1)"),
    ("epochs", -1, "--epochs must be at least 0 (got -1)"),
    ("seed", -1, "--seed must be between 0 and 18446744073709551615 (got -1)"),
    ("seed", 2**64, "--seed must be between 0 and 18446744073709551615 (got 18446744073709551616)"),
    ("eval_freq", 0, "--eval-freq must be at least 1 (got 0)"),
    ("eval_iter", -3, "--eval-iter must be at least 1 (got -3)"),
    ("lora_rank", 0, "--lora-rank must be at least 1 (got 0)"),
    ("lora_alpha", -2.0, "--lora-alpha must be greater than 0 (got -2.0)"),
    ("max_new_tokens", 0, "--max-new-tokens must be at least 1 (got 0)"),
])
def test_out_of_range_flags_name_flag_limit_and_value(field, value, message):
    with pytest.raises(pf.PreflightError) as err:
        pf.check_ranges(SimpleNamespace(**{**DEFAULTS, field: value}))
    assert str(err.value) == message


########################################################################################
# Folders, files, data
########################################################################################

def test_output_dir_is_created_and_write_tested(tmp_path):
    folder = tmp_path / "a" / "b"
    assert pf.check_output_dir(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone


def _check_output_dir_many_times(folder, times):
    for _ in range(times):
        pf.check_output_dir(folder)


def test_output_dir_checked_by_several_processes_at_once(tmp_path):
    """Under torchrun every process runs the preflight on the same folder at the same moment;
    one's probe file must not be another's (a shared name made one process's unlink fail)."""
    import multiprocessing

    folder = tmp_path / "out"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_check_output_dir_many_times, args=(folder, 300))
                 for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert list(folder.iterdir()) == []


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").touch()
    with pytest.raises(pf.PreflightError) as err:
        pf.check_output_dir(tmp_path / "afile")
    assert str(err.value) == (f"--output-dir {tmp_path / 'afile'} is a file, not a folder: "
                              f"choose another --output-dir")
    with pytest.raises(pf.PreflightError) as err:
        pf.check_output_dir(tmp_path / "afile" / "sub")
    # The reason is the OS's own words for a folder inside a file: "Not a directory" on POSIX;
    # Windows words it otherwise, so it is asked here.
    with pytest.raises(OSError) as os_said:
        (tmp_path / "afile" / "sub").mkdir(parents=True, exist_ok=True)  # as the check does
    reason = os_said.value.strerror
    assert os.name != "posix" or reason == os.strerror(errno.ENOTDIR) == "Not a directory"
    assert str(err.value) == (f"--output-dir {tmp_path / 'afile' / 'sub'} cannot be created "
                              f"({reason}): choose another --output-dir")


def test_output_dir_that_cannot_be_written(tmp_path):
    with unwritable_folder(tmp_path / "ro") as folder:
        with pytest.raises(pf.PreflightError) as err:
            pf.check_output_dir(folder)
        reason = "Read-only file system" if is_root() else "Permission denied"
        assert str(err.value) == (f"--output-dir {folder} is not writable ({reason}): choose "
                                  f"another --output-dir or fix its permissions")
        with pytest.raises(pf.PreflightError, match=rf"ro/new cannot be created \({reason}\)"):
            pf.check_output_dir(folder / "new")


def test_a_folder_in_place_of_an_output_file(tmp_path):
    (tmp_path / "model.pth").mkdir()
    pf.check_output_files([tmp_path / "answers.json"])
    with pytest.raises(pf.PreflightError, match=r"model.pth is a folder, but the run writes a file"):
        pf.check_output_files([tmp_path / "answers.json", tmp_path / "model.pth"])


def test_data_file_read_and_validated(tmp_path, instruction_data):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(instruction_data[:20]), encoding="utf-8")
    assert pf.check_data_file(good) == instruction_data[:20]

    missing = tmp_path / "nope.json"
    with pytest.raises(pf.PreflightError) as err:
        pf.check_data_file(missing)
    assert str(err.value) == f"{missing} does not exist (pass --data-url to download it)"
    assert pf.check_data_file(missing, data_url="http://127.0.0.1:9/x") is None  # fetched later

    few = tmp_path / "few.json"
    few.write_text(json.dumps(instruction_data[:5]), encoding="utf-8")
    with pytest.raises(pf.PreflightError, match="The test split is empty: 5 entries are too few"):
        pf.check_data_file(few)
    # The run's own split decides: 5 entries split 60/20/20 leave no part empty.
    from instructkit.finetune_config import FinetuneConfig
    from instructkit.finetune_files import split_entries

    wide = FinetuneConfig(test_mode=True, val_fraction=0.2, test_fraction=0.2)
    assert pf.check_data_file(few, split=lambda entries: split_entries(entries, wide)) \
        == instruction_data[:5]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "input": "", "output": 1}]', encoding="utf-8")
    with pytest.raises(pf.PreflightError, match="entry 0: 'output' must be a string, got int"):
        pf.check_data_file(bad)


def test_untrained_runs_get_their_own_names():
    assert pf.untrained_suffix(0) == "-untrained"
    assert pf.untrained_suffix(1) == pf.untrained_suffix(2) == ""


########################################################################################
# Disk space
########################################################################################

def test_model_file_bytes_are_exact():
    # gpt2-medium: 406,286,336 float32 parameters and 24 attention masks of 1024 x 1024
    assert pf.model_file_bytes(gpt2_config("gpt2-medium")) == 4 * (406_286_336 + 24 * 1024 * 1024)
    model = GPTModel(TEST_MODE_CONFIG)
    real = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert pf.model_file_bytes(TEST_MODE_CONFIG) == real == 26_721_792
    # LoRA rank 8 adds A (in x 8) and B (8 x out) for every Linear: 6 per block and the head
    per_block = 8 * (3 * (64 + 64) + (64 + 64) + (64 + 256) + (256 + 64))
    assert pf.model_file_bytes(TEST_MODE_CONFIG, lora_rank=8) == real + 4 * (
        2 * per_block + 8 * (64 + 50257))


def test_saved_model_fits_the_estimate_and_its_margin(tmp_path):
    from instructkit.safe_files import save_state_dict

    torch.manual_seed(0)
    path = tmp_path / "m.pth"
    save_state_dict(GPTModel(TEST_MODE_CONFIG).state_dict(), path)
    estimate = pf.model_file_bytes(TEST_MODE_CONFIG)
    assert estimate < path.stat().st_size <= estimate + estimate // 100 + pf.MB


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_checkpoint_estimate_covers_a_real_checkpoint(tmp_path, lora_rank):
    """checkpoint_bytes against a checkpoint saved after a real AdamW step (with LoRA: the
    adapters alone are trained, so only they have moments)."""
    from exercise_variants import replace_linear_with_lora
    from fast_gpt import make_optimizer
    from instructkit.checkpoints import save_checkpoint

    torch.manual_seed(123)
    model = GPTModel(TEST_MODE_CONFIG)
    if lora_rank:
        model.requires_grad_(False)
        replace_linear_with_lora(model, rank=lora_rank, alpha=lora_rank)
    optimizer = make_optimizer(model, 5e-5, 0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    metrics = [{"step": i, "train_loss": 1.0, "val_loss": 1.0} for i in range(500)]
    path = save_checkpoint(tmp_path / "c.pth", model, optimizer, {"step": 1}, metrics, {})
    estimate = pf.checkpoint_bytes(TEST_MODE_CONFIG, lora_rank)
    assert estimate - pf.MB < path.stat().st_size <= estimate


def test_gpt2_download_estimate_covers_every_source():
    from instructkit.gpt2_weights import OPENAI_FILE_SIZES

    estimate = pf.gpt2_download_bytes(gpt2_config("gpt2-small"))
    # 124,439,808 weights (OpenAI's model.ckpt.data) and 12 float32 masks of 1024 x 1024 (the
    # hub's model.safetensors keeps them), plus 2 MB of tokenizer files
    assert estimate == 4 * 124_439_808 + 12 * 4 * 1024 * 1024 + 2 * pf.MB
    assert estimate > sum(OPENAI_FILE_SIZES["124M"].values())


def test_download_needed_unless_one_source_is_complete(tmp_path):
    from instructkit.gpt2_weights import FILENAMES

    assert pf.gpt2_download_needed(tmp_path, "gpt2-small")
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in FILENAMES[:-1]:
        (folder / name).touch()
    assert pf.gpt2_download_needed(tmp_path, "gpt2-small")  # one file short
    (folder / FILENAMES[-1]).touch()
    assert not pf.gpt2_download_needed(tmp_path, "gpt2-small")
    assert not pf.gpt2_download_needed(tmp_path, "gpt2-small", "openai")
    assert pf.gpt2_download_needed(tmp_path, "gpt2-small", "hub-openai")  # --weights-source
    assert pf.gpt2_download_needed(tmp_path, "gpt2-medium")


def test_checkpoint_folder_of_another_size(tmp_path):
    pf.check_checkpoint(tmp_path, "gpt2-medium")  # no folder yet: nothing to compare
    (tmp_path / "355M").mkdir()
    (tmp_path / "355M" / "hparams.json").write_text(json.dumps(
        {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}))
    pf.check_checkpoint(tmp_path / "elsewhere", "gpt2-medium")
    with pytest.raises(pf.PreflightError) as err:
        pf.check_checkpoint(tmp_path, "gpt2-medium")
    assert str(err.value) == (
        f"{tmp_path / '355M' / 'hparams.json'} says n_embd 768, n_layer 12, n_head 12 (gpt2-small), "
        f"but gpt2-medium was chosen: choose gpt2-small, or delete that folder to download "
        f"gpt2-medium")


def test_not_enough_disk_space(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="4m") as disk:
        pf.check_disk_space([(disk, 500_000, "the answers")])
        with pytest.raises(pf.PreflightError) as err:
            pf.check_disk_space([(disk / "out", 26_721_792, "the finetuned model"),
                                 (disk / "gpt2", 3_000_000, "the GPT-2 download")])
    assert str(err.value) == (
        f"not enough free disk space in {disk}: the finetuned model (26.7 MB), the GPT-2 "
        f"download (3.0 MB) need about 31.1 MB, 4.2 MB is free; free some space or choose "
        f"another --output-dir")


def test_folders_on_different_disks_are_counted_apart(tmp_path):
    with small_tmpfs(tmp_path / "disk", size="4m") as disk:
        pf.check_disk_space([(tmp_path / "big", 5 * pf.MB, "the model"), (disk, 1000, "answers")])
        with pytest.raises(pf.PreflightError, match="in /.*disk: answers .* is free"):
            pf.check_disk_space([(tmp_path, 1000, "the model"), (disk, 4 * pf.MB, "answers")])


########################################################################################
# run_guard: signals, progress messages, OSError lines
########################################################################################

# In a child process of its own: a signal to pytest's own process would end pytest where the
# handler is missing (and on Windows always). The child raises a real SIGTERM in itself
# (raise_signal: C's raise(), which Windows has too), inside the block and then outside it.
SIGTERM_CHILD = """
import json, signal, sys
from instructkit.run_guard import Terminated, exit_code, signals_interrupt

before = signal.getsignal(signal.SIGTERM)
seen = {}
try:
    with signals_interrupt():
        signal.raise_signal(signal.SIGTERM)
        seen["went on"] = True
except Terminated as e:
    seen.update(raised=type(e).__name__, keyboard_interrupt=isinstance(e, KeyboardInterrupt),
                exit_code=exit_code(e))
seen["restored"] = signal.getsignal(signal.SIGTERM) is before
print(json.dumps(seen), flush=True)
signal.raise_signal(signal.SIGTERM)  # outside the block: the default, the process ends
print("still running", flush=True)
"""


def test_sigterm_raises_terminated_inside_the_block_only():
    proc = subprocess.run([sys.executable, "-c", SIGTERM_CHILD], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.stdout.splitlines() == [json.dumps(
        {"raised": "Terminated", "keyboard_interrupt": True, "exit_code": 143, "restored": True})], \
        proc.stderr
    # Killed by the signal: -SIGTERM on POSIX; on Windows the C runtime's exit code 3.
    assert proc.returncode == (3 if WINDOWS else -signal.SIGTERM)
    assert exit_code(KeyboardInterrupt()) == 130


def test_ctrl_break_counts_as_ctrl_c(monkeypatch):
    """Windows' Ctrl-Break (SIGBREAK, what portable.send_interrupt sends there) stops a command
    as Ctrl-C does: a plain KeyboardInterrupt (exit 130), and in training the Ctrl-C message.
    Where there is no SIGBREAK, SIGUSR1 stands in for it; the handlers are called as the
    interpreter calls them when the signal arrives."""
    from instructkit import run_guard
    from instructkit.training import TrainingInterrupted, _StopOnCtrlC

    if run_guard.SIGBREAK is None:
        if not hasattr(signal, "SIGUSR1"):
            pytest.skip("neither SIGBREAK nor SIGUSR1 here")
        monkeypatch.setattr(run_guard, "SIGBREAK", signal.SIGUSR1)
    ctrl_break = run_guard.SIGBREAK
    before = signal.getsignal(ctrl_break)
    with pytest.raises(KeyboardInterrupt) as err, signals_interrupt():
        handler = signal.getsignal(ctrl_break)
        assert handler is not before
        handler(ctrl_break, None)
    assert type(err.value) is KeyboardInterrupt and exit_code(err.value) == 130
    assert signal.getsignal(ctrl_break) is before

    stop = _StopOnCtrlC(enabled=True)
    stop._handler(ctrl_break, None)
    assert stop.requested and stop.signum == signal.SIGINT
    assert exit_code(TrainingInterrupted(5, None, stop.signum)) == 130
    if hasattr(signal, "SIGBREAK"):  # the real one is among those training listens to
        assert signal.SIGBREAK in _StopOnCtrlC.SIGNALS


def test_interrupted_messages_say_what_was_saved():
    progress = RunProgress(["the finetuned model", "the loss plot", "the test answers"])
    progress.start("training")
    assert progress.interrupted_message() == (
        "Training interrupted: nothing was saved.\nRun the same command again to start over.")
    progress.record("the finetuned model", "out/m.pth")
    progress.record("the loss plot", "out/plot.pdf")
    progress.start("answering the test set", hint="Load out/m.pth to answer without training.")
    assert progress.interrupted_message() == (
        "Answering the test set interrupted: saved the finetuned model (out/m.pth), the loss "
        "plot (out/plot.pdf); not saved: the test answers.\n"
        "Load out/m.pth to answer without training.")
    progress.record("the test answers", "out/a.json")
    progress.start("writing the run record")
    assert progress.interrupted_message().endswith(
        "the test answers (out/a.json).\nThe saved files are complete; run the same command "
        "again for the rest.")


def test_os_error_lines():
    err = PermissionError(errno.EACCES, "Permission denied", "/x/y.pth")
    assert os_error_line(err) == ("Permission denied (/x/y.pth); run again with --debug to see "
                                  "the traceback")
    err = OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")
    assert os_error_line(err).startswith("Invalid cross-device link (a -> b); run again")
    full = DiskFullError("no space left on the disk while writing /o/m.pth (nothing was written)")
    assert os_error_line(full) == ("no space left on the disk while writing /o/m.pth (nothing "
                                   "was written); run again with --debug to see the traceback")
    assert os_error_line(OSError("plain")) == "plain; run again with --debug to see the traceback"


########################################################################################
# check_run: all of it, in order
########################################################################################

def test_check_run_returns_the_data_and_checks_the_download_folder(tmp_path, instruction_data):
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(instruction_data[:20]), encoding="utf-8")
    config = SimpleNamespace(**DEFAULTS)
    out = tmp_path / "out"
    entries = pf.check_run(config, out, [out / "m.pth"], data_path, None, TEST_MODE_CONFIG,
                           models_dir=tmp_path / "gpt2")
    assert entries == instruction_data[:20]
    assert out.is_dir() and (tmp_path / "gpt2").is_dir()  # the download's folder, write-tested

    config.lr = -1.0  # ranges come first: nothing else is looked at
    with pytest.raises(pf.PreflightError, match=r"^--lr must be greater than 0 \(got -1.0\)$"):
        pf.check_run(config, tmp_path / "afile" / "x", [], tmp_path / "nope.json", None, {})


def test_check_run_on_a_small_disk(tmp_path, instruction_data):
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(instruction_data[:20]), encoding="utf-8")
    config = SimpleNamespace(**DEFAULTS)
    with small_tmpfs(tmp_path / "disk", size="4m") as disk, pytest.raises(pf.PreflightError) as err:
        pf.check_run(config, disk, [], data_path, None, TEST_MODE_CONFIG)
    assert str(err.value) == (
        f"not enough free disk space in {disk}: the finetuned model (26.7 MB), the answers and "
        f"the plot (1.1 MB) need about 29.2 MB, 4.2 MB is free; free some space or choose "
        f"another --output-dir")


def test_check_run_counts_the_checkpoints_of_save_every(tmp_path, instruction_data):
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(instruction_data[:20]), encoding="utf-8")
    config = SimpleNamespace(**DEFAULTS, save_every=50, keep=2)
    with small_tmpfs(tmp_path / "disk", size="100m") as disk:
        pf.check_run(SimpleNamespace(**DEFAULTS), disk, [], data_path, None, TEST_MODE_CONFIG)
        with pytest.raises(pf.PreflightError) as err:
            pf.check_run(config, disk, [], data_path, None, TEST_MODE_CONFIG)
    checkpoints = pf.format_bytes(3 * pf.checkpoint_bytes(TEST_MODE_CONFIG))
    assert str(err.value).startswith(
        f"not enough free disk space in {disk}: the finetuned model (26.7 MB), the answers and "
        f"the plot (1.1 MB), 3 checkpoints (--save-every, --keep 2) ({checkpoints}) need about ")


def test_every_numeric_setting_of_the_command_line_has_a_limit():
    """A new int or float flag of FinetuneConfig needs its range in NUMERIC_LIMITS."""
    import dataclasses
    import typing

    from instructkit.finetune_config import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    numeric = {f.name for f in dataclasses.fields(FinetuneConfig)
               if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))}
    assert numeric == set(pf.NUMERIC_LIMITS)
    pf.check_ranges(FinetuneConfig())  # the defaults pass


########################################################################################
# --compile
########################################################################################

def test_compile_needs_triton_on_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(pf, "_triton_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(pf.PreflightError) as caught:
        pf.check_compile("cuda")
    message = str(caught.value)
    assert message.startswith("--compile on a CUDA GPU needs Triton, which is not installed")
    assert "pip install triton" in message and "without --compile" in message
    assert "\n" not in message


def test_compile_with_triton_needs_compute_capability_7(monkeypatch):
    monkeypatch.setattr(pf, "_triton_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    with pytest.raises(pf.PreflightError, match=r"compute capability 7\.0 or newer, this one has 6\.1"):
        pf.check_compile("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert pf.check_compile("cuda:0") is None  # a T4 with Triton: nothing to say


def test_compile_on_the_cpu_needs_a_cpp_compiler(monkeypatch):
    monkeypatch.setattr(pf.shutil, "which", lambda name: None)  # no compiler on the PATH
    with pytest.raises(pf.PreflightError) as caught:
        pf.check_compile("cpu")
    message = str(caught.value)
    assert message.startswith("--compile on the CPU needs a C++ compiler (")
    assert "none was found" in message and "without --compile" in message
    assert "\n" not in message


def test_compile_on_windows_looks_for_msvc(monkeypatch):
    monkeypatch.setattr(pf.sys, "platform", "win32")
    monkeypatch.delenv("CXX", raising=False)
    assert pf._cpp_compiler_candidates() == ["cl"]
    monkeypatch.setattr(pf.shutil, "which", lambda name: None)
    with pytest.raises(pf.PreflightError, match=r"C\+\+ compiler \(cl\).*Visual Studio's Build Tools"):
        pf.check_compile("cpu")


def test_compile_where_torch_compile_does_not_run(monkeypatch):
    monkeypatch.setattr(pf, "_dynamo_supported", lambda: False)
    with pytest.raises(pf.PreflightError, match="torch.compile does not run on this Python"):
        pf.check_compile("cpu")


def test_compile_on_mps_is_allowed_with_a_note():
    assert "run without --compile" in pf.check_compile("mps")


def test_compile_on_this_machine_cpu_passes_when_it_has_a_compiler():
    """The real probes: inductor's own compiler list, looked up on this machine's PATH."""
    import shutil

    from torch._inductor import config as inductor_config

    names = [c for c in inductor_config.cpp.cxx if c] if isinstance(
        inductor_config.cpp.cxx, (list, tuple)) else [inductor_config.cpp.cxx]
    if not any(shutil.which(name) for name in names):
        pytest.skip(f"no C++ compiler ({', '.join(names)}) on this machine")
    assert pf._dynamo_supported() is True
    assert pf.check_compile("cpu") is None


def test_finetuning_with_compile_and_no_compiler_stops_before_any_work(tmp_path, monkeypatch,
                                                                       capsys, instruction_data):
    from instructkit.finetune import cli

    data = tmp_path / "data.json"
    data.write_text(json.dumps(instruction_data[:40]), encoding="utf-8")
    monkeypatch.setattr(pf, "_cpp_compiler", lambda: None)
    code = cli(["--test_mode", "--compile", "--device", "cpu", "--data", str(data),
                "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile on the CPU needs a C++ compiler")
    assert "Training" not in captured.out and "Ep 1" not in captured.out
    assert not list((tmp_path / "out").glob("*.pth"))  # nothing was trained or saved
