"""Ctrl-C and SIGTERM to the chat's stdin mode keep every finished answer (issue 24, item 4).

`python -m instructkit.chat MODEL` reads instructions from a real pipe that the test keeps
open, in a real subprocess; the signal is a real one (tests/portable.py), sent once the first
answers are out. The answers printed are compared with the book's `generate`, one at a time.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, TOKENIZER_DIR
from portable import WINDOWS, needs_sigterm, new_group_kwargs, send_interrupt, send_sigterm
from test_chat import book_answer, save_model

from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from previous_chapters import GPTModel

MAX_NEW = 60  # long enough that a batch takes a while, so the signal finds work left
ENTRIES = [{"instruction": f"Count to {n} in words.", "input": "" if n % 3 else f"Start at {n // 2}."}
           for n in range(1, 25)]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(123)
    return GPTModel(TEST_MODE_CONFIG).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_model):
    return save_model(tmp_path_factory.mktemp("chat-interrupt"), "tiny-sft", tiny_model)


def interrupted_chat(model_file, lines, signal_it, first_lines=1):
    """Start the chat on a pipe, write `lines` and keep the pipe open; once `first_lines` lines
    of answers are out, call `signal_it(proc)`. Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "instructkit.chat", str(model_file), "--device", "cpu",
         "--tokenizer-dir", str(TOKENIZER_DIR), "--max-new-tokens", str(MAX_NEW),
         "--batch-size", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        encoding="utf-8", cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        **new_group_kwargs())
    # a chat that waited for the pipe's end would never answer: end it, and fail below; with
    # SIGABRT where there is one, so that faulthandler prints every thread's stack to stderr
    # first (the failure then shows where the chat hung)
    watchdog = threading.Timer(120, proc.kill if WINDOWS else lambda: proc.send_signal(signal.SIGABRT))
    watchdog.start()
    try:
        proc.stdin.write("".join(line + "\n" for line in lines))
        proc.stdin.flush()  # and the pipe stays open: the chat cannot wait for its end
        first = [proc.stdout.readline() for _ in range(first_lines)]
        assert all(first), f"the chat ended before its first answers: {proc.stderr.read()}"
        signal_it(proc)
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdin.close()
    return proc.returncode, "".join(first) + rest, err


@pytest.mark.parametrize(("signal_it", "code"), [
    (send_interrupt, 130), pytest.param(send_sigterm, 143, marks=needs_sigterm)])
def test_a_signal_to_the_jsonl_pipe_keeps_every_finished_answer(model_file, tiny_model, tokenizer,
                                                                one_thread, signal_it, code):
    returncode, out, err = interrupted_chat(model_file, [json.dumps(e) for e in ENTRIES], signal_it)
    assert returncode == code, err
    assert "Traceback" not in err
    # Only whole JSON lines, in stdin's order, each the answer the book's generate gives
    assert out.endswith("\n")
    rows = [json.loads(line) for line in out.splitlines()]
    done = len(rows)
    assert 1 <= done < len(ENTRIES)
    assert [{k: r[k] for k in ("instruction", "input")} for r in rows] == ENTRIES[:done]
    assert [r["model_response"] for r in rows] == [
        book_answer(tiny_model, tokenizer, e, MAX_NEW) for e in ENTRIES[:done]]
    assert err.splitlines()[-1] == (
        f"stopped: {done} of {len(ENTRIES)} answered; {len(ENTRIES) - done} not answered "
        f"(stdin had not ended: later lines were not read)")


def test_ctrl_c_to_plain_lines_keeps_every_finished_answer(model_file, tiny_model, tokenizer,
                                                           one_thread):
    plain = [e["instruction"] for e in ENTRIES[:10]]
    # the first batch's two answers, the blank line between them
    returncode, out, err = interrupted_chat(model_file, plain, send_interrupt, first_lines=3)
    assert returncode == 130, err
    assert "Traceback" not in err
    answers = out.removesuffix("\n").split("\n\n")
    done = len(answers)
    assert 2 <= done < len(plain)
    assert answers == [book_answer(tiny_model, tokenizer, {"instruction": i, "input": ""}, MAX_NEW)
                       for i in plain[:done]]
    assert err.splitlines()[-1].startswith(f"stopped: {done} of {len(plain)} answered; "
                                           f"{len(plain) - done} not answered")


def test_a_pipe_that_ends_is_answered_whole_and_counted_by_its_lines(model_file, tiny_model,
                                                                     tokenizer, one_thread):
    """Without a signal: every line answered, and blank lines and a BOM change nothing."""
    text = "\ufeff" + "\n".join(json.dumps(e) for e in ENTRIES[:3]) + "\n\n"
    result = subprocess.run(
        [sys.executable, "-m", "instructkit.chat", str(model_file), "--device", "cpu",
         "--tokenizer-dir", str(TOKENIZER_DIR), "--max-new-tokens", str(MAX_NEW)],
        input=text, capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["model_response"] for r in rows] == [
        book_answer(tiny_model, tokenizer, e, MAX_NEW) for e in ENTRIES[:3]]
    assert "stopped" not in result.stderr


@pytest.mark.parametrize(("signum", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_inside_interrupts_deferred_waits_for_the_block_to_end(signum, code):
    """run_guard.interrupts_deferred, in a real process that signals itself inside the block:
    the block finishes its line, then the signal stops the command (130 or 143)."""
    script = f"""
import signal, sys
from instructkit.errors import run_command
from instructkit.run_guard import interrupts_deferred

def main():
    with interrupts_deferred():
        signal.raise_signal(signal.{signum})
        print("the block goes on to its end", flush=True)
    print("after the block", flush=True)

sys.exit(run_command(main))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout == "the block goes on to its end\n"
    assert "Traceback" not in result.stderr
