"""The finetuning command: `python -m instructkit.finetune`, the same as
`python gpt_instruction_finetuning.py`.

Both parse the flags of instructkit/finetune_config.py and run the chapter's script,
`gpt_instruction_finetuning.main`; problems a user can fix are one line with the exit codes
of instructkit/errors.py. `python -m instructkit.finetune --help` lists every flag.
"""

import sys

from gpt_instruction_finetuning import main
from instructkit.finetune_config import run_finetune_command


def cli(argv=None):
    """Run the command with `argv` (sys.argv when None); return the exit code."""
    return run_finetune_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
