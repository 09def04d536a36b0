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
    shapes = [n.shape for n in norms]
    if not shapes:
        return [], _stats.record(
            stats,
            pre_clip_norm=_norms.combine_norms(list(unclipped_norms)),
            post_clip_norm=_norms.combine_norms(list(unclipped_norms)),
            threshold=jnp.zeros((), F32),
            clipped=jnp.zeros((), bool),
        )
    # All units in one vector: a few operations in all, not a few small kernels per leaf.
    flat = lambda xs: jnp.concatenate([jnp.reshape(x, (-1,)) for x in xs])  # noqa: E731
    norm = flat(norms)
    bound = flat([jnp.broadcast_to(jnp.maximum(b, 0.0), s) for b, s in zip(bounds, shapes, strict=True)])
    factor = _norms.scale_factor(norm, bound)
    out = [_norms.scale(g, f) for g, f in zip(leaves, _norms.split(factor, shapes), strict=True)]
    unclipped = list(unclipped_norms)
    stats = _stats.record(
        stats,
        pre_clip_norm=_norms.combine_norms([norm, *unclipped]),
        post_clip_norm=_norms.combine_norms([norm * factor, *unclipped]),
        threshold=_norms.combine_norms([bound]),
        clipped=jnp.any(factor < 1),
    )
    return out, stats
