"""A real HTTP server on 127.0.0.1 serving {url path: bytes}, with faults on demand, for tests.

It honours `Range: bytes=N-` and can be told to fail a path: answer an HTTP error, cut the
connection after some bytes (having announced the full length), ignore the Range header,
answer a Range request from the wrong offset, or serve a short body (with a matching
Content-Length), or redirect it (302 to a URL). It records every request, and its headers.
`content_types` gives a path's Content-Type header (none is sent otherwise); `check(path,
headers)`, when set, may answer an HTTP status instead of the file (a gated repository's 401).
"""

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files  # {url path: bytes}
        self.faults = {}  # {url path: [fault, ...]}, each used by one request, in order
        self.requests = []  # (url path, Range header or None), in arrival order
        self.content_types = {}  # {url path: Content-Type header}
        self.request_headers = []  # (url path, {header: value}), in arrival order
        self.check = None  # check(url path, headers) -> an HTTP status to answer instead, or None
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def fail(self, path, *faults):
        self.faults.setdefault(path, []).extend(faults)

    def paths(self, prefix=""):
        return [path for path, _ in self.requests if path.startswith(prefix)]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Range")))
            server.request_headers.append((self.path, dict(self.headers)))
            queue = server.faults.get(self.path)
            fault = queue.pop(0) if queue else None
        if server.check and (status := server.check(self.path, self.headers)):
            self.send_error(status)
            return
        if fault and fault[0] == "redirect":
            self.send_response(302)
            self.send_header("Location", fault[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = server.files.get(self.path)
        if body is None:
            fault = ("status", 404)
        if fault and fault[0] == "status":
            self.send_error(fault[1])
            return
        if fault and fault[0] == "short":  # a wrong, short file, consistently announced
            body = body[: fault[1]]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and not (fault and fault[0] == "ignore_range"):
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if fault and fault[0] == "range_from_zero":  # a 206 for bytes it was not asked
                start = 0
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if self.path in server.content_types:  # on a 200 and a 206 alike
            self.send_header("Content-Type", server.content_types[self.path])
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault and fault[0] == "cut":  # the full length announced, then only some bytes
            self.wfile.write(body[start : start + fault[1]])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(files):
    """A FileServer for {url path: bytes} on a free loopback port, shut down afterwards."""
    with running(FileServer(files)) as httpd:
        yield httpd


@contextlib.contextmanager
def running(httpd):
    """Serve `httpd` on a thread for the block, then shut it down."""
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def free_port():
    """A port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port_url():
    """A loopback URL nothing listens on: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"
