"""The clip steps the families share: to one global bound, and per unit (leaf or slice).

`clip_to_bound` is the step of `clip_by_global_norm` and of the adaptive
clips (whose bound comes from their history); `clip_units` is the step of
`clip_by_leaf_norm` and of AGC (whose bounds come from the parameters).
Both record the step's `ClipStats`; neither reads the updates beyond the
multiply, which fuses into the next elementwise pass (for example adam's).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from . import _norms, _stats

F32 = jnp.float32


def clip_to_bound(updates, stats: _stats.ClipStats, norm: jax.Array, bound: jax.Array):
    """Scales the float leaves of `updates` (global norm `norm`) to norm <= `bound`.

    Returns the scaled updates and the new stats. Non-float leaves pass
    through untouched.
    """
    factor = _norms.scale_factor(norm, bound)
    leaves, treedef, idx = _norms.float_leaves(updates)
    out = list(leaves)
    for i in idx:
        out[i] = _norms.scale(leaves[i], factor)
    stats = _stats.record(
        stats,
        pre_clip_norm=norm,
        post_clip_norm=norm * factor,
        threshold=bound,
        clipped=factor < 1,
    )
    return treedef.unflatten(out), stats


def clip_units(
    stats: _stats.ClipStats,
    leaves: Sequence[jax.Array],
    norms: Sequence[jax.Array],
    bounds: Sequence[jax.Array],
    unclipped_norms: Sequence[jax.Array] = (),
):
    """Scales each unit of each leaf (norms `norms`, dims kept) to norm <= its bound.

    `bounds` broadcast against `norms`. `unclipped_norms` are the norms of
    leaves that pass through unclipped (they count in the pre- and post-clip
    norms). The stats' threshold is `sqrt(sum_u bound_u**2)` over the units,
    the largest global norm the clipped leaves can have. Returns the scaled
    leaves and the new stats.
    """
    bounds = [jnp.broadcast_to(jnp.maximum(b, 0.0), n.shape) for n, b in zip(norms, bounds, strict=True)]
    factors = [_norms.scale_factor(n, b) for n, b in zip(norms, bounds, strict=True)]
    out = [_norms.scale(g, f) for g, f in zip(leaves, factors, strict=True)]
    unclipped = list(unclipped_norms)
    post = [n * f for n, f in zip(norms, factors, strict=True)]
    clipped = jnp.any(jnp.stack([jnp.any(f < 1) for f in factors])) if factors else jnp.zeros((), bool)
    stats = _stats.record(
        stats,
        pre_clip_norm=_norms.combine_norms(list(norms) + unclipped),
        post_clip_norm=_norms.combine_norms(post + unclipped),
        threshold=_norms.combine_norms(bounds),
        clipped=clipped,
    )
    return out, stats
