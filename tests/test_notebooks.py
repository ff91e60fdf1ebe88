"""The notebooks: stored clean, and run top to bottom as a reader would (in smoke mode).

The executed runs use a clean copy of the repository (`notebook_runner.smoke_workdir`) with
the dataset and tiny GPT-2 stand-in checkpoints already in place, so the notebooks' own
download code finds them and never reaches the network. Section 7.8 talks to a fake Ollama
server on the loopback interface. The chapter runs as for a reader without TensorFlow: its
weights are in the hub's layout and `import tensorflow` fails in the kernel.
"""

import json
import os
import re
import shutil
from types import SimpleNamespace

import nbformat
import pytest
import torch
from conftest import ROOT
from fake_ollama import FakeOllama
from loopback_server import closed_port_url, free_port
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_notebook
from notebook_runner import cell_outputs, repo_files, run_notebook, smoke_workdir, without_tensorflow_env

from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from previous_chapters import GPTModel

NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))
CHAPTER = "ch07_instruction_finetuning.ipynb"
LOAD = "load-finetuned-model.ipynb"
SMOKE_LINE = 'SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"'
SMOKE_SIZES = {"train": 16, "val": 8, "test": 4}  # the chapter's smoke-mode split sizes


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


# ---------------------------------------------------------------------------------------
# Stored form
# ---------------------------------------------------------------------------------------


def test_the_notebooks_are_there():
    assert {CHAPTER, LOAD} <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = read(path)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is None, f"cell {index} has an execution count"
            assert cell.outputs == [], f"cell {index} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_smoke_switch_is_the_first_code_cell_and_the_only_one(path):
    cells = code_cells(read(path))
    assert SMOKE_LINE in cells[0].source
    assigned = [i for i, cell in enumerate(cells) if re.search(r"^SMOKE_TEST\s*=", cell.source, re.M)]
    assert assigned == [0], "SMOKE_TEST must be set in the first code cell only"


# ---------------------------------------------------------------------------------------
# Executed, in smoke mode
# ---------------------------------------------------------------------------------------


def judge(prompt, body):
    """The fake judge: a bare number when asked for one, else a sentence with a score."""
    if "Respond with the integer number only" in prompt:
        return "72"
    return "The response is close to the correct output. Score: 80"


TRAINING_CALL = "train_losses, val_losses, tokens_seen = train_model_simple("


def with_the_training_cell_run_twice(workdir):
    """The chapter in `workdir`, its training cell (section 7.6) run a second time right after
    the first, as a reader who runs it again would."""
    nb = read(workdir / CHAPTER)
    (index,) = [i for i, cell in enumerate(nb.cells)
                if cell.cell_type == "code" and TRAINING_CALL in cell.source]
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(nb.cells[index].source))
    nbformat.write(nb, workdir / CHAPTER)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The chapter (its training cell run twice), then the load notebook, in one work folder
    against a fake Ollama, without TensorFlow: the weights in the hub layout, any network
    request for them refused."""
    workdir = smoke_workdir(tmp_path_factory.mktemp("notebooks"), weights="hub-openai")
    with_the_training_cell_run_twice(workdir)
    tf_log = workdir.parent / "tensorflow-imports.log"
    env = {**without_tensorflow_env(tf_log), "HF_ENDPOINT": closed_port_url()}
    with FakeOllama(replies=judge) as server:
        chapter = run_notebook(CHAPTER, workdir, env={**env, "OLLAMA_HOST": server.host})
        load = run_notebook(LOAD, workdir, env=env)
        prompts = server.prompts
    training = [cell_outputs(nbformat.v4.new_notebook(cells=[cell])) for cell in chapter.cells
                if cell.cell_type == "code" and TRAINING_CALL in cell.source]
    return SimpleNamespace(workdir=workdir, chapter=cell_outputs(chapter), load=cell_outputs(load),
                           prompts=prompts, tf_log=tf_log, training=training)


def code_only_workdir(dest):
    """The repository's files alone: no dataset, no weights, no finetuned model."""
    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.mark.slow
def test_chapter_prints_the_lesson_values(executed):
    out = executed.chapter
    for line in ("Number of entries: 1100", "Training set length: 935",
                 "Validation set length: 55", "Test set length: 110", "[50256]", "Device: cpu"):
        assert line in out
    # The collate drafts on the toy batch; the final version masks all but the first pad.
    assert "[    6, 50256,  -100,  -100,  -100]" in out
    assert "[    8,     9, 50256,  -100,  -100]" in out
    # Cross-entropy ignores -100: the third loss equals the first.
    assert out.count("tensor(1.1269)") == 2 and "tensor(0.7936)" in out
    assert "loss_1 == loss_3: tensor(True)" in out
    assert f"Number of training batches: {SMOKE_SIZES['train'] // 8}" in out
    assert "Ep 1 (Step 000000): Train loss" in out and "Training completed in" in out


@pytest.mark.slow
def test_chapter_runs_without_tensorflow_from_the_hub_layout(executed):
    """No TensorFlow import was even tried in the chapter's or the load notebook's kernel, and
    the weights came from the hub-layout files (auto's choice on disk; nothing else is there,
    and the hub endpoint refuses connections)."""
    assert not executed.tf_log.exists(), executed.tf_log.read_text()
    assert sorted(p.name for p in (executed.workdir / "gpt2" / "355M").iterdir()) == [
        "merges.txt", "model.safetensors", "vocab.json"]
    assert f"Number of parameters: {sum(p.numel() for p in GPTModel(TEST_MODE_CONFIG).parameters()):,}" \
        in executed.chapter


def test_the_blocker_makes_tensorflow_unimportable(tmp_path):
    """The environment of that run: `import tensorflow` fails (TensorFlow is installed here)
    and the attempt is logged."""
    import subprocess
    import sys

    log = tmp_path / "tf.log"
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                          env={**os.environ, **without_tensorflow_env(log)}, timeout=60)
    assert proc.returncode == 1
    assert "No module named 'tensorflow' (blocked by tests/without_tensorflow)" in proc.stderr
    assert "import tensorflow from:" in log.read_text()


@pytest.mark.slow
def test_chapter_scores_with_the_judge(executed):
    out = executed.chapter
    n = SMOKE_SIZES["test"]
    assert f"Number of scores: {n} of {n}" in out
    assert "Average score: 72.00" in out
    # One question, three free-form scores, then one integer score per test entry.
    integer_prompts = [p for p in executed.prompts if "Respond with the integer number only" in p]
    assert len(executed.prompts) == 1 + 3 + n and len(integer_prompts) == n
    assert all("### Instruction:" in p for p in executed.prompts[1:])


@pytest.mark.slow
def test_chapter_saves_responses_model_and_plot(executed):
    responses = json.loads((executed.workdir / "instruction-data-with-response.json").read_text())
    assert len(responses) == SMOKE_SIZES["test"]
    assert all(isinstance(entry["model_response"], str) for entry in responses)
    assert responses[0]["instruction"] == "Rewrite the sentence using a simile."

    state = torch.load(executed.workdir / "gpt2-medium355M-sft.pth", weights_only=True)
    GPTModel(TEST_MODE_CONFIG).load_state_dict(state)  # strict: the whole model
    assert (executed.workdir / "loss-plot.pdf").read_bytes().startswith(b"%PDF")

    # The notebook writes no checkpoint
    assert not (executed.workdir / "checkpoints").exists()
    assert not list(executed.workdir.rglob("*step*.pth"))


@pytest.mark.slow
def test_chapter_trains_with_the_book_s_call_and_again_when_run_again(executed):
    """Section 7.6 calls train_model_simple (or, through its one marked line, train_model_fast,
    which has the same signature); running the cell again trains again, from the model as it
    is, with the book's lines each time."""
    source = [cell.source for cell in code_cells(read(ROOT / CHAPTER)) if TRAINING_CALL in cell.source]
    assert len(source) == 1
    lines = source[0].splitlines()
    assert "from previous_chapters import train_model_simple" in lines
    swaps = [line for line in lines if "train_model_fast" in line]
    assert len(swaps) == 1 and "# Not in the book:" in swaps[0]
    assert "torch.optim.AdamW(model.parameters(), lr=0.00005, weight_decay=0.1)" in source[0]

    first, second = executed.training
    for out in (first, second):
        assert out.startswith("Ep 1 (Step 000000): Train loss") and "Training completed in" in out
    def losses(out):
        return [line.split("Train loss ")[1] for line in out.splitlines() if line.startswith("Ep ")]
    assert losses(second) != losses(first)  # trained further, not a checkpoint reloaded


@pytest.mark.slow
def test_load_notebook_answers_with_the_saved_model(executed):
    out = executed.load
    assert "Loaded gpt2-medium355M-sft.pth" in out
    match = re.search(r"Model response:\n>> (.*)\n", out)
    assert match, out
    # Greedy answers from the same weights: what the chapter's model said to this instruction.
    assert f"Model response:\n>> {match.group(1)}\n" in executed.chapter


def only_cells(nb, marker):
    """A notebook of `nb`'s first code cell (the smoke switch) and the code cell holding `marker`."""
    cells = code_cells(nb)
    chosen = [cell for cell in cells[1:] if marker in cell.source]
    assert len(chosen) == 1, f"expected one code cell with {marker!r}"
    return new_notebook(cells=[cells[0], chosen[0]], metadata=nb.metadata)


@pytest.fixture
def ollama_check(tmp_path):
    """The chapter's Ollama check cell, alone in a notebook in a folder with the modules."""
    workdir = code_only_workdir(tmp_path)
    nb = only_cells(read(ROOT / CHAPTER), "ollama_is_reachable(")
    nbformat.write(nb, workdir / "ollama-check.ipynb")
    return workdir


@pytest.mark.slow
def test_chapter_stops_when_no_ollama_answers(ollama_check):
    port = free_port()
    with pytest.raises(CellExecutionError) as error:
        run_notebook("ollama-check.ipynb", ollama_check, env={"OLLAMA_HOST": f"127.0.0.1:{port}"},
                     timeout=120)
    assert error.value.ename == "RuntimeError"
    message = error.value.evalue
    assert f"127.0.0.1:{port}" in message
    for hint in ("ollama serve", "ollama pull llama3", "OLLAMA_HOST"):
        assert hint in message


@pytest.mark.slow
def test_chapter_stops_when_the_judge_is_not_pulled(ollama_check):
    with FakeOllama(models=("phi3",)) as server, pytest.raises(CellExecutionError) as error:
        run_notebook("ollama-check.ipynb", ollama_check, env={"OLLAMA_HOST": server.host},
                     timeout=120)
    assert error.value.ename == "OllamaError"
    assert "ollama pull llama3" in error.value.evalue


@pytest.mark.slow
def test_load_notebook_stops_without_a_finetuned_model(tmp_path):
    workdir = code_only_workdir(tmp_path)
    with pytest.raises(CellExecutionError) as error:
        run_notebook(LOAD, workdir, timeout=120)
    assert error.value.ename == "FileNotFoundError"
    message = error.value.evalue
    assert "gpt2-medium355M-sft.pth does not exist" in message
    assert CHAPTER in message and "python gpt_instruction_finetuning.py" in message


# ---------------------------------------------------------------------------------------
# The chapter's cells call the chapter's own helpers
# ---------------------------------------------------------------------------------------


def defining_cells(nb, *names):
    """The code cells of `nb` that define (at top level) any of `names`, in order."""
    import ast

    chosen = []
    for cell in code_cells(nb):
        defined = {node.name for node in ast.parse(cell.source).body
                   if isinstance(node, ast.FunctionDef | ast.ClassDef)}
        if defined & set(names):
            chosen.append(cell.source)
    return chosen


def test_editing_format_input_in_the_chapter_changes_what_its_dataset_encodes(
        instruction_data, tokenizer):
    """A reader who edits the notebook's format_input changes the training data: the
    notebook's InstructionDataset calls the notebook's format_input, not the module's."""
    cells = defining_cells(read(ROOT / CHAPTER), "format_input", "InstructionDataset")
    assert len(cells) == 2
    namespace = {}
    for source in cells:
        exec(compile(source, CHAPTER, "exec"), namespace)
    entries = instruction_data[49:51]
    dataset = namespace["InstructionDataset"](entries, tokenizer)
    alpaca = [namespace["format_input"](e) + "\n\n### Response:\n" + e["output"] for e in entries]
    assert [dataset[0], dataset[1]] == [tokenizer.encode(text) for text in alpaca]

    # The reader's edit: a shorter prompt, defined as in a notebook cell.
    exec("def format_input(entry):\n    return 'Q: ' + entry['instruction']\n", namespace)
    edited = namespace["InstructionDataset"](entries, tokenizer)
    assert [edited[0], edited[1]] == [
        tokenizer.encode(f"Q: {e['instruction']}\n\n### Response:\n{e['output']}") for e in entries]
    assert edited[0] != dataset[0] and edited[1] != dataset[1]
