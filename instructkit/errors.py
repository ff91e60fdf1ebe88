"""The problems a user can fix, as one small hierarchy, and how a command reports them.

An `ExpectedError` is a problem with what the user gave or has (data, flags, files, the disk,
a download, a server): a command prints its message as one line, `error: ...`, and exits with
its `exit_code`. Anything else is a bug, in this project or in a reader's modified model, and
keeps its traceback: a student who breaks the model in an exercise needs to see where.

Exit codes, the same for every command:
  0 done; 1 a download, a server or the network failed; 2 bad input (data, flags, files,
  a device, a checkpoint that does not fit); 130 Ctrl-C; 143 SIGTERM.
An OSError that reaches a command (a permission, a file system that fails) is one line too,
exit code 1; `--debug` shows its traceback.
"""

import sys
import traceback

EXIT_FAILED = 1  # a download, a server or the network
EXIT_BAD_INPUT = 2  # data, flags, files, a device, a checkpoint


class ExpectedError(Exception):
    """A problem the user can fix; a command prints the message alone."""

    exit_code = EXIT_FAILED


class BadInputError(ExpectedError):
    """Data, flags, files or a device the run cannot use."""

    exit_code = EXIT_BAD_INPUT


class DownloadError(ExpectedError):
    """A file could not be downloaded from any of its sources."""


class CheckpointError(BadInputError):
    """Saved weights or a training checkpoint that are missing, damaged, or of another run."""


def run_command(main, debug=False):
    """Call `main()` and return the process's exit code, reporting problems as the module says.

    SIGTERM stops the command as Ctrl-C does; `main` says what it saved.
    """
    from instructkit.run_guard import exit_code, os_error_line, signals_interrupt

    try:
        with signals_interrupt():
            result = main()
    except ExpectedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    return result if isinstance(result, int) else 0
