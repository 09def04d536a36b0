"""Fixed-threshold clipping: by global norm, by leaf norm, by value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats

F32 = jnp.float32
MaxNorm = jax.typing.ArrayLike | Any | Callable[[Any, jax.Array], Any]


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
      accumulated (mean) gradient.

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


def clip_to_bound(updates, stats: _stats.ClipStats, norm: jax.Array, bound: jax.Array):
    """Scales `updates` (global norm `norm`) to norm <= `bound`; returns them and new stats.

    The one global-norm clip step that `clip_by_global_norm` and the adaptive
    transforms share: a multiply by `min(1, bound / norm)` that fuses into
    the next elementwise pass.
    """
    factor = _norms.scale_factor(norm, bound)
    clipped = jax.tree.map(lambda g: _norms.scale(g, factor), updates)
    stats = _stats.record(
        stats,
        pre_clip_norm=norm,
        post_clip_norm=norm * factor,
        threshold=bound,
        clipped=factor < 1,
    )
    return clipped, stats


def _leaf_bounds(fn: str, max_norm: MaxNorm, updates: Any) -> list[jax.Array]:
    """The per-leaf bounds of `clip_by_leaf_norm`, validated, one per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if callable(max_norm):
        bounds = [max_norm(path, leaf) for path, leaf in leaves]
        for (path, _), b in zip(leaves, bounds, strict=True):
            _checks.positive(fn, f"max_norm{jax.tree_util.keystr(path)}", b)
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(max_norm)):
        bounds = [max_norm] * len(leaves)
    else:
        got = jax.tree.structure(max_norm)
        if got != treedef:
            raise ValueError(
                f"{fn}: `max_norm` must be a number, a callable, or a pytree with the "
                f"structure of the updates; got max_norm with structure {got}, "
                f"updates have {treedef}."
            )
        bounds = jax.tree.leaves(max_norm)  # validated at construction
    return [jnp.asarray(b, F32) for b in bounds]


def clip_by_leaf_norm(max_norm: MaxNorm, *, axis_name: str | None = None) -> optax.GradientTransformation:
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
      counts as non-finite.

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
    if not callable(max_norm):
        for b in jax.tree.leaves(max_norm):
            _checks.positive(fn, "max_norm", b)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        bounds = _leaf_bounds(fn, max_norm, updates)
        norms = jax.tree.leaves(_norms.leaf_norms(leaves, axis_name))
        factors = [_norms.scale_factor(n, b) for n, b in zip(norms, bounds, strict=True)]
        out = [_norms.scale(g, f) for g, f in zip(leaves, factors, strict=True)]
        post_leaves = [n * f for n, f in zip(norms, factors, strict=True)]
        pre, post, threshold = _norms.combine_norms_each(
            norms, post_leaves, [jnp.maximum(b, 0.0) for b in bounds]
        )
        stats = _stats.record(
            state,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=threshold,
            clipped=jnp.any(jnp.stack(factors) < 1) if factors else False,
        )
        return treedef.unflatten(out), stats

    return optax.GradientTransformation(_stats.init_fn, update_fn)


def clip_by_value(
    max_value: jax.typing.ArrayLike,
    min_value: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
    """Clamps every element of the updates into `[min_value, max_value]`.

    Args:
      max_value: Upper bound. With `min_value=None` it must be > 0 and the
        range is `[-max_value, max_value]`.
      min_value: Lower bound, <= `max_value`; defaults to `-max_value`.

    Returns:
      An `optax.GradientTransformation`; its state is a `ClipStats` whose
      `threshold` is `max(|min_value|, |max_value|)`, the largest magnitude
      an element may keep, and whose `clipped` is true when any element was
      clamped.

    Edge cases:
      An infinite element stays infinite and a NaN stays NaN (optax's
      `clip` turns inf into the bound, hiding the overflow); the step
      counts as non-finite and records `clipped=False`, as the norm clips
      do. The stats' norms are float32 and overflow-free. They cost two
      reads of the updates with the default symmetric range (sums of
      `min(g**2, max_value**2)` and of the excess over it); with a
      `min_value`, a pre-clip norm, an out-of-range test and, on steps where
      something was clamped, a third read for the post-clip norm.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.clip_by_value(1.0)
      >>> out, _ = tx.update({"w": jnp.array([-3.0, 0.5, 2.0])}, tx.init(None))
      >>> print(out["w"])
      [-1.   0.5  1. ]

    References:
      Mikolov, Statistical language models based on neural networks, PhD
      thesis, 2012 (gradient value clipping for RNNs).
    """
    fn = "clip_by_value"
    _checks.finite(fn, "max_value", max_value)
    if min_value is None:
        _checks.positive(fn, "max_value", max_value)
    else:
        _checks.finite(fn, "min_value", min_value)
        _checks.ordered(fn, "min_value", min_value, "max_value", max_value)

    def update_fn(updates, state, params=None):
        del params
        hi = jnp.asarray(max_value, F32)
        lo = -hi if min_value is None else jnp.asarray(min_value, F32)

        def clamp(g):
            x = g.astype(F32)
            # Keep +-inf (and NaN) as it is: clamping would turn an overflow into the
            # bound. `x - x == 0` tests finiteness without an `abs` that XLA could
            # share with a reduction of the stats and so materialize.
            return jnp.where(x - x == 0, jnp.clip(x, lo, hi), x).astype(g.dtype)

        leaves, treedef = jax.tree.flatten(updates)
        if min_value is None:
            pre, post, clipped = _norms.symmetric_clamp_norms(leaves, hi)
        else:
            norms = jax.tree.leaves(_norms.leaf_norms(leaves))
            pre = _norms.combine_norms(norms)
            # Out of range, from reductions XLA runs at memory speed; the stats never
            # hold a clamped copy of the updates. A non-finite step is counted as such
            # and never as clipped, as in the norm clips.
            clamped = [
                (jnp.max(g, initial=-jnp.inf).astype(F32) > hi)
                | (jnp.min(g, initial=jnp.inf).astype(F32) < lo)
                for g in leaves
            ]
            finite = jnp.isfinite(pre)
            clamped = [f & finite for f in clamped]
            post = _norms.combine_norms(_norms.clamped_norms(leaves, lo, hi, norms, clamped))
            clipped = jnp.any(jnp.stack(clamped)) if leaves else False
        stats = _stats.record(
            state,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=jnp.maximum(jnp.abs(lo), jnp.abs(hi)),
            clipped=clipped,
        )
        return treedef.unflatten([clamp(g) for g in leaves]), stats

    return optax.GradientTransformation(_stats.init_fn, update_fn)
