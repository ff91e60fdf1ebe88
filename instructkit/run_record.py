"""What a finetuning run leaves behind besides the model: a metrics log and a run record.

Not in the book: the book prints its losses and keeps them in memory. Here
- every evaluation appends one JSON line to the metrics file as it happens (step, epoch,
  epochs_seen, tokens_seen, train_loss, val_loss, lr, seconds), so a crashed run still has
  its curve, and the loss plot can be drawn again from that file alone. Until the run's model
  is saved the file is `<stem>.metrics.jsonl.partial` (`partial_metrics_path`); then it becomes
  `<stem>.metrics.jsonl` (`publish_metrics`), so a run that dies never replaces the metrics of
  the model an earlier run saved under that name;
- `<stem>.run.json` beside `<stem>.pth` records the full config, package versions, device,
  precision, the dataset's sha256 and size, the seed, wall time and final losses.
"""

import hashlib
import json
from pathlib import Path

from instructkit.safe_files import replace_file, write_atomically, write_json

METRIC_KEYS = ("step", "epoch", "epochs_seen", "tokens_seen", "train_loss", "val_loss", "lr", "seconds")
RUN_RECORD_KEYS = ("config", "model_config", "versions", "device", "precision", "dataset", "seed",
                   "wall_seconds", "final_losses")


def package_version(name):
    """The installed version of package `name`, or "not installed" (TensorFlow is optional)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def package_versions(names=("matplotlib", "tiktoken", "torch", "tensorflow", "tqdm", "psutil")):
    """{name: version} of the packages a run record lists."""
    return {name: package_version(name) for name in names}


def run_record_path(model_path):
    """gpt2-medium355M-sft.pth -> gpt2-medium355M-sft.run.json (same folder)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".run.json")


def metrics_path(model_path):
    """gpt2-medium355M-sft.pth -> gpt2-medium355M-sft.metrics.jsonl (same folder)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".metrics.jsonl")


def partial_metrics_path(metrics_file):
    """x.metrics.jsonl -> x.metrics.jsonl.partial: a run's metrics until its model is saved."""
    metrics_file = Path(metrics_file)
    return metrics_file.with_name(metrics_file.name + ".partial")


def publish_metrics(metrics_file):
    """Give the run's metrics (`partial_metrics_path(metrics_file)`) the final name
    `metrics_file`, replacing the earlier model's; call it once the model is saved. Returns
    `metrics_file`, or None when the run wrote no metrics."""
    partial = partial_metrics_path(metrics_file)
    if not partial.is_file():
        return None
    replace_file(partial, metrics_file)
    return Path(metrics_file)


def dataset_fingerprint(path):
    """{"path", "sha256", "bytes"} of a data file, read in 1 MiB pieces."""
    path = Path(path)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": size}


class MetricsLog:
    """An append-only JSONL file of evaluation rows (METRIC_KEYS), one line per evaluation."""

    def __init__(self, path):
        self.path = Path(path)

    def start(self, rows=()):
        """Begin the file afresh with `rows` (a resumed run's rows so far), atomically.

        Rows the interrupted run wrote after its last checkpoint are dropped: the resumed
        run computes them again.
        """
        text = "".join(json.dumps(row) + "\n" for row in rows)
        write_atomically(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def append(self, row):
        missing = [key for key in METRIC_KEYS if key not in row]
        if missing:
            raise ValueError(f"A metrics row needs {', '.join(missing)}")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(path):
    """The rows of a metrics file; ValueError naming the line when one is not JSON."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
    return rows


def plot_metrics(path, save_path=None, show=False):
    """Draw the chapter's loss plot (previous_chapters.plot_losses) from a metrics file alone."""
    from previous_chapters import plot_losses

    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} holds no evaluations to plot")
    return plot_losses([r["epochs_seen"] for r in rows], [r["tokens_seen"] for r in rows],
                       [r["train_loss"] for r in rows], [r["val_loss"] for r in rows],
                       save_path=save_path, show=show)


def write_run_record(model_path, record):
    """Write `record` as `<stem>.run.json` beside `model_path`; it must hold RUN_RECORD_KEYS."""
    missing = [key for key in RUN_RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"A run record needs {', '.join(missing)}")
    path = run_record_path(model_path)
    write_json(path, record)
    return path


def read_run_record(model_path_or_record):
    """The run record of a model (`x.pth` or `x.run.json`); FileNotFoundError saying what is missing."""
    path = Path(model_path_or_record)
    if not path.name.endswith(".run.json"):
        path = run_record_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No run record {path}: it is written beside the model by the "
                                f"finetuning command.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
