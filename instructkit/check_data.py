"""Check an instruction dataset before training: duplicates, test entries leaking into training,
empty outputs, prompts longer than the model's context.

Not in the book. The book's bonus folder `02_dataset-utilities` finds near-duplicate
instructions; a practitioner bringing their own JSON has no other way to see them, or a test
entry that (nearly) repeats a training entry, before hours of training. Usage::

    python -m instructkit.check_data instruction-data.json [--threshold 0.9]
        [--report report.json] [--cleaned cleaned.json] [--val-fraction 0.05 --test-fraction 0.1]

What it reports (indices are positions in the file, from 0):

- exact duplicates: entries whose instruction and input are the same text (whitespace at the
  ends aside), with whether their outputs differ too;
- near duplicates: pairs whose TF-IDF cosine similarity, over the instruction and the input,
  is at least `--threshold` (0.9 by default) and that are not exact duplicates;
- leakage: test and validation entries, in the split a finetuning run with the same fractions
  makes (the chapter's 85/10/5 by default, in the file's order), whose most similar training
  entry reaches the threshold;
- empty outputs (nothing but whitespace), and entries whose training text (the chapter's
  prompt, the response and the end-of-text token) is longer than the model's context (1024
  tokens for GPT-2; GPT-2's tokenizer by default, --tokenizer-dir for another's files; when
  tiktoken cannot download GPT-2's files, lengths are skipped with a note):
  training cuts those, and a prompt alone that long leaves no room for an answer.

The TF-IDF is scikit-learn's `TfidfVectorizer` with its defaults when scikit-learn is
installed, else `numpy_tfidf` here, which computes the same values (lowercase, words of two or
more letters or digits, idf = ln((1 + n) / (1 + df)) + 1, rows scaled to unit length) and
says once that scikit-learn is missing. The JSON report is written atomically; `--cleaned`
writes the entries without the second of each duplicate pair (exact or near), without empty
outputs and without over-long entries, to a new file: the input is never changed. Since the
split is positional, the later entry of a pair that straddles the split is the test or
validation one, so the cleaned file has no leakage at the threshold either.

`python -m instructkit.finetune --check-data` runs the same check on the run's own data and
split before training (see `check_run_data`): it prints the summary and writes the report
beside the model, and goes on training; only empty outputs stop the run (exit code 2), as
training would teach the model to answer nothing. Duplicates and leakage are warnings: the
chapter's own dataset has a few (the README gives the numbers).
"""

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from instructkit.arg_types import positive
from instructkit.errors import BadInputError, run_command
from instructkit.instruction_data import DatasetError, format_input

DEFAULT_THRESHOLD = 0.9
GPT2_CONTEXT = 1024  # GPT-2's context length, in tokens
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
_BLOCK_ROWS = 1024  # similarities are computed this many rows at a time (memory: rows x entries)


# ---------------------------------------------------------------------------------------
# TF-IDF and cosine similarity
# ---------------------------------------------------------------------------------------


def prompt_text(entry):
    """What the similarity compares: the instruction, then the input (when there is one)."""
    text = entry["instruction"]
    return f"{text}\n{entry['input']}" if entry["input"] else text


def numpy_tfidf(texts):
    """A dense TF-IDF matrix (rows: texts, unit length) with scikit-learn's default settings."""
    docs = [TOKEN_PATTERN.findall(text.lower()) for text in texts]
    vocabulary = {word: i for i, word in enumerate(sorted({w for doc in docs for w in doc}))}
    counts = np.zeros((len(docs), len(vocabulary)))
    for row, doc in enumerate(docs):
        for word in doc:
            counts[row, vocabulary[word]] += 1
    df = (counts > 0).sum(axis=0)
    idf = np.log((1 + len(docs)) / (1 + df)) + 1  # smooth_idf=True
    matrix = counts * idf
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)  # an empty text stays a row of zeros


def tfidf_matrix(texts, use_sklearn=None):
    """(rows of unit length, "scikit-learn" or "numpy"): scikit-learn's when it is installed
    (`use_sklearn` None) or asked for (True), else numpy_tfidf, with a note on stdout."""
    if use_sklearn is not False:
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError:
            if use_sklearn:
                raise
            print("Note: scikit-learn is not installed; using numpy's TF-IDF (the same values, "
                  "slower on large files: pip install scikit-learn).")
        else:
            try:
                return TfidfVectorizer().fit_transform(texts), "scikit-learn"
            except ValueError:  # no word at all in any text ("empty vocabulary")
                return np.zeros((len(texts), 1)), "scikit-learn"
    return numpy_tfidf(texts), "numpy"


def _dense(block):
    return block.toarray() if hasattr(block, "toarray") else np.asarray(block)


def similar_pairs(matrix, threshold, rows=None, cols=None):
    """{(i, j): cosine} for row i in `rows` and column j in `cols` (default: all, with j > i)
    whose cosine similarity is at least `threshold`. `matrix` rows have unit length."""
    n = matrix.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=int)
    upper = cols is None
    cols = np.arange(n) if cols is None else np.asarray(cols, dtype=int)
    found = {}
    if not len(rows) or not len(cols):
        return found
    right = matrix[cols].T
    for start in range(0, len(rows), _BLOCK_ROWS):
        block_rows = rows[start:start + _BLOCK_ROWS]
        sims = _dense(matrix[block_rows] @ right)
        hits = np.argwhere(sims >= threshold - 1e-12)
        for r, c in hits:
            i, j = int(block_rows[r]), int(cols[c])
            if upper and j <= i:
                continue
            found[(i, j)] = min(float(sims[r, c]), 1.0)
    return found


def pair_similarity(matrix, i, j):
    return min(float(_dense(matrix[i] @ matrix[j].T).ravel()[0]), 1.0)


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


def split_indices(n, val_fraction=0.05, test_fraction=0.1, shuffle_split=None):
    """{"train", "test", "validation"}: the entry indices of each split as a finetuning run
    with these fractions makes it (finetune_files.split_entries)."""
    from instructkit.finetune_files import split_entries

    config = SimpleNamespace(val_fraction=val_fraction, test_fraction=test_fraction,
                             shuffle_split=shuffle_split)
    train, test, val = split_entries(list(range(n)), config)
    return {"train": train, "test": test, "validation": val}


def training_text(entry):
    """The chapter's training text of an entry (InstructionDataset's): prompt and response."""
    return format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def check_entries(entries, split=None, threshold=DEFAULT_THRESHOLD, tokenizer=None,
                  context_length=GPT2_CONTEXT, use_sklearn=None):
    """The report (a JSON object) on `entries`; see the module's docstring.

    `split`: {"train", "test", "validation"} lists of indices (None: no leakage check);
    `tokenizer`: something with `encode(text, allowed_special=...)` (None: lengths not checked).
    """
    if not 0 < threshold <= 1:
        raise BadInputError(f"--threshold must be above 0 and at most 1, got {threshold}")
    n = len(entries)
    matrix, backend = tfidf_matrix([prompt_text(e) for e in entries], use_sklearn)

    groups = {}
    for i, entry in enumerate(entries):
        groups.setdefault((entry["instruction"].strip(), entry["input"].strip()), []).append(i)
    exact = [{"indices": group,
              "same_output": len({entries[i]["output"].strip() for i in group}) == 1}
             for group in groups.values() if len(group) > 1]
    exact_pairs = {(a, b) for g in exact for k, a in enumerate(g["indices"])
                   for b in g["indices"][k + 1:]}
    near = [{"a": i, "b": j, "similarity": round(s, 4)}
            for (i, j), s in sorted(similar_pairs(matrix, threshold).items())
            if (i, j) not in exact_pairs]

    report = {
        "entries": n,
        "threshold": threshold,
        "tfidf": backend,
        "exact_duplicates": exact,
        "near_duplicates": near,
    }
    if split is not None:
        report["split"] = {name: len(indices) for name, indices in split.items()}
        report["leaked"] = {}
        for name in ("test", "validation"):
            best = {}
            for (i, j), s in similar_pairs(matrix, threshold, rows=split[name],
                                           cols=split["train"]).items():
                if (i, j) not in best and (i not in best or s > best[i][1]):
                    best[i] = (j, s)
            report["leaked"][name] = [{"index": i, "train_index": j, "similarity": round(s, 4)}
                                      for i, (j, s) in sorted(best.items())]
    report["empty_outputs"] = [i for i, e in enumerate(entries) if not e["output"].strip()]
    if tokenizer is not None:
        report["context_length"] = context_length
        too_long = []
        for i, entry in enumerate(entries):
            prompt = len(tokenizer.encode(format_input(entry), allowed_special={"<|endoftext|>"}))
            total = len(tokenizer.encode(training_text(entry), allowed_special={"<|endoftext|>"}))
            if total + 1 > context_length:  # + the end-of-text token the collate function adds
                too_long.append({"index": i, "tokens": total + 1, "prompt_tokens": prompt,
                                 "prompt_too_long": prompt >= context_length})
        report["too_long"] = too_long
    return report


def dropped_indices(report):
    """The entries a cleaned file leaves out: the later one of each duplicate pair, empty
    outputs, over-long entries."""
    drop = set(report["empty_outputs"])
    drop.update(i for group in report["exact_duplicates"] for i in group["indices"][1:])
    drop.update(pair["b"] for pair in report["near_duplicates"])
    drop.update(item["index"] for item in report.get("too_long", []))
    return drop


def summary_lines(report):
    """What the check found, a line per kind."""
    exact = report["exact_duplicates"]
    extra = sum(len(g["indices"]) - 1 for g in exact)
    lines = [f"{report['entries']} entries; TF-IDF cosine threshold {report['threshold']} "
             f"({report['tfidf']})",
             f"Exact duplicates (same instruction and input): {len(exact)} groups, {extra} extra "
             f"entries ({sum(not g['same_output'] for g in exact)} groups with different outputs)",
             f"Near duplicates: {len(report['near_duplicates'])} pairs"]
    for pair in report["near_duplicates"][:5]:
        lines.append(f"  entries {pair['a']} and {pair['b']}: similarity {pair['similarity']:.3f}")
    if "leaked" in report:
        sizes = report["split"]
        for name in ("test", "validation"):
            leaked = report["leaked"][name]
            lines.append(f"{name.capitalize()} entries nearly duplicating a training entry: "
                         f"{len(leaked)} of {sizes[name]}")
            for item in leaked[:5]:
                lines.append(f"  {name} entry {item['index']} ~ training entry "
                             f"{item['train_index']}: similarity {item['similarity']:.3f}")
    lines.append(f"Empty outputs: {len(report['empty_outputs'])}"
                 + (f" (entries {report['empty_outputs'][:10]})" if report["empty_outputs"] else ""))
    if "too_long" in report:
        too_long = report["too_long"]
        lines.append(f"Longer than the context of {report['context_length']} tokens: "
                     f"{len(too_long)} (prompt alone: {sum(t['prompt_too_long'] for t in too_long)})")
    return lines


def check_run_data(train_data, test_data, val_data, threshold=DEFAULT_THRESHOLD, tokenizer=None,
                   context_length=GPT2_CONTEXT, report_path=None, quiet=False):
    """The data check of `finetune --check-data` on the run's split (indices in the run's order:
    training, then test, then validation). Prints the summary (unless `quiet`: another process
    of the run prints it), writes the report to
    `report_path` (when given) and returns it; empty outputs raise DatasetError (exit code 2)."""
    from instructkit.safe_files import write_json

    entries = [*train_data, *test_data, *val_data]
    n_train, n_test = len(train_data), len(test_data)
    split = {"train": list(range(n_train)), "test": list(range(n_train, n_train + n_test)),
             "validation": list(range(n_train + n_test, len(entries)))}
    report = check_entries(entries, split, threshold, tokenizer, context_length)
    if not quiet:
        print("Data check (--check-data):")
        for line in summary_lines(report):
            print(f"  {line}")
    if report_path is not None:
        write_json(report_path, report)
        print(f"  Report saved to {report_path}")
    if report["empty_outputs"]:
        raise DatasetError(f"{len(report['empty_outputs'])} entries have an empty output "
                           f"(the first: entry {report['empty_outputs'][0]} in the run's order); "
                           "training would teach the model to answer nothing. Remove them "
                           "(python -m instructkit.check_data FILE --cleaned NEW.json).")
    return report


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m instructkit.check_data",
        description="Check an instruction dataset before training: exact and near duplicates, "
                    "test and validation entries leaking into training, empty outputs, "
                    "entries longer than the model's context.")
    parser.add_argument("data", help="instruction JSON (or JSON Lines): a list of "
                                     "{instruction, input, output}")
    parser.add_argument("--threshold", type=positive(float, most=1), default=DEFAULT_THRESHOLD,
                        help="TF-IDF cosine similarity from which two entries count as near "
                             f"duplicates (default: {DEFAULT_THRESHOLD})")
    parser.add_argument("--report", default=None, help="write the findings to this JSON file")
    parser.add_argument("--cleaned", default=None,
                        help="write the entries without duplicates, empty outputs and over-long "
                             "entries to this new file (never the input)")
    parser.add_argument("--val-fraction", type=positive(float, most=1), default=0.05,
                        help="the run's validation share (default: 0.05, the chapter's)")
    parser.add_argument("--test-fraction", type=positive(float, most=1), default=0.1,
                        help="the run's test share (default: 0.1, the chapter's)")
    parser.add_argument("--shuffle-split", type=int, default=None, metavar="SEED",
                        help="the run's --shuffle-split seed, if it uses one")
    parser.add_argument("--context-length", type=positive(int), default=GPT2_CONTEXT,
                        help=f"the model's context in tokens (default: {GPT2_CONTEXT}, GPT-2's)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="a folder with the tokenizer's encoder.json and vocab.bpe (or "
                             "vocab.json and merges.txt); default: GPT-2's through tiktoken")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an OSError (a permission, a full disk, ...)")
    return parser


def _same_file(a, b):
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def run_check(args):
    from instructkit.gpt2_tokenizer import TokenizerError, get_tokenizer
    from instructkit.instruction_data import load_instruction_file
    from instructkit.preflight import check_output_file
    from instructkit.safe_files import write_json

    data_path = Path(args.data)
    if args.cleaned is not None and _same_file(args.cleaned, data_path):
        raise BadInputError(f"--cleaned {args.cleaned} is the input file: name a new file "
                            "(the input is never changed)")
    for path, flag in ((args.report, "--report"), (args.cleaned, "--cleaned")):
        if path is not None:
            check_output_file(path, flag)
    entries = load_instruction_file(data_path)
    split = split_indices(len(entries), args.val_fraction, args.test_fraction, args.shuffle_split)
    try:
        tokenizer = get_tokenizer(args.tokenizer_dir)
    except TokenizerError as exc:  # tiktoken offline: the rest of the check needs no tokenizer
        tokenizer = None
        print(f"Note: lengths not checked: {exc}")
    report = check_entries(entries, split, args.threshold, tokenizer, args.context_length)
    report = {"file": str(data_path), **report}
    for line in summary_lines(report):
        print(line)
    if args.report is not None:
        write_json(args.report, report)
        print(f"Report saved to {args.report}")
    if args.cleaned is not None:
        drop = dropped_indices(report)
        write_json(args.cleaned, [e for i, e in enumerate(entries) if i not in drop])
        print(f"Cleaned data ({len(entries) - len(drop)} of {len(entries)} entries) saved to "
              f"{args.cleaned}")
    return report


def main(argv=None):
    """The command line; returns the exit code (instructkit/errors.py)."""
    from instructkit.console import use_utf8_console

    use_utf8_console()
    args = build_parser().parse_args(argv)
    return run_command(lambda: (run_check(args), 0)[1], debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
