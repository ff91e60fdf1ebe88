"""Start a real command, wait for lines it prints, then act on it (a signal, a full disk).

Shared by the tests that interrupt the finetuning and DPO commands. stderr goes to a file, not
a pipe: a progress bar on a pipe nobody reads would fill it and block the command. The command
starts in a process group of its own on Windows, so that `portable.send_interrupt` reaches it.
"""

import subprocess
import time

import pytest
from portable import new_group_kwargs, send_interrupt


def wait_for_line(proc, prefix):
    """Read stdout until a line starts with `prefix`; fail with what came if it never does."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return
    pytest.fail(f"no line starting with {prefix!r}; stdout was:\n{''.join(seen)}")


def run_and_act(command, stderr_path, markers, act, stderr_marker=None, timeout=600,
                **popen_kwargs):
    """Start `command`; once stdout has shown a line starting with each of `markers` in turn
    (and stderr holds `stderr_marker`), call `act(proc)`; wait for the end.
    Returns (exit code, stderr)."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)  # no terminal, unless a test gives one
    popen_kwargs = {**new_group_kwargs(), **popen_kwargs}
    with open(stderr_path, "w+") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                **popen_kwargs)
        try:
            for marker in markers:
                wait_for_line(proc, marker)
            while stderr_marker and stderr_marker not in stderr_path.read_text():
                assert proc.poll() is None, f"the command ended before {stderr_marker!r}"
                time.sleep(0.05)
            act(proc)
            proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        stderr.seek(0)
        return proc.returncode, stderr.read()


def twice_during_a_checkpoint_write(checkpoints, stderr_path):
    """An `act` for run_and_act: once a checkpoint is in the folder `checkpoints` and the next
    one is being written (its temporary file is there), Ctrl-C; once the command has taken it
    (it says it stops after this step), Ctrl-C again, while that checkpoint is still written."""

    def act(proc):
        while not (list(checkpoints.glob("*.pth")) and list(checkpoints.glob(".*.tmp"))):
            assert proc.poll() is None, "the command ended before its second checkpoint"
            time.sleep(0.001)
        send_interrupt(proc)
        while "stopping after this step" not in stderr_path.read_text():
            assert proc.poll() is None, "the command ended without taking the first Ctrl-C"
            time.sleep(0.001)
        send_interrupt(proc)

    return act


def checkpoint_cut_by_a_second_ctrl_c(code, err, checkpoints):
    """What every command shows after `twice_during_a_checkpoint_write`: exit 130, no traceback
    and no "start over", no temporary file left, and the line saying which checkpoint's write
    was cut. Returns (the step of the latest whole checkpoint, its path)."""
    assert code == 130, err
    assert "Traceback" not in err and "start over" not in err
    assert list(checkpoints.glob(".*.tmp")) == []  # the cut write left nothing behind
    newest = max(checkpoints.glob("*.pth"))  # the names order by step
    step = int(newest.stem.rsplit("step", 1)[1])
    assert (f"Training interrupted during the write of the checkpoint of step {step + 1}; that "
            f"was not saved.") in err.splitlines()
    return step, newest
