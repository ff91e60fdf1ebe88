"""Instruction data as practitioners bring it: validated entries and the chapter's split.

Not in the book: the book's `download_and_load_file` trusts the file. Here a malformed entry
is an error that names the entry and the key, before any model is built, and
`load_instruction_file` downloads a missing file from several sources (GitHub, then a CDN
mirror), checks its sha256 and validates it before it gets its name. `format_input`, the
chapter's prompt, is here too, for the package's code that must not import torch.
"""

import json
from pathlib import Path
from typing import NamedTuple

from instructkit.errors import BadInputError
from instructkit.file_checks import check_reusable

REQUIRED_KEYS = ("instruction", "input", "output")


class DatasetError(BadInputError):
    """The instruction data is not a JSON list of {instruction, input, output} strings."""


def validate_entries(data, source="dataset", keys=REQUIRED_KEYS):
    """Raise DatasetError naming the first bad entry; return the data unchanged.

    Each entry must be an object with a string under every one of `keys`.
    """
    if not isinstance(data, list):
        raise DatasetError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{source}: the list of entries is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{source}: entry {i} is not a JSON object (got {type(entry).__name__})")
        for key in keys:
            if key not in entry:
                raise DatasetError(f"{source}: entry {i} has no '{key}' key")
            if not isinstance(entry[key], str):
                raise DatasetError(
                    f"{source}: entry {i}: '{key}' must be a string, "
                    f"got {type(entry[key]).__name__}"
                )
    return data


def format_input(entry):
    """The chapter's Alpaca-style prompt for an entry (section 7.2): preamble, instruction, input.

    The same code as `gpt_instruction_finetuning.format_input` and the book's own copy in
    `ollama_evaluate.py` (a test compares the three), kept here so that the package's judge and
    preference-data code build the chapter's prompts without importing torch or a root file.
    """
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )

    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""

    return instruction_text + input_text


def split_data(data, train_frac=0.85, test_frac=0.1):
    """The chapter's split, in order: the first 85% train, the next 10% test, the rest validation."""
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    for name, split in (("training", train_data), ("test", test_data), ("validation", val_data)):
        if not split:
            raise DatasetError(f"The {name} split is empty: {len(data)} entries are too few "
                               f"(an 85/10/5 split needs at least 10).")
    return train_data, test_data, val_data


# ---- Loading a dataset file, downloading it first when it is missing ----

_REPO_FILE = "rasbt/LLMs-from-scratch/main/ch07"


class KnownDataset(NamedTuple):
    """A public dataset: its file name, the URLs to try in order, its sha256, its keys."""

    file_name: str
    urls: tuple
    sha256: str
    keys: tuple


def _book_urls(path):
    """The GitHub raw URL of a file in the book's repository, then jsDelivr's CDN copy of it."""
    return (f"https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/{path}",
            f"https://cdn.jsdelivr.net/gh/rasbt/LLMs-from-scratch@main/{path}")


# The chapter's 1,100 entries (section 7.2).
CHAPTER_DATASET = KnownDataset(
    "instruction-data.json", _book_urls("ch07/01_main-chapter-code/instruction-data.json"),
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", REQUIRED_KEYS)
# The same entries with a preferred and a rejected response each, for DPO (the chapter's bonus).
PREFERENCE_KEYS = REQUIRED_KEYS + ("chosen", "rejected")
PREFERENCE_DATASET = KnownDataset(
    "instruction-data-with-preference.json",
    _book_urls("ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"),
    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", PREFERENCE_KEYS)


def load_known_dataset(dataset, folder="."):
    """`load_instruction_file` for a KnownDataset kept as `folder/dataset.file_name`."""
    return load_instruction_file(Path(folder) / dataset.file_name, dataset.urls, dataset.sha256,
                                 dataset.keys)


def load_instruction_file(path, sources=None, sha256=None, keys=REQUIRED_KEYS):
    """Read the entries in `path` (JSON list or JSON Lines), downloading it first if missing.

    A missing file is fetched from `sources`, a list of URLs tried in order. A download is
    kept only if its sha256 equals `sha256` (when given) and it parses and validates; then it
    is renamed to `path`, so `path` never holds a bad or partial file. A UTF-8 BOM is fine;
    `input` may be left out (it means an empty input). Raises DatasetError with what to do.
    With `sources`, `path` is a download: when it is there but not JSON (an HTML page, cut
    text), it is moved aside with a line on stderr and downloaded again. Every source
    answering an HTML page is one HtmlPageError (a DownloadError, exit code 1).
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not a data file: name the JSON file inside it")
    if path.is_file() and (not sources or check_reusable(path, "dataset")):
        return parse_instruction_bytes(path.read_bytes(), str(path), keys)
    if not sources:
        raise DatasetError(f"{path} does not exist")

    from instructkit.downloads import (
        DownloadError,
        describe_failure,
        download_file,
        file_sha256,
        only_certificate_failures,
        only_html_pages,
        retry_advice,
    )
    from instructkit.safe_files import remove_file, replace_file

    download = path.with_name(path.name + ".download")  # its .part file resumes a cut download
    failures, errors = [], []
    for url in sources:
        try:
            download_file(url, download, kind="dataset", label=path.name)
            if sha256 is not None and (digest := file_sha256(download)) != sha256:
                raise DatasetError(f"sha256 {digest} is not the known {sha256} of {path.name}: "
                                   "this source serves another file")
            data = parse_instruction_bytes(download.read_bytes(), f"{path.name} from {url}", keys)
        except (OSError, DownloadError, DatasetError) as err:
            remove_file(download, missing_ok=True)
            failures.append(f"  {url}: {err if isinstance(err, DatasetError) else describe_failure(err)}")
            errors.append(err)
            continue
        replace_file(download, path)  # retried while Windows' virus scan holds it
        return data
    if one_cause := only_certificate_failures(errors) or only_html_pages(errors):
        raise one_cause  # one line: the certificate or the captive portal, what to do (exit code 1)
    tried = "\n".join(failures)
    raise DatasetError(
        f"could not download {path.name} from any source. Tried:\n{tried}\n"
        f"{retry_advice(errors)}, or download it by hand from one of "
        f"those URLs and save it as {path}."
    )


def parse_instruction_bytes(data, source, keys=REQUIRED_KEYS):
    """Entries from the bytes of a JSON list or a JSON Lines file, validated (see above)."""
    data = data.removeprefix(b"\xef\xbb\xbf")  # the BOM some Windows editors write
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8") from None
    if text.lstrip().startswith("<"):
        raise DatasetError(f"{source}: an HTML page, not JSON (an error or login page?)")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        entries = _json_lines(text, source, err)
    if isinstance(entries, list) and "input" in keys:  # an optional input means an empty one
        entries = [{"input": "", **e} if isinstance(e, dict) else e for e in entries]
    return validate_entries(entries, source, keys)


def _json_lines(text, source, json_error):
    """Entries of a JSON Lines file; a text that is not JSON Lines either gets the JSON error."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) < 2:
        raise DatasetError(f"{source}: not valid JSON ({json_error})") from None
    entries = []
    for n, line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == lines[0][0]:  # not even the first line parses: report it as JSON
                raise DatasetError(f"{source}: not valid JSON ({json_error})") from None
            raise DatasetError(f"{source}: line {n} is not valid JSON Lines ({err})") from None
    return entries
