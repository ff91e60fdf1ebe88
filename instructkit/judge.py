"""The judge's client: the server whose model scores the finetuned model's answers (section 7.8).

Not in the book. The book's `query_model` posts with `requests` to one fixed URL and lets any
problem end in a traceback. Here, with the standard library only (no torch, no requests):

- where the server is: `get_ollama_url` reads the forms Ollama's own clients accept (host,
  host:port, [IPv6]:port, a URL with or without a scheme, the book's
  http://localhost:11434/api/chat), from `--host` or the OLLAMA_HOST environment variable;
- how it is reached: through `judge_http`, with a connect timeout and a read timeout that
  bounds the wait for each streamed piece of an answer;
- what went wrong, said so that the reader can act: no server answers, the model is not
  pulled, an HTTP error, a server that stays silent, an answer cut off in the middle (a
  server that died then is reported as "No Ollama server answered", as one that was never
  there). All are `OllamaError`, an `ExpectedError`: one line and exit code 1 on a command line;
- `ChatServer` is what scoring needs from a judge server, whatever its API; `OllamaServer`
  implements it for Ollama's /api/chat, /api/tags and /api/version, `OpenAIServer` for the
  OpenAI chat-completions API (/v1/chat/completions and /v1/models: OpenAI, llama.cpp's
  llama-server, vLLM, LM Studio), with an API key, and retries of HTTP 429. Why a small
  client of our own rather than the `openai` package: see OpenAIServer's docstring (scoring
  needs two endpoints and a header; the package would add dependencies and a second behaviour
  for timeouts, retries and errors).

The book's script `ollama_evaluate.py` sends its request through `post_chat`;
`make_preference_data` asks through `ask_judge`; the notebooks call `get_ollama_url`,
`ollama_is_reachable` and `ensure_ollama`. The scoring prompt, the reading of the reply and the
saved results are in `judge_results`, the command-line options in `judge_cli`.
"""

import http.client
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from instructkit.errors import ExpectedError
from instructkit.judge_http import DEFAULT_TIMEOUT, error_text, open_url, split_timeout

# 127.0.0.1, as Ollama itself: "localhost" tries ::1 first on Windows, seconds per request.
DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434
BOOK_CHAT_URL = "http://localhost:11434/api/chat"  # the default of the book's query_model
SEED = 123  # the book's options: seeded and greedy, so that answers repeat
NUM_CTX = 2048
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"


class JudgeServerError(ExpectedError):
    """The judge's server cannot be reached, lacks the model, or answered with an error."""


class OllamaError(JudgeServerError):
    """A JudgeServerError from (or on the way to) an Ollama server."""


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


def chat_server_url(url=None):
    """The base URL a chat request goes to: `url` in any form `get_ollama_url` reads.

    None and the book's default (http://localhost:11434/api/chat) both mean "the default
    server": OLLAMA_HOST when it is set, as for Ollama's own clients, else 127.0.0.1:11434.
    So the book's calls reach a server that OLLAMA_HOST points to.
    """
    return get_ollama_url(None if url == BOOK_CHAT_URL else url)


# ---------------------------------------------------------------------------------------
# The judge server: what scoring needs, and Ollama's answer to it
# ---------------------------------------------------------------------------------------


class ChatStream:
    """An answer while it streams in; use it as a context manager.

    `iter_lines()` gives the answer's lines as text, as requests' ``iter_lines`` does for the
    book, each one already checked to be part of an answer (an error line raises instead);
    `pieces()` gives the text each line adds. Both stop after the line that ends the answer,
    and raise when the stream ends without one.
    """

    def __init__(self, server, response, url):
        self.server, self.url = server, url
        self._response = response

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._response.close()

    def _parsed(self):
        try:
            for raw_line in self._response:  # newline-delimited: one JSON object a line
                line = raw_line.decode("utf-8", "replace").strip()
                if not line:
                    continue
                piece, done = self.server.read_line(line, self.url)
                yield line, piece
                if done:
                    return
        except TimeoutError:
            raise self.server.silent() from None
        except (OSError, http.client.HTTPException) as exc:
            raise self.server.cut_off(
                self.url, f"in the middle of an answer, the connection broke: {exc!r}") from None
        raise self.server.cut_off(self.url, "in the middle of an answer, the stream ended "
                                            "without its last part")

    def iter_lines(self, decode_unicode=True):
        """The lines as text (as bytes with decode_unicode=False), as requests gives them."""
        return (line if decode_unicode else line.encode("utf-8") for line, _ in self._parsed())

    def pieces(self):
        return (piece for _, piece in self._parsed())


class ChatServer:
    """A judge server reached over HTTP, whatever its API: what the scoring code asks of it.

    The transport and the errors of a server that is absent, silent or cut off are shared
    here; a subclass names its API's endpoints, request and reply formats (`chat_path`,
    `chat_body`, `read_line`, `models`, `is_reachable`, `ensure_model`, `http_error`).
    `timeout` is seconds, or (connect, read) where read bounds the wait for each piece.
    """

    name = "judge"  # in messages: "No judge server answered at ..."
    error = JudgeServerError
    chat_path = None
    start_hint = "Start the server, or point to it with --host."

    def __init__(self, base_url, timeout=DEFAULT_TIMEOUT):
        self.base_url = base_url
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout

    # ---- what a subclass provides --------------------------------------------------------
    def chat_body(self, prompt, model, seed=SEED, num_ctx=NUM_CTX):
        raise NotImplementedError

    def read_line(self, line, url):
        """(text the line adds, whether it ends the answer); raise on an error line."""
        raise NotImplementedError

    def models(self):
        raise NotImplementedError

    def is_reachable(self, timeout=2.0):
        raise NotImplementedError

    def ensure_model(self, model):
        raise NotImplementedError

    def http_error(self, url, code, detail, body, headers=None):
        """The error for an HTTP error status (a subclass can recognise a missing model);
        `body`: the chat request (None for a GET), `headers`: the response's."""
        return self.error(f"{url} answered HTTP {code}: {detail}")

    def headers(self):
        """Extra request headers (an API key)."""
        return {}

    # ---- shared --------------------------------------------------------------------------
    def unreachable(self, reason):
        return self.error(f"No {self.name} server answered at {self.base_url} ({reason}).\n"
                          f"{self.start_hint}")

    def silent(self):
        _, read_timeout = split_timeout(self.timeout)
        return self.error(
            f"The {self.name} server at {self.base_url} sent nothing for {read_timeout} seconds "
            "(a large model on a slow machine may need a longer timeout)")

    def cut_off(self, url, when):
        """The error for an answer that stopped before its end (`when`: how): a server that died
        then is reported as absent (it is), one still there as a broken answer."""
        if not self.is_reachable():
            return self.unreachable(f"it stopped {when}")
        return self.error(f"The answer from {url} ended before it was done ({when})")

    def get_json(self, path, timeout=None):
        url = self.base_url + path
        try:
            with open_url(url, timeout=self.timeout if timeout is None else timeout,
                          headers=self.headers()) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise self.http_error(url, exc.code, error_text(exc) or exc.reason, None,
                                  exc.headers) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(getattr(exc, "reason", exc)) from None
        except ValueError:
            raise self.error(f"{url} did not answer JSON: is this the {self.name} API?") from None

    def post_chat(self, body):
        """POST `body` to the chat endpoint; return the ChatStream of the answer."""
        url = self.base_url + self.chat_path
        try:
            response = open_url(url, data=body, timeout=self.timeout, headers=self.headers())
        except urllib.error.HTTPError as exc:
            raise self.http_error(url, exc.code, error_text(exc) or exc.reason, body,
                                  exc.headers) from None
        except TimeoutError:
            raise self.silent() from None
        except urllib.error.URLError as exc:
            raise self.unreachable(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:  # e.g. closed before the headers
            raise self.cut_off(url, f"before its answer, the connection broke: {exc!r}") from None
        return ChatStream(self, response, url)

    def chat(self, prompt, model, seed=SEED, num_ctx=NUM_CTX):
        """Send `prompt` to `model`; return its whole answer."""
        with self.post_chat(self.chat_body(prompt, model, seed, num_ctx)) as stream:
            return "".join(stream.pieces())


def _full_model_name(name):
    """'llama3' -> 'llama3:latest' (the tag part follows the last '/')."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class OllamaServer(ChatServer):
    """An Ollama server: POST /api/chat (streamed JSON lines), GET /api/tags and /api/version."""

    name = "Ollama"
    error = OllamaError
    chat_path = "/api/chat"
    start_hint = ("Start one with `ollama serve` in another terminal (or open the Ollama desktop "
                  "app), or point to a server elsewhere with OLLAMA_HOST=host:port or --host.")

    def chat_body(self, prompt, model, seed=SEED, num_ctx=NUM_CTX):
        return {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": seed, "temperature": 0, "num_ctx": num_ctx},
        }

    def read_line(self, line, url):
        try:
            chunk = json.loads(line)
        except ValueError:
            raise self.error(f"{url} sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise self.error(f"{url} sent an unexpected line: {line[:200]!r}")
        if chunk.get("error"):
            raise self.error(f"Ollama reported an error: {chunk['error']}")
        message = chunk.get("message") or {}
        return message.get("content") or "", bool(chunk.get("done"))

    def http_error(self, url, code, detail, body, headers=None):
        if code == 404 and body is not None and detail and "not found" in detail:
            model = body.get("model")
            return self.error(
                f"The Ollama server at {self.base_url} does not have the model {model!r} "
                f"({detail}).\nDownload it with: ollama pull {model}")
        return super().http_error(url, code, detail, body, headers)

    def is_reachable(self, timeout=2.0):
        try:
            answer = self.get_json("/api/version", timeout=timeout)
        except OllamaError:
            return False
        return isinstance(answer, dict) and "version" in answer

    def models(self):
        answer = self.get_json("/api/tags")
        models = answer.get("models") if isinstance(answer, dict) else None
        if not isinstance(models, list):
            raise self.error(f"{self.base_url}/api/tags did not list models: is this Ollama?")
        return [m.get("name") or m.get("model") for m in models if isinstance(m, dict)]

    def ensure_model(self, model):
        names = self.models()
        pulled = {_full_model_name(n) for n in names if n}
        if _full_model_name(model) not in pulled:
            listing = ", ".join(sorted(n for n in names if n)) or "none"
            raise self.error(
                f"The Ollama server at {self.base_url} does not have the model {model!r} "
                f"(pulled: {listing}).\nDownload it with: ollama pull {model}")
        return names


class OpenAIError(JudgeServerError):
    """A JudgeServerError from (or on the way to) an OpenAI-compatible server."""


class RateLimited(OpenAIError):
    """HTTP 429 (or 502/503/504): the request may succeed after `wait` seconds."""

    def __init__(self, message, wait=None):
        super().__init__(message)
        self.wait = wait


def openai_base_url(url=None):
    """The base URL of an OpenAI-compatible API (no trailing slash), as its clients take it.

    None or empty: OPENAI_BASE_URL, else OpenAI's https://api.openai.com/v1. Without a scheme
    the address is http:// (a server on this machine or the local network, e.g.
    ``127.0.0.1:8080``); without a path, /v1 is added (llama.cpp's llama-server, vLLM, LM Studio
    and OpenAI all serve under /v1); a trailing /chat/completions or /models is dropped.
    """
    value = (url or "").strip().strip("\"'").strip() or os.environ.get("OPENAI_BASE_URL", "").strip()
    if not value:
        return OPENAI_DEFAULT_BASE_URL
    if "://" not in value:
        value = "http://" + value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise OpenAIError(f"Invalid API address {value!r}: use http(s)://host:port/v1")
    path = re.sub(r"/(chat/completions|completions|models)$", "", parts.path.rstrip("/"))
    return f"{parts.scheme.lower()}://{parts.netloc}{path or '/v1'}"


def api_key_from_env(name=None):
    """The API key in the environment variable `name` (None: OPENAI_API_KEY, which may be
    unset: a local server needs no key). A variable named on purpose must be set."""
    if name is None:
        return os.environ.get(OPENAI_KEY_ENV) or None
    key = os.environ.get(name)
    if not key:
        from instructkit.errors import BadInputError

        raise BadInputError(f"--api-key-env {name}: the environment variable {name} is not set")
    return key


class OpenAIServer(ChatServer):
    """A server of the OpenAI chat-completions API: POST /chat/completions (streamed as
    server-sent events), GET /models. OpenAI itself, llama.cpp's llama-server, vLLM, LM Studio.

    Why a client of our own and not the `openai` package: scoring needs two endpoints and one
    header, which the standard library does in a few lines; the package would add a dependency
    (with httpx, pydantic and their versions) to a chapter that scores with no PyTorch and no
    `requests`, and its own retries and errors would differ from the Ollama client's, where the
    commands need one behaviour: the same timeouts (connect, and each piece of the answer), the
    same one-line errors with what to do, the same resume hint.

    The key (`api_key`) is sent as ``Authorization: Bearer <key>`` and never shown: not in a
    message (a server that echoes it has it replaced by ***), a results file or a log.
    HTTP 429 and 502/503/504 are retried `max_retries` times, after the server's Retry-After
    seconds when it sends them (at most `max_wait`), else after retry_base * 2**attempt;
    `sleep` is the function that waits (tests replace it).
    """

    name = "OpenAI-compatible"
    error = OpenAIError
    chat_path = "/chat/completions"
    start_hint = ("Start the server (e.g. llama.cpp's `llama-server -m MODEL.gguf --port 8080`, "
                  "then --base-url 127.0.0.1:8080), or point to it with --base-url.")
    max_retries = 5
    retry_base = 1.0  # seconds before the first retry without a Retry-After
    max_wait = 60.0
    retried_codes = (429, 502, 503, 504)

    def __init__(self, base_url, timeout=DEFAULT_TIMEOUT, api_key=None, api_key_env=None):
        super().__init__(base_url, timeout)
        self._api_key = api_key
        self.api_key_env = api_key_env or OPENAI_KEY_ENV
        self.sleep = time.sleep

    def __repr__(self):
        return f"OpenAIServer({self.base_url!r})"  # never the key

    def headers(self):
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def redact(self, text):
        text = str(text)
        return text.replace(self._api_key, "***") if self._api_key else text

    def chat_body(self, prompt, model, seed=SEED, num_ctx=NUM_CTX):
        # num_ctx is not part of this API: the server sets its context (llama-server's -c)
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "seed": seed, "stream": True}

    def read_line(self, line, url):
        if line.startswith("{"):  # a server that answers the whole reply as one JSON object
            chunk, whole = self._json(line, url), True
        elif line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                return "", True
            chunk, whole = self._json(payload, url), False
        else:  # ": comment", "event: ...", "id: ..." lines of server-sent events
            return "", False
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise self.error(f"The server reported an error: {self.redact(message)}")
        choices = chunk.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message" if whole else "delta") or {}
        return message.get("content") or "", whole or bool(choice.get("finish_reason"))

    def _json(self, text, url):
        try:
            chunk = json.loads(text)
        except ValueError:
            raise self.error(f"{url} sent a line that is not JSON: {text[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise self.error(f"{url} sent an unexpected line: {text[:200]!r}")
        return chunk

    def http_error(self, url, code, detail, body, headers=None):
        detail = self.redact(detail)
        if code in (401, 403):
            if not self._api_key:
                return self.error(f"The server at {self.base_url} asks for an API key (HTTP "
                                  f"{code}: {detail}); set {self.api_key_env} to your key.")
            return self.error(f"The server at {self.base_url} refused the API key in "
                              f"{self.api_key_env} (HTTP {code}: {detail}); set {self.api_key_env} "
                              "to a valid key.")
        if code == 404 and body is not None:
            try:
                offered = ", ".join(sorted(self.models())) or "none"
            except OpenAIError:
                offered = None
            listing = f"; it offers: {offered}" if offered else ""
            return self.error(f"The server at {self.base_url} has no model {body.get('model')!r} "
                              f"(HTTP 404: {detail}){listing}. Name one with --model.")
        if code in self.retried_codes:
            return RateLimited(f"{url} answered HTTP {code}: {detail}", _retry_after(headers))
        error = super().http_error(url, code, detail, body, headers)
        error.status = code
        return error

    def unreachable(self, reason):
        return super().unreachable(self.redact(reason))

    def post_chat(self, body):
        for attempt in range(self.max_retries + 1):
            try:
                return super().post_chat(body)
            except RateLimited as exc:
                if attempt == self.max_retries:
                    raise self.error(f"{exc} (still after {self.max_retries} retries; wait a "
                                     "while, or use a lower rate)") from None
                wait = exc.wait if exc.wait is not None else self.retry_base * 2 ** attempt
                self.sleep(min(wait, self.max_wait))
        raise AssertionError("unreachable")  # the loop returns or raises

    def is_reachable(self, timeout=2.0):
        try:
            with open_url(self.base_url + "/models", timeout=timeout, headers=self.headers()):
                return True
        except urllib.error.HTTPError:
            return True  # it answered (a missing key, a server without /models)
        except (OSError, http.client.HTTPException):
            return False

    def models(self):
        answer = self.get_json("/models")
        models = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(models, list):
            raise self.error(f"{self.base_url}/models did not list models: is this the OpenAI API?")
        return [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]

    def ensure_model(self, model):
        """Check the server answers and takes the key (GET /models); return the model names it
        lists. A model it does not list is not refused here: llama-server answers with its
        one model whatever the name; a server that lacks it says so with HTTP 404."""
        try:
            return self.models()
        except OpenAIError as exc:
            if getattr(exc, "status", None) == 404:  # a server without /models
                return []
            raise


def _retry_after(headers):
    """The seconds of a Retry-After header (a number; an HTTP date is ignored), or None."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


# The judge APIs the commands can talk to, by name.
SERVERS = {"ollama": OllamaServer, "openai": OpenAIServer}


def judge_server(url=None, timeout=None, api="ollama", api_key=None, api_key_env=None):
    """The judge server at `url`, speaking `api`: for "ollama" any form `chat_server_url`
    reads, for "openai" any form `openai_base_url` reads, with `api_key` (named after the
    environment variable `api_key_env` in messages)."""
    if api == "openai":
        return OpenAIServer(openai_base_url(url), timeout, api_key, api_key_env)
    return SERVERS[api](chat_server_url(url), timeout)


# ---------------------------------------------------------------------------------------
# The calls the notebooks, the book's script and the commands make
# ---------------------------------------------------------------------------------------


def ollama_is_reachable(url=None, timeout=2.0):
    """True when an Ollama server answers GET /api/version at `url` (base or any API URL)."""
    return OllamaServer(get_ollama_url(url), timeout).is_reachable(timeout)


def list_models(url=None, timeout=5.0):
    """The names of the models pulled on the server (GET /api/tags)."""
    return OllamaServer(get_ollama_url(url), timeout).models()


def ensure_ollama(url=None, model=None, timeout=5.0):
    """Raise OllamaError unless a server answers at `url` and (when given) has `model` pulled.

    Returns the names of the pulled models.
    """
    server = OllamaServer(get_ollama_url(url), timeout)
    return server.models() if model is None else server.ensure_model(model)


def post_chat(url, data, timeout=None):
    """POST the chat request `data` to the server at `url`; return the answer's ChatStream.

    What ``requests.post(url, json=data, stream=True)`` and ``raise_for_status()`` do for the
    book, with this module's errors; `url` as `chat_server_url` reads it.
    """
    return judge_server(url, timeout).post_chat(data)


def ask_judge(prompt, model="llama3", url=None, seed=SEED, num_ctx=NUM_CTX, timeout=None):
    """Send `prompt` to the judge model and return its whole answer (the book's options)."""
    return judge_server(url, timeout).chat(prompt, model, seed=seed, num_ctx=num_ctx)
