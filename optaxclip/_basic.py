"""Fixed-threshold clipping: by global norm, by leaf norm, by value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

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


def _value_sums(x: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The float32 sum of squares of `x`, and how many of its elements lie outside `[lo, hi]`.

    Two reductions of `x` (fused into one read on GPU and TPU, two loops on
    XLA:CPU): the plain sum is finite for norms below about 1.8e19. The
    count is `sum(clip(max(x - hi, lo - x) * 2**126, 0, 1))`: 1 for an
    element above `hi` by any normal float32 difference, 0 inside
    (arithmetic, not a compare: XLA:CPU's reduction fusion takes no
    predicate and would write one out at the array's size first). Exact
    while below `2**24`; an element beyond a bound under about 1e-31 by less
    than float32's smallest normal number is clamped but not counted.
    """
    # Runtime scalars paired with this array (see `_norms.sumsq_pair`): XLA would otherwise share
    # one broadcast of a constant between same-shaped arrays and materialize it at their size.
    scalars = (jnp.asarray(2.0**126, F32), jnp.asarray(1.0, F32), lo, hi)
    (big, one, lo, hi), x = jax.lax.optimization_barrier((scalars, x))
    x = x.astype(F32)
    plain = jnp.sum(jnp.square(x))
    count = jnp.sum(jnp.minimum(jnp.maximum(jnp.maximum(x - hi, lo - x) * big, 0.0), one))
    return plain, count


def _clamp_stats(x: jax.Array, lo: jax.Array, hi: jax.Array):
    """Scaled pre-clip sum, post-clip norm and whether an element left `[lo, hi]`, from `x` alone.

    For `stats="full"`: reductions of elementwise functions of `x`, which
    XLA fuses into one read on GPU and TPU (no clamped copy of `x` is
    materialized). The clamped square splits into its positive and negative
    parts, `clip(x, lo, hi)**2 = min(max(x, lo+)**2, hi+**2) + min(max(-x,
    (-hi)+)**2, (-lo)+**2)` (`v+ = max(v, 0)`; valid for any `lo <= hi`),
    squared after scaling by a power of two near `max(|lo|, |hi|)` (exact),
    so no bound can overflow or underflow the post-clip sum; contributions
    below about 1e-19 of that bound are lost. An element left the range
    exactly when `max(x - hi, lo - x) > 0`.
    """
    k = _exponent(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    _, scaled = _norms.sumsq_pair(x, tuple(range(x.ndim)))
    # As in `_value_sums`: runtime scalars paired with this array.
    lo, hi, s, x = jax.lax.optimization_barrier((lo, hi, jnp.ldexp(jnp.ones((), F32), -k), x))
    pos = lambda v: jnp.maximum(v, 0.0) * s  # noqa: E731
    x = x.astype(F32)
    x_s = x * s
    upper = jnp.minimum(jnp.square(jnp.maximum(x_s, pos(lo))), jnp.square(pos(hi)))
    lower = jnp.minimum(jnp.square(jnp.maximum(-x_s, pos(-hi))), jnp.square(pos(-lo)))
    inside = jnp.sum(upper + lower)
    out_of_range = jnp.max(jnp.maximum(x - hi, lo - x), initial=-jnp.inf) > 0
    return jnp.sum(scaled), jnp.sqrt(inside) * jnp.ldexp(jnp.ones((), F32), k), out_of_range


class ClipByValueState(NamedTuple):
    """State of `clip_by_value`.

    Attributes:
      stats: `ClipStats`; `threshold` is the largest `max(|min_value|,
        |max_value|)` over the leaves, `clipped` whether any element was
        clamped.
      clipped_fraction: float32 `[]`, the fraction of this step's (float)
        elements that were clamped; NaN on a non-finite step (and, with
        `stats="norm"`, on a step whose pre-clip norm exceeds about 1.8e19).
    """

    stats: _stats.ClipStats
    clipped_fraction: jax.Array


def _value_leaf_bounds(fn, max_value, min_value, updates) -> tuple[list, list]:
    """Per-leaf float32 `(lo, hi)` bounds of `clip_by_value`, checked."""
    his = leaf_bounds(fn, "max_value", max_value, updates, _checks.finite)
    if min_value is None:
        return [-jnp.asarray(h, F32) for h in his], [jnp.asarray(h, F32) for h in his]
    los = leaf_bounds(fn, "min_value", min_value, updates, _checks.finite)
    for lo, hi in zip(los, his, strict=True):
        _checks.ordered(fn, "min_value", lo, "max_value", hi)
    return [jnp.asarray(lo, F32) for lo in los], [jnp.asarray(h, F32) for h in his]


def clip_by_value(
    max_value: Bound, min_value: Bound | None = None, *, stats: str = "norm"
) -> optax.GradientTransformation:
    """Clamps every element of the updates into `[min_value, max_value]`.

    Each bound is one number for all leaves, a pytree of numbers with the
    structure of the updates, or a callable `(path, leaf) -> number` (as
    `clip_by_leaf_norm`'s `max_norm`), so layers can have their own ranges.

    Args:
      max_value: Upper bound(s), finite. With `min_value=None` each must be
        > 0 and the range is `[-max_value, max_value]`.
      min_value: Lower bound(s), finite and <= `max_value`; defaults to
        `-max_value`.
      stats: What the state records. `"norm"` (default): the pre-clip
        norm, whether any element was clamped and the fraction clamped,
        from two sums over the updates (the sum of squares and the count),
        as many as an overflow-safe norm takes; `post_clip_norm` equals the
        pre-clip norm on a step that clamps nothing and is NaN (not
        computed) on a step that clamps. `"full"`: also the exact post-clip
        norm and exact pre-clip norms beyond 1.8e19, for three more
        reductions (each a pass over the updates on XLA:CPU; all fused into
        one pass on GPU and TPU).

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipByValueState`
      (a `ClipStats` and `clipped_fraction`).

    Edge cases:
      An infinite element stays infinite and a NaN stays NaN (optax's
      `clip` turns inf into the bound, hiding the overflow); the step
      counts as non-finite and records `clipped=False`, as the norm clips
      do. Norms are float32 and overflow-free, except that with
      `stats="norm"` a pre-clip norm above about 1.8e19 reads as inf (the
      step counts as non-finite; its elements are clamped all the same):
      use `stats="full"` to record such norms exactly. Integer and `float0`
      leaves pass through untouched (a step counter stays as it is) and
      are left out of the norms and the fraction.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> out, state = tx.update({"w": jnp.array([-3.0, 0.5, 2.0, 0.0])}, tx.init(None))
      >>> print(out["w"], f"{float(state.clipped_fraction):.2f}")
      [-1.   0.5  1.   0. ] 0.50
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
    _checks.one_of(fn, "stats", stats, ("norm", "full"))
    _check_bound_spec(fn, "max_value", max_value, _checks.finite)
    if min_value is None:
        _check_bound_spec(fn, "max_value", max_value, _checks.positive)
    else:
        _check_bound_spec(fn, "min_value", min_value, _checks.finite)
        one = lambda b: not callable(b) and jax.tree_util.treedef_is_leaf(jax.tree.structure(b))
        if one(min_value) and one(max_value):  # per-leaf pairs are checked at the first update
            _checks.ordered(fn, "min_value", min_value, "max_value", max_value)

    def init_fn(params):
        del params
        return ClipByValueState(_stats.init_stats(), jnp.zeros((), F32))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef, idx = _norms.float_leaves(updates)
        los, his = _value_leaf_bounds(fn, max_value, min_value, updates)
        out = list(leaves)
        sums, full, limits = [], [], []
        for i in idx:
            lo, hi = los[i], his[i]
            sums.append(_value_sums(leaves[i], lo, hi))
            if stats == "full":
                full.append(_clamp_stats(leaves[i], lo, hi))
            limits.append(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
            # Keep +-inf (and NaN) as it is: clamping would turn an overflow into the bound.
            lo, hi, x = jax.lax.optimization_barrier((lo, hi, leaves[i]))  # as in _value_sums
            x = x.astype(F32)
            out[i] = jnp.where(jnp.isfinite(x), jnp.clip(x, lo, hi), x).astype(leaves[i].dtype)
        new_stats, fraction = _value_stats(state.stats, sums, full, limits, [leaves[i].size for i in idx])
        return treedef.unflatten(out), ClipByValueState(new_stats, fraction)

    return optax.GradientTransformation(init_fn, update_fn)


def _value_stats(stats, sums, full, limits, sizes):
    """`clip_by_value`'s `ClipStats` and clamped fraction from its per-leaf sums (see `_value_sums`)."""
    zero = jnp.zeros((), F32)
    plain = sum((p for p, _ in sums), zero)
    count = sum((c for _, c in sums), zero)
    fraction = jnp.where(jnp.isfinite(plain), count / max(sum(sizes), 1), jnp.nan)
    if full:
        pre = _norms.root(plain, sum((sc for sc, _, _ in full), zero))
        clipped = jnp.any(jnp.stack([f for _, _, f in full])) & jnp.isfinite(pre)
        # A leaf with nothing clamped keeps its pre-clip norm (its clamped sum may have
        # lost tiny elements to the bound's scale).
        post_leaf = [
            jnp.where(f, post, _norms.root(p, sc)) for (p, _), (sc, post, f) in zip(sums, full, strict=True)
        ]
        post = jnp.where(clipped, _norms.combine_norms(post_leaf), pre)
    else:
        pre = jnp.sqrt(plain)  # inf beyond ~1.8e19: the overflow-safe sum is the full level's
        clipped = jnp.isfinite(plain) & (count > 0)
        post = jnp.where(clipped, jnp.nan, pre)
    stats = _stats.record(
        stats,
        pre_clip_norm=pre,
        post_clip_norm=post,
        threshold=jnp.max(jnp.stack(limits)) if limits else zero,
        clipped=clipped,
    )
    return stats, fraction
