"""The suite runs on every reader's machine: it collects where the POSIX-only modules are
missing (as on Windows), and the signal helpers of tests/portable.py work on this platform.

Windows itself cannot run here, so its absence of `pty`, `termios`, `fcntl` and `resource` is
emulated (tests/without_posix/sitecustomize.py); the signal tests run for real on whatever
platform runs them (Ctrl-Break on Windows, SIGINT elsewhere).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from portable import (
    killed_returncode,
    needs_sigterm,
    new_group_kwargs,
    send_interrupt,
    send_sigterm,
)

BLOCKER = Path(__file__).resolve().parent / "without_posix"
POSIX_ONLY = ("pty", "termios", "fcntl", "resource")
# What the chapter, the package and the tests import from outside the standard library.
THIRD_PARTY = ("torch", "numpy", "pytest", "tiktoken", "matplotlib", "tqdm", "psutil")


def without_posix_env():
    """The environment of a Python in which the POSIX-only modules cannot be imported."""
    path = os.pathsep.join(p for p in (str(BLOCKER), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("PYTEST_ADDOPTS", None)  # the collection is the README's command, nothing more
    return env


def collect(env):
    """`python -m pytest --collect-only -q tests` in the repository: (exit code, test ids, output)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ids = [line for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return proc.returncode, ids, proc.stdout + proc.stderr


IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
from pathlib import Path

import instructkit

def error(name):
    try:
        importlib.import_module(name)
    except Exception as e:  # reported, whatever it is
        return f"{type(e).__name__}: {e}"
    return None

own = [f"instructkit.{m.name}" for m in pkgutil.iter_modules(instructkit.__path__)]
own += sorted(p.stem for p in Path(".").glob("*.py"))
print(json.dumps({"blocked": {name: error(name) for name in POSIX_ONLY},
                  "third_party": {name: error(name) for name in THIRD_PARTY},
                  "own": {name: error(name) for name in own}}))
"""


def test_without_posix_modules_the_libraries_and_every_module_of_the_project_import():
    script = f"POSIX_ONLY, THIRD_PARTY = {POSIX_ONLY!r}, {THIRD_PARTY!r}\n{IMPORT_EVERYTHING}"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=without_posix_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["blocked"] == {name: f"ModuleNotFoundError: No module named {name!r} (blocked by "
                                     f"tests/without_posix)" for name in POSIX_ONLY}
    assert seen["third_party"] == dict.fromkeys(THIRD_PARTY)
    own = seen["own"]
    assert {"instructkit.run_guard", "instructkit.training", "previous_chapters",
            "gpt_instruction_finetuning", "ollama_evaluate", "fast_gpt"} <= set(own)
    assert own == dict.fromkeys(own)  # every one imports


def this_sessions_whole_suite(request):
    """The test ids this session collected, in order, when it is the README's command (the
    whole of tests/, nothing deselected or reordered): the normal collection, without
    collecting again; else None."""
    config = request.config
    args = [Path(config.invocation_params.dir, arg).resolve() for arg in config.args]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if (args != [ROOT / "tests"] or reporter is None or reporter.stats.get("deselected")
            or config.option.keyword or config.option.markexpr or os.environ.get("PYTEST_ADDOPTS")
            or config.getoption("failedfirst", False) or config.getoption("newfirst", False)):
        return None
    return [item.nodeid for item in request.session.items]


@pytest.mark.slow
def test_the_whole_suite_collects_without_posix_modules(request):
    """The README's test command on a machine without `pty`, `termios`, `fcntl` and `resource`:
    no collection error, and the very tests a normal collection finds (the POSIX-only ones are
    collected there too, and skip with a reason when run). Under the README's command the
    normal collection is this session's own (the suite is collected once less)."""
    normal = this_sessions_whole_suite(request)
    if normal is None:
        code, normal, output = collect({k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
        assert code == 0, output[-4000:]
    code, without_posix, output = collect(without_posix_env())
    assert code == 0, output[-4000:]
    assert "error" not in output.strip().splitlines()[-1]
    assert output.strip().splitlines()[-1].startswith(f"{len(normal)} tests collected")
    assert without_posix == normal
    assert len(normal) > 600
    assert "tests/test_portable.py::test_the_whole_suite_collects_without_posix_modules" in normal


########################################################################################
# The signal helpers, on a real child process of this platform
########################################################################################

# A command as the project's commands run: inside run_command, which turns Ctrl-C into exit
# 130 and SIGTERM into 143. It says when it is ready, then works (short sleeps: Windows wakes a
# long sleep early for SIGINT only, so a signal's handler would wait for its end) until stopped.
WAITING_COMMAND = """
import time
from instructkit.errors import run_command

def main():
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("never stopped", flush=True)

raise SystemExit(run_command(main))
"""


def start_waiting_command():
    proc = subprocess.Popen([sys.executable, "-c", WAITING_COMMAND], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            **new_group_kwargs())
    assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=60)
    return proc


def test_send_interrupt_stops_a_command_as_ctrl_c_does():
    """SIGINT here; on Windows Ctrl-Break, which the commands take as Ctrl-C: exit 130."""
    proc = start_waiting_command()
    began = time.monotonic()
    send_interrupt(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err
    assert time.monotonic() - began < 30


@needs_sigterm
def test_send_sigterm_stops_a_command_with_143():
    proc = start_waiting_command()
    send_sigterm(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert out == "" and "Traceback" not in err


def test_killed_returncode_is_what_kill_gives():
    proc = start_waiting_command()
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == killed_returncode()


def test_sigterm_and_kill_have_their_windows_meaning(monkeypatch):
    """The branches that only Windows takes: SIGTERM cannot be sent there (the test skips, with
    the reason), and kill() ends a process with exit code 1."""
    import portable

    monkeypatch.setattr(portable, "WINDOWS", True)
    with pytest.raises(pytest.skip.Exception, match="Windows cannot deliver SIGTERM"):
        portable.send_sigterm(None)  # never reaches a process
    assert portable.killed_returncode() == 1
