"""gpt_instruction_finetuning.py called as the book calls it, and the one error policy.

The book's script runs as `python gpt_instruction_finetuning.py --test_mode` and writes its
files beside itself; its helpers are called with the book's arguments. The error policy
(instructkit/errors.py): a problem a user can fix is one line with its exit code; anything
else, such as a RuntimeError from a model a student has modified, keeps its traceback.
"""

import json
import os
import subprocess
import sys

import matplotlib
import pytest
import torch
from conftest import SHARED_DATA
from loopback_server import serving
from notebook_runner import repo_files

import gpt_instruction_finetuning as gif

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_of_the_repository(dest):
    """The repository's files (tracked and new ones), with the chapter's dataset beside them, as
    after a reader's first download."""
    import shutil

    from conftest import ROOT

    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    shutil.copyfile(SHARED_DATA / "instruction-data.json", dest / "instruction-data.json")
    return dest


def run_script(workdir, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "gpt_instruction_finetuning.py", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_the_book_s_test_mode_from_a_copy_of_the_repository(tmp_path):
    """`python gpt_instruction_finetuning.py --test_mode`, no other flag: the book's steps and
    lines, and the model, plot, answers beside the script (the test mode's names say -test)."""
    workdir = copy_of_the_repository(tmp_path / "repo")
    proc = run_script(workdir, "--test_mode")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == ""  # the book prints an empty line first, then the versions
    assert out[1].startswith("matplotlib version: ") and out[5].startswith("tensorflow version: ")
    assert out[6] == 50 * "-"
    assert out[7:10] == ["Training set length: 10", "Validation set length: 10", "Test set length: 10"]
    assert "Loaded model: Small test model" in out
    for name in ("gpt2-medium355M-sft-test.pth", "loss-plot-test.pdf",
                 "instruction-data-with-response-test.json"):
        assert (workdir / name).is_file(), name
    answers = json.loads((workdir / "instruction-data-with-response-test.json").read_text())
    assert len(answers) == 10 and all("model_response" in entry for entry in answers)


def test_plot_losses_the_book_s_way_writes_its_pdf(tmp_path, monkeypatch, capsys):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    epochs = torch.linspace(0, 2, 3)
    gif.plot_losses(epochs, [10, 20, 30], [3.0, 2.0, 1.0], [3.1, 2.5, 2.0])
    assert capsys.readouterr().out == "Plot saved as loss-plot-standalone.pdf\n"
    assert (tmp_path / "loss-plot-standalone.pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss-plot-standalone.pdf"]  # no temp file


def test_download_and_load_file_the_book_s_way(tmp_path, monkeypatch, instruction_data):
    """Downloaded when missing, read from disk afterwards (no request), the book's list back."""
    monkeypatch.chdir(tmp_path)
    body = json.dumps(instruction_data).encode()
    with serving({"/instruction-data.json": body}) as httpd:
        url = f"{httpd.url}/instruction-data.json"
        data = gif.download_and_load_file("instruction-data.json", url)
        assert data == instruction_data and len(data) == 1100
        assert gif.download_and_load_file("instruction-data.json", url) == instruction_data
    assert httpd.paths() == ["/instruction-data.json"]  # once
    assert (tmp_path / "instruction-data.json").read_bytes() == body


def test_main_is_the_book_s_main_with_a_config():
    """main(test_mode) keeps the book's signature; the flags come in as `config`."""
    import inspect

    parameters = inspect.signature(gif.main).parameters
    assert list(parameters)[:1] == ["test_mode"] and parameters["test_mode"].default is False
    assert parameters["config"].default is None


########################################################################################
# One error policy
########################################################################################

# A student's LoRA layer (exercise 7.4) whose forward raises, as a wrong shape would
BROKEN_FORWARD = '''
import exercise_variants


def broken_forward(self, x):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (a student's bug)")


exercise_variants.LoRALayer.forward = broken_forward
'''


@pytest.mark.slow
def test_a_runtime_error_in_a_modified_model_keeps_its_traceback(tmp_path):
    """A reader's modified model whose forward raises (here exercise 7.4's LoRA layer): the
    traceback shows where, not one line."""
    workdir = copy_of_the_repository(tmp_path / "repo")
    # The student's edit: GPTModel.forward broken, loaded before the script runs
    (workdir / "sitecustomize.py").write_text(BROKEN_FORWARD, encoding="utf-8")
    env_path = {"PYTHONPATH": str(workdir)}
    proc = subprocess.run([sys.executable, "gpt_instruction_finetuning.py", "--test_mode",
                           "--lora-rank", "2", "--tokenizer-dir", str(SHARED_DATA / "gpt2-tokenizer")],
                          cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env_path}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "in broken_forward" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (a student's bug)")
    assert "error: mat1" not in proc.stderr


def test_a_bad_data_file_is_still_one_line_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": ""}]), encoding="utf-8")
    from conftest import ROOT

    for command in (["gpt_instruction_finetuning.py"], ["-m", "instructkit.finetune"]):
        proc = subprocess.run([sys.executable, *command, "--test_mode", "--data", str(bad),
                               "--output-dir", str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {bad}: entry 0 has no 'output' key"]


def test_run_command_maps_the_hierarchy_to_exit_codes(capsys):
    from instructkit import errors
    from instructkit.checkpoints import CheckpointError as FromCheckpoints
    from instructkit.downloads import CheckpointError as FromDownloads
    from instructkit.instruction_data import DatasetError

    assert FromCheckpoints is FromDownloads is errors.CheckpointError  # one class

    def raising(error):
        def main():
            raise error
        return main

    assert errors.run_command(raising(DatasetError("bad data"))) == 2
    assert errors.run_command(raising(errors.DownloadError("no network"))) == 1
    assert errors.run_command(raising(errors.CheckpointError("another run's"))) == 2
    assert errors.run_command(raising(KeyboardInterrupt())) == 130
    assert errors.run_command(raising(PermissionError(13, "Permission denied", "out.pth"))) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: bad data", "error: no network", "error: another run's",
        "error: Permission denied (out.pth); run again with --debug to see the traceback"]
    with pytest.raises(IndexError):  # unexpected: not caught
        errors.run_command(raising(IndexError("list index out of range")))
    with pytest.raises(RuntimeError):
        errors.run_command(raising(RuntimeError("a bug")))
