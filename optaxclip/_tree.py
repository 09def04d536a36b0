"""The one place where optaxclip computes L2 norms of arrays and pytrees.

Every norm is accumulated in float32 whatever the leaf dtype. The fast path
squares the float32 values directly: one read of the data, which XLA fuses
with the consumer of the norm. Only when that sum overflowed (finite values
around 1e19 and up) or may have lost precision to underflow (sums below
`_TINY`) does a `lax.cond` take the slow path, which first finds the largest
magnitude and scales by it before squaring, so a 1e30 gradient has the
finite, correct norm 1e30. The predicate is one scalar, so the slow path
costs nothing unless it runs (under `jax.vmap` the cond becomes a select and
both paths run).

Non-finite input gives a non-finite norm: +inf when the data holds an inf
and no NaN, NaN when it holds a NaN. A norm beyond float32's range (above
3.4e38, from finite elements near that size) is +inf too. Subnormal
inputs (below 1.2e-38) count as zero: XLA flushes them on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Below this sum of squares, float32 squares of the smallest elements may
# have underflowed: recompute with scaling.
_TINY = 1e-20

Axes = tuple[int, ...]


def _sumsq(x: jax.Array, axes: Axes, scale: tuple[jax.Array, jax.Array] | None = None):
    x = x.astype(F32)
    if scale is not None:
        # Two exact power-of-two steps: XLA turns `x / m` into `x * (1 / m)`, and
        # 1 / 3e38 is subnormal, which the CPU flushes to zero.
        x = x / scale[0] / scale[1]
    return jnp.sum(jnp.square(x), axis=axes, keepdims=True)


def _pow2_scale(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two powers of two, each a normal float32, whose product is about `m`.

    Dividing by them is exact, and brings values of magnitude <= `m` into
    [-1, 1]. `m` that is 0, inf or NaN gives (1, 1).
    """
    m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    _, e = jnp.frexp(m)
    half = e // 2
    one = jnp.ones((), F32)
    return jnp.ldexp(one, half), jnp.ldexp(one, e - half)


def _maxabs(x: jax.Array, axes: Axes) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(F32)), axis=axes, keepdims=True, initial=0.0)


def _finish(m: jax.Array, scaled_sumsq: jax.Array) -> jax.Array:
    """Undoes `_pow2_scale(m)` on `sqrt(s)`; where `m` is 0, inf or NaN, returns `m`."""
    p1, p2 = _pow2_scale(m)
    good = jnp.isfinite(m) & (m > 0)
    return jnp.where(good, jnp.sqrt(scaled_sumsq) * p1 * p2, m)


def _norms(
    leaves: Sequence[jax.Array],
    axes: Sequence[Axes],
    out_shape: tuple[int, ...] | None,
    axis_name: str | None,
) -> list[jax.Array]:
    """Norms of `leaves`, each over its `axes` (results keep dims).

    If `out_shape` is given, the per-leaf sums are reshaped to it and added,
    giving one combined norm (the global norm, or one norm per example).
    `axis_name` sums (and maxes) over a mapped axis.
    """
    if not leaves:
        shape = out_shape if out_shape is not None else ()
        return [jnp.zeros(shape, F32)]

    def combine(parts, op):
        if out_shape is None:
            return parts
        total = parts[0].reshape(out_shape)
        for p in parts[1:]:
            total = op(total, p.reshape(out_shape))
        return [total]

    def reduce_axis(parts, collective):
        return [collective(p, axis_name) for p in parts] if axis_name else parts

    fast = reduce_axis(combine([_sumsq(x, a) for x, a in zip(leaves, axes)], jnp.add), jax.lax.psum)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s) & (s >= _TINY)) for s in fast]))

    def fast_path():
        return [jnp.sqrt(s) for s in fast]

    def slow_path():
        m = combine([_maxabs(x, a) for x, a in zip(leaves, axes)], jnp.maximum)
        m = reduce_axis(m, jax.lax.pmax)
        if out_shape is None:
            scales = [_pow2_scale(mi) for mi in m]
        else:
            shared = _pow2_scale(m[0])
            shapes = [_keepdims_shape(x.shape, a) for x, a in zip(leaves, axes)]
            scales = [(shared[0].reshape(sh), shared[1].reshape(sh)) for sh in shapes]
        s = combine([_sumsq(x, a, sc) for x, a, sc in zip(leaves, axes, scales)], jnp.add)
        s = reduce_axis(s, jax.lax.psum)
        return [_finish(mi, si) for mi, si in zip(m, s)]

    return jax.lax.cond(ok, fast_path, slow_path)


def _keepdims_shape(shape: tuple[int, ...], axes: Axes) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _all_axes(x: jax.Array) -> Axes:
    return tuple(range(jnp.ndim(x)))


def global_norm(tree, axis_name: str | None = None) -> jax.Array:
    """Global L2 norm of all leaves of `tree`, as a float32 scalar.

    Args:
      tree: A pytree of arrays (any float dtype).
      axis_name: Inside `shard_map`/`pmap`, where each device holds a
        disjoint shard of `tree`, the mapped axis to sum the squares over.

    Returns:
      A float32 scalar; finite and correct for any finite input.
    """
    leaves = jax.tree.leaves(tree)
    return _norms(leaves, [_all_axes(x) for x in leaves], (), axis_name)[0]


def leaf_norms(tree, axis_name: str | None = None):
    """L2 norm of each leaf of `tree`: a pytree of float32 scalars."""
    leaves, treedef = jax.tree.flatten(tree)
    norms = _norms(leaves, [_all_axes(x) for x in leaves], None, axis_name)
    return treedef.unflatten([n.reshape(()) for n in norms]) if leaves else tree


def unit_norms(leaves: Sequence[jax.Array], axes: Sequence[Axes]) -> list[jax.Array]:
    """Norms of each leaf over its reduced `axes`, dims kept (unit-wise norms)."""
    return _norms(list(leaves), list(axes), None, None) if leaves else []


def batch_global_norms(tree) -> jax.Array:
    """Global norm of each example: leaves have a leading batch axis; shape `[B]`."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), F32)
    batch = leaves[0].shape[0]
    return _norms(leaves, [_all_axes(x)[1:] for x in leaves], (batch,), None)[0]


def combine_norms(norms: Sequence[jax.Array]) -> jax.Array:
    """L2 norm of the concatenation of norms (arrays of any shape), overflow-safe.

    This turns per-leaf or per-unit norms into a global norm without reading
    the data again.
    """
    if not norms:
        return jnp.zeros((), F32)
    m = jnp.max(jnp.stack([jnp.max(n, initial=0.0) for n in norms]))
    s = sum(jnp.sum(_sumsq(n, _all_axes(n), _pow2_scale(m))) for n in norms)
    return _finish(m, s)  # a NaN norm makes `m` NaN, an inf one makes it inf


def scale_factor(norm: jax.Array, bound: jax.Array) -> jax.Array:
    """`bound / norm` where `norm > bound`, else 1; also 1 for a non-finite norm.

    Safe for `norm == bound == 0` (gives 1, so a zero gradient stays zero) and
    never divides by zero. A non-finite norm gives 1 so that NaN/inf updates
    pass through as they are instead of becoming finite garbage.
    """
    bound = jnp.maximum(bound, 0.0)
    clip = jnp.isfinite(norm) & (norm > bound)
    return jnp.where(clip, bound / jnp.where(clip, norm, 1.0), 1.0)


def scale(x: jax.Array, factor: jax.Array) -> jax.Array:
    """`x * factor` computed in float32, returned in `x`'s dtype (fuses elementwise)."""
    return (x.astype(F32) * factor).astype(x.dtype)

