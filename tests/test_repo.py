"""Repository hygiene: CI runs the README's test command, and runtime requirements are complete."""

import ast
import re
import shutil
import sys

from conftest import ROOT

TEST_COMMAND = "pip install -r requirements.txt -r requirements-dev.txt && ruff check . && python -m pytest"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in readme
    assert ci_lines[-1] == TEST_COMMAND


def test_requirements_cover_the_modules_imports():
    """Every third-party package the flat modules import is in requirements.txt."""
    stdlib = set(sys.stdlib_module_names)
    local = {p.stem for p in ROOT.glob("*.py")} | {"instructkit"}
    pip_names = {"torch", "tiktoken", "tensorflow", "numpy", "matplotlib", "tqdm", "psutil",
                 "tiktoken_ext", "safetensors", "gradio", "certifi", "tokenizers", "jinja2",
                 "nbformat", "nbclient"}
    # TensorFlow (only for OpenAI's original checkpoint) and Gradio (only for the web chat)
    # have their own files, requirements-tf.txt and requirements-app.txt
    required = {re.split(r"[<>=;\s]", line, maxsplit=1)[0].lower()
                for name in ("requirements.txt", "requirements-tf.txt", "requirements-app.txt")
                for line in (ROOT / name).read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    # Optional packages, imported inside a try with a fallback: in requirements-dev.txt, for the
    # tests (scikit-learn's TF-IDF in check_data, which has a numpy one of its own)
    optional = {"sklearn": "scikit-learn"}
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    for package in optional.values():
        assert any(re.split(r"[<>=;\s]", line, maxsplit=1)[0].lower() == package for line in dev)
    for module in [*ROOT.glob("*.py"), *ROOT.glob("instructkit/*.py")]:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in stdlib or name in local or name in optional or name == "__future__":
                    continue
                assert name in pip_names, f"{module.name} imports {name}: add it to requirements.txt"
                assert name.replace("tiktoken_ext", "tiktoken") in required, name


def test_a_plain_copy_without_git_lists_the_same_files(tmp_path):
    """The notebook tests copy the repository; from a copy without .git they copy the same files."""
    from notebook_runner import repo_files

    tracked = sorted(repo_files())
    for rel in tracked:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    for junk in ("gpt2/124M/hparams.json", "__pycache__/x.pyc", ".pytest_cache/v", "instruction-data.json",
                 "outputs/a.txt", "loss-plot.png", ".ipynb_checkpoints/n.ipynb", "model.pth"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("ignored", encoding="utf-8")
    assert not (tmp_path / ".git").exists()
    assert repo_files(tmp_path) == tracked
