"""How well two judges agree: Pearson and Spearman correlations of their scores, and a scatter plot.

Not in the book. The book's bonus folder (`03_model-evaluation`, its correlation analysis)
compares the scores of two judges of the same answers, Llama 3 and GPT-4, to see whether a
small local judge ranks answers as a large one does. Given two scores files of the same
answers (as `python ollama_evaluate.py` or `python -m instructkit.score` write them)::

    python -m instructkit.judge_agreement answers-llama3-scores.json answers-gpt-4o-scores.json

it prints both correlations over the entries both judges scored, and saves a scatter plot
(`--plot`, default `<first stem>-vs-<second stem>.png` beside the first file). Pearson measures
a straight-line relation of the scores; Spearman, Pearson's of their ranks (tied scores share
their average rank), only whether they order the answers alike. numpy only: no scipy.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from instructkit.errors import BadInputError, ExpectedError


def average_ranks(values):
    """The ranks (1 = smallest) of `values`, tied values sharing the average of their ranks."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def pearson(x, y):
    """Pearson's correlation of `x` and `y` (nan when either is constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x, y):
    """Spearman's rank correlation: Pearson's of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def load_scores(path):
    """(the file's header, {entry index: score}) of a scores file; BadInputError on problems."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"scores file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path} is not a readable scores file: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("results"), list):
        raise BadInputError(f"{path} is not a scores file (no \"results\" list): write one with "
                            "python -m instructkit.score or ollama_evaluate.py")
    scores = {}
    for result in saved["results"]:
        if isinstance(result, dict) and isinstance(result.get("index"), int):
            score = result.get("score")
            if isinstance(score, int | float) and not isinstance(score, bool):
                scores[result["index"]] = float(score)
    return {k: v for k, v in saved.items() if k != "results"}, scores


def agreement(path_a, path_b):
    """(Pearson, Spearman, paired scores (n x 2 array), header A, header B) of two scores files
    of the same answers; BadInputError when they cannot be of the same answers."""
    head_a, scores_a = load_scores(path_a)
    head_b, scores_b = load_scores(path_b)
    for key in ("num_entries", "json_key"):
        if key in head_a and key in head_b and head_a[key] != head_b[key]:
            raise BadInputError(f"{path_a} and {path_b} score different answers ({key}: "
                                f"{head_a[key]!r} and {head_b[key]!r})")
    both = sorted(set(scores_a) & set(scores_b))
    if len(both) < 3:
        raise BadInputError(f"only {len(both)} entries are scored in both files: need at least 3")
    pairs = np.array([[scores_a[i], scores_b[i]] for i in both])
    return pearson(pairs[:, 0], pairs[:, 1]), spearman(pairs[:, 0], pairs[:, 1]), pairs, head_a, head_b


def plot_agreement(pairs, path, label_a, label_b, title=None):
    """A scatter plot of the paired scores, with the line where both judges agree."""
    from matplotlib.figure import Figure

    from instructkit.safe_files import save_figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(pairs[:, 0], pairs[:, 1], alpha=0.6, edgecolor="black")
    ax.plot([0, 100], [0, 100], linestyle="--", color="gray", label="equal scores")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"Score by {label_a}")
    ax.set_ylabel(f"Score by {label_b}")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return Path(path)


def _fmt(value):
    return "undefined (one judge gave every answer the same score)" if np.isnan(value) else f"{value:.3f}"


def run_agreement(args):
    from instructkit.judge_cli import check_outputs

    path_a, path_b = Path(args.scores_a), Path(args.scores_b)
    plot_path = Path(args.plot) if args.plot else path_a.with_name(f"{path_a.stem}-vs-{path_b.stem}.png")
    check_outputs((plot_path, "--plot"))
    r, rho, pairs, head_a, head_b = agreement(path_a, path_b)
    label_a = head_a.get("model") or path_a.stem
    label_b = head_b.get("model") or path_b.stem
    print(f"Entries scored by both judges: {len(pairs)}")
    print(f"Pearson correlation: {_fmt(r)}")
    print(f"Spearman correlation: {_fmt(rho)}")
    try:
        plot_agreement(pairs, plot_path, label_a, label_b,
                       title=f"{len(pairs)} answers: Pearson {r:.2f}, Spearman {rho:.2f}")
    except (OSError, ValueError) as exc:
        raise ExpectedError(f"could not save the scatter plot to {plot_path}: {exc}") from None
    print(f"Scatter plot saved to {plot_path}")
    return 0


def main(argv=None):
    """The command line; returns the exit code (instructkit/errors.py)."""
    from instructkit.console import use_utf8_console
    from instructkit.errors import run_command

    use_utf8_console()
    parser = argparse.ArgumentParser(
        prog="python -m instructkit.judge_agreement",
        description="Pearson and Spearman correlations of two judges' scores of the same "
                    "answers, and a scatter plot.")
    parser.add_argument("scores_a", help="scores file of the first judge")
    parser.add_argument("scores_b", help="scores file of the second judge (the same answers)")
    parser.add_argument("--plot", default=None,
                        help="scatter plot image (default: <A stem>-vs-<B stem>.png beside A)")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an OSError (a permission, a full disk, ...)")
    args = parser.parse_args(argv)
    return run_command(lambda: run_agreement(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
