"""The chapter as one command: `gpt_instruction_finetuning.main`, called as the book calls it
and with FinetuneConfig's flags, and `python gpt_instruction_finetuning.py` (and
`python -m instructkit.finetune`) in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_in_process import run_finetune
from conftest import ROOT, TOKENIZER_DIR

import gpt_instruction_finetuning as gif
from instructkit import devices, finetune_files
from instructkit.finetune_config import FinetuneConfig, build_arg_parser
from instructkit.finetune_run import FinetuneRun, describe_expected_cost
from instructkit.gpt2_sizes import TEST_MODE_CONFIG, gpt2_config
from instructkit.gpt2_tokenizer import TokenizerFilesError, get_tokenizer
from instructkit.instruction_data import DatasetError
from instructkit.safe_files import write_atomically
from previous_chapters import GPTModel

SCRIPT = ROOT / "gpt_instruction_finetuning.py"


def run_cli(*args, cwd, timeout=300):
    """`python gpt_instruction_finetuning.py *args` in `cwd`, a real subprocess."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def run_here(*args, cwd):
    """The same command line in this process (cli_in_process.py), for the checks that end it
    before any training: a subprocess would spend seconds on imports alone."""
    return run_finetune(*args, cwd=cwd)


def write_data(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_main_test_mode_end_to_end(tmp_path, shared_data, capsys):
    result = gif.main(config=FinetuneConfig(test_mode=True, data=shared_data / "instruction-data.json",
                                            output_dir=tmp_path, max_new_tokens=8))
    out = capsys.readouterr().out

    assert "Training set length: 10" in out and "Test set length: 10" in out
    assert "Device: cpu" in out
    assert "Test mode: training and answering take seconds." in out
    assert "Ep 1 (Step 000000): Train loss" in out
    assert len(result["train_losses"]) == len(result["val_losses"]) == len(result["tokens_seen"]) > 0
    assert result["train_losses"][-1] < result["initial_losses"][0]  # it learned something

    paths = result["paths"]
    assert paths["model"].name == "gpt2-medium355M-sft-test.pth"
    assert paths["responses"].name == "instruction-data-with-response-test.json"
    assert paths["plot"].read_bytes().startswith(b"%PDF")
    saved = json.loads(paths["responses"].read_text())
    assert len(saved) == 10 and all(isinstance(e["model_response"], str) for e in saved)
    assert [e["instruction"] for e in saved] == [e["instruction"] for e in result["responses"]]

    state = torch.load(paths["model"], map_location="cpu", weights_only=True)
    model = GPTModel(TEST_MODE_CONFIG)
    model.load_state_dict(state)  # strict: a whole, loadable checkpoint
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_command_line_test_mode(tmp_path, shared_data):
    proc = run_cli("--test_mode", "--data", str(shared_data / "instruction-data.json"),
                   "--output-dir", str(tmp_path / "out"), "--tokenizer-dir", str(TOKENIZER_DIR),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The book's printed lines, in the book's order (the model is saved before the answers)
    book_lines = ["torch version:", "Training set length: 10", "Validation set length: 10",
                  "Test set length: 10", "Device: cpu", "Loaded model: Small test model",
                  "Initial losses", "   Training loss: ", "   Validation loss: ",
                  "Ep 1 (Step 000000): Train loss", "Training completed in",
                  f"Model saved as {tmp_path / 'out' / 'gpt2-medium355M-sft-test.pth'}",
                  f"Plot saved as {tmp_path / 'out' / 'loss-plot-test.pdf'}",
                  "Generating responses", "Model response:", "Responses saved as "]
    positions = [next((i for i, line in enumerate(lines) if line.startswith(start)), None)
                 for start in book_lines]
    assert None not in positions, [s for s, i in zip(book_lines, positions, strict=True) if i is None]
    assert positions == sorted(positions)
    assert "Generating responses:" in proc.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpt2-medium355M-sft-test.metrics.jsonl", "gpt2-medium355M-sft-test.pth",
        "gpt2-medium355M-sft-test.run.json", "instruction-data-with-response-test.json",
        "loss-plot-test.pdf"]


def test_local_tokenizer_matches_tiktoken(instruction_data, tokenizer):
    local = get_tokenizer(TOKENIZER_DIR)
    for entry in instruction_data[::50]:
        text = gif.ALPACA.format_input(entry) + "\n\n### Response:\n" + entry["output"]
        assert local.encode(text) == tokenizer.encode(text)
    assert local.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]


def test_local_tokenizer_missing_files(tmp_path):
    with pytest.raises(TokenizerFilesError, match="neither encoder.json \\+ vocab.bpe nor vocab.json"):
        get_tokenizer(tmp_path)


def hub_server_files(tmp_path):
    """{url path: bytes} of a tiny GPT-2 in the "hub-openai" layout for 124M, and its arrays."""
    from hub_checkpoint import write_hub_model_folder

    from instructkit.hub import OPENAI_HUB_REPOS

    arrays = write_hub_model_folder(tmp_path / "served", TOKENIZER_DIR, n_ctx=8, n_layer=1)
    repo = OPENAI_HUB_REPOS["124M"]
    return {f"/{repo}/resolve/main/{name}": (tmp_path / "served" / name).read_bytes()
            for name in ("model.safetensors", "vocab.json", "merges.txt")}, arrays


def test_weights_download_first_then_the_tokenizer_from_their_files(tmp_path, data_file, monkeypatch,
                                                                    tokenizer):
    """--weights-source reaches the download (HF_ENDPOINT: a loopback hub); the tokenizer is
    built from the vocab.json and merges.txt it brought, not by tiktoken."""
    import tiktoken
    from loopback_server import serving

    files, _ = hub_server_files(tmp_path)
    # an output folder of the test's own: a FinetuneRun locks it until the process ends
    config = FinetuneConfig(model="gpt2-small", data=str(data_file), device="cpu",
                            models_dir=str(tmp_path / "gpt2"), weights_source="hub-openai",
                            output_dir=str(tmp_path / "out"))
    run = FinetuneRun(config)
    with serving(files) as httpd:
        monkeypatch.setenv("HF_ENDPOINT", httpd.url)
        local = run.tokenizer()
    assert httpd.paths() == list(files)  # the weights, then the two tokenizer files
    assert sorted(p.name for p in (tmp_path / "gpt2" / "124M").iterdir()) == [
        "merges.txt", "model.safetensors", "vocab.json"]
    assert local is not tiktoken.get_encoding("gpt2")
    text = gif.ALPACA.format_input(json.loads(data_file.read_text())[0])
    assert local.encode(text) == tokenizer.encode(text)
    assert run.download_weights() == tmp_path / "gpt2" / "124M"  # on disk now: no network

    # --tokenizer-dir wins, and then nothing is downloaded before the model is loaded
    other = FinetuneConfig(model="gpt2-small", data=str(data_file), device="cpu",
                           models_dir=str(tmp_path / "empty"), tokenizer_dir=str(TOKENIZER_DIR),
                           output_dir=str(tmp_path / "out-2"))
    FinetuneRun(other).tokenizer()  # (the preflight made the folder, to check it can write there)
    assert not any((tmp_path / "empty").rglob("*"))


def test_chapter_dataset_sources_and_checksum(tmp_path, shared_data):
    """Without --data: --data-url replaces the chapter dataset's sources, and the file must
    still have the chapter's sha256; a file of one's own is not checked."""
    from loopback_server import serving

    real = (shared_data / "instruction-data.json").read_bytes()
    other = json.dumps(json.loads(real)[:40]).encode()
    with serving({"/real.json": real, "/other.json": other}) as httpd:
        chapter = tmp_path / "instruction-data.json"
        entries = finetune_files.load_entries(chapter, FinetuneConfig(data_url=f"{httpd.url}/real.json"))
        assert len(entries) == 1100 and chapter.read_bytes() == real
        chapter.unlink()
        with pytest.raises(DatasetError, match="is not the known 7e09a9af.* of instruction-data.json"):
            finetune_files.load_entries(chapter, FinetuneConfig(data_url=f"{httpd.url}/other.json"))
        assert not chapter.exists()
        mine = tmp_path / "mine.json"
        config = FinetuneConfig(data=str(mine), data_url=f"{httpd.url}/other.json")
        assert len(finetune_files.load_entries(mine, config)) == 40


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"instruction": "x"}, "expected a JSON list of entries, got dict"),
        ([], "the list of entries is empty"),
        ([{"instruction": "a", "input": "", "output": "b"}, "text"],
         "entry 1 is not a JSON object (got str)"),
        ([{"instruction": "a", "input": "", "output": "b"}] * 3
         + [{"instruction": "a", "input": ""}], "entry 3 has no 'output' key"),
        ([{"instruction": "a", "input": None, "output": "b"}], "entry 0: 'input' must be a string"),
    ],
)
def test_bad_dataset_exits_2_with_message(tmp_path, data, message):
    path = write_data(tmp_path / "bad.json", data)
    proc = run_here("--test_mode", "--data", str(path), "--output-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.pth"))


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json", encoding="utf-8")
    proc = run_here("--test_mode", "--data", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "bad.json: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_here("--test_mode", "--data", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert proc.returncode == 2 and "nope.json does not exist" in proc.stderr


def test_too_few_entries_for_a_split(tmp_path, instruction_data):
    path = write_data(tmp_path / "few.json", instruction_data[:5])
    proc = run_here("--test_mode", "--data", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "split is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_model_and_unavailable_device(tmp_path, data_file):
    proc = run_here("--model", "gpt2-huge", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'gpt2-huge'" in proc.stderr
    with pytest.raises(ValueError, match="choose one of gpt2-small, gpt2-medium"):
        FinetuneConfig(model="gpt2-huge")
    with pytest.raises(ValueError, match=r"choose one of alpaca, phi3"):
        FinetuneConfig(prompt_style="chatml")
    assert FinetuneConfig(model="355M").model == "355M"  # any of gpt2_sizes' three names

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_here("--test_mode", "--data", str(data_file), "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert "CUDA was requested but is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_long_entries_are_truncated_with_a_warning(tmp_path, data_file, capsys):
    data = json.loads(data_file.read_text())
    data[0]["output"] = "word " * 400  # ~400 tokens, more than test mode's 256 context
    data[1]["input"] = "word " * 300
    path = write_data(tmp_path / "long.json", data)
    result = gif.main(config=FinetuneConfig(test_mode=True, data=path, output_dir=tmp_path,
                                            max_new_tokens=4))
    assert "Warning: 2 entries are longer than 256 tokens and were truncated." in capsys.readouterr().out
    # Another dataset than the chapter's: its name goes into the outputs' names.
    assert result["paths"]["model"].name == "gpt2-medium355M-sft-long-test.pth"
    assert result["paths"]["responses"].name == "instruction-data-with-response-long-test.json"


def test_write_atomically_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")

    def failing_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, failing_write)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_expected_cost_quotes_the_book_for_the_model_and_device(capsys):
    with torch.device("meta"):
        model = GPTModel(gpt2_config("gpt2-medium"))
    describe_expected_cost(model, "gpt2-medium", "cpu", num_epochs=2)
    out = capsys.readouterr().out
    assert "Parameters: 406,286,336 (406,286,336 trainable)" in out
    assert "about 6.5 GB" in out  # 4 bytes of weights + 12 of gradient and AdamW state each
    assert ("Expect about 15.8 min of training: the book's 2 epochs of gpt2-medium (355M) "
            "took 15.78 min") in out

    describe_expected_cost(model, "355M", "cuda", num_epochs=4)
    assert "Expect about 1.7 min" in capsys.readouterr().out


def test_the_parser_is_built_from_the_config():
    """Every FinetuneConfig field is a flag with the field's default; parsing gives a config."""
    from dataclasses import fields

    parser = build_arg_parser()
    parsed = vars(parser.parse_args([]))
    assert parsed.pop("debug") is False and FinetuneConfig(**parsed) == FinetuneConfig()
    flags = {a.dest: a for a in parser._actions if a.dest not in ("help", "debug")}
    assert set(flags) == {f.name for f in fields(FinetuneConfig)}
    for f in fields(FinetuneConfig):
        assert flags[f.name].help.startswith(f.metadata["help"])
    assert flags["test_mode"].option_strings == ["--test_mode", "--test-mode"]

    parsed = vars(parser.parse_args(
        ["--eval-freq", "3", "--eval-iter", "2", "--lora-rank", "8", "--lora-alpha", "16",
         "--prompt-style", "phi3", "--mask-instructions", "--test-mode", "--lr", "1e-4", "--debug"]))
    assert parsed.pop("debug") is True
    config = FinetuneConfig(**parsed)
    assert (config.eval_freq, config.eval_iter, config.lora_rank, config.lora_alpha) == (3, 2, 8, 16.0)
    assert (config.prompt_style, config.mask_instructions, config.test_mode) == ("phi3", True, True)
    assert config.lr == 1e-4 and config.epochs == 2 and config.model == "gpt2-medium"


def test_eval_flags_and_the_outputs_of_a_run(tmp_path, data_file, capsys):
    """--eval-freq and --eval-iter set the evaluation steps; main returns the model it trained
    and the files it wrote."""
    config = FinetuneConfig(test_mode=True, data=str(data_file), output_dir=str(tmp_path),
                            max_new_tokens=4, eval_freq=2, eval_iter=1, epochs=1)
    result = gif.main(config=config)
    out = capsys.readouterr().out
    assert "Training set length: 10" in out and "Validation set length: 2" in out
    assert "Test set length: 4" in out
    assert [line[:21] for line in out.splitlines() if line.startswith("Ep 1")] == [
        "Ep 1 (Step 000000): T", "Ep 1 (Step 000002): T", "Ep 1 (Step 000004): T"]
    assert len(result["train_losses"]) == 3 and result["steps"] == 5
    assert [r["instruction"] for r in result["responses"]] == [
        e["instruction"] for e in json.loads(data_file.read_text())[34:38]]
    assert isinstance(result["model"], GPTModel)
    assert sorted(p.name for p in result["paths"].values()) == [
        "gpt2-medium355M-sft-data-test.metrics.jsonl", "gpt2-medium355M-sft-data-test.pth",
        "gpt2-medium355M-sft-data-test.run.json", "instruction-data-with-response-data-test.json",
        "loss-plot-data-test.pdf"]


def test_choose_device():
    assert devices.choose_device(None, test_mode=True) == torch.device("cpu")
    assert devices.choose_device("cpu") == torch.device("cpu")
    assert devices.choose_device(None, default=lambda: torch.device("meta")) == torch.device("meta")
    with pytest.raises(devices.DeviceError, match="'gpu' is not a device: use cuda, mps or cpu"):
        devices.choose_device("gpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(devices.DeviceError, match="CUDA was requested but is not available"):
        devices.choose_device("cuda")
