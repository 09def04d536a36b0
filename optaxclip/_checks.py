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
        raise ValueError(
            f"{fn}: `params` must be passed to update(updates, state, params), got params=None."
        )
