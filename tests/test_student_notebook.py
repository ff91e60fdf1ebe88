"""exercises.ipynb, the student notebook: made from exercise-solutions.ipynb by
instructkit/student_notebook.py, stubs with the chapter's signatures, no solution code, and it
runs top to bottom with every check saying "not done yet"."""

import inspect

import nbformat
import pytest
from conftest import ROOT
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from notebook_runner import cell_outputs, repo_files, run_notebook

from instructkit import exercise_checks as xc
from instructkit import student_notebook as sn
from instructkit.errors import BadInputError

STUDENT = ROOT / "exercises.ipynb"
SOLUTIONS = ROOT / "exercise-solutions.ipynb"


def test_the_committed_student_notebook_is_made_from_the_solutions():
    """The two notebooks cannot drift: regenerate in memory and compare with the file."""
    assert STUDENT.read_text(encoding="utf-8") == sn.render(SOLUTIONS), \
        "exercises.ipynb is out of date: run python -m instructkit.student_notebook"


def _definitions(nb):
    """{name: the object} of everything the notebook's code cells define (stubs included)."""
    namespace = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and ("def " in cell.source or "class " in cell.source):
            exec(compile(cell.source, "<cell>", "exec"), namespace)  # noqa: S102 (our own stubs)
    return {k: v for k, v in namespace.items() if inspect.isfunction(v) or inspect.isclass(v)}


def test_each_exercise_has_a_stub_with_the_chapter_s_signature_then_its_check():
    nb = nbformat.read(STUDENT, as_version=4)
    stubs = _definitions(nb)
    assert set(stubs) == set(xc.EXERCISES)
    for name, exercise in xc.EXERCISES.items():
        reference, stub = exercise.reference, stubs[name]
        if inspect.isclass(reference):
            assert stub.__bases__ == reference.__bases__
            for method in ("__init__", "forward"):
                assert inspect.signature(getattr(stub, method)) == \
                    inspect.signature(getattr(reference, method))
        else:
            assert inspect.signature(stub) == inspect.signature(reference)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    for name in xc.EXERCISES:  # the check cell follows the stub's cell
        (index,) = [i for i, source in enumerate(code) if f"def {name}(" in source
                    or f"class {name}(" in source]
        assert f"({name})" in code[index + 1] and "check_" in code[index + 1]


def test_the_student_notebook_shows_no_solution_code():
    text = "\n".join(cell.source for cell in nbformat.read(STUDENT, as_version=4).cells)
    assert "### BEGIN SOLUTION" not in text and "getsource" not in text
    for name, exercise in xc.EXERCISES.items():
        reference = exercise.reference
        body = inspect.getsource(reference).splitlines()[1:]
        given_away = [line.strip() for line in body if len(line.strip()) > 25
                      and not line.strip().startswith(('"""', "#", "def "))
                      and line.strip() in text]
        assert not given_away, (name, given_away)


def _nb(*sources):
    tagged = [new_code_cell(source, metadata={"tags": ["exercise"]}) for source in sources]
    return new_notebook(cells=[new_markdown_cell("# title"), *tagged])


ALL_BLOCKS = ("### BEGIN SOLUTION\nfrom gpt_instruction_finetuning import format_input, custom_collate_fn, "
              "extract_response\nfrom exercise_variants import format_input_phi, LoRALayer, LinearWithLoRA\n"
              "custom_collate_with_masking_fn = 1\n### END SOLUTION")


def test_the_generator_replaces_a_block_by_the_stubs_of_what_it_defines():
    nb = sn.student_notebook(_nb("x = 1\n" + ALL_BLOCKS + "\ncheck(format_input)"))
    source = nb.cells[-1].source
    assert source.startswith("x = 1\nimport torch\n\n\ndef format_input(entry):\n"
                             "    raise NotImplementedError")
    assert source.endswith("raise NotImplementedError  # replace this line with your code\n"
                           "check(format_input)")
    assert "class LoRALayer(torch.nn.Module):" in source and "gpt_instruction_finetuning" not in source
    assert nb.cells[0].source == sn.STUDENT_INTRO  # the student's title, not the solutions'
    assert len(nb.cells) == 2  # the untagged title cell stays in the solutions


@pytest.mark.parametrize(("sources", "words"), [
    ((ALL_BLOCKS.replace("### END SOLUTION", ""),), "'### BEGIN SOLUTION' without '### END SOLUTION'"),
    ((ALL_BLOCKS, "### END SOLUTION"), "'### END SOLUTION' without '### BEGIN SOLUTION'"),
    ((ALL_BLOCKS, "### BEGIN SOLUTION\nimport os\n### END SOLUTION"), "defines no exercise"),
    ((ALL_BLOCKS, "### BEGIN SOLUTION\nfrom x import format_input\n### END SOLUTION"),
     "format_input is stubbed a second time"),
    ((ALL_BLOCKS.replace("LoRALayer, ", ""),), "no solution block defines LoRALayer"),
])
def test_bad_markers_are_one_clear_error(sources, words):
    with pytest.raises(BadInputError, match=words.replace("(", r"\(")):
        sn.student_notebook(_nb(*sources))


def test_check_says_when_the_student_notebook_is_out_of_date(tmp_path, capsys):
    out = tmp_path / "exercises.ipynb"
    assert sn.main(["--check", "--out", str(out)]) == 1
    assert "is out of date: run python -m instructkit.student_notebook" in capsys.readouterr().err
    assert sn.main(["--out", str(out)]) == 0 and out.read_text(encoding="utf-8") == sn.render()
    assert sn.main(["--check", "--out", str(out)]) == 0
    assert sn.main(["--solutions", str(tmp_path / "missing.ipynb")]) == 2
    assert "missing.ipynb not found" in capsys.readouterr().err


@pytest.mark.slow
def test_the_student_notebook_runs_with_its_stubs_and_every_check_is_not_done(tmp_path):
    workdir = tmp_path / "repo"  # the repository's files alone: no data, no weights needed
    for rel in repo_files():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes((ROOT / rel).read_bytes())
    out = cell_outputs(run_notebook(STUDENT.name, workdir, env={"OMP_NUM_THREADS": "1"}, timeout=120))
    for name in xc.EXERCISES:
        assert f"{name}: not done yet ({name} still raises NotImplementedError" in out, name
    assert out.count("not done yet") == len(xc.EXERCISES)
    assert "FAILED" not in out and "CRASHED" not in out
