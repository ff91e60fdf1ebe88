"""The judge's command-line options, and how its commands run and stop.

Not in the book. The book's `ollama_evaluate.py` takes one flag, `--file_path`. Its
`__main__` block adds the options here (`add_evaluate_arguments`) and runs the book's `main`
through `run_evaluation`; `make_preference_data` shares the server options
(`add_server_arguments`) and runs its work through `run_server_job`. The package's judge
commands that speak any API (`score`, `compare`) add `add_api_arguments` (--api ollama|openai,
--api-key-env; --host is then also --base-url) and get their checked server from `open_judge`.

Problems follow `instructkit.errors`: a bad input file, or an output file that cannot be
written (a folder at its path), is one line and exit code 2, before any request; no server,
a model that is not pulled or a server error is one line and exit code 1; Ctrl-C exits with 130
(SIGTERM with 143). When the work stops, the message says where the results so far are, and
the same command run again continues from them.
"""

import contextlib
import re
import sys
from pathlib import Path

from instructkit.arg_types import positive
from instructkit.console import use_utf8_console
from instructkit.errors import run_command
from instructkit.judge import (
    NUM_CTX,
    OPENAI_KEY_ENV,
    SERVERS,
    JudgeServerError,
    api_key_from_env,
    ensure_ollama,
    get_ollama_url,
    judge_server,
)
from instructkit.judge_http import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

# The longest --timeout: a day for a piece of an answer (a socket refuses timeouts near the
# end of the platform's time_t, and infinity, with an OverflowError).
MAX_TIMEOUT = 86400


def check_outputs(*outputs):
    """PreflightError (exit code 2) for an output file that cannot be written (a folder at its
    path, a file where its folder would be), before any server is asked. `outputs`: (path,
    flag) or (path, flag, what) for preflight.check_output_file."""
    from instructkit.preflight import check_output_file

    for output in outputs:
        check_output_file(*output)


def add_server_arguments(parser, what, any_api=False):
    """--model, --host, --num-ctx, --timeout and --debug: the options of every judge command.
    With `any_api` (a command that has add_api_arguments' --api), --host is also --base-url."""
    ollama_host = ("host, host:port, [IPv6]:port or a URL such as http://localhost:11434/api/chat "
                   "(default: OLLAMA_HOST, else 127.0.0.1:11434)")
    if any_api:
        parser.add_argument("--model", default="llama3", help=f"{what} model on the server")
        parser.add_argument("--host", "--base-url", dest="host", default=None,
                            help=f"the server's address. Ollama: {ollama_host}; with --api "
                                 "openai: a base URL such as http://127.0.0.1:8080/v1 (default: "
                                 "OPENAI_BASE_URL, else https://api.openai.com/v1)")
    else:
        parser.add_argument("--model", default="llama3", help=f"{what} model on the Ollama server")
        parser.add_argument("--host", default=None, help=f"Ollama address: {ollama_host}")
    parser.add_argument("--num-ctx", "--num_ctx", type=positive(int), default=NUM_CTX,
                        help="the model's context window in tokens (Ollama's num_ctx; "
                             "the book's 2048 by default)")
    parser.add_argument("--timeout", type=positive(float, MAX_TIMEOUT), default=DEFAULT_READ_TIMEOUT,
                        help=f"seconds to wait for each piece of an answer before giving up "
                             f"(at most {MAX_TIMEOUT})")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an unexpected OS error (a full disk, ...)")


def add_api_arguments(parser):
    """--api and --api-key-env: the judge's API (the package's commands; the book's script and
    make_preference_data speak Ollama's)."""
    parser.add_argument("--api", choices=sorted(SERVERS), default="ollama",
                        help="the judge server's API: ollama, or openai for any server of the "
                             "OpenAI chat-completions API (OpenAI, llama.cpp's llama-server, "
                             "vLLM, LM Studio)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help=f"with --api openai: the environment variable holding the API key "
                             f"(default: {OPENAI_KEY_ENV}; a local server needs none). The key is "
                             "never printed or saved.")


def open_judge(args):
    """The judge server of the command-line `args` (--api, --host/--base-url, --timeout,
    --api-key-env), checked: it answers, and (Ollama) has the model pulled."""
    timeout = (DEFAULT_CONNECT_TIMEOUT, args.timeout)
    api = getattr(args, "api", "ollama")
    if api == "openai":
        key_env = getattr(args, "api_key_env", None)
        server = judge_server(args.host, timeout, api="openai", api_key=api_key_from_env(key_env),
                              api_key_env=key_env)
    else:
        server = judge_server(args.host, timeout, api=api)
    server.ensure_model(args.model)
    return server


def add_evaluate_arguments(parser, any_api=False):
    """The options of `python ollama_evaluate.py` beyond the book's --file_path (with
    `any_api`, python -m instructkit.score's, which adds add_api_arguments' too)."""
    parser.add_argument("--json_key", "--json-key", default="model_response",
                        help="key of the responses to score")
    add_server_arguments(parser, what="judge", any_api=any_api)
    parser.add_argument("--scores-out", "--scores_out", default=None,
                        help="per-entry scores JSON, also used to resume "
                             "(default: <input stem>-<model>-scores.json beside the input)")
    parser.add_argument("--plot", default=None,
                        help="histogram image (default: <input stem>-<model>-scores.png)")
    return parser


def _safe_name(model):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"


def output_paths(file_path, model, scores_out=None, plot=None):
    """(scores JSON, histogram): the given paths, else <input stem>-<model>-scores.json/.png."""
    file_path = Path(file_path)
    stem = f"{file_path.stem}-{_safe_name(model)}-scores"
    scores_path = Path(scores_out) if scores_out else file_path.with_name(stem + ".json")
    plot_path = Path(plot) if plot else file_path.with_name(stem + ".png")
    return scores_path, plot_path


def server_options(args):
    """The judge keywords of the command-line `args`: model, timeout (connect, read), num_ctx."""
    return {"model": args.model, "timeout": (DEFAULT_CONNECT_TIMEOUT, args.timeout),
            "num_ctx": args.num_ctx}


@contextlib.contextmanager
def resume_hint(results_path):
    """Within the block, work that stops on a server problem or Ctrl-C says where its results
    so far are (`results_path`, which the same command run again continues from)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\nInterrupted. Results so far are in {results_path}; run again to resume.",
              file=sys.stderr)
        raise
    except JudgeServerError as exc:
        if Path(results_path).exists():
            raise type(exc)(f"{exc}\nResults so far are in {results_path}; "
                            "run again to resume.") from None
        raise


def run_server_job(args, job, results_path):
    """Check the server and model named by the command-line `args`, then return
    job(base_url, model=..., timeout=..., num_ctx=...), under `resume_hint(results_path)`.

    Call it inside `instructkit.errors.run_command`, which turns the errors into exit codes.
    """
    with resume_hint(results_path):
        base = get_ollama_url(args.host)
        ensure_ollama(base, args.model)
        return job(base, **server_options(args))


def run_evaluation(main, args):
    """Run the book's `main` of ollama_evaluate.py with the parsed `args`; return the exit code.

    The scores file and the histogram get their default names here (output_paths).
    """
    use_utf8_console()  # UTF-8 out and in, even into a file or a pipe on Windows
    scores_path, plot_path = output_paths(args.file_path, args.model, args.scores_out, args.plot)

    def evaluate():
        check_outputs((scores_path, "--scores-out"), (plot_path, "--plot"))  # before any work
        with resume_hint(scores_path):
            main(file_path=args.file_path, json_key=args.json_key, url=args.host,
                 scores_path=scores_path, plot_path=plot_path, **server_options(args))

    return run_command(evaluate, debug=args.debug)
