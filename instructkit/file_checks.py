"""What a downloaded file must look like, checked before it gets its final name or is reused.

Not in the book. A size and a sha256 say a download is whole, but a captive portal, a login
page or a proxy's error page answers "200 OK" with an HTML page of its own size. So every
file the package downloads is also checked for what it is, by its name, cheaply (headers and
footers, never a full read of gigabytes):
- any file: not an HTML page (`looks_like_html`, on its first bytes);
- `.safetensors`: an 8-byte little-endian header length, then that much JSON whose tensors
  (dtype, shape, data_offsets) fill the rest of the file exactly;
- `.json` (config.json, encoder.json, vocab.json, hparams.json, the datasets): parses as
  JSON (the datasets may be JSON Lines, kind "dataset"); `.jsonl`: every line parses;
- `merges.txt` and `vocab.bpe`: GPT-2's BPE merges (an optional `#version` line, then lines
  of two tokens separated by one space);
- OpenAI's TensorFlow checkpoint: `checkpoint` names a `model_checkpoint_path`; the `.index`
  table ends with its footer (two block handles inside the file, then the magic number
  0xdb4775248b80fb57); the `.meta` graph's top-level protobuf fields end exactly at the end
  of the file, and one of them is the graph;
- `.pth`: a zip archive (torch.save's format) or a pickle.
`file_problem(path)` says what is wrong, or None; `check_reusable(path)` is the check for a
file already on disk: a bad one is moved aside (`<name>.bad`, `.bad-1`, ...) with one line on
stderr, so that the caller downloads it again. downloads.download_file runs `file_problem` on
its `.part` file before the rename.
"""

import json
import struct
import sys
from pathlib import Path

HTML_STARTS = (b"<!doctype html", b"<html")
HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")
SNIFF_BYTES = 1024  # how much of a file's start is read to spot an HTML page
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                           "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
TF_TABLE_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)  # the last 8 bytes of a TensorFlow table
TF_FOOTER_BYTES = 48  # two block handles (varints, padded to 40 bytes), then the magic number
TF_BLOCK_TRAILER_BYTES = 5  # each block is followed by its compression type and a CRC32
META_GRAPH_FIELD = 2  # MetaGraphDef.graph_def
HTML_ADVICE = "a captive portal, a login page or a proxy's error?"


def looks_like_html(first_bytes):
    """Whether a body starting with `first_bytes` is an HTML page (after a BOM and whitespace)."""
    start = first_bytes.removeprefix(b"\xef\xbb\xbf").lstrip()[:16].lower()
    return start.startswith(HTML_STARTS)


def is_html_content_type(content_type):
    """Whether a Content-Type header value (e.g. 'text/html; charset=utf-8') announces HTML."""
    return (content_type or "").split(";")[0].strip().lower() in HTML_CONTENT_TYPES


def kind_of(name):
    """The kind of check a file named `name` gets (see the module's docstring), or None (only
    the HTML check)."""
    name = Path(name).name
    if name in ("merges.txt", "vocab.bpe"):
        return "merges"
    if name == "checkpoint":
        return "tf-checkpoint"
    for suffix, kind in ((".safetensors", "safetensors"), (".json", "json"), (".jsonl", "json-lines"),
                         (".index", "tf-index"), (".meta", "tf-meta"), (".pth", "pth")):
        if name.endswith(suffix):
            return kind
    return None


DESCRIPTIONS = {
    "safetensors": "a safetensors file", "json": "a JSON file", "json-lines": "a JSON Lines file",
    "dataset": "a JSON or JSON Lines file", "merges": "a file of BPE merges",
    "tf-checkpoint": "TensorFlow's checkpoint list", "tf-index": "a TensorFlow checkpoint index",
    "tf-meta": "a TensorFlow meta graph", "pth": "a PyTorch file", None: "the file",
}


def describe(kind):
    """'a safetensors file', ... for the kind of check; for messages."""
    return DESCRIPTIONS[kind]


def file_problem(path, kind=None):
    """What is wrong with the file at `path` for its kind (`kind`, else by its name), as a
    short phrase, or None when it passes. "an HTML page" for an HTML page, whatever the kind."""
    path = Path(path)
    kind = kind or kind_of(path.name)
    with open(path, "rb") as file:
        if looks_like_html(file.read(SNIFF_BYTES)):
            return "an HTML page"
        file.seek(0)
        size = path.stat().st_size
        check = CHECKS.get(kind)
        return check(file, size) if check else None


def _read_text(file, size):
    data = file.read(size).removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"


def _check_json(file, size):
    text, problem = _read_text(file, size)
    if problem:
        return problem
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err})"
    return None


def _check_json_lines(file, size):
    text, problem = _read_text(file, size)
    if problem:
        return problem
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        return "empty"
    for n, line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {n} is not valid JSON ({err})"
    return None


def _check_dataset(file, size):
    """A dataset is a JSON list, or JSON Lines (instruction_data.py reads both)."""
    problem = _check_json(file, size)
    if problem is None:
        return None
    file.seek(0)
    return None if _check_json_lines(file, size) is None else problem


def _check_merges(file, size):
    text, problem = _read_text(file, size)
    if problem:
        return problem
    lines = text.split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = 0
    for n, line in enumerate(lines, start=2 if text.startswith("#version") else 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            return f"line {n} is not two tokens separated by a space: {line[:40]!r}"
        merges += 1
    return None if merges else "no merges in it"


def _check_tf_checkpoint(file, size):
    text, problem = _read_text(file, min(size, 1 << 20))
    if problem:
        return problem
    if not any(line.startswith("model_checkpoint_path:") for line in text.splitlines()):
        return "no 'model_checkpoint_path:' line"
    return None


def _check_safetensors(file, size):
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    (header_size,) = struct.unpack("<Q", file.read(8))
    if header_size == 0 or header_size > min(size - 8, MAX_SAFETENSORS_HEADER):
        return f"its header length {header_size:,} does not fit the file's {size:,} bytes"
    try:
        header = json.loads(file.read(header_size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its header is not JSON ({err})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_size, end_max = size - 8 - header_size, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"the entry for {name!r} is not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            return f"{name!r} has an unknown dtype {dtype!r}"
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return f"{name!r} has a bad shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
            return f"{name!r} has data_offsets {offsets!r} outside the file's {data_size:,} data bytes"
        count = 1
        for dim in shape:
            count *= dim
        if offsets[1] - offsets[0] != count * SAFETENSORS_DTYPE_BYTES[dtype]:
            return f"{name!r} has {offsets[1] - offsets[0]:,} bytes for shape {shape} of {dtype}"
        end_max = max(end_max, offsets[1])
    if end_max != data_size:
        return f"its tensors take {end_max:,} bytes but {data_size:,} follow the header"
    return None


def _read_varint(data, pos):
    """(value, next position) of the protobuf/LevelDB varint at `pos`; ValueError past the end."""
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("cut varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _check_tf_index(file, size):
    if size < TF_FOOTER_BYTES:
        return f"{size} bytes, shorter than a table's footer"
    file.seek(size - TF_FOOTER_BYTES)
    footer = file.read(TF_FOOTER_BYTES)
    if footer[-8:] != TF_TABLE_MAGIC:
        return "no table magic number at its end (cut or not a checkpoint index)"
    pos = 0
    try:
        for _ in range(2):  # the metaindex block, then the index block
            offset, pos = _read_varint(footer, pos)
            length, pos = _read_varint(footer, pos)
            if offset + length + TF_BLOCK_TRAILER_BYTES > size - TF_FOOTER_BYTES:
                return "its footer points past the end of the file"
    except ValueError:
        return "its footer is damaged"
    return None


def _check_tf_meta(file, size):
    """Walk the top-level fields of the MetaGraphDef: they must end exactly at the end."""
    pos, fields = 0, set()
    while pos < size:
        file.seek(pos)
        head = file.read(20)
        try:
            tag, after = _read_varint(head, 0)
            number, wire = tag >> 3, tag & 7
            if number == 0 or wire not in (0, 1, 2, 5):
                return f"not a protobuf message (field {number}, wire type {wire} at byte {pos})"
            if wire == 0:
                _, after = _read_varint(head, after)
            elif wire == 2:
                length, after = _read_varint(head, after)
                after += length
            else:
                after += 8 if wire == 1 else 4
        except ValueError:
            return f"cut at byte {pos}"
        pos += after
        fields.add(number)
    if pos != size:
        return f"cut: its last field ends at byte {pos:,}, past its {size:,} bytes"
    if META_GRAPH_FIELD not in fields:
        return "no graph in it"
    return None


def _check_pth(file, size):
    start = file.read(4)
    if start == b"PK\x03\x04" or start[:1] == b"\x80":  # torch.save's zip, or an older pickle
        return None
    return "neither a zip archive (torch.save) nor a pickle"


CHECKS = {"safetensors": _check_safetensors, "json": _check_json, "json-lines": _check_json_lines,
          "dataset": _check_dataset, "merges": _check_merges, "tf-checkpoint": _check_tf_checkpoint,
          "tf-index": _check_tf_index, "tf-meta": _check_tf_meta, "pth": _check_pth}


def check_reusable(path, kind=None):
    """Whether the file at `path` can be used as it is; a bad one is moved aside.

    False when there is no file. Its size is not checked (a file placed by hand may be another
    release of it); its content is, as a download's. A file that fails is renamed to `<name>.bad`
    (or `.bad-1`, ...), with one line on stderr saying why, and False is returned, so the
    caller downloads it again.
    """
    path = Path(path)
    if not path.is_file():
        return False
    problem = file_problem(path, kind)
    if problem is None:
        return True
    from instructkit.safe_files import move_aside

    aside = move_aside(path, "bad")
    print(f"{path} is not {describe(kind or kind_of(path.name))} ({problem}): moved it aside to "
          f"{aside.name} and downloading it again", file=sys.stderr, flush=True)
    return False

