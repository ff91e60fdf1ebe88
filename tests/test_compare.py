"""Head-to-head comparison (instructkit.compare) and judge agreement (instructkit.judge_agreement),
against the loopback OpenAI-compatible server of tests/fake_openai.py."""

import json
import math
import re

import numpy as np
import pytest
from fake_openai import FakeOpenAI, Status

from instructkit import compare, judge, judge_agreement


def answers(n=5, tag="sft"):
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}.",
             "model_response": f"{tag} answer {i}"} for i in range(n)]


def write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def run_compare(a, b, server, *extra):
    return compare.main([str(a), str(b), "--api", "openai", "--base-url", server.base_url,
                         "--judge-model", "judge", *extra])


def prefers(tag):
    """A consistent judge: it names the position of the answer containing `tag`."""
    def reply(prompt, body):
        first = re.search(r"Response A: `(.*?)`", prompt).group(1)
        return "A" if tag in first else "B"
    return reply


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("b", "B"), ("**B**", "B"), ("A.", "A"), ("[[A]]", "A"), ("[[C]]", "tie"),
    ("Response B", "B"), ("Response B is better.", "B"), ("B is better", "B"), ("Tie", "tie"),
    ("Equal", "tie"), ("Response A and Response B are both fine", None), ("", None),
    ("I cannot decide", None), ("A good answer is hard to find", None),
])
def test_parse_verdict(reply, verdict):
    assert compare.parse_verdict(reply) == verdict


def test_outcome_rule():
    assert compare.outcome("A", "B") == ("win", False)  # A's answer preferred in both orders
    assert compare.outcome("B", "A") == ("loss", False)
    assert compare.outcome("A", "A") == ("tie", True)  # the first position both times
    assert compare.outcome("tie", "tie") == ("tie", False)
    assert compare.outcome("A", "tie") == ("tie", True)
    assert compare.outcome(None, "A") == (None, False)


def test_wilson_interval_against_hand_computed_values():
    low, high = compare.wilson_interval(0.5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = compare.wilson_interval(0.9, 100)  # 90 of 100
    assert (round(low, 4), round(high, 4)) == (0.8256, 0.9448)
    assert compare.wilson_interval(0.0, 0) == (0.0, 1.0)


def test_a_judge_that_always_prefers_the_first_position(tmp_path, capsys):
    a, b = write(tmp_path / "sft.json", answers()), write(tmp_path / "dpo.json", answers(tag="dpo"))
    with FakeOpenAI(replies="A") as server:
        assert run_compare(a, b, server) == 0
    out = capsys.readouterr().out
    assert "sft vs dpo: 0 wins, 5 ties, 0 losses over 5 entries" in out
    assert "Win rate of sft: 50.0% (95% interval" in out
    assert "Judge inconsistent when the order was swapped: 5 entries (100.0%)" in out
    assert len(server.requests) == 10  # each entry twice
    # the second order shows B's answer first
    assert "sft answer 0" in server.prompts[0].split("Response B:")[0]
    assert "dpo answer 0" in server.prompts[1].split("Response B:")[0]
    results = json.loads((tmp_path / "sft-vs-dpo-judge-compare.json").read_text(encoding="utf-8"))
    assert results["model"] == "judge" and len(results["results"]) == 5
    assert all(r["outcome"] == "tie" and r["inconsistent"] for r in results["results"])
    assert (tmp_path / "sft-vs-dpo-judge-compare.png").read_bytes().startswith(b"\x89PNG")


def test_a_consistent_judge_one_file_two_keys_and_empty_answers(tmp_path, capsys):
    data = answers(6)
    for entry in data:
        entry["dpo_response"] = entry["model_response"].replace("sft", "dpo")
    data[5]["sft_response"] = data[5]["model_response"] = " "  # empty: loses unasked
    for entry in data:
        entry["sft_response"] = entry["model_response"]
    path = write(tmp_path / "answered.json", data)
    with FakeOpenAI(replies=prefers("dpo")) as server:
        assert run_compare(path, path, server, "--key-a", "dpo_response", "--key-b",
                           "sft_response", "--results-out", str(tmp_path / "h2h.json")) == 0
    out = capsys.readouterr().out
    assert "dpo_response vs sft_response: 6 wins, 0 ties, 0 losses over 6 entries" in out
    low, high = compare.wilson_interval(1.0, 6)
    assert f"Win rate of dpo_response: 100.0% (95% interval {100 * low:.1f}% to 100.0%" in out
    assert "inconsistent when the order was swapped: 0 entries (0.0%)" in out
    assert len(server.requests) == 10  # the empty answer was not asked about
    assert (tmp_path / "h2h.png").is_file()


def test_different_entries_are_refused_before_any_request(tmp_path, capsys):
    other = answers()
    other[3]["instruction"] = "Say something else."
    a, b = write(tmp_path / "a.json", answers()), write(tmp_path / "b.json", other)
    with FakeOpenAI() as server:
        assert run_compare(a, b, server) == 2
        assert "entry 3 differs between" in capsys.readouterr().err
        assert run_compare(a, write(tmp_path / "c.json", answers(4)), server) == 2
        assert "has 5 entries and" in capsys.readouterr().err
        assert run_compare(a, a, server) == 2
        assert "one file, one key" in capsys.readouterr().err
    assert server.requests == []


def test_a_stopped_comparison_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(judge.OpenAIServer, "retry_base", 0.001)
    a, b = write(tmp_path / "sft.json", answers()), write(tmp_path / "dpo.json", answers(tag="dpo"))
    with FakeOpenAI(replies=["B", "A", "B", "A", Status(500, "killed")]) as server:
        assert run_compare(a, b, server) == 1
    err = capsys.readouterr().err
    assert "Results so far are in" in err and "run again to resume" in err
    with FakeOpenAI(replies=prefers("dpo")) as server:
        assert run_compare(a, b, server) == 0
    out = capsys.readouterr().out
    assert "Resuming: 2 of 5 entries already compared" in out
    assert len(server.requests) == 6  # the three entries missing, in both orders
    assert "sft vs dpo: 0 wins, 0 ties, 5 losses over 5 entries" in out


# ---------------------------------------------------------------------------------------
# Judge agreement
# ---------------------------------------------------------------------------------------


def test_ranks_and_correlations_against_hand_computed_values():
    assert judge_agreement.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    x, y = [1, 2, 3, 4], [2, 4, 5, 4]
    # by hand: dx = (-1.5, -.5, .5, 1.5), dy = (-1.75, .25, 1.25, .25): 3.5 / sqrt(5 * 4.75)
    assert math.isclose(judge_agreement.pearson(x, y), 3.5 / math.sqrt(5 * 4.75))
    # ranks of y: (1, 2.5, 4, 2.5), less their mean (-1.5, 0, 1.5, 0): 3 / sqrt(5 * 4.5)
    assert math.isclose(judge_agreement.spearman(x, y), 3 / math.sqrt(5 * 4.5))
    assert math.isnan(judge_agreement.pearson([1, 2, 3], [7, 7, 7]))


def test_correlations_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 101, 200)
    y = np.clip(x + rng.integers(-30, 31, 200), 0, 100)  # many ties among 0 to 100
    assert math.isclose(judge_agreement.pearson(x, y), stats.pearsonr(x, y)[0], rel_tol=1e-12)
    assert math.isclose(judge_agreement.spearman(x, y), stats.spearmanr(x, y)[0], rel_tol=1e-12)


def scores_file(path, model, scores, json_key="model_response"):
    results = [{"index": i, "reply": str(s), "score": s} for i, s in enumerate(scores)]
    return write(path, {"format": 1, "model": model, "json_key": json_key, "fingerprint": "x",
                        "num_entries": len(scores), "results": results})


def test_the_agreement_command(tmp_path, capsys):
    a = scores_file(tmp_path / "a-llama3-scores.json", "llama3", [80, 60, None, 90, 20])
    b = scores_file(tmp_path / "a-gpt-scores.json", "gpt-4o", [70, 65, 50, 95, 10])
    assert judge_agreement.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    pairs = ([80, 60, 90, 20], [70, 65, 95, 10])
    assert "Entries scored by both judges: 4" in out
    assert f"Pearson correlation: {judge_agreement.pearson(*pairs):.3f}" in out
    assert "Spearman correlation: 1.000" in out
    plot = tmp_path / "a-llama3-scores-vs-a-gpt-scores.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    c = scores_file(tmp_path / "c.json", "x", [1, 2, 3, 4, 5, 6])
    assert judge_agreement.main([str(a), str(c)]) == 2
    assert "score different answers (num_entries: 5 and 6)" in capsys.readouterr().err
    assert judge_agreement.main([str(a), str(tmp_path / "missing.json")]) == 2
    assert "scores file not found" in capsys.readouterr().err


def test_a_killed_comparison_resumes(tmp_path, capsys):
    """The command killed (no handler runs) while the judge is silent on entry 3: the two
    entries saved stay, and the run again asks only for the other three."""
    from conftest import ROOT
    from fake_openai import hang_after, kill_when_saved

    a, b = write(tmp_path / "sft.json", answers()), write(tmp_path / "dpo.json", answers(tag="dpo"))
    results = tmp_path / "sft-vs-dpo-judge-compare.json"
    with FakeOpenAI(replies=hang_after(4, prefers("sft"))) as server:
        saved = kill_when_saved(["-m", "instructkit.compare", str(a), str(b), "--api", "openai",
                                 "--base-url", server.base_url, "--model", "judge"],
                                results, 2, cwd=ROOT)
    assert [r["outcome"] for r in saved["results"]] == ["win", "win"]
    with FakeOpenAI(replies=prefers("sft")) as server:
        assert run_compare(a, b, server) == 0
    assert len(server.requests) == 6
    assert "sft vs dpo: 5 wins, 0 ties, 0 losses over 5 entries" in capsys.readouterr().out
