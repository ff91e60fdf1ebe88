"""Files written whole or not at all: a crash or Ctrl-C halfway never leaves half a file.

Not in the book: the book writes its outputs directly. Every output of this project (JSON,
model weights, plots) goes through a temporary file in the same folder, renamed into place.
The temporary file is created with the usual mode (0o666 less the umask, 0o644 as a rule), so
the renamed file has the mode a plain `open(path, "w")` would give it. A full disk leaves the
old file as it was and raises `DiskFullError`, one line that names the file.

On Windows a file that another program holds open cannot be replaced or deleted: an antivirus
scan or OneDrive's sync holds a new file for a moment, a PDF viewer holds the plot for as long
as it shows it. `replace_file` and `remove_file` (used for every final file of the package)
try again for about a second on PermissionError, then raise `FileInUseError`, one line that
names the file and the likely holder.
"""

import contextlib
import errno
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from instructkit.errors import ExpectedError

# A disk that is full, or a quota that is used up.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk filled up while a file was written; the file under its final name is unchanged."""

    def __init__(self, message):
        super().__init__(errno.ENOSPC, message)

    def __str__(self):
        return self.strerror


# Pauses between attempts, growing: about a second in all, long enough for a virus scan or a
# sync client to let go of a new file, short enough not to stall a run that really failed.
RETRY_PAUSES = (0.02, 0.05, 0.1, 0.15, 0.25, 0.45)
_ON_WINDOWS = os.name == "nt"


class FileInUseError(ExpectedError):
    """A file could not be replaced or removed for a second: another program holds it."""

    def __init__(self, action, path):
        self.action, self.path = action, Path(path)
        if _ON_WINDOWS:
            self.holder = ("it is held by another program (an open PDF viewer, OneDrive or an "
                           "antivirus scan?)")
            advice = "close it and run again"
        else:
            self.holder = ("permission denied for a second (the permissions of the file or its "
                           "folder, or another program holding it?)")
            advice = "fix that and run again"
        super().__init__(f"cannot {action} {self.path}: {self.holder}; {advice}")


def _retry_on_permission_error(operation, action, path):
    """`operation()`, tried again after each of RETRY_PAUSES while it raises PermissionError."""
    for pause in (*RETRY_PAUSES, None):
        try:
            return operation()
        except PermissionError as e:
            if pause is None:
                raise FileInUseError(action, path) from e
            time.sleep(pause)


def replace_file(source, destination):
    """`os.replace(source, destination)`, retried for about a second on PermissionError
    (Windows: another program holds one of them); then FileInUseError naming the file."""
    _retry_on_permission_error(lambda: os.replace(source, destination), "replace", destination)


def move_aside(path, label):
    """Rename `path` to the first free `<name>.<label>`, `<name>.<label>-1`, ... (a bad download,
    another run's checkpoint), so that nothing is lost; return the new path."""
    path = Path(path)
    aside, n = path.with_name(f"{path.name}.{label}"), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{label}-{n}")
    replace_file(path, aside)
    return aside


def remove_file(path, missing_ok=False):
    """`Path(path).unlink()`, retried for about a second on PermissionError; then
    FileInUseError naming the file."""
    path = Path(path)
    _retry_on_permission_error(lambda: path.unlink(missing_ok=missing_ok), "remove", path)


def _discard(path):
    """Remove a temporary file if it is there; one that stays held is left (a hidden .tmp)."""
    with contextlib.suppress(FileInUseError):
        remove_file(path, missing_ok=True)


@contextlib.contextmanager
def optional_output(what, then, stderr=None):
    """For an output a run can do without (a plot): a FileInUseError inside the block becomes
    one warning line on stderr, naming the file and what happens next, and the run goes on.

    Yields an object whose `written` is True once the block has finished.
    """
    outcome = _Outcome()
    try:
        yield outcome
    except FileInUseError as e:
        print(f"warning: {what} {e.path} was not written: {e.holder}. {then}",
              file=stderr or sys.stderr, flush=True)
        return
    outcome.written = True


class _Outcome:
    written = False


def _disk_full_cause(exc):
    """The ENOSPC/EDQUOT OSError behind `exc`, if any.

    torch.save reports a failed write as a RuntimeError ("enforce fail at inline_container.cc");
    when it writes to a Python file object, the file's OSError is the RuntimeError's context.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# The temporary name of `write_atomically`: `.<final name>.<16 hex digits>.tmp`.
TEMPORARY_NAME = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{16}\.tmp")


def _create_temporary(path):
    """An empty, new file beside `path`, created as open() would create it (umask applies).

    tempfile.mkstemp creates its files with mode 0o600, which a rename would keep.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def write_atomically(path, write):
    """Call `write(tmp_path)`, then rename the temporary file to `path`.

    A crash or Ctrl-C halfway leaves the old file (or none), never a half-written one. A full
    disk raises DiskFullError, with the old file left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        write(tmp)
        replace_file(tmp, path)
    except Exception as e:  # only a full disk is translated; anything else goes on as it is
        cause = _disk_full_cause(e)
        if cause is None:
            raise
        kept = "the old file is unchanged" if path.exists() else "nothing was written"
        raise DiskFullError(f"no space left on the disk while writing {path} ({kept}): "
                            f"free some space and run again") from e
    finally:
        _discard(tmp)


def leftover_temporaries(folder, skip_prefixes=(".write-test-",)):
    """The temporary files of `write_atomically` in `folder` (not below it), oldest first.

    Only a write that was killed (SIGKILL, a power cut) leaves one behind; call this only where
    no other program can be writing, e.g. in an output folder whose lock this process holds
    (output_lock.py). Temporaries whose final name starts with one of `skip_prefixes` are left
    out: preflight's write probes, which other processes of the same run may be writing now.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and not match.group("final").startswith(skip_prefixes) and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def remove_leftover_temporaries(folders):
    """Delete the leftover temporaries (see leftover_temporaries) of `folders`; return
    [(path, bytes)] of those removed. One that another program holds is skipped."""
    removed = []
    for folder in folders:
        for path in leftover_temporaries(folder):
            try:
                size = path.stat().st_size
                remove_file(path, missing_ok=True)
            except (FileInUseError, FileNotFoundError):
                continue
            removed.append((path, size))
    return removed


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4)

    write_atomically(path, write)


def save_state_dict(state_dict, path):
    """torch.save through a temporary file: the final name only ever holds a whole file.

    Its tensors are saved from the CPU (devices.to_cpu), so the book's plain torch.load(path)
    reads the file on any machine, also one without the GPU it was trained on."""
    import torch

    from instructkit.devices import to_cpu

    state_dict = to_cpu(state_dict)

    def write(tmp):
        # A Python file object, so that a full disk surfaces as an OSError (see _disk_full_cause).
        with open(tmp, "wb") as f:
            torch.save(state_dict, f)

    write_atomically(path, write)


def save_figure(fig, path, **savefig_kwargs):
    """`fig.savefig(path)` through a temporary file; the format follows `path`'s extension."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", path.suffix.lstrip(".") or None)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


def retry_while_disk_full(save, wait_for_space=None):
    """Call `save()`; when the disk is full and `wait_for_space` is given, call it and try again.

    What is in memory (a trained model) need not be lost to a disk that filled up while it was
    made: at a terminal, `wait_for_space` says so and waits until space has been freed (see
    `ask_at_terminal`). It returns False to give up, and the DiskFullError is raised.
    """
    while True:
        try:
            return save()
        except DiskFullError as e:
            if wait_for_space is None or not wait_for_space(e):
                raise


def ask_at_terminal(what, stdin=None, stderr=None):
    """A `wait_for_space` for retry_while_disk_full when a person is at the terminal, else None.

    It prints the error and waits for Enter; end of input (Ctrl-D, or Ctrl-Z then Enter on
    Windows) gives up.
    """
    from instructkit.console import end_of_input_keys

    stdin, stderr = stdin or sys.stdin, stderr or sys.stderr
    if stdin is None or not stdin.isatty():
        return None  # a job, a pipe or a notebook: nobody to free space, so fail at once

    def wait_for_space(error):
        print(f"error: {error}.\n{what} is still in memory: free some space on that disk, then "
              f"press Enter to write it again ({end_of_input_keys()} or Ctrl-C gives up).", file=stderr,
              flush=True)
        return stdin.readline() != ""

    return wait_for_space
