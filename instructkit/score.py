"""Score model answers with a judge on any server: Ollama, or any OpenAI-compatible API.

Not in the book. `python ollama_evaluate.py` is the book's section 7.8 and speaks Ollama's API
only. This command does the same scoring (the chapter's prompt, `parse_score`, the scores file
that a stopped run resumes from, the histogram, the timeouts and one-line errors) with the
judge on Ollama or on a server of the OpenAI chat-completions API::

    python -m instructkit.score --file-path instruction-data-with-response.json      # Ollama
    python -m instructkit.score --file-path answers.json --api openai \\
        --base-url 127.0.0.1:8080 --model llama3                # llama.cpp's llama-server
    OPENAI_API_KEY=... python -m instructkit.score --file-path answers.json --api openai \\
        --model gpt-4o-mini                                        # OpenAI (or --api-key-env)

With Ollama the scores file is the book script's (same name, same fingerprint): either one
resumes the other's. The API key is sent to the server only: never printed or written.
"""

import argparse
import sys

from instructkit.judge import SEED
from instructkit.judge_cli import (
    add_api_arguments,
    add_evaluate_arguments,
    check_outputs,
    open_judge,
    output_paths,
    resume_hint,
)
from instructkit.judge_results import (
    build_score_prompt,
    load_entries,
    open_scores,
    parse_score,
    save_outputs,
)


def score_entries(server, entries, json_key, model, scores_path=None, num_ctx=2048, seed=SEED):
    """The judge's scores of `entries[i][json_key]` (the book's generate_model_scores, with any
    ChatServer): a list of the scores that parsed. An empty answer scores 0 unasked; with
    `scores_path` every result is saved as it arrives, and a run again asks only for the rest."""
    from tqdm import tqdm

    saved = open_scores(entries, json_key, model, scores_path)
    for index, entry in enumerate(tqdm(entries, desc="Scoring entries")):
        if index in saved:
            continue
        if entry[json_key].strip() == "":
            saved.add_score(index, None, 0)
            continue
        reply = server.chat(build_score_prompt(entry, json_key), model, seed=seed, num_ctx=num_ctx)
        number = parse_score(reply)
        saved.add_score(index, reply, number)
        if number is None:
            tqdm.write(f"Could not convert score: {reply}")
    saved.report()
    return [saved.score(i) for i in range(len(entries)) if saved.score(i) is not None]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m instructkit.score",
        description="Score model responses (0 to 100) with a judge model on Ollama or an "
                    "OpenAI-compatible server, as section 7.8 does.")
    parser.add_argument("--file_path", "--file-path", required=True,
                        help="JSON file of test entries with the responses to score")
    add_evaluate_arguments(parser, any_api=True)
    add_api_arguments(parser)
    return parser


def main(argv=None):
    """The command line; returns the exit code (instructkit/errors.py)."""
    from instructkit.console import use_utf8_console
    from instructkit.errors import run_command

    use_utf8_console()
    args = build_parser().parse_args(argv)
    scores_path, plot_path = output_paths(args.file_path, args.model, args.scores_out, args.plot)

    def score():
        entries = load_entries(args.file_path, args.json_key)  # exit code 2 before any request
        check_outputs((scores_path, "--scores-out"), (plot_path, "--plot"))
        with resume_hint(scores_path):
            server = open_judge(args)
            print(f"Judge: {args.model} on the {server.name} server at {server.base_url}")
            scores = score_entries(server, entries, args.json_key, args.model, scores_path,
                                   num_ctx=args.num_ctx)
        print(f"Number of scores: {len(scores)} of {len(entries)}")
        average = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
        print(f"Average score: {average}\n")
        save_outputs(scores, args.file_path, args.model, scores_path, plot_path)

    return run_command(score, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
