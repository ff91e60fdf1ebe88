"""Resumable, verified downloads: a file gets its final name only once it is whole.

Not in the book. `download_file(url, destination)` downloads through `<destination>.part`,
resumes that partial file on the next attempt (HTTP Range), and checks the size the server
announced and, when given, an expected size and sha256. `download_first(urls, destination)`
tries a list of sources in order. Used for GPT-2's weights (gpt2_weights.py, hub.py),
the instruction datasets (instruction_data.py) and the test data (tests/conftest.py).
"""

import hashlib
import http.client
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from instructkit.errors import CheckpointError, DownloadError  # noqa: F401 (raised here, importable)
from instructkit.safe_files import remove_file, replace_file

TIMEOUT_S = 30  # per connection attempt and per read, not for the whole file
CHUNK_SIZE = 1 << 20
PART_SUFFIX = ".part"


def download_first(urls, destination, *, expected_size=None, sha256=None, advice=None):
    """Download `destination` from the first of `urls` that delivers it whole (and verified).

    A cut download resumes from the next URL; a file of the wrong size or sha256 is dropped
    and the next URL tried. Raises DownloadError listing every URL and why it failed.
    """
    failures, not_found = [], True
    for url in urls:
        try:
            return download_file(url, destination, expected_size=expected_size, sha256=sha256)
        except (OSError, http.client.HTTPException, DownloadError) as err:
            failures.append((url, describe_failure(err)))
            not_found &= isinstance(err, urllib.error.HTTPError) and err.code == 404
    error = DownloadError(_failure_message(destination, failures, advice))
    error.not_found = not_found  # every source answered 404: the file does not exist there
    raise error


def download_file(url, destination, *, expected_size=None, sha256=None, timeout=TIMEOUT_S,
                  chunk_size=CHUNK_SIZE):
    """Download `url` to `destination` through `<destination>.part`, resuming that if present.

    The temporary file is renamed to `destination` only once its size matches the size the
    server announced, and `expected_size` and `sha256` when given. A cut download raises
    DownloadError (or urllib's errors) and leaves the partial file for the next attempt to
    resume; a file of the wrong size or hash is deleted, since this source serves another file.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + PART_SUFFIX)
    for _ in range(2):  # a second pass only after discarding a partial file the server rejects
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "gpt_download.py"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # the partial file is not a prefix of this file
                err.close()
                remove_file(part)
                continue
            raise
        with response:
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
            if expected_size is not None and total is not None and total != expected_size:
                remove_file(part, missing_ok=True)
                raise DownloadError(_wrong_size(destination, total, expected_size))
            with (
                open(part, mode) as file,
                tqdm(
                    total=total, initial=offset, unit="iB", unit_scale=True, desc=destination.name
                ) as progress,
            ):
                while chunk := response.read(chunk_size):
                    file.write(chunk)
                    progress.update(len(chunk))
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"incomplete download: {size:,} of {total:,} bytes")
        if expected_size is not None and size != expected_size:
            remove_file(part)
            raise DownloadError(_wrong_size(destination, size, expected_size))
        if sha256 is not None and (digest := file_sha256(part)) != sha256:
            remove_file(part)
            raise DownloadError(f"{destination.name} has sha256 {digest}, expected {sha256}")
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


def describe_failure(err):
    """One line on why a download failed, for a list of the sources tried."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"cannot connect: {err.reason}"
    if isinstance(err, DownloadError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _failure_message(destination, failures, advice):
    tried = "\n".join(f"  {url}: {reason}" for url, reason in failures)
    return (
        f"could not download {destination.name!r} from any source. Tried:\n{tried}\n"
        "Check your internet connection and run it again (a partial download resumes), "
        f"{advice + ', ' if advice else ''}or place the file by hand in {destination.parent}."
    )
