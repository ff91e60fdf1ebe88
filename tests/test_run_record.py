"""run_record.py: the metrics log, the run record beside the model, the plot from metrics alone."""

import hashlib
import json

import pytest

from instructkit.run_record import (
    METRIC_KEYS,
    MetricsLog,
    dataset_fingerprint,
    metrics_path,
    plot_metrics,
    read_metrics,
    read_run_record,
    run_record_path,
    write_run_record,
)


def row(step, train_loss, val_loss):
    return {"step": step, "epoch": 1, "epochs_seen": (step + 1) / 10, "tokens_seen": 100 * (step + 1),
            "train_loss": train_loss, "val_loss": val_loss, "lr": 5e-5, "seconds": 0.5 * step}


def test_paths_sit_beside_the_model(tmp_path):
    model = tmp_path / "gpt2-medium355M-sft.pth"
    assert run_record_path(model) == tmp_path / "gpt2-medium355M-sft.run.json"
    assert metrics_path(model) == tmp_path / "gpt2-medium355M-sft.metrics.jsonl"


def test_dataset_fingerprint_is_the_files_sha256(tmp_path, shared_data):
    path = shared_data / "instruction-data.json"
    data = path.read_bytes()
    assert dataset_fingerprint(path) == {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(),
                                         "bytes": len(data)}
    big = tmp_path / "big.bin"
    big.write_bytes(b"ab" * (1 << 20) + b"c")  # more than one read of 1 MiB
    assert dataset_fingerprint(big)["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()


def test_metrics_log_appends_and_restarts(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.start()
    log.append(row(0, 3.0, 3.5))
    log.append(row(5, 2.0, 2.5))
    assert read_metrics(log.path) == [row(0, 3.0, 3.5), row(5, 2.0, 2.5)]
    log.start([row(0, 3.0, 3.5)])  # a resumed run drops rows after its checkpoint
    assert read_metrics(log.path) == [row(0, 3.0, 3.5)]
    with pytest.raises(ValueError, match="needs epoch"):
        log.append({k: 0 for k in METRIC_KEYS if k != "epoch"})
    (tmp_path / "bad.jsonl").write_text(json.dumps(row(0, 1, 1)) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not JSON"):
        read_metrics(tmp_path / "bad.jsonl")


def test_plot_is_drawn_from_the_metrics_file_alone(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    log = MetricsLog(tmp_path / "m.jsonl")
    log.start([row(0, 3.0, 3.5), row(5, 2.0, 2.5), row(9, 1.5, 2.2)])
    fig = plot_metrics(log.path, save_path=tmp_path / "loss.pdf")
    assert (tmp_path / "loss.pdf").read_bytes().startswith(b"%PDF")
    train_line, val_line = fig.axes[0].get_lines()
    assert list(train_line.get_xdata()) == [0.1, 0.6, 1.0]
    assert list(train_line.get_ydata()) == [3.0, 2.0, 1.5]
    assert list(val_line.get_ydata()) == [3.5, 2.5, 2.2]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [100, 600, 1000]  # tokens seen
    log.start()
    with pytest.raises(ValueError, match="no evaluations"):
        plot_metrics(log.path)


def test_run_record_is_written_beside_the_model_and_read_back(tmp_path):
    model = tmp_path / "m-sft.pth"
    record = {"config": {"model": "gpt2-small"}, "model_config": {"emb_dim": 768}, "versions": {},
              "device": "cpu", "precision": "fp32",
              "dataset": {"path": "d.json", "sha256": "ab", "bytes": 2}, "seed": 123,
              "wall_seconds": 1.0, "final_losses": {"train": 1.0, "val": 2.0}}
    assert write_run_record(model, record) == tmp_path / "m-sft.run.json"
    assert read_run_record(model) == record == read_run_record(tmp_path / "m-sft.run.json")
    with pytest.raises(ValueError, match="needs seed"):
        write_run_record(model, {k: v for k, v in record.items() if k != "seed"})
    with pytest.raises(FileNotFoundError, match="No run record"):
        read_run_record(tmp_path / "other.pth")
