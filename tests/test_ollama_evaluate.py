"""Section 7.8's script, ollama_evaluate.py: the book's functions, called the book's way and with
the project's options, and its command line, against a loopback fake Ollama server."""

import ast
import hashlib
import inspect
import json
import os
import runpy
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT
from fake_ollama import FakeOllama, fake_ollama_process
from loopback_server import free_port
from portable import new_group_kwargs, send_interrupt
from test_one_source import top_level_definitions, without_docstrings

import ollama_evaluate as oe
from gpt_instruction_finetuning import format_input
from instructkit import judge, judge_results
from instructkit.instruction_data import DatasetError

ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
    {"instruction": "What is the capital of Italy?", "input": "",
     "output": "The capital of Italy is Rome.", "model_response": "Rome."},
    {"instruction": "Convert 45 kilometers to meters.", "input": "",
     "output": "45 kilometers is 45000 meters.", "model_response": "45 km is 4500 meters."},
    {"instruction": "Name the opposite of 'hot'.", "input": "",
     "output": "The opposite of 'hot' is 'cold'.", "model_response": "cold"},
]


def entries(n):
    """`n` small valid entries (the four above, repeated with distinct responses)."""
    return [dict(ENTRIES[i % 4], model_response=f"{ENTRIES[i % 4]['model_response']} #{i}")
            for i in range(n)]


def score_by_prompt(prompt, body):
    """A deterministic judge: the same prompt always gets the same score."""
    return str(int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101)


def book_prompt(entry, json_key="model_response"):
    """The book's scoring prompt, written out here independently of the code under test."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}` on a scale from 0 to 100, "
            "where 100 is the best score. Respond with the integer number only.")


@pytest.fixture
def no_ollama_host(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# --- the book's file -------------------------------------------------------------------------

BOOK_SIGNATURES = [  # ch07/01_main-chapter-code/ollama_evaluate.py, in its order
    ("query_model", [("prompt", None), ("model", "llama3"),
                     ("url", "http://localhost:11434/api/chat")]),
    ("check_if_running", [("process_name", None)]),
    ("format_input", [("entry", None)]),
    ("main", [("file_path", None)]),
    ("generate_model_scores", [("json_data", None), ("json_key", None), ("model", "llama3")]),
]


def test_the_books_definitions_in_the_books_order():
    """The same top-level functions as the book, in its order; each signature begins with the
    book's parameters and defaults (what follows are keywords with defaults)."""
    definitions = top_level_definitions((ROOT / "ollama_evaluate.py").read_text("utf-8"))
    assert list(definitions) == [name for name, _ in BOOK_SIGNATURES]
    for name, book_params in BOOK_SIGNATURES:
        params = list(inspect.signature(getattr(oe, name)).parameters.values())
        ours = [(p.name, None if p.default is p.empty else p.default) for p in params]
        assert ours[:len(book_params)] == book_params, name
        assert all(p.default is not p.empty for p in params[len(book_params):]), name


def test_format_input_is_the_chapters_code():
    """ollama_evaluate keeps its own copy, as the book's script does (so that scoring needs no
    torch), and the package has one for its judge code: the same code, all three."""
    copies = [top_level_definitions((ROOT / f"{module}.py").read_text("utf-8"))["format_input"]
              for module in ("ollama_evaluate", "gpt_instruction_finetuning",
                             "instructkit/instruction_data")]
    dumps = [ast.dump(without_docstrings(node)) for node in copies]
    assert dumps[0] == dumps[1] == dumps[2]
    for entry in ENTRIES[:2]:
        assert oe.format_input(entry) == format_input(entry)


def test_check_if_running_scans_processes():
    assert oe.check_if_running(psutil.Process().name())
    assert not oe.check_if_running("no-such-process-7f3a9c")


# --- the book's calls ------------------------------------------------------------------------


def test_books_query_model_with_the_books_url_form():
    reply = "The response is accurate and concise, so I give it 92."
    with FakeOllama(replies=reply, chunk_size=3) as server:
        book_url = f"http://127.0.0.1:{server.port}/api/chat"
        assert oe.query_model("Score this.", "llama3", book_url) == reply
        body = server.chat_requests[0]
    assert body == {  # the book's request, option for option
        "model": "llama3",
        "messages": [{"role": "user", "content": "Score this."}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_books_query_model_default_url_follows_ollama_host(monkeypatch):
    with FakeOllama(replies="Llamas eat grass.") as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)
        assert oe.query_model("What do Llamas eat?") == "Llamas eat grass."
        assert oe.query_model("Again?", model="llama3", num_ctx=4096, timeout=30) == \
            "Llamas eat grass."
        assert [b["options"]["num_ctx"] for b in server.chat_requests] == [2048, 4096]


def test_books_generate_model_scores(monkeypatch, capsys):
    """generate_model_scores(data, "model_response"): the list of int scores, an empty answer
    scored 0 unasked, an unreadable reply printed and left out."""
    data = entries(4)
    data[2]["model_response"] = ""
    with FakeOllama(replies=["85", "I cannot judge this.", "70"]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)
        assert oe.generate_model_scores(data, "model_response") == [85, 0, 70]
        assert server.prompts == [book_prompt(data[i]) for i in (0, 1, 3)]
    out = capsys.readouterr().out.splitlines()
    assert "Could not convert score: I cannot judge this." in out


def test_books_main_prints_the_books_two_lines(shared_data, monkeypatch, capsys):
    data = json.loads((shared_data / "instruction-data-with-response.json").read_text("utf-8"))
    replies = ["85", " 70 \n", "90.", "Score: 60", "75/100"]  # 22 of each over 110 entries
    with FakeOllama(replies=replies) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)
        assert oe.main(shared_data / "instruction-data-with-response.json") is None
        assert len(server.chat_requests) == 110
        assert server.prompts == [book_prompt(e) for e in data]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Ollama running: {server.url}"
    assert out[-3:] == ["Number of scores: 110 of 110", "Average score: 76.00", ""]


def test_books_main_refuses_to_go_on_without_ollama(tmp_path, monkeypatch):
    path = write_json(tmp_path / "data.json", entries(2))
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{free_port()}")
    with pytest.raises(judge.OllamaError, match="No Ollama server answered"):
        oe.main(path)
    with FakeOllama(models=["phi3"]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)
        with pytest.raises(judge.OllamaError, match="ollama pull llama3"):
            oe.main(path)
        assert server.chat_requests == []


def test_main_with_no_usable_score_prints_na(tmp_path, monkeypatch, capsys):
    path = write_json(tmp_path / "data.json", entries(2))
    with FakeOllama(replies="No idea.") as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)
        oe.main(path)
    out = capsys.readouterr().out.splitlines()
    assert "Number of scores: 0 of 2" in out and "Average score: n/a" in out


# --- scoring a data set with the project's options ---------------------------------------------


def test_empty_responses_score_0_without_a_request(capsys):
    data = entries(5)
    data[1]["model_response"] = ""
    data[4]["model_response"] = " \t\n "
    with FakeOllama(replies=score_by_prompt) as server:
        scores = oe.generate_model_scores(data, "model_response", url=server.url)
        assert server.prompts == [book_prompt(data[i]) for i in (0, 2, 3)]
        expected = [int(score_by_prompt(p, None)) for p in server.prompts]
    assert scores == [expected[0], 0, expected[1], expected[2], 0]
    assert "Empty responses scored 0 without asking the judge: 2 of 5" in capsys.readouterr().out


def test_scores_and_exact_average_with_an_unusable_reply(capsys):
    replies = ["85", " 85 \n", "85.", "Score: 85", "85/100", "100", "0", "I cannot judge this."]
    data = entries(len(replies))
    with FakeOllama(replies=replies) as server:
        scores = oe.generate_model_scores(data, "model_response", url=server.chat_url)
        assert server.prompts == [book_prompt(e) for e in data]
    assert scores == [85, 85, 85, 85, 85, 100, 0]
    assert sum(scores) / len(scores) == 75.0
    out = capsys.readouterr().out
    assert "Could not convert score: I cannot judge this." in out
    assert "Replies without a score: 1 of 8" in out


def test_resume_after_interruption_scores_each_entry_once(tmp_path):
    data = entries(12)
    scores_path = tmp_path / "scores.json"
    with FakeOllama(replies=score_by_prompt) as server:
        expected = oe.generate_model_scores(data, "model_response", url=server.url)

    with FakeOllama(replies=score_by_prompt, fail_after=5) as server:
        with pytest.raises(judge.OllamaError, match="HTTP 500"):
            oe.generate_model_scores(data, "model_response", url=server.url,
                                     scores_path=scores_path)
        first_prompts = server.prompts[:server.answered]
    saved = json.loads(scores_path.read_text("utf-8"))
    assert [r["index"] for r in saved["results"]] == [0, 1, 2, 3, 4]

    with FakeOllama(replies=score_by_prompt) as server:
        scores = oe.generate_model_scores(data, "model_response", url=server.url,
                                          scores_path=scores_path)
        second_prompts = server.prompts
    assert len(first_prompts) == 5 and len(second_prompts) == 7
    assert not set(first_prompts) & set(second_prompts)
    assert first_prompts + second_prompts == [book_prompt(e) for e in data]
    assert scores == expected

    with FakeOllama(replies=score_by_prompt) as server:  # finished: nothing left to ask
        assert oe.generate_model_scores(data, "model_response", url=server.url,
                                        scores_path=scores_path) == expected
        assert server.chat_requests == []


def test_an_unreadable_reply_is_not_asked_again_on_resume(tmp_path, capsys):
    data = entries(3)
    scores_path = tmp_path / "scores.json"
    with FakeOllama(replies=["80", "no number", "60"]) as server:
        assert oe.generate_model_scores(data, "model_response", url=server.url,
                                        scores_path=scores_path) == [80, 60]
    with FakeOllama(replies="99") as server:
        assert oe.generate_model_scores(data, "model_response", url=server.url,
                                        scores_path=scores_path) == [80, 60]
        assert server.chat_requests == []
    assert "Replies without a score: 1 of 3" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("change", ["input", "model"])
def test_changed_input_or_judge_starts_fresh(tmp_path, capsys, change):
    data = entries(4)
    scores_path = tmp_path / "scores.json"
    with FakeOllama(replies="80", models=["llama3", "phi3"]) as server:
        oe.generate_model_scores(data, "model_response", url=server.url, scores_path=scores_path)
        model = "llama3"
        if change == "input":
            data[2]["model_response"] = "A different answer."
        else:
            model = "phi3"
        capsys.readouterr()
        oe.generate_model_scores(data, "model_response", model=model, url=server.url,
                                 scores_path=scores_path)
        assert len(server.chat_requests) == 8
    assert "different input or judge model; starting fresh" in capsys.readouterr().out
    assert json.loads(scores_path.read_text("utf-8"))["model"] == model


def test_bad_entries_are_rejected_before_any_request():
    data = entries(3)
    del data[1]["model_response"]
    with FakeOllama() as server:
        with pytest.raises(DatasetError, match="entry 1 has no 'model_response' key"):
            oe.generate_model_scores(data, "model_response", url=server.url)
        assert server.chat_requests == []


# --- the command line (the __main__ block, run in this process) ----------------------------------


def run_script(monkeypatch, *argv):
    """Run ollama_evaluate.py as `python ollama_evaluate.py ARGV`; return its exit code."""
    monkeypatch.setattr(sys, "argv", ["ollama_evaluate.py", *map(str, argv)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "ollama_evaluate.py"), run_name="__main__")
    return info.value.code


def test_cli_full_run_on_the_chapters_110_entries(shared_data, tmp_path, capsys, monkeypatch,
                                                   no_ollama_host):
    data = json.loads((shared_data / "instruction-data-with-response.json").read_text("utf-8"))
    path = write_json(tmp_path / "instruction-data-with-response.json", data)
    replies = ["85", " 70 \n", "90.", "Score: 60", "75/100"]  # 22 of each over 110 entries
    with FakeOllama(replies=replies) as server:
        assert run_script(monkeypatch, "--file_path", path, "--host", server.url) == 0
        assert len(server.chat_requests) == 110
    out = capsys.readouterr().out.splitlines()
    assert "Number of scores: 110 of 110" in out
    assert "Average score: 76.00" in out
    saved = json.loads((tmp_path / "instruction-data-with-response-llama3-scores.json")
                       .read_text("utf-8"))
    assert [r["score"] for r in saved["results"]] == [85, 70, 90, 60, 75] * 22
    png = tmp_path / "instruction-data-with-response-llama3-scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Histogram saved to {png}" in out


def test_cli_resumes_after_a_failed_run(tmp_path, capsys, monkeypatch, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(6))
    scores_out = tmp_path / "out" / "scores.json"
    args = ["--file-path", path, "--model", "phi3:mini", "--scores-out", scores_out,
            "--plot", tmp_path / "hist.png"]
    with FakeOllama(replies="50", models=["phi3:mini"], fail_after=4) as server:
        assert run_script(monkeypatch, *args, "--host", server.host) == 1
    err = capsys.readouterr().err
    assert "\nerror: " in err and "HTTP 500" in err  # the progress bar's line ended first
    assert f"Results so far are in {scores_out}; run again to resume." in err
    assert "Traceback" not in err
    with FakeOllama(replies="80", models=["phi3:mini"]) as server:
        assert run_script(monkeypatch, *args, "--host", server.host) == 0
        assert len(server.chat_requests) == 2
    out = capsys.readouterr().out
    assert "Resuming: 4 of 6 entries already scored" in out
    assert "Average score: 60.00" in out  # four 50s from the first run, two 80s
    assert (tmp_path / "hist.png").exists()


def test_cli_server_and_model_problems_exit_1(tmp_path, capsys, monkeypatch, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(2))
    port = free_port()
    assert run_script(monkeypatch, "--file_path", path, "--host", f"127.0.0.1:{port}") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: No Ollama server answered at http://127.0.0.1:{port}")
    assert "ollama serve" in err and "Traceback" not in err
    with FakeOllama(models=["phi3"]) as server:
        assert run_script(monkeypatch, "--file_path", path, "--host", server.url) == 1
        assert server.chat_requests == []
    assert "ollama pull llama3" in capsys.readouterr().err
    assert not (tmp_path / "data-llama3-scores.json").exists()


def test_cli_takes_the_books_url_and_num_ctx(tmp_path, capsys, monkeypatch, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(3))
    with FakeOllama(replies="60") as server:
        book_url = f"http://127.0.0.1:{server.port}/api/chat"
        assert run_script(monkeypatch, "--file_path", path, "--host", book_url,
                          "--num-ctx", "8192") == 0
        assert {r["path"] for r in server.requests} == {"/api/tags", "/api/chat"}
        assert [body["options"] for body in server.chat_requests] == [
            {"seed": 123, "temperature": 0, "num_ctx": 8192}] * 3
    assert "Average score: 60.00" in capsys.readouterr().out


def test_cli_json_key(tmp_path, capsys, monkeypatch, no_ollama_host):
    data = [dict(e, phi3_response=f"Answer {i}.") for i, e in enumerate(entries(2))]
    path = write_json(tmp_path / "data.json", data)
    with FakeOllama(replies="40") as server:
        assert run_script(monkeypatch, "--file_path", path, "--json_key", "phi3_response",
                          "--host", server.host) == 0
        assert server.prompts == [book_prompt(e, "phi3_response") for e in data]
    assert "Average score: 40.00" in capsys.readouterr().out


def test_cli_timeout_flag(tmp_path, capsys, monkeypatch, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(2))
    with FakeOllama(replies="85", delay=1.0) as server:
        start = time.monotonic()
        assert run_script(monkeypatch, "--file_path", path, "--host", server.host,
                          "--timeout", "0.2") == 1
        assert time.monotonic() - start < 0.9
    assert "sent nothing for 0.2 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--timeout", "0"], ["--timeout", "soon"], ["--num-ctx", "0"],
                                  ["--num-ctx", "2.5"], ["--timeout", "-1"]])
def test_cli_bad_numbers_exit_2(tmp_path, capsys, monkeypatch, flag):
    path = write_json(tmp_path / "data.json", entries(2))
    assert run_script(monkeypatch, "--file_path", path, *flag) == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_cli_bad_input_exits_2_before_the_server_is_asked(tmp_path, capsys, monkeypatch):
    with FakeOllama() as server:
        assert run_script(monkeypatch, "--file_path", tmp_path / "missing.json",
                          "--host", server.host) == 2
        assert capsys.readouterr().err == f"error: input file not found: {tmp_path / 'missing.json'}\n"
        path = write_json(tmp_path / "data.json", entries(3))
        assert run_script(monkeypatch, "--file_path", path, "--json_key", "response",
                          "--host", server.host) == 2
        assert "entry 0 has no 'response' key" in capsys.readouterr().err
        assert server.requests == []
    assert run_script(monkeypatch) == 2  # --file_path is required
    assert "the following arguments are required: --file_path" in capsys.readouterr().err


def test_cli_help_lists_the_options(capsys, monkeypatch):
    assert run_script(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    for option in ("--file_path", "--json_key", "--model", "--host", "--num-ctx", "--timeout",
                   "--scores-out", "--plot", "--debug"):
        assert option in out


# --- as a real process: without torch, and stopped with Ctrl-C ----------------------------------

# Runs ollama_evaluate.py as a script with torch made unimportable: scoring needs no PyTorch.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__'); "
)


def run_cli(args, env_host):
    env = {**os.environ, "OLLAMA_HOST": env_host}
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "ollama_evaluate.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_torch_is_really_blocked_in_the_subprocess(tmp_path):
    script = tmp_path / "needs_torch.py"
    script.write_text("import torch\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ModuleNotFoundError: import of torch halted" in result.stderr


def test_cli_as_a_subprocess_without_torch(tmp_path):
    data = entries(6)
    data[3]["model_response"] = "  \n"  # empty: scored 0 without a request
    path = write_json(tmp_path / "data.json", data)
    scores_out, plot = tmp_path / "s.json", tmp_path / "s.png"
    with FakeOllama(replies=["85", "Score: 90", "nothing useful", "70/100", "75."]) as server:
        result = run_cli(["--file_path", str(path), "--scores-out", str(scores_out),
                          "--plot", str(plot), "--num-ctx", "4096", "--timeout", "30"], server.host)
        assert [body["options"]["num_ctx"] for body in server.chat_requests] == [4096] * 5
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Empty responses scored 0 without asking the judge: 1 of 6" in lines
    assert "Number of scores: 5 of 6" in lines and "Average score: 64.00" in lines
    assert "Traceback" not in result.stderr
    saved = json.loads(scores_out.read_text("utf-8"))["results"]
    assert [r["score"] for r in saved] == [85, 90, None, 0, 70, 75]
    assert plot.read_bytes()[:4] == b"\x89PNG"

    down = run_cli(["--file_path", str(path)], f"127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "ollama serve" in down.stderr
    bad = run_cli(["--file_path", str(tmp_path / "missing.json")], "127.0.0.1:1")
    assert bad.returncode == 2 and "input file not found" in bad.stderr
    assert "Traceback" not in down.stderr + bad.stderr


def test_cli_ctrl_c_says_where_the_scores_are(tmp_path):
    path = write_json(tmp_path / "data.json", entries(6))
    scores = tmp_path / "data-llama3-scores.json"
    with FakeOllama(replies="85", delay=0.5) as server:  # about 0.5 s per reply
        process = subprocess.Popen(
            [sys.executable, "ollama_evaluate.py", "--file_path", str(path), "--host", server.host],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **new_group_kwargs())
        deadline = time.monotonic() + 60
        while not scores.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        send_interrupt(process)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"Interrupted. Results so far are in {scores}; run again to resume." in err
    assert "Traceback" not in err
    done = [r["index"] for r in json.loads(scores.read_text("utf-8"))["results"]]
    assert done and done == list(range(len(done))) and len(done) < 6


def test_fake_server_runs_as_a_script(tmp_path):
    args = ["--replies", "Score: 85", "70", "--models", "llama3"]
    with fake_ollama_process(tmp_path, *args) as (process, url):
        assert judge.ollama_is_reachable(url)
        assert [oe.query_model("x", url=url) for _ in range(3)] == ["Score: 85", "70", "Score: 85"]
    assert "Fake Ollama listening on http://127.0.0.1:" in process.output


def test_the_scores_file_is_the_packages(tmp_path):
    """The script's scores file is judge_results' format: the fingerprint of the same work."""
    data = entries(2)
    with FakeOllama(replies="77") as server:
        oe.generate_model_scores(data, "model_response", url=server.url,
                                 scores_path=tmp_path / "s.json")
    saved = json.loads((tmp_path / "s.json").read_text("utf-8"))
    assert saved["fingerprint"] == judge_results.scores_fingerprint(data, "model_response", "llama3")
    assert saved["num_entries"] == 2 and [r["score"] for r in saved["results"]] == [77, 77]
