"""Score a finetuned model's answers with a larger model served by Ollama (section 7.8).

A judge model (Llama 3 8B Instruct, ``llama3``, by default) reads each entry's instruction,
the correct output and the finetuned model's response, and answers a score from 0 to 100.

    ollama serve                      # in another terminal, or start the desktop app
    ollama pull llama3
    python ollama_evaluate.py --file_path instruction-data-with-response.json

The scores are saved entry by entry, so a run that is cut off continues where it stopped
when started again on the same input with the same judge. The server address comes from
``--host``, else the ``OLLAMA_HOST`` environment variable, else http://127.0.0.1:11434.
An entry whose response is empty scores 0 without asking the judge, as in the book.

Scoring needs no PyTorch: this module imports only the standard library, tqdm, psutil,
matplotlib (for the histogram) and the project's torch-free instruction_data and safe_files.
make_preference_data.py reuses its server, resume and command-line parts.
"""

import argparse
import hashlib
import http.client
import ipaddress
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
from tqdm import tqdm

from instructkit.errors import ExpectedError
from instructkit.instruction_data import REQUIRED_KEYS, DatasetError
from instructkit.instruction_data import validate_entries as validate_instruction_entries
from instructkit.safe_files import write_json

# 127.0.0.1, as Ollama itself: "localhost" tries ::1 first on Windows, seconds per request.
DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to connect
DEFAULT_READ_TIMEOUT = 300.0  # seconds to wait for each piece of the answer (--timeout)
DEFAULT_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)
SCORES_FORMAT = 1  # version of the scores file layout


class OllamaError(ExpectedError):
    """The Ollama server cannot be reached, lacks the model, or answered with an error."""


# Bad input files are reported like bad training data: the same checks, the same error.
InputDataError = DatasetError


# ---------------------------------------------------------------------------------------
# Where the server is
# ---------------------------------------------------------------------------------------


def get_ollama_url(host=None):
    """The server's base URL (no trailing slash) from `host`, else OLLAMA_HOST, else 127.0.0.1.

    Follows Ollama's own clients: surrounding whitespace and quotes are dropped, the scheme is
    optional, and without a scheme the port defaults to 11434 (with an explicit ``http://`` or
    ``https://`` and no port: 80/443). IPv6 addresses go in brackets (``[::1]:11434``).
    ``0.0.0.0`` and ``::`` (addresses a server listens on) mean "connect to this machine".
    A trailing ``/api/...`` path is ignored, so the book's ``http://localhost:11434/api/chat``
    names the same server as ``localhost:11434``; another path (a proxy's prefix) is kept.
    """
    if host is None or not host.strip().strip("\"'"):  # an empty --host is no --host
        host = os.environ.get("OLLAMA_HOST", "")
    value = host.strip().strip("\"'").strip()
    if not value:
        return DEFAULT_HOST
    scheme, sep, rest = value.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise OllamaError(f"Unsupported scheme in Ollama address {value!r}: use http or https")
        default_port = 443 if scheme == "https" else 80
    else:
        scheme, rest, default_port = "http", value, DEFAULT_PORT
    hostport, _, path = rest.partition("/")
    try:
        hostname, port = str(ipaddress.ip_address(hostport.strip("[]"))), None  # e.g. ::1
    except ValueError:
        try:
            parts = urllib.parse.urlsplit(f"//{hostport}")
            hostname, port = parts.hostname, parts.port
        except ValueError as exc:
            raise OllamaError(f"Invalid Ollama address {value!r}: {exc}") from None
    if hostname == "::":
        hostname = "::1"
    if not hostname or hostname == "0.0.0.0":
        hostname = "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    path = re.sub(r"(^|/)api(/.*)?$", "", path.strip("/")).strip("/")  # the endpoint part
    path = f"/{path}" if path else ""
    return f"{scheme}://{hostname}:{port or default_port}{path}"


def check_if_running(process_name):
    """True when a process whose name contains `process_name` runs on this machine (psutil).

    Only a hint: a server in another container, on another machine or under another user can
    be invisible here, and a live process is not necessarily serving. `ollama_is_reachable`
    asks the server itself.
    """
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name") or ""
        if process_name in name:
            return True
    return False


# ---------------------------------------------------------------------------------------
# HTTP with separate connect and read timeouts (urllib applies one number to both)
# ---------------------------------------------------------------------------------------


def _split_timeout(timeout):
    if isinstance(timeout, tuple | list):
        connect, read = timeout
        return connect, read
    return timeout, timeout


class _ReadTimeoutMixin:
    def __init__(self, *args, read_timeout=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timeout = read_timeout

    def connect(self):
        super().connect()  # under the connect timeout (self.timeout)
        self.sock.settimeout(self._read_timeout)


class _HTTPConnection(_ReadTimeoutMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeoutMixin, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout):
        super().__init__()
        self._read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, read_timeout=self._read_timeout)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout):
        super().__init__()
        self._read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(
            _HTTPSConnection, req, context=self._context, read_timeout=self._read_timeout
        )


def _is_local(url):
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open(url, data=None, timeout=DEFAULT_TIMEOUT):
    """Open `url` (POST JSON when `data` is given); the caller closes the response."""
    connect_timeout, read_timeout = _split_timeout(timeout)
    handlers = [_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout)]
    if _is_local(url):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
    opener = urllib.request.build_opener(*handlers)
    headers = {"Accept": "application/json"}
    body = None
    if data is not None:
        body = json.dumps(data).encode("utf-8")
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers)
    return opener.open(request, timeout=connect_timeout)


def _unreachable_message(base, reason):
    return (
        f"No Ollama server answered at {base} ({reason}).\n"
        "Start one with `ollama serve` in another terminal (or open the Ollama desktop app), "
        "or point to a server elsewhere with OLLAMA_HOST=host:port or --host."
    )


def _error_text(http_error):
    """The {"error": ...} text of an HTTP error response, or None."""
    try:
        payload = json.loads(http_error.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return None


def _get_json(url, timeout):
    base = get_ollama_url(url)
    try:
        with _open(url, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc) or exc.reason
        raise OllamaError(f"{url} answered HTTP {exc.code}: {detail}") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise OllamaError(_unreachable_message(base, reason)) from None
    except ValueError:
        raise OllamaError(f"{url} did not answer JSON: is an Ollama server there?") from None


def ollama_is_reachable(url=None, timeout=2.0):
    """True when an Ollama server answers GET /api/version at `url` (base or any API URL)."""
    try:
        answer = _get_json(get_ollama_url(url) + "/api/version", timeout)
    except OllamaError:
        return False
    return isinstance(answer, dict) and "version" in answer


def _full_model_name(name):
    """'llama3' -> 'llama3:latest' (the tag part follows the last '/')."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def list_models(url=None, timeout=5.0):
    """The names of the models pulled on the server (GET /api/tags)."""
    base = get_ollama_url(url)
    answer = _get_json(base + "/api/tags", timeout)
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        raise OllamaError(f"{base}/api/tags did not list models: is this Ollama?")
    return [m.get("name") or m.get("model") for m in models if isinstance(m, dict)]


def ensure_ollama(url=None, model=None, timeout=5.0):
    """Raise OllamaError unless a server answers at `url` and (when given) has `model` pulled.

    Returns the names of the pulled models.
    """
    base = get_ollama_url(url)
    names = list_models(base, timeout=timeout)
    if model is not None:
        pulled = {_full_model_name(n) for n in names if n}
        if _full_model_name(model) not in pulled:
            listing = ", ".join(sorted(n for n in names if n)) or "none"
            raise OllamaError(
                f"The Ollama server at {base} does not have the model {model!r} "
                f"(pulled: {listing}).\nDownload it with: ollama pull {model}"
            )
    return names


# ---------------------------------------------------------------------------------------
# Asking the judge
# ---------------------------------------------------------------------------------------


def query_model(prompt, model="llama3", url=None, seed=123, num_ctx=2048, timeout=DEFAULT_TIMEOUT):
    """Send `prompt` to the model through POST /api/chat and return its whole answer.

    `url` is the server in any form `get_ollama_url` reads (the book's chat endpoint
    http://localhost:11434/api/chat, or host:port); None means OLLAMA_HOST, else
    http://127.0.0.1:11434. Greedy and seeded, so answers repeat. `timeout` is seconds, or
    (connect, read) where read bounds the wait for each streamed piece.
    """
    base = get_ollama_url(url)
    url = base + "/api/chat"
    data = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "options": {"seed": seed, "temperature": 0, "num_ctx": num_ctx},
    }
    _, read_timeout = _split_timeout(timeout)
    pieces = []
    try:
        with _open(url, data=data, timeout=timeout) as response:
            for raw_line in response:  # newline-delimited JSON; one object when not streamed
                line = raw_line.strip()
                if not line:
                    continue
                try:
                    chunk = json.loads(line)
                except ValueError:
                    raise OllamaError(f"{url} sent a line that is not JSON: {line[:200]!r}") from None
                if not isinstance(chunk, dict):
                    raise OllamaError(f"{url} sent an unexpected line: {line[:200]!r}")
                if chunk.get("error"):
                    raise OllamaError(f"Ollama reported an error: {chunk['error']}")
                message = chunk.get("message") or {}
                pieces.append(message.get("content") or "")
                if chunk.get("done"):
                    return "".join(pieces)
    except urllib.error.HTTPError as exc:
        detail = _error_text(exc)
        if exc.code == 404 and detail and "not found" in detail:
            raise OllamaError(
                f"The Ollama server at {base} does not have the model {model!r} ({detail}).\n"
                f"Download it with: ollama pull {model}"
            ) from None
        raise OllamaError(f"{url} answered HTTP {exc.code}: {detail or exc.reason}") from None
    except TimeoutError:
        raise OllamaError(
            f"The Ollama server at {base} sent nothing for {read_timeout} seconds "
            "(a large model on a slow machine may need a longer timeout)"
        ) from None
    except urllib.error.URLError as exc:
        raise OllamaError(_unreachable_message(base, exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise OllamaError(f"The connection to {base} broke off: {exc!r}") from None
    raise OllamaError(f"The answer from {url} ended before it was done (no \"done\": true)")


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


# Not in the book's chapter code: a copy of the chapter's `format_input` (as the book's own
# ollama_evaluate.py keeps one), so that scoring runs without importing torch, which
# gpt_instruction_finetuning.py needs. A test checks that the two are the same code.
def format_input(entry):
    """The Alpaca-style prompt: a preamble, the instruction, and the input when there is one."""
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def build_score_prompt(entry, json_key):
    """The chapter's scoring prompt for one entry."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


# ---------------------------------------------------------------------------------------
# Input, and work saved entry by entry (the scores here, the rewrites of
# make_preference_data.py)
# ---------------------------------------------------------------------------------------


def validate_entries(data, json_key=None, source="input"):
    """Raise InputDataError unless `data` is a list of entries with text under all keys
    (instruction, input, output, and `json_key` when given)."""
    keys = REQUIRED_KEYS if json_key is None else (*REQUIRED_KEYS, json_key)
    validate_instruction_entries(data, source, keys=keys)


def load_entries(file_path, json_key="model_response"):
    """Load and check a JSON file of entries; raise InputDataError on problems.

    With `json_key=None` only the instruction, input and output are required.
    """
    path = Path(file_path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputDataError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise InputDataError(f"input path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputDataError(f"{path} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputDataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    validate_entries(data, json_key, source=str(path))
    return data


def work_fingerprint(header, prompts):
    """sha256 over `header` (the settings, a JSON object) and every prompt: same value, same work."""
    digest = hashlib.sha256()
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode("utf-8"))
    return digest.hexdigest()


def scores_header(json_key, model):
    """What the scores file says about how it was made."""
    return {"format": SCORES_FORMAT, "model": model, "json_key": json_key}


def scores_fingerprint(json_data, json_key, model):
    """sha256 over the judge, the key and every entry's prompt: same value, same scores."""
    header = {**scores_header(json_key, model), "n": len(json_data)}
    return work_fingerprint(header, (build_score_prompt(entry, json_key) for entry in json_data))


def _load_previous(path, fingerprint, n_entries, done="scored"):
    """Results saved by an earlier run of the same work, keyed by entry index."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        tqdm.write(f"Could not read the saved results {path}; starting fresh.")
        return {}
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        tqdm.write(
            f"The results in {path} were made for a different input or judge model; "
            "starting fresh."
        )
        return {}
    previous = {}
    for result in saved.get("results", []):
        index = result.get("index") if isinstance(result, dict) else None
        if isinstance(index, int) and 0 <= index < n_entries:
            previous[index] = result
    if previous:
        tqdm.write(f"Resuming: {len(previous)} of {n_entries} entries already {done} in {path}.")
    return previous


def run_resumable(n_entries, work, results_path=None, header=None, fingerprint=None,
                  desc="Scoring entries", done="scored"):
    """Call `work(index)` for every entry index not done yet; return {index: result}.

    `work` returns a JSON object holding "index", or None when the entry has no result this
    time (it is tried again by the next run). With `results_path`, the results are saved as
    they arrive, under `header` and `fingerprint`, and a later call with the same fingerprint
    only does the entries still missing.
    """
    results = {}
    if results_path is not None:
        results = _load_previous(results_path, fingerprint, n_entries, done)

    todo = [i for i in range(n_entries) if i not in results]
    for index in tqdm(todo, desc=desc, initial=len(results), total=n_entries):
        result = work(index)
        if result is None:
            continue
        results[index] = result
        if results_path is not None:
            write_json(results_path, {
                **header,
                "fingerprint": fingerprint,
                "num_entries": n_entries,
                "results": [results[i] for i in sorted(results)],
            })
    return results


def generate_model_scores(json_data, json_key, model="llama3", url=None, scores_path=None,
                          timeout=DEFAULT_TIMEOUT, num_ctx=2048):
    """Ask the judge to score every entry's `json_key` answer; return the int scores.

    An empty answer scores 0 without a request, as in the book. Replies without a number from
    0 to 100 are printed and left out, so the list can be shorter than `json_data`. With
    `scores_path`, every result is saved as it arrives and a later call with the same input
    and judge only scores the entries still missing.
    """
    validate_entries(json_data, json_key)

    def score_entry(index):
        entry = json_data[index]
        if not entry[json_key].strip():
            return {"index": index, "reply": None, "score": 0, "empty_response": True}
        prompt = build_score_prompt(entry, json_key)
        reply = query_model(prompt, model=model, url=url, num_ctx=num_ctx, timeout=timeout)
        score = parse_score(reply)
        if score is None:
            tqdm.write(f"Could not convert the reply for entry {index} to a score: {reply!r}")
        return {"index": index, "reply": reply, "score": score}

    fingerprint = header = None
    if scores_path is not None:
        header = scores_header(json_key, model)
        fingerprint = scores_fingerprint(json_data, json_key, model)
    results = run_resumable(len(json_data), score_entry, scores_path, header, fingerprint)

    empty = sum(bool(r.get("empty_response")) for r in results.values())
    if empty:
        print(f"Empty responses scored 0 without asking the judge: {empty} of {len(json_data)}")
    scores = [results[i]["score"] for i in sorted(results)]
    unparsed = sum(score is None for score in scores)
    if unparsed:
        print(f"Replies without a score: {unparsed} of {len(json_data)}")
    return [score for score in scores if score is not None]


def summary_lines(scores, num_entries):
    """The two summary lines the chapter prints."""
    average = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
    return [f"Number of scores: {len(scores)} of {num_entries}", f"Average score: {average}"]


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
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _safe_name(model):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def add_server_arguments(parser, what):
    """--model, --host, --num-ctx and --timeout: the Ollama options of every command here."""
    parser.add_argument("--model", default="llama3", help=f"{what} model on the Ollama server")
    parser.add_argument("--host", default=None,
                        help="Ollama address: host, host:port, [IPv6]:port or a URL such as "
                             "http://localhost:11434/api/chat (default: OLLAMA_HOST, "
                             "else 127.0.0.1:11434)")
    parser.add_argument("--num-ctx", "--num_ctx", type=_positive(int), default=2048,
                        help="the model's context window in tokens (Ollama's num_ctx; "
                             "default: %(default)s, as in the book)")
    parser.add_argument("--timeout", type=_positive(float), default=DEFAULT_READ_TIMEOUT,
                        help="seconds to wait for each piece of an answer before giving up "
                             "(default: %(default)s)")


def run_server_job(args, job, results_path):
    """Check the server and model named by the command-line `args`, then run `job`.

    Returns (0, job(base_url, model=..., timeout=..., num_ctx=...)). A server or model problem,
    an OS error or Ctrl-C is printed instead, saying where the results so far are (a new run
    resumes from `results_path`), and gives (1, None) or (130, None).
    """
    try:
        base = get_ollama_url(args.host)
        ensure_ollama(base, args.model)
        timeout = (DEFAULT_CONNECT_TIMEOUT, args.timeout)
        return 0, job(base, model=args.model, timeout=timeout, num_ctx=args.num_ctx)
    except OllamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if Path(results_path).exists():
            print(f"Results so far are in {results_path}; run again to resume.", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"\nInterrupted. Results so far are in {results_path}; run again to resume.",
              file=sys.stderr)
        return 130, None
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Score model responses with a judge model served by Ollama (section 7.8)."
    )
    parser.add_argument("--file_path", "--file-path", required=True,
                        help="JSON list of entries with instruction, input, output and responses")
    parser.add_argument("--json_key", "--json-key", default="model_response",
                        help="key of the responses to score")
    add_server_arguments(parser, what="judge")
    parser.add_argument("--scores-out", "--scores_out", default=None,
                        help="per-entry scores JSON, also used to resume "
                             "(default: <input stem>-<model>-scores.json beside the input)")
    parser.add_argument("--plot", default=None,
                        help="histogram image (default: <input stem>-<model>-scores.png)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the command line; return the exit code (1: server or model, 2: input problems)."""
    try:
        args = _parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2

    file_path = Path(args.file_path)
    stem = f"{file_path.stem}-{_safe_name(args.model)}-scores"
    scores_path = Path(args.scores_out) if args.scores_out else file_path.with_name(stem + ".json")
    plot_path = Path(args.plot) if args.plot else file_path.with_name(stem + ".png")

    try:
        data = load_entries(file_path, args.json_key)
    except InputDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def score(base, **options):
        print(f"Scoring {len(data)} entries of {file_path} with {args.model} at {base}")
        return generate_model_scores(data, args.json_key, url=base, scores_path=scores_path,
                                     **options)

    code, scores = run_server_job(args, score, scores_path)
    if code:
        return code

    for line in summary_lines(scores, len(data)):
        print(line)
    print(f"Scores saved to {scores_path}")
    if scores:
        average = sum(scores) / len(scores)
        title = f"{file_path.name}, judged by {args.model}\n{len(scores)} scores, mean {average:.2f}"
        try:
            plot_scores(scores, plot_path, title=title)
        except (OSError, ValueError) as exc:
            print(f"error: could not save the histogram: {exc}", file=sys.stderr)
            return 1
        print(f"Histogram saved to {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
