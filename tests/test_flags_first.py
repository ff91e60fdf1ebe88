"""Every flag of every command is checked before any work (issue 24, item 3).

Each bad flag or file is one line `error: ...` with exit code 2, and nothing happens first: no
model loads (the command's "Loaded ..." line never comes), no request reaches a loopback hub
or Ollama that records them, no output file is written. One check per command runs as a real
process; the others call the command's `main(argv)` in this process (each process costs
seconds of imports).
"""

import json
import math
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR
from fake_ollama import FakeOllama
from loopback_server import free_port, serving
from test_ollama_evaluate import WITHOUT_TORCH

from instructkit.checkpoints import save_checkpoint
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.model_files import ModelFileError, first_line, read_state_dict
from instructkit.safe_files import save_state_dict, write_json
from previous_chapters import GPTModel


def run(module, *args, env=None, script=None):
    """`python -m module args` (or `python script args`) from the repository root."""
    command = [sys.executable, script] if script else [sys.executable, "-m", module]
    return subprocess.run([*command, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def one_line(text):
    """The single line a command printed: fails when it printed more (or a traceback)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The tiny GPT saved as a finetuned model, without a run record (shapes give the config)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("model") / "tiny-sft.pth"
    save_state_dict(GPTModel(TEST_MODE_CONFIG).state_dict(), path)
    return path


@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "cut-off.pth"  # what a full disk or an interrupted copy leaves
    path.write_bytes(b"")
    return path


def main_of(module, capsys, *args):
    """module.main(argv) in this process: (exit code, stdout, stderr)."""
    code = module.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


#####################################
# Model files: empty, a folder, cut off
#####################################

def test_an_empty_or_cut_off_model_file_is_named_not_an_index_error(tmp_path, empty_file):
    with pytest.raises(ModelFileError) as excinfo:
        read_state_dict(empty_file)
    assert str(excinfo.value) == (
        f"The model file {empty_file} is empty (0 bytes): a copy or a save that was cut off (a "
        f"full disk, say) leaves such a file. Save or copy it again.")

    # A file cut off after two bytes: torch.load raises an EOFError without a message, which
    # the message used to take the first line of (an IndexError).
    cut = tmp_path / "cut.pt"
    cut.write_bytes(b"\x80\x02")
    with pytest.raises(ModelFileError) as excinfo:
        read_state_dict(cut)
    assert str(excinfo.value) == (
        f"The model file {cut} could not be read by torch.load (EOFError) (it is named cut.pt, "
        f"not *.pth). Is it a PyTorch .pth file, saved whole?")
    assert first_line(ValueError("first\nsecond")) == "ValueError: first"

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a.pth").write_bytes(b"x")
    with pytest.raises(ModelFileError) as excinfo:
        read_state_dict(folder)
    assert str(excinfo.value) == (f"The model file {folder} is a folder, not a .pth file: pass "
                                  f"a file in it (it holds a.pth)")


def test_chat_refuses_an_empty_model_file_in_one_line(empty_file):
    result = run("instructkit.chat", empty_file, "Hi", "--device", "cpu")
    assert result.returncode == 2
    assert one_line(result.stderr) == (
        f"error: The model file {empty_file} is empty (0 bytes): a copy or a save that was cut "
        f"off (a full disk, say) leaves such a file. Save or copy it again.")
    assert result.stdout == ""


def test_web_chat_refuses_an_empty_model_or_comparison_before_loading(model_file, empty_file,
                                                                       capsys):
    pytest.importorskip("gradio")
    from instructkit import web_chat

    message = ("is empty (0 bytes): a copy or a save that was cut off (a full disk, say) leaves "
               "such a file. Save or copy it again.")
    code, out, err = main_of(web_chat, capsys, empty_file, "--device", "cpu")
    assert (code, out) == (2, "")
    assert one_line(err) == f"error: The model file {empty_file} {message}"
    # The comparison is checked before the first model loads
    code, out, err = main_of(web_chat, capsys, model_file, "--compare", empty_file)
    assert (code, out) == (2, "")
    assert one_line(err) == f"error: The model file to compare with {empty_file} {message}"


def test_dpo_refuses_an_empty_sft_model_before_any_work(empty_file, tmp_path, capsys):
    from instructkit import dpo_train

    out_dir = tmp_path / "out"
    code = dpo_train.cli(["--sft-model", str(empty_file), "--output-dir", str(out_dir),
                          "--tokenizer-dir", str(TOKENIZER_DIR)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_line(err) == (
        f"error: The finetuned model file {empty_file} is empty (0 bytes): a copy or a save that "
        f"was cut off (a full disk, say) leaves such a file. Save or copy it again.")
    assert not out_dir.exists()


def test_a_run_record_that_cannot_build_a_model_is_one_line(model_file, tmp_path, capsys):
    """A model_config whose width does not split into its heads was an AssertionError in the
    model's constructor (a traceback naming no file)."""
    from instructkit import chat

    path = tmp_path / "odd.pth"
    path.write_bytes(model_file.read_bytes())
    write_json(tmp_path / "odd.run.json", {"model_config": {**TEST_MODE_CONFIG, "n_heads": 5}})
    code, out, err = main_of(chat, capsys, path, "Hi", "--device", "cpu")
    assert (code, out) == (2, "")
    assert one_line(err) == (f"error: The run record of {path} says emb_dim 64 and n_heads 5, "
                             f"which do not divide: fix or delete it")


#####################################
# The chat's numbers
#####################################

def test_chat_refuses_a_negative_temperature_before_loading(model_file):
    result = run("instructkit.chat", model_file, "Hi", "--temperature", "-1", "--device", "cpu")
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == "error: --temperature must be at least 0 (got -1.0)"


@pytest.mark.parametrize("flags, line", [
    (("--temperature", "nan"), "--temperature must be a finite number (got nan)"),
    (("--temperature", "inf"), "--temperature must be a finite number (got inf)"),
    (("--batch-size", "0"), "--batch-size must be at least 1 (got 0)"),
    (("--top-k", "-1"), "--top-k must be at least 0 (got -1)"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1 (got 0)"),
    (("--seed", "-3"), "--seed must be between 0 and 18446744073709551615 (got -3)"),
])
def test_chat_refuses_numbers_out_of_range(tmp_path, capsys, flags, line):
    """Checked before the model file: a missing one is not what the message is about."""
    from instructkit import chat

    code, out, err = main_of(chat, capsys, tmp_path / "no-model.pth", "Hi", *flags)
    assert (code, out) == (2, "")
    assert one_line(err) == f"error: {line}"


def test_chat_refuses_top_k_above_the_vocabulary_before_generating(model_file, capsys):
    from instructkit import chat

    code, out, err = main_of(chat, capsys, model_file, "Hi", "--top-k", "50258",
                             "--temperature", "1", "--device", "cpu")
    assert (code, out) == (2, "")  # no answer began
    assert one_line(err) == ("error: --top-k 50258 is more than the model's vocabulary of 50257 "
                             "tokens: use at most 50257 (0 samples from all)")
    # the vocabulary itself is fine: one token stays, the greedy one
    code, out, err = main_of(chat, capsys, model_file, "Hi", "--top-k", "50257", "--temperature",
                             "1", "--max-new-tokens", "2", "--seed", "1", "--device", "cpu")
    assert code == 0, err


#####################################
# The web chat's port
#####################################

def test_web_chat_refuses_a_port_in_use_before_loading(model_file):
    pytest.importorskip("gradio")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("instructkit.web_chat", model_file, "--port", port, "--device", "cpu")
    assert result.returncode == 2 and result.stdout == ""
    assert one_line(result.stderr) == (
        f"error: --port {port} is in use on 127.0.0.1 (another program, or another web chat, "
        f"listens there): choose another --port, or leave --port out to take the first free "
        f"one from 7860")


@pytest.mark.parametrize("flags, line", [
    (("--port", "0"), "--port must be between 1 and 65535 (got 0)"),
    (("--port", "65536"), "--port must be between 1 and 65535 (got 65536)"),
    (("--host", "no-such-host.invalid", "--port", "7860"),
     "--host no-such-host.invalid is no address of this machine"),
])
def test_web_chat_refuses_a_bad_port_or_host(model_file, capsys, flags, line):
    pytest.importorskip("gradio")
    from instructkit import web_chat

    code, out, err = main_of(web_chat, capsys, model_file, *flags)
    assert (code, out) == (2, "")
    assert one_line(err).startswith(f"error: {line}")


def test_a_free_port_passes():
    from instructkit.web_chat import check_port

    port = free_port()
    assert check_port("127.0.0.1", port) == port


#####################################
# DPO
#####################################

def dpo_args(sft, out_dir, *extra):
    return ["--test-mode", "--sft-model", str(sft), "--output-dir", str(out_dir),
            "--tokenizer-dir", str(TOKENIZER_DIR), *map(str, extra)]


def test_dpo_refuses_beta_0_before_any_work(model_file, tmp_path):
    out_dir = tmp_path / "out"
    result = run("instructkit.dpo_train", *dpo_args(model_file, out_dir, "--beta", "0"))
    assert result.returncode == 2 and result.stdout == ""  # no "Preference data: ..."
    assert one_line(result.stderr) == "error: --beta must be greater than 0 (got 0.0)"
    assert not out_dir.exists()


@pytest.mark.parametrize("flags, line", [
    (("--beta", "-0.1"), "--beta must be greater than 0 (got -0.1)"),
    (("--beta", "nan"), "--beta must be a finite number (got nan)"),
    (("--batch-size", "0"), "--batch-size must be at least 1 (got 0)"),
    (("--epochs", "0"), "--epochs must be at least 1 (got 0)"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1 (got 0)"),
    (("--keep", "0"), "--keep must be at least 1 (got 0)"),
    (("--lr=-1e-5",), "--lr must be at least 0 (got -1e-05)"),
])
def test_dpo_refuses_numbers_out_of_range(model_file, tmp_path, capsys, flags, line):
    from instructkit import dpo_train

    out_dir = tmp_path / "out"
    code = dpo_train.cli(dpo_args(model_file, out_dir, *flags))
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert one_line(err) == f"error: {line}"
    assert not out_dir.exists()


def save_training_checkpoint(path, identity):
    """A real checkpoint file (checkpoints.save_checkpoint) with `identity`."""
    model = torch.nn.Linear(2, 2)
    progress = {"epoch": 0, "position": 1, "epoch_seed": 1, "step": 1, "tokens_seen": 8,
                "wall_seconds": 1.0}
    return save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), progress, [],
                           identity)


def finetuning_identity(**settings):
    from instructkit.finetune_config import FinetuneConfig
    from instructkit.finetune_files import checkpoint_identity

    return checkpoint_identity(FinetuneConfig(**settings), "0" * 64)


def test_dpo_resume_checked_before_any_work(model_file, tmp_path, capsys):
    from instructkit import dpo_train

    out_dir = tmp_path / "out"
    missing = tmp_path / "nope.pth"
    assert dpo_train.cli(dpo_args(model_file, out_dir, "--resume", missing)) == 2
    out, err = capsys.readouterr()
    assert out == "" and one_line(err).startswith(f"error: --resume {missing}: no such checkpoint")

    finetuning = save_training_checkpoint(tmp_path / "ft-step0000001.pth",
                                          finetuning_identity(test_mode=True))
    assert dpo_train.cli(dpo_args(model_file, out_dir, "--resume", finetuning)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == (
        f"error: {finetuning} is a checkpoint of another command (finetuning, python "
        f"gpt_instruction_finetuning.py, by its settings), not of this one: resume it with "
        f"that command, or pass one of this command's checkpoints")

    # A DPO checkpoint of another beta: refused naming it, before the model loads
    config = dpo_train.DPOConfig(**{**vars(dpo_train.build_arg_parser().parse_args(
        dpo_args(model_file, out_dir))), "beta": 0.5})
    other = save_training_checkpoint(tmp_path / "dpo-step0000001.pth",
                                     dpo_train.checkpoint_identity(config, TEST_MODE_CONFIG, "x"))
    assert dpo_train.cli(dpo_args(model_file, out_dir, "--resume", other)) == 2
    out, err = capsys.readouterr()
    assert out == "" and "config.beta: 0.5 in the checkpoint, 0.1 now" in err
    assert not out_dir.exists()


#####################################
# Finetuning: --resume before the weights download
#####################################

@pytest.fixture
def small_data(tmp_path, shared_data):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(json.loads((shared_data / "instruction-data.json").read_text(
        encoding="utf-8"))[:40]), encoding="utf-8")
    return path


def test_finetuning_resume_is_checked_before_the_weights_download(tmp_path, small_data):
    """gpt2-small's weights are not on disk: the download would ask the hub (HF_ENDPOINT, a
    loopback server that records every request), but the missing checkpoint comes first."""
    import os

    missing = tmp_path / "out" / "checkpoints" / "nope.pth"
    with serving({}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url}
        result = run(None, "--model", "gpt2-small", "--models-dir", tmp_path / "gpt2",
                     "--data", small_data, "--output-dir", tmp_path / "out", "--device", "cpu",
                     "--resume", missing, script="gpt_instruction_finetuning.py", env=env)
        assert hub.requests == []
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (
        f"error: --resume {missing}: no such checkpoint. Pass a file of "
        f"{tmp_path / 'out' / 'checkpoints'} (gpt2-small124M-sft-data-step*.pth), or --resume alone "
        f"for the newest")
    assert not (tmp_path / "gpt2" / "124M").exists()


def test_finetuning_refuses_a_dpo_or_empty_checkpoint_before_downloads(tmp_path, small_data,
                                                                        model_file):
    from instructkit import dpo_train
    from instructkit.finetune_config import FinetuneConfig
    from instructkit.finetune_run import FinetuneRun
    from instructkit.preflight import CheckpointError

    def settings(resume):
        return FinetuneConfig(model="gpt2-small", data=str(small_data), device="cpu",
                              models_dir=str(tmp_path / "gpt2"), output_dir=str(tmp_path / "out"),
                              resume=str(resume))

    dpo_config = dpo_train.DPOConfig(sft_model=str(model_file))
    dpo = save_training_checkpoint(tmp_path / "dpo-step0000001.pth",
                                   dpo_train.checkpoint_identity(dpo_config, TEST_MODE_CONFIG, "x"))
    with pytest.raises(CheckpointError) as excinfo:
        FinetuneRun(settings(dpo))
    assert str(excinfo.value) == (
        f"{dpo} is a checkpoint of another command (DPO, python -m instructkit.dpo_train, by "
        f"its settings), not of this one: resume it with that command, or pass one of this "
        f"command's checkpoints")

    empty = tmp_path / "empty-step0000001.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\): a save that was cut off"):
        FinetuneRun(settings(empty))

    # one of this command's, of another learning rate: its settings are named
    other = save_training_checkpoint(tmp_path / "ft-step0000001.pth", finetuning_identity(
        model="gpt2-small", data=str(small_data), lr=1e-4))
    with pytest.raises(CheckpointError, match=r"config.lr: 0.0001 in the checkpoint, 5e-05 now"):
        FinetuneRun(settings(other))
    assert not (tmp_path / "gpt2" / "124M").exists()


def test_finetuning_refuses_a_tokenizer_dir_without_the_files(tmp_path, small_data):
    from instructkit.finetune_config import FinetuneConfig
    from instructkit.finetune_run import FinetuneRun
    from instructkit.preflight import PreflightError

    config = FinetuneConfig(model="gpt2-small", data=str(small_data), device="cpu",
                            models_dir=str(tmp_path / "gpt2"), output_dir=str(tmp_path / "out"),
                            tokenizer_dir=str(tmp_path))
    with pytest.raises(PreflightError) as excinfo:
        FinetuneRun(config)
    assert str(excinfo.value) == (f"--tokenizer-dir {tmp_path} holds neither encoder.json + "
                                  f"vocab.bpe nor vocab.json + merges.txt (GPT-2's tokenizer "
                                  f"files)")


#####################################
# The judge and the preference data
#####################################

def entries_file(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi.",
                                 "model_response": "Hello."}]), encoding="utf-8")
    return path


def test_judge_refuses_a_folder_as_scores_file_before_asking_the_server(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    with FakeOllama() as server:
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, "ollama_evaluate.py", "--file_path",
             str(entries_file(tmp_path)), "--host", server.host, "--scores-out", str(folder)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert server.requests == []
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"error: --scores-out {folder} is a folder, where a file "
                                       f"is to be written: move it away or choose another "
                                       f"--scores-out")


@pytest.mark.parametrize("value", ["inf", "nan", "86401"])
def test_judge_timeout_must_be_a_finite_number_of_seconds(value):
    import argparse

    from instructkit.judge_cli import add_evaluate_arguments

    parser = add_evaluate_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as excinfo:
        parser.parse_args(["--timeout", value])
    assert excinfo.value.code == 2
    assert math.isfinite(parser.parse_args(["--timeout", "86400"]).timeout)


def test_preference_data_refuses_an_output_under_a_file_before_asking(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    with FakeOllama() as server:
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, "instructkit/make_preference_data.py",
             "--file_path", str(entries_file(tmp_path)), "--host", server.host, "--output",
             str(blocker / "prefs.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert server.requests == []
    assert (result.returncode, result.stdout) == (2, "")
    assert one_line(result.stderr) == (f"error: --output {blocker / 'prefs.json'} cannot be "
                                       f"written: {blocker} is a file, not a folder")

    # and a folder where its progress file goes, in this process
    from instructkit import make_preference_data

    output = tmp_path / "prefs.json"
    (tmp_path / "prefs-progress.json").mkdir()
    with FakeOllama() as server:
        code, out, err = main_of(make_preference_data, capsys, "--file_path",
                                 entries_file(tmp_path), "--host", server.host, "--output", output)
        assert server.requests == []
    assert (code, out) == (2, "")
    assert one_line(err) == (f"error: the progress file of --output, "
                             f"{tmp_path / 'prefs-progress.json'} is a folder, where a file is "
                             f"to be written: move it away or choose another --output")
