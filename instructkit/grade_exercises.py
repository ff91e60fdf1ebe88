"""Grade a folder of students' exercise notebooks: run each, collect its checks, write a CSV.

    python -m instructkit.grade_exercises SUBMISSIONS_DIR --out grades.csv [--timeout 120] [--jobs 4]

Every `*.ipynb` under SUBMISSIONS_DIR is one student's copy of exercises.ipynb; the student's
name is its path inside the folder without `.ipynb` (`alice.ipynb` -> `alice`,
`alice/exercises.ipynb` -> `alice/exercises`). Each notebook runs in a fresh kernel, in its
own temporary copy of the chapter's Python files (so a notebook that deletes files harms only
its copy), top to bottom with errors allowed (a failing cell does not stop the ones after it),
and is stopped after `--timeout` seconds in all (a notebook that loops forever is killed, and
the others are still graded). `--jobs` notebooks run at the same time.

The check cells (instructkit/exercise_checks.py) append their results to a file the grader
names through the environment. The CSV has one row per student and exercise:

    student, exercise, result, message

`result` is "passed", "failed", "not done" (the stub is still there, or the check cell is
missing), "crashed" (the student's code raised an exception, or a cell failed before the check
ran) or "timeout" (the notebook ran out of time before the check ran). A summary table is
printed at the end.

Exit codes: 0 graded (whatever the results); 2 bad input (no such folder, no notebooks in it,
a timeout or a number of jobs that is not positive); 1 the CSV could not be written; 130 Ctrl-C.
"""

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from instructkit import CHAPTER_DIR
from instructkit.errors import BadInputError, run_command
from instructkit.exercise_checks import CRASHED, EXERCISES, FAILED, NOT_DONE, PASSED, RESULTS_ENV

TIMEOUT = "timeout"
RESULTS = (PASSED, FAILED, NOT_DONE, CRASHED, TIMEOUT)
COLUMNS = ("student", "exercise", "result", "message")
DEFAULT_JOBS = max(1, min(4, (os.cpu_count() or 2) // 2))  # kernels at once; each starts PyTorch


def find_notebooks(folder):
    """[(student, path)] of the notebooks under `folder`, sorted by student."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder: give the folder of submitted notebooks")
    found = sorted((path.relative_to(folder).with_suffix("").as_posix(), path)
                   for path in folder.rglob("*.ipynb")
                   if not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not found:
        raise BadInputError(f"{folder} holds no notebooks (*.ipynb)")
    return found


def copy_chapter(dest):
    """The Python files a student notebook needs: the chapter's, and the package's."""
    for path in [*CHAPTER_DIR.glob("*.py"), *(CHAPTER_DIR / "instructkit").glob("*.py")]:
        target = dest / path.relative_to(CHAPTER_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _first_error(nb):
    """'Type: message (cell N)' of the first cell that raised, or None."""
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')} (cell {index})"
    return None


def run_submission(path, timeout, workdir):
    """Run notebook `path` in `workdir` (a fresh copy of the chapter's files) within `timeout`
    seconds in all. Returns ({exercise: (result, message)} from its checks, what stopped it:
    None, (TIMEOUT, why) or (CRASHED, why))."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    results_file = workdir.parent / "results.jsonl"  # outside the notebook's folder
    try:
        nb = nbformat.read(path, as_version=4)
    except (OSError, ValueError) as error:  # nbformat's read errors are ValueErrors
        return {}, (CRASHED, f"not a readable notebook: {error}")
    deadline = time.monotonic() + timeout
    client = NotebookClient(nb, kernel_name="python3", allow_errors=True, shutdown_kernel="immediate",
                            timeout_func=lambda cell: max(1, int(deadline - time.monotonic() + 1)),
                            startup_timeout=max(10, int(timeout)),
                            resources={"metadata": {"path": str(workdir)}})
    env = {**os.environ, RESULTS_ENV: str(results_file), "MPLBACKEND": "Agg"}
    stopped = None
    try:
        with client.setup_kernel(env=env):
            for index, cell in enumerate(nb.cells):
                if time.monotonic() > deadline:
                    raise CellTimeoutError(f"out of time before cell {index}")
                client.execute_cell(cell, index)
    except CellTimeoutError:
        stopped = (TIMEOUT, f"the notebook ran past its {timeout:g} s and was stopped")
    except DeadKernelError as error:
        stopped = (CRASHED, f"the notebook's kernel died: {error}")
    if stopped is None and (error := _first_error(nb)):
        stopped = (CRASHED, f"its check did not run; the first cell that failed: {error}")
    return _read_results(results_file), stopped


def _read_results(results_file):
    results = {}
    if results_file.is_file():
        for line in results_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and item.get("exercise") in EXERCISES \
                    and item.get("status") in RESULTS:
                results[item["exercise"]] = (item["status"], str(item.get("message", "")))
    return results  # the last result of each exercise


def grade_notebook(student, path, timeout):
    """The CSV rows of one student: one per exercise, in the notebook's order."""
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        copy_chapter(workdir)
        copy = workdir / path.name
        shutil.copyfile(path, copy)
        results, stopped = run_submission(copy, timeout, workdir)
    rows = []
    for name in EXERCISES:
        result, message = results.get(name) or stopped or (
            NOT_DONE, "its check did not run: the check cell is missing")
        rows.append({"student": student, "exercise": name, "result": result, "message": message})
    return rows


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary(rows):
    """A table: per student, how many exercises have each result; then passes per exercise."""
    students = list(dict.fromkeys(row["student"] for row in rows))
    width = max(len("student"), *(len(s) for s in students))
    lines = [f"{'student':<{width}}  " + "  ".join(f"{r:>8}" for r in RESULTS)]
    for student in students:
        counts = [sum(1 for row in rows if row["student"] == student and row["result"] == r)
                  for r in RESULTS]
        lines.append(f"{student:<{width}}  " + "  ".join(f"{c:>8}" for c in counts))
    lines.append("")
    for name in EXERCISES:
        passed = sum(1 for row in rows if row["exercise"] == name and row["result"] == PASSED)
        lines.append(f"{name}: passed by {passed} of {len(students)}")
    return "\n".join(lines)


def grade(folder, out, timeout=120, jobs=1, progress=True):
    """Grade every notebook in `folder`, `jobs` at a time; write the CSV to `out`; return the
    rows (by student, then exercise)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    from instructkit.safe_files import write_atomically

    if not timeout > 0:
        raise BadInputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if jobs < 1:
        raise BadInputError(f"--jobs must be 1 or more, not {jobs}")
    notebooks = find_notebooks(folder)
    graded = {}
    # Threads only wait: each notebook runs in its own kernel process.
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=len(notebooks), desc="Grading", unit="notebook", disable=not progress) as bar:
        futures = {pool.submit(grade_notebook, student, path, timeout): student
                   for student, path in notebooks}
        try:
            for future in as_completed(futures):
                graded[futures[future]] = future.result()
                bar.update()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)  # start no other notebook
            raise
    rows = [row for student, _ in notebooks for row in graded[student]]
    text = csv_text(rows)
    write_atomically(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Grade a folder of students' exercises.ipynb "
                                                 "notebooks; write a CSV and print a summary.")
    parser.add_argument("submissions", help="the folder of submitted notebooks (*.ipynb)")
    parser.add_argument("--out", default="grades.csv", help="the CSV to write (default: grades.csv)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds each notebook may run in all (default: 120)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"notebooks graded at the same time (default: {DEFAULT_JOBS})")
    parser.add_argument("--debug", action="store_true", help="tracebacks for OS errors")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2

    def run():
        rows = grade(args.submissions, Path(args.out), args.timeout, args.jobs)
        print(summary(rows))
        print(f"Wrote {len(rows)} rows to {args.out}")

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
