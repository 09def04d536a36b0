"""The one place where optaxclip computes L2 norms of arrays and pytrees.

Every norm is accumulated in float32 whatever the leaf dtype. The fast path
squares float32 values directly: one read of the data, which XLA fuses into
a vectorized reduction. For a global norm, leaves of at most `_SMALL`
elements (biases, norms' scales, scalars) are concatenated, a few thousand
at a time, so they cost one reduction per group instead of one per leaf.
Only when a sum overflowed (finite values around 1e19 and up), is NaN, or
may have lost precision to underflow (sums below `_TINY`) does one
`lax.cond` take the rescue path, which squares the values times `2**-64`
(after an overflow) or `2**64` (when tiny) and undoes the scale on the
root: exact, so a 1e30 gradient has the finite, correct norm 1e30. The
rescue path is one reduction per array and a few scalars on purpose: on
XLA:CPU an untaken branch still costs each step, in proportion to its
number of kernels (`benchmarks/overheads.py`). Per-leaf norms are combined
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
# The rescue path's scales: after an overflow every square is scaled by 2**-128,
# so only squares below ~4 (negligible beside a sum over 3.4e38) are flushed, and
# the scaled sum overflows exactly when the norm is beyond float32's range; when
# tiny (norm < 1e-10), scaling by 2**64 cannot overflow.
_DOWN, _UP = 2.0**-64, 2.0**64
# Global norms concatenate leaves of at most _SMALL elements, _GROUP elements per
# concatenation: a copy of at most 256 KiB, instead of a few kernels per leaf.
_SMALL, _GROUP = 4096, 1 << 16

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


def _rescue_scale(fast: jax.Array) -> jax.Array:
    """`2**64` where the fast sum of squares is tiny, else `2**-64` (it overflowed or is NaN)."""
    return jnp.where(fast < _TINY, jnp.asarray(_UP, F32), jnp.asarray(_DOWN, F32))


def _sumsq(x: jax.Array, axes: Axes, scale: jax.Array | None = None) -> jax.Array:
    """Sum over `axes` (dims kept) of `(x * scale)**2` in float32."""
    x = x.astype(F32)
    if scale is not None:
        # Each array gets its own runtime scale: XLA would otherwise share one broadcast
        # of it between same-shaped arrays and materialize it at their size.
        scale, x = jax.lax.optimization_barrier((scale, x))
        x = x * scale
    return jnp.sum(jnp.square(x), axis=axes, keepdims=True)


def _tree_sumsq(leaves: Sequence[jax.Array], scale: jax.Array | None = None) -> jax.Array:
    """Sum over all `leaves` of `(x * scale)**2`: a float32 scalar, small leaves concatenated."""
    arrays, group, size = [], [], 0
    for x in leaves:
        if x.size > _SMALL:
            arrays.append(x)
            continue
        if group and size + x.size > _GROUP:
            arrays.append(jnp.concatenate(group))
            group, size = [], 0
        group.append(jnp.reshape(x.astype(F32), (-1,)))
        size += x.size
    if group:
        arrays.append(jnp.concatenate(group))
    return sum(jnp.sum(_sumsq(x, _all_axes(x), scale)) for x in arrays)


def _rescued_global_norm(leaves: Sequence[jax.Array], fast: jax.Array, axis_name: str | None) -> jax.Array:
    """The global norm on the rescue path, from the tree's fast sum of squares `fast`.

    A trustworthy fast sum is kept (the value clip's cond can land here with one,
    when its own sums, scaled to a huge bound, underflowed).
    """
    scale = _rescue_scale(fast)
    total = _tree_sumsq(leaves, scale)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return jnp.where(_ok(fast), jnp.sqrt(fast), jnp.sqrt(total) / scale)


def _ok(fast: jax.Array) -> jax.Array:
    """Whether a fast float32 sum of squares is trustworthy: finite and not tiny."""
    return jnp.isfinite(fast) & (fast >= _TINY)


def _norms(leaves: Sequence[jax.Array], axes: Sequence[Axes], axis_name: str | None) -> list[jax.Array]:
    """Norm of each array over its `axes` (dims kept), overflow- and underflow-safe.

    One `lax.cond` decides for all arrays together: fast float32 sums of
    squares when every one is trustworthy, else the rescue path, which
    rescales only the sums that need it (a unit whose fast sum was fine
    keeps it: scaling its small elements by `2**-64` would flush them).
    """
    if not leaves:
        return []
    fast = [_sumsq(x, a) for x, a in zip(leaves, axes, strict=True)]
    if axis_name is not None:
        fast = jax.lax.psum(fast, axis_name)
    ok = jnp.all(_ok(jnp.concatenate([jnp.reshape(f, (-1,)) for f in fast])))

    def rescue(xs, fast):
        out = []
        for x, a, f in zip(xs, axes, fast, strict=True):
            scale = _rescue_scale(f)
            s = _sumsq(x, a, scale)
            if axis_name is not None:
                s = jax.lax.psum(s, axis_name)
            out.append(jnp.where(_ok(f), jnp.sqrt(f), jnp.sqrt(s) / scale))
        return out

    return jax.lax.cond(ok, lambda _, fast: [jnp.sqrt(f) for f in fast], rescue, list(leaves), fast)


def _l2(norms: jax.Array, axis: int) -> jax.Array:
    """L2 norm along `axis` of an array of norms, overflow-safe (no pass over the data)."""
    m = jnp.max(norms, axis=axis, keepdims=True, initial=0.0)  # NaN propagates, inf dominates
    k = _exponent(m)
    s = jnp.sum(jnp.square(norms * _pow2(-k)), axis=axis, keepdims=True)
    usable = jnp.isfinite(m) & (m > 0)  # else m itself: 0, inf or NaN
    return jnp.squeeze(jnp.where(usable, jnp.sqrt(s) * _pow2(k), m), axis)


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
    # One sum of squares for the whole tree; the cond rescales only when that sum
    # overflowed, is NaN or may have underflowed.
    fast = _tree_sumsq(leaves)
    if axis_name is not None:
        fast = jax.lax.psum(fast, axis_name)
    rescue = lambda xs, fast: _rescued_global_norm(xs, fast, axis_name)
    return jax.lax.cond(_ok(fast), lambda _, fast: jnp.sqrt(fast), rescue, leaves, fast)


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
    return _l2(jnp.stack([n.reshape(batch) for n in norms]), 0)


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
    norm on the rescue path. Non-finite data gives a non-finite pre-clip norm
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
    ok = _ok(total)
    rescue = lambda xs: _rescued_global_norm(xs, _tree_sumsq(xs), None)
    pre = jax.lax.cond(ok, lambda _: jnp.sqrt(total) * _pow2(k), rescue, list(leaves))
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
    return combine_norms_each(norms)[0]


def combine_norms_each(*groups: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """`combine_norms` of each group, computed together: one float32 scalar per group.

    The groups are concatenated into the zero-padded rows of one small matrix
    (zeros leave an L2 norm unchanged), so a transform's pre-clip, post-clip
    and threshold norms cost a few kernels in all, not a few each: on XLA:CPU
    every kernel costs microseconds however small it is.
    """
    rows = [
        jnp.concatenate([jnp.reshape(n, (-1,)).astype(F32) for n in g] or [jnp.zeros((0,), F32)])
        for g in groups
    ]
    width = max(r.shape[0] for r in rows)
    return tuple(_l2(jnp.stack([jnp.pad(r, (0, width - r.shape[0])) for r in rows]), 1))


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
