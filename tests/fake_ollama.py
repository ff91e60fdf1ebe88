"""A stand-in Ollama server on 127.0.0.1: the part of the REST API that section 7.8 uses.

Ollama and its models cannot be installed on the test machines, so the client code talks to
this real HTTP server instead. It answers

- ``GET /api/version`` with ``{"version": ...}`` and ``GET /api/tags`` with the pulled models;
- ``POST /api/chat``: streamed newline-delimited JSON (the reply split over several chunks,
  then a last object with ``"done": true``), or one object when the body says
  ``"stream": false``; HTTP 404 with Ollama's error body for a model that is not pulled.

Replies are scripted: one string, a list used in turn (round-robin), or a function
``f(prompt, body) -> reply``; `rewrite_reply` is such a function that answers the
preference-data prompts ("rewrite the output to be more polite/impolite") deterministically.
A reply can also be ``Fail(...)``, ``StreamError(...)``, ``Hangup(...)`` or ``Crash(...)`` to act
out a broken server. ``die_after=N`` makes the server stop listening after N answers, as a
server that crashes between two answers; ``crash_after=N`` makes it crash in the middle of the
answer after those N (it stops listening, then drops the connection). Every request is recorded.

In a test::

    with FakeOllama(replies=["85", "Score: 90"]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.host)   # "127.0.0.1:PORT"
        ...
        server.chat_requests   # the JSON bodies of POST /api/chat, in order
        server.prompts         # the last user message of each

As a process (the notebook tests start it this way)::

    python tests/fake_ollama.py --port 0 --port-file PORT.txt --replies 85 "Score: 90"
    python tests/fake_ollama.py --port 0 --port-file PORT.txt --rewrites --die-after 3
    python tests/fake_ollama.py --port 0 --port-file PORT.txt --rewrites --crash-after 3

prints ``Fake Ollama listening on http://127.0.0.1:PORT`` and serves until it is terminated,
or (with --die-after or --crash-after) exits once its last answer, whole or cut, is out.
"""

import argparse
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Fail:
    """Answer with HTTP `status` and Ollama's error body ``{"error": error}``."""

    def __init__(self, status=500, error="simulated server failure"):
        self.status = status
        self.error = error


class StreamError:
    """Stream `after` chunks of `text`, then an ``{"error": ...}`` line (as Ollama does)."""

    def __init__(self, error="simulated error mid-stream", text="85", after=1):
        self.error = error
        self.text = text
        self.after = after


class Hangup:
    """Stream `after` chunks of `text`, then close the connection without finishing."""

    def __init__(self, text="85", after=1):
        self.text = text
        self.after = after


class Crash(Hangup):
    """A Hangup by a server that crashes: it stops listening before the connection drops, so
    the client's next request is refused."""


_REWRITE = re.compile(
    r"and correct output `(?P<output>.*)`, slightly rewrite the output to be more "
    r"(?P<politeness>polite|impolite)\.", re.DOTALL)

POLITE_PREFIX = "If I may kindly say: "
RUDE_PREFIX = "Obviously, as anyone knows: "


def rewrite_reply(prompt, body=None):
    """A deterministic "model" for the preference-data prompts: the correct output with a
    polite or a rude opening, by what the prompt asks. Other prompts get "85"."""
    match = _REWRITE.search(prompt or "")
    if match is None:
        return "85"
    prefix = POLITE_PREFIX if match["politeness"] == "polite" else RUDE_PREFIX
    return prefix + match["output"]


def full_model_name(name):
    """'llama3' -> 'llama3:latest', as Ollama lists pulled models."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming, as the real server sends
    server_version = "FakeOllama"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    @property
    def fake(self):
        return self.server.fake

    def _send_json(self, status, obj, content_type="application/json; charset=utf-8"):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_text(self, status, text):
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.fake._record("GET", self.path, None)
        if self.path == "/api/version":
            self._send_json(200, {"version": self.fake.version})
        elif self.path == "/api/tags":
            self._send_json(200, {"models": self.fake.tags()})
        else:
            self._send_text(404, "404 page not found")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = None
        self.fake._record("POST", self.path, body)
        if self.path != "/api/chat":
            self._send_text(404, "404 page not found")
            return
        if not isinstance(body, dict):
            self._send_json(400, {"error": "invalid request body"})
            return
        model = body.get("model")
        if not model:
            self._send_json(400, {"error": "model is required"})
            return
        if full_model_name(model) not in self.fake.pulled():
            self._send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        reply = self.fake._next_reply(body)
        if isinstance(reply, Fail):
            self._send_json(reply.status, {"error": reply.error})
            return
        if body.get("stream", True) is False:
            if isinstance(reply, StreamError | Hangup):
                self._send_json(500, {"error": getattr(reply, "error", "simulated hangup")})
                return
            self.dying = self.fake._answered()
            try:
                self._send_json(200, self._message(model, str(reply), done=True))
            finally:
                self.fake._finished(self.dying)
            return
        self._stream(model, reply)

    def _message(self, model, content, done):
        obj = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": content},
            "done": done,
        }
        if done:
            obj.update(done_reason="stop", total_duration=1000, eval_count=max(1, len(content)))
        return obj

    def _write_chunk(self, obj):
        data = (json.dumps(obj) + "\n").encode("utf-8")
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, model, reply):
        self.dying = False  # set when this answer is the server's last
        try:
            self._stream_pieces(model, reply)
        finally:  # even if the client went away: a dying script waits for this before it exits
            self.fake._finished(self.dying)

    def _stream_pieces(self, model, reply):
        text = reply.text if isinstance(reply, StreamError | Hangup) else str(reply)
        pieces = self.fake.split(text)
        if isinstance(reply, StreamError | Hangup):
            pieces = pieces[: reply.after]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            if self.fake.delay:
                time.sleep(self.fake.delay)
            self._write_chunk(self._message(model, piece, done=False))
        if isinstance(reply, Hangup):
            self.close_connection = True  # no final object, no terminating chunk
            if isinstance(reply, Crash):
                self.dying = True
                self.fake._stop_listening()
            return
        if isinstance(reply, StreamError):
            self._write_chunk({"error": reply.error})
        else:
            self.dying = self.fake._answered()
            self._write_chunk(self._message(model, "", done=True))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (a timeout test): nothing to report
        super().handle_error(request, client_address)


class FakeOllama:
    """A threaded loopback HTTP server that acts as Ollama; use it as a context manager."""

    def __init__(self, replies="85", models=("llama3",), port=0, chunk_size=2, delay=0.0,
                 version="0.6.5", fail_after=None, die_after=None, crash_after=None):
        self.replies = replies
        self.models = list(models)
        self.chunk_size = chunk_size
        self.delay = delay  # seconds before each streamed chunk
        self.version = version
        self.fail_after = fail_after  # chat requests after this many answers get HTTP 500
        self.die_after = die_after  # stop listening after this many answers (a crash)
        self.crash_after = crash_after  # crash mid-answer after this many answers
        self.dying = False  # set when it stops listening to die
        self.died = threading.Event()
        self.requests = []
        self.answered = 0
        self._reply_count = 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.fake = self
        self._thread = None

    # addresses -------------------------------------------------------------------------
    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def host(self):
        """The OLLAMA_HOST form, ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def chat_url(self):
        return self.url + "/api/chat"

    # what it received ------------------------------------------------------------------
    @property
    def chat_requests(self):
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] == "/api/chat"]

    @property
    def prompts(self):
        prompts = []
        for body in self.chat_requests:
            messages = body.get("messages") if isinstance(body, dict) else None
            prompts.append(messages[-1].get("content") if messages else None)
        return prompts

    def _record(self, method, path, body):
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body})

    def _answered(self):
        """Count an answer before its last piece is sent; return True when it is the last one
        before dying. Then the server stops listening first, so that the client's next
        request is refused, as by a crashed server."""
        with self._lock:
            self.answered += 1
            dying = self.answered == self.die_after
        if dying:
            self._stop_listening()
        return dying

    def _stop_listening(self):
        self.dying = True
        # In a handler thread: shutdown() waits for the serving loop to return.
        self._httpd.shutdown()
        self._httpd.server_close()

    def _finished(self, dying):
        if dying:
            self.died.set()  # the last answer is out, whole or cut: a script may exit now

    # what it answers -------------------------------------------------------------------
    def pulled(self):
        return {full_model_name(m) for m in self.models}

    def tags(self):
        return [
            {
                "name": full_model_name(m),
                "model": full_model_name(m),
                "modified_at": "2024-05-01T12:00:00Z",
                "size": 4661224676,
                "digest": "0" * 64,
                "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B"},
            }
            for m in self.models
        ]

    def split(self, text):
        """The reply in several pieces, as a model streams it token by token."""
        size = max(1, self.chunk_size)
        return [text[i:i + size] for i in range(0, len(text), size)] or [""]

    def _next_reply(self, body):
        with self._lock:
            if self.fail_after is not None and self.answered >= self.fail_after:
                return Fail(500, "simulated failure: the server stopped answering")
            if self.crash_after is not None and self.answered >= self.crash_after:
                return Crash(text="Half an answer", after=2)
            count = self._reply_count
            self._reply_count += 1
        replies = self.replies
        if callable(replies):
            messages = body.get("messages") or [{}]
            return replies(messages[-1].get("content"), body)
        if isinstance(replies, str | Fail | StreamError | Hangup):  # Crash is a Hangup
            return replies
        return replies[count % len(replies)]

    # running ---------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self):
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


@contextlib.contextmanager
def fake_ollama_process(folder, *args, wait=20):
    """Run this file as a server process with `args`; yield (process, url) once it listens.

    On leaving, the process is terminated; its output is then in ``process.output``.
    """
    port_file = Path(folder) / f"fake-ollama-port-{time.monotonic_ns()}.txt"
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--port", "0",
         "--port-file", str(port_file), *args], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + wait
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake Ollama server did not start (exit {process.poll()})")
            time.sleep(0.05)
        yield process, f"http://127.0.0.1:{port_file.read_text(encoding='utf-8')}"
    finally:
        if process.poll() is None:
            process.terminate()
        process.output, _ = process.communicate(timeout=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a fake Ollama API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the port number to this file when ready")
    parser.add_argument("--replies", nargs="+", default=["85"],
                        help="replies to /api/chat, used in turn (round-robin)")
    parser.add_argument("--replies-json", help="a JSON file with a list of replies (overrides)")
    parser.add_argument("--models", nargs="+", default=["llama3"], help="the pulled models")
    parser.add_argument("--chunk-size", type=int, default=2, help="characters per chunk")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each chunk")
    parser.add_argument("--rewrites", action="store_true",
                        help="answer the preference-data rewrite prompts (rewrite_reply)")
    parser.add_argument("--fail-after", type=int, default=None,
                        help="answer HTTP 500 to chat requests after this many answers")
    parser.add_argument("--die-after", type=int, default=None,
                        help="exit after this many answers, as a server that crashes")
    parser.add_argument("--crash-after", type=int, default=None,
                        help="after this many answers, exit in the middle of the next one")
    args = parser.parse_args(argv)

    replies = args.replies
    if args.replies_json:
        replies = [str(r) for r in json.loads(Path(args.replies_json).read_text("utf-8"))]
    if args.rewrites:
        replies = rewrite_reply
    fake = FakeOllama(replies=replies, models=args.models, port=args.port,
                      chunk_size=args.chunk_size, delay=args.delay, fail_after=args.fail_after,
                      die_after=args.die_after, crash_after=args.crash_after)
    # terminate() on POSIX: a clean exit (Windows' terminate() ends the process at once; the
    # output, flushed line by line, is read all the same).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(fake.port), encoding="utf-8")
        tmp.replace(args.port_file)
    print(f"Fake Ollama listening on {fake.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        fake.serve_forever()
    if fake.dying:
        # Let the last answer (or half answer) go out first. No time limit: a limit that ran
        # out on a busy machine would cut that answer short, a crash the test did not ask for.
        fake.died.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
