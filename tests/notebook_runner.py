"""Run the notebooks as a reader would, in smoke mode, from a clean copy of the repository.

`smoke_workdir` copies the repository's files (what git tracks, plus new files git does not
ignore; without git, the files .gitignore does not name) into a fresh folder and adds what a
reader's first run would download: the chapter's dataset, a small stand-in for the Alpaca
file, and tiny GPT-2 checkpoints (in OpenAI's layout, or in the hub's, which loads without
TensorFlow). Because those files are already on disk, the notebooks' own download code uses
them and never reaches the network. `run_notebook` executes one notebook top to bottom with
nbclient; `without_tensorflow_env` is the environment of a run where TensorFlow cannot be
imported (tests/without_tensorflow/sitecustomize.py).
"""

import fnmatch
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from conftest import ROOT, SHARED_DATA

from instructkit.gpt2_sizes import TEST_MODE_CONFIG


def repo_files(root=ROOT):
    """Paths (relative to `root`) of tracked and new, not ignored, files.

    Without git (a plain copy of the repository, or git not installed): every file except
    hidden folders, caches and what .gitignore names (its simple patterns)."""
    root = Path(root)
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=root, check=True, capture_output=True, text=True).stdout
        return [p for p in out.split("\0") if p and (root / p).is_file()]
    ignore = root / ".gitignore"
    patterns = [line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")] if ignore.is_file() else []
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.is_file() and not _ignored(path.relative_to(root), patterns))


def _ignored(rel, patterns):
    """A `.gitignore` check for the patterns this repository uses: names, globs, `folder/`."""
    parts = rel.parts
    if parts[0] == ".git" or any(part.startswith(".") and part != ".ci" for part in parts[:-1]):
        return True  # .git, .pytest_cache, .ruff_cache, .ipynb_checkpoints, .venv ...
    for pattern in patterns:
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(part, pattern.rstrip("/")) for part in parts[:-1]):
                return True
        elif fnmatch.fnmatch(parts[-1], pattern) or fnmatch.fnmatch(rel.as_posix(), pattern.lstrip("/")):
            return True
    return False


def smoke_workdir(dest, weights="openai"):
    """A clean copy of the repository in `dest`, with the data and weights already 'downloaded'.

    `weights` is the layout of the tiny stand-in checkpoints: "openai" (TensorFlow's) or
    "hub-openai" (model.safetensors, vocab.json, merges.txt; written without TensorFlow)."""
    dest = Path(dest)
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)

    shutil.copyfile(SHARED_DATA / "instruction-data.json", dest / "instruction-data.json")
    # Stand-in for the 52k Alpaca file (exercise 7.3): same keys, a few hundred entries.
    entries = json.loads((SHARED_DATA / "instruction-data.json").read_text(encoding="utf-8"))
    (dest / "alpaca_data.json").write_text(json.dumps(entries[:200], indent=1), encoding="utf-8")

    for size in ("124M", "355M"):
        if weights == "openai":
            shutil.copytree(_tiny_checkpoint(), dest / "gpt2" / size)
        else:
            from hub_checkpoint import write_hub_model_folder

            write_hub_model_folder(dest / "gpt2" / size, SHARED_DATA / "gpt2-tokenizer",
                                   n_vocab=TEST_MODE_CONFIG["vocab_size"],
                                   n_ctx=TEST_MODE_CONFIG["context_length"],
                                   n_embd=TEST_MODE_CONFIG["emb_dim"],
                                   n_layer=TEST_MODE_CONFIG["n_layers"])
    return dest


def without_tensorflow_env(log):
    """Environment variables for a Python (or notebook kernel) in which `import tensorflow`
    fails, each attempt appended to the file `log`."""
    blocker = Path(__file__).resolve().parent / "without_tensorflow"
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "TF_IMPORT_LOG": str(log)}


@functools.lru_cache(maxsize=1)
def _tiny_checkpoint():
    """Write the stand-in GPT-2 checkpoint once per test session (TensorFlow is slow to start)."""
    from gpt2_checkpoint import write_gpt2_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="tiny-gpt2-")) / "checkpoint"
    write_gpt2_checkpoint(folder, n_vocab=TEST_MODE_CONFIG["vocab_size"],
                          n_ctx=TEST_MODE_CONFIG["context_length"], n_embd=TEST_MODE_CONFIG["emb_dim"],
                          n_head=TEST_MODE_CONFIG["n_heads"], n_layer=TEST_MODE_CONFIG["n_layers"],
                          seed=123)
    return folder


def run_notebook(name, workdir, env=None, timeout=900):
    """Execute `workdir/name` in `workdir` with SMOKE_TEST=1; raise on any cell error."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(workdir) / name
    nb = nbformat.read(path, as_version=4)
    kernel_env = {**os.environ, "SMOKE_TEST": "1", "MPLBACKEND": "Agg", **(env or {})}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    with _environment(kernel_env):  # the kernel process inherits this environment
        client.execute()
    nbformat.write(nb, path)  # keep the executed copy in the work folder for inspection
    return nb


class _environment:
    """Temporarily replace os.environ (restored afterwards, whatever happens)."""

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def cell_outputs(nb):
    """All text a notebook's code cells printed or returned, joined (for assertions)."""
    texts = []
    for cell in nb.cells:
        previous = None
        for out in cell.get("outputs", []):
            if "text" in out:
                if out.get("name") and out.get("name") == previous:
                    texts[-1] += out["text"]  # one stream, which the kernel sent in pieces
                else:
                    texts.append(out["text"])
                previous = out.get("name")
            elif "data" in out and "text/plain" in out["data"]:
                texts.append(out["data"]["text/plain"])
                previous = None
    return "\n".join(texts)
