"""Argument validation shared by every transform.

Only static Python numbers are checked: arrays (for example hyperparameters
injected by `optax.inject_hyperparams`) may be traced and pass unchecked.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _static(fn: str, name: str, value: Any) -> Any:
    """`value` as a Python number when it is one or a concrete array; None when traced.

    Raises if it is not a scalar (a list, or an array of any other shape):
    thresholds are scalars, and a vector would scale each column by its own
    factor or change the state's shapes.
    """
    if isinstance(value, bool) or _is_number(value) or value is None:
        return value
    shape = getattr(value, "shape", None)
    if isinstance(value, (list, tuple, dict)) or (shape is not None and tuple(shape) != ()):
        shown = repr(value) if shape is None else f"an array of shape {tuple(shape)}"
        raise ValueError(f"{fn}: `{name}` must be a scalar, got {name}={shown}.")
    if isinstance(value, jax.core.Tracer) or shape is None:
        return None  # traced (e.g. injected by optax.inject_hyperparams): checked by the caller's math
    if jnp.issubdtype(value.dtype, jnp.bool_):
        return bool(value)
    return value.item()


def positive(fn: str, name: str, value: Any) -> None:
    """Raises unless `value` is a scalar > 0 (NaN fails too); traced arrays pass."""
    value = _static(fn, name, value)
    if isinstance(value, bool) or (_is_number(value) and not value > 0):
        raise ValueError(f"{fn}: `{name}` must be > 0, got {name}={value!r}.")


def non_negative(fn: str, name: str, value: Any) -> None:
    """Raises unless `value` is a scalar >= 0 (NaN fails too); traced arrays pass."""
    value = _static(fn, name, value)
    if isinstance(value, bool) or (_is_number(value) and not value >= 0):
        raise ValueError(f"{fn}: `{name}` must be >= 0, got {name}={value!r}.")


def finite(fn: str, name: str, value: Any) -> None:
    """Raises if `value` is not a scalar, or a NaN or infinite number; traced arrays pass."""
    value = _static(fn, name, value)
    if isinstance(value, bool) or (_is_number(value) and not abs(value) < float("inf")):
        raise ValueError(f"{fn}: `{name}` must be a finite number, got {name}={value!r}.")


def params_given(fn: str, params: Any) -> None:
    """Raises if a transform that needs `params` was called without them."""
    if params is None:
        raise ValueError(f"{fn}: `params` must be passed to update(updates, state, params), got params=None.")


def in_range(fn: str, name: str, value: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool):
    """Raises unless `lo < value` (or `<=`) and `value < hi` (or `<=`); traced arrays pass."""
    value = _static(fn, name, value)
    if isinstance(value, bool) or not _is_number(value):
        return
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{fn}: `{name}` must be in {interval}, got {name}={value!r}.")


def integer_at_least(fn: str, name: str, value: Any, lo: int) -> None:
    """Raises unless `value` is an int >= `lo`; traced arrays pass."""
    value = _static(fn, name, value)
    if isinstance(value, bool) or (_is_number(value) and (int(value) != value or value < lo)):
        raise ValueError(f"{fn}: `{name}` must be an integer >= {lo}, got {name}={value!r}.")


def one_of(fn: str, name: str, value: Any, options: tuple[str, ...]) -> None:
    """Raises unless `value` is one of `options`."""
    if value not in options:
        raise ValueError(f"{fn}: `{name}` must be one of {options}, got {name}={value!r}.")


def ordered(fn: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
    """Raises if static numbers `lo > hi`; traced arrays pass."""
    lo, hi = _static(fn, lo_name, lo), _static(fn, hi_name, hi)
    if _is_number(lo) and _is_number(hi) and lo > hi:
        raise ValueError(f"{fn}: `{lo_name}` must be <= `{hi_name}`, got {lo_name}={lo!r}, {hi_name}={hi!r}.")


def positive_finite(fn: str, name: str, value: Any) -> None:
    """Raises unless `value` is a finite scalar > 0; traced arrays pass."""
    positive(fn, name, value)
    finite(fn, name, value)


def prng_key(fn: str, name: str, key: Any) -> None:
    """Raises unless `key` is a typed PRNG key or a legacy `uint32[2]` key array."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype == jnp.uint32 and tuple(getattr(key, "shape", ())) == (2,):
        return
    shown = repr(key) if dtype is None else f"an array of dtype {dtype} and shape {tuple(key.shape)}"
    raise TypeError(
        f"{fn}: `{name}` must be a PRNG key from jax.random.key(seed) (or a legacy "
        f"jax.random.PRNGKey(seed)), got {name}={shown}."
    )


def dp_leaf_dtypes(fn: str, name: str, tree: Any, *, allow_float0: bool) -> None:
    """Raises unless every leaf of `tree` is floating point (or, if allowed, `float0`).

    A DP release must clip and noise every leaf it releases: Gaussian noise
    cannot be represented in an integer or bool leaf (rounding it away would
    release the leaf's sum unnoised), so such leaves are refused, naming
    their paths and dtypes. `float0` leaves (`jax.grad(..., allow_int=True)`
    for integer params) hold no data and are released as they are.
    """
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating) or (allow_float0 and dtype == jax.dtypes.float0):
            continue
        bad.append(f"{name}{jax.tree_util.keystr(path)}: {dtype}")
    if bad:
        raise ValueError(
            f"{fn}: every leaf of `{name}` must be floating point, because a differentially private "
            f"release must clip and noise every leaf and Gaussian noise cannot be represented in an "
            f"integer or bool leaf; got {', '.join(bad)}. Differentiate only the float parameters "
            f"(split the others off, e.g. nnx.split(model, nnx.Param, ...)), or drop the leaf."
        )
