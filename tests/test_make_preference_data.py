"""Preference data made with the judge: polite (chosen) and rude (rejected) rewrites of each
answer, against the loopback fake Ollama server, with resume and bad replies."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from fake_ollama import (
    POLITE_PREFIX,
    RUDE_PREFIX,
    FakeOllama,
    fake_ollama_process,
    rewrite_reply,
)
from loopback_server import free_port
from portable import new_group_kwargs, send_interrupt
from test_ollama_evaluate import WITHOUT_TORCH, write_json

from instructkit import make_preference_data as mpd
from instructkit.instruction_data import DatasetError
from instructkit.judge import OllamaError

ENTRIES = [
    {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
     "input": "freind --> friend", "output": "The spelling of the given phrase \"freind\" is "
     "incorrect, the correct spelling is \"friend\"."},
    {"instruction": "Edit the following sentence for grammar.", "input": "He go to the park "
     "every day.", "output": "He goes to the park every day."},
    {"instruction": "Convert 45 kilometers to meters.", "input": "",
     "output": "45 kilometers is 45000 meters."},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
]


def entries(n):
    """`n` small valid entries (the four above, each output made distinct)."""
    return [dict(ENTRIES[i % 4], output=f"{ENTRIES[i % 4]['output']} ({i})") for i in range(n)]


def expected_pair(entry):
    return {**entry, "chosen": POLITE_PREFIX + entry["output"],
            "rejected": RUDE_PREFIX + entry["output"]}


def both_prompts(data):
    return [mpd.build_rewrite_prompt(e, p) for e in data for p in ("polite", "impolite")]


# --- prompts and replies -------------------------------------------------------------------


def test_prompt_is_the_books_with_its_typos_fixed():
    entry = ENTRIES[2]
    assert mpd.build_rewrite_prompt(entry, "impolite") == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nConvert 45 kilometers to "
        "meters.` and correct output `45 kilometers is 45000 meters.`, slightly rewrite the "
        "output to be more impolite. Keep the modification minimal. Only return the generated "
        "response and nothing else."
    )


@pytest.mark.parametrize(("reply", "expected"), [
    ("Thank you!", "Thank you!"), ("  Thank you!\n", "Thank you!"), ("`Thank you!`", "Thank you!"),
    ("``` Thank you! ```", "Thank you!"), ("", None), (" \n\t", None), ("``", None),
    ("`a` and `b`", "a` and `b"),
])
def test_clean_rewrite(reply, expected):
    assert mpd.clean_rewrite(reply) == expected


def test_fake_server_rewrites_deterministically():
    entry = ENTRIES[1]
    assert rewrite_reply(mpd.build_rewrite_prompt(entry, "polite")) == POLITE_PREFIX + entry["output"]
    assert rewrite_reply(mpd.build_rewrite_prompt(entry, "impolite")) == RUDE_PREFIX + entry["output"]
    assert rewrite_reply("Score this.") == "85"


# --- making the pairs ----------------------------------------------------------------------


def test_pairs_are_the_polite_and_rude_rewrites(capsys):
    data = entries(5)
    data[0]["id"] = "kept"  # other keys stay
    with FakeOllama(replies=rewrite_reply) as server:
        pairs, missing = mpd.make_preference_data(data, url=server.url, num_ctx=4096)
        assert server.prompts == both_prompts(data)
        assert {(b["options"]["seed"], b["options"]["num_ctx"]) for b in server.chat_requests} \
            == {(123, 4096)}
    assert missing == []
    assert pairs == [expected_pair(e) for e in data]
    assert pairs[0]["id"] == "kept"
    assert data[0].keys() == {"instruction", "input", "output", "id"}  # the input is not changed


def test_an_empty_reply_is_asked_again_with_another_seed(capsys):
    data = entries(3)

    def judge(prompt, body):
        if body["options"]["seed"] == 123 and data[1]["output"] in prompt:
            return "  \n"  # entry 1's first replies are empty; the second try answers
        return rewrite_reply(prompt)

    with FakeOllama(replies=judge) as server:
        pairs, missing = mpd.make_preference_data(data, url=server.url)
        seeds = [b["options"]["seed"] for b in server.chat_requests]
    assert seeds == [123, 123, 123, 124, 123, 124, 123, 123]
    assert missing == [] and pairs == [expected_pair(e) for e in data]


@pytest.mark.parametrize(("bad", "message"), [
    ("empty", "Entry 1: the impolite rewrite came back empty twice; left out."),
    ("same", "Entry 1: the polite and the impolite rewrite are the same text"),
])
def test_unusable_rewrites_are_reported_left_out_and_retried_next_run(tmp_path, capsys, bad,
                                                                         message):
    data = entries(4)
    progress = tmp_path / "progress.json"

    def judge(prompt, body):
        if data[1]["output"] in prompt and bad == "same":
            return "Same words."
        if data[1]["output"] in prompt and "more impolite" in prompt:
            return ""
        return rewrite_reply(prompt)

    with FakeOllama(replies=judge) as server:
        pairs, missing = mpd.make_preference_data(data, url=server.url, progress_path=progress)
        asked = len(server.chat_requests)
    assert message in capsys.readouterr().out
    assert missing == [1]
    assert pairs == [expected_pair(data[i]) for i in (0, 2, 3)]
    assert asked == (9 if bad == "empty" else 8)  # an empty reply is asked twice
    saved = json.loads(progress.read_text("utf-8"))
    assert [r["index"] for r in saved["results"]] == [0, 2, 3]
    assert "Same words." not in json.dumps(saved) and '""' not in json.dumps(saved)

    with FakeOllama(replies=rewrite_reply) as server:  # the next run asks only for entry 1
        pairs, missing = mpd.make_preference_data(data, url=server.url, progress_path=progress)
        assert server.prompts == both_prompts(data[1:2])
    assert missing == [] and pairs == [expected_pair(e) for e in data]


def test_resume_after_the_server_dies_mid_run(tmp_path):
    data = entries(6)
    progress = tmp_path / "progress.json"
    with FakeOllama(replies=rewrite_reply, die_after=7) as server:
        with pytest.raises(OllamaError, match="No Ollama server answered"):
            mpd.make_preference_data(data, url=server.url, progress_path=progress)
        assert server.answered == 7
    saved = json.loads(progress.read_text("utf-8"))
    assert [r["index"] for r in saved["results"]] == [0, 1, 2]  # the 7th answer had no pair yet

    with FakeOllama(replies=rewrite_reply) as server:
        pairs, missing = mpd.make_preference_data(data, url=server.url, progress_path=progress)
        assert server.prompts == both_prompts(data[3:])
    assert missing == [] and pairs == [expected_pair(e) for e in data]

    with FakeOllama(replies=rewrite_reply) as server:  # done: nothing left to ask
        assert mpd.make_preference_data(data, url=server.url, progress_path=progress)[0] == pairs
        assert server.chat_requests == []


def test_another_model_starts_fresh(tmp_path, capsys):
    data = entries(2)
    progress = tmp_path / "progress.json"
    with FakeOllama(replies=rewrite_reply, models=["llama3", "phi3"]) as server:
        mpd.make_preference_data(data, url=server.url, progress_path=progress)
        mpd.make_preference_data(data, model="phi3", url=server.url, progress_path=progress)
        assert len(server.chat_requests) == 8
    assert "different input or judge model; starting fresh" in capsys.readouterr().out
    assert json.loads(progress.read_text("utf-8"))["model"] == "phi3"


def test_output_is_validated_before_it_is_written(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(DatasetError, match="entry 0 has no 'rejected' key"):
        mpd.save_preference_data([{**ENTRIES[0], "chosen": "x"}], path)
    assert not path.exists()
    mpd.save_preference_data([expected_pair(ENTRIES[0])], path)
    assert json.loads(path.read_text("utf-8")) == [expected_pair(ENTRIES[0])]


# --- the command line ----------------------------------------------------------------------


def test_cli_writes_the_preference_file(tmp_path, capsys):
    data = entries(4)
    path = write_json(tmp_path / "instruction-data.json", data)
    with FakeOllama(replies=rewrite_reply) as server:
        assert mpd.main(["--file_path", str(path), "--host", server.chat_url]) == 0
    out = tmp_path / "instruction-data-with-preference.json"
    assert json.loads(out.read_text("utf-8")) == [expected_pair(e) for e in data]
    assert "Saved 4 of 4 entries with chosen and rejected to" in capsys.readouterr().out
    assert (tmp_path / "instruction-data-with-preference-progress.json").exists()


def test_cli_left_out_entries_exit_1(tmp_path, capsys):
    data = entries(3)
    path = write_json(tmp_path / "data.json", data)
    out = tmp_path / "pairs.json"
    with FakeOllama(replies=lambda p, b: "" if data[2]["output"] in p else rewrite_reply(p)) as s:
        assert mpd.main(["--file_path", str(path), "--host", s.host, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 entries got no usable rewrite and are not in the output (entries 2)" in err
    assert json.loads(out.read_text("utf-8")) == [expected_pair(e) for e in data[:2]]


def test_cli_server_and_model_problems_exit_1(tmp_path, capsys):
    path = write_json(tmp_path / "data.json", entries(2))
    port = free_port()
    assert mpd.main(["--file_path", str(path), "--host", f"127.0.0.1:{port}"]) == 1
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().err
    with FakeOllama(models=["phi3"]) as server:
        assert mpd.main(["--file_path", str(path), "--host", server.url]) == 1
        assert server.chat_requests == []
    assert "ollama pull llama3" in capsys.readouterr().err
    assert not (tmp_path / "data-with-preference.json").exists()


@pytest.mark.parametrize(("content", "match"), [
    (None, "input file not found"),
    ("{not json", "not valid JSON"),
    ('[{"instruction": "i", "output": "o"}]', "entry 0 has no 'input' key"),
    ('[{"instruction": "i", "input": "", "output": 3}]', "entry 0: 'output' must be a string"),
])
def test_cli_bad_input_exits_2_before_any_request(tmp_path, capsys, content, match):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with FakeOllama(replies=rewrite_reply) as server:
        assert mpd.main(["--file_path", str(path), "--host", server.host]) == 2
        assert server.requests == []
    assert match in capsys.readouterr().err


def run_cli(args):
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "instructkit/make_preference_data.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("death", ["--die-after", "--crash-after"])
def test_cli_subprocess_resumes_after_the_server_process_dies(tmp_path, death):
    """Real processes, torch made unimportable: the server exits after 5 answers (between two
    answers, or in the middle of the 6th), then a new one finishes the job."""
    data = entries(5)
    path = write_json(tmp_path / "data.json", data)
    out = tmp_path / "pairs.json"
    with fake_ollama_process(tmp_path, "--rewrites", death, "5") as (process, url):
        first = run_cli(["--file_path", str(path), "--host", url, "--output", str(out)])
        process.wait(timeout=30)
    assert first.returncode == 1, first.stderr
    assert f"error: No Ollama server answered at {url} (" in first.stderr
    if death == "--crash-after":
        assert "(it stopped in the middle of an answer" in first.stderr
    assert "run again to resume" in first.stderr
    assert "Traceback" not in first.stderr and not out.exists()

    with fake_ollama_process(tmp_path, "--rewrites") as (process, url):
        second = run_cli(["--file_path", str(path), "--host", url, "--output", str(out)])
    assert second.returncode == 0, second.stderr
    assert "Resuming: 2 of 5 entries already rewritten" in second.stdout
    assert json.loads(out.read_text("utf-8")) == [expected_pair(e) for e in data]


def test_cli_ctrl_c_keeps_the_finished_pairs(tmp_path):
    data = entries(4)
    path = write_json(tmp_path / "data.json", data)
    out, progress = tmp_path / "pairs.json", tmp_path / "pairs-progress.json"
    with FakeOllama(replies=rewrite_reply, delay=0.02) as server:  # about 1 s per reply
        process = subprocess.Popen(
            [sys.executable, "-m", "instructkit.make_preference_data", "--file_path", str(path), "--host",
             server.host, "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, **new_group_kwargs())
        deadline = time.monotonic() + 60
        while not progress.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        send_interrupt(process)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"Interrupted. Results so far are in {progress}; run again to resume." in err
    assert "Traceback" not in err and not out.exists()
    done = [r["index"] for r in json.loads(progress.read_text("utf-8"))["results"]]
    assert done and done == list(range(len(done))) and len(done) < 4
