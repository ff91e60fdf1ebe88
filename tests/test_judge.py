"""The judge's client and its work (instructkit.judge, judge_results, judge_cli), against a
loopback fake Ollama server: addresses, errors, the scoring prompt and reply, saved results."""

import ast
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from fake_ollama import Crash, Fail, FakeOllama, Hangup, StreamError
from loopback_server import free_port, serving

from gpt_instruction_finetuning import format_input
from instructkit import judge, judge_cli, judge_results
from instructkit.errors import ExpectedError
from instructkit.instruction_data import DatasetError

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

ENTRY = {"instruction": "What is the capital of Italy?", "input": "",
         "output": "The capital of Italy is Rome.", "model_response": "Rome."}


def entries(n):
    """`n` small valid entries, each with its own response."""
    return [dict(ENTRY, model_response=f"Rome, #{i}.") for i in range(n)]


@pytest.fixture
def no_ollama_host(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


# --- where the server is ------------------------------------------------------------------


@pytest.mark.parametrize(("env", "expected"), HOST_FORMS)
def test_get_ollama_url_from_environment(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    assert judge.get_ollama_url() == expected


@pytest.mark.parametrize(("host", "expected"), [f for f in HOST_FORMS if f[0] is not None])
def test_get_ollama_url_from_the_host_argument(monkeypatch, host, expected):
    monkeypatch.setenv("OLLAMA_HOST", "elsewhere:1")
    expected = "http://elsewhere:1" if not host.strip() else expected  # empty: not given
    assert judge.get_ollama_url(host) == expected


@pytest.mark.parametrize("value", ["localhost:port", "ftp://example:21", "[::1]:99999"])
def test_invalid_addresses_are_clear_errors(value):
    with pytest.raises(judge.OllamaError, match="Ollama address"):
        judge.get_ollama_url(value)


def test_host_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "elsewhere:1")
    assert judge.get_ollama_url("127.0.0.1:2000") == "http://127.0.0.1:2000"
    with pytest.raises(judge.OllamaError, match="Invalid Ollama address"):
        judge.get_ollama_url("localhost:port")


def test_the_books_default_url_means_the_default_server(monkeypatch):
    """query_model's default, the book's URL, follows OLLAMA_HOST as Ollama's clients do."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert judge.chat_server_url(judge.BOOK_CHAT_URL) == "http://127.0.0.1:11434"
    assert judge.chat_server_url(None) == "http://127.0.0.1:11434"
    monkeypatch.setenv("OLLAMA_HOST", "elsewhere:1")
    assert judge.chat_server_url(judge.BOOK_CHAT_URL) == "http://elsewhere:1"
    assert judge.chat_server_url("http://localhost:5/api/chat") == "http://localhost:5"


def test_errors_are_expected_errors_with_exit_code_1():
    assert issubclass(judge.OllamaError, judge.JudgeServerError)
    assert issubclass(judge.JudgeServerError, ExpectedError)
    assert judge.OllamaError("x").exit_code == 1
    assert judge.SERVERS["ollama"] is judge.OllamaServer
    assert issubclass(judge.OllamaServer, judge.ChatServer)


@pytest.mark.parametrize("form", ["host", "url", "quoted", "book", "ipv4-port"])
def test_ollama_host_reaches_the_server(monkeypatch, form):
    with FakeOllama(replies="Rome is the capital.") as server:
        value = {"host": server.host, "url": server.url, "quoted": f'"{server.host}"',
                 "book": server.chat_url, "ipv4-port": f"127.0.0.1:{server.port}/api/chat/"}[form]
        monkeypatch.setenv("OLLAMA_HOST", value)
        assert judge.ollama_is_reachable()
        judge.ensure_ollama(model="llama3")
        assert judge.ask_judge("What is the capital of Italy?") == "Rome is the capital."
        assert [r["path"] for r in server.requests] == ["/api/version", "/api/tags", "/api/chat"]


def test_reachability_and_models():
    with FakeOllama(models=["llama3", "phi3:mini"]) as server:
        assert judge.ollama_is_reachable(server.url)
        assert judge.ollama_is_reachable(server.chat_url)  # any API URL of the server works
        assert judge.list_models(server.url) == ["llama3:latest", "phi3:mini"]
        assert judge.ensure_ollama(server.url, "llama3") == ["llama3:latest", "phi3:mini"]
        assert judge.ensure_ollama(server.url) == ["llama3:latest", "phi3:mini"]
        judge.ensure_ollama(server.url, "llama3:latest")
        judge.ensure_ollama(server.url, "phi3:mini")
        with pytest.raises(judge.OllamaError, match="ollama pull llama3:70b"):
            judge.ensure_ollama(server.url, "llama3:70b")
    assert not judge.ollama_is_reachable(f"http://127.0.0.1:{free_port()}", timeout=1)


def test_server_down_gives_a_clear_error():
    address = f"http://127.0.0.1:{free_port()}"
    for call in (lambda: judge.ensure_ollama(address, "llama3"),
                 lambda: judge.ask_judge("hi", url=address + "/api/chat")):
        with pytest.raises(judge.OllamaError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"No Ollama server answered at {address} (")
        assert "ollama serve" in message
        assert "OLLAMA_HOST" in message and "--host" in message


@pytest.mark.parametrize(("body", "match"), [
    (b"<html>Sign in</html>", "/api/tags did not answer JSON: is this the Ollama API"),
    (b'{"tags": []}', "/api/tags did not list models: is this Ollama"),
])
def test_another_server_on_the_port_is_named(body, match):
    with serving({"/api/tags": body}) as server:
        with pytest.raises(judge.OllamaError, match=match):
            judge.ensure_ollama(server.url, "llama3")
        assert not judge.ollama_is_reachable(server.url)  # /api/version: 404


# --- asking the judge ----------------------------------------------------------------------


def test_ask_judge_joins_the_stream_and_sends_the_chapter_options():
    reply = "The response is accurate and concise, so I give it 92."
    with FakeOllama(replies=reply, chunk_size=3) as server:
        assert judge.ask_judge("Score this.", url=server.chat_url) == reply
        assert judge.ask_judge("Again.", model="llama3", url=server.url, seed=124,
                               num_ctx=4096) == reply
        first, second = server.chat_requests
    assert first == {
        "model": "llama3",
        "messages": [{"role": "user", "content": "Score this."}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }
    assert second["options"] == {"seed": 124, "temperature": 0, "num_ctx": 4096}


def test_post_chat_gives_the_answers_lines():
    """What the book's query_model reads: the JSON lines, the last one with "done": true."""
    with FakeOllama(replies="Score: 85", chunk_size=4) as server:
        body = judge.OllamaServer(server.url).chat_body("x", "llama3")
        with judge.post_chat(server.url, body) as stream:
            lines = [json.loads(line) for line in stream.iter_lines(decode_unicode=True)]
        with judge.post_chat(server.url, body) as stream:
            raw = list(stream.iter_lines(decode_unicode=False))
    assert [line["message"]["content"] for line in lines] == ["Scor", "e: 8", "5", ""]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert [json.loads(line)["message"] for line in raw] == [line["message"] for line in lines]
    assert all(isinstance(line, bytes) for line in raw)


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
    with FakeOllama(models=["phi3"]) as server, pytest.raises(judge.OllamaError) as info:
        judge.ask_judge("hi", model="llama3", url=server.chat_url)
    assert "ollama pull llama3" in str(info.value)
    assert 'model "llama3" not found' in str(info.value)


@pytest.mark.parametrize(("reply", "match"), [
    (StreamError("out of memory"), "Ollama reported an error: out of memory"),
    (Hangup(), "ended before it was done"),  # the server is still there
    (Fail(503, "the server is busy"), "/api/chat answered HTTP 503: the server is busy"),
])
def test_broken_answers_raise(reply, match):
    with FakeOllama(replies=reply) as server, pytest.raises(judge.OllamaError, match=match):
        judge.ask_judge("hi", url=server.chat_url)


def test_a_server_that_dies_mid_answer_is_reported_as_gone():
    """Half an answer, then the server is gone: the same clear message as a server that was
    never there, saying what happened."""
    with FakeOllama(replies=Crash()) as server:
        with pytest.raises(judge.OllamaError) as info:
            judge.ask_judge("hi", url=server.url)
        assert server.dying
    message = str(info.value)
    assert message.startswith(f"No Ollama server answered at {server.url} (it stopped in the "
                              "middle of an answer")
    assert "ollama serve" in message


def test_read_timeout():
    with FakeOllama(replies="85", delay=1.0) as server:
        start = time.monotonic()
        with pytest.raises(judge.OllamaError, match="sent nothing for 0.1 seconds"):
            judge.ask_judge("hi", url=server.chat_url, timeout=(2, 0.1))
        assert time.monotonic() - start < 0.9


# --- the scoring question and its answer -----------------------------------------------------


@pytest.mark.parametrize("reply", [
    "85", " 85 \n", "85.", "Score: 85", "85/100", "**85**", "85.0", "85%",
    "I would rate this response 85 out of 100.", "On a scale from 0 to 100, I give it 85.",
    "Score (0-100): 85",
])
def test_parse_score_formats(reply):
    assert judge_results.parse_score(reply) == 85


@pytest.mark.parametrize(("reply", "expected"), [
    ("100", 100), ("0", 0), ("100/100", 100), ("0/100", 0),
    ("", None), ("N/A", None), ("The response is correct.", None), ("150", None),
    ("-5", None), ("1000", None), ("85.5", None), (None, None),
])
def test_parse_score_edges(reply, expected):
    assert judge_results.parse_score(reply) == expected


def test_prompt_is_the_chapters(shared_data):
    entry = json.loads((shared_data / "instruction-data-with-response.json").read_text("utf-8"))[0]
    assert judge_results.build_score_prompt(entry, "model_response") == (
        f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only."
    )


# --- the input --------------------------------------------------------------------------------


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
    with pytest.raises(DatasetError, match=match) as info:
        judge_results.load_entries(path, "model_response")
    assert info.value.exit_code == 2


def test_load_entries_without_a_response_key(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]), "utf-8")
    assert judge_results.load_entries(path, json_key=None)[0]["output"] == "o"
    with pytest.raises(DatasetError, match="entry 0 has no 'model_response' key"):
        judge_results.load_entries(path)


# --- results saved entry by entry --------------------------------------------------------------


def test_run_resumable_saves_as_it_goes_and_resumes(tmp_path, capsys):
    path = tmp_path / "results.json"
    header = {"format": 1, "kind": "test"}
    calls = []

    def work(index):
        calls.append(index)
        if index == 3:
            raise KeyboardInterrupt  # the run stops at entry 3
        return None if index == 1 else {"value": index * 10}  # entry 1: no result this time

    with pytest.raises(KeyboardInterrupt):
        judge_results.run_resumable(5, work, path, header, "fp-1")
    saved = json.loads(path.read_text("utf-8"))
    assert saved == {"format": 1, "kind": "test", "fingerprint": "fp-1", "num_entries": 5,
                     "results": [{"index": 0, "value": 0}, {"index": 2, "value": 20}]}

    calls.clear()
    results = judge_results.run_resumable(5, lambda i: calls.append(i) or {"value": i * 10},
                                          path, header, "fp-1", done="counted")
    assert calls == [1, 3, 4]  # only the entries without a result
    assert results == {i: {"index": i, "value": i * 10} for i in range(5)}
    assert "Resuming: 2 of 5 entries already counted in" in capsys.readouterr().out

    calls.clear()
    judge_results.run_resumable(5, lambda i: calls.append(i) or {"value": 0}, path, header, "fp-2")
    assert calls == [0, 1, 2, 3, 4]  # other work: all again
    assert "different input or judge model; starting fresh" in capsys.readouterr().out


def test_an_unreadable_results_file_starts_fresh(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text("{half a file", encoding="utf-8")
    results = judge_results.ResumableResults(3, path, {}, "fp")
    assert len(results) == 0 and 0 not in results
    assert f"Could not read the saved results {path}; starting fresh." in capsys.readouterr().out


def test_scores_record_and_fingerprint(tmp_path, capsys):
    data = entries(3)
    path = tmp_path / "scores.json"
    record = judge_results.open_scores(data, "model_response", "llama3", path)
    record.add_score(0, "85.", 85)
    record.add_score(1, None, 0)
    record.add_score(2, "no idea", None)
    record.report()
    assert capsys.readouterr().out.splitlines() == [
        "Empty responses scored 0 without asking the judge: 1 of 3",
        "Replies without a score: 1 of 3"]
    saved = json.loads(path.read_text("utf-8"))
    assert saved["model"] == "llama3" and saved["json_key"] == "model_response"
    assert saved["format"] == judge_results.SCORES_FORMAT == 1
    assert saved["results"] == [
        {"index": 0, "reply": "85.", "score": 85},
        {"index": 1, "reply": None, "score": 0, "empty_response": True},
        {"index": 2, "reply": "no idea", "score": None}]
    # The fingerprint: sha256 of the settings, then each prompt after a zero byte.
    digest = hashlib.sha256(json.dumps({"format": 1, "model": "llama3", "json_key": "model_response",
                                        "n": 3}, sort_keys=True).encode())
    for entry in data:
        digest.update(b"\0" + judge_results.build_score_prompt(entry, "model_response").encode())
    assert saved["fingerprint"] == digest.hexdigest()
    again = judge_results.open_scores(data, "model_response", "llama3", path)
    assert [again.score(i) for i in range(3)] == [85, 0, None]
    assert len(judge_results.open_scores(data, "model_response", "phi3", path)) == 0


def test_open_scores_checks_the_entries_first(tmp_path):
    data = entries(2)
    del data[1]["model_response"]
    with pytest.raises(DatasetError, match="entry 1 has no 'model_response' key"):
        judge_results.open_scores(data, "model_response", "llama3", tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_histogram_and_outputs(tmp_path, capsys):
    png = judge_results.plot_scores([85, 90, 0, 100], tmp_path / "h.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    judge_results.save_outputs([85, 70], tmp_path / "in.json", "llama3", tmp_path / "s.json",
                               tmp_path / "sub" / "h.png")
    assert capsys.readouterr().out.splitlines() == [
        f"Scores saved to {tmp_path / 's.json'}", f"Histogram saved to {tmp_path / 'sub' / 'h.png'}"]
    assert (tmp_path / "sub" / "h.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ExpectedError, match="could not save the histogram to .*h.nosuchformat"):
        judge_results.save_outputs([85], tmp_path / "in.json", "llama3", None,
                                   tmp_path / "h.nosuchformat")
    judge_results.save_outputs([], tmp_path / "in.json", "llama3", None, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()  # no scores, no histogram


# --- the command-line options ------------------------------------------------------------------


def evaluate_parser():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--file_path")
    return judge_cli.add_evaluate_arguments(parser)


def test_evaluate_options_and_their_defaults(no_ollama_host):
    args = evaluate_parser().parse_args(["--file_path", "x.json"])
    assert (args.json_key, args.model, args.host, args.num_ctx, args.timeout, args.scores_out,
            args.plot, args.debug) == ("model_response", "llama3", None, 2048, 300.0, None, None,
                                       False)
    args = evaluate_parser().parse_args(
        ["--json-key", "r", "--model", "phi3", "--host", "h:1", "--num_ctx", "4096",
         "--timeout", "2.5", "--scores_out", "s.json", "--plot", "p.png", "--debug"])
    assert (args.json_key, args.model, args.host, args.num_ctx, args.timeout, args.scores_out,
            args.plot, args.debug) == ("r", "phi3", "h:1", 4096, 2.5, "s.json", "p.png", True)
    assert judge_cli.server_options(args) == {"model": "phi3", "timeout": (5.0, 2.5),
                                              "num_ctx": 4096}


@pytest.mark.parametrize("flag", [["--timeout", "0"], ["--timeout", "soon"], ["--num-ctx", "0"],
                                  ["--num-ctx", "2.5"], ["--timeout", "-1"]])
def test_bad_numbers_are_usage_errors(capsys, flag):
    with pytest.raises(SystemExit) as info:
        evaluate_parser().parse_args(flag)
    assert info.value.code == 2
    assert f"argument {flag[0]}" in capsys.readouterr().err


def test_output_paths(tmp_path):
    data = tmp_path / "answers.json"
    assert judge_cli.output_paths(data, "llama3") == (
        tmp_path / "answers-llama3-scores.json", tmp_path / "answers-llama3-scores.png")
    assert judge_cli.output_paths(data, "library/phi3:mini")[0].name == \
        "answers-library-phi3-mini-scores.json"
    assert judge_cli.output_paths(data, "llama3", "s.json", "p.svg") == (
        Path("s.json"), Path("p.svg"))


# --- no torch, and no root file --------------------------------------------------------------

JUDGE_MODULES = ("judge", "judge_http", "judge_results", "judge_cli")


@pytest.mark.parametrize("name", JUDGE_MODULES)
def test_the_judge_modules_import_no_root_file(name):
    """A package module does not import the book's files (ollama_evaluate imports it)."""
    roots = {p.stem for p in ROOT.glob("*.py")}
    tree = ast.parse((ROOT / "instructkit" / f"{name}.py").read_text("utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & (roots | {"torch"})


def test_the_judge_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            + "; ".join(f"import instructkit.{name}" for name in JUDGE_MODULES)
            + "; import ollama_evaluate, instructkit.make_preference_data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['torch']"  # only the blocker itself
