"""Per-example gradients and the clipped per-example sum that DP-SGD aggregates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _checks, _norms

F32 = jnp.float32


def _as_tuple(argnums: int | Sequence[int]) -> tuple[int, ...]:
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def _check_argnums(fn: str, argnums, batch_argnums) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validates `argnums` / `batch_argnums` at construction; returns both as tuples.

    Each is an int or a tuple/list of ints: anything else (a str, a float, a
    bool) is a `TypeError`; a negative index, an empty or overlapping set a
    `ValueError`.
    """
    for name, nums in (("argnums", argnums), ("batch_argnums", batch_argnums)):
        items = nums if isinstance(nums, (tuple, list)) else (nums,)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
            raise TypeError(
                f"{fn}: `{name}` must be an int or a tuple of ints (argument positions), "
                f"got {name}={_checks.describe(nums)}."
            )
    wrt, batched = _as_tuple(argnums), _as_tuple(batch_argnums)
    if not batched:
        raise ValueError(
            f"{fn}: `batch_argnums` must name at least one argument with the batch axis, "
            f"got batch_argnums={batched!r}."
        )
    if not wrt:
        raise ValueError(f"{fn}: `argnums` must name at least one argument, got argnums={wrt!r}.")
    for name, nums in (("argnums", wrt), ("batch_argnums", batched)):
        if any(i < 0 for i in nums):
            raise ValueError(f"{fn}: `{name}` must be non-negative ints, got {name}={nums!r}.")
    if set(wrt) & set(batched):
        raise ValueError(
            f"{fn}: `batch_argnums` must not overlap `argnums` (the gradient would be taken with "
            f"respect to the batch), got batch_argnums={batched!r} and argnums={wrt!r}."
        )
    return wrt, batched


def _batch_size(fn: str, args: tuple, batch_argnums: tuple[int, ...]) -> int:
    """The leading size shared by every leaf of the batched arguments; raises naming them if not."""
    if max(batch_argnums) >= len(args):
        raise ValueError(
            f"{fn}: `batch_argnums` must index the {len(args)} positional arguments given, "
            f"got batch_argnums={batch_argnums!r}."
        )
    sizes = {}
    for i in batch_argnums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[i])[0]:
            shape = jnp.shape(leaf)
            sizes[f"argument {i}{jax.tree_util.keystr(path)}"] = shape[0] if shape else None
    if not sizes:
        raise ValueError(
            f"{fn}: the `batch_argnums` arguments hold no arrays, got batch_argnums={batch_argnums!r}."
        )
    if len(set(sizes.values())) != 1 or None in sizes.values():
        shown = ", ".join(f"{k}: {'no batch axis' if v is None else v}" for k, v in sizes.items())
        raise ValueError(
            f"{fn}: every array in the `batch_argnums` arguments must have the same leading (batch) "
            f"size, got {shown} for batch_argnums={batch_argnums!r}."
        )
    return next(iter(sizes.values()))


def _check_wrt_dtypes(fn: str, args: tuple, argnums: tuple[int, ...]) -> None:
    """Refuses integer/bool leaves in the differentiated arguments, naming their paths and dtypes.

    Their gradient could not be clipped and noised (see `dp_aggregate`); JAX's
    own error would not say which leaf.
    """
    for i in argnums:
        if i < len(args):
            _checks.dp_leaf_dtypes(fn, f"argument {i}", args[i], allow_float0=False)


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes `x` varies over (empty outside shard_map or with check_vma=False)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # older jax
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma or ())


def _vary_like_batch(args: tuple, argnums: tuple[int, ...], batch_argnums: tuple[int, ...]) -> tuple:
    """Casts the differentiated arguments to vary over the mesh axes the batch varies over.

    Inside `shard_map` with replicated params (`P()`) and `check_vma=True`,
    the gradient with respect to an unvarying argument is summed over the
    mesh axis (its transpose is a `psum`): every "per-example" gradient
    would be the sum of one example per device. A varying copy of the params
    keeps each device's gradients its own.
    """
    axes = frozenset().union(*(_varying_axes(x) for i in batch_argnums for x in jax.tree.leaves(args[i])))
    if not axes:
        return args

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    out = list(args)
    for i in argnums:
        if i < len(out):
            out[i] = jax.tree.map(cast, out[i])
    return tuple(out)


def per_example_grads(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
    """Per-example gradients of `loss_fn` through `jax.vmap(jax.grad(...))`.

    `loss_fn` computes the loss of one example: its `batch_argnums`
    arguments are given without the batch axis. The returned function takes
    them with a leading batch axis and returns gradients whose leaves carry
    that axis (and the per-example aux values with `has_aux`).

    Args:
      loss_fn: `loss_fn(params, example, ...) -> scalar` (or `(scalar, aux)`).
      argnums: Which arguments to differentiate, as in `jax.grad`.
      batch_argnums: Which arguments carry the batch axis.
      has_aux: Whether `loss_fn` returns `(loss, aux)`.
      microbatch_size: If given, the batch is processed in sequential chunks
        of this size (`jax.lax.map`), bounding the activations held at once;
        the batch size must be a multiple of it.

    Returns:
      A function with `loss_fn`'s signature (batched arguments batched).

    Edge cases:
      Inside `jax.shard_map` with replicated params (`in_specs=(P(), P("data"))`,
      the default `check_vma=True`), the differentiated arguments are cast to
      vary over the axes the batch varies over, so each row is its own
      example's gradient (JAX would otherwise sum the gradient of an
      unvarying argument over the mesh axis: one example per device). A
      `ValueError` names `argnums` / `batch_argnums` when they overlap or are
      empty, and the batched arguments when their leading sizes differ, and
      an integer or bool leaf of the differentiated arguments by its path and
      dtype (JAX's own error does not say which leaf).

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> loss = lambda w, x: jnp.sum(w * x) ** 2
      >>> g = optaxclip.per_example_grads(loss)(jnp.ones(2), jnp.array([[1.0, 0.0], [0.0, 2.0]]))
      >>> print(g)
      [[2. 0.]
       [0. 8.]]

    References:
      Abadi et al., Deep Learning with Differential Privacy, 2016.
      https://arxiv.org/abs/1607.00133
    """
    return _per_example_grads("per_example_grads", loss_fn, argnums, batch_argnums, has_aux, microbatch_size)


def _per_example_grads(fn, loss_fn, argnums, batch_argnums, has_aux, microbatch_size):
    _checks.function(fn, "loss_fn", loss_fn)
    _checks.boolean(fn, "has_aux", has_aux)
    wrt, batch_argnums = _check_argnums(fn, argnums, batch_argnums)
    if microbatch_size is not None:
        _checks.integer_at_least(fn, "microbatch_size", microbatch_size, 1, concrete=True)  # a shape
    grad_fn = jax.grad(loss_fn, argnums=argnums, has_aux=has_aux)

    def batched(*args):
        _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, wrt)
        args = _vary_like_batch(args, wrt, batch_argnums)
        in_axes = tuple(0 if i in batch_argnums else None for i in range(len(args)))
        vgrad = jax.vmap(grad_fn, in_axes=in_axes)
        if microbatch_size is None:
            return vgrad(*args)
        _, out = _microbatched(
            fn, args, batch_argnums, microbatch_size, lambda c, full: (c, vgrad(*full)), None
        )
        return out

    return batched


class ClippedGradSum(NamedTuple):
    """The clipped per-example gradient sum of `clipped_grad_sum`, before noise.

    Pass it to `dp_aggregate` or `dp_adaptive_aggregate` in place of the
    per-example gradients: they then only add the noise and normalize.

    Attributes:
      grads: float32 pytree, the sum over the real, finite examples of each
        gradient clipped to `l2_norm_clip`.
      norms: float32 `[B]`, each example's gradient norm before clipping
        (NaN/inf for a non-finite example). Not private.
      mask: bool `[B]`, the real (unpadded) rows.
      l2_norm_clip: float32 `[]`, the clip norm used.
    """

    grads: Any
    norms: jax.Array
    mask: jax.Array
    l2_norm_clip: jax.Array


def _row_mask(mask, batch: int, fn: str | None = None) -> jax.Array:
    """The bool `[batch]` mask of real rows; `mask` checked (a bool or 0/1 array of that shape)."""
    _checks.row_mask(fn, mask, batch)
    return jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool).reshape(batch)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """`v` (`[B]`) shaped to broadcast against `x`'s leading axis."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _clip_and_sum(leaves: list, norms: jax.Array, real: jax.Array, clip: jax.Array, factors=None) -> list:
    """Sum over rows of each leaf's rows clipped to `clip`; padded and non-finite rows add 0.

    The weighted row sum is a matrix-vector product (XLA runs it at memory
    speed; a reduction over the leading axis is many times slower on CPU).
    A NaN row times a zero weight would still be NaN, so rows that are not
    real and finite are zeroed by a select that XLA fuses into the product's
    operand: no branch. `factors` (one `[B]` array per leaf, for per-layer
    clipping) replaces the one global factor.
    """
    ok = real & jnp.isfinite(norms)
    if factors is None:
        factors = [_norms.scale_factor(norms, clip)] * len(leaves)

    def weighted(x, factor):
        x = jnp.where(_bcast(ok, x), x.astype(F32), 0.0)
        return jnp.tensordot(jnp.where(ok, factor, 0.0), x, axes=1, precision=jax.lax.Precision.HIGHEST)

    return [weighted(g, f) for g, f in zip(leaves, factors, strict=True)]


def _layer_bounds(fn: str, l2_norm_clip, tree) -> list | None:
    """Per-leaf clip bounds from a pytree or a `(path, leaf) -> bound` callable; None for a scalar clip."""
    if not callable(l2_norm_clip) and jax.tree_util.treedef_is_leaf(jax.tree.structure(l2_norm_clip)):
        _checks.positive_finite(fn, "l2_norm_clip", l2_norm_clip)
        return None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if callable(l2_norm_clip):
        bounds = [l2_norm_clip(path, leaf) for path, leaf in leaves]
    else:
        got = jax.tree.structure(l2_norm_clip)
        if got != treedef:
            raise ValueError(
                f"{fn}: `l2_norm_clip` must be a number, a callable `(path, leaf) -> bound`, or a pytree "
                f"with the structure of the differentiated arguments; got l2_norm_clip with structure "
                f"{got}, expected {treedef}."
            )
        bounds = jax.tree.leaves(l2_norm_clip)
    for (path, _), b in zip(leaves, bounds, strict=True):
        _checks.positive_finite(fn, f"l2_norm_clip{jax.tree_util.keystr(path)}", b)
    return [jnp.asarray(b, F32) for b in bounds]


def layer_sensitivity(bounds: list) -> jax.Array:
    """`sqrt(sum_l C_l**2)`: the add/remove sensitivity of a sum clipped per layer."""
    return jnp.sqrt(sum((jnp.square(b) for b in bounds), jnp.zeros((), F32)))


def clip_factors(sq_norms: list, bounds: list | None, clip: jax.Array) -> tuple[jax.Array, list | None]:
    """Per-example global norms `[B]` and, with per-layer `bounds`, each leaf's clip factor `[B]`.

    `sq_norms` holds each leaf's per-example squared norm. Without `bounds`
    the factors are None (one global factor from the norms and `clip`).
    """
    total = sum(sq_norms, jnp.zeros_like(sq_norms[0])) if sq_norms else jnp.zeros((0,), F32)
    norms = jnp.sqrt(total)
    if bounds is None:
        return norms, None
    return norms, [_norms.scale_factor(jnp.sqrt(q), b) for q, b in zip(sq_norms, bounds, strict=True)]


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] = 1,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
    """Clipped per-example gradient sum, clipping inside the microbatch loop.

    The memory-bounded path to DP-SGD: with `microbatch_size=m` the batch is
    processed in sequential chunks of `m` examples; each chunk's per-example
    gradients are clipped and added to a float32 running sum, so at most
    `m x params` per-example values exist at once (peak memory scales with
    the microbatch, not the batch). The result feeds `dp_aggregate` or
    `dp_adaptive_aggregate`, which add the noise and normalize.
    `optaxclip.ghost_clipped_grad_sum` computes the same result without
    materialising per-example gradients where the model allows.

    Args:
      loss_fn: `loss_fn(params, example, ...) -> scalar` (or `(scalar, aux)`),
        as in `per_example_grads`.
      argnums: Which arguments to differentiate.
      batch_argnums: Which arguments carry the batch axis.
      has_aux: Whether `loss_fn` returns `(loss, aux)`; per-example aux
        values are returned (not private).
      microbatch_size: Examples per sequential chunk; the batch size must be
        a multiple of it. `None`: the whole batch at once.

    Returns:
      A function `f(*args, l2_norm_clip, mask=None)` returning a
      `ClippedGradSum` (and the per-example aux with `has_aux`). `mask`
      (bool `[B]`) marks the real rows; padded rows add exactly zero.
      `l2_norm_clip` is a number (each example's global norm is clipped to
      it), or per-layer bounds: a pytree of numbers with the structure of the
      differentiated arguments, or a callable `(path, leaf) -> bound`; each
      leaf of each example's gradient is then clipped to its own bound `C_l`
      and the result's `l2_norm_clip` is the sum's sensitivity
      `sqrt(sum_l C_l**2)` (which `dp_aggregate` scales its noise to).

    Example:
      >>> import jax, jax.numpy as jnp, optaxclip
      >>> loss = lambda w, x: jnp.sum(w * x)
      >>> f = optaxclip.clipped_grad_sum(loss, microbatch_size=1)
      >>> s = f(jnp.zeros(2), jnp.array([[3.0, 4.0], [0.3, 0.4]]), l2_norm_clip=1.0)
      >>> print(s.grads)  # [0.6, 0.8] + [0.3, 0.4]
      [0.90000004 1.2       ]

    Edge cases:
      A non-finite example (NaN/inf anywhere in its gradient) adds exactly
      zero and keeps a non-finite entry in `norms` (dp_aggregate counts it).
      Inside `shard_map` with replicated params, as `per_example_grads`.
      Every leaf of the differentiated arguments must be floating point
      (bfloat16 to float64; each counts in the per-example norm): an
      integer or bool leaf raises a `ValueError` naming its path and dtype,
      since its gradient could not be clipped and noised (split such
      leaves off the params).

    References:
      Abadi et al., Deep Learning with Differential Privacy, 2016.
      https://arxiv.org/abs/1607.00133
    """
    fn = "clipped_grad_sum"
    _checks.function(fn, "loss_fn", loss_fn)
    _checks.boolean(fn, "has_aux", has_aux)
    if microbatch_size is not None:
        _checks.integer_at_least(fn, "microbatch_size", microbatch_size, 1, concrete=True)  # a shape
    wrt_nums, batch_argnums = _check_argnums(fn, argnums, batch_argnums)
    grads_of = _per_example_grads(fn, loss_fn, argnums, batch_argnums, has_aux, None)

    def chunk_sum(args, mask, clip, bounds):
        out = grads_of(*args)
        grads, aux = out if has_aux else (out, None)
        leaves, treedef = jax.tree.flatten(grads)
        norms, factors = _norms.batch_global_norms(grads), None
        if bounds is not None:  # each leaf's own per-example norm against its own bound
            rows = _norms.unit_norms(leaves, [tuple(range(1, x.ndim)) for x in leaves])
            factors = [_norms.scale_factor(n.reshape(-1), b) for n, b in zip(rows, bounds, strict=True)]
        return treedef.unflatten(_clip_and_sum(leaves, norms, mask, clip, factors)), norms, aux

    def run(*args, l2_norm_clip, mask=None):
        batch = _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, wrt_nums)
        args = _vary_like_batch(args, wrt_nums, batch_argnums)
        wrt = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
        bounds = _layer_bounds(fn, l2_norm_clip, wrt)
        clip = jnp.asarray(l2_norm_clip, F32) if bounds is None else layer_sensitivity(bounds)
        real = _row_mask(mask, batch, fn)
        if microbatch_size is None:
            grads, norms, aux = chunk_sum(args, real, clip, bounds)
        else:

            def body(total, full, mask):
                part, norms, aux = chunk_sum(full, mask, clip, bounds)
                return jax.tree.map(jnp.add, total, part), (norms, aux)

            # The sum has the structure of the differentiated arguments, as jax.grad's output
            # (zeros_like keeps the arguments' shard_map varying axes, as the scan carry needs).
            zeros = jax.tree.map(lambda p: jnp.zeros_like(p, F32), wrt)
            grads, (norms, aux) = _microbatched(fn, args, batch_argnums, microbatch_size, body, zeros, real)
        result = ClippedGradSum(grads, norms, real, clip)
        return (result, aux) if has_aux else result

    return run


def _microbatched(fn: str, args, batch_argnums, microbatch_size: int, per_chunk, carry, *extra):
    """Runs `per_chunk(carry, chunk_args, *chunk_extra) -> (carry, out)` over sequential chunks.

    The `batch_argnums` arguments and the `extra` arrays (batch axis first)
    are split into chunks of `microbatch_size` rows; returns the final carry
    and the chunks' outputs with the batch axis restored.
    """
    batch = jax.tree.leaves(args[batch_argnums[0]])[0].shape[0]
    microbatch_size = int(microbatch_size)  # checked: a whole number (2.0, np.int32(2) are shapes too)
    if batch % microbatch_size:
        raise ValueError(
            f"{fn}: the batch size ({batch}) must be a multiple of "
            f"`microbatch_size`, got microbatch_size={microbatch_size}."
        )
    split = lambda x: x.reshape(batch // microbatch_size, microbatch_size, *x.shape[1:])
    xs = ([jax.tree.map(split, args[i]) for i in batch_argnums], [split(e) for e in extra])

    def body(c, chunk):
        full = list(args)
        for i, a in zip(batch_argnums, chunk[0], strict=True):
            full[i] = a
        return per_chunk(c, full, *chunk[1])

    carry, out = jax.lax.scan(body, carry, xs)
    return carry, jax.tree.map(lambda y: y.reshape(batch, *y.shape[2:]), out)
