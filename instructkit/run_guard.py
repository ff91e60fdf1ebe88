"""A run that is stopped or fails says what it saved, what it did not, and how to go on.

Not in the book. Ctrl-C raises KeyboardInterrupt wherever the program is; `signals_interrupt`
makes SIGTERM (what `kill`, `timeout` and job schedulers send) do the same, as `Terminated`,
and on Windows Ctrl-Break (SIGBREAK) too, as Ctrl-C: it is the one console event a program can
send another (a test, a job runner), and a person pressing it means what Ctrl-C means.
`interrupts_deferred` holds these signals back over a few lines that must not be cut halfway
(an answer being printed) and delivers them after.
`RunProgress` keeps the stage and the files saved so far, for the message an interruption
prints. `os_error_line` turns an unexpected OSError (a full disk, a permission) into one line.
"""

import contextlib
import signal
import threading
from pathlib import Path

# Windows' Ctrl-Break; None where the platform has no such signal (everywhere else).
SIGBREAK = getattr(signal, "SIGBREAK", None)


def as_ctrl_c(signum):
    """The signal a handler reports: SIGBREAK counts as Ctrl-C's SIGINT (its message, exit 130)."""
    return signal.SIGINT if SIGBREAK is not None and signum == SIGBREAK else signum


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C, with the signal's own exit code (143)."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(interrupt):
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


@contextlib.contextmanager
def signals_interrupt():
    """Within the block, SIGTERM raises Terminated (a KeyboardInterrupt) where the program is,
    and SIGBREAK (Windows) a plain KeyboardInterrupt, as Ctrl-C does."""

    def handler(signum, frame):
        raise Terminated(signum)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    handlers = {signal.SIGTERM: handler, **({SIGBREAK: ctrl_c} if SIGBREAK is not None else {})}
    previous = {signum: signal.signal(signum, h) for signum, h in handlers.items()}
    try:
        yield
    finally:
        for signum, h in previous.items():
            signal.signal(signum, h)


@contextlib.contextmanager
def interrupts_deferred():
    """Within the block, Ctrl-C, SIGTERM (and SIGBREAK) are held back; at its end the first one
    that came is delivered to the handler that was there before (KeyboardInterrupt, Terminated,
    or the system's default), so that the block's work is never cut halfway: a line of output
    stays whole. Only the main thread receives signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []

    def hold(signum, frame):
        arrived.append(signum)

    signums = (signal.SIGINT, signal.SIGTERM, *([SIGBREAK] if SIGBREAK is not None else []))
    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if arrived:
        signal.raise_signal(arrived[0])  # the handler runs now, as if the signal came now


class RunProgress:
    """The stage a run is in and the files it has saved, for `interrupted_message`.

    `planned`: what the run will save, in words ("the finetuned model", ...).
    """

    def __init__(self, planned):
        self.planned = list(planned)
        self.stage = None
        self.saved = {}  # what -> path
        self.hint = None

    def start(self, stage, hint=None):
        """Enter `stage` ("training", ...); `hint` says how to go on if it is interrupted."""
        self.stage, self.hint = stage, hint

    def record(self, what, path):
        self.saved[what] = Path(path)

    def interrupted_message(self):
        """Two lines: what was saved and what was not, then how to go on."""
        stage = (self.stage or "the run").capitalize()
        if not self.saved:
            return f"{stage} interrupted: nothing was saved.\n" + (
                self.hint or "Run the same command again to start over.")
        saved = ", ".join(f"{what} ({path})" for what, path in self.saved.items())
        missing = [what for what in self.planned if what not in self.saved]
        not_saved = f"; not saved: {', '.join(missing)}" if missing else ""
        return f"{stage} interrupted: saved {saved}{not_saved}.\n" + (
            self.hint or "The saved files are complete; run the same command again for the rest.")


def os_error_line(error):
    """One line for an unexpected OSError: what failed, on which file, where the traceback is."""
    files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
    what = error.strerror or str(error)
    on = f" ({files})" if files and files not in what else ""
    return f"{what}{on}; run again with --debug to see the traceback"
