"""Section 7.8 as a script: a larger model, served by Ollama, scores the finetuned model's answers.

For every test entry the judge model (Llama 3 8B Instruct, "llama3") is shown the instruction,
the correct output and the finetuned model's response, and asked for a score from 0 to 100;
the script prints how many replies gave a score and their average:

    ollama serve                      # in another terminal, or start the desktop app
    ollama pull llama3
    python ollama_evaluate.py --file_path instruction-data-with-response.json

This is the book's script, function for function. Where it differs, a `# Not in the book:`
comment says why; the machinery those changes need (the HTTP client with clear errors, the
addresses OLLAMA_HOST and --host accept, the scores saved entry by entry so that a stopped run
resumes, the histogram, the extra command-line options) is in the package `instructkit`
(judge.py with judge_http.py, judge_results.py, judge_cli.py). Scoring needs no PyTorch:
neither this file nor those modules import it.
"""

import json

import psutil
from tqdm import tqdm

# Not in the book: the standard library's HTTP through instructkit.judge instead of
# `requests` (no extra dependency); the scores file and the histogram are in judge_results.
from instructkit import judge, judge_results
from instructkit.judge import ensure_ollama, get_ollama_url


def query_model(prompt, model="llama3", url="http://localhost:11434/api/chat", num_ctx=2048,
                timeout=None):
    # Not in the book: num_ctx and timeout (seconds, or a (connect, read) pair; default 5 s
    # to connect and 300 s for each piece of the answer, where the book waits 30 s) as keywords.
    # `url` is any address judge.get_ollama_url reads; the book's default, and None, mean
    # OLLAMA_HOST when it is set, else 127.0.0.1:11434 (judge.chat_server_url).

    # The request: the judge model and one user message holding the prompt
    data = {
        "model": model,
        "messages": [
            {"role": "user", "content": prompt}
        ],
        "options": {     # a fixed seed and no sampling, so the same prompt gets the same reply
            "seed": 123,
            "temperature": 0,
            "num_ctx": num_ctx  # Not in the book: the keyword, 2048 as in the book by default
        }
    }

    # Post it and read the reply as it streams in, one JSON object a line; each line adds a
    # piece of the answer's text.
    # Not in the book: judge.post_chat stands for requests.post and raise_for_status: no
    # server, a model that is not pulled, an HTTP error, an error line or an answer cut off
    # before its end raise judge.OllamaError, which says what to do.
    with judge.post_chat(url, data, timeout=timeout) as r:
        response_data = ""
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            response_json = json.loads(line)
            if "message" in response_json:
                response_data += response_json["message"]["content"]

    return response_data


def check_if_running(process_name):
    # True when a process on this machine has `process_name` in its name. Only a hint: a
    # server in a container, on another machine or under another user is invisible here.
    running = False
    for proc in psutil.process_iter(["name"]):
        # Not in the book: `or ""`, as psutil gives None for a name it may not read.
        if process_name in (proc.info["name"] or ""):
            running = True
            break
    return running


def format_input(entry):
    # The chapter's Alpaca-style prompt (section 7.2), repeated here as in the book so that
    # scoring needs no torch; a test checks it is the same code as gpt_instruction_finetuning's.
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )

    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


def main(file_path, json_key="model_response", model="llama3", url=None, num_ctx=2048,
         timeout=None, scores_path=None, plot_path=None):
    # Not in the book: the keywords carry the command line's options, the book's choices by
    # default (so the book's `model = "llama3"` line is gone); with scores_path the scores are
    # saved as they come and a run started again resumes; with plot_path their histogram is drawn.

    # Not in the book: the file is read first, as UTF-8, and every entry is checked, so that a
    # missing file, a file that is not JSON or an entry without its keys is one clear error
    # (exit code 2 on the command line) before any server is asked.
    test_data = judge_results.load_entries(file_path, json_key)

    # Not in the book: the server itself is asked, not the list of processes (which misses a
    # server in a container or on another machine, and a process that does not answer). No
    # server, or the judge model not pulled, raises judge.OllamaError saying what to do.
    ollama_url = get_ollama_url(url)
    ensure_ollama(ollama_url, model)
    print("Ollama running:", ollama_url)

    scores = generate_model_scores(test_data, json_key, model, url=ollama_url,  # Not in the book: options
                                   num_ctx=num_ctx, timeout=timeout, scores_path=scores_path)
    print(f"Number of scores: {len(scores)} of {len(test_data)}")
    # Not in the book: with no score at all (no reply held a number) the average is n/a,
    # not a ZeroDivisionError.
    average = f"{sum(scores)/len(scores):.2f}" if scores else "n/a"
    print(f"Average score: {average}\n")
    # Not in the book: where the scores are saved, and their histogram.
    judge_results.save_outputs(scores, file_path, model, scores_path, plot_path)


def generate_model_scores(json_data, json_key, model="llama3", url=None, num_ctx=2048,
                          timeout=None, scores_path=None):
    # Not in the book: url, num_ctx and timeout go to query_model. The entries are checked
    # before the first request (judge_results.DatasetError). Each result is kept in `saved`;
    # with scores_path it is also written there as it comes, and a later call with the same
    # entries and judge asks only for the entries still missing.
    saved = judge_results.open_scores(json_data, json_key, model, scores_path)
    scores = []
    # Not in the book: enumerate, for the entry's place in the saved results.
    for index, entry in enumerate(tqdm(json_data, desc="Scoring entries")):
        # Not in the book: an entry an earlier run scored is not asked again.
        if index in saved:
            if saved.score(index) is not None:
                scores.append(saved.score(index))
            continue
        # An empty answer gets 0 without asking the judge.
        # Not in the book: strip(), so that an answer of spaces or newlines is empty too.
        if entry[json_key].strip() == "":
            scores.append(0)
            saved.add_score(index, None, 0)  # Not in the book
        else:
            # The chapter's question: the entry, the correct output and the model's response,
            # and a score from 0 to 100 as a bare number.
            prompt = (
                f"Given the input `{format_input(entry)}` "
                f"and correct output `{entry['output']}`, "
                f"score the model response `{entry[json_key]}`"
                f" on a scale from 0 to 100, where 100 is the best score. "
                f"Respond with the integer number only."
            )
            score = query_model(prompt, model, url=url, num_ctx=num_ctx,  # Not in the book: options
                                timeout=timeout)
            # Not in the book: judge_results.parse_score reads the number in replies such as "85.",
            # "Score: 85" or "85/100", where int() gives up (None: no score in the reply), and
            # the reply is saved with its score.
            number = judge_results.parse_score(score)
            saved.add_score(index, score, number)
            # A reply without a number is reported and left out of the scores.
            if number is not None:
                scores.append(number)
            else:
                print(f"Could not convert score: {score}")
                continue

    saved.report()  # Not in the book: how many answers were empty, how many replies had no score
    return scores


if __name__ == "__main__":

    import argparse
    import sys  # Not in the book: for the exit code

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate model responses with ollama"
    )
    parser.add_argument(
        "--file_path",
        "--file-path",  # Not in the book: the spelling of the package's commands too
        required=True,
        help=(
            "The path to the test dataset `.json` file with the"
            " `'output'` and `'model_response'` keys"
        )
    )
    # Not in the book: the judge's options (--json_key, --model, --host, --num-ctx, --timeout,
    # --scores-out, --plot, --debug), shared with the package's commands.
    from instructkit.judge_cli import add_evaluate_arguments, run_evaluation

    add_evaluate_arguments(parser)
    args = parser.parse_args()

    # Not in the book: main(file_path=args.file_path, ...) runs under instructkit.errors:
    # bad input is one line and exit code 2, a server problem one line and 1, Ctrl-C 130,
    # and both of the last two say where the scores so far are for the next run to resume.
    sys.exit(run_evaluation(main, args))
