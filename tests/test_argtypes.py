"""tools/argtypes: the shared argparse range checks."""
from __future__ import annotations

import argparse
import re

import pytest

from mimpipe.tools.argtypes import float_range, int_range, nonneg_int, positive_float, positive_int, unit_float


def test_accepted_values():
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and int_range(-2, 2)("-2") == -2
    assert positive_float("1e-4") == 1e-4 and unit_float("0") == 0.0 and unit_float("1") == 1.0
    assert float_range(0.5, 2)("2") == 2.0 and float_range(None, 0)("-7.5") == -7.5


@pytest.mark.parametrize("fn, value, says", [
    (positive_int, "0", "'0' is not allowed: expected an integer >= 1"),
    (positive_int, "-3", "expected an integer >= 1"),
    (positive_int, "2.5", "expected an integer >= 1"),
    (positive_int, "", "expected an integer >= 1"),
    (nonneg_int, "-1", "expected an integer >= 0"),
    (int_range(1, 8), "9", "expected an integer in 1..8"),
    (int_range(None, 8), "9", "expected an integer <= 8"),
    (positive_float, "0", "expected a number > 0"),
    (positive_float, "nan", "expected a number > 0"),
    (positive_float, "inf", "expected a number > 0"),
    (unit_float, "1.5", "expected a number >= 0 and <= 1"),
    (unit_float, "-0.1", "expected a number >= 0 and <= 1"),
    (float_range(0, 1, hi_open=True), "1", "expected a number >= 0 and < 1"),
    (float_range(0.1, 10), "x", "'x' is not allowed: expected a number >= 0.1 and <= 10"),
])
def test_refused_values_name_the_allowed_range(fn, value, says):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
        fn(value)


def test_argparse_reports_one_line_with_the_flag(capsys):
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "x: error: argument --n: '0' is not allowed: expected an integer >= 1"
