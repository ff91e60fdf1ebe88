"""The command line against bad input, full disks and interruptions (issue 16), as a user meets them.

Each numbered case of the issue is `python gpt_instruction_finetuning.py --test_mode ...`
offline: the exit code, one line naming the problem, no traceback, and for the cases that
used to lose work, the work on disk. Signals, a terminal and a killed process need a real
subprocess; the other cases run the same command line in this process
(cli_in_process.run_finetune), which spares each of them seconds of imports.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import interrupting
import pytest
import torch
from cli_in_process import run_finetune
from conftest import ROOT, TOKENIZER_DIR
from loopback_server import closed_port_url, serving
from portable import (
    WINDOWS,
    import_or_skip,
    is_root,
    killed_returncode,
    needs_sigterm,
    send_interrupt,
    send_sigterm,
)
from small_disk import small_tmpfs, unwritable_folder

from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from previous_chapters import GPTModel

SCRIPT = ROOT / "gpt_instruction_finetuning.py"
MODEL = "gpt2-medium355M-sft-test.pth"
ANSWERS = "instruction-data-with-response-test.json"
PLOT = "loss-plot-test.pdf"
METRICS = "gpt2-medium355M-sft-test.metrics.jsonl"
RECORD = "gpt2-medium355M-sft-test.run.json"


@pytest.fixture
def data(tmp_path, shared_data):
    """A copy of the chapter's dataset, under its own name (so the outputs have the usual names)."""
    return shutil.copyfile(shared_data / "instruction-data.json", tmp_path / "instruction-data.json")


def command(data, output_dir, *extra):
    """The issue's reproduction: test mode, 4 new tokens, 1 epoch (later flags win)."""
    return [sys.executable, "-u", str(SCRIPT), "--test_mode", "--data", str(data),
            "--tokenizer-dir", str(TOKENIZER_DIR), "--max-new-tokens", "4", "--epochs", "1",
            "--output-dir", str(output_dir), *extra]


USUAL_UMASK = 0o022  # the child's umask, so the modes written are known (ignored on Windows)


def run(*args):
    """`command(*args)`, run in this process (cli_in_process.py), under the usual umask."""
    return run_finetune(*command(*args)[3:], umask=USUAL_UMASK)  # after python, -u and the script


def run_and_act(tmp_path, data, output_dir, *extra, markers, act, stderr_marker=None):
    """interrupting.run_and_act on the finetuning command, with the usual umask."""
    return interrupting.run_and_act(command(data, output_dir, *extra), tmp_path / "stderr",
                                    markers, act, stderr_marker, umask=USUAL_UMASK)


def assert_one_line_error(proc, code, message):
    """Exit `code`, exactly `error: message` on stderr, no traceback, no training started."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert "Initial losses" not in proc.stdout


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}


def usual_modes(names):
    """What `modes` gives for files written under umask 022: 0o644; on Windows, whose files
    have no such modes, whatever they have (their names are still compared)."""
    return {name: stat.S_IMODE(0o666 if WINDOWS else 0o644) for name in names}


########################################################################################
# 1. The output folder is checked before training
########################################################################################

def test_case1_output_dir_that_is_a_file(tmp_path, data):
    afile = tmp_path / "afile"
    afile.touch()
    proc = run(data, afile)
    assert_one_line_error(proc, 2, f"--output-dir {afile} is a file, not a folder: choose another "
                                   f"--output-dir")


def test_case1_output_dir_that_cannot_be_written(tmp_path, data):
    with unwritable_folder(tmp_path / "locked") as folder:
        proc = run(data, folder)
    reason = "Read-only file system" if is_root() else "Permission denied"
    assert_one_line_error(proc, 2, f"--output-dir {folder} is not writable ({reason}): choose "
                                   f"another --output-dir or fix its permissions")


def test_case1_a_full_disk_is_found_before_training(tmp_path, data):
    with small_tmpfs(tmp_path / "disk", size="4m") as disk:
        proc = run(data, disk)
        assert list(disk.iterdir()) == []
    assert_one_line_error(proc, 2, (
        f"not enough free disk space in {disk}: the finetuned model (26.7 MB), the answers and "
        f"the plot (1.3 MB) need about 29.4 MB, 4.2 MB is free; free some space or choose "
        f"another --output-dir"))


def fill_up(folder):
    """Write zeros into `folder` until its disk is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_case1_disk_filling_up_during_training(tmp_path, data, debug):
    """Room enough at the start; another program fills the disk while training runs. The save
    fails with one line naming the file (--debug adds the traceback)."""
    with small_tmpfs(tmp_path / "disk", size="40m") as disk:
        code, err = run_and_act(tmp_path, data, disk, *(["--debug"] if debug else []),
                                markers=["Ep 1 (Step"], act=lambda _: fill_up(disk))
        # no half model, no temporary file; the metrics file was written during training,
        # under the name of a run whose model is not saved
        assert sorted(p.name for p in disk.iterdir()) == ["filler", METRICS + ".partial"]
    assert code == 1
    line = (f"error: no space left on the disk while writing {disk / MODEL} (nothing was "
            f"written): free some space and run again; run again with --debug to see the traceback")
    assert err.strip().splitlines()[-1] == line
    assert ("Traceback" in err) is debug


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "disk_size", "what", "first_file"), [
    ((), "40m", "The trained model", MODEL),
    # The finished run's checkpoint is written first, before the model; the preflight wants
    # room for 4 checkpoints of about 80 MB (weights and AdamW's moments). 4 epochs (20 steps):
    # training goes on long after the first line, while the 400 MB disk is filled.
    (("--save-every", "1000", "--epochs", "4"), "400m", "The training state",
     "checkpoints/gpt2-medium355M-sft-test-step0000020.pth"),
])
def test_case1_full_disk_at_a_terminal_waits_for_space_and_keeps_the_model(
        tmp_path, data, extra, disk_size, what, first_file):
    """At a terminal (a real pty as stdin) the trained model is not lost: the command says the
    disk is full, waits, and writes the files once space is freed and Enter pressed."""
    pty = import_or_skip("pty")
    with small_tmpfs(tmp_path / "disk", size=disk_size) as disk:
        terminal, user_side = pty.openpty()
        try:
            def free_space_and_press_enter(proc):
                fill_up(disk)
                while "press Enter to write it again" not in (tmp_path / "stderr").read_text():
                    assert proc.poll() is None, "the command ended without waiting for space"
                    time.sleep(0.05)
                (disk / "filler").unlink()
                os.write(terminal, b"\n")

            code, err = interrupting.run_and_act(
                command(data, disk, *extra), tmp_path / "stderr", ["Ep 1 (Step"], free_space_and_press_enter,
                stdin=user_side, umask=USUAL_UMASK)
        finally:
            os.close(terminal)
            os.close(user_side)
        assert code == 0, err
        assert (f"error: no space left on the disk while writing {disk / first_file} (nothing "
                f"was written): free some space and run again.") in err.splitlines()
        assert (f"{what} is still in memory: free some space on that disk, then press Enter to "
                f"write it again (Ctrl-D or Ctrl-C gives up).") in err.splitlines()
        GPTModel(TEST_MODE_CONFIG).load_state_dict(
            torch.load(disk / MODEL, map_location="cpu", weights_only=True))
        assert {MODEL, RECORD, METRICS} <= set(p.name for p in disk.iterdir())
        assert (disk / first_file).is_file()


########################################################################################
# 2. --epochs 0 replaces no finetuned model
########################################################################################

@pytest.mark.slow
def test_case2_epochs_0_writes_under_another_name(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {MODEL: b"the finetuned model", ANSWERS: b"[]", PLOT: b"%PDF the plot"}
    for name, content in earlier.items():
        (out / name).write_bytes(content)

    proc = run(data, out, "--epochs", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("Note: --epochs 0 trains nothing, so the outputs carry '-untrained' in their names "
            "(gpt2-medium355M-sft-test-untrained.pth, ...) and replace no finetuned model."
            ) in proc.stdout.splitlines()
    for name, content in earlier.items():
        assert (out / name).read_bytes() == content
    new = {"gpt2-medium355M-sft-test-untrained.pth", "gpt2-medium355M-sft-test-untrained.run.json",
           "gpt2-medium355M-sft-test-untrained.metrics.jsonl",
           "instruction-data-with-response-test-untrained.json"}
    assert set(modes(out)) == set(earlier) | new
    # 8. Files written through a temporary file get the usual mode (0o644 under umask 022).
    assert {name: mode for name, mode in modes(out).items() if name in new} == usual_modes(new)
    assert len(json.loads((out / "instruction-data-with-response-test-untrained.json").read_text())) == 10


########################################################################################
# 3. Ctrl-C while answering keeps the finished training
########################################################################################

@pytest.mark.slow
def test_case3_ctrl_c_while_answering_keeps_the_trained_model(tmp_path, data):
    out = tmp_path / "out"
    # 100,000 new tokens for each answer: answering takes far longer than the signal
    code, err = run_and_act(tmp_path, data, out, "--max-new-tokens", "100000",
                            markers=["Plot saved as"], stderr_marker="Generating responses",
                            act=send_interrupt)
    assert code == 130
    assert "Traceback" not in err
    assert (f"Answering the test set interrupted: saved the finetuned model ({out / MODEL}), the "
            f"run record ({out / RECORD}), the loss plot ({out / PLOT}); not saved: the test "
            f"answers.") in err.splitlines()
    # The work is on disk: a whole, loadable model, the plot and the run record, all with the
    # usual mode (the metrics file is appended to during training).
    assert modes(out) == usual_modes([MODEL, PLOT, RECORD, METRICS])
    GPTModel(TEST_MODE_CONFIG).load_state_dict(
        torch.load(out / MODEL, map_location="cpu", weights_only=True))
    assert (out / PLOT).read_bytes().startswith(b"%PDF")


########################################################################################
# 4. Numeric flags are checked before anything is built
########################################################################################

@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch-size", "0", "--batch-size must be at least 1 (got 0)"),
    ("--max-length", "0", "--max-length must be at least 1 (got 0)"),
    ("--lr", "-1", "--lr must be greater than 0 (got -1.0)"),
])
def test_case4_numeric_flags_out_of_range(tmp_path, data, flag, value, message):
    out = tmp_path / "out"
    proc = run(data, out, flag, value)
    assert_one_line_error(proc, 2, message)
    assert "Training set length" not in proc.stdout  # before even the data
    assert not out.exists()


########################################################################################
# 5. The data loader's holes: clear errors before anything is built, a BOM accepted
########################################################################################

def test_case5_bytes_that_are_not_utf8(tmp_path, data):
    text = data.read_bytes()
    offset = text.index(b"Convert")
    bad = tmp_path / "latin1.json"
    bad.write_bytes(text[:offset] + b"\xe9" + text[offset:])  # an "é" as Latin-1 writes it
    proc = run(bad, tmp_path / "out")
    assert_one_line_error(proc, 2, f"{bad}: not UTF-8 text (byte 0xe9 at offset {offset}); save "
                                   f"it as UTF-8")


def test_case5_data_naming_a_folder(tmp_path, data):
    proc = run(tmp_path, tmp_path / "out")
    assert_one_line_error(proc, 2, f"{tmp_path} is a folder, not a data file: name the JSON file "
                                   f"inside it")


def test_case5_a_utf8_bom_is_accepted(tmp_path, data):
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())  # as Windows editors save it
    code, err = run_and_act(tmp_path, data, tmp_path / "out", markers=["Training set length: 10"],
                            act=lambda proc: proc.kill())  # loaded and validated: enough
    assert code == killed_returncode() and "error" not in err


def test_case5_an_html_page_is_never_saved_as_the_dataset(tmp_path):
    target = tmp_path / "instruction-data.json"
    with serving({"/data.json": b"<!DOCTYPE html><html><body>Sign in</body></html>"}) as server:
        proc = run(target, tmp_path / "out", "--data-url", f"{server.url}/data.json")
    assert proc.returncode == 1  # a network problem (issue 24): a captive portal, a login page
    assert "Traceback" not in proc.stderr
    assert (f"error: {server.url}/data.json answered with an HTML page (a captive portal, a login "
            "page or a proxy's error?) instead of instruction-data.json") in proc.stderr
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


########################################################################################
# 7. A checkpoint folder of another size is found before any download
########################################################################################

@pytest.mark.parametrize("command", [[str(SCRIPT)], ["-m", "instructkit.dpo_train"]],
                         ids=["finetune", "dpo"])
def test_tokenizer_that_cannot_be_fetched_is_one_line(tmp_path, shared_data, command):
    """Offline without --tokenizer-dir: tiktoken's fetch fails (here at a proxy on a closed
    loopback port, so nothing leaves the machine), and both commands say what to pass."""
    data = shared_data / ("instruction-data.json" if command == [str(SCRIPT)]
                          else "instruction-data-with-preference.json")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
           "HTTPS_PROXY": closed_port_url(), "https_proxy": closed_port_url()}
    env.pop("NO_PROXY", None), env.pop("no_proxy", None)
    proc = subprocess.run([sys.executable, *command, "--test_mode", "--data", str(data),
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: tiktoken could not download GPT-2's vocabulary (")
    assert line.endswith("Connect to the internet once, or pass a folder holding encoder.json "
                         "and vocab.bpe (--tokenizer-dir).")


def test_case7_checkpoint_folder_of_another_size(tmp_path, data):
    models = tmp_path / "gpt2"
    (models / "355M").mkdir(parents=True)
    hparams = models / "355M" / "hparams.json"
    hparams.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12,
                                   "n_layer": 12}))  # 124M's
    proc = run_finetune("--model", "gpt2-medium", "--models-dir", models, "--data", data,
                        "--output-dir", tmp_path / "out", "--tokenizer-dir", TOKENIZER_DIR)
    assert_one_line_error(proc, 2, (
        f"{hparams} says n_embd 768, n_layer 12, n_head 12 (gpt2-small), but gpt2-medium was "
        f"chosen: choose gpt2-small, or delete that folder to download gpt2-medium"))
    assert [p.name for p in (models / "355M").iterdir()] == ["hparams.json"]  # nothing fetched


########################################################################################
# 8. SIGTERM says what was saved
########################################################################################

@pytest.mark.slow
@needs_sigterm
def test_case8_sigterm_during_training_saves_a_checkpoint_and_says_how_to_resume(tmp_path, data):
    out = tmp_path / "out"
    code, err = run_and_act(tmp_path, data, out, "--epochs", "10000", markers=["Ep 1 (Step"],
                            act=send_sigterm)
    assert code == 143
    assert "Traceback" not in err
    assert "SIGTERM: stopping after this step to save a checkpoint" in err
    saved, how = err.strip().splitlines()[-2:]
    checkpoints = sorted((out / "checkpoints").glob("*.pth"))
    assert len(checkpoints) == 1
    assert saved.startswith(f"Training interrupted: saved a checkpoint ({checkpoints[0]}); "
                            "not saved: the finetuned model")
    assert f"--resume {checkpoints[0]}" in how


########################################################################################
# A second Ctrl-C during a checkpoint write names the checkpoints saved before (issue 24)
########################################################################################

@pytest.mark.slow
def test_a_second_ctrl_c_while_a_checkpoint_is_written_names_the_latest_checkpoint(tmp_path, data):
    out, stderr = tmp_path / "out", tmp_path / "stderr"
    checkpoints = out / "checkpoints"

    code, err = run_and_act(
        tmp_path, data, out, "--epochs", "10000", "--save-every", "1",
        markers=["Ep 1 (Step 000000)"],
        act=interrupting.twice_during_a_checkpoint_write(checkpoints, stderr))
    step, newest = interrupting.checkpoint_cut_by_a_second_ctrl_c(code, err, checkpoints)
    saved, how = err.strip().splitlines()[-2:]
    assert saved == (f"Training interrupted: saved the checkpoint of step {step} ({newest}); not "
                     f"saved: the finetuned model, the loss plot, the test answers, the run record.")
    assert how == (f"To continue, run the same command with --resume (it takes this run's "
                   f"checkpoint of the highest step in {checkpoints}) or with --resume {newest}.")


########################################################################################
# In process: the order of the saves, LoRA included
########################################################################################

def test_lora_run_saves_adapters_and_merged_model_before_answering(tmp_path, data, one_thread,
                                                                   capsys, monkeypatch):
    import gpt_instruction_finetuning as gif
    from instructkit import finetune_run
    from instructkit.finetune_config import FinetuneConfig

    model_there = []  # at each write of the run record: is the model saved yet?
    write = finetune_run.write_run_record

    def spy(model_path, record):
        model_there.append(model_path.exists())
        return write(model_path, record)

    monkeypatch.setattr(finetune_run, "write_run_record", spy)
    config = FinetuneConfig(test_mode=True, data=str(data), output_dir=str(tmp_path),
                            epochs=1, lora_rank=4, max_new_tokens=2, tokenizer_dir=str(TOKENIZER_DIR))
    result = gif.main(config=config)
    # no record before the model: an earlier model's record would otherwise name these adapters
    assert model_there and all(model_there)
    out = capsys.readouterr().out
    saves = [line.split(" saved as ")[0] for line in out.splitlines() if " saved as " in line]
    assert saves == ["LoRA adapters", "Model", "Plot", "Responses"]
    assert out.index("Plot saved as") < out.index("Model response:") < out.index(
        "Responses saved as")
    stem = "gpt2-medium355M-sft-lora4-test"
    assert {k: p.name for k, p in result["paths"].items()} == {
        "adapters": f"{stem}-adapters.pth", "model": f"{stem}.pth",
        "plot": "loss-plot-lora4-test.pdf", "responses": "instruction-data-with-response-lora4-test.json",
        "metrics": f"{stem}.metrics.jsonl", "run_record": f"{stem}.run.json"}
    # written again once the answers are saved: the record names every file
    record = json.loads(result["paths"]["run_record"].read_text())
    assert record["files"] == {k: p.name for k, p in result["paths"].items()}
    merged = torch.load(result["paths"]["model"], map_location="cpu", weights_only=True)
    GPTModel(TEST_MODE_CONFIG).load_state_dict(merged)  # a plain GPTModel: merged before saving
    adapters = torch.load(result["paths"]["adapters"], map_location="cpu", weights_only=True)
    assert adapters["lora_alpha"].item() == 4.0 and all(
        k.endswith((".lora.A", ".lora.B")) for k in adapters if k != "lora_alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["instruction-data.json", *(p.name for p in result["paths"].values())])
