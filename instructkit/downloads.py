"""Resumable, verified downloads: a file gets its final name only once it is whole.

Not in the book. `download_file(url, destination)` downloads through `<destination>.part`,
resumes that partial file on the next attempt (HTTP Range), and checks the size the server
announced and, when given, an expected size and sha256. `download_first(urls, destination)`
tries a list of sources in order. Used for GPT-2's weights (gpt2_weights.py, hub.py),
the instruction datasets (instruction_data.py) and the test data (tests/conftest.py).

Certificates: `ssl_context()` is the one place that decides which certificate authorities a
download trusts: the bundle named by SSL_CERT_FILE or REQUESTS_CA_BUNDLE when one is set (a
company proxy's CA), else the system's store. When the system's store cannot verify a server
(a python.org Python on macOS before "Install Certificates.command" ran), `open_url` tries
certifi's bundle once, where certifi is installed. A certificate that still fails is a
CertificateError that says so and how to fix it, not a hint to check the internet connection.

Content: a file is also checked for what it is (file_checks.py: a safetensors header, JSON
that parses, BPE merges, TensorFlow's index and meta files) before its `.part` file is
renamed. An answer with an HTML content type or an HTML body (a captive portal, a login page,
a proxy's error page) is refused before anything is written: an HtmlPageError that says so.

Tokens: `auth_token` (a gated hub repository's) is sent as `Authorization: Bearer` to the
URL's own server only: kept on a redirect to the same scheme, host and port, dropped on a
redirect anywhere else (the hub sends its large files to a CDN with signed URLs).
"""

import hashlib
import http.client
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from instructkit.errors import BadInputError, CheckpointError, DownloadError  # noqa: F401 (raised here, importable)
from instructkit.file_checks import (
    HTML_ADVICE,
    describe,
    file_problem,
    is_html_content_type,
    kind_of,
    looks_like_html,
)
from instructkit.safe_files import remove_file, replace_file

TIMEOUT_S = 30  # per connection attempt and per read, not for the whole file
CHUNK_SIZE = 1 << 20
PART_SUFFIX = ".part"
CA_BUNDLE_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")  # the first one set wins
CERTIFICATE_ADVICE = (
    "On macOS with Python from python.org, run 'Install Certificates.command' (in the "
    "Applications folder, under your Python version) or 'pip install certifi'; behind a "
    "company proxy, set SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) to your company's CA bundle.")


class CertificateError(DownloadError):
    """A server's certificate that the trusted certificate authorities do not vouch for.

    `reason` is the short form for a list of sources, e.g. "certificate not verified
    (CERTIFICATE_VERIFY_FAILED: self-signed certificate)".
    """

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


class HtmlPageError(DownloadError):
    """A server that answered with an HTML page instead of the file (a captive portal, a login
    page or a proxy's error page)."""


class BadContentError(DownloadError):
    """A download of the right size that is not what its name says (file_checks.py)."""


def html_page_error(url, name, mirror_setting=None):
    """The one-line HtmlPageError for `url`, which answered an HTML page instead of `name`."""
    check = f"check {mirror_setting}" if mirror_setting else "check the URL"
    return HtmlPageError(f"{url} answered with an HTML page ({HTML_ADVICE}) instead of {name}; open "
                         f"a browser to sign in to the network, or {check}")


def ca_bundle_from_env():
    """(variable, path) of the CA bundle the environment names, or None."""
    for name in CA_BUNDLE_ENV_VARS:
        if value := os.environ.get(name, "").strip():
            return name, value
    return None


def ssl_context(cafile=None):
    """The SSL context downloads use: certificates verified against `cafile`, else the bundle
    that SSL_CERT_FILE or REQUESTS_CA_BUNDLE names, else the system's store.

    A bundle that cannot be read is a BadInputError naming the variable that points to it.
    """
    source = ("cafile", cafile) if cafile else ca_bundle_from_env()
    if source is None:
        return ssl.create_default_context()  # the system's store (and OpenSSL's defaults)
    name, path = source
    try:
        if os.path.isdir(path):  # a folder of hashed certificates, as requests also accepts
            return ssl.create_default_context(capath=path)
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as err:
        raise BadInputError(f"{name} names {path!r}, which is not a readable file of PEM "
                            f"certificates ({err}); fix it or unset it") from None


def certifi_context():
    """An SSL context trusting certifi's bundle, or None where certifi is not installed."""
    try:
        import certifi
    except ImportError:
        return None
    return ssl.create_default_context(cafile=certifi.where())


class SameOriginAuthRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the request's Authorization header only on a
    redirect to the same scheme, host and port (urllib drops it everywhere, as an unredirected
    header)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


def _origin(url):
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _urlopen(request, timeout, context):
    if "Authorization" not in request.unredirected_hdrs:
        return urllib.request.urlopen(request, timeout=timeout, context=context)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         SameOriginAuthRedirectHandler())
    return opener.open(request, timeout=timeout)


def open_url(request, timeout=TIMEOUT_S):
    """urllib's `urlopen(request)` with this module's certificate policy (see the docstring).

    An Authorization header given with `add_unredirected_header` follows redirects to the same
    server only. Raises CertificateError when no trusted authority vouches for the server, and
    urllib's errors otherwise.
    """
    return open_trusted(request.full_url, lambda context: _urlopen(request, timeout, context))


def open_trusted(url, open_with):
    """`open_with(context)` under the certificate policy: the context of `ssl_context()`, then,
    where no bundle is named and that fails on the certificate, certifi's. A certificate no
    trusted authority vouches for raises CertificateError; other errors pass through. The
    downloads and the https judge (judge_http.py) both open their connections through this."""
    try:
        return open_with(ssl_context())
    except urllib.error.URLError as err:
        if not _is_certificate_failure(err):
            raise
        failure = err.reason
    fallback = certifi_context() if ca_bundle_from_env() is None else None
    if fallback is not None:  # e.g. a python.org Python on macOS without its certificates
        try:
            return open_with(fallback)
        except urllib.error.URLError as err:
            if not _is_certificate_failure(err):
                raise
            failure = err.reason
    raise certificate_error(url, failure, certifi_tried=fallback is not None)


def _is_certificate_failure(err):
    return isinstance(getattr(err, "reason", None), ssl.SSLCertVerificationError)


def certificate_error(url, failure, certifi_tried=False):
    """The CertificateError for `url`, whose certificate failed with `failure` (one line)."""
    host = urllib.parse.urlsplit(url).hostname or url
    detail = getattr(failure, "verify_message", None) or str(failure)
    reason = f"{getattr(failure, 'reason', None) or 'CERTIFICATE_VERIFY_FAILED'}: {detail}"
    env = ca_bundle_from_env()
    if env is not None:
        trusted = f"the CA bundle that {env[0]} names ({env[1]})"
        advice = (f"Point {env[0]} at the CA bundle that signed it (your company's, behind a "
                  "proxy), or unset it to use the system's certificates.")
    else:
        trusted = "this system's certificates" + (" nor certifi's" if certifi_tried else "")
        trusted = ("neither " if certifi_tried else "") + trusted
        advice = CERTIFICATE_ADVICE
    message = (f"the certificate of {host} could not be verified ({reason}) with {trusted}. "
               f"{advice}")
    return CertificateError(message, f"certificate not verified ({reason})")


def download_first(urls, destination, *, expected_size=None, sha256=None, advice=None, kind=None,
                   mirror_setting=None, auth_token=None):
    """Download `destination` from the first of `urls` that delivers it whole (and verified).

    A cut download resumes from the next URL; a file of the wrong size, sha256 or content
    (`kind`: see download_file) is dropped and the next URL tried. Raises DownloadError listing
    every URL and why it failed; when every URL failed one way (an untrusted certificate, an
    HTML page), that one error, one line. `mirror_setting` names the setting that points at
    the server (e.g. HF_ENDPOINT), for the HTML page's error; `auth_token` goes to each URL's
    own server (see the module's docstring). The error's `http_status` is the HTTP status every
    URL answered (e.g. 401 for a gated repository), else None.
    """
    failures, errors, not_found = [], [], True
    for url in urls:
        try:
            return download_file(url, destination, expected_size=expected_size, sha256=sha256, kind=kind,
                                 mirror_setting=mirror_setting, auth_token=auth_token)
        except (OSError, http.client.HTTPException, DownloadError) as err:
            failures.append((url, describe_failure(err)))
            errors.append(err)
            not_found &= isinstance(err, urllib.error.HTTPError) and err.code == 404
    error = only_certificate_failures(errors) or only_html_pages(errors) or DownloadError(
        _failure_message(destination, failures, advice, errors))
    error.not_found = not_found  # every source answered 404: the file does not exist there
    statuses = {err.code if isinstance(err, urllib.error.HTTPError) else None for err in errors}
    error.http_status = statuses.pop() if len(statuses) == 1 else None
    raise error


def download_file(url, destination, *, expected_size=None, sha256=None, timeout=TIMEOUT_S,
                  chunk_size=CHUNK_SIZE, kind=None, mirror_setting=None, label=None, auth_token=None):
    """Download `url` to `destination` through `<destination>.part`, resuming that if present.

    The temporary file is renamed to `destination` only once its size matches the size the
    server announced, and `expected_size` and `sha256` when given, and its content passes the
    check for its kind (file_checks.py: `kind`, else by the destination's name). A cut
    download raises DownloadError (or urllib's errors) and leaves the partial file for the
    next attempt to resume; a file of the wrong size, hash or content is deleted, since this
    source serves another file. An HTML answer (by its content type or its first bytes) is an
    HtmlPageError before anything is written, the partial file left as it was. `label` names
    the file in those errors (default: the destination's name). `auth_token` is sent as
    `Authorization: Bearer` to the URL's own server only (see the module's docstring).
    """
    destination = Path(destination)
    label = label or destination.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + PART_SUFFIX)
    for _ in range(2):  # a second pass only after discarding a partial file the server rejects
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "gpt_download.py"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        if auth_token:  # an unredirected header: open_url keeps it on this server only
            request.add_unredirected_header("Authorization", f"Bearer {auth_token}")
        try:
            response = open_url(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # the partial file is not a prefix of this file
                err.close()
                remove_file(part)
                continue
            raise
        with response:
            if is_html_content_type(response.headers.get("Content-Type")):
                raise html_page_error(url, label, mirror_setting)
            length = _int_header(response, "Content-Length")
            if offset and response.status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    remove_file(part)
                    continue
                if total is None and length is not None:
                    total = offset + length
                mode = "ab"
            else:  # 200: the server ignored the Range header, so start again from zero
                offset, total, mode = 0, length, "wb"
            first = response.read(chunk_size)  # looked at before the partial file is touched
            if mode == "wb" and looks_like_html(first):
                raise html_page_error(url, label, mirror_setting)
            if expected_size is not None and total is not None and total != expected_size:
                remove_file(part, missing_ok=True)
                raise DownloadError(_wrong_size(destination, total, expected_size))
            with (
                open(part, mode) as file,
                tqdm(
                    total=total, initial=offset, unit="iB", unit_scale=True, desc=destination.name
                ) as progress,
            ):
                chunk = first
                while chunk:
                    file.write(chunk)
                    progress.update(len(chunk))
                    chunk = response.read(chunk_size)
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"incomplete download: {size:,} of {total:,} bytes")
        if expected_size is not None and size != expected_size:
            remove_file(part)
            raise DownloadError(_wrong_size(destination, size, expected_size))
        if sha256 is not None and (digest := file_sha256(part)) != sha256:
            remove_file(part)
            raise DownloadError(f"{destination.name} has sha256 {digest}, expected {sha256}")
        kind = kind or kind_of(destination.name)
        if problem := file_problem(part, kind):  # whole, but is it what its name says?
            remove_file(part)
            if problem == "an HTML page":
                raise html_page_error(url, label, mirror_setting)
            raise BadContentError(f"{label} is not {describe(kind)} ({problem})")
        replace_file(part, destination)  # retried while Windows' virus scan holds it
        return destination
    raise DownloadError("the server rejected resuming the partial download twice")


def file_sha256(path):
    """The sha256 hex digest of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _wrong_size(destination, size, expected_size):
    return f"serves {size:,} bytes for {destination.name}, expected {expected_size:,} bytes"


def _int_header(response, name):
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


def _parse_content_range(value):
    """`bytes 100-199/200` -> (100, 200); the total is None when the server sends `*`."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    total = match.group(2)
    return int(match.group(1)), None if total == "*" else int(total)


def only_certificate_failures(errors):
    """The first of `errors` when every one is a CertificateError (one line says it all), else None."""
    if errors and all(isinstance(err, CertificateError) for err in errors):
        return errors[0]
    return None


def only_html_pages(errors):
    """The first of `errors` when every one is an HtmlPageError (one line says it all), else None."""
    if errors and all(isinstance(err, HtmlPageError) for err in errors):
        return errors[0]
    return None


def retry_advice(errors):
    """What to do after `errors`: the certificate fix when a certificate failed, else the network."""
    if any(isinstance(err, CertificateError) for err in errors):
        return CERTIFICATE_ADVICE + " Then run it again"
    return "Check your internet connection and run it again"


def describe_failure(err):
    """One line on why a download failed, for a list of the sources tried."""
    if isinstance(err, CertificateError):
        return err.reason
    if isinstance(err, HtmlPageError):  # its message starts with the URL, already listed
        return f"answered with an HTML page ({HTML_ADVICE})"
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot connect: {err.reason}"
    if isinstance(err, DownloadError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _failure_message(destination, failures, advice, errors=()):
    tried = "\n".join(f"  {url}: {reason}" for url, reason in failures)
    return (
        f"could not download {destination.name!r} from any source. Tried:\n{tried}\n"
        f"{retry_advice(errors)} (a partial download resumes), "
        f"{advice + ', ' if advice else ''}or place the file by hand in {destination.parent}."
    )
