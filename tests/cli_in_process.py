"""The finetuning command line in this process: what `python gpt_instruction_finetuning.py ARGV`
does, without the seconds a fresh interpreter spends importing torch, matplotlib and the rest.

The script's `__main__` block is `sys.exit(run_finetune_command(main))`; `run_finetune` makes
the same call with stdout and stderr captured (optionally under a given umask, in a given
working folder, with one torch thread as `OMP_NUM_THREADS=1` gives a subprocess) and returns
what `subprocess.run(..., capture_output=True, text=True)` would: an object with returncode,
stdout and stderr. SystemExit (argparse's usage errors) gives its exit status; an unexpected
exception, which a subprocess would print as a traceback with exit code 1, propagates instead
and fails the test just the same.

Tests that need a real process keep their subprocess: a signal, a terminal, a kill, a fresh
tiktoken cache, torchrun, or the script started exactly as a reader starts it.
"""

import contextlib
import io
import os
from types import SimpleNamespace


def run_finetune(*argv, umask=None, cwd=None, one_thread=False):
    """`python gpt_instruction_finetuning.py *argv`, run in this process."""
    import torch

    import gpt_instruction_finetuning as gif
    from instructkit.finetune_config import run_finetune_command

    out, err = io.StringIO(), io.StringIO()
    saved_umask = None if umask is None else os.umask(umask)
    saved_cwd = os.getcwd()
    saved_threads = torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        if one_thread:
            torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_finetune_command(gif.main, [str(a) for a in argv])
            except SystemExit as exit_:  # argparse's usage errors: exit 2, as the script's
                code = exit_code(exit_)
    finally:
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
        if saved_umask is not None:
            os.umask(saved_umask)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def exit_code(exit_):
    """The exit status a process ending with SystemExit `exit_` gets (as the interpreter does
    it: None is 0, a message is printed to stderr with status 1)."""
    import sys

    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(exit_.code, file=sys.stderr)
    return 1
