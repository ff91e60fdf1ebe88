"""Make preference data with a model served by Ollama: a politer and a ruder rewrite of each answer.

Not in the book's chapter code: the book's bonus material on preference tuning (DPO) builds
`instruction-data-with-preference.json` this way. For each entry of an instruction dataset
(instruction, input, output) the model is asked to rewrite the output to be more polite and to
be more impolite; the polite rewrite is stored as `chosen`, the rude one as `rejected`:

    ollama serve                      # in another terminal, or start the desktop app
    ollama pull llama3
    python -m instructkit.make_preference_data --file_path instruction-data.json
    # -> instruction-data-with-preference.json beside the input

Design: the book asks for one rewrite per entry, polite or impolite at random, and keeps the
original output as the other side of the pair. Here both rewrites are asked for, so every
pair differs only in tone (the original answer's wording is in neither), the result does not
depend on a random draw, and each entry costs two requests instead of one.

Each finished pair is saved as it arrives in `<output stem>-progress.json`, so a run that is
cut off continues where it stopped when started again with the same input and model. A reply
that is empty, even after a second try with another seed, or a polite and a rude rewrite that
are the same text, is reported, and that entry is left out of the output rather than stored
with a made-up answer; the next run tries it again. The output is written (atomically) once
every entry has been tried, and validated to hold instruction, input, output, chosen and
rejected. The server options (--host, --model, --num-ctx, --timeout) are those of
ollama_evaluate.py (instructkit.judge_cli); the client is instructkit.judge.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from instructkit.console import use_utf8_console
from instructkit.errors import ExpectedError, run_command
from instructkit.instruction_data import REQUIRED_KEYS, format_input, validate_entries
from instructkit.judge import NUM_CTX, SEED, ask_judge
from instructkit.judge_cli import add_server_arguments, check_outputs, run_server_job
from instructkit.judge_results import load_entries, run_resumable, work_fingerprint
from instructkit.safe_files import write_json

PREFERENCE_KEYS = (*REQUIRED_KEYS, "chosen", "rejected")
PROGRESS_FORMAT = 1  # version of the progress file layout


def build_rewrite_prompt(entry, politeness):
    """The book's prompt asking for a `politeness` ("polite" or "impolite") rewrite of the output.

    The book's string runs its sentences together ("more polite.Keep") and says "return
    return"; here the sentences are separated and the typo is gone.
    """
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"slightly rewrite the output to be more {politeness}. "
        "Keep the modification minimal. "
        "Only return the generated response and nothing else."
    )


def clean_rewrite(reply):
    """The rewrite in a reply, or None when the reply holds none.

    Surrounding whitespace goes, and so do backticks around the whole reply (the prompt quotes
    the output in backticks, and models sometimes echo them).
    """
    text = reply.strip()
    if len(text) >= 2 and text[0] == text[-1] == "`":
        text = text.strip("`").strip()
    return text or None


def ask_rewrite(entry, politeness, model, url, timeout, num_ctx):
    """The model's rewrite, or None when two tries (the book's seed 123, then 124) gave nothing
    usable."""
    prompt = build_rewrite_prompt(entry, politeness)
    for seed in (SEED, SEED + 1):
        reply = ask_judge(prompt, model=model, url=url, seed=seed, num_ctx=num_ctx,
                          timeout=timeout)
        text = clean_rewrite(reply)
        if text is not None:
            return text
    return None


def progress_header(model):
    """What the progress file says about how it was made."""
    return {"format": PROGRESS_FORMAT, "kind": "preference-rewrites", "model": model}


def progress_fingerprint(json_data, model):
    """sha256 over the model and both prompts of every entry: same value, same rewrites."""
    prompts = (build_rewrite_prompt(entry, politeness)
               for entry in json_data for politeness in ("polite", "impolite"))
    return work_fingerprint({**progress_header(model), "n": len(json_data)}, prompts)


def make_preference_data(json_data, model="llama3", url=None, progress_path=None,
                         timeout=None, num_ctx=NUM_CTX):
    """Return (entries with `chosen` and `rejected` added, indices of the entries left out).

    Each returned entry is a copy of the input entry with the polite rewrite of its output as
    `chosen` and the rude one as `rejected`. An entry whose rewrites are unusable (empty twice,
    or the same text) is reported and left out. With `progress_path`, every pair is saved as it
    arrives and a later call with the same input and model only asks for the missing ones.
    """
    validate_entries(json_data, "input", keys=REQUIRED_KEYS)

    def rewrite_entry(index):
        entry = json_data[index]
        chosen = ask_rewrite(entry, "polite", model, url, timeout, num_ctx)
        rejected = ask_rewrite(entry, "impolite", model, url, timeout, num_ctx)
        if chosen is None or rejected is None:
            which = " and ".join(name for name, text in (("polite", chosen), ("impolite", rejected))
                                 if text is None)
            tqdm.write(f"Entry {index}: the {which} rewrite came back empty twice; left out.")
            return None
        if chosen == rejected:
            tqdm.write(f"Entry {index}: the polite and the impolite rewrite are the same text "
                       f"({chosen[:80]!r}); left out.")
            return None
        return {"index": index, "chosen": chosen, "rejected": rejected}

    fingerprint = header = None
    if progress_path is not None:
        header = progress_header(model)
        fingerprint = progress_fingerprint(json_data, model)
    results = run_resumable(len(json_data), rewrite_entry, progress_path, header, fingerprint,
                            desc="Rewriting entries", done="rewritten")

    pairs = [{**json_data[i], "chosen": results[i]["chosen"], "rejected": results[i]["rejected"]}
             for i in sorted(results)]
    missing = [i for i in range(len(json_data)) if i not in results]
    return pairs, missing


def save_preference_data(pairs, path):
    """Validate the entries (all five keys, text under each) and write them atomically."""
    validate_entries(pairs, f"preference data for {path}", keys=PREFERENCE_KEYS)
    write_json(path, pairs)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Make preference data (chosen: a politer rewrite, rejected: a ruder one) "
                    "with a model served by Ollama.")
    parser.add_argument("--file_path", "--file-path", required=True,
                        help="JSON list of entries with instruction, input and output")
    parser.add_argument("--output", default=None,
                        help="the preference data JSON (default: <input stem>-with-preference.json "
                             "beside the input); progress goes to <output stem>-progress.json")
    add_server_arguments(parser, what="rewriting")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the command line; return the exit code.

    0: done; 1: server or model problems, or entries left out; 2: bad input; 130: interrupted.
    """
    use_utf8_console()  # UTF-8 out and in, even into a file or a pipe on Windows
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2

    file_path = Path(args.file_path)
    output = Path(args.output) if args.output else file_path.with_name(
        f"{file_path.stem}-with-preference.json")
    progress_path = output.with_name(f"{output.stem}-progress.json")

    def run():
        data = load_entries(file_path, json_key=None)  # bad input: exit 2 before any request
        check_outputs((output, "--output"),
                      (progress_path, "--output", "the progress file of --output,"))

        def rewrite(base, **options):
            print(f"Rewriting {len(data)} entries of {file_path} with {args.model} at {base}")
            pairs, missing = make_preference_data(data, url=base, progress_path=progress_path,
                                                  **options)
            if pairs:
                save_preference_data(pairs, output)
            return pairs, missing

        pairs, missing = run_server_job(args, rewrite, progress_path)
        if pairs:
            print(f"Saved {len(pairs)} of {len(data)} entries with chosen and rejected to {output}")
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise ExpectedError(
                f"{len(missing)} of {len(data)} entries got no usable rewrite and are not in "
                f"the output (entries {shown}); run again to retry them.")

    return run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
