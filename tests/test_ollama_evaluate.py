"""Section 7.8: scoring with a judge model served by Ollama, against a loopback fake server."""

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import ROOT
from fake_ollama import FakeOllama, Hangup, StreamError, fake_ollama_process, unused_port
from test_one_source import top_level_definitions, without_docstrings

import ollama_evaluate as oe
from gpt_instruction_finetuning import format_input

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


@pytest.fixture
def no_ollama_host(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# --- where the server is ------------------------------------------------------------------


HOST_FORMS = [
    (None, "http://127.0.0.1:11434"),  # Ollama's own default, not localhost
    ("", "http://127.0.0.1:11434"),
    ("   ", "http://127.0.0.1:11434"),
    ("example.org", "http://example.org:11434"),
    ("localhost", "http://localhost:11434"),
    ("127.0.0.1:11500", "http://127.0.0.1:11500"),
    ("http://127.0.0.1:11500", "http://127.0.0.1:11500"),
    ("http://example:8080", "http://example:8080"),
    ("HTTP://example:8080", "http://example:8080"),
    ("https://example.org", "https://example.org:443"),
    ("http://example.org", "http://example.org:80"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("0.0.0.0:5000", "http://127.0.0.1:5000"),
    ("[::1]:5000", "http://[::1]:5000"),
    ("[::1]", "http://[::1]:11434"),
    ("::1", "http://[::1]:11434"),
    ("http://[::1]:5000", "http://[::1]:5000"),
    ("[::]:5000", "http://[::1]:5000"),
    ('"127.0.0.1:5000"', "http://127.0.0.1:5000"),
    ("'localhost:5000'", "http://localhost:5000"),
    (' "http://example:8080" ', "http://example:8080"),
    ("http://localhost:11434/api/chat", "http://localhost:11434"),  # the book's form
    ("http://localhost:11434/api/chat/", "http://localhost:11434"),
    ("localhost:11434/api/generate", "http://localhost:11434"),
    ("http://localhost:11434/api", "http://localhost:11434"),
    ("http://[::1]:5000/api/chat", "http://[::1]:5000"),
    (" example:99/ollama/ ", "http://example:99/ollama"),  # a proxy's prefix is kept
    ("https://example.org/ollama/api/chat", "https://example.org:443/ollama"),
    ("api.example.org/apix", "http://api.example.org:11434/apix"),
]


@pytest.mark.parametrize(("env", "expected"), HOST_FORMS)
def test_get_ollama_url_from_environment(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    assert oe.get_ollama_url() == expected


@pytest.mark.parametrize(("host", "expected"), [f for f in HOST_FORMS if f[0] is not None])
def test_get_ollama_url_from_the_host_argument(monkeypatch, host, expected):
    monkeypatch.setenv("OLLAMA_HOST", "elsewhere:1")
    expected = "http://elsewhere:1" if not host.strip() else expected  # empty: not given
    assert oe.get_ollama_url(host) == expected


@pytest.mark.parametrize("value", ["localhost:port", "ftp://example:21", "[::1]:99999"])
def test_invalid_addresses_are_clear_errors(value):
    with pytest.raises(oe.OllamaError, match="Ollama address"):
        oe.get_ollama_url(value)


def test_host_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "elsewhere:1")
    assert oe.get_ollama_url("127.0.0.1:2000") == "http://127.0.0.1:2000"
    with pytest.raises(oe.OllamaError, match="Invalid Ollama address"):
        oe.get_ollama_url("localhost:port")


@pytest.mark.parametrize("form", ["host", "url", "quoted", "book", "ipv4-port"])
def test_ollama_host_reaches_the_server(monkeypatch, form):
    with FakeOllama(replies="Rome is the capital.") as server:
        value = {"host": server.host, "url": server.url, "quoted": f'"{server.host}"',
                 "book": server.chat_url, "ipv4-port": f"127.0.0.1:{server.port}/api/chat/"}[form]
        monkeypatch.setenv("OLLAMA_HOST", value)
        assert oe.ollama_is_reachable()
        oe.ensure_ollama(model="llama3")
        assert oe.query_model("What is the capital of Italy?") == "Rome is the capital."
        assert [r["path"] for r in server.requests] == ["/api/version", "/api/tags", "/api/chat"]


def test_check_if_running_scans_processes():
    assert oe.check_if_running(psutil.Process().name())
    assert not oe.check_if_running("no-such-process-7f3a9c")


def test_reachability_and_models():
    with FakeOllama(models=["llama3", "phi3:mini"]) as server:
        assert oe.ollama_is_reachable(server.url)
        assert oe.ollama_is_reachable(server.chat_url)  # any API URL of the server works
        assert oe.ensure_ollama(server.url, "llama3") == ["llama3:latest", "phi3:mini"]
        oe.ensure_ollama(server.url, "llama3:latest")
        oe.ensure_ollama(server.url, "phi3:mini")
        with pytest.raises(oe.OllamaError, match="ollama pull llama3:70b"):
            oe.ensure_ollama(server.url, "llama3:70b")
    assert not oe.ollama_is_reachable(f"http://127.0.0.1:{unused_port()}", timeout=1)


def test_server_down_gives_a_clear_error():
    address = f"http://127.0.0.1:{unused_port()}"
    for call in (lambda: oe.ensure_ollama(address, "llama3"),
                 lambda: oe.query_model("hi", url=address + "/api/chat")):
        with pytest.raises(oe.OllamaError) as info:
            call()
        message = str(info.value)
        assert address in message
        assert "ollama serve" in message
        assert "OLLAMA_HOST" in message and "--host" in message


# --- asking the judge ----------------------------------------------------------------------


def test_query_model_joins_the_stream_and_sends_the_chapter_options():
    reply = "The response is accurate and concise, so I give it 92."
    with FakeOllama(replies=reply, chunk_size=3) as server:
        assert oe.query_model("Score this.", url=server.chat_url) == reply
        assert oe.query_model("Again.", model="llama3", url=server.url) == reply  # base URL
        body = server.chat_requests[0]
    assert body == {
        "model": "llama3",
        "messages": [{"role": "user", "content": "Score this."}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_fake_server_streams_several_chunks_or_one_object():
    with FakeOllama(replies="Score: 85", chunk_size=2) as server:
        data = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "x"}]})
        with urllib.request.urlopen(server.chat_url, data=data.encode(), timeout=5) as response:
            lines = [json.loads(line) for line in response if line.strip()]
        assert len(lines) == 6 and lines[-1]["done"] and not lines[0]["done"]
        assert "".join(line["message"]["content"] for line in lines) == "Score: 85"

        data = json.dumps({"model": "llama3", "stream": False,
                           "messages": [{"role": "user", "content": "x"}]})
        with urllib.request.urlopen(server.chat_url, data=data.encode(), timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["done"] and answer["message"]["content"] == "Score: 85"
        with urllib.request.urlopen(server.url + "/api/version", timeout=5) as response:
            assert "version" in json.loads(response.read())


def test_model_not_pulled_says_ollama_pull():
    with FakeOllama(models=["phi3"]) as server, pytest.raises(oe.OllamaError) as info:
        oe.query_model("hi", model="llama3", url=server.chat_url)
    assert "ollama pull llama3" in str(info.value)
    assert 'model "llama3" not found' in str(info.value)


@pytest.mark.parametrize(("reply", "match"), [
    (StreamError("out of memory"), "out of memory"),
    (Hangup(), "ended before it was done"),
])
def test_broken_answers_raise(reply, match):
    with FakeOllama(replies=reply) as server, pytest.raises(oe.OllamaError, match=match):
        oe.query_model("hi", url=server.chat_url)


def test_read_timeout():
    with FakeOllama(replies="85", delay=1.0) as server:
        start = time.monotonic()
        with pytest.raises(oe.OllamaError, match="sent nothing for 0.1 seconds"):
            oe.query_model("hi", url=server.chat_url, timeout=(2, 0.1))
        assert time.monotonic() - start < 0.9


@pytest.mark.parametrize("reply", [
    "85", " 85 \n", "85.", "Score: 85", "85/100", "**85**", "85.0", "85%",
    "I would rate this response 85 out of 100.", "On a scale from 0 to 100, I give it 85.",
    "Score (0-100): 85",
])
def test_parse_score_formats(reply):
    assert oe.parse_score(reply) == 85


@pytest.mark.parametrize(("reply", "expected"), [
    ("100", 100), ("0", 0), ("100/100", 100), ("0/100", 0),
    ("", None), ("N/A", None), ("The response is correct.", None), ("150", None),
    ("-5", None), ("1000", None), ("85.5", None), (None, None),
])
def test_parse_score_edges(reply, expected):
    assert oe.parse_score(reply) == expected


def test_prompt_is_the_chapters(shared_data):
    entry = json.loads((shared_data / "instruction-data-with-response.json").read_text("utf-8"))[0]
    assert oe.build_score_prompt(entry, "model_response") == (
        f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only."
    )


def test_format_input_is_the_chapters_code():
    """ollama_evaluate keeps its own copy (so that scoring needs no torch): the same code."""
    copies = [top_level_definitions((ROOT / f"{module}.py").read_text("utf-8"))["format_input"]
              for module in ("ollama_evaluate", "gpt_instruction_finetuning")]
    dumps = [ast.dump(without_docstrings(node)) for node in copies]
    assert dumps[0] == dumps[1]
    assert oe.format_input(ENTRIES[0]) == format_input(ENTRIES[0])
    assert oe.format_input(ENTRIES[1]) == format_input(ENTRIES[1])


# --- scoring a data set ----------------------------------------------------------------------


def test_empty_responses_score_0_without_a_request(capsys):
    data = entries(5)
    data[1]["model_response"] = ""
    data[4]["model_response"] = " \t\n "
    with FakeOllama(replies=score_by_prompt) as server:
        scores = oe.generate_model_scores(data, "model_response", url=server.url)
        assert server.prompts == [oe.build_score_prompt(data[i], "model_response") for i in (0, 2, 3)]
        expected = [int(score_by_prompt(p, None)) for p in server.prompts]
    assert scores == [expected[0], 0, expected[1], expected[2], 0]
    assert "Empty responses scored 0 without asking the judge: 2 of 5" in capsys.readouterr().out


def test_scores_and_exact_average_with_an_unusable_reply(capsys):
    replies = ["85", " 85 \n", "85.", "Score: 85", "85/100", "100", "0", "I cannot judge this."]
    data = entries(len(replies))
    with FakeOllama(replies=replies) as server:
        scores = oe.generate_model_scores(data, "model_response", url=server.chat_url)
        assert server.prompts == [oe.build_score_prompt(e, "model_response") for e in data]
    assert scores == [85, 85, 85, 85, 85, 100, 0]
    out = capsys.readouterr().out
    assert "entry 7" in out and "I cannot judge this." in out
    assert "Replies without a score: 1 of 8" in out
    assert oe.summary_lines(scores, len(data)) == [
        "Number of scores: 7 of 8", "Average score: 75.00"]
    assert oe.summary_lines([], 3) == ["Number of scores: 0 of 3", "Average score: n/a"]


def test_resume_after_interruption_scores_each_entry_once(tmp_path):
    data = entries(12)
    scores_path = tmp_path / "scores.json"
    with FakeOllama(replies=score_by_prompt) as server:
        expected = oe.generate_model_scores(data, "model_response", url=server.url)

    with FakeOllama(replies=score_by_prompt, fail_after=5) as server:
        with pytest.raises(oe.OllamaError, match="HTTP 500"):
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
    assert first_prompts + second_prompts == [
        oe.build_score_prompt(e, "model_response") for e in data]
    assert scores == expected

    with FakeOllama(replies=score_by_prompt) as server:  # finished: nothing left to ask
        assert oe.generate_model_scores(data, "model_response", url=server.url,
                                        scores_path=scores_path) == expected
        assert server.chat_requests == []


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
        with pytest.raises(oe.InputDataError, match="entry 1 has no 'model_response' key"):
            oe.generate_model_scores(data, "model_response", url=server.url)
        assert server.chat_requests == []


@pytest.mark.parametrize(("content", "match"), [
    (None, "input file not found"),
    ("{not json", "not valid JSON \\(line 1"),
    ('{"a": 1}', "expected a JSON list of entries, got dict"),
    ("[]", "the list of entries is empty"),
    ('[{"instruction": "i", "input": "", "output": "o", "model_response": "r"}, 3]',
     "entry 1 is not a JSON object"),
    ('[{"instruction": "i", "input": "", "output": "o", "model_response": "r"},'
     ' {"instruction": "i", "output": "o", "model_response": "r"}]',
     "entry 1 has no 'input' key"),
    ('[{"instruction": "i", "input": "", "output": "o", "model_response": null}]',
     "entry 0: 'model_response' must be a string"),
])
def test_load_entries_errors(tmp_path, content, match):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(oe.InputDataError, match=match):
        oe.load_entries(path, "model_response")


# --- the command line ----------------------------------------------------------------------


def test_cli_full_run_on_the_chapters_110_entries(shared_data, tmp_path, capsys, no_ollama_host):
    data = json.loads((shared_data / "instruction-data-with-response.json").read_text("utf-8"))
    path = write_json(tmp_path / "instruction-data-with-response.json", data)
    replies = ["85", " 70 \n", "90.", "Score: 60", "75/100"]  # 22 of each over 110 entries
    with FakeOllama(replies=replies) as server:
        assert oe.main(["--file_path", str(path), "--host", server.url]) == 0
        assert len(server.chat_requests) == 110
    out = capsys.readouterr().out
    assert "Number of scores: 110 of 110" in out.splitlines()
    assert "Average score: 76.00" in out.splitlines()
    saved = json.loads((tmp_path / "instruction-data-with-response-llama3-scores.json")
                       .read_text("utf-8"))
    assert [r["score"] for r in saved["results"]] == [85, 70, 90, 60, 75] * 22
    png = tmp_path / "instruction-data-with-response-llama3-scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_resumes_after_a_failed_run(tmp_path, capsys, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(6))
    scores_out = tmp_path / "out" / "scores.json"
    args = ["--file_path", str(path), "--model", "phi3:mini", "--scores-out", str(scores_out),
            "--plot", str(tmp_path / "hist.png")]
    with FakeOllama(replies="50", models=["phi3:mini"], fail_after=4) as server:
        assert oe.main([*args, "--host", server.host]) == 1
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "run again to resume" in err
    with FakeOllama(replies="80", models=["phi3:mini"]) as server:
        assert oe.main([*args, "--host", server.host]) == 0
        assert len(server.chat_requests) == 2
    out = capsys.readouterr().out
    assert "Resuming: 4 of 6 entries already scored" in out
    assert "Average score: 60.00" in out  # four 50s from the first run, two 80s
    assert (tmp_path / "hist.png").exists()


def test_cli_server_and_model_problems_exit_1(tmp_path, capsys, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(2))
    port = unused_port()
    assert oe.main(["--file_path", str(path), "--host", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "ollama serve" in err
    with FakeOllama(models=["phi3"]) as server:
        assert oe.main(["--file_path", str(path), "--host", server.url]) == 1
        assert server.chat_requests == []
    assert "ollama pull llama3" in capsys.readouterr().err
    assert not (tmp_path / "data-llama3-scores.json").exists()


def test_cli_takes_the_books_url_and_num_ctx(tmp_path, capsys, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(3))
    with FakeOllama(replies="60") as server:
        book_url = f"http://localhost:{server.port}/api/chat".replace("localhost", "127.0.0.1")
        assert oe.main(["--file_path", str(path), "--host", book_url, "--num-ctx", "8192"]) == 0
        assert {r["path"] for r in server.requests} == {"/api/tags", "/api/chat"}
        assert [body["options"] for body in server.chat_requests] == [
            {"seed": 123, "temperature": 0, "num_ctx": 8192}] * 3
    assert "Average score: 60.00" in capsys.readouterr().out


def test_cli_timeout_flag(tmp_path, capsys, no_ollama_host):
    path = write_json(tmp_path / "data.json", entries(2))
    with FakeOllama(replies="85", delay=1.0) as server:
        start = time.monotonic()
        assert oe.main(["--file_path", str(path), "--host", server.host, "--timeout", "0.2"]) == 1
        assert time.monotonic() - start < 0.9
    assert "sent nothing for 0.2 seconds" in capsys.readouterr().err
    assert oe._parse_args(["--file_path", "x"]).timeout == 300.0  # the default stays 300 s


@pytest.mark.parametrize("flag", [["--timeout", "0"], ["--timeout", "soon"], ["--num-ctx", "0"],
                                  ["--num-ctx", "2.5"], ["--timeout", "-1"]])
def test_cli_bad_numbers_exit_2(tmp_path, capsys, flag):
    path = write_json(tmp_path / "data.json", entries(2))
    assert oe.main(["--file_path", str(path), *flag]) == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert oe.main(["--file_path", str(tmp_path / "missing.json")]) == 2
    assert "input file not found" in capsys.readouterr().err
    path = write_json(tmp_path / "data.json", entries(3))
    assert oe.main(["--file_path", str(path), "--json_key", "response"]) == 2
    assert "entry 0 has no 'response' key" in capsys.readouterr().err
    assert oe.main([]) == 2  # --file_path is required


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

    down = run_cli(["--file_path", str(path)], f"127.0.0.1:{unused_port()}")
    assert down.returncode == 1 and "ollama serve" in down.stderr
    bad = run_cli(["--file_path", str(tmp_path / "missing.json")], "127.0.0.1:1")
    assert bad.returncode == 2 and "input file not found" in bad.stderr
    assert "Traceback" not in down.stderr + bad.stderr


def test_fake_server_runs_as_a_script(tmp_path):
    args = ["--replies", "Score: 85", "70", "--models", "llama3"]
    with fake_ollama_process(tmp_path, *args) as (process, url):
        assert oe.ollama_is_reachable(url)
        assert [oe.query_model("x", url=url) for _ in range(3)] == ["Score: 85", "70", "Score: 85"]
    assert "Fake Ollama listening on http://127.0.0.1:" in process.output
