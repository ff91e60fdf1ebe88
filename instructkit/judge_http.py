"""HTTP for the judge's client: a connect timeout and a separate read timeout, no proxy for loopback.

Not in the book (which uses `requests`). urllib applies one timeout to both connecting and
reading; a judge on a slow machine may need minutes for an answer while a server that is not
there should be noticed in seconds. Here the connect timeout bounds the connection and the read
timeout bounds the wait for each piece of the answer. A loopback address never goes through a
proxy that the environment names (a proxy would not reach this machine's server). Standard
library only; an https judge (an API in the cloud, a server behind TLS) trusts the certificate
authorities the downloads trust (downloads.open_trusted: SSL_CERT_FILE or REQUESTS_CA_BUNDLE,
else the system's store, then certifi's), and a certificate none of them vouches for is named.
"""

import http.client
import ipaddress
import json
import urllib.parse
import urllib.request

DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to connect
DEFAULT_READ_TIMEOUT = 300.0  # seconds to wait for each piece of the answer (--timeout)
DEFAULT_TIMEOUT = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)


def split_timeout(timeout):
    """(connect, read) seconds from one number, a pair, or None (the defaults)."""
    if timeout is None:
        return DEFAULT_TIMEOUT
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
    def __init__(self, read_timeout, context=None):
        super().__init__(context=context)
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


def open_url(url, data=None, timeout=DEFAULT_TIMEOUT, headers=None):
    """Open `url` (POST JSON when `data` is given, with the extra `headers`); the caller closes
    the response. An https judge's certificate is checked as the downloads check theirs (the
    system's store, a bundle the environment names, certifi), and a failure is a
    CertificateError that says so, not an unreachable server."""
    connect_timeout, read_timeout = split_timeout(timeout)
    headers = {"Accept": "application/json", **(headers or {})}
    body = None
    if data is not None:
        body = json.dumps(data).encode("utf-8")
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=body, headers=headers)

    def open_with(context):
        handlers = [_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout, context=context)]
        if _is_local(url):
            handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
        return urllib.request.build_opener(*handlers).open(request, timeout=connect_timeout)

    if urllib.parse.urlsplit(url).scheme != "https":
        return open_with(None)
    from instructkit.downloads import open_trusted

    return open_trusted(url, open_with)


def error_text(http_error):
    """The error text of an HTTP error response: Ollama's {"error": "..."} or the OpenAI API's
    {"error": {"message": "..."}}; None when the body holds neither."""
    try:
        payload = json.loads(http_error.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else None
