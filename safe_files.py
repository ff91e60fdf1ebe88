"""Files written whole or not at all: a crash or Ctrl-C halfway never leaves half a file.

Not in the book: the book writes its outputs directly. Every output of this project (JSON,
model weights, plots) goes through a temporary file in the same folder, renamed into place.
"""

import json
import os
import tempfile
from pathlib import Path


def write_atomically(path, write):
    """Call `write(tmp_path)`, then rename the temporary file to `path`.

    A crash or Ctrl-C halfway leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4)

    write_atomically(path, write)


def save_state_dict(state_dict, path):
    """torch.save through a temporary file: the final name only ever holds a whole file."""
    import torch

    write_atomically(path, lambda tmp: torch.save(state_dict, tmp))
