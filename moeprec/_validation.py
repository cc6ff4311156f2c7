"""Argument checks shared by every public entry point.

Each check raises ValueError/TypeError whose message names the argument, what was expected and
what came (SPEC section 6).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    optional: bool = False,
) -> None:
    """Check that `t` is a tensor of the given rank, dtype, shape (None = any size) and device."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({expected}), got {t.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        for want, got in zip(shape, t.shape):
            if want is not None and want != got:
                pretty = tuple("*" if s is None else s for s in shape)
                raise ValueError(f"{name}: expected shape {pretty}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_floating(name: str, t: Any, *, optional: bool = False) -> None:
    """A floating tensor (integer and boolean inputs are a TypeError)."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, optional=optional)


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name}: expected {kind} int, got {value}")


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
