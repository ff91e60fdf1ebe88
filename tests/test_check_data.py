"""The data check (instructkit.check_data) on the chapter's dataset, with injected duplicates and
leaked test entries, and `--check-data` in the finetuning command."""

import json
import sys

import numpy as np
import pytest

from instructkit import check_data
from instructkit.finetune_config import FinetuneConfig, parse_finetune_args

# The chapter's dataset at the documented threshold 0.9, with the chapter's 85/10/5 split (the
# README's numbers): 20 groups of exact duplicates (25 extra entries), 46 more near-duplicate
# pairs, 5 of the 110 test entries and 5 of the 55 validation entries leak.
CHAPTER = {"exact_groups": 20, "exact_extra": 25, "near": 46, "test": 5, "validation": 5}


@pytest.fixture(scope="module")
def chapter_data(shared_data):
    return json.loads((shared_data / "instruction-data.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from instructkit.gpt2_tokenizer import get_tokenizer

    return get_tokenizer(shared_data / "gpt2-tokenizer")


def test_the_chapter_dataset(chapter_data, tokenizer):
    split = check_data.split_indices(len(chapter_data))
    assert [len(split[k]) for k in ("train", "test", "validation")] == [935, 110, 55]
    report = check_data.check_entries(chapter_data, split, 0.9, tokenizer)
    assert report["tfidf"] == "scikit-learn"
    assert len(report["exact_duplicates"]) == CHAPTER["exact_groups"]
    assert sum(len(g["indices"]) - 1 for g in report["exact_duplicates"]) == CHAPTER["exact_extra"]
    assert len(report["near_duplicates"]) == CHAPTER["near"]
    assert len(report["leaked"]["test"]) == CHAPTER["test"]
    assert len(report["leaked"]["validation"]) == CHAPTER["validation"]
    assert report["empty_outputs"] == [] and report["too_long"] == []
    for pair in report["near_duplicates"]:
        assert pair["a"] < pair["b"] and pair["similarity"] >= 0.9


def test_injected_duplicates_and_leaks_are_all_found(chapter_data, tokenizer, tmp_path, capsys):
    """Near copies of training entries (one word more, another case, other punctuation) put in
    the training split and in the test split: every one is found at the threshold 0.9."""
    data = [dict(e) for e in chapter_data]
    long_train = [i for i in range(935) if len(data[i]["instruction"].split()) >= 12
                  and not data[i]["input"]][:12]

    def near_copy(entry, k):
        changes = [lambda t: t + " now", lambda t: t.upper(), lambda t: t.replace(".", "!")]
        return {**entry, "instruction": changes[k % 3](entry["instruction"]), "output": "other"}

    injected_dups = {}  # at index -> copy of index (both in training)
    for k, (source, target) in enumerate(zip(long_train[:6], (100, 300, 500, 600, 800, 900),
                                             strict=True)):
        data[target] = near_copy(data[source], k)
        injected_dups[target] = source
    injected_leaks = {}  # test index -> training index
    for k, (source, target) in enumerate(zip(long_train[6:], range(940, 1040, 17), strict=True)):
        data[target] = near_copy(data[source], k)
        injected_leaks[target] = source
    data[1090] = {**data[long_train[0]], "input": ""}  # an exact copy, in validation
    data[20] = {**data[20], "output": "  "}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    report_path, cleaned = tmp_path / "report.json", tmp_path / "cleaned.json"

    assert check_data.main([str(path), "--report", str(report_path), "--cleaned", str(cleaned),
                            "--tokenizer-dir", str(tokenizer_dir(path)), "--threshold", "0.9"]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text(encoding="utf-8"))
    pairs = {(p["a"], p["b"]) for p in report["near_duplicates"]}
    pairs |= {(g["indices"][0], i) for g in report["exact_duplicates"] for i in g["indices"][1:]}
    for target, source in injected_dups.items():
        assert (min(source, target), max(source, target)) in pairs
    leaked = {item["index"]: item["train_index"] for item in report["leaked"]["test"]}
    assert all(leaked.get(t) == s for t, s in injected_leaks.items())
    assert {item["index"]: item["train_index"] for item in report["leaked"]["validation"]}[1090] \
        == long_train[0]
    assert report["empty_outputs"] == [20]
    assert "Empty outputs: 1 (entries [20])" in out
    # the cleaned file: a new file without the later copies, the empty output, any leak
    assert json.loads(path.read_text(encoding="utf-8")) == data  # the input is unchanged
    kept = json.loads(cleaned.read_text(encoding="utf-8"))
    assert len(kept) == len(data) - len(check_data.dropped_indices(report))
    again = check_data.check_entries(kept, check_data.split_indices(len(kept)), 0.9)
    assert again["exact_duplicates"] == again["near_duplicates"] == again["empty_outputs"] == []
    assert again["leaked"] == {"test": [], "validation": []}


def tokenizer_dir(_):
    from conftest import SHARED_DATA

    return SHARED_DATA / "gpt2-tokenizer"


def test_the_numpy_tfidf_equals_scikit_learns(chapter_data, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    texts = [check_data.prompt_text(e) for e in chapter_data]
    ours = check_data.numpy_tfidf(texts)
    theirs, backend = check_data.tfidf_matrix(texts)
    assert backend == "scikit-learn" and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs.toarray(), atol=1e-12)
    np.testing.assert_allclose(ours @ ours.T, (theirs @ theirs.T).toarray(), atol=1e-12)
    # without scikit-learn: the numpy one, with a note, and the same report
    with_sklearn = check_data.check_entries(chapter_data, check_data.split_indices(1100))
    monkeypatch.setitem(sys.modules, "sklearn.feature_extraction.text", None)
    capsys.readouterr()
    without = check_data.check_entries(chapter_data, check_data.split_indices(1100))
    assert "Note: scikit-learn is not installed; using numpy's TF-IDF" in capsys.readouterr().out
    assert without.pop("tfidf") == "numpy" and with_sklearn.pop("tfidf") == "scikit-learn"
    assert without == with_sklearn


def test_lengths_against_the_context(tokenizer):
    long = {"instruction": "word " * 300, "input": "", "output": "fine"}
    short = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    report = check_data.check_entries([short, long, short], tokenizer=tokenizer, context_length=200)
    [item] = report["too_long"]
    total = len(tokenizer.encode(check_data.training_text(long))) + 1
    assert item == {"index": 1, "tokens": total, "prompt_tokens": total - 1 - len(
        tokenizer.encode("\n\n### Response:\nfine")), "prompt_too_long": True}
    assert check_data.check_entries([short, long], tokenizer=tokenizer)["too_long"] == []


def test_the_cleaned_file_never_replaces_the_input(tmp_path, capsys):
    data = [{"instruction": f"Task {i}.", "input": "", "output": "x"} for i in range(20)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    before = path.read_bytes()
    assert check_data.main([str(path), "--cleaned", str(tmp_path / "." / "data.json")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert check_data.main([str(tmp_path / "missing.json")]) == 2
    with pytest.raises(SystemExit) as exited:
        check_data.main([str(path), "--threshold", "1.5"])
    assert exited.value.code == 2
    assert "--threshold: must be above 0 and at most 1, got 1.5" in capsys.readouterr().err


def test_finetune_check_data_flag(tmp_path, capsys, shared_data):
    from instructkit.check_data import check_run_data
    from instructkit.instruction_data import DatasetError

    config, _ = parse_finetune_args(["--check-data"])
    assert config.check_data == 0.9 and FinetuneConfig().check_data is None
    assert parse_finetune_args(["--check-data", "0.8"])[0].check_data == 0.8
    train = [{"instruction": f"Task item{i} of many here.", "input": "", "output": "x"} for i in range(17)]
    test = [dict(train[3]), {"instruction": "Other.", "input": "", "output": "y"}]
    val = [{"instruction": "Last one.", "input": "", "output": "z"}]
    report = check_run_data(train, test, val, report_path=tmp_path / "r.json")
    out = capsys.readouterr().out
    assert "Data check (--check-data):" in out
    assert "Test entries nearly duplicating a training entry: 1 of 2" in out
    assert report["leaked"]["test"] == [{"index": 17, "train_index": 3, "similarity": 1.0}]
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == report
    val[0]["output"] = ""
    with pytest.raises(DatasetError, match="1 entries have an empty output"):
        check_run_data(train, test, val)


def test_a_finetuning_run_checks_its_split_before_training(tmp_path, chapter_data, capsys):
    """FinetuneRun.split with --check-data: the report beside the model, warnings for the
    chapter's duplicates and leaks, and a DatasetError (exit code 2) for an empty output."""
    from instructkit.finetune_run import FinetuneRun
    from instructkit.instruction_data import DatasetError

    data = chapter_data[:200]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    config = FinetuneConfig(test_mode=True, data=str(path), output_dir=str(tmp_path / "out"),
                            check_data=0.9, device="cpu")
    run = FinetuneRun(config)
    try:
        train, test, val = run.split(data)
        assert (len(train), len(test), len(val)) == (170, 20, 10)
        out = capsys.readouterr().out
        assert "Data check (--check-data):" in out
        assert f"Longer than the context of {run.max_length} tokens" in out
        report_file = run.paths["model"].with_name(run.paths["model"].stem + ".data-check.json")
        report = json.loads(report_file.read_text(encoding="utf-8"))
        assert report["split"] == {"train": 170, "test": 20, "validation": 10}
        broken = [dict(e) for e in data]
        broken[185]["output"] = ""
        with pytest.raises(DatasetError, match="entry 185 in the run's order"):
            run.split(broken)
    finally:
        run.release()
