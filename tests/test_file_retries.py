"""Windows' held files: replacing and removing a file retries for about a second on
PermissionError, then one line names the file and the likely holder; a held plot costs a
warning, never the answers.

Linux cannot hold a file the way Windows does, so os.replace and Path.unlink are mocked to
raise PermissionError as Windows raises it while an antivirus scan, OneDrive or a PDF viewer has
the file open; everything else (the writes, the renames that then succeed) is real.
"""

import json
import os
from pathlib import Path

import pytest

from instructkit import safe_files
from instructkit.errors import ExpectedError, run_command
from instructkit.safe_files import (
    RETRY_PAUSES,
    FileInUseError,
    optional_output,
    remove_file,
    replace_file,
    write_json,
)


@pytest.fixture
def pauses(monkeypatch):
    """The pauses the retries take, recorded instead of slept."""
    taken = []
    monkeypatch.setattr(safe_files.time, "sleep", taken.append)
    return taken


def held(real, times, where=None):
    """`real`, but raising PermissionError (as Windows does for a held file) the first `times`
    calls (every call when None) whose arguments include `where` (any call when None)."""
    calls = []

    def operation(*args, **kwargs):
        if where is None or any(Path(a) == Path(where) for a in args if isinstance(a, (str, Path))):
            calls.append(args)
            if times is None or len(calls) <= times:
                raise PermissionError(13, "The process cannot access the file because it is "
                                          "being used by another process", str(args[-1]))
        return real(*args, **kwargs)

    operation.calls = calls
    return operation


def test_retry_pauses_add_up_to_about_a_second():
    assert 0.8 <= sum(RETRY_PAUSES) <= 1.5
    assert list(RETRY_PAUSES) == sorted(RETRY_PAUSES)  # short first, then longer


def test_a_replace_held_twice_then_free_writes_the_file(tmp_path, monkeypatch, pauses):
    path = tmp_path / "answers.json"
    path.write_text("old", encoding="utf-8")
    replace = held(os.replace, times=2)
    monkeypatch.setattr(safe_files.os, "replace", replace)
    write_json(path, {"answer": "ответ"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"answer": "ответ"}
    assert len(replace.calls) == 3 and pauses == list(RETRY_PAUSES[:2])
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


@pytest.mark.parametrize("windows", [True, False])
def test_a_replace_held_for_good_names_the_file_in_one_line(tmp_path, monkeypatch, pauses, windows):
    monkeypatch.setattr(safe_files, "_ON_WINDOWS", windows)
    path = tmp_path / "loss-plot.pdf"
    path.write_bytes(b"old plot")
    monkeypatch.setattr(safe_files.os, "replace", held(os.replace, times=None))
    with pytest.raises(FileInUseError) as caught:
        write_json(path, [1, 2])
    message = str(caught.value)
    assert message.startswith(f"cannot replace {path}: ")
    assert "\n" not in message and isinstance(caught.value, ExpectedError)
    if windows:
        assert message.endswith("it is held by another program (an open PDF viewer, OneDrive or "
                                "an antivirus scan?); close it and run again")
    else:
        assert "permission denied for a second" in message
    assert pauses == list(RETRY_PAUSES)  # about a second of retries, then the error
    assert path.read_bytes() == b"old plot"  # the old file is as it was
    assert list(tmp_path.iterdir()) == [path]  # and the temporary file is gone


def test_a_held_file_is_one_line_and_exit_code_1_from_a_command(tmp_path, monkeypatch, pauses,
                                                                capsys):
    monkeypatch.setattr(safe_files, "_ON_WINDOWS", True)
    monkeypatch.setattr(safe_files.os, "replace", held(os.replace, times=None))
    assert run_command(lambda: write_json(tmp_path / "out.json", {})) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot replace {tmp_path / 'out.json'}: it is held by another")


def test_remove_held_twice_then_free_removes_it(tmp_path, monkeypatch, pauses):
    path = tmp_path / "old.pth"
    path.write_bytes(b"x")
    unlink = held(Path.unlink, times=2)
    monkeypatch.setattr(Path, "unlink", unlink)
    remove_file(path)
    assert not path.exists() and len(unlink.calls) == 3 and len(pauses) == 2


def test_remove_held_for_good_names_the_file(tmp_path, monkeypatch, pauses):
    monkeypatch.setattr(safe_files, "_ON_WINDOWS", True)
    path = tmp_path / "old.pth"
    path.write_bytes(b"x")
    monkeypatch.setattr(Path, "unlink", held(Path.unlink, times=None))
    with pytest.raises(FileInUseError, match=rf"^cannot remove {path}: it is held by another"):
        remove_file(path)
    assert path.exists() and pauses == list(RETRY_PAUSES)


def test_other_errors_are_not_retried(tmp_path, pauses):
    with pytest.raises(FileNotFoundError):
        replace_file(tmp_path / "missing", tmp_path / "there")
    with pytest.raises(FileNotFoundError):
        remove_file(tmp_path / "missing")
    remove_file(tmp_path / "missing", missing_ok=True)  # missing_ok as Path.unlink's
    assert pauses == []


def test_checkpoint_pruning_retries_a_held_checkpoint(tmp_path, monkeypatch, pauses):
    from instructkit.checkpoints import prune_checkpoints

    for step in (1, 2, 3):
        (tmp_path / f"run-step{step:07d}.pth").write_bytes(b"x")
    unlink = held(Path.unlink, times=1, where=tmp_path / "run-step0000001.pth")
    monkeypatch.setattr(Path, "unlink", unlink)
    deleted = prune_checkpoints(tmp_path, "run", keep=1)
    assert [p.name for p in deleted] == ["run-step0000001.pth", "run-step0000002.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-step0000003.pth"]
    assert len(unlink.calls) == 2 and len(pauses) == 1


def test_a_download_held_by_a_virus_scan_is_renamed_once_free(tmp_path, monkeypatch, pauses):
    from loopback_server import serving

    from instructkit.downloads import download_file

    body = b"weights" * 1000
    destination = tmp_path / "model.bin"
    replace = held(os.replace, times=2, where=destination)
    monkeypatch.setattr(safe_files.os, "replace", replace)
    with serving({"/model.bin": body}) as server:
        download_file(f"{server.url}/model.bin", destination, expected_size=len(body))
    assert destination.read_bytes() == body and len(replace.calls) == 3
    assert list(tmp_path.iterdir()) == [destination]  # the .part file was renamed


def test_optional_output_warns_in_one_line_and_goes_on(tmp_path, monkeypatch, pauses, capsys):
    monkeypatch.setattr(safe_files, "_ON_WINDOWS", True)
    monkeypatch.setattr(safe_files.os, "replace", held(os.replace, times=None))
    with optional_output("the loss plot", "The answers follow.") as plot:
        write_json(tmp_path / "plot.pdf", {})
    assert plot.written is False
    err = capsys.readouterr().err
    assert err == (f"warning: the loss plot {tmp_path / 'plot.pdf'} was not written: it is held "
                   f"by another program (an open PDF viewer, OneDrive or an antivirus scan?). "
                   f"The answers follow.\n")
    with optional_output("the loss plot", "") as plot:
        pass
    assert plot.written is True
    with pytest.raises(ValueError), optional_output("the loss plot", ""):  # only held files
        raise ValueError("a bug keeps its traceback")


@pytest.mark.slow
def test_a_held_loss_plot_still_saves_the_model_and_the_answers(tmp_path, shared_data,
                                                                monkeypatch, capsys):
    """The chapter's script in test mode while a PDF viewer holds the loss plot for good."""
    import gpt_instruction_finetuning as gif
    from instructkit.finetune_config import FinetuneConfig

    monkeypatch.setattr(safe_files, "_ON_WINDOWS", True)
    plot = tmp_path / "loss-plot-test.pdf"
    plot.write_bytes(b"the last run's plot, open in a viewer")
    replace = held(os.replace, times=None, where=plot)
    monkeypatch.setattr(safe_files.os, "replace", replace)
    result = gif.main(config=FinetuneConfig(
        test_mode=True, data=shared_data / "instruction-data.json", output_dir=tmp_path,
        max_new_tokens=4, device="cpu"))
    captured = capsys.readouterr()
    assert replace.calls and plot.read_bytes() == b"the last run's plot, open in a viewer"
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: the loss")]
    assert warning == [f"warning: the loss plot {plot} was not written: it is held by another "
                       f"program (an open PDF viewer, OneDrive or an antivirus scan?). The run "
                       f"goes on to the answers; the losses are in {result['metrics_path']} "
                       f"(run_record.plot_metrics draws the plot from it)."]
    paths = result["paths"]
    assert "plot" not in paths  # not written, so not claimed
    answers = json.loads(paths["responses"].read_text(encoding="utf-8"))
    assert len(answers) == 10 and all("model_response" in entry for entry in answers)
    assert paths["model"].is_file()
    record = json.loads(paths["run_record"].read_text(encoding="utf-8"))
    assert str(plot) not in json.dumps(record)
