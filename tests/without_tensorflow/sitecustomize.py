"""Make `import tensorflow` fail in a Python started with this folder on PYTHONPATH.

For the tests that run the chapter as a reader without TensorFlow would (TensorFlow is
installed on the test machine). Python imports `sitecustomize` at start-up; this one puts a
finder first on `sys.meta_path` that answers for `tensorflow` and its submodules with a
loader that refuses to load them: importing raises ModuleNotFoundError, and each attempt,
with where it came from, is appended to the file $TF_IMPORT_LOG, so a test can prove that
nothing even tried (a library that catches the ImportError would otherwise hide it).

A mere look-up (`importlib.util.find_spec("tensorflow")`, which torch._dynamo makes for its
list of third-party libraries) gets a spec without an origin, which such callers skip, and
is not an import: it is not logged.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import traceback


class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `tensorflow` first, and then refuses to load it."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self, origin=None)
        return None

    def create_module(self, spec):
        log = os.environ.get("TF_IMPORT_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as file:
                file.write(f"import {spec.name} from:\n{''.join(traceback.format_stack()[:-1])}\n")
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by tests/without_tensorflow)",
                                  name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise ModuleNotFoundError(module.__name__)


sys.meta_path.insert(0, NoTensorFlow())
