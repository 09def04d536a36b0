"""Adaptive gradient clipping (AGC), unit-wise relative to parameter norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats
from ._clip import clip_units

Axes = tuple[int, ...]


def flax_unit_axes(path: Any, leaf: jax.Array) -> Axes:
    """The axes AGC reduces over for a Flax parameter: all but the last.

    Flax stores kernels output-last: Dense `(in, out)`, Conv
    `(*window, in, out)`, and the LSTM cells' input and hidden kernels
    `(in, hidden)` (or `(in, 4 * hidden)` fused), so a unit (one output
    feature) is one slice along the last axis. Scalars, biases and other
    vectors are one unit each, as in NFNets.

    Args:
      path: The leaf's key path (unused; present so a custom rule can use it).
      leaf: The parameter.

    Returns:
      A tuple of axes to reduce over.
    """
    del path
    if not hasattr(leaf, "shape") and not _checks.is_real(leaf):  # jnp.ndim reads "abc" as a scalar
        raise TypeError(
            f"flax_unit_axes: `leaf` must be an array or a number (a parameter), "
            f"got leaf={_checks.describe(leaf)} ({type(leaf).__name__})."
        )
    ndim = jnp.ndim(leaf)
    return tuple(range(ndim)) if ndim <= 1 else tuple(range(ndim - 1))


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike = 0.01,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    mask: Any | Callable[[Any], Any] | None = None,
    unit_axes: Callable[[Any, jax.Array], Axes] | None = None,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping (AGC), unit-wise relative to parameter norms.

    For each unit `u` (by default one output feature of a kernel, see
    `flax_unit_axes`), the gradient `G_u` is scaled by
    `min(1, clipping * max(||W_u||, eps) / ||G_u||)`, where `W_u` is that
    unit's parameters.

    Args:
      clipping: The largest allowed ratio of gradient norm to parameter norm
        per unit; > 0. NFNets uses 0.01 for batch size 4096 and larger
        values for smaller batches. Schedulable.
      eps: Floor on the parameter norm, so zero-initialized units still get
        updates; > 0. Schedulable.
      mask: Which leaves to clip: a pytree of bools with the structure of the
        params (`True` = clip), or a callable `params -> that pytree`, as in
        `optax.masked`. `None` clips all. NFNets leaves the final classifier
        unclipped.
      unit_axes: `(path, param) -> axes` giving, for each leaf, the axes one
        unit's norm is taken over; `None` means `flax_unit_axes` (Flax
        layouts). With `optax.inject_hyperparams`, name callables passed here
        or as `mask` in `static_args`: it treats callables as schedules.

    Returns:
      An `optax.GradientTransformation` whose `update` needs `params`; its
      state is a `ClipStats` whose `threshold` is
      `sqrt(sum_u (clipping * max(||W_u||, eps))**2)` over the clipped
      leaves' units (at most `clipping * ||W||` plus the eps floor), and whose
      `clipped` is true if any unit was scaled.

    Edge cases:
      Norms are float32 and overflow-free. A zero gradient stays zero, also
      with `clipping == 0`. A unit whose gradient is NaN/inf passes through
      unscaled and the step counts as non-finite. Integer and `float0`
      leaves pass through untouched.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}
      >>> grads = {"kernel": jnp.array([[0.3, 0.0], [0.4, 0.1]])}
      >>> tx = optaxclip.adaptive_grad_clip(0.01)
      >>> out, _ = tx.update(grads, tx.init(params), params)
      >>> print(out["kernel"].round(4))  # unit norms: 0.5 vs 5 -> 0.05; 0.1 vs 1 -> 0.01
      [[0.03 0.  ]
       [0.04 0.01]]

    References:
      Brock et al., High-Performance Large-Scale Image Recognition Without
      Normalization (NFNets), 2021. https://arxiv.org/abs/2102.06171
    """
    fn = "adaptive_grad_clip"
    _checks.positive(fn, "clipping", clipping)
    _checks.positive(fn, "eps", eps)
    _checks.function(fn, "unit_axes", unit_axes, optional=True)
    if mask is not None and not callable(mask):
        _check_mask(fn, mask)

    def update_fn(updates, state, params=None):
        _checks.state(f"{fn}.update", state, _stats.ClipStats)
        _checks.params_given(fn, params)
        g_leaves, treedef = jax.tree.flatten(updates)
        p_paths, p_treedef = jax.tree_util.tree_flatten_with_path(params)
        if p_treedef != treedef:
            raise ValueError(
                f"{fn}: `params` must have the structure of the updates; got params "
                f"with {p_treedef}, updates with {treedef}."
            )
        m = mask(params) if callable(mask) else mask
        if callable(mask):
            _check_mask(fn, m, "mask(params)")
        flags = [True] * len(g_leaves) if m is None else jax.tree.leaves(m)
        if m is not None and jax.tree.structure(m) != treedef:
            raise ValueError(
                f"{fn}: `mask` must have the structure of the params; got mask with "
                f"{jax.tree.structure(m)}, params with {treedef}."
            )
        floats = set(_norms.float_leaves(updates)[2])
        clip_idx = [i for i, f in enumerate(flags) if f and i in floats]
        keep_idx = [i for i, f in enumerate(flags) if not f and i in floats]
        rule = flax_unit_axes if unit_axes is None else unit_axes
        axes = [tuple(rule(p_paths[i][0], p_paths[i][1])) for i in clip_idx]
        p_norms = _norms.unit_norms([p_paths[i][1] for i in clip_idx], axes)
        g_norms = _norms.unit_norms([g_leaves[i] for i in clip_idx], axes)
        c, floor = jnp.asarray(clipping, jnp.float32), jnp.asarray(eps, jnp.float32)
        bounds = [c * jnp.maximum(pn, floor) for pn in p_norms]
        kept = _norms.leaf_norms([g_leaves[i] for i in keep_idx])
        scaled, stats = clip_units(state, [g_leaves[i] for i in clip_idx], g_norms, bounds, kept)
        out = list(g_leaves)
        for i, g in zip(clip_idx, scaled, strict=True):
            out[i] = g
        return treedef.unflatten(out), stats

    return optax.GradientTransformation(_stats.init_fn, update_fn)


def _check_mask(fn: str, mask: Any, name: str = "mask") -> None:
    """Raises a `TypeError` unless every leaf of `mask` is a bool (a string such as "False" is truthy)."""
    for path, flag in jax.tree_util.tree_flatten_with_path(mask, is_leaf=lambda x: x is None)[0]:
        _checks.boolean(fn, f"{name}{jax.tree_util.keystr(path)}", flag, arrays=True)
