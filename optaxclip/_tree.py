"""The one place where optaxclip computes L2 norms of arrays and pytrees.

Every norm is accumulated in float32 whatever the leaf dtype. Each leaf's
fast path squares its float32 values directly: one read of the data, which
XLA fuses into a vectorized reduction. Only when some sum overflowed
(finite values around 1e19 and up) or may have lost precision to underflow
(sums below `_TINY`) does one `lax.cond` take the slow path, which
first finds each leaf's largest magnitude and scales by a power of two near
it (exact, see `_exponent`) before squaring, so a 1e30 gradient has the
finite, correct norm 1e30. Per-leaf norms are then combined
overflow-safely without touching the data again. Under `jax.vmap` a cond
becomes a select and both paths run.

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


def _exponent(m: jax.Array) -> jax.Array:
    """An exponent `k` such that `|x| * 2**-k <= 4` for `|x| <= m`, with `2**-k` normal.

    Scaling by a power of two is exact; clamping `k` to [-126, 126] keeps the
    factor a normal float32 (XLA flushes subnormal ones, such as 2**-128, to
    zero). `m` that is 0, inf or NaN gives 0.
    """
    m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    return jnp.clip(jnp.frexp(m)[1], -126, 126)


def _pow2(k: jax.Array) -> jax.Array:
    return jnp.ldexp(jnp.ones((), F32), k)


def _sumsq(x: jax.Array, axes: Axes, k: jax.Array | None = None) -> jax.Array:
    x = x.astype(F32)
    if k is not None:
        x = x * _pow2(-k)
    return jnp.sum(jnp.square(x), axis=axes, keepdims=True)


def _finish(m: jax.Array, scaled_sumsq: jax.Array, k: jax.Array) -> jax.Array:
    """`sqrt(s) * 2**k` where `m` is a usable scale, else `m` itself (0, inf or NaN)."""
    good = jnp.isfinite(m) & (m > 0)
    return jnp.where(good, jnp.sqrt(scaled_sumsq) * _pow2(k), m)


def _scaled_norms(
    leaves: Sequence[jax.Array], axes: Sequence[Axes], axis_name: str | None
) -> list[jax.Array]:
    """The slow, safe path: each array scaled by a power of two near its largest magnitude."""
    out = []
    for x, a in zip(leaves, axes, strict=True):
        m = jnp.max(jnp.abs(x.astype(F32)), axis=a, keepdims=True, initial=0.0)
        if axis_name is not None:
            m = jax.lax.pmax(m, axis_name)
        k = _exponent(m)
        s = _sumsq(x, a, k)
        if axis_name is not None:
            s = jax.lax.psum(s, axis_name)
        out.append(_finish(m, s, k))
    return out


def _scaled_global_norm(leaves: Sequence[jax.Array], axis_name: str | None) -> jax.Array:
    """The global norm on the slow, safe path (the branch the fast paths' conds fall back to)."""
    return combine_norms(_scaled_norms(leaves, [_all_axes(x) for x in leaves], axis_name))


def _norms(leaves: Sequence[jax.Array], axes: Sequence[Axes], axis_name: str | None) -> list[jax.Array]:
    """Norm of each array over its `axes` (dims kept), overflow- and underflow-safe.

    One `lax.cond` decides for all arrays together: fast float32 sums of
    squares when every one is trustworthy, else the scaled path for all.
    (One cond per leaf costs a few microseconds each on CPU, which showed at
    1e5 parameters; the cond's operands are the leaves themselves, so XLA
    adds no copy of them.)
    """
    if not leaves:
        return []
    fast = [_sumsq(x, a) for x, a in zip(leaves, axes, strict=True)]
    if axis_name is not None:
        fast = jax.lax.psum(fast, axis_name)
    sums = jnp.concatenate([jnp.reshape(f, (-1,)) for f in fast])
    ok = jnp.all(jnp.isfinite(sums) & (sums >= _TINY))
    slow = lambda xs: _scaled_norms(xs, axes, axis_name)
    return jax.lax.cond(ok, lambda _: [jnp.sqrt(f) for f in fast], slow, list(leaves))


def _l2_axis0(stacked: jax.Array) -> jax.Array:
    """L2 norm along axis 0 of an array of norms, overflow-safe (no pass over the data)."""
    m = jnp.max(stacked, axis=0, keepdims=True, initial=0.0)  # NaN propagates, inf dominates
    k = _exponent(m)
    s = jnp.sum(jnp.square(stacked * _pow2(-k)), axis=0, keepdims=True)
    return _finish(m, s, k)[0]


def _all_axes(x: jax.Array) -> Axes:
    return tuple(range(jnp.ndim(x)))


def global_norm(tree, axis_name: str | None = None) -> jax.Array:
    """Global L2 norm of all leaves of `tree`, as a float32 scalar.

    Args:
      tree: A pytree of arrays (any float dtype).
      axis_name: Inside `shard_map`/`pmap`, where each device holds a
        disjoint shard of `tree`, the mapped axis to sum the squares over.

    Returns:
      A float32 scalar; finite and correct for any finite input whose norm
      float32 can hold.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> print(f'{float(optaxclip.global_norm({"a": jnp.array([3e30, 4e30])})):.4g}')
      5e+30
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), F32)
    # One sum of squares for the whole tree; the cond rescales every leaf only
    # when that sum overflowed, is NaN or may have underflowed.
    fast = sum(jnp.sum(_sumsq(x, _all_axes(x))) for x in leaves)
    if axis_name is not None:
        fast = jax.lax.psum(fast, axis_name)
    ok = jnp.isfinite(fast) & (fast >= _TINY)
    slow = lambda xs: _scaled_global_norm(xs, axis_name)
    return jax.lax.cond(ok, lambda _: jnp.sqrt(fast), slow, leaves)


def leaf_norms(tree, axis_name: str | None = None):
    """L2 norm of each leaf of `tree`: a pytree of float32 scalars."""
    leaves, treedef = jax.tree.flatten(tree)
    norms = _norms(leaves, [_all_axes(x) for x in leaves], axis_name)
    return treedef.unflatten([n.reshape(()) for n in norms])


def unit_norms(leaves: Sequence[jax.Array], axes: Sequence[Axes]) -> list[jax.Array]:
    """Norms of each leaf over its reduced `axes`, dims kept (unit-wise norms)."""
    return _norms(leaves, axes, None)


def batch_global_norms(tree) -> jax.Array:
    """Global norm of each example: leaves have a leading batch axis; shape `[B]`."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), F32)
    batch = leaves[0].shape[0]
    norms = _norms(leaves, [_all_axes(x)[1:] for x in leaves], None)
    return _l2_axis0(jnp.stack([n.reshape(batch) for n in norms]))


def clamped_norms(
    leaves: Sequence[jax.Array],
    lo: jax.Array,
    hi: jax.Array,
    norms: Sequence[jax.Array],
    clamped: Sequence[jax.Array],
) -> list[jax.Array]:
    """Norm of each `clip(x, lo, hi)`, where `clamped` says some element left the range.

    A leaf with nothing clamped keeps its norm from `norms` and its data is
    not read again; only the others take a second read, in a per-leaf
    `lax.cond` whose operand is the leaf itself. Values are scaled by a
    power of two near `max(|lo|, |hi|)` before squaring, so no bound can
    overflow; contributions below about 1e-19 of that bound are lost to
    float32 underflow.
    """
    k = _exponent(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))

    def one(x, norm, flag):
        def reread(x):
            x = x.astype(F32) * _pow2(-k)
            sq = jnp.square(jnp.minimum(jnp.maximum(x, lo * _pow2(-k)), hi * _pow2(-k)))
            return jnp.sqrt(jnp.sum(sq)) * _pow2(k)

        return jax.lax.cond(flag, reread, lambda _: norm, x)

    return [one(x, n, f) for x, n, f in zip(leaves, norms, clamped, strict=True)]


def symmetric_clamp_norms(
    leaves: Sequence[jax.Array], hi: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Global norms before and after clamping every element into `[-hi, hi]`, and whether any left it.

    Two reads of each leaf, with `x` and `h` the values and `hi` scaled by
    a power of two near `hi` (exact): `inside = sum(min(x**2, h**2))` and
    `excess = sum(max(x**2, h**2) - h**2)`. Then the post-clip norm is
    `sqrt(inside)`, the pre-clip norm `sqrt(inside + excess)` (two
    non-negative sums: no cancellation), and an element was clamped exactly
    when `excess > 0` (for finite `|x| > h >= 0.5`, `x**2` rounds to more
    than `h**2`, and nothing underflows). Only when `inside + excess`
    overflowed (elements beyond about 1e19 times `hi`), is NaN, or is small
    enough to have underflowed does one `lax.cond` recompute the pre-clip
    norm on the scaled path. Non-finite data gives a non-finite pre-clip norm
    and `clipped=False`.
    """
    if not leaves:
        zero = jnp.zeros((), F32)
        return zero, zero, jnp.zeros((), bool)
    k = _exponent(hi)
    inside, excess = [], []
    for x in leaves:
        # Barriers: each leaf gets its own runtime `h` and scale (a constant's broadcast
        # shared by several reductions is materialized at the leaf's size), XLA cannot rewrite
        # (hi * 2**-k)**2 as hi**2 * 2**-2k (inf * 0 for a bound near 1e30), and the
        # two reads stay two vectorized loops rather than one slow multi-output loop.
        h, s, x = jax.lax.optimization_barrier((hi * _pow2(-k), _pow2(-k), x))
        inside.append(jnp.sum(jnp.minimum(jnp.square(x.astype(F32) * s), h * h)))
        inside[-1], h, s, x = jax.lax.optimization_barrier((inside[-1], h, s, x))
        excess.append(jnp.sum(jnp.maximum(jnp.square(x.astype(F32) * s), h * h) - h * h))
    inside, excess = sum(inside), sum(excess)
    total = inside + excess
    ok = jnp.isfinite(total) & (total >= _TINY)
    slow = lambda xs: _scaled_global_norm(xs, None)
    pre = jax.lax.cond(ok, lambda _: jnp.sqrt(total) * _pow2(k), slow, list(leaves))
    clipped = (excess > 0) & jnp.isfinite(pre)
    post = jnp.where(clipped, jnp.sqrt(inside) * _pow2(k), pre)
    return pre, post, clipped


def combine_norms(norms: Sequence[jax.Array]) -> jax.Array:
    """L2 norm of the concatenation of norms (arrays of any shape), overflow-safe.

    This turns per-leaf or per-unit norms into a global norm without reading
    the data again: the largest norm gives a power-of-two scale (exact) and
    the scaled squares are summed, so nothing can overflow, and no norm that
    matters can underflow. No branch.
    """
    flat = [jnp.reshape(n, (-1,)).astype(F32) for n in norms]
    if not flat:
        return jnp.zeros((), F32)
    # One concatenation of the (small) norm arrays: a few kernels rather than two per array.
    return _l2_axis0(jnp.concatenate(flat))


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
