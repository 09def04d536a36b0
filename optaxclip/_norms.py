"""The one place where optaxclip computes L2 norms: one read of the data, no branch.

Every norm is accumulated in float32 whatever the leaf dtype, from two sums
taken in the same pass over the data: the plain sum of squares and the sum
of squares of the values scaled by `2**-64` (exact: a power of two). The
plain sum is used where it is finite; where it overflowed (finite values
around 1e19 and up) the scaled one is, and its root is scaled back, so a
1e30 gradient has the finite, correct norm 1e30. No conditional and no
select between two versions of the data: under `jax.vmap` and on every
backend the cost is one read of the data with two accumulators, which XLA
fuses into one reduction loop on GPU and TPU.

Edge cases: NaN data gives a NaN norm; inf and no NaN gives +inf; a norm
beyond float32's range (above 3.4e38, from finite elements near that size)
is +inf. Squares below float32's smallest normal number (elements below
about 1e-19) flush to zero on CPU and GPU, so a norm below about 1e-19
reads as 0; such a gradient is left unscaled by every clip, which is
harmless. Integer, bool and `float0` leaves (a step counter in the params,
`jax.grad(..., allow_int=True)`) are not gradients: `float_leaves` leaves
them out of every norm and the clips pass them through untouched (the DP
entry points refuse integer and bool leaves instead: see `dp_aggregate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

F32 = jnp.float32
# The overflow accumulator's scale: squares of x * 2**-64 overflow only when the
# norm is beyond float32's range, and the squares it flushes (|x| < ~1e-19 * 2**64)
# are negligible beside a plain sum that overflowed (> 3.4e38).
_DOWN = 2.0**-64
_UP = 2.0**64

Axes = tuple[int, ...]


def _down() -> jax.Array:
    """`2**-64` as a runtime value: XLA would rewrite `(x * 2**-64)**2` with a constant
    as `x**2 * 2**-128`, and `2**-128` flushes to zero (inf * 0 = NaN for a 1e30 norm)."""
    return jax.lax.optimization_barrier(jnp.asarray(_DOWN, F32))


def is_float(x) -> bool:
    """Whether a leaf is a floating-point gradient (not integer, bool or `float0`)."""
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def float_leaves(tree) -> tuple[list, object, list[int]]:
    """`(leaves, treedef, idx)`: the flattened `tree` and the indices of its float leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    return leaves, treedef, [i for i, x in enumerate(leaves) if is_float(x)]


def sumsq_pair(x: jax.Array, axes: Axes) -> tuple[jax.Array, jax.Array]:
    """Sums over `axes` (dims kept) of `x**2` and of `(x * 2**-64)**2`, in float32, in one pass."""
    # The barrier pairs the scale with this array: XLA would otherwise share one
    # broadcast of the scale between same-shaped arrays and materialize it at their size.
    down, x = jax.lax.optimization_barrier((jnp.asarray(_DOWN, F32), x))
    x = x.astype(F32)
    plain = jnp.sum(jnp.square(x), axis=axes, keepdims=True)
    scaled = jnp.sum(jnp.square(x * down), axis=axes, keepdims=True)
    return plain, scaled


def plain_sumsq(x: jax.Array, axis: Axes | int | None = None) -> jax.Array:
    """The plain float32 sum of squares of `x` over `axis` (all by default), in one read.

    Not overflow-safe: it reads inf once the norm passes about 1.8e19. For
    the callers that document that and keep one reduction: `clip_by_value`'s
    default stats and the ghost path's per-example squared norms.
    """
    return jnp.sum(jnp.square(x.astype(F32)), axis=axis)


def root(plain: jax.Array, scaled: jax.Array) -> jax.Array:
    """The norm from a `sumsq_pair`: the plain sum's root where finite, else the scaled one's."""
    return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), jnp.sqrt(scaled) * _UP)


def _all_axes(x) -> Axes:
    return tuple(range(jnp.ndim(x)))


def global_norm(tree, axis_name: str | None = None) -> jax.Array:
    """Global L2 norm of the float leaves of `tree`, as a float32 scalar.

    Args:
      tree: A pytree of arrays (any float dtype; other leaves are left out).
      axis_name: Inside `shard_map`/`pmap`, where each device holds a
        disjoint shard of `tree`, the mapped axis to sum the squares over.

    Returns:
      A float32 scalar; finite and correct for any finite input whose norm
      float32 can hold (norms below about 1e-19 read as 0).

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> print(f'{float(optaxclip.global_norm({"a": jnp.array([3e30, 4e30])})):.4g}')
      5e+30
    """
    leaves, _, idx = float_leaves(tree)
    pairs = [sumsq_pair(leaves[i], _all_axes(leaves[i])) for i in idx]
    plain = sum((jnp.sum(p) for p, _ in pairs), jnp.zeros((), F32))
    scaled = sum((jnp.sum(s) for _, s in pairs), jnp.zeros((), F32))
    if axis_name is not None:
        plain, scaled = jax.lax.psum((plain, scaled), axis_name)
    return root(plain, scaled)


def unit_norms(leaves: Sequence[jax.Array], axes: Sequence[Axes], axis_name: str | None = None) -> list:
    """Norm of each array over its `axes` (dims kept): per-leaf or per-unit norms.

    The per-leaf sums are concatenated so that the root (and the `psum`)
    is one operation over all units rather than a few small ones per leaf.
    """
    if not leaves:
        return []
    pairs = [sumsq_pair(x, a) for x, a in zip(leaves, axes, strict=True)]
    plain = jnp.concatenate([p.reshape(-1) for p, _ in pairs])
    scaled = jnp.concatenate([s.reshape(-1) for _, s in pairs])
    if axis_name is not None:
        plain, scaled = jax.lax.psum((plain, scaled), axis_name)
    return split(root(plain, scaled), [p.shape for p, _ in pairs])


def split(flat: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """`flat` cut into consecutive pieces of the given shapes (the inverse of concatenating them)."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def leaf_norms(leaves: Sequence[jax.Array], axis_name: str | None = None) -> list[jax.Array]:
    """L2 norm of each array in `leaves`: a list of float32 scalars."""
    return [n.reshape(()) for n in unit_norms(leaves, [_all_axes(x) for x in leaves], axis_name)]


def batch_global_norms(tree) -> jax.Array:
    """Global norm of each example: the float leaves have a leading batch axis; shape `[B]`."""
    leaves, _, idx = float_leaves(tree)
    if not idx:
        return jnp.zeros((jnp.shape(leaves[0])[0] if leaves else 0,), F32)
    batch = leaves[idx[0]].shape[0]
    plain = jnp.zeros((batch,), F32)
    scaled = jnp.zeros((batch,), F32)
    for i in idx:
        p, s = sumsq_pair(leaves[i], _all_axes(leaves[i])[1:])
        plain, scaled = plain + p.reshape(batch), scaled + s.reshape(batch)
    return root(plain, scaled)


def combine_norms(norms: Sequence[jax.Array], axis_name: str | None = None) -> jax.Array:
    """L2 norm of the concatenation of `norms` (arrays of any shape), overflow-safe.

    Turns per-leaf, per-unit or per-example norms into a global norm
    without reading the data again (the norms are small arrays). With
    `axis_name`, also over the devices of that axis.
    """
    flat = [jnp.reshape(n, (-1,)).astype(F32) for n in norms]
    plain = sum((jnp.sum(jnp.square(n)) for n in flat), jnp.zeros((), F32))
    down = _down()
    scaled = sum((jnp.sum(jnp.square(n * down)) for n in flat), jnp.zeros((), F32))
    if axis_name is not None:
        plain, scaled = jax.lax.psum((plain, scaled), axis_name)
    return root(plain, scaled)


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


def pow2(k: jax.Array) -> jax.Array:
    """`2.0**k` in float32, exactly, for integer `k` in [-126, 127] (built from its bits: no rounding)."""
    k = jnp.clip(jnp.asarray(k, jnp.int32), -126, 127)
    return jax.lax.bitcast_convert_type((k + 127) << 23, F32)


def exponent(m: jax.Array) -> jax.Array:
    """The int32 `e` with `m * 2**-e` in [0.5, 1) for finite normal `m > 0`, clipped to
    [-125, 125] so that `pow2(-e)` is a normal number: the exact power-of-two scale of a row set."""
    # The biased exponent field, read from the bits (frexp's special cases cost ~20 ops an element
    # wherever XLA fuses this into a consumer): a finite m > 0 is in [2**(E - 127), 2**(E - 126)).
    # Zero and subnormals read E = 0 (-125 after the clip); inf and NaN E = 255 (125).
    bits = jax.lax.bitcast_convert_type(jnp.abs(m.astype(F32)), jnp.int32)
    return jnp.clip((bits >> 23) - 126, -125, 125)


def row_norms(x: jax.Array) -> jax.Array:
    """Norm of each row (axis 0) of `x` over its other axes, overflow-safe, float32 `[rows]`."""
    plain, scaled = sumsq_pair(x, tuple(range(1, x.ndim)))
    return root(plain, scaled).reshape(x.shape[0])


def combine_rows(norms: Sequence[jax.Array]) -> jax.Array:
    """`sqrt(sum_i norms[i]**2)` elementwise over same-shaped arrays (per-example norms of each leaf),
    overflow-safe: a 1e30 leaf norm gives 1e30, not inf."""
    if not norms:
        return jnp.zeros((0,), F32)
    # One reduction over the stacked leaves, not a chain of adds: XLA fuses an elementwise chain
    # into every consumer (each clipped leaf's sum would recompute all the leaves' norms per element).
    stacked = jnp.stack([jnp.asarray(n, F32) for n in norms])
    plain = jnp.sum(jnp.square(stacked), axis=0)
    scaled = jnp.sum(jnp.square(stacked * _down()), axis=0)
    return root(plain, scaled)
