"""python -m instructkit.grade_exercises: a folder of student notebooks graded into a CSV.

Tiny notebooks (a few cells that import the checks): a correct one, a wrong one, one that
crashes after deleting the files of its folder, and one that loops forever; each runs in a
fresh kernel in its own copy of the chapter's files, the looping one is stopped by the timeout
and the others are still graded.
"""

import csv
import re
import time

import nbformat
import pytest
from conftest import ROOT
from nbformat.v4 import new_code_cell, new_notebook

from instructkit import grade_exercises as ge
from instructkit.exercise_checks import EXERCISES

IMPORTS = "from instructkit.exercise_checks import *  # the check_... functions\n"
CORRECT = (IMPORTS + "from gpt_instruction_finetuning import custom_collate_fn, extract_response, "
           "format_input\n"
           "from exercise_variants import LinearWithLoRA, LoRALayer, format_input_phi, "
           "with_instruction_masking\n"
           "custom_collate_with_masking_fn = with_instruction_masking(custom_collate_fn)")
CHECK_ALL = ("check_format_input(format_input)\ncheck_custom_collate_fn(custom_collate_fn)\n"
             "check_extract_response(extract_response)\ncheck_format_input_phi(format_input_phi)\n"
             "check_custom_collate_with_masking_fn(custom_collate_with_masking_fn)\n"
             "check_lora_layer(LoRALayer)\ncheck_linear_with_lora(LinearWithLoRA)")
WRONG_COLLATE = '''
import torch


def format_input(entry):
    raise NotImplementedError  # replace this line with your code


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                      device="cpu"):
    size = max(len(item) for item in batch) + 1
    rows = [item + [pad_token_id] * (size - len(item)) for item in batch]
    inputs = torch.tensor([row[:-1] for row in rows])
    targets = torch.tensor([row[1:] for row in rows])
    targets[targets == pad_token_id] = ignore_index  # every padding token
    return inputs[:, :allowed_max_length], targets[:, :allowed_max_length]


def extract_response(response_text, input_text):
    return response_text[len(input_text):].strip()
'''
DELETE_ALL = '''
import os
import shutil

for name in os.listdir("."):  # the notebook's own folder
    shutil.rmtree(name) if os.path.isdir(name) else os.remove(name)
raise RuntimeError("after deleting its files")
'''


def notebook(*sources):
    return new_notebook(cells=[new_code_cell(s.strip("\n")) for s in sources])


@pytest.fixture
def submissions(tmp_path):
    folder = tmp_path / "submissions"
    (folder / "d").mkdir(parents=True)
    nbformat.write(notebook(IMPORTS + "from gpt_instruction_finetuning import format_input\n"
                            "check_format_input(format_input)", "while True:\n    pass"),
                   folder / "a_loops.ipynb")
    nbformat.write(notebook(CORRECT, CHECK_ALL), folder / "b_correct.ipynb")
    nbformat.write(notebook(IMPORTS + WRONG_COLLATE, "check_format_input(format_input)",
                            "check_custom_collate_fn(custom_collate_fn)",
                            "check_extract_response(extract_response)"), folder / "c_wrong.ipynb")
    nbformat.write(notebook(IMPORTS + "def format_input(entry):\n    return 1 / 0\n\n"
                                      "check_format_input(format_input)", DELETE_ALL, CHECK_ALL),
                   folder / "d" / "crashes.ipynb")
    (folder / ".ipynb_checkpoints").mkdir()  # Jupyter's copies are not submissions
    nbformat.write(notebook("1"), folder / ".ipynb_checkpoints" / "b_correct-checkpoint.ipynb")
    (folder / "notes.txt").write_text("not a notebook", encoding="utf-8")
    return folder


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("student", "exercise", "result", "message")
        return {(row["student"], row["exercise"]): (row["result"], row["message"]) for row in reader}


@pytest.mark.slow
def test_a_folder_of_notebooks_is_graded_within_the_timeouts(submissions, tmp_path, capsys):
    out = tmp_path / "grades.csv"
    start = time.monotonic()
    assert ge.main([str(submissions), "--out", str(out), "--timeout", "20", "--jobs", "2"]) == 0
    assert time.monotonic() - start < 90  # the looping notebook was stopped after its 20 s
    rows = read_csv(out)
    students = ("a_loops", "b_correct", "c_wrong", "d/crashes")
    assert set(rows) == {(s, e) for s in students for e in EXERCISES}

    assert {e: rows["b_correct", e][0] for e in EXERCISES} == {e: "passed" for e in EXERCISES}

    assert rows["a_loops", "format_input"][0] == "passed"  # before the loop
    for name in list(EXERCISES)[1:]:
        assert rows["a_loops", name] == ("timeout", "the notebook ran past its 20 s and was stopped")

    assert rows["c_wrong", "format_input"] == (
        "not done", "format_input still raises NotImplementedError: replace that line with your code")
    result, message = rows["c_wrong", "custom_collate_fn"]
    assert result == "failed"
    assert "the targets differ first at row 0, position 4: expected 50256, got -100" in message
    assert "every padding token was masked; the first one must stay" in message
    result, message = rows["c_wrong", "extract_response"]
    assert result == "failed" and "'### Response:' was left in the answer" in message
    for name in list(EXERCISES)[3:]:
        assert rows["c_wrong", name] == ("not done", "its check did not run: the check cell is missing")

    result, message = rows["d/crashes", "format_input"]
    assert result == "crashed"
    assert message.startswith("ZeroDivisionError: division by zero\nyour cell, line 3, in format_input: "
                              "return 1 / 0")
    for name in list(EXERCISES)[1:]:
        assert rows["d/crashes", name] == (
            "crashed", "its check did not run; the first cell that failed: "
                       "RuntimeError: after deleting its files (cell 1)")
    # It deleted the files of its own copy only.
    assert (submissions / "d" / "crashes.ipynb").is_file() and (ROOT / "exercise_variants.py").is_file()

    printed = capsys.readouterr().out
    assert printed.startswith("student      passed    failed  not done   crashed   timeout\n")
    assert re.search(r"^b_correct +7 +0 +0 +0 +0$", printed, re.M)  # one line per student
    assert re.search(r"^a_loops +1 +0 +0 +0 +6$", printed, re.M)
    assert re.search(r"^c_wrong +0 +2 +5 +0 +0$", printed, re.M)
    assert "format_input: passed by 2 of 4" in printed
    assert f"Wrote {4 * len(EXERCISES)} rows to {out}" in printed


@pytest.mark.parametrize(("args", "words"), [
    (["missing-folder"], "missing-folder is not a folder"),
    (["EMPTY"], "holds no notebooks"),
    (["EMPTY", "--timeout", "0"], "--timeout must be a positive number of seconds, not 0"),
    (["EMPTY", "--jobs", "0"], "--jobs must be 1 or more, not 0"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, words):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("missing-folder", "EMPTY") else a for a in args]
    assert ge.main([*args, "--out", str(tmp_path / "grades.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "grades.csv").exists()
