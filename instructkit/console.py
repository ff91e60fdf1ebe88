"""UTF-8 in and out for the command lines, whatever the locale, and prints that never crash.

Not in the book. On Windows, output redirected to a file or a pipe uses the ANSI code page
(cp1252 and the like), and so does redirected input; on POSIX a C or POSIX locale can mean
ASCII. The chapter's data has Cyrillic, and a model may answer in any script, so a print of
such text would raise UnicodeEncodeError in the middle of a run. Each command calls
`use_utf8_console()` once, first thing: then stdout and stderr write UTF-8 and stdin reads
UTF-8. `read_stdin()` drops the byte order mark some Windows tools put first. `print_text()`
is for code that also runs where no command set up the console (a notebook, an IDE, a
reader's own script): a character the stream cannot encode is printed as "?" instead.
Standard library only.
"""

import codecs
import contextlib
import io
import os
import sys

BOM = "\ufeff"  # the byte order mark, as text after decoding


def _is_utf8(encoding):
    try:
        return codecs.lookup(encoding or "ascii").name == "utf-8"
    except LookupError:
        return False


def _reconfigure(stream):
    """Switch a text stream to UTF-8, keeping its error handler; leave other streams alone.

    Streams without `reconfigure` (pytest's captured input, a notebook's output) are left as
    they are, and so is a stream that has already been read from (Python forbids the change).
    """
    if stream is None or _is_utf8(getattr(stream, "encoding", None)):
        return
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is None:
        return
    with contextlib.suppress(ValueError, io.UnsupportedOperation, OSError):  # already read
        reconfigure(encoding="utf-8", errors=getattr(stream, "errors", None) or "strict")


def use_utf8_console():
    """Make sys.stdout and sys.stderr write UTF-8 and sys.stdin read it (see the module).

    Safe to call more than once; streams that cannot change are left as they are.
    """
    for stream in (sys.stdout, sys.stderr, sys.stdin):
        _reconfigure(stream)


def read_stdin(stream=None):
    """All of stdin (or `stream`) as text, without a leading byte order mark."""
    text = (sys.stdin if stream is None else stream).read()
    return text.removeprefix(BOM)


def print_text(*values, file=None, **kwargs):
    """`print`, except that characters `file` cannot encode come out as "?" instead of
    raising UnicodeEncodeError (a sample printed during training must not end the run)."""
    file = sys.stdout if file is None else file
    try:
        print(*values, file=file, **kwargs)
    except UnicodeEncodeError:
        encoding = getattr(file, "encoding", None) or "ascii"
        sep, end = kwargs.pop("sep", " "), kwargs.pop("end", "\n")
        text = (" " if sep is None else sep).join(map(str, values)) + ("\n" if end is None else end)
        safe = text.encode(encoding, errors="replace").decode(encoding, errors="replace")
        print(safe, file=file, end="", **kwargs)


def end_of_input_keys(os_name=None):
    """What a person types at a terminal to end the input (leave the chat, give up a prompt):
    Ctrl-Z then Enter on Windows, Ctrl-D elsewhere. os_name: `os.name` unless given."""
    return "Ctrl-Z then Enter" if (os_name or os.name) == "nt" else "Ctrl-D"
