"""Write the student notebook, exercises.ipynb, from exercise-solutions.ipynb.

    python -m instructkit.student_notebook           # (re)write exercises.ipynb
    python -m instructkit.student_notebook --check   # exit 1 if exercises.ipynb is out of date

The solutions notebook is the one source. Its markers, in nbgrader's style:

- a cell tagged `exercise` (cell metadata "tags") goes into the student notebook; the other
  cells (the worked runs, the results) stay in the solutions notebook only;
- in such a code cell, the lines from `### BEGIN SOLUTION` to `### END SOLUTION` are the
  solution. The student version replaces them with a stub of each exercise the block defines
  (imports or assigns), as instructkit/exercise_checks.py's `EXERCISES` names them: the
  signature of the chapter's function or class (taken from it, so the two cannot drift) and
  `raise NotImplementedError` where the student's code goes.

The student notebook starts with its own introduction (`STUDENT_INTRO`) and is written
atomically, UTF-8, without outputs.
"""

import argparse
import ast
import copy
import inspect
import sys
from pathlib import Path

from instructkit import CHAPTER_DIR
from instructkit.errors import BadInputError, run_command

SOLUTIONS = CHAPTER_DIR / "exercise-solutions.ipynb"
STUDENT = CHAPTER_DIR / "exercises.ipynb"
TAG = "exercise"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BLANK = "raise NotImplementedError  # replace this line with your code"

STUDENT_INTRO = """\
# Chapter 7: exercises

The pieces of chapter 7 of *Build a Large Language Model (From Scratch)* that you write
yourself: the chapter's `format_input`, `custom_collate_fn` (with the -100 mask) and
`extract_response`, then exercise 7.1 (the Phi-3 prompt), 7.2 (masking the instructions) and
7.4 (LoRA's `LoRALayer` and `LinearWithLoRA`).

Each has a code cell with the function's (or class's) signature and a `raise
NotImplementedError`: replace that line with your code. The check cell after it runs your code
on the chapter's own examples and says what differs: a shape, the first position that differs
(expected and actual value), and the typical mistake that explains it. A check that says *not
done yet* is waiting for your code. The checks need no model weights and no network, and run
in seconds on a laptop CPU.

Run the notebook from the repository's folder (the checks import the chapter's files). The
worked solutions, with the finetuning runs and the book's results, are in
`exercise-solutions.ipynb`; to finetune with the exercises' variants, use the chapter's script:
`python gpt_instruction_finetuning.py --prompt-style phi3`, `--mask-instructions`,
`--lora-rank 16 --lora-alpha 16`."""


def _parameter(param):
    """A parameter as the book writes it (`device="cpu"`, not inspect's `device='cpu'`)."""
    if isinstance(param.default, str) and '"' not in param.default:
        return f'{param.name}="{param.default}"'
    return str(param)


def _stub_signature(name, function):
    """`def name(...):`, one parameter per line when the line would be long (as the book writes
    custom_collate_fn)."""
    params = [_parameter(p) for p in inspect.signature(function).parameters.values()]
    line = f"def {name}({', '.join(params)}):"
    if len(line) <= 90:
        return line
    return f"def {name}(\n" + ",\n".join(f"    {p}" for p in params) + "\n):"


def stub(name):
    """The blank for exercise `name`: the chapter's signature and NotImplementedError."""
    import torch.nn as nn

    from instructkit.exercise_checks import EXERCISES

    reference = EXERCISES[name].reference
    if not inspect.isclass(reference):
        return f"{_stub_signature(name, reference)}\n    {BLANK}\n"
    if reference.__bases__ != (nn.Module,):
        raise BadInputError(f"{name}: the stub writer knows classes based on torch.nn.Module only")
    methods = [(key, value) for key, value in vars(reference).items() if inspect.isfunction(value)]
    lines = [f"class {name}(torch.nn.Module):"]
    for key, method in methods:
        lines.append("    " + _stub_signature(key, method).replace("\n", "\n    "))
        if key == "__init__":
            lines.append("        super().__init__()")
        lines += [f"        {BLANK}", ""]
    return "\n".join(lines[:-1]) + "\n"


def _bound_names(source):
    """Names a block of code defines: imports, assignments, functions and classes."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names += [(alias.asname or alias.name).split(".")[0] for alias in node.names]
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
    return names


def student_source(source, where, exercises, done):
    """A code cell's source with each solution block replaced by its exercises' stubs.

    `done` collects the exercises stubbed so far (each exactly once in a notebook)."""
    lines, out, block = source.split("\n"), [], None
    for line in lines:
        if line.rstrip() == BEGIN:
            if block is not None:
                raise BadInputError(f"{where}: '{BEGIN}' inside a solution block")
            block = []
        elif line.rstrip() == END:
            if block is None:
                raise BadInputError(f"{where}: '{END}' without '{BEGIN}'")
            bound = _bound_names("\n".join(block))
            names = [n for n in exercises if n in bound]  # in the checks' order
            if not names:
                raise BadInputError(f"{where}: the solution block defines no exercise "
                                    f"(one of {', '.join(exercises)})")
            again = [n for n in names if n in done]
            if again:
                raise BadInputError(f"{where}: {again[0]} is stubbed a second time")
            done.extend(names)
            needs_torch = any(inspect.isclass(exercises[n].reference) for n in names)
            stubs = "\n\n".join(stub(n) for n in names).rstrip("\n").split("\n")
            out += (["import torch", "", ""] if needs_torch else []) + stubs
            block = None
        elif block is not None:
            block.append(line)
        else:
            out.append(line)
    if block is not None:
        raise BadInputError(f"{where}: '{BEGIN}' without '{END}'")
    return "\n".join(out).strip("\n")


def student_notebook(solutions):
    """The student version of the solutions notebook (an nbformat notebook, not changed)."""
    import nbformat

    from instructkit.exercise_checks import EXERCISES

    nb = copy.deepcopy(solutions)
    done, cells = [], [nbformat.v4.new_markdown_cell(STUDENT_INTRO, id="student-intro")]
    for index, cell in enumerate(nb.cells):
        if TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        if cell.cell_type == "code":
            cell.source = student_source(cell.source, f"cell {index}", EXERCISES, done)
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    missing = [name for name in EXERCISES if name not in done]
    if missing:
        raise BadInputError(f"no solution block defines {', '.join(missing)}")
    nb.cells = cells
    return nb


def render(solutions_path=SOLUTIONS):
    """The student notebook's file contents, as the repository stores notebooks."""
    import nbformat

    path = Path(solutions_path)
    if not path.is_file():
        raise BadInputError(f"{path} not found: the student notebook is made from it")
    nb = student_notebook(nbformat.read(path, as_version=4))
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def write(text, path):
    from instructkit.safe_files import write_atomically

    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def main(argv=None):
    """0: written (or up to date with --check); 1: out of date (--check); 2: bad input."""
    parser = argparse.ArgumentParser(description="Write exercises.ipynb, the student notebook, "
                                                 "from exercise-solutions.ipynb.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the student notebook is out of date")
    parser.add_argument("--solutions", default=str(SOLUTIONS), help="the solutions notebook")
    parser.add_argument("--out", default=str(STUDENT), help="the student notebook to write")
    parser.add_argument("--debug", action="store_true", help="tracebacks for OS errors")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2

    def run():
        text, out = render(args.solutions), Path(args.out)
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if args.check:
            if current != text:
                print(f"{out} is out of date: run python -m instructkit.student_notebook",
                      file=sys.stderr)
                return 1
            print(f"{out} is up to date")
            return 0
        if current != text:
            write(text, out)
        print(f"Wrote {out}" if current != text else f"{out} is up to date")
        return 0

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
