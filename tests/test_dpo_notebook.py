"""dpo-preference-tuning.ipynb: shows dpo.py's code, and runs top to bottom in smoke mode.

The run uses a clean copy of the repository with what the chapter notebook would have left
behind (a tiny `gpt2-medium355M-sft.pth`, TEST_MODE_CONFIG's size) and the preference data
already "downloaded", so no network is needed; the judge is a fake Ollama on the loopback (it
scores 72, and in a head-to-head always prefers the first answer).
"""

import ast
import math
import re
import shutil
from types import SimpleNamespace

import nbformat
import pytest
import torch
from conftest import ROOT, SHARED_DATA
from fake_ollama import FakeOllama
from nbclient.exceptions import CellExecutionError
from notebook_runner import cell_outputs, repo_files, run_notebook
from test_one_source import top_level_definitions, without_docstrings

from instructkit.gpt2_sizes import TEST_MODE_CONFIG
from previous_chapters import GPTModel

NOTEBOOK = "dpo-preference-tuning.ipynb"
SHOWN = {"compute_logprobs", "compute_dpo_loss", "compute_dpo_loss_batch"}


def code_only_workdir(dest):
    """The repository's files alone (tracked, and new ones git does not ignore)."""
    for rel in repo_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_the_notebook_shows_dpo_py_code_unchanged():
    module = top_level_definitions((ROOT / "instructkit" / "dpo.py").read_text(encoding="utf-8"))
    shown = {}
    for cell in nbformat.read(ROOT / NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "code":
            for name, node in top_level_definitions(cell.source).items():
                shown[name] = node
    assert set(shown) == SHOWN
    for name, node in shown.items():
        assert ast.dump(without_docstrings(node)) == ast.dump(without_docstrings(module[name])), name


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    workdir = code_only_workdir(tmp_path_factory.mktemp("dpo-notebook"))
    shutil.copyfile(SHARED_DATA / "instruction-data-with-preference.json",
                    workdir / "instruction-data-with-preference.json")
    torch.manual_seed(123)
    torch.save(GPTModel(TEST_MODE_CONFIG).state_dict(), workdir / "gpt2-medium355M-sft.pth")
    def judge(prompt, body):  # scores 72; in a head-to-head always the first position
        return "A" if "Which response is better?" in prompt else "72"

    with FakeOllama(replies=judge) as server:
        nb = run_notebook(NOTEBOOK, workdir, env={"OLLAMA_HOST": server.host, "OMP_NUM_THREADS": "1"})
        prompts = server.prompts
    return SimpleNamespace(workdir=workdir, out=cell_outputs(nb), prompts=prompts)


@pytest.mark.slow
def test_smoke_run_prints_the_lesson_values(executed):
    out = executed.out
    for line in ("Number of entries: 1100", "Training set length: 935", "Validation set length: 55",
                 "Test set length: 110", "Device: cpu", "Training batches: 2"):
        assert line in out
    # The masked tokens of the first chosen sequence are exactly its chosen answer.
    first = re.search(r"first chosen sequence:\n(.*)\nIts chosen answer:\n(.*)\n", out)
    assert first and first.group(1) == first.group(2)
    # Before training, policy == reference: ln 2 and zero rewards.
    assert f"Validation loss {math.log(2):.3f}, chosen reward 0.000, rejected reward 0.000" in out
    assert re.search(r"Ep 1 \(Step 000000\): Train loss 0\.69\d, Val loss 0\.69\d, "
                     r"Train reward margins -?0\.0\d\d, Val reward margins -?0\.0\d\d", out)
    assert "Training completed in" in out
    assert out.count("SFT model response:\n>> ") == out.count("DPO model response:\n>> ") == 3


@pytest.mark.slow
def test_smoke_run_saves_the_model_and_the_plot(executed):
    state = torch.load(executed.workdir / "gpt2-medium355M-sft-dpo.pth", weights_only=True)
    GPTModel(TEST_MODE_CONFIG).load_state_dict(state)  # strict: the whole model
    assert (executed.workdir / "dpo-plot.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow
def test_smoke_run_scores_both_models_with_the_judge(executed):
    assert "SFT model: average score 72.00 over 4 of 4 entries" in executed.out
    assert "DPO model: average score 72.00 over 4 of 4 entries" in executed.out
    assert all("### Instruction:" in p for p in executed.prompts)
    assert sum("score the model response" in p for p in executed.prompts) == 8


@pytest.mark.slow
def test_smoke_run_compares_the_models_head_to_head(executed):
    """A judge that always picks the first position: no win, no loss, all inconsistent."""
    assert "DPO vs SFT: 0 wins, 4 ties, 0 losses over 4 entries" in executed.out
    assert "Win rate of DPO: 50.0% (95% interval" in executed.out
    assert "Judge inconsistent when the order was swapped: 4 entries (100.0%)" in executed.out
    assert sum("Which response is better?" in p for p in executed.prompts) == 8  # 4 entries, twice
    assert (executed.workdir / "dpo-vs-sft-compare.json").is_file()
    assert (executed.workdir / "dpo-vs-sft-compare.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_notebook_stops_without_a_finetuned_model(tmp_path):
    workdir = code_only_workdir(tmp_path)
    shutil.copyfile(SHARED_DATA / "instruction-data-with-preference.json",
                    workdir / "instruction-data-with-preference.json")
    with pytest.raises(CellExecutionError) as error:
        run_notebook(NOTEBOOK, workdir, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert error.value.ename == "FileNotFoundError"
    message = error.value.evalue
    assert "gpt2-medium355M-sft.pth does not exist" in message
    assert "ch07_instruction_finetuning.ipynb" in message
