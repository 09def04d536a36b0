"""Argument validation shared by every transform.

Types are checked always, values where they are known:

- A numeric argument is a Python number, a NumPy/JAX scalar (a 0-d array of
  an integer or floating dtype) or a traced scalar (for example a
  hyperparameter that `optax.inject_hyperparams` passes as an array, traced
  under `jax.jit`). Anything else raises a `TypeError` naming the function,
  the argument and the value: a string (a config file's `"1e-3"`), `None`
  where the argument is not optional, a bool (`True` is not the threshold 1),
  a complex number, a list, an array of another shape, an array of bool,
  complex or key dtype. Shapes and dtypes are static under `jax.jit`, so
  traced values are type-checked too.
- Values (> 0, in a range, an integer) are checked where they are concrete:
  a bad value raises a `ValueError`; a traced value is left to the
  transform's math.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REAL = "a real number (a Python int or float, a NumPy/JAX scalar, or a traced scalar)"
_INTEGER = "an integer (a Python int, a NumPy/JAX integer scalar, or a traced scalar)"


def describe(value: Any) -> str:
    """`value` as an error message shows it: its repr (shortened), or an array's shape and dtype."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) != 0:
        return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_real(value: Any) -> bool:
    """Whether `value` is a Python or NumPy real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _type_name(value: Any) -> str:
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, jax.Array))


def _refuse(fn: str, name: str, value: Any, expected: str, why: str) -> TypeError:
    return TypeError(f"{fn}: `{name}` must be {expected}, got {name}={describe(value)} ({why}).")


def number(
    fn: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    concrete: bool = False,
) -> int | float | None:
    """`value` as a Python number; None when it is traced.

    Raises a `TypeError` naming `fn`, `name` and the value unless `value`
    is a Python int or float, a NumPy scalar, or a 0-d JAX/NumPy array
    (concrete or traced) of an integer or floating dtype. With `integer`,
    a floating value is accepted here (its value must be a whole number,
    which `integer_at_least` checks); with `concrete`, a traced value is
    refused (the argument is used on the host, for example as a buffer
    size or in privacy accounting).
    """
    expected = _INTEGER if integer else _REAL
    if value is None:  # callers let None through where the argument is optional
        raise _refuse(fn, name, value, expected, "None is accepted only where the argument is optional")
    if isinstance(value, (bool, np.bool_)):
        raise _refuse(fn, name, value, expected, "a bool is not a number here")
    if isinstance(value, numbers.Real):  # int, float and NumPy's real scalars
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, numbers.Complex):
        raise _refuse(fn, name, value, expected, "a complex number")
    if not _is_array(value):
        raise _refuse(fn, name, value, expected, _type_name(value))
    if np.ndim(value) != 0:
        raise TypeError(f"{fn}: `{name}` must be a scalar, got {name}={describe(value)}.")
    dtype = value.dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise _refuse(fn, name, value, expected, f"an array of dtype {dtype}")
    if isinstance(value, jax.core.Tracer):
        if concrete:
            raise TypeError(
                f"{fn}: `{name}` must be a concrete number (a Python int or float, or a NumPy/JAX "
                f"scalar), got {name}={describe(value)}: it is used on the host, so it cannot be traced."
            )
        return None
    return value.item()


def _sequence_type(fn: str, name: str, value: Any, expected: str) -> None:
    """Refuses lists, tuples and dicts with the scalar-shape message (a pytree is not a threshold)."""
    if isinstance(value, (list, tuple, dict)):
        raise TypeError(f"{fn}: `{name}` must be a scalar, got {name}={describe(value)} ({expected}).")


def _static(fn: str, name: str, value: Any, *, integer: bool = False, concrete: bool = False) -> Any:
    """`number`, with a list, tuple or dict refused as "must be a scalar"."""
    _sequence_type(fn, name, value, f"expected {_INTEGER if integer else _REAL}")
    return number(fn, name, value, integer=integer, concrete=concrete)


def positive(fn: str, name: str, value: Any, *, concrete: bool = False) -> None:
    """Raises unless `value` is a real scalar > 0 (NaN fails too); traced arrays pass."""
    value = _static(fn, name, value, concrete=concrete)
    if value is not None and not value > 0:
        raise ValueError(f"{fn}: `{name}` must be > 0, got {name}={value!r}.")


def non_negative(fn: str, name: str, value: Any, *, concrete: bool = False) -> None:
    """Raises unless `value` is a real scalar >= 0 (NaN fails too); traced arrays pass."""
    value = _static(fn, name, value, concrete=concrete)
    if value is not None and not value >= 0:
        raise ValueError(f"{fn}: `{name}` must be >= 0, got {name}={value!r}.")


def finite(fn: str, name: str, value: Any, *, concrete: bool = False) -> None:
    """Raises unless `value` is a finite real scalar; traced arrays pass."""
    value = _static(fn, name, value, concrete=concrete)
    if value is not None and not abs(value) < float("inf"):
        raise ValueError(f"{fn}: `{name}` must be a finite number, got {name}={value!r}.")


def params_given(fn: str, params: Any) -> None:
    """Raises if a transform that needs `params` was called without them."""
    if params is None:
        raise ValueError(f"{fn}: `params` must be passed to update(updates, state, params), got params=None.")


def in_range(
    fn: str,
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool,
    hi_open: bool,
    concrete: bool = False,
) -> None:
    """Raises unless `lo < value` (or `<=`) and `value < hi` (or `<=`); traced arrays pass."""
    value = _static(fn, name, value, concrete=concrete)
    if value is None:
        return
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{fn}: `{name}` must be in {interval}, got {name}={value!r}.")


def integer_at_least(fn: str, name: str, value: Any, lo: int, *, concrete: bool = False) -> None:
    """Raises unless `value` is a whole number >= `lo` (a float such as 1e3 passes); traced arrays pass."""
    value = _static(fn, name, value, integer=True, concrete=concrete)
    if value is None:
        return
    whole = isinstance(value, int) or float(value).is_integer()  # False for NaN and inf
    if not whole or value < lo:
        raise ValueError(f"{fn}: `{name}` must be an integer >= {lo}, got {name}={value!r}.")


def one_of(fn: str, name: str, value: Any, options: tuple[str, ...]) -> None:
    """Raises a `TypeError` unless `value` is a str, a `ValueError` unless it is one of `options`."""
    if not isinstance(value, str):
        raise _refuse(fn, name, value, f"one of the strings {options}", _type_name(value))
    if value not in options:
        raise ValueError(f"{fn}: `{name}` must be one of {options}, got {name}={value!r}.")


def ordered(fn: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
    """Raises if static numbers `lo > hi`; traced arrays pass."""
    lo, hi = _static(fn, lo_name, lo), _static(fn, hi_name, hi)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{fn}: `{lo_name}` must be <= `{hi_name}`, got {lo_name}={lo!r}, {hi_name}={hi!r}.")


def positive_finite(fn: str, name: str, value: Any, *, concrete: bool = False) -> None:
    """Raises unless `value` is a finite real scalar > 0; traced arrays pass."""
    positive(fn, name, value, concrete=concrete)
    finite(fn, name, value, concrete=concrete)


def boolean(fn: str, name: str, value: Any, *, arrays: bool = False, traced: bool = False) -> None:
    """Raises a `TypeError` unless `value` is a bool.

    With `arrays`, a concrete 0-d bool array passes too; with `traced`, a
    traced one as well. A string is refused: `"False"` is truthy.
    """
    if isinstance(value, (bool, np.bool_)):
        return
    if arrays and _is_array(value) and np.ndim(value) == 0 and value.dtype == jnp.bool_:
        if traced or not isinstance(value, jax.core.Tracer):
            return
        raise _refuse(fn, name, value, "a bool known when the transform is built", "a traced value")
    raise _refuse(fn, name, value, "a bool (True or False)", _type_name(value))


def axis_name(fn: str, value: Any, name: str = "axis_name") -> None:
    """Raises a `TypeError` unless `value` is None or a mesh axis name (a str, or a tuple of them)."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return
    raise _refuse(fn, name, value, "None or a mesh axis name (a str, or a tuple of str)", _type_name(value))


def function(fn: str, name: str, value: Any, *, optional: bool = False) -> None:
    """Raises a `TypeError` unless `value` is callable (or None and `optional`)."""
    if (value is None and optional) or callable(value):
        return
    raise _refuse(fn, name, value, "a callable" + (" or None" if optional else ""), _type_name(value))


def transformation(fn: str, name: str, value: Any) -> None:
    """Raises a `TypeError` unless `value` is an optax `GradientTransformation` (callable init and update)."""
    if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
        return
    raise _refuse(
        fn, name, value, "an optax.GradientTransformation (with init and update)", _type_name(value)
    )


def state(fn: str, value: Any, expected: type | tuple[type, ...]) -> None:
    """Raises a `TypeError` unless the optimizer `state` given to `fn` is one `fn`'s `init` makes.

    Names both types, so a state of another transform (chain states passed
    in the wrong order, a checkpoint of another optimizer, a state restored
    as a dict without a target) says what it is. A state with an extra
    leading axis (a vmapped state passed to an un-vmapped update) is refused
    too: its `ClipStats` fields are no longer scalars.
    """
    if not isinstance(value, expected):
        kinds = expected if isinstance(expected, tuple) else (expected,)
        want = " or ".join(k.__name__ for k in kinds)
        raise TypeError(
            f"{fn}: state is {type(value).__name__}, expected {want} (the state {fn.split('.')[0]}'s "
            f"init returns); was it made by another transform, or are a chain's states out of order?"
        )
    stats = value if hasattr(value, "pre_clip_norm") else getattr(value, "stats", None)
    shape = getattr(getattr(stats, "step_count", None), "shape", ())
    if tuple(shape) != ():
        raise TypeError(
            f"{fn}: state has a leading axis of shape {tuple(shape)} (a batch of states?); "
            f"update each with jax.vmap(tx.update), or pass one state."
        )


def loss(fn: str, value: Any) -> None:
    """Raises a `TypeError` unless the `loss=` of an update is None or a real scalar (traced or not)."""
    if value is not None:
        _static(fn, "loss", value)


def row_mask(fn: str | None, value: Any, batch: int) -> None:
    """Raises a `TypeError` unless a DP `mask=` is None or a bool (or integer 0/1) array of shape `[batch]`.

    A float mask is refused (a weight of 0.5 would count as a real row), and
    so is a list (pass `np.asarray(mask)`). `fn` None: the message names only
    the argument.
    """
    if value is None:
        return
    expected = f"None or a bool array of shape ({batch},) marking the real rows"
    where = fn or "the clipped sum"
    if not _is_array(value):
        raise _refuse(where, "mask", value, expected, _type_name(value))
    if not (value.dtype == jnp.bool_ or jnp.issubdtype(value.dtype, jnp.integer)):
        raise _refuse(where, "mask", value, expected, f"dtype {value.dtype}")
    if tuple(value.shape) != (batch,):
        raise _refuse(where, "mask", value, expected, f"shape {tuple(value.shape)}, batch size {batch}")


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
