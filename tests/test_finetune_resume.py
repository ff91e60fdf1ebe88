"""The command line's long-run features (issue 12): exact resume after a real SIGINT and after
`--max-steps`, refusal of a mismatched checkpoint, the metrics file and run record, and the
data flags (JSONL, optional input, split fractions, shuffled split, answer limit).

Test mode on the CPU in float32, one thread in this process and in the subprocesses (the
thread count may change float sums), so equal means bit-equal.
"""

import contextlib
import hashlib
import io
import json
import os
import random
import sys

import pytest
import torch
from cli_in_process import run_finetune
from conftest import ROOT, TOKENIZER_DIR
from interrupting import run_and_act
from portable import send_interrupt

import gpt_instruction_finetuning as gif
from instructkit import finetune
from instructkit.errors import BadInputError, CheckpointError
from instructkit.finetune_config import FinetuneConfig
from instructkit.finetune_files import data_name, split_entries
from instructkit.finetune_run import FinetuneRun
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.instruction_data import split_data
from instructkit.run_record import read_metrics, read_run_record
from instructkit.training import RESUME_NEWEST

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = ROOT / "gpt_instruction_finetuning.py"
STEM = "gpt2-medium355M-sft-data-test"
EPOCHS = 3  # test mode: 10 training entries, batches of 2, so 15 steps


def settings(data, output_dir, **changes):
    return FinetuneConfig(test_mode=True, data=str(data), output_dir=str(output_dir),
                          tokenizer_dir=str(TOKENIZER_DIR), epochs=EPOCHS, eval_freq=2,
                          eval_iter=1, max_new_tokens=4, **changes)


def command(data, output_dir, *args):
    return [sys.executable, "-u", str(SCRIPT), "--test_mode", "--data", str(data),
            "--output-dir", str(output_dir), "--tokenizer-dir", str(TOKENIZER_DIR),
            "--epochs", str(EPOCHS), "--eval-freq", "2", "--eval-iter", "1",
            "--max-new-tokens", "4", *args]


def one_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def model_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_files(folder, expected_folder):
    """The same weights (bit for bit), answers and losses as the uninterrupted run."""
    model, expected = model_weights(folder / f"{STEM}.pth"), model_weights(expected_folder / f"{STEM}.pth")
    assert model.keys() == expected.keys()
    assert all(torch.equal(model[k], expected[k]) for k in expected)
    answers = "instruction-data-with-response-data-test.json"
    assert (folder / answers).read_text() == (expected_folder / answers).read_text()

    def rows(f):
        metrics = read_metrics(f / f"{STEM}.metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "seconds"} for r in metrics]
    assert rows(folder) == rows(expected_folder)


@pytest.fixture(scope="module")
def uninterrupted(data_file, tmp_path_factory, one_thread):
    """The reference: one run from start to end, its printed output and result."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = gif.main(config=settings(data_file, folder))
    return {"folder": folder, "result": result, "printed": out.getvalue()}


def test_metrics_rows_equal_the_printed_losses_and_the_record_holds_the_data_hash(
        uninterrupted, data_file):
    folder, result = uninterrupted["folder"], uninterrupted["result"]
    rows = read_metrics(folder / f"{STEM}.metrics.jsonl")
    printed = [line for line in uninterrupted["printed"].splitlines() if line.startswith("Ep ")]
    assert printed == [f"Ep {r['epoch']} (Step {r['step']:06d}): Train loss {r['train_loss']:.3f}, "
                       f"Val loss {r['val_loss']:.3f}" for r in rows]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [r["train_loss"] for r in rows] == result["train_losses"]
    assert [r["val_loss"] for r in rows] == result["val_losses"]
    assert [r["tokens_seen"] for r in rows] == result["tokens_seen"]

    record = read_run_record(folder / f"{STEM}.pth")
    data = data_file.read_bytes()
    assert record["dataset"] == {"path": str(data_file.resolve()),
                                 "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert record["model_config"] == TEST_MODE_CONFIG
    assert record["config"]["model"] == "gpt2-medium" and record["config"]["epochs"] == EPOCHS
    assert record["precision"] == "fp32" and record["device"] == "cpu" and record["seed"] == 123
    assert record["final_losses"] == {"train_loss": rows[-1]["train_loss"], "val_loss": rows[-1]["val_loss"]}
    assert record["steps"] == 15 and record["resumed_from"] is None
    assert record["versions"]["torch"] == torch.__version__
    assert record["files"]["metrics"] == f"{STEM}.metrics.jsonl"
    assert "Precision: fp32 (float32; auto: float32 on CPU)" in uninterrupted["printed"]


def test_max_steps_stop_then_resume_equals_the_uninterrupted_run(uninterrupted, data_file, tmp_path,
                                                                 capsys):
    stopped = gif.main(config=settings(data_file, tmp_path, max_steps=7, save_every=3, keep=2))
    assert not stopped["finished"] and stopped["steps"] == 7
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == [f"{STEM}-step0000006.pth", f"{STEM}-step0000007.pth"]  # keep 2
    assert not (tmp_path / f"{STEM}.pth").exists()  # no model from a stopped run
    assert "Stopped after 7 steps (--max-steps)" in capsys.readouterr().out

    resumed = gif.main(config=settings(data_file, tmp_path, resume=RESUME_NEWEST))
    assert f"Resuming from {tmp_path / 'checkpoints' / checkpoints[-1]}: epoch 2, after step 7." in (
        capsys.readouterr().out)
    assert resumed["finished"]
    assert resumed["train_losses"] == uninterrupted["result"]["train_losses"]
    assert_same_files(tmp_path, uninterrupted["folder"])
    record = read_run_record(tmp_path / f"{STEM}.pth")
    assert record["resumed_from"] == str(tmp_path / "checkpoints" / checkpoints[-1])


@pytest.mark.slow
def test_real_sigint_to_the_command_then_resume_equals_the_uninterrupted_run(uninterrupted, data_file,
                                                                            tmp_path):
    # Interrupt once training is under way (stderr's file lies outside the output folder).
    code, stderr = run_and_act(command(data_file, tmp_path), tmp_path.with_suffix(".stderr"),
                               ["Ep 1 (Step 000002)"], send_interrupt,
                               timeout=120, cwd=tmp_path, env=one_thread_env())
    assert code == 130, stderr
    assert "stopping after this step to save a checkpoint" in stderr
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    assert f"--resume {checkpoint}" in stderr and "run the same command with --resume" in stderr
    assert "Traceback" not in stderr
    step = int(checkpoint.stem.rsplit("step", 1)[1])
    assert 3 <= step < 15  # stopped after a whole step, before the end
    # no model: training did not finish; its metrics keep the name of an unfinished run
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints", f"{STEM}.metrics.jsonl.partial"]

    # the same command with --resume, here in this process (cli_in_process.py)
    proc = run_finetune(*command(data_file, tmp_path, "--resume")[3:], cwd=tmp_path, one_thread=True)
    assert proc.returncode == 0, proc.stderr
    assert f"Resuming from {checkpoint}" in proc.stdout
    assert_same_files(tmp_path, uninterrupted["folder"])


def test_a_checkpoint_of_other_settings_or_data_is_refused(uninterrupted, data_file, tmp_path,
                                                           instruction_data, capsys):
    gif.main(config=settings(data_file, tmp_path, max_steps=2))
    checkpoint = tmp_path / "checkpoints" / f"{STEM}-step0000002.pth"

    code = finetune.cli(command(data_file, tmp_path, "--resume", str(checkpoint), "--lr", "1e-4")[3:])
    err = capsys.readouterr().err
    assert code == 2
    assert "belongs to a different run:\n  config.lr: 5e-05 in the checkpoint, 0.0001 now" in err

    other = tmp_path / "data.json"  # the same name, other entries: other sha256
    other.write_text(json.dumps(instruction_data[1:41]), encoding="utf-8")
    with pytest.raises(CheckpointError, match="dataset_sha256: '[0-9a-f]{64}' in the checkpoint"):
        gif.main(config=settings(other, tmp_path, resume=str(checkpoint)))
    with pytest.raises(CheckpointError, match=f"No checkpoint named {STEM[:-5]}-lora2-test-step"):
        gif.main(config=settings(data_file, tmp_path, resume=RESUME_NEWEST, lora_rank=2))


def answers_of(model_file, config):
    """FinetuneRun's answers to the test entries, by the model saved in `model_file`."""
    from previous_chapters import GPTModel

    run = FinetuneRun(config)
    _, test_data, _ = run.split(run.load_data("unused.json", None))
    model = GPTModel(TEST_MODE_CONFIG)
    model.load_state_dict(model_weights(model_file))
    return run.generate_responses(model, test_data[:10], run.tokenizer(), gif.ALPACA)


def test_answer_limit(uninterrupted, data_file, tmp_path):
    model_file = uninterrupted["folder"] / f"{STEM}.pth"
    expected = json.loads((uninterrupted["folder"] / "instruction-data-with-response-data-test.json")
                          .read_text())
    assert answers_of(model_file, settings(data_file, tmp_path, max_test_answers=2)) == expected[:2]
    assert answers_of(model_file, settings(data_file, tmp_path, max_test_answers=0)) == []


def test_answers_with_the_decode_flags(uninterrupted, data_file, tmp_path):
    """--decode-matvec parallel gives the same fp32 answers; --decode-dtype bf16 answers too."""
    from instructkit import parallel_matvec

    model_file = uninterrupted["folder"] / f"{STEM}.pth"
    expected = json.loads((uninterrupted["folder"] / "instruction-data-with-response-data-test.json")
                          .read_text())
    try:
        forced = answers_of(model_file, settings(data_file, tmp_path, max_test_answers=3,
                                                 decode_matvec="parallel"))
        assert parallel_matvec.current_mode() == "parallel"
        assert forced == expected[:3]
        bf16 = answers_of(model_file, settings(data_file, tmp_path, max_test_answers=3,
                                               decode_dtype="bf16"))
        assert [{k: v for k, v in e.items() if k != "model_response"} for e in bf16] == \
            [{k: v for k, v in e.items() if k != "model_response"} for e in expected[:3]]
        assert all(isinstance(e["model_response"], str) for e in bf16)
    finally:
        parallel_matvec.set_mode(None)


########################################################################################
# Data a practitioner brings
########################################################################################

class Prepared:
    """A run's data as gpt_instruction_finetuning.main reads and splits it (FinetuneRun)."""

    def __init__(self, path, tmp_path, **changes):
        config = FinetuneConfig(data=str(path), output_dir=str(tmp_path), device="cpu",
                                tokenizer_dir=str(TOKENIZER_DIR), **changes)
        run = FinetuneRun(config)
        self.train_data, self.test_data, self.val_data = run.split(run.load_data("unused.json", None))
        self.data_name = data_name(config)


prepared = Prepared


def test_jsonl_and_missing_input(instruction_data, tmp_path):
    entries = [dict(e) for e in instruction_data[:40]]
    for entry in entries[::3]:
        del entry["input"]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n", encoding="utf-8")
    data = prepared(path, tmp_path)
    expected = [{"input": "", **e} for e in entries]
    assert data.train_data + data.test_data + data.val_data == expected
    assert data.data_name == "mine"

    json_path = tmp_path / "mine.json"  # a JSON list may leave inputs out too
    json_path.write_text(json.dumps(entries), encoding="utf-8")
    assert prepared(json_path, tmp_path).train_data == data.train_data

    path.write_text(json.dumps(entries[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(BadInputError, match=r"mine.jsonl: line 2 is not valid JSON Lines"):
        prepared(path, tmp_path)
    path.write_text(json.dumps(entries[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(BadInputError, match=r"mine.jsonl: entry 1 has no 'output' key"):
        prepared(path, tmp_path)


def test_split_fractions_and_shuffled_split(instruction_data, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(instruction_data[:40]), encoding="utf-8")
    chapter = prepared(path, tmp_path)  # the defaults: the chapter's 85/10/5, in order
    train, test, val = split_data(instruction_data[:40])
    assert (chapter.train_data, chapter.test_data, chapter.val_data) == (train, test, val)

    data = prepared(path, tmp_path, val_fraction=0.2, test_fraction=0.1)
    assert (len(data.train_data), len(data.test_data), len(data.val_data)) == (28, 4, 8)
    assert data.train_data == instruction_data[:28] and data.val_data == instruction_data[32:40]

    shuffled = prepared(path, tmp_path, shuffle_split=5)
    order = list(instruction_data[:40])
    random.Random(5).shuffle(order)
    assert shuffled.train_data + shuffled.test_data + shuffled.val_data == order
    assert shuffled.train_data != chapter.train_data

    for val, test in ((0, 0.1), (0.5, 0.5), (0.1, -0.1)):
        with pytest.raises(BadInputError, match="must be greater than 0|must each be above 0 and "
                                                "add up to less than 1"):
            prepared(path, tmp_path, val_fraction=val, test_fraction=test)


def test_default_split_is_the_chapters_on_the_full_dataset(instruction_data):
    config = FinetuneConfig()
    assert [len(part) for part in split_entries(instruction_data, config)] == [935, 110, 55]
    assert split_entries(instruction_data, config) == split_data(instruction_data)
