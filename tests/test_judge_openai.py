"""The judge on an OpenAI-compatible server: the client, `python -m instructkit.score`, and the key.

The server is tests/fake_openai.py on the loopback, with scripted replies (scores, a 401, a 429
then success, a 500, a hang). The commands run in-process (`main(argv)`).
"""

import json

import pytest
from fake_openai import FakeOpenAI, Hang, Status
from loopback_server import free_port

from instructkit import judge, score
from instructkit.judge_results import build_score_prompt, scores_fingerprint

KEY = "sk-test-0123456789abcdefSECRET"


def entries(n=4):
    return [{"instruction": f"Name color {i}.", "input": "" if i % 2 else f"hint {i}",
             "output": f"Color {i}.", "model_response": f"Colour {i}."} for i in range(n)]


def write_entries(tmp_path, n=4):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(entries(n)), encoding="utf-8")
    return path


def run_score(path, server, *extra):
    return score.main(["--file-path", str(path), "--api", "openai", "--base-url", server.base_url,
                       "--model", "judge", *extra])


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(judge.OpenAIServer, "retry_base", 0.001)


@pytest.mark.parametrize("given, expected", [
    (None, "https://api.openai.com/v1"),
    ("127.0.0.1:8080", "http://127.0.0.1:8080/v1"),
    ("http://localhost:8000/v1/", "http://localhost:8000/v1"),
    ("http://localhost:8000/v1/chat/completions", "http://localhost:8000/v1"),
    ("https://example.com/openai/v1/models", "https://example.com/openai/v1"),
    (" 'http://[::1]:8080' ", "http://[::1]:8080/v1"),
])
def test_openai_base_url_forms(given, expected):
    assert judge.openai_base_url(given) == expected


def test_openai_base_url_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "10.0.0.5:9000")
    assert judge.openai_base_url(None) == "http://10.0.0.5:9000/v1"
    with pytest.raises(judge.OpenAIError, match="Invalid API address"):
        judge.openai_base_url("ftp://host/v1")


def test_scoring_with_a_key_same_prompt_scores_and_histogram(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = write_entries(tmp_path)
    with FakeOpenAI(replies=["85", "Score: 90", "70/100", "no idea"], api_key=KEY) as server:
        assert run_score(path, server) == 0
    out = capsys.readouterr().out
    assert "Number of scores: 3 of 4" in out and "Average score: 81.67" in out
    assert "Could not convert score: no idea" in out
    # the chapter's prompt, streamed back in pieces, the key as a bearer token
    assert server.prompts == [build_score_prompt(e, "model_response") for e in entries()]
    assert all(h == f"Bearer {KEY}" for h in server.auth_headers)
    body = server.requests[0]
    assert (body["model"], body["temperature"], body["seed"], body["stream"]) == ("judge", 0, 123, True)
    saved = json.loads((tmp_path / "answers-judge-scores.json").read_text(encoding="utf-8"))
    assert [r["score"] for r in saved["results"]] == [85, 90, 70, None]
    # the same file (and fingerprint) as ollama_evaluate.py writes: either resumes the other
    assert saved["fingerprint"] == scores_fingerprint(entries(), "model_response", "judge")
    assert (tmp_path / "answers-judge-scores.png").read_bytes().startswith(b"\x89PNG")


def test_api_key_env_names_another_variable(tmp_path, monkeypatch, capsys):
    path = write_entries(tmp_path, 2)
    with FakeOpenAI(replies="50", api_key=KEY) as server:
        assert run_score(path, server, "--api-key-env", "MY_JUDGE_KEY") == 2
        assert capsys.readouterr().err.strip() == (
            "error: --api-key-env MY_JUDGE_KEY: the environment variable MY_JUDGE_KEY is not set")
        monkeypatch.setenv("MY_JUDGE_KEY", KEY)
        assert run_score(path, server, "--api-key-env", "MY_JUDGE_KEY") == 0
    assert "Average score: 50.00" in capsys.readouterr().out


@pytest.mark.parametrize("key", [None, "sk-wrong-key-SECRET"])
def test_401_says_which_variable_to_set_and_never_shows_the_key(tmp_path, monkeypatch, capsys, key):
    if key:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    path = write_entries(tmp_path, 2)
    with FakeOpenAI(replies="50", api_key=KEY) as server:
        assert run_score(path, server) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: The server at ") and "\n" not in err
    assert "HTTP 401" in err and "OPENAI_API_KEY" in err
    assert ("refused the API key" if key else "asks for an API key") in err
    if key:  # the fake server quotes the key it got, as OpenAI does: the client hides it
        assert key not in captured.err + captured.out and "***" in err
    assert server.requests == []  # stopped at GET /models, before any chat


def test_429_is_retried_after_retry_after_then_succeeds():
    with FakeOpenAI(replies=[Status(429, "Rate limit reached", retry_after=2), Status(503), "77"]) as fake:
        server = judge.judge_server(fake.base_url, 5, api="openai")
        waits = []
        server.sleep = waits.append
        assert server.chat("score this", "judge") == "77"
    assert waits == [2.0, 0.002]  # the server's Retry-After, then retry_base * 2 ** 1
    assert len(fake.requests) == 3


def test_429_gives_up_after_bounded_retries(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(judge.OpenAIServer, "max_retries", 2)
    path = write_entries(tmp_path, 2)
    with FakeOpenAI(replies=Status(429, "Rate limit reached")) as server:
        assert run_score(path, server) == 1
    err = capsys.readouterr().err
    assert "answered HTTP 429: Rate limit reached (still after 2 retries" in err
    assert len(server.requests) == 3


def test_500_is_one_line_with_the_resume_hint_and_a_rerun_resumes(tmp_path, capsys):
    path = write_entries(tmp_path, 4)
    scores_file = tmp_path / "answers-judge-scores.json"
    with FakeOpenAI(replies=["85", "90", Status(500, "model crashed")]) as server:
        assert run_score(path, server) == 1
    err = capsys.readouterr().err
    assert "answered HTTP 500: model crashed" in err
    assert f"Results so far are in {scores_file}; run again to resume." in err
    with FakeOpenAI(replies="60") as server:  # the run again asks only for the two missing
        assert run_score(path, server) == 0
    assert len(server.requests) == 2
    assert "Resuming: 2 of 4 entries already scored" in capsys.readouterr().out
    saved = json.loads(scores_file.read_text(encoding="utf-8"))
    assert [r["score"] for r in saved["results"]] == [85, 90, 60, 60]


def test_a_silent_server_times_out(tmp_path, capsys):
    path = write_entries(tmp_path, 2)
    with FakeOpenAI(replies=Hang(30)) as server:
        assert run_score(path, server, "--timeout", "0.3") == 1
    err = capsys.readouterr().err
    assert "sent nothing for 0.3 seconds" in err and "OpenAI-compatible" in err


def test_no_server_and_a_missing_model(tmp_path, capsys):
    path = write_entries(tmp_path, 2)
    assert score.main(["--file-path", str(path), "--api", "openai", "--base-url",
                       f"127.0.0.1:{free_port()}", "--model", "judge"]) == 1
    assert "error: No OpenAI-compatible server answered at http://127.0.0.1:" in capsys.readouterr().err
    with FakeOpenAI(models=["qwen2.5-7b", "llama3"], strict_models=True) as server:
        assert run_score(path, server) == 1
    err = capsys.readouterr().err.strip()
    assert "has no model 'judge' (HTTP 404: The model `judge` does not exist" in err
    assert err.endswith("it offers: llama3, qwen2.5-7b. Name one with --model.")


def test_a_whole_json_reply_and_an_error_event_are_read():
    with FakeOpenAI(replies="88") as fake:
        server = judge.judge_server(fake.base_url, 5, api="openai")
        body = {**server.chat_body("p", "judge"), "stream": False}
        with server.post_chat(body) as stream:
            assert "".join(stream.pieces()) == "88"
    assert server.read_line(": keep-alive", "u") == ("", False)
    assert server.read_line("data: [DONE]", "u") == ("", True)
    with pytest.raises(judge.OpenAIError, match="The server reported an error: overloaded"):
        server.read_line('data: {"error": {"message": "overloaded"}}', "u")


def test_the_api_key_appears_in_no_output_and_no_file(tmp_path, monkeypatch, capsys):
    """Scoring and comparing with a key, including a 401 whose body quotes a wrong key: the key
    is in no printed line and no file written."""
    from instructkit import compare

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    path = write_entries(tmp_path, 3)
    def reply(prompt, body):
        return "A" if "Which response is better?" in prompt else "80"

    with FakeOpenAI(replies=reply, api_key=KEY) as server:
        assert run_score(path, server) == 0
        assert compare.main([str(path), str(path), "--key-b", "output", "--api", "openai",
                             "--base-url", server.base_url, "--model", "judge"]) == 0
    with FakeOpenAI(replies="A", api_key="another-key") as server:
        assert run_score(path, server, "--debug") == 1
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.err
    texts = [captured.out, captured.err]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in written} == {".json", ".png"} and len(written) == 5
    texts += [p.read_bytes().decode("latin-1") for p in written]
    assert all(KEY not in text for text in texts)
    assert "OpenAIServer('http" in repr(judge.judge_server(server.base_url, api="openai", api_key=KEY))
    assert KEY not in repr(judge.judge_server(server.base_url, api="openai", api_key=KEY))


def test_a_killed_scoring_run_resumes(tmp_path, capsys):
    """`python -m instructkit.score` killed while the judge is silent: the scores saved stay,
    and the run again asks only for the rest."""
    from conftest import ROOT
    from fake_openai import hang_after, kill_when_saved

    path = write_entries(tmp_path, 4)
    scores_file = tmp_path / "answers-judge-scores.json"
    with FakeOpenAI(replies=hang_after(3, "85")) as server:
        saved = kill_when_saved(["-m", "instructkit.score", "--file-path", str(path), "--api",
                                 "openai", "--base-url", server.base_url, "--model", "judge"],
                                scores_file, 3, cwd=ROOT)
    assert [r["score"] for r in saved["results"]] == [85, 85, 85]
    with FakeOpenAI(replies="40") as server:
        assert run_score(path, server) == 0
    assert len(server.requests) == 1
    assert "Average score: 73.75" in capsys.readouterr().out


def test_a_server_without_models_endpoint_is_still_used(monkeypatch):
    """GET /models answering 404 (a proxy that lacks it) does not stop the check; a chat that
    answers 404 there is reported as a missing model, without a listing."""
    with FakeOpenAI(replies="61") as fake:
        server = judge.judge_server(fake.base_url.removesuffix("/v1") + "/v2", 5, api="openai")
        assert server.ensure_model("judge") == []  # /v2/models: 404, taken as "no listing"
        with pytest.raises(judge.OpenAIError) as caught:
            server.chat("p", "judge")  # /v2/chat/completions: no route
    assert str(caught.value).endswith("has no model 'judge' (HTTP 404: no route "
                                      "/v2/chat/completions). Name one with --model.")
