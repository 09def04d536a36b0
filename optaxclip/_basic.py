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
    fn = "clip_by_global_norm"
    _checks.positive(fn, "max_norm", max_norm)
    _checks.axis_name(fn, axis_name)

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, _stats.ClipStats)
        norm = _norms.global_norm(updates, axis_name)
        return clip_to_bound(updates, state, norm, jnp.asarray(max_norm, F32))

    return optax.GradientTransformation(_stats.init_fn, update_fn)


def _check_bound_spec(fn: str, name: str, bound: Bound, check) -> None:
    """Checks a number or a pytree of numbers at construction (a callable is checked per leaf).

    `None` counts as a leaf here (JAX would drop it from the pytree), so it is refused by `check`.
    """
    if callable(bound):
        return
    for path, b in jax.tree_util.tree_flatten_with_path(bound, is_leaf=lambda x: x is None)[0]:
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
    _checks.axis_name(fn, axis_name)

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, _stats.ClipStats)
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


def _paired(x: jax.Array, *scalars: jax.Array):
    """`x` in float32 and `scalars` as runtime values paired with it by a barrier.

    XLA would otherwise fold constants into rewrites such as `(hi * s)**2 ->
    hi**2 * s**2` (inf * 0 for a bound near 1e30), and share one broadcast
    of a scalar between same-shaped arrays and materialize it at their size.
    """
    scalars, x = jax.lax.optimization_barrier((scalars, x))
    return x.astype(F32), scalars


def _norm_stats(x: jax.Array, lo: jax.Array, hi: jax.Array):
    """The default stats' reductions of `x`: its float32 sum of squares and whether it leaves `[lo, hi]`.

    The sum of squares, the max and the min of `x`: reductions with no
    per-element arithmetic beyond the square, which XLA fuses into one read
    on GPU and TPU and XLA:CPU runs at the cost of about one read (measured
    in `benchmarks/README.md`). An element left the range exactly when
    `max(x) > hi` or `min(x) < lo`.
    """
    x, (lo, hi) = _paired(x, lo, hi)
    # `initial`: a zero-size leaf leaves nothing out of range.
    out_of_range = (jnp.max(x, initial=-jnp.inf) > hi) | (jnp.min(x, initial=jnp.inf) < lo)
    return _norms.plain_sumsq(x), out_of_range


def _full_stats(x: jax.Array, lo: jax.Array, hi: jax.Array):
    """`stats="full"`'s reductions: sums of squares (plain and `2**-64`-scaled), post-clip norm, count.

    The clamped square splits into its positive and negative parts,
    `clip(x, lo, hi)**2 = min(max(x, lo+)**2, hi+**2) + min(max(-x,
    (-hi)+)**2, (-lo)+**2)` (`v+ = max(v, 0)`; valid for any `lo <= hi`),
    squared after scaling by a power of two near `max(|lo|, |hi|)` (exact),
    so no bound can overflow or underflow the post-clip sum; contributions
    below about 1e-19 of that bound are lost. The count of elements outside
    the range is `sum(clip(max(x - hi, lo - x) * 2**126, 0, 1))`: 1 for an
    element beyond a bound by any normal float32 difference, 0 inside
    (arithmetic, not a compare: XLA:CPU's reduction fusion takes no
    predicate and would write one out at the array's size first); exact
    below `2**24`. All are reductions of elementwise functions of `x` (no
    clamped copy of `x` is materialized).
    """
    k = _exponent(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    plain, scaled = _norms.sumsq_pair(x, tuple(range(x.ndim)))
    big, zero, one = jnp.asarray(2.0**126, F32), jnp.zeros((), F32), jnp.ones((), F32)
    x, (lo, hi, s, big, zero, one) = _paired(x, lo, hi, jnp.ldexp(one, -k), big, zero, one)
    pos = lambda v: jnp.maximum(v, 0.0) * s  # noqa: E731
    x_s = x * s
    upper = jnp.minimum(jnp.square(jnp.maximum(x_s, pos(lo))), jnp.square(pos(hi)))
    lower = jnp.minimum(jnp.square(jnp.maximum(-x_s, pos(-hi))), jnp.square(pos(-lo)))
    post = jnp.sqrt(jnp.sum(upper + lower)) * jnp.ldexp(jnp.ones((), F32), k)
    count = jnp.sum(jnp.minimum(jnp.maximum(jnp.maximum(x - hi, lo - x) * big, zero), one))
    return jnp.sum(plain), jnp.sum(scaled), post, count


class ClipByValueState(NamedTuple):
    """State of `clip_by_value(..., stats="full")`.

    Attributes:
      stats: `ClipStats`, as with the default stats, with the exact
        post-clip norm.
      clipped_fraction: float32 `[]`, the fraction of this step's (float)
        elements that were clamped; NaN on a non-finite step.
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
      stats: What the state records. `"norm"` (default): a `ClipStats` with
        the pre-clip norm and whether any element was clamped, from the
        sum of squares, the max and the min of the updates (about the cost
        of an overflow-safe norm); its `post_clip_norm` equals the pre-clip
        norm on a step that clamps nothing and is NaN (not computed) on a
        step that clamps. `"full"`: a `ClipByValueState` that adds the exact
        post-clip norm, the fraction of elements clamped and overflow-safe
        pre-clip norms beyond 1.8e19, for two more reductions (each a pass
        over the updates on XLA:CPU; fused into one on GPU and TPU).

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipStats` whose
      `threshold` is the largest `max(|min_value|, |max_value|)` over the
      leaves (the largest magnitude an element may keep) and whose
      `clipped` is true when any element was clamped; with `stats="full"`,
      a `ClipByValueState` holding it and `clipped_fraction`.

    Edge cases:
      An infinite element stays infinite and a NaN stays NaN (optax's
      `clip` turns inf into the bound, hiding the overflow); the step
      counts as non-finite and records `clipped=False`, as the norm clips
      do. With the default stats, a pre-clip norm above about 1.8e19 reads
      as inf and the step counts as non-finite (its elements are clamped
      all the same); `stats="full"` records such norms exactly. Integer and
      `float0` leaves pass through untouched (a step counter stays as it
      is) and are left out of the stats.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> out, state = tx.update({"w": jnp.array([-3.0, 0.5, 2.0, 0.0])}, tx.init(None))
      >>> print(out["w"], bool(state.clipped))
      [-1.   0.5  1.   0. ] True
      >>> full = optaxclip.clip_by_value(1.0, stats="full")
      >>> _, state = full.update({"w": jnp.array([-3.0, 0.5, 2.0, 0.0])}, full.init(None))
      >>> print(f"{float(state.stats.post_clip_norm):.3f} {float(state.clipped_fraction):.2f}")
      1.500 0.50
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
    full = stats == "full"

    def init_fn(params):
        del params
        return ClipByValueState(_stats.init_stats(), jnp.zeros((), F32)) if full else _stats.init_stats()

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, ClipByValueState if full else _stats.ClipStats)
        leaves, treedef, idx = _norms.float_leaves(updates)
        los, his = _value_leaf_bounds(fn, max_value, min_value, updates)
        out, reductions = list(leaves), []
        for i in idx:
            lo, hi = los[i], his[i]
            reductions.append((_full_stats if full else _norm_stats)(leaves[i], lo, hi))
            # Keep +-inf (and NaN) as it is: clamping would turn an overflow into the bound.
            x, (lo, hi) = _paired(leaves[i], lo, hi)
            out[i] = jnp.where(jnp.isfinite(x), jnp.clip(x, lo, hi), x).astype(leaves[i].dtype)
        limits = [jnp.maximum(jnp.abs(los[i]), jnp.abs(his[i])) for i in idx]
        threshold = jnp.max(jnp.stack(limits)) if limits else jnp.zeros((), F32)
        if not full:
            return treedef.unflatten(out), _value_norm_stats(state, reductions, threshold)
        new_stats, fraction = _value_full_stats(state.stats, reductions, threshold, [leaves[i] for i in idx])
        return treedef.unflatten(out), ClipByValueState(new_stats, fraction)

    return optax.GradientTransformation(init_fn, update_fn)


def _value_norm_stats(stats, reductions, threshold):
    """The default `ClipStats` from each leaf's `(sum of squares, out of range)`."""
    plain = sum((p for p, _ in reductions), jnp.zeros((), F32))
    pre = jnp.sqrt(plain)  # inf beyond ~1.8e19 (the overflow-safe sum is the full level's)
    flags = [f for _, f in reductions]
    clipped = jnp.isfinite(pre) & (jnp.any(jnp.stack(flags)) if flags else False)
    return _stats.record(
        stats,
        pre_clip_norm=pre,
        post_clip_norm=jnp.where(clipped, jnp.nan, pre),
        threshold=threshold,
        clipped=clipped,
    )


def _value_full_stats(stats, reductions, threshold, leaves):
    """`stats="full"`'s `ClipStats` and clamped fraction from each leaf's `_full_stats`."""
    zero = jnp.zeros((), F32)
    pre = _norms.root(sum((r[0] for r in reductions), zero), sum((r[1] for r in reductions), zero))
    count = sum((r[3] for r in reductions), zero)
    clipped = jnp.isfinite(pre) & (count > 0)
    # A leaf with nothing clamped keeps its pre-clip norm (its clamped sum may have lost tiny
    # elements to the bound's scale).
    post_leaf = [jnp.where(c > 0, post, _norms.root(p, s)) for p, s, post, c in reductions]
    size = max(sum(x.size for x in leaves), 1)
    stats = _stats.record(
        stats,
        pre_clip_norm=pre,
        post_clip_norm=jnp.where(clipped, _norms.combine_norms(post_leaf), pre),
        threshold=threshold,
        clipped=clipped,
    )
    return stats, jnp.where(jnp.isfinite(pre), count / size, jnp.nan)
