"""What the tests need from the operating system, said once, so the suite runs on Linux, macOS
and Windows alike.

Signals are POSIX's. On Windows a process can send another only a console event: Ctrl-Break
(`CTRL_BREAK_EVENT`, which reaches Python as SIGBREAK and which our commands treat as Ctrl-C),
and only to a child started in a process group of its own (`new_group_kwargs`). `send_signal`
with SIGTERM or SIGKILL there ends the child at once (TerminateProcess), so no handler runs:
the tests that need a real SIGTERM skip. POSIX-only modules (`pty`, ...) are imported inside
the tests that use them, never at the top of a test file, so that collection never fails.
"""

import os
import signal
import subprocess
import sys

import pytest

WINDOWS = os.name == "nt"

posix_only = pytest.mark.skipif(
    os.name != "posix", reason="POSIX only: file modes, umask, pseudo-terminals or signals")
needs_sigterm = pytest.mark.skipif(
    WINDOWS, reason="Windows cannot deliver SIGTERM to another process: Popen.terminate() ends "
                    "it at once, and no handler runs")

# torchrun on Windows: its TCPStore would ask for libuv, which the Windows wheels lack.
TORCHRUN_ENV = {"USE_LIBUV": "0"} if WINDOWS else {}


def new_group_kwargs():
    """Popen keywords for a child that `send_interrupt` can reach: on Windows a process group
    of its own (a console event goes to a whole group); nothing elsewhere."""
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if WINDOWS else {}


def send_interrupt(proc):
    """Ctrl-C, as a person would press it: SIGINT on POSIX; on Windows Ctrl-Break, to a child
    started with `new_group_kwargs()` (Ctrl-C itself cannot be sent to another group)."""
    proc.send_signal(signal.CTRL_BREAK_EVENT if WINDOWS else signal.SIGINT)


def send_sigterm(proc):
    """SIGTERM, as `kill` or a job scheduler sends it; the test skips where there is none."""
    if WINDOWS:
        pytest.skip("Windows cannot deliver SIGTERM to another process (TerminateProcess runs "
                    "no handler)")
    proc.send_signal(signal.SIGTERM)


def killed_returncode():
    """The exit status of a child ended by `proc.kill()`: -SIGKILL on POSIX; on Windows
    TerminateProcess's exit code, 1."""
    return 1 if WINDOWS else -signal.SIGKILL


def is_root():
    """Whether file modes stop this process (they never stop root); False where there are no
    POSIX users."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def import_or_skip(name):
    """A POSIX-only module (`pty`, `termios`, `fcntl`, `resource`), or a skip saying it is missing."""
    return pytest.importorskip(name, reason=f"the {name} module is POSIX only (not on {sys.platform})")
