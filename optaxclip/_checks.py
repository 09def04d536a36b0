"""Argument validation shared by every transform.

Only static Python numbers are checked: arrays (for example hyperparameters
injected by `optax.inject_hyperparams`) may be traced and pass unchecked.
"""

from __future__ import annotations

import numbers
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(fn: str, name: str, value: Any) -> None:
    """Raises unless `value` is > 0 (NaN fails too); arrays pass."""
    if isinstance(value, bool) or (_is_number(value) and not value > 0):
        raise ValueError(f"{fn}: `{name}` must be > 0, got {name}={value!r}.")


def non_negative(fn: str, name: str, value: Any) -> None:
    """Raises unless `value` is >= 0 (NaN fails too); arrays pass."""
    if isinstance(value, bool) or (_is_number(value) and not value >= 0):
        raise ValueError(f"{fn}: `{name}` must be >= 0, got {name}={value!r}.")


def finite(fn: str, name: str, value: Any) -> None:
    """Raises if `value` is a NaN or infinite Python number; arrays pass."""
    if isinstance(value, bool) or (_is_number(value) and not abs(value) < float("inf")):
        raise ValueError(f"{fn}: `{name}` must be a finite number, got {name}={value!r}.")


def params_given(fn: str, params: Any) -> None:
    """Raises if a transform that needs `params` was called without them."""
    if params is None:
        raise ValueError(f"{fn}: `params` must be passed to update(updates, state, params), got params=None.")


def in_range(fn: str, name: str, value: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool):
    """Raises unless `lo < value` (or `<=`) and `value < hi` (or `<=`); arrays pass."""
    if isinstance(value, bool) or not _is_number(value):
        return
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{fn}: `{name}` must be in {interval}, got {name}={value!r}.")


def integer_at_least(fn: str, name: str, value: Any, lo: int) -> None:
    """Raises unless `value` is an int >= `lo`; arrays pass."""
    if isinstance(value, bool) or (_is_number(value) and (int(value) != value or value < lo)):
        raise ValueError(f"{fn}: `{name}` must be an integer >= {lo}, got {name}={value!r}.")


def one_of(fn: str, name: str, value: Any, options: tuple[str, ...]) -> None:
    """Raises unless `value` is one of `options`."""
    if value not in options:
        raise ValueError(f"{fn}: `{name}` must be one of {options}, got {name}={value!r}.")


def ordered(fn: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
    """Raises if static numbers `lo > hi`; arrays pass."""
    if _is_number(lo) and _is_number(hi) and lo > hi:
        raise ValueError(f"{fn}: `{lo_name}` must be <= `{hi_name}`, got {lo_name}={lo!r}, {hi_name}={hi!r}.")
