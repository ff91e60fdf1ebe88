"""Make the POSIX-only modules `pty`, `termios`, `fcntl` and `resource` fail to import in a
Python started with this folder on PYTHONPATH, as they do on Windows.

For tests/test_portable.py, which collects the whole suite there: a test file that imports one
of them at its top would stop collection on Windows (pytest's "errors during collection").
Python imports `sitecustomize` at start-up; this one puts a finder first on `sys.meta_path`
that answers for those names with a loader that refuses to load them, so importing raises
ModuleNotFoundError, as on Windows (`tty`, which imports `termios`, fails with it).

A few libraries choose their code by platform, and on Linux take a branch that imports these
modules; on Windows they take another that needs none of them. They are imported before the
block, so that they behave as on a reader's Windows machine, not as a Linux without POSIX:
psutil (its Linux backend imports `resource`), filelock (`fcntl`; on Windows `msvcrt`) and
huggingface_hub's terminal helper, which Gradio loads (`termios` and `tty`; on Windows `msvcrt`).
"""

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys

for library in ("psutil", "filelock", "huggingface_hub.utils._terminal"):  # see above
    with contextlib.suppress(ImportError):
        importlib.import_module(library)

BLOCKED = ("pty", "termios", "fcntl", "resource")


class NoPosixModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the blocked modules first, and then refuses to load them."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self, origin=None) if name in BLOCKED else None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by tests/without_posix)",
                                  name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise ModuleNotFoundError(module.__name__)


for name in BLOCKED:
    sys.modules.pop(name, None)  # none is loaded at start-up; in case a site hook did
sys.meta_path.insert(0, NoPosixModules())
