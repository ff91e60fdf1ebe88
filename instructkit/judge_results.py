"""The judge's work: its question and the reading of its replies, checked entries, saved results.

Not in the book. The book's scoring loop reads a reply with int() and keeps its scores in
memory, so a reply such as "85." is lost and a run cut off after an hour of judging starts
again from the first entry. Here:

- `build_score_prompt` is the chapter's scoring question for an entry, and `parse_score`
  reads the score in the judge's reply ("85", "85.", "Score: 85", "85/100");
- `load_entries` reads the input file and checks every entry before the first request: a
  missing file, a file that is not JSON or an entry without its keys is one `DatasetError`
  (a BadInputError: exit code 2) naming the file and the entry;
- `ResumableResults` keeps the result of each entry as it arrives, in a JSON file named by the
  caller and stamped with a fingerprint of the work (the settings and every prompt), so that a
  later run of the same work only does the entries still missing, and a run of other work
  starts fresh. `run_resumable` drives it for any per-entry job (make_preference_data, the
  head-to-head comparison of compare.py);
  `open_scores` gives the scores file of the book's `generate_model_scores`;
- `save_outputs` says where the scores went and draws their histogram (`plot_scores`).

Imports only the standard library, tqdm and (to draw) matplotlib: no torch.
"""

import hashlib
import json
import re
from pathlib import Path

from tqdm import tqdm

from instructkit.errors import ExpectedError
from instructkit.instruction_data import REQUIRED_KEYS, DatasetError, format_input
from instructkit.instruction_data import validate_entries as validate_instruction_entries
from instructkit.safe_files import save_figure, write_json

SCORES_FORMAT = 1  # version of the scores file layout


# ---------------------------------------------------------------------------------------
# The chapter's scoring question and the reading of its answer
# ---------------------------------------------------------------------------------------


def build_score_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry (as the book's generate_model_scores builds it)."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


_RANGE_PHRASE = re.compile(r"\b0\s*(?:-|–|to)\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+(?:\.\d+)?)(?![\d])")


def parse_score(reply):
    """The first whole number from 0 to 100 in the judge's reply, or None.

    "85", " 85 \\n", "85.", "**85**", "Score: 85" and "85/100" all give 85. A "0-100"/"0 to 100"
    range phrase is skipped, negative numbers are not scores, and 85.0 counts as 85.
    """
    if not isinstance(reply, str):
        return None
    text = _RANGE_PHRASE.sub(" ", reply)
    for match in _NUMBER.finditer(text):
        sign, digits = match.groups()
        if sign:
            continue
        value = float(digits)
        if value.is_integer() and 0 <= value <= 100:
            return int(value)
    return None


# ---------------------------------------------------------------------------------------
# The input
# ---------------------------------------------------------------------------------------


def validate_entries(data, json_key=None, source="input"):
    """Raise DatasetError unless `data` is a list of entries with text under all keys
    (instruction, input, output, and `json_key` when given)."""
    keys = REQUIRED_KEYS if json_key is None else (*REQUIRED_KEYS, json_key)
    validate_instruction_entries(data, source, keys=keys)


def load_entries(file_path, json_key="model_response"):
    """Load and check a JSON file of entries; raise DatasetError on problems.

    With `json_key=None` only the instruction, input and output are required.
    """
    path = Path(file_path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"input path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    validate_entries(data, json_key, source=str(path))
    return data


# ---------------------------------------------------------------------------------------
# Results saved entry by entry
# ---------------------------------------------------------------------------------------


def work_fingerprint(header, prompts):
    """sha256 over `header` (the settings, a JSON object) and every prompt: same value, same work."""
    digest = hashlib.sha256()
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode("utf-8"))
    return digest.hexdigest()


class ResumableResults:
    """{entry index: result} of work done entry by entry, each result saved as it arrives.

    With `path`, results an earlier run saved under the same `fingerprint` are loaded (and said
    so, with `done` as the verb: "scored", "rewritten"), and every `add` rewrites the file
    (atomically): `header`, the fingerprint, the number of entries and the results by index.
    Without `path` the results stay in memory.
    """

    def __init__(self, n_entries, path=None, header=None, fingerprint=None, done="scored"):
        self.n_entries = n_entries
        self.path = None if path is None else Path(path)
        self.header, self.fingerprint = header or {}, fingerprint
        self.results = {} if self.path is None else self._load(done)

    def _load(self, done):
        if not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            tqdm.write(f"Could not read the saved results {self.path}; starting fresh.")
            return {}
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            tqdm.write(f"The results in {self.path} were made for a different input or judge "
                       "model; starting fresh.")
            return {}
        previous = {}
        for result in saved.get("results", []):
            index = result.get("index") if isinstance(result, dict) else None
            if isinstance(index, int) and 0 <= index < self.n_entries:
                previous[index] = result
        if previous:
            tqdm.write(f"Resuming: {len(previous)} of {self.n_entries} entries already {done} "
                       f"in {self.path}.")
        return previous

    def __contains__(self, index):
        return index in self.results

    def __getitem__(self, index):
        return self.results[index]

    def __len__(self):
        return len(self.results)

    def add(self, index, result):
        """Keep `result` (a JSON object) for entry `index`, and save all results so far."""
        self.results[index] = {"index": index, **result}
        if self.path is not None:
            write_json(self.path, {
                **self.header,
                "fingerprint": self.fingerprint,
                "num_entries": self.n_entries,
                "results": [self.results[i] for i in sorted(self.results)],
            })


def run_resumable(n_entries, work, results_path=None, header=None, fingerprint=None,
                  desc="Scoring entries", done="scored"):
    """Call `work(index)` for every entry index not done yet; return {index: result}.

    `work` returns a JSON object, or None when the entry has no result this time (it is tried
    again by the next run). With `results_path`, the results are saved as they arrive (see
    ResumableResults), and a later call with the same fingerprint only does the entries
    still missing.
    """
    results = ResumableResults(n_entries, results_path, header, fingerprint, done)
    todo = [i for i in range(n_entries) if i not in results]
    for index in tqdm(todo, desc=desc, initial=len(results), total=n_entries):
        result = work(index)
        if result is not None:
            results.add(index, result)
    return results.results


# ---------------------------------------------------------------------------------------
# The scores file of generate_model_scores
# ---------------------------------------------------------------------------------------


def scores_header(json_key, model):
    """What the scores file says about how it was made."""
    return {"format": SCORES_FORMAT, "model": model, "json_key": json_key}


def scores_fingerprint(json_data, json_key, model):
    """sha256 over the judge, the key and every entry's prompt: same value, same scores."""
    header = {**scores_header(json_key, model), "n": len(json_data)}
    return work_fingerprint(header, (build_score_prompt(entry, json_key) for entry in json_data))


class ScoreRecord(ResumableResults):
    """The judge's reply and score for each entry (`score` None: the reply held no number)."""

    def add_score(self, index, reply, score):
        """Keep one entry's result; `reply` None means an empty answer scored 0 unasked."""
        result = {"reply": reply, "score": score}
        if reply is None:
            result["empty_response"] = True
        self.add(index, result)

    def score(self, index):
        return self.results[index]["score"]

    def report(self):
        """Print how many answers were empty and how many replies held no score, if any."""
        empty = sum(bool(r.get("empty_response")) for r in self.results.values())
        if empty:
            print(f"Empty responses scored 0 without asking the judge: {empty} of {self.n_entries}")
        unparsed = sum(r.get("score") is None for r in self.results.values())
        if unparsed:
            print(f"Replies without a score: {unparsed} of {self.n_entries}")


def open_scores(json_data, json_key, model, scores_path=None):
    """Check the entries (DatasetError before any request), then return their ScoreRecord:
    with `scores_path`, what an earlier run of the same entries and judge saved there."""
    validate_entries(json_data, json_key)
    if scores_path is None:
        return ScoreRecord(len(json_data))
    return ScoreRecord(len(json_data), scores_path, scores_header(json_key, model),
                       scores_fingerprint(json_data, json_key, model))


# ---------------------------------------------------------------------------------------
# What a run shows at the end
# ---------------------------------------------------------------------------------------


def plot_scores(scores, path, title=None):
    """Save a histogram of the scores (bins of 5 points) as an image; return the path."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, works without a display

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(scores, bins=range(0, 105, 5), edgecolor="black")
    ax.set_xlim(0, 100)
    ax.set_xlabel("Score")
    ax.set_ylabel("Number of entries")
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return Path(path)


def save_outputs(scores, file_path, model, scores_path=None, plot_path=None):
    """Say where the scores are saved, and draw their histogram to `plot_path` (when given)."""
    if scores_path is not None:
        print(f"Scores saved to {scores_path}")
    if plot_path is None or not scores:
        return
    average = sum(scores) / len(scores)
    title = f"{Path(file_path).name}, judged by {model}\n{len(scores)} scores, mean {average:.2f}"
    try:
        plot_scores(scores, plot_path, title=title)
    except (OSError, ValueError) as exc:  # a folder that is not there, an unknown extension
        raise ExpectedError(f"could not save the histogram to {plot_path}: {exc}") from None
    print(f"Histogram saved to {plot_path}")
