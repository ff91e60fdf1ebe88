"""A stand-in OpenAI-compatible server on 127.0.0.1: POST /v1/chat/completions and GET /v1/models.

Real HTTP, as llama.cpp's llama-server, vLLM or OpenAI answer: the chat is streamed as
server-sent events (``data: {...}`` lines, the text split over several chunks, then
``data: [DONE]``), or sent as one JSON object when the body says ``"stream": false``.
With `api_key` set, a request without ``Authorization: Bearer <api_key>`` gets HTTP 401 (with
an error message that quotes the key sent, as OpenAI's does, so that tests can check the
client never shows it). A model not in `models` gets HTTP 404 when `strict_models` is set.

Replies are scripted: a string, a list used in turn (the last one repeated), or a function
``f(prompt, body) -> reply``. A reply can also be ``Status(code, message, retry_after)`` (an
HTTP error, e.g. 429 or 500) or ``Hang(seconds)`` (headers never come: a server that is silent).

    with FakeOpenAI(replies=[Status(429, retry_after=0), "85"]) as server:
        server.base_url      # "http://127.0.0.1:PORT/v1"
        server.prompts       # the user message of each chat request
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Status:
    """Answer with HTTP `code` and the API's error body; Retry-After when given."""

    def __init__(self, code, message="simulated error", retry_after=None):
        self.code, self.message, self.retry_after = code, message, retry_after


class Hang:
    """Send nothing for `seconds` (or until the server stops)."""

    def __init__(self, seconds=30.0):
        self.seconds = seconds


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes, as SSE allows

    def log_message(self, format, *args):
        pass

    def _json(self, code, obj, extra=()):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code, message, extra=()):
        self._json(code, {"error": {"message": message, "type": "invalid_request_error",
                                    "code": None}}, extra)

    def _authorized(self):
        fake = self.server.fake
        sent = self.headers.get("Authorization", "")
        fake.auth_headers.append(sent)
        if fake.api_key is None or sent == f"Bearer {fake.api_key}":
            return True
        shown = sent.removeprefix("Bearer ") or "(none)"
        self._error(401, f"Incorrect API key provided: {shown}. You can find your API key at "
                         "https://example.invalid/keys.")
        return False

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}")
        if self._authorized():
            self._json(200, {"object": "list", "data": [{"id": m, "object": "model"}
                                                         for m in self.server.fake.models]})

    def do_POST(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        fake.requests.append(body)
        if not self._authorized():
            return
        model = body.get("model")
        if fake.strict_models and model not in fake.models:
            return self._error(404, f"The model `{model}` does not exist or you do not have "
                                    "access to it.")
        reply = fake.next_reply(body)
        if isinstance(reply, Status):
            extra = [] if reply.retry_after is None else [("Retry-After", str(reply.retry_after))]
            return self._error(reply.code, reply.message, extra)
        if isinstance(reply, Hang):
            fake.stopping.wait(reply.seconds)
            return
        if body.get("stream") is False:
            return self._json(200, {"object": "chat.completion", "model": model, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": reply},
                 "finish_reason": "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)] or [""]
        self.wfile.write(b": keep-alive\n\n")
        for piece in pieces:
            self._event({"choices": [{"index": 0, "delta": {"content": piece},
                                      "finish_reason": None}]})
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that went away (a timeout test) is not a failure of the server


class FakeOpenAI:
    def __init__(self, replies="85", models=("judge",), api_key=None, strict_models=False):
        self.replies, self.models = replies, list(models)
        self.api_key, self.strict_models = api_key, strict_models
        self.requests, self.auth_headers = [], []
        self.stopping = threading.Event()
        self._turn = 0
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def prompts(self):
        return [body["messages"][-1]["content"] for body in self.requests]

    def next_reply(self, body):
        with self._lock:
            replies = self.replies
            if callable(replies):
                return replies(body["messages"][-1]["content"], body)
            if isinstance(replies, str | Status | Hang):
                return replies
            reply = replies[min(self._turn, len(replies) - 1)]
            self._turn += 1
            return reply(body["messages"][-1]["content"], body) if callable(reply) else reply

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def hang_after(n, reply):
    """Replies: `reply` (a string, or f(prompt, body)) for the first `n` requests, then a Hang."""
    count = {"n": 0}
    lock = threading.Lock()

    def answer(prompt, body):
        with lock:
            count["n"] += 1
            if count["n"] > n:
                return Hang(60)
        return reply(prompt, body) if callable(reply) else reply

    return answer


def kill_when_saved(argv, results_path, n_results, cwd, wait=30.0):
    """Run `python argv...` (a judge command), and kill it (SIGKILL on POSIX, TerminateProcess
    on Windows: no handler runs) once `results_path` holds `n_results` results."""
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                saved = json.loads(results_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = {}
            if len(saved.get("results", [])) >= n_results:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"{results_path} never held {n_results} results "
                                 f"(exit code {process.poll()})")
    finally:
        process.kill()
        process.wait()
    return json.loads(results_path.read_text(encoding="utf-8"))
