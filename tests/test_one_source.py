"""One source of truth: code a notebook shows is the code the modules run.

The chapter notebook defines some functions in its cells so that readers see them, while the
command-line script imports the same functions from the modules. For every top-level `def` or
`class` in a notebook's code cells whose name a module also defines, the two definitions must
be the same code: equal syntax trees, ignoring docstrings (comments never reach the tree).
"""

import ast
import copy
import difflib

import nbformat
import pytest
from conftest import ROOT
from nbformat.v4 import new_code_cell, new_notebook

MODULES = ("previous_chapters", "gpt_download", "gpt_instruction_finetuning", "ollama_evaluate",
           "instructkit/gpt2_sizes", "instructkit/safe_files", "instructkit/instruction_data",
           "fast_gpt", "exercise_variants", "instructkit/finetune")
# The student notebook's definitions are blanks to fill in (test_student_notebook.py checks
# them against the chapter's signatures).
NOTEBOOKS = sorted(path for path in ROOT.glob("*.ipynb") if path.name != "exercises.ipynb")
CHAPTER = ROOT / "ch07_instruction_finetuning.ipynb"

# What the chapter notebook shows in its cells (the rest it imports).
SHOWN_IN_CHAPTER = {
    "download_and_load_file",
    "format_input",
    "InstructionDataset",
    "custom_collate_fn",
    "get_device",
    "extract_response",
}

DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def without_docstrings(node):
    """A copy of `node` with the docstring of every function and class in it removed."""
    node = copy.deepcopy(node)
    for child in ast.walk(node):
        if isinstance(child, DEFINITIONS) and child.body:
            first = child.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                child.body = child.body[1:] or [ast.Pass()]
    return node


def top_level_definitions(source):
    """{name: node} of the top-level functions and classes in Python `source`."""
    return {node.name: node for node in ast.parse(source).body if isinstance(node, DEFINITIONS)}


def module_definitions():
    """{name: [(module, node), ...]}: every top-level def/class of the project's modules."""
    found = {}
    for module in MODULES:
        source = (ROOT / f"{module}.py").read_text(encoding="utf-8")
        for name, node in top_level_definitions(source).items():
            found.setdefault(name, []).append((module, node))
    return found


def cell_python(source):
    """A code cell's source as plain Python (IPython magics such as %time turned into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def compare_notebook(nb, modules=None):
    """Check `nb` against the modules; return (names checked, list of mismatch reports)."""
    modules = module_definitions() if modules is None else modules
    checked, mismatches = set(), []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for name, node in top_level_definitions(cell_python(cell.source)).items():
            if name not in modules:
                continue  # defined only in the notebook (e.g. the collate drafts)
            checked.add(name)
            shown = ast.dump(without_docstrings(node))
            if any(ast.dump(without_docstrings(m)) == shown for _, m in modules[name]):
                continue
            module, module_node = modules[name][0]
            diff = "\n".join(difflib.unified_diff(
                ast.unparse(without_docstrings(module_node)).splitlines(),
                ast.unparse(without_docstrings(node)).splitlines(),
                fromfile=f"{module}.py", tofile=f"cell {index}", lineterm=""))
            mismatches.append(f"{name} (cell {index}) differs from {module}.{name}:\n{diff}")
    return checked, mismatches


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_definitions_match_the_modules(path):
    _, mismatches = compare_notebook(nbformat.read(path, as_version=4))
    assert not mismatches, "\n\n".join(mismatches)


def test_the_chapter_shows_the_module_functions():
    """The check is not vacuous: the chapter defines these names, and they are compared."""
    checked, _ = compare_notebook(nbformat.read(CHAPTER, as_version=4))
    assert checked >= SHOWN_IN_CHAPTER, f"not shown in the chapter: {SHOWN_IN_CHAPTER - checked}"


def _module_source(module, name):
    source = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    return ast.get_source_segment(source, top_level_definitions(source)[name])


def test_a_copy_with_other_docstrings_and_comments_matches():
    source = _module_source("gpt_instruction_finetuning", "format_input")
    header, body = source.split("\n", 1)
    assert header == "def format_input(entry):"
    edited = f'{header}\n    """A docstring."""\n    # a comment the tree never sees\n{body}'
    nb = new_notebook(cells=[new_code_cell("import torch\n\n\n" + edited)])
    checked, mismatches = compare_notebook(nb)
    assert checked == {"format_input"} and mismatches == []


@pytest.mark.parametrize("source", [
    'def format_input(entry):\n    return entry["instruction"]\n',
    "class InstructionDataset:\n    pass\n",
    "def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-1, allowed_max_length=None,"
    " device='cpu'):\n    return batch\n",
])
def test_a_shadowing_definition_with_other_code_fails(source):
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell(source)])
    checked, mismatches = compare_notebook(nb)
    assert len(checked) == 1 and len(mismatches) == 1
    assert "(cell 1) differs from gpt_instruction_finetuning." in mismatches[0]


def test_a_small_change_in_a_shown_function_fails():
    """One changed constant in an otherwise exact copy is caught."""
    source = _module_source("gpt_instruction_finetuning", "custom_collate_fn")
    assert "ignore_index=-100" in source
    nb = new_notebook(cells=[new_code_cell(source.replace("ignore_index=-100", "ignore_index=-99"))])
    _, mismatches = compare_notebook(nb)
    assert len(mismatches) == 1 and "-99" in mismatches[0]
