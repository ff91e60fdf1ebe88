"""One run per output folder: a lock file that says which run writes there.

Not in the book. Two runs writing into one folder destroy each other's files: the second run's
`--keep` pruning deletes the first run's checkpoints, their metrics interleave, each replaces
the other's model. So a finetuning or DPO run holds `OUTPUT_DIR/.instructkit.lock` for as long
as it runs (`OutputLock`, `hold_output_folder`):

- the file is created atomically (os.O_CREAT | os.O_EXCL: of two runs starting at the same
  moment, exactly one creates it) and holds JSON: {"pid", "host", "started" (seconds since the
  epoch), "since" (the same, readable, in UTC), "command", "token"};
- a second run into the folder is refused before it does any work: `OutputFolderInUse`, one
  line naming the holder's pid, host and start, exit code 2;
- a lock whose run is gone is stale. On this host that is certain (no process has that pid
  any more, or the pid now belongs to a process started after the lock): the lock is taken
  over, with a note. A lock written on another host cannot be checked from here: the run is
  refused, and the message names the file to delete if that run has ended;
- the lock is removed when the run ends, by an error or Ctrl-C too, and at the latest when the
  process exits (atexit). Only a run killed outright (SIGKILL, a power cut) leaves it: stale.
- under torchrun only the process that writes the outputs (RANK 0) takes it, so the run's
  other processes are never refused by their own run's lock.

Whether a process is alive is asked of psutil (a requirement of the project), else of the
operating system directly: `os.kill(pid, 0)` on POSIX, OpenProcess on Windows (where
os.kill would end the process instead).

Once the lock is ours, `hold_output_folder` also removes what killed writes left in that
folder: the temporary files of safe_files.write_atomically (each up to a whole checkpoint).
"""

import atexit
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from instructkit.errors import BadInputError

LOCK_NAME = ".instructkit.lock"
# How long a lock file may stay empty or unreadable while its run is still writing it.
UNREADABLE_GRACE_S = 10.0
# create_time's rounding, and clocks: a process started this long after the lock is another one.
CLOCK_SLACK_S = 1.0

_HELD = {}  # resolved lock path -> the OutputLock of this process that holds it


class OutputFolderInUse(BadInputError):
    """Another run writes into the output folder (exit code 2)."""


def this_host():
    return socket.gethostname()


def process_alive(pid, started=None):
    """Whether process `pid` of this machine is running; with `started` (seconds since the
    epoch), only if it had started by then (a later process given the same pid is another)."""
    if pid == os.getpid():
        return True
    try:
        import psutil
    except ImportError:
        return _alive_without_psutil(pid)
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # ended, not yet waited for by its parent
            return False
        created = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True
    return started is None or created <= started + CLOCK_SLACK_S


def _alive_without_psutil(pid):
    if os.name == "nt":  # os.kill(pid, 0) would end the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _since(started):
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
    except (TypeError, ValueError, OverflowError):
        return "an unknown time"


def describe_holder(holder):
    """"pid 123 on host h, since 2026-12-03 15:40:01 UTC" for a lock file's JSON."""
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {_since(holder.get('started'))}"


class OutputLock:
    """The lock on `folder`; `flag` names the command-line option that chose the folder, for
    the messages. Use as a context manager, or `acquire()` and `release()`."""

    def __init__(self, folder, flag="--output-dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.flag = flag
        self.token = None
        self.notes = []  # what acquire() found and did (a stale lock taken over)

    @property
    def held(self):
        return self.token is not None

    def acquire(self):
        """Create the lock file, taking over a stale one; OutputFolderInUse when the folder is in
        use. Returns self."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                _HELD[self._key()] = self
                _register_exit_hook()
                return self
            raw, holder = self._read()
            if raw is None:
                continue  # released meanwhile: try again
            stale = self._stale_reason(holder)
            if stale is None:
                raise OutputFolderInUse(self._in_use_message(holder))
            if self._take_over(raw) and stale:
                self.notes.append(f"Note: took over the lock {self.path}: {stale}.")
        raise OutputFolderInUse(f"{self.flag} {self.folder}: its lock {self.path} keeps changing "
                                f"hands; another run is starting there: choose another {self.flag}")

    def release(self):
        """Remove the lock file if it is still this lock's; never raises."""
        if not self.held:
            return
        if _HELD.get(self._key()) is self:
            del _HELD[self._key()]
        token, self.token = self.token, None
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text(encoding="utf-8")).get("token") == token:
                from instructkit.safe_files import remove_file

                remove_file(self.path, missing_ok=True)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

    def _key(self):
        return str(self.path.resolve())

    def _create(self):
        token = secrets.token_hex(8)
        record = {"pid": os.getpid(), "host": this_host(), "started": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
                  "token": token}
        record["since"] = _since(record["started"])
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except PermissionError:
            if os.name != "nt":
                raise
            time.sleep(0.1)  # Windows: a lock file being deleted cannot be created anew yet
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self.token = token
        return True

    def _read(self):
        """(raw bytes, holder dict) of the lock file; (None, None) when it is gone. A file still
        being written (empty, half JSON) is read again for a second; then its holder is {}."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None, None
            except PermissionError:  # Windows: being written or deleted right now
                raw = b""
            try:
                holder = json.loads(raw)
                if isinstance(holder, dict) and "pid" in holder:
                    return raw, holder
            except (ValueError, UnicodeDecodeError):
                pass
            if time.monotonic() > deadline:
                return raw, {}
            time.sleep(0.05)

    def _stale_reason(self, holder):
        """None when the holder may still be running; else why the lock is stale ("" for an
        earlier run of this very process, taken over without a note)."""
        if not holder:  # unreadable: a run killed while it wrote the file, or one writing it now
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it was removed"
            return f"it is unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
        if holder.get("host") != this_host():
            return None  # another machine's run: nothing here can tell whether it still runs
        try:
            pid = int(holder["pid"])
            started = float(holder.get("started"))
        except (TypeError, ValueError):
            return "it names no process"
        if pid == os.getpid():
            # an earlier run of this process (a notebook's, ended by an error) left it, or a
            # process before this one that had the same pid
            return "" if self._key() in _HELD else f"process {pid} that made it has ended"
        if process_alive(pid, started):
            return None
        return f"process {pid} ({describe_holder(holder)}) is no longer running"

    def _take_over(self, raw):
        """Move the stale lock aside and delete it; False when another run changed it first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)  # of several runs taking over at once, one succeeds
        except FileNotFoundError:
            return False
        except PermissionError:
            if os.name != "nt":
                raise
            time.sleep(0.1)
            return False
        try:
            if aside.read_bytes() == raw:
                return True
            # another run took the stale lock over and wrote its own between our read and
            # the rename: put the live one back
            if not self.path.exists():
                os.replace(aside, self.path)
            return False
        finally:
            with contextlib.suppress(OSError):
                aside.unlink(missing_ok=True)

    def _in_use_message(self, holder):
        if not holder:
            return (f"{self.flag} {self.folder} is in use: another run is creating its lock "
                    f"{self.path} right now; wait for it to end, or choose another {self.flag}")
        if holder.get("host") != this_host():
            return (f"{self.flag} {self.folder} is in use by a run on another machine "
                    f"({describe_holder(holder)}); if that run has ended, delete {self.path} "
                    f"and run again, or choose another {self.flag}")
        return (f"{self.flag} {self.folder} is in use by another run ({describe_holder(holder)}); "
                f"wait for it to end, or choose another {self.flag}")


def _release_all():
    for lock in list(_HELD.values()):
        lock.release()


_exit_hook = []


def _register_exit_hook():
    if not _exit_hook:
        atexit.register(_release_all)
        _exit_hook.append(True)


def hold_output_folder(folder, subfolders=("checkpoints",), flag="--output-dir", out=None):
    """Lock `folder` for this run (OutputFolderInUse when another run holds it), then remove
    the temporary files that killed writes left there and in its `subfolders`, printing a note
    that names each and its size. Returns the OutputLock; release() it when the run ends."""
    from instructkit.preflight import format_bytes
    from instructkit.safe_files import remove_leftover_temporaries

    out = out or sys.stdout
    lock = OutputLock(folder, flag).acquire()
    for note in lock.notes:
        print(note, file=out)
    try:
        removed = remove_leftover_temporaries([lock.folder, *(lock.folder / s for s in subfolders)])
    except BaseException:
        lock.release()
        raise
    if removed:
        names = ", ".join(f"{path} ({format_bytes(size)})" for path, size in removed)
        print(f"Note: removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} "
              f"that a killed write left behind: {names}.", file=out)
    return lock
