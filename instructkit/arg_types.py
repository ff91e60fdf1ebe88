"""argparse types for numbers in a range, shared by the commands that parse numbers in argparse
itself (check_data, judge_cli): a bad value is argparse's one-line usage error, exit code 2,
naming the flag and what it takes.
"""

import argparse
import math


def positive(kind, most=None):
    """A type for add_argument: `kind(text)` (int or float), finite, above 0 and at most `most`."""
    what = "a whole number" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        low = "at least 1" if kind is int else "above 0"
        if not math.isfinite(value) or not value > 0:
            limits = low if most is None else f"{low} and at most {most}"
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be {low} and at most {most}, got {text}")
        return value

    return parse
