"""Checks of scalar (non-tensor) arguments: bools and finite real numbers (SPEC 6).

Like `moeprec._validation`, each error names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def check_bool(name: str, value: Any) -> None:
    """A real bool (1, "yes" and numpy bools are refused: flags are spelled True/False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def check_real(name: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> None:
    """A finite real number (bools refused), optionally > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    if non_negative and value < 0:
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
