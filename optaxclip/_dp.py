"""DP-SGD building blocks: per-example gradients and the clip-sum-noise aggregate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _stats, _tree

F32 = jnp.float32


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
    batch_argnums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    if microbatch_size is not None:
        _checks.integer_at_least("per_example_grads", "microbatch_size", microbatch_size, 1)
    grad_fn = jax.grad(loss_fn, argnums=argnums, has_aux=has_aux)

    def batched(*args):
        in_axes = tuple(0 if i in batch_argnums else None for i in range(len(args)))
        vgrad = jax.vmap(grad_fn, in_axes=in_axes)
        if microbatch_size is None:
            return vgrad(*args)
        batch = jax.tree.leaves(args[batch_argnums[0]])[0].shape[0]
        if batch % microbatch_size:
            raise ValueError(
                f"per_example_grads: the batch size ({batch}) must be a multiple of "
                f"`microbatch_size`, got microbatch_size={microbatch_size}."
            )
        chunks = batch // microbatch_size

        def split(x):
            return x.reshape(chunks, microbatch_size, *x.shape[1:])

        batched_args = [jax.tree.map(split, args[i]) for i in batch_argnums]

        def one(chunk):
            full = list(args)
            for i, c in zip(batch_argnums, chunk, strict=True):
                full[i] = c
            return vgrad(*full)

        out = jax.lax.map(one, batched_args)
        return jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), out)

    return batched


class DPAggregateState(NamedTuple):
    """State of `dp_aggregate`.

    Attributes:
      stats: `ClipStats` over the examples: `pre_clip_norm` is the L2 norm of
        all per-example gradients together, `post_clip_norm` that of the
        released (noised, normalized) update, `threshold` the clip norm,
        `clipped` whether any example was clipped, `nonfinite_count` steps
        with a non-finite example. Per-example quantities are NOT
        differentially private: do not release them.
      rng_key: The PRNG key the next step's noise is drawn from.
      nonfinite_example_count: int32 `[]`, examples dropped for a non-finite
        gradient so far (not private).
    """

    stats: _stats.ClipStats
    rng_key: jax.Array
    nonfinite_example_count: jax.Array


def dp_aggregate(
    l2_norm_clip: jax.typing.ArrayLike,
    noise_multiplier: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    expected_batch_size: int | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD aggregation: clip each example's gradient, sum, add Gaussian noise, average.

    Takes per-example gradients (every leaf has a leading batch axis, as from
    `per_example_grads`). Each example's global norm is clipped to
    `l2_norm_clip`; the clipped gradients are summed in float32; Gaussian
    noise of std `noise_multiplier * l2_norm_clip`, drawn in float32 from a
    fresh key each step and leaf, is added; the result is divided by
    `expected_batch_size` (Poisson sampling) or else by the number of real
    examples. An optional `mask=` argument to `update` (bool `[B]`) marks
    real rows: padded rows contribute exactly zero. An example whose gradient
    is NaN/inf contributes zero and is counted, so the sensitivity bound
    `l2_norm_clip` holds whatever the input.

    Args:
      l2_norm_clip: Per-example clip norm; > 0. Schedulable.
      noise_multiplier: Noise std in units of `l2_norm_clip`; >= 0.
        Schedulable.
      key: A PRNG key (typed or legacy).
      expected_batch_size: Divide by this instead of the number of real
        examples (use with Poisson sampling); >= 1.
      axis_name: Inside `shard_map` over a data axis: each device clips its
        own examples, the sums are `psum`med and one noise draw (the same key
        on every device) is added, so N devices give the result of one.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a
      `DPAggregateState`; chain an optimizer after it.

    Example:
      >>> import jax, jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0))
      >>> per_example = jnp.array([[3.0, 4.0], [0.3, 0.4]])
      >>> out, _ = tx.update(per_example, tx.init(jnp.zeros(2)))
      >>> print([f"{v:.2f}" for v in out])  # mean of [0.6, 0.8] and [0.3, 0.4]
      ['0.45', '0.60']

    References:
      Abadi et al., Deep Learning with Differential Privacy, 2016.
      https://arxiv.org/abs/1607.00133
    """
    fn = "dp_aggregate"
    _checks.positive(fn, "l2_norm_clip", l2_norm_clip)
    _checks.non_negative(fn, "noise_multiplier", noise_multiplier)
    if expected_batch_size is not None:
        _checks.integer_at_least(fn, "expected_batch_size", expected_batch_size, 1)

    def init_fn(params):
        del params
        return DPAggregateState(_stats.init_stats(), key, jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, mask=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        batch = leaves[0].shape[0]
        norms = _tree.batch_global_norms(updates)
        finite = jnp.isfinite(norms)
        real = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask, bool).reshape(batch)
        keep = real & finite
        c = jnp.asarray(l2_norm_clip, F32)
        factor = jnp.where(keep, _tree.scale_factor(norms, c), 0.0)

        def clipped_sum(g):
            w = factor.reshape((batch,) + (1,) * (g.ndim - 1))
            rows = jnp.where(w > 0, g.astype(F32), 0.0)  # a NaN row times 0 would stay NaN
            return jnp.sum(rows * w, axis=0)

        sums = [clipped_sum(g) for g in leaves]
        n_real = jnp.sum(real & finite).astype(F32)
        dropped = jnp.sum(real & ~finite).astype(jnp.int32)
        if axis_name is not None:
            sums = [jax.lax.psum(s, axis_name) for s in sums]
            n_real = jax.lax.psum(n_real, axis_name)
            dropped = jax.lax.psum(dropped, axis_name)
        next_key, noise_key = jax.random.split(state.rng_key)
        std = jnp.asarray(noise_multiplier, F32) * c
        denom = (
            jnp.asarray(expected_batch_size, F32)
            if expected_batch_size is not None
            else jnp.maximum(n_real, 1.0)
        )
        out = []
        for i, (g, s) in enumerate(zip(leaves, sums, strict=True)):
            noise = jax.random.normal(jax.random.fold_in(noise_key, i), s.shape, F32)
            out.append(((s + std * noise) / denom).astype(g.dtype))
        released = treedef.unflatten(out)
        stats = _stats.record(
            state.stats,
            pre_clip_norm=_tree.combine_norms([jnp.where(real, norms, 0.0)]),  # padding excluded
            post_clip_norm=_tree.global_norm(released),
            threshold=c,
            clipped=jnp.any(keep & (factor < 1)),
        )
        return released, DPAggregateState(stats, next_key, state.nonfinite_example_count + dropped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
