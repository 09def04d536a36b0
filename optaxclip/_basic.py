"""Fixed-threshold clipping: by global norm, by leaf norm, by value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats
from ._clip import clip_to_bound, clip_units

F32 = jnp.float32
Bound = jax.typing.ArrayLike | Any | Callable[[Any, jax.Array], Any]


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike, *, axis_name: str | None = None
) -> optax.GradientTransformation:
    """Scales updates so their global L2 norm is <= `max_norm`.

    The update is multiplied by `min(1, max_norm / norm)`: one read of the
    updates to get the norm, and the scale fuses into the next elementwise
    pass (for example adam's), so no clipped copy of the updates is kept.

    Args:
      max_norm: Largest allowed global norm; > 0. May be scheduled with
        `optax.inject_hyperparams` (a traced value < 0 acts as 0).
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of the updates, the axis to take the norm over.

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipStats`.

    Edge cases:
      The norm is accumulated in float32 and never overflows for finite
      input (float16 `[300, 400]` has norm 500; float32 `[1e30, 1e30]` has
      norm 1.41e30). A zero update stays zero, even with `max_norm == 0`.
      If any update is NaN/inf the norm is non-finite: the updates pass
      through unscaled (never made finite), and `nonfinite_count`
      increments. Wrap the whole chain in `optax.apply_if_finite` to skip
      such steps. Inside `optax.MultiSteps` the clip applies to the
      accumulated (mean) gradient. The factor is applied in float32 and
      the result rounded to the leaf's dtype, so in float16/bfloat16 the
      clipped norm can exceed `max_norm` by about one unit in the last place
      of that dtype (relative 1e-3 / 8e-3). Integer and `float0` leaves pass
      through untouched and are left out of the norm.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.clip_by_global_norm(1.0)
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> out, state = tx.update(g, tx.init(g))
      >>> print(out["w"], float(state.pre_clip_norm))
      [0.6 0.8] 5.0

    References:
      Pascanu et al., On the difficulty of training recurrent neural
      networks, 2013. https://arxiv.org/abs/1211.5063
    """
    _checks.positive("clip_by_global_norm", "max_norm", max_norm)

    def update_fn(updates, state, params=None):
        del params
        norm = _norms.global_norm(updates, axis_name)
        return clip_to_bound(updates, state, norm, jnp.asarray(max_norm, F32))

    return optax.GradientTransformation(_stats.init_fn, update_fn)


def _check_bound_spec(fn: str, name: str, bound: Bound, check) -> None:
    """Checks a number or a pytree of numbers at construction (a callable is checked per leaf)."""
    if callable(bound):
        return
    for path, b in jax.tree_util.tree_flatten_with_path(bound)[0]:
        check(fn, f"{name}{jax.tree_util.keystr(path)}", b)


def leaf_bounds(fn: str, name: str, bound: Bound, updates: Any, check) -> list:
    """One bound per leaf of `updates` from a number, a pytree with their structure, or a callable.

    A callable `(path, leaf) -> number` is called once per leaf at trace
    time, and each value is checked with `check(fn, name, value)`.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if callable(bound):
        bounds = [bound(path, leaf) for path, leaf in leaves]
        for (path, _), b in zip(leaves, bounds, strict=True):
            check(fn, f"{name}{jax.tree_util.keystr(path)}", b)
        return bounds
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(bound)):
        return [bound] * len(leaves)
    got = jax.tree.structure(bound)
    if got != treedef:
        raise ValueError(
            f"{fn}: `{name}` must be a number, a callable, or a pytree with the structure of "
            f"the updates; got {name} with structure {got}, updates have {treedef}."
        )
    return jax.tree.leaves(bound)  # checked at construction


def clip_by_leaf_norm(max_norm: Bound, *, axis_name: str | None = None) -> optax.GradientTransformation:
    """Clips each leaf (parameter tensor) to its own L2 norm bound.

    Each leaf `g` becomes `g * min(1, bound / ||g||)`.

    Args:
      max_norm: The bound of each leaf (> 0): one number for all leaves, a
        pytree of numbers with the structure of the updates, or a callable
        `(path, leaf) -> number` called once per leaf at trace time (`path`
        as in `jax.tree_util.tree_flatten_with_path`).
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of every leaf, the axis to take the norms over.

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipStats` whose
      `threshold` is `sqrt(sum(bound_i**2))`, the largest global norm the
      clipped updates can have, and whose `clipped` is true when any leaf
      was scaled.

    Edge cases:
      Norms as in `clip_by_global_norm`: float32, no overflow, zero stays
      zero; a leaf with a NaN/inf passes through unscaled and the step
      counts as non-finite. Integer and `float0` leaves pass through and
      are left out of the norms and the threshold.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_leaf_norm({"a": 1.0, "b": 10.0})
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([3.0, 4.0])}
      >>> out, _ = tx.update(g, tx.init(g))
      >>> print(out["a"], out["b"])
      [0.6 0.8] [3. 4.]

    References:
      Pascanu et al., On the difficulty of training recurrent neural
      networks, 2013. https://arxiv.org/abs/1211.5063
    """
    fn = "clip_by_leaf_norm"
    _check_bound_spec(fn, "max_norm", max_norm, _checks.positive)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, idx = _norms.float_leaves(updates)
        bounds = leaf_bounds(fn, "max_norm", max_norm, updates, _checks.positive)
        floats = [leaves[i] for i in idx]
        norms = _norms.leaf_norms(floats, axis_name)
        scaled, stats = clip_units(state, floats, norms, [jnp.asarray(bounds[i], F32) for i in idx])
        out = list(leaves)
        for i, g in zip(idx, scaled, strict=True):
            out[i] = g
        return treedef.unflatten(out), stats

    return optax.GradientTransformation(_stats.init_fn, update_fn)


def _exponent(m: jax.Array) -> jax.Array:
    """`k` with `m * 2**-k` in [0.5, 1), clamped so `2**-k` is a normal float32; 0 for m = 0/inf/NaN."""
    m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    return jnp.clip(jnp.frexp(m)[1], -126, 126)


def _clamp_stats(x: jax.Array, lo: jax.Array, hi: jax.Array):
    """Pre-clip sums, post-clip norm and whether an element left `[lo, hi]`, from `x` alone.

    All are reductions of elementwise functions of `x`, which XLA fuses into
    one read on GPU and TPU (no clamped copy of `x` is materialized). The
    clamped square splits into its positive and negative parts,
    `clip(x, lo, hi)**2 = min(max(x, lo+)**2, hi+**2) + min(max(-x, (-hi)+)**2, (-lo)+**2)`
    (`v+ = max(v, 0)`; valid for any `lo <= hi`), squared after scaling by a
    power of two near `max(|lo|, |hi|)` (exact), so no bound can overflow
    or underflow the post-clip sum; contributions below about 1e-19 of that
    bound are lost. An element left the range exactly when
    `max(x - hi, lo - x) > 0`.
    """
    k = _exponent(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    pre = _norms.sumsq_pair(x, tuple(range(x.ndim)))
    # Runtime scalars, paired with this array: XLA would rewrite `(hi * s)**2` with
    # constants as `hi**2 * s**2` (inf * 0 for a bound near 1e30), and share one
    # broadcast of a constant between arrays, materializing it at their size.
    lo, hi, s, x = jax.lax.optimization_barrier((lo, hi, jnp.ldexp(jnp.ones((), F32), -k), x))
    pos = lambda v: jnp.maximum(v, 0.0) * s  # noqa: E731
    x = x.astype(F32)
    x_s = x * s
    upper = jnp.minimum(jnp.square(jnp.maximum(x_s, pos(lo))), jnp.square(pos(hi)))
    lower = jnp.minimum(jnp.square(jnp.maximum(-x_s, pos(-hi))), jnp.square(pos(-lo)))
    inside = jnp.sum(upper + lower)
    out_of_range = jnp.max(jnp.maximum(x - hi, lo - x), initial=-jnp.inf) > 0
    return pre, jnp.sqrt(inside) * jnp.ldexp(jnp.ones((), F32), k), out_of_range


def clip_by_value(max_value: Bound, min_value: Bound | None = None) -> optax.GradientTransformation:
    """Clamps every element of the updates into `[min_value, max_value]`.

    Each bound is one number for all leaves, a pytree of numbers with the
    structure of the updates, or a callable `(path, leaf) -> number` (as
    `clip_by_leaf_norm`'s `max_norm`), so layers can have their own ranges.

    Args:
      max_value: Upper bound(s), finite. With `min_value=None` each must be
        > 0 and the range is `[-max_value, max_value]`.
      min_value: Lower bound(s), finite and <= `max_value`; defaults to
        `-max_value`.

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipStats` whose
      `threshold` is the largest `max(|min_value|, |max_value|)` over the
      leaves (the largest magnitude an element may keep), and whose
      `clipped` is true when any element was clamped.

    Edge cases:
      An infinite element stays infinite and a NaN stays NaN (optax's
      `clip` turns inf into the bound, hiding the overflow); the step
      counts as non-finite and records `clipped=False`, as the norm clips
      do. The stats' norms are float32 and overflow-free. Integer and
      `float0` leaves pass through untouched (a step counter stays as it
      is) and are left out of the norms.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> out, _ = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, tx.init(None))
      >>> print(out["w"])
      [-1.   0.5  1. ]
      >>> per_layer = optaxclip.clip_by_value({"head": 100.0, "rnn": 10.0})
      >>> g = {"head": jnp.array([150.0]), "rnn": jnp.array([-20.0])}
      >>> out, _ = per_layer.update(g, per_layer.init(None))
      >>> print(out["head"], out["rnn"])
      [100.] [-10.]

    References:
      Mikolov, Statistical language models based on neural networks, PhD
      thesis, 2012 (gradient value clipping for RNNs).
    """
    fn = "clip_by_value"
    _check_bound_spec(fn, "max_value", max_value, _checks.finite)
    if min_value is None:
        _check_bound_spec(fn, "max_value", max_value, _checks.positive)
    else:
        _check_bound_spec(fn, "min_value", min_value, _checks.finite)
        one = lambda b: not callable(b) and jax.tree_util.treedef_is_leaf(jax.tree.structure(b))
        if one(min_value) and one(max_value):  # per-leaf pairs are checked at the first update
            _checks.ordered(fn, "min_value", min_value, "max_value", max_value)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, idx = _norms.float_leaves(updates)
        his = leaf_bounds(fn, "max_value", max_value, updates, _checks.finite)
        if min_value is None:
            los = [None] * len(leaves)
        else:
            los = leaf_bounds(fn, "min_value", min_value, updates, _checks.finite)
            for lo, hi in zip(los, his, strict=True):
                _checks.ordered(fn, "min_value", lo, "max_value", hi)
        out = list(leaves)
        plain, scaled, pre_leaf, post_leaf, flags, limits = [], [], [], [], [], []
        for i in idx:
            hi = jnp.asarray(his[i], F32)
            lo = -hi if los[i] is None else jnp.asarray(los[i], F32)
            (p, s), post, flag = _clamp_stats(leaves[i], lo, hi)
            plain.append(jnp.sum(p))
            scaled.append(jnp.sum(s))
            pre_leaf.append(_norms.root(plain[-1], scaled[-1]))
            # A leaf with nothing clamped keeps its pre-clip norm (its clamped sum may have
            # lost tiny elements to the bound's scale).
            post_leaf.append(jnp.where(flag, post, pre_leaf[-1]))
            flags.append(flag)
            limits.append(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
            # Keep +-inf (and NaN) as it is: clamping would turn an overflow into the bound.
            lo, hi, x = jax.lax.optimization_barrier((lo, hi, leaves[i]))  # as in _clamp_stats
            x = x.astype(F32)
            out[i] = jnp.where(jnp.isfinite(x), jnp.clip(x, lo, hi), x).astype(leaves[i].dtype)
        zero = jnp.zeros((), F32)
        pre = _norms.root(sum(plain, zero), sum(scaled, zero))
        clipped = jnp.any(jnp.stack(flags)) & jnp.isfinite(pre) if flags else jnp.zeros((), bool)
        stats = _stats.record(
            state,
            pre_clip_norm=pre,
            post_clip_norm=jnp.where(clipped, _norms.combine_norms(post_leaf), pre),
            threshold=jnp.max(jnp.stack(limits)) if limits else zero,
            clipped=clipped,
        )
        return treedef.unflatten(out), stats

    return optax.GradientTransformation(_stats.init_fn, update_fn)
