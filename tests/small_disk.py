"""Real filesystems for failure tests: a tiny tmpfs that fills up, a folder nobody may write.

Mounting needs root on Linux (as in this project's containers); elsewhere the tests that need
it skip, as do those needing an unwritable folder on Windows (where folder modes stop nobody).
"""

import contextlib
import subprocess
import sys

import pytest
from portable import WINDOWS, is_root


@contextlib.contextmanager
def small_tmpfs(folder, size="512k", read_only=False):
    """Mount a tmpfs of `size` on `folder` (created) for the `with` block, then unmount it."""
    folder.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux"):
        pytest.skip(f"a small tmpfs is Linux's (not on {sys.platform})")
    if not is_root():
        pytest.skip("mounting a small tmpfs needs root")
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def unwritable_folder(folder):
    """A folder nobody may write into: mode 0o555, or for root (whom modes do not stop) a
    read-only tmpfs."""
    if WINDOWS:
        pytest.skip("Windows has no folder mode that stops writing into it")
    if is_root():
        with small_tmpfs(folder, read_only=True):
            yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
