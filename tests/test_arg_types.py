"""instructkit/arg_types.positive: the number types of check_data's and judge_cli's flags."""

import argparse

import pytest

from instructkit.arg_types import positive


@pytest.mark.parametrize("kind, most, text, value", [
    (int, None, "3", 3), (float, None, "0.5", 0.5), (float, 1, "1", 1.0), (float, 86400, "2.5", 2.5),
])
def test_values_in_range_pass(kind, most, text, value):
    assert positive(kind, most)(text) == value


@pytest.mark.parametrize("kind, most, text, message", [
    (int, None, "0", "must be at least 1, got 0"),
    (int, None, "2.5", "expected a whole number, got '2.5'"),
    (float, None, "-1", "must be above 0, got -1"),
    (float, None, "nan", "must be above 0, got nan"),
    (float, None, "inf", "must be above 0, got inf"),
    (float, None, "abc", "expected a number, got 'abc'"),
    (float, 1, "1.5", "must be above 0 and at most 1, got 1.5"),
    (float, 1, "0", "must be above 0 and at most 1, got 0"),
])
def test_values_out_of_range_say_what_the_flag_takes(kind, most, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        positive(kind, most)(text)
    assert str(error.value) == message
