"""Compare two models head to head: for each test entry a judge says which answer is better.

Not in the book, which compares models by their average scores (section 7.8). A judge that
scores one answer at a time is noisy, and a judge shown two answers prefers one position
(usually the first) more often than chance. So, as AlpacaEval and MT-Bench do, each entry is
asked twice, with the two answers in swapped positions::

    python -m instructkit.compare sft-answers.json dpo-answers.json --judge-model llama3
    python -m instructkit.compare answers.json answers.json --key-a sft_response \\
        --key-b dpo_response --api openai --base-url 127.0.0.1:8080

The rule (MT-Bench's "swap positions" rule): an entry is a **win** for model A only when the
judge prefers A's answer in both orders, a **loss** when it prefers B's in both, and a **tie**
otherwise, whether the judge said "tie" or contradicted itself. How often the two orders
disagree is the **inconsistency rate** (a judge that always picks the first position is 100%
inconsistent, and gives no win and no loss). The **win rate** of A counts a tie as half a win;
its 95% interval is Wilson's score interval over the entries judged (an approximation with
half-wins, good enough to see whether 50% is inside). A reply without a verdict leaves its
entry out of the counts (reported as "no verdict"). An empty answer loses to a non-empty one
without asking (two empty answers tie).

Both files must hold the same test entries (instruction, input, output) in the same order;
the first that differs is named. Results are saved entry by entry (judge_results'
resumable results: a stopped run continues where it stopped) to
`<A stem>-vs-<B stem>-<judge>-compare.json` beside the first file, and a bar chart of the wins,
ties and losses to the same name with .png. The judge options are the scoring command's:
--api ollama|openai, --base-url/--host, --model/--judge-model, --api-key-env, --timeout.
"""

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.errors import ExpectedError
from instructkit.instruction_data import DatasetError, format_input
from instructkit.judge import NUM_CTX, SEED
from instructkit.judge_results import load_entries, run_resumable, work_fingerprint

COMPARE_FORMAT = 1  # version of the results file layout
Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def build_compare_prompt(entry, first, second):
    """The judge's question: the entry, its correct output, and two responses (A shown first)."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"compare two model responses.\n\n"
        f"Response A: `{first}`\n\n"
        f"Response B: `{second}`\n\n"
        f"Which response is better? Respond with A, B, or tie only."
    )


_BRACKETED = re.compile(r"\[\[\s*(a|b|c|tie)\s*\]\]", re.IGNORECASE)
_NAMED = re.compile(r"\b(?:response|answer|assistant|output)\s+(a|b)\b")
_LEADING = re.compile(r"^(a|b)(?:\s+(?:is|wins|because|better)\b|$)")


def parse_verdict(reply):
    """"A", "B" or "tie" from the judge's reply, or None.

    "A", "**B**", "A.", "[[A]]" (MT-Bench's form, where [[C]] is a tie), "Response B",
    "B is better", "Tie", "Equal" are read; a reply naming both responses is not.
    """
    if not isinstance(reply, str):
        return None
    bracketed = _BRACKETED.search(reply)
    if bracketed:
        label = bracketed.group(1).lower()
        return "tie" if label in ("c", "tie") else label.upper()
    text = re.sub(r"[\s*`'\"().,:;!\[\]#_]+", " ", reply).strip().lower()
    if re.match(r"(tie|equal|both|neither)\b", text):
        return "tie"
    named = set(_NAMED.findall(text))
    if len(named) == 1:
        return named.pop().upper()
    if not named:
        leading = _LEADING.match(text)
        if leading:
            return leading.group(1).upper()
    return None


# The verdict of each order as a preference for model A ("a") or model B ("b"): in the first
# order A's answer is shown first, in the second B's is.
_PREFERENCE = ({"A": "a", "B": "b", "tie": "tie"}, {"A": "b", "B": "a", "tie": "tie"})


def outcome(verdict_ab, verdict_ba):
    """(outcome for A: "win", "loss", "tie" or None without a verdict, inconsistent) from the
    verdicts with A's answer first (`verdict_ab`) and with B's first (`verdict_ba`)."""
    if verdict_ab is None or verdict_ba is None:
        return None, False
    first, second = _PREFERENCE[0][verdict_ab], _PREFERENCE[1][verdict_ba]
    if first == second == "a":
        return "win", False
    if first == second == "b":
        return "loss", False
    return "tie", first != second


def wilson_interval(p, n, z=Z_95):
    """Wilson's score interval (low, high) for a proportion `p` over `n` trials."""
    if n == 0:
        return (0.0, 1.0)
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


@dataclass
class HeadToHead:
    """The counts of a comparison of model A (`name_a`) against model B (`name_b`)."""

    name_a: str
    name_b: str
    wins: int = 0
    ties: int = 0
    losses: int = 0
    no_verdict: int = 0
    inconsistent: int = 0
    results: dict = field(default_factory=dict, repr=False)

    @property
    def judged(self):
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self):
        """A's share of wins, a tie counting half (None when no entry was judged)."""
        return (self.wins + self.ties / 2) / self.judged if self.judged else None

    @property
    def interval(self):
        return wilson_interval(self.win_rate or 0.0, self.judged)

    @property
    def inconsistency_rate(self):
        asked = sum(1 for r in self.results.values() if not r.get("empty_response"))
        return self.inconsistent / asked if asked else 0.0

    def summary_lines(self):
        lines = [f"{self.name_a} vs {self.name_b}: {self.wins} wins, {self.ties} ties, "
                 f"{self.losses} losses over {self.judged} entries"]
        if self.win_rate is not None:
            low, high = self.interval
            lines.append(f"Win rate of {self.name_a}: {100 * self.win_rate:.1f}% (95% interval "
                         f"{100 * low:.1f}% to {100 * high:.1f}%, Wilson; a tie counts half)")
        lines.append(f"Judge inconsistent when the order was swapped: {self.inconsistent} entries "
                     f"({100 * self.inconsistency_rate:.1f}%)")
        if self.no_verdict:
            lines.append(f"Entries without a verdict (a reply naming neither): {self.no_verdict}")
        return lines


def check_same_entries(entries_a, entries_b, source_a="A", source_b="B"):
    """DatasetError (exit code 2) unless both lists hold the same test entries in order."""
    if len(entries_a) != len(entries_b):
        raise DatasetError(f"{source_a} has {len(entries_a)} entries and {source_b} "
                           f"{len(entries_b)}: compare answers to the same test entries")
    for index, (a, b) in enumerate(zip(entries_a, entries_b, strict=True)):
        for key in ("instruction", "input", "output"):
            if a.get(key, "") != b.get(key, ""):
                raise DatasetError(
                    f"entry {index} differs between {source_a} and {source_b} (its {key!r}): "
                    "compare answers to the same test entries, in the same order")


def compare_answers(server, entries_a, entries_b, model, key_a="model_response",
                    key_b="model_response", results_path=None, names=("A", "B"),
                    num_ctx=NUM_CTX, seed=SEED):
    """Ask the judge `model` on `server` (a judge.ChatServer) which answer is better for every
    entry, in both orders; return the HeadToHead. With `results_path` the results are saved
    entry by entry, and a call again with the same work only asks for the entries missing."""
    check_same_entries(entries_a, entries_b)
    pairs = [(a[key_a], b[key_b]) for a, b in zip(entries_a, entries_b, strict=True)]
    prompts = [(build_compare_prompt(e, x, y), build_compare_prompt(e, y, x))
               for e, (x, y) in zip(entries_a, pairs, strict=True)]
    header = {"format": COMPARE_FORMAT, "kind": "head-to-head", "model": model,
              "name_a": names[0], "name_b": names[1], "key_a": key_a, "key_b": key_b}
    fingerprint = work_fingerprint({**header, "n": len(pairs)},
                                   (p for both in prompts for p in both))

    def judge(index):
        answer_a, answer_b = (text.strip() for text in pairs[index])
        if not answer_a or not answer_b:  # no question to ask: the empty answer loses
            result = "tie" if answer_a == answer_b else ("win" if answer_a else "loss")
            return {"outcome": result, "inconsistent": False, "empty_response": True}
        replies = [server.chat(prompt, model, seed=seed, num_ctx=num_ctx)
                   for prompt in prompts[index]]
        verdicts = [parse_verdict(reply) for reply in replies]
        result, inconsistent = outcome(*verdicts)
        return {"verdict_ab": verdicts[0], "verdict_ba": verdicts[1], "outcome": result,
                "inconsistent": inconsistent, "reply_ab": replies[0], "reply_ba": replies[1]}

    results = run_resumable(len(pairs), judge, results_path, header, fingerprint,
                            desc="Comparing entries", done="compared")
    return tally(results, names)


def tally(results, names=("A", "B")):
    """The HeadToHead of saved per-entry results ({index: {"outcome", "inconsistent"}})."""
    counts = HeadToHead(*names, results=dict(results))
    for result in results.values():
        kind = result.get("outcome")
        if kind == "win":
            counts.wins += 1
        elif kind == "loss":
            counts.losses += 1
        elif kind == "tie":
            counts.ties += 1
        else:
            counts.no_verdict += 1
        counts.inconsistent += bool(result.get("inconsistent"))
    return counts


def plot_head_to_head(counts, path, title=None):
    """A bar chart of A's wins, the ties and A's losses; return the path."""
    from matplotlib.figure import Figure

    from instructkit.safe_files import save_figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    labels = [f"{counts.name_a} wins", "ties", f"{counts.name_b} wins"]
    values = [counts.wins, counts.ties, counts.losses]
    bars = ax.bar(labels, values, color=["tab:green", "tab:gray", "tab:red"], edgecolor="black")
    ax.bar_label(bars)
    ax.set_ylabel("Number of entries")
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return Path(path)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def build_parser():
    from instructkit.judge_cli import add_api_arguments, add_server_arguments

    parser = argparse.ArgumentParser(
        prog="python -m instructkit.compare",
        description="Compare two models' answers to the same test entries head to head: the "
                    "judge picks the better answer, twice, with the order swapped.")
    parser.add_argument("file_a", help="answers of model A (JSON: the test entries with answers)")
    parser.add_argument("file_b", help="answers of model B (the same entries; may be file_a)")
    parser.add_argument("--json-key", default="model_response",
                        help="key of the answers in both files (default: model_response)")
    parser.add_argument("--key-a", default=None, help="key of A's answers (default: --json-key)")
    parser.add_argument("--key-b", default=None, help="key of B's answers (default: --json-key)")
    parser.add_argument("--name-a", default=None, help="A's name in the report (default: the "
                                                       "file's stem, or the key for one file)")
    parser.add_argument("--name-b", default=None, help="B's name in the report")
    add_server_arguments(parser, what="judge", any_api=True)
    parser.add_argument("--judge-model", dest="model", help="the same as --model")
    add_api_arguments(parser)
    parser.add_argument("--results-out", default=None,
                        help="per-entry results JSON, also used to resume (default: "
                             "<A stem>-vs-<B stem>-<judge>-compare.json beside file_a)")
    parser.add_argument("--plot", default=None, help="bar chart image (default: the results' "
                                                     "name with .png)")
    return parser


def run_compare(args):
    from instructkit.judge_cli import check_outputs, open_judge, resume_hint

    key_a, key_b = args.key_a or args.json_key, args.key_b or args.json_key
    path_a, path_b = Path(args.file_a), Path(args.file_b)
    same_file = path_a.resolve() == path_b.resolve()
    if same_file and key_a == key_b:
        raise DatasetError("both sides are the same answers (one file, one key): name two "
                           "files, or two keys with --key-a and --key-b")
    name_a = args.name_a or (key_a if same_file else path_a.stem)
    name_b = args.name_b or (key_b if same_file else path_b.stem)
    entries_a = load_entries(path_a, key_a)
    entries_b = entries_a if same_file else load_entries(path_b, key_b)
    check_same_entries(entries_a, entries_b, str(path_a), str(path_b))
    stem = f"{_safe(name_a)}-vs-{_safe(name_b)}-{_safe(args.model)}-compare"
    results_path = Path(args.results_out) if args.results_out else path_a.with_name(stem + ".json")
    plot_path = Path(args.plot) if args.plot else results_path.with_suffix(".png")
    check_outputs((results_path, "--results-out"), (plot_path, "--plot"))
    with resume_hint(results_path):
        server = open_judge(args)
        print(f"Judge: {args.model} on the {server.name} server at {server.base_url}")
        counts = compare_answers(server, entries_a, entries_b, args.model, key_a, key_b,
                                 results_path, (name_a, name_b), num_ctx=args.num_ctx)
    for line in counts.summary_lines():
        print(line)
    print(f"Results saved to {results_path}")
    title = f"{name_a} vs {name_b}, judged by {args.model} (both orders)"
    try:
        plot_head_to_head(counts, plot_path, title)
    except (OSError, ValueError) as exc:
        raise ExpectedError(f"could not save the bar chart to {plot_path}: {exc}") from None
    print(f"Bar chart saved to {plot_path}")
    return counts


def main(argv=None):
    """The command line; returns the exit code (instructkit/errors.py)."""
    from instructkit.console import use_utf8_console
    from instructkit.errors import run_command

    use_utf8_console()
    args = build_parser().parse_args(argv)
    return run_command(lambda: (run_compare(args), 0)[1], debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
