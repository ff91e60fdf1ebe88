"""UTF-8 consoles (instructkit/console.py): every command writes and reads UTF-8 whatever the
locale, a BOM on stdin is dropped, and a sample printed during training never ends the run.

Windows' redirected output (a file, a pipe) uses the ANSI code page; here the commands run
as real subprocesses under PYTHONIOENCODING=cp1252, which puts Python's streams in the same
state on any OS, with their output piped. Text outside cp1252 (Cyrillic, CJK) then either
comes out as UTF-8 or crashes the command: what the tests tell apart.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR

from instructkit import console
from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from instructkit.safe_files import save_state_dict, write_json

CP1252 = {"PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"}
# instruction, input, output: none of them can be written in cp1252
TEXTS = [
    ("Переведите предложение на английский.", "Кошка спит на диване.", "The cat sleeps on the sofa."),
    ("把这句话翻译成英文。", "我喜欢喝茶。", "I like drinking tea."),
    ("Name the capital of Russia.", "", "Столица России — Москва."),
    ("日本の首都はどこですか?", "", "東京です。"),
    ("Дайте синоним слова «быстрый».", "", "Скорый."),
]


def run(args, stdin=b"", env=None):
    """A command in a subprocess with cp1252 streams and pipes: (exit code, stdout, stderr) as bytes."""
    proc = subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **CP1252, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def cp1252_stream(text=""):
    """A text stream over bytes in cp1252 (as Windows' redirected stdout, stdin), strict."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="cp1252", errors="strict")


# ---------------------------------------------------------------------------------------
# The module itself
# ---------------------------------------------------------------------------------------


def test_use_utf8_console_switches_the_three_streams_and_keeps_their_error_handlers(monkeypatch):
    out, err, inp = cp1252_stream(), cp1252_stream(), cp1252_stream("Привет\n")
    err.reconfigure(errors="backslashreplace")  # as Python's stderr
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdin", inp)
    console.use_utf8_console()
    assert (out.encoding, err.encoding, inp.encoding) == ("utf-8", "utf-8", "utf-8")
    assert (out.errors, err.errors) == ("strict", "backslashreplace")
    print("кот 猫", file=out)
    out.flush()
    assert out.buffer.getvalue() == "кот 猫\n".encode()
    assert inp.read() == "Привет\n"  # the bytes were UTF-8: read as such, not as cp1252


def test_streams_that_cannot_change_are_left_as_they_are(monkeypatch):
    text_only = io.StringIO()  # no reconfigure (like a notebook's output)
    read_already = cp1252_stream("first\nsecond\n")
    read_already.readline()  # Python refuses a new encoding once reading began
    monkeypatch.setattr(sys, "stdout", text_only)
    monkeypatch.setattr(sys, "stdin", read_already)
    console.use_utf8_console()  # no error
    assert read_already.encoding == "cp1252" and sys.stdout is text_only


def test_read_stdin_drops_a_leading_bom_only():
    assert console.read_stdin(io.StringIO("\ufeff{\"a\": 1}\n")) == "{\"a\": 1}\n"
    assert console.read_stdin(io.StringIO("x\ufeff")) == "x\ufeff"


def test_print_text_replaces_what_the_stream_cannot_encode():
    out = cp1252_stream()
    with pytest.raises(UnicodeEncodeError):
        print("Кошка", file=out)  # what print_text guards against
    console.print_text("café Кошка 猫", file=out)
    console.print_text("a", "b", sep="-", end="!\n", file=out)
    out.flush()
    assert out.buffer.getvalue() == "café ????? ?\na-b!\n".encode("cp1252")


@pytest.mark.parametrize("printer", ["fast_gpt.print_sample", "previous_chapters.generate_and_print_sample"])
def test_the_sample_printed_during_training_never_raises(printer, tokenizer, monkeypatch):
    """The start context is printed back with the generated tokens: Cyrillic in it, printed to
    a cp1252 stdout (an IDE, a notebook's redirected output), must not end the training."""
    import importlib

    from previous_chapters import GPTModel

    module_name, function_name = printer.split(".")
    print_sample = getattr(importlib.import_module(module_name), function_name)
    torch.manual_seed(0)
    model = GPTModel(TEST_MODE_CONFIG)
    out = cp1252_stream()
    monkeypatch.setattr(sys, "stdout", out)
    print_sample(model, tokenizer, "cpu", "Кошка спит")
    out.flush()
    printed = out.buffer.getvalue().decode("cp1252")
    assert printed.startswith("????? ????") and printed.endswith("\n") and "\n" not in printed[:-1]
    assert model.training  # back in training mode, as after the book's print


# ---------------------------------------------------------------------------------------
# The commands, under cp1252 with piped output
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_data(tmp_path_factory):
    """30 entries, each with Cyrillic or CJK text, in a UTF-8 JSON file."""
    entries = [{"instruction": f"{instruction} ({i})", "input": input_text, "output": output}
               for i in range(6) for instruction, input_text, output in TEXTS]
    path = tmp_path_factory.mktemp("data") / "данные.json"
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return path, entries


def test_finetune_test_mode_with_cp1252_streams_and_foreign_text(foreign_data, tmp_path):
    path, entries = foreign_data
    code, out, err = run(["-m", "instructkit.finetune", "--test_mode", "--data", path,
                          "--output-dir", tmp_path, "--tokenizer-dir", TOKENIZER_DIR,
                          "--max-new-tokens", 4])
    assert code == 0, err.decode("utf-8", "replace")
    text = out.decode("utf-8")  # all of it UTF-8, the sample after each epoch included
    answers_file = tmp_path / "instruction-data-with-response-данные-test.json"
    assert f"Responses saved as {answers_file}" in text
    saved = json.loads(answers_file.read_bytes().decode("utf-8"))
    assert len(saved) == 3  # test mode: the test split, at most 10 entries
    for entry in saved:  # each test entry saved as it was read, with its answer
        assert {k: entry[k] for k in ("instruction", "input", "output")} in entries
        assert isinstance(entry["model_response"], str)
    first = saved[0]  # and shown, in the console's UTF-8, before it was saved
    assert first["instruction"] in text and f"Correct response:\n>> {first['output']}" in text


def save_chat_model(folder, model):
    path = folder / "tiny-sft.pth"
    save_state_dict(model.state_dict(), path)
    write_json(path.with_suffix(".run.json"), {
        "config": {"model": None, "prompt_style": "alpaca", "lora_rank": None, "lora_alpha": None},
        "model_config": TEST_MODE_CONFIG})
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from previous_chapters import GPTModel

    torch.manual_seed(123)
    return save_chat_model(tmp_path_factory.mktemp("chat"), GPTModel(TEST_MODE_CONFIG))


CYRILLIC_I = 18849  # GPT-2's token for "и", a whole character in one token


@pytest.fixture(scope="module")
def cyrillic_model_file(tmp_path_factory, tokenizer):
    """A model whose every greedy token is "и": the final norm outputs a constant vector v, and
    only the output head's row for "и" is v, so that token alone gets a positive logit."""
    from previous_chapters import GPTModel

    assert tokenizer.decode([CYRILLIC_I]) == "и"
    torch.manual_seed(123)
    model = GPTModel(TEST_MODE_CONFIG)
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[CYRILLIC_I] = 1.0
    return save_chat_model(tmp_path_factory.mktemp("cyrillic"), model)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["no-bom", "bom"])
def test_chat_reads_and_writes_utf8_with_cp1252_streams(model_file, bom):
    entries = [{"instruction": instruction, "input": input_text} for instruction, input_text, _ in TEXTS]
    jsonl = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
    code, out, err = run(["-m", "instructkit.chat", model_file, "--max-new-tokens", 6],
                         stdin=bom + jsonl)
    assert code == 0, err.decode("utf-8", "replace")
    rows = [json.loads(line) for line in out.decode("utf-8").splitlines()]  # JSONL detected
    assert [{k: r[k] for k in ("instruction", "input")} for r in rows] == entries  # read as UTF-8
    assert all(isinstance(r["model_response"], str) for r in rows)

    # Plain instructions, one a line: the same answers as the JSONL entries without input
    plain = [e for e in entries if not e["input"]]
    lines = "".join(e["instruction"] + "\n" for e in plain).encode("utf-8")
    code, out, err = run(["-m", "instructkit.chat", model_file, "--max-new-tokens", 6],
                         stdin=bom + lines)
    assert code == 0, err.decode("utf-8", "replace")
    expected = [r["model_response"] for r in rows if not r["input"]]
    assert out.decode("utf-8") == "\n\n".join(expected) + "\n"


def test_chat_streams_one_answer_in_utf8(cyrillic_model_file):
    code, out, err = run(["-m", "instructkit.chat", cyrillic_model_file, "Скажи «привет» 你好",
                          "--max-new-tokens", 12])
    assert code == 0, err.decode("utf-8", "replace")
    assert out.decode("utf-8") == "и" * 12 + "\n"  # streamed token by token, in UTF-8


# Each command states a problem with a file whose name cp1252 cannot write: with the console
# left in cp1252, stderr (errors="backslashreplace") would show "\u0444..." instead.
MISSING = "нет_файла_文件.json"


@pytest.mark.parametrize("command", [
    ["-m", "instructkit.finetune", "--test_mode", "--data"],
    ["gpt_instruction_finetuning.py", "--test_mode", "--data"],
    ["-m", "instructkit.dpo_train", "--test-mode", "--data"],
    ["-m", "instructkit.make_preference_data", "--file_path"],
    ["ollama_evaluate.py", "--file_path"],  # the judge (instructkit/judge_cli.py)
    ["-m", "instructkit.chat"],
    ["-m", "instructkit.web_chat"],
], ids=lambda c: c[1] if c[0] == "-m" else c[0])
def test_every_command_writes_utf8_under_cp1252(command, tmp_path):
    missing = tmp_path / MISSING
    code, out, err = run([*command, missing, *(["--output-dir", tmp_path] if "dpo" in command[1]
                                               else [])])
    assert code == 2
    message = err.decode("utf-8")
    assert MISSING in message, message
    assert "\\u" not in message


def test_the_keys_that_end_input_are_the_platforms():
    assert console.end_of_input_keys("nt") == "Ctrl-Z then Enter"
    assert console.end_of_input_keys("posix") == "Ctrl-D"


def test_the_chat_and_the_disk_full_prompt_say_ctrl_z_on_windows(monkeypatch, capsys):
    """Ctrl-D does nothing in a Windows console: the prompts name the keys that work there."""
    from instructkit import chat, safe_files

    monkeypatch.setattr(console.os, "name", "nt")
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    chat.interactive(chat=None, args=None)  # end of input at once: only the greeting
    assert "Ctrl-C stops an answer; Ctrl-Z then Enter leaves." in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = io.StringIO()
    wait = safe_files.ask_at_terminal("The model", stdin=Terminal(""), stderr=err)
    assert wait(OSError("disk full")) is False  # end of input: gives up
    assert "(Ctrl-Z then Enter or Ctrl-C gives up)" in err.getvalue()
