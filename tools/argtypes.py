"""argparse `type=` functions that refuse a bad value at start-up.

argparse turns the ArgumentTypeError into one line naming the flag (`argument --max-side: 0 is
not allowed: expected an integer >= 1`) and exit code 2, before any work starts. Shared by every
`mimpipe` command, so the same kind of flag is checked and worded the same way everywhere.
"""
from __future__ import annotations

import argparse
import math

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "unit_float", "float_range", "int_range"]


def _bad(s: str, allowed: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{s!r} is not allowed: expected {allowed}")


def int_range(lo: int | None = None, hi: int | None = None):
    """An integer in [lo, hi] (either bound may be None: unbounded on that side)."""
    allowed = ("an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
               + (f" <= {hi}" if hi is not None and lo is None else "")
               + (f" in {lo}..{hi}" if lo is not None and hi is not None else ""))

    def parse(s: str) -> int:
        try:
            v = int(s, 10)
        except (TypeError, ValueError):
            raise _bad(s, allowed) from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(s, allowed)
        return v

    parse.__name__ = f"int_range({lo}, {hi})"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False):
    """A finite float in [lo, hi] (open ends with lo_open / hi_open; a None bound is unbounded)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    allowed = "a number" + (" " + " and ".join(parts) if parts else "")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise _bad(s, allowed) from None
        if not math.isfinite(v):
            raise _bad(s, allowed)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _bad(s, allowed)
        if hi is not None and (v >= hi if hi_open else v > hi):
            raise _bad(s, allowed)
        return v

    parse.__name__ = f"float_range({lo}, {hi})"
    return parse


positive_int = int_range(1)
positive_int.__name__ = "positive_int"
positive_int.__doc__ = "An integer >= 1 (counts, sizes, batch sizes)."

nonneg_int = int_range(0)
nonneg_int.__name__ = "nonneg_int"
nonneg_int.__doc__ = "An integer >= 0 (seeds, epochs to skip, ranks)."

positive_float = float_range(0.0, lo_open=True)
positive_float.__name__ = "positive_float"
positive_float.__doc__ = "A finite number > 0 (learning rates, timeouts)."

unit_float = float_range(0.0, 1.0)
unit_float.__name__ = "unit_float"
unit_float.__doc__ = "A number in [0, 1] (probabilities, ratios)."

nonneg_float = float_range(0.0)
nonneg_float.__name__ = "nonneg_float"
nonneg_float.__doc__ = "A finite number >= 0 (loss weights, weight decay, warm-up epochs)."
