"""The repository's layout: the chapter at the root, everything beyond the book in instructkit/.

- No import cycle anywhere: every `import` counts, at module level, inside functions and in
  `if __name__ == "__main__":` blocks alike.
- The root's files (the book's four files, fast_gpt.py, exercise_variants.py and the
  notebooks) import from the package only through lines marked `# Not in the book:` (on the
  import itself, or in the comment lines right above its block of imports).
- No module imports a command-line module for a helper.
"""

import ast
import json

import pytest
from conftest import ROOT

PACKAGE = "instructkit"
BOOK_FILES = ("previous_chapters", "gpt_download", "gpt_instruction_finetuning", "ollama_evaluate")
# The package's command lines (`python -m instructkit.<name>`): nothing imports them
COMMANDS = ("finetune", "chat", "web_chat", "dpo_train", "make_preference_data", "student_notebook",
            "grade_exercises")
MARK = "# Not in the book:"


def project_modules():
    """{module name: path} of the root's modules and the package's."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    modules.update({f"{PACKAGE}.{path.stem}" if path.stem != "__init__" else PACKAGE: path
                    for path in (ROOT / PACKAGE).glob("*.py")})
    return modules


def imported_modules(node, modules):
    """The project modules an Import/ImportFrom node imports (a package's submodules named in
    `from package import name` included)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        names = []
    return {name for name in names if name in modules}


def import_nodes(source):
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import | ast.ImportFrom)]


def import_graph(modules):
    """{module: set of project modules it imports anywhere in its file}."""
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in import_nodes(path.read_text(encoding="utf-8")):
            graph[name] |= imported_modules(node, modules) - {name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def unmarked_package_imports(source):
    """Line numbers of the imports from the package in `source` that no marker covers."""
    lines = source.splitlines()
    nodes = import_nodes(source)
    import_lines = {n for node in nodes for n in range(node.lineno, node.end_lineno + 1)}
    unmarked = []
    for node in nodes:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if not any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in names):
            continue
        own = lines[node.lineno - 1:node.end_lineno]
        marked = any(MARK in line for line in own)
        n = node.lineno - 1  # walk up through the block of imports and comments above it
        while not marked and n >= 1 and (n in import_lines or lines[n - 1].strip().startswith("#")):
            marked = MARK in lines[n - 1]
            n -= 1
        if not marked:
            unmarked.append(node.lineno)
    return unmarked


def notebook_sources(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def test_no_import_cycle_anywhere():
    graph = import_graph(project_modules())
    assert len(graph) > 30 and graph["gpt_instruction_finetuning"]  # the walk found the modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    source_a = "import b\n"
    source_b = "def f():\n    import a\n"
    graph = {"a": set(), "b": set()}
    for name, source in (("a", source_a), ("b", source_b)):
        for node in import_nodes(source):
            graph[name] |= imported_modules(node, graph)
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*.ipynb")),
                         ids=lambda p: p.name)
def test_the_root_imports_the_package_only_through_marked_lines(path):
    sources = notebook_sources(path) if path.suffix == ".ipynb" else [path.read_text(encoding="utf-8")]
    for index, source in enumerate(sources):
        if path.suffix == ".ipynb":
            from IPython.core.inputtransformer2 import TransformerManager

            source = TransformerManager().transform_cell(source)
        unmarked = unmarked_package_imports(source)
        where = f"code cell {index}" if path.suffix == ".ipynb" else "the file"
        assert not unmarked, f"{path.name}, {where}: unmarked imports from {PACKAGE} on lines {unmarked}"


def test_the_marker_check_sees_marks_and_their_absence():
    assert unmarked_package_imports("from instructkit.x import y\n") == [1]
    assert unmarked_package_imports("from instructkit.x import y  # Not in the book: why\n") == []
    block = "# Not in the book: why\nimport os\nfrom instructkit.x import (\n    y,\n)\n"
    assert unmarked_package_imports(block) == []
    separated = "# Not in the book: why\n\nfrom instructkit.x import y\n"
    assert unmarked_package_imports(separated) == [3]


def test_no_module_imports_a_command_line_module():
    modules = project_modules()
    graph = import_graph(modules)
    commands = {f"{PACKAGE}.{name}" for name in COMMANDS}
    assert commands <= set(modules)
    importers = {module: sorted(targets & commands) for module, targets in graph.items()
                 if targets & commands}
    assert importers == {}


def test_the_book_files_are_at_the_root_and_the_rest_in_the_package():
    root = {path.stem for path in ROOT.glob("*.py")}
    assert root == {*BOOK_FILES, "fast_gpt", "exercise_variants"}
    assert (ROOT / PACKAGE / "__init__.py").is_file()
    assert {path.name for path in ROOT.glob("*.ipynb")} >= {
        "ch07_instruction_finetuning.ipynb", "exercise-solutions.ipynb",
        "load-finetuned-model.ipynb", "dpo-preference-tuning.ipynb"}
