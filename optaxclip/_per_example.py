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
    batch_argnums = _as_tuple(batch_argnums)
    if microbatch_size is not None:
        _checks.integer_at_least("per_example_grads", "microbatch_size", microbatch_size, 1)
    grad_fn = jax.grad(loss_fn, argnums=argnums, has_aux=has_aux)

    def batched(*args):
        in_axes = tuple(0 if i in batch_argnums else None for i in range(len(args)))
        vgrad = jax.vmap(grad_fn, in_axes=in_axes)
        if microbatch_size is None:
            return vgrad(*args)
        _, out = _microbatched(
            "per_example_grads", args, batch_argnums, microbatch_size, lambda c, full: (c, vgrad(*full)), None
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


def _row_mask(mask, batch: int) -> jax.Array:
    return jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool).reshape(batch)


def _clip_and_sum(leaves: list, norms: jax.Array, real: jax.Array, clip: jax.Array) -> list:
    """Sum over rows of each leaf's rows clipped to `clip`; padded and non-finite rows add 0.

    The weighted row sum is a matrix-vector product (XLA runs it at memory
    speed; a reduction over the leading axis is many times slower on CPU).
    A NaN row times a zero weight would still be NaN, so only a batch with a
    non-finite row takes the branch that zeroes rows first (one `lax.cond`
    per leaf, whose operand is the leaf itself).
    """
    finite = jnp.isfinite(norms)
    factor = jnp.where(real & finite, _norms.scale_factor(norms, clip), 0.0)
    all_finite = jnp.all(finite)

    def weighted(x):
        return jnp.tensordot(factor, x.astype(F32), axes=1, precision=jax.lax.Precision.HIGHEST)

    def zero_bad_rows(x):
        keep = finite.reshape((-1,) + (1,) * (x.ndim - 1))
        return weighted(jnp.where(keep, x, jnp.zeros((), x.dtype)))

    return [jax.lax.cond(all_finite, weighted, zero_bad_rows, g) for g in leaves]


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

    Example:
      >>> import jax, jax.numpy as jnp, optaxclip
      >>> loss = lambda w, x: jnp.sum(w * x)
      >>> f = optaxclip.clipped_grad_sum(loss, microbatch_size=1)
      >>> s = f(jnp.zeros(2), jnp.array([[3.0, 4.0], [0.3, 0.4]]), l2_norm_clip=1.0)
      >>> print(s.grads)  # [0.6, 0.8] + [0.3, 0.4]
      [0.90000004 1.2       ]

    References:
      Abadi et al., Deep Learning with Differential Privacy, 2016.
      https://arxiv.org/abs/1607.00133
    """
    fn = "clipped_grad_sum"
    if microbatch_size is not None:
        _checks.integer_at_least(fn, "microbatch_size", microbatch_size, 1)
    grads_of = per_example_grads(loss_fn, argnums, batch_argnums, has_aux=has_aux)
    batch_argnums = _as_tuple(batch_argnums)

    def chunk_sum(args, mask, clip):
        out = grads_of(*args)
        grads, aux = out if has_aux else (out, None)
        leaves, treedef = jax.tree.flatten(grads)
        norms = _norms.batch_global_norms(grads)
        return treedef.unflatten(_clip_and_sum(leaves, norms, mask, clip)), norms, aux

    def run(*args, l2_norm_clip, mask=None):
        _checks.positive(fn, "l2_norm_clip", l2_norm_clip)
        clip = jnp.asarray(l2_norm_clip, F32)
        batch = jax.tree.leaves(args[batch_argnums[0]])[0].shape[0]
        real = _row_mask(mask, batch)
        if microbatch_size is None:
            grads, norms, aux = chunk_sum(args, real, clip)
        else:

            def body(total, full, mask):
                part, norms, aux = chunk_sum(full, mask, clip)
                return jax.tree.map(jnp.add, total, part), (norms, aux)

            # The sum has the structure of the differentiated arguments, as jax.grad's output.
            wrt = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
            zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), wrt)
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
