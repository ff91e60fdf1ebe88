"""A real, tiny filesystem for full-disk tests: a tmpfs of a few hundred KiB, mounted for a test.

Mounting needs root (as in this project's containers); elsewhere the tests that need it skip.
"""

import contextlib
import os
import subprocess

import pytest


@contextlib.contextmanager
def small_tmpfs(folder, size="512k"):
    """Mount a tmpfs of `size` on `folder` (created) for the `with` block, then unmount it."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
