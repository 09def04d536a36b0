"""`skip_spikes`: a wrapper that skips whole steps whose gradient norm or loss spikes.

Like `optax.apply_if_finite` it wraps a whole chain, and skipping the inner
update is its purpose: it is the one transform whose update takes a
`lax.cond` (the inner chain runs only on accepted steps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats

F32 = jnp.float32
I32 = jnp.int32


class SkipSpikesState(NamedTuple):
    """State of `skip_spikes`.

    Attributes:
      stats: `ClipStats`: `clipped` is "this step was skipped", `clip_count`
        the number of skipped steps, `threshold` the norm limit
        `mean + sigma * std`.
      inner_state: The wrapped transformation's state (untouched on a skip).
      norm_history: float32 `[window]` norms of recent accepted steps.
      loss_history: float32 `[window]` their losses (NaN where none was given).
      history_index: int32 `[]`, where the next entry is written.
      finite_norm_count: int32 `[]`, accepted steps recorded (saturates).
      consecutive_skips: int32 `[]`, skips in a row up to now.
    """

    stats: _stats.ClipStats
    inner_state: Any
    norm_history: jax.Array
    loss_history: jax.Array
    history_index: jax.Array
    finite_norm_count: jax.Array
    consecutive_skips: jax.Array


def _mean_std(history: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the finite entries among `history[:size]`."""
    valid = (jnp.arange(history.shape[0]) < size) & jnp.isfinite(history)
    n = jnp.maximum(jnp.sum(valid), 1).astype(F32)
    x = jnp.where(valid, history, 0.0)
    mean = jnp.sum(x) / n
    var = jnp.sum(jnp.where(valid, jnp.square(history - mean), 0.0)) / n
    return mean, jnp.sqrt(var)


def skip_spikes(
    inner: optax.GradientTransformation,
    window: int = 128,
    sigma: jax.typing.ArrayLike = 6.0,
    *,
    warmup_steps: int = 20,
    max_consecutive_skips: int = 10,
) -> optax.GradientTransformationExtraArgs:
    """Skips steps whose gradient norm (or loss) spikes, as OLMo, Levanter and MaxText do.

    Wraps a whole chain, like `optax.apply_if_finite`. A step is a spike when
    its global norm exceeds `mean + sigma * std` of the norms of the last
    `window` accepted steps, or, if `loss=` is passed to `update`, its loss
    exceeds the same bound on recent losses, or either is non-finite. A
    spike step returns zero updates and leaves the inner state exactly as it
    was (the inner `update` does not run); other steps are the inner chain's.
    Spikes are not recorded, so they do not widen the bound; after
    `max_consecutive_skips` skips in a row the next step is accepted and
    recorded, so a lasting change of scale is let through rather than
    stalling training.

    Args:
      inner: The transformation to wrap (typically the whole chain).
      window: Number of recent accepted steps kept; >= 2.
      sigma: How many standard deviations above the mean is a spike; > 0.
      warmup_steps: Accepted steps to record before skipping starts; >= 2
        and <= `window`.
      max_consecutive_skips: Skips in a row after which a step is accepted;
        >= 1.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` takes an
      optional `loss=` (other extra arguments go to `inner`); its state is a
      `SkipSpikesState`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.skip_spikes(optax.sgd(1.0), warmup_steps=3)
      >>> state = tx.init(jnp.zeros(1))
      >>> for n in [1.0, 1.1, 0.9, 1.0, 100.0]:
      ...     out, state = tx.update(jnp.array([n]), state)
      >>> print(float(out[0]), int(state.stats.clip_count))
      0.0 1

    References:
      Groeneveld et al., OLMo: Accelerating the Science of Language Models,
      2024. https://arxiv.org/abs/2402.00838
    """
    fn = "skip_spikes"
    _checks.transformation(fn, "inner", inner)
    _checks.integer_at_least(fn, "window", window, 2)
    _checks.positive(fn, "sigma", sigma)
    _checks.integer_at_least(fn, "warmup_steps", warmup_steps, 2)
    _checks.integer_at_least(fn, "max_consecutive_skips", max_consecutive_skips, 1)
    if isinstance(warmup_steps, (int, float)) and isinstance(window, (int, float)) and warmup_steps > window:
        raise ValueError(
            f"{fn}: `warmup_steps` must be <= `window`, got warmup_steps={warmup_steps}, window={window}."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipSpikesState(
            stats=_stats.init_stats(),
            inner_state=inner.init(params),
            norm_history=jnp.zeros((int(window),), F32),
            loss_history=jnp.full((int(window),), jnp.nan, F32),
            history_index=jnp.zeros((), I32),
            finite_norm_count=jnp.zeros((), I32),
            consecutive_skips=jnp.zeros((), I32),
        )

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        _checks.state(f"{fn}.update", state, SkipSpikesState)
        _checks.loss(f"{fn}.update", loss)
        norm = _norms.global_norm(updates)
        size = jnp.minimum(state.finite_norm_count, state.norm_history.shape[0])
        warm = state.finite_norm_count >= warmup_steps
        s = jnp.asarray(sigma, F32)
        n_mean, n_std = _mean_std(state.norm_history, size)
        limit = jnp.where(warm, n_mean + s * n_std, jnp.inf)
        spike = ~jnp.isfinite(norm) | (norm > limit)
        loss32 = jnp.full((), jnp.nan, F32) if loss is None else jnp.asarray(loss, F32)
        if loss is not None:
            l_mean, l_std = _mean_std(state.loss_history, size)
            has_losses = jnp.any(jnp.isfinite(state.loss_history))
            spike |= ~jnp.isfinite(loss32) | (warm & has_losses & (loss32 > l_mean + s * l_std))
        skip = spike & (state.consecutive_skips < max_consecutive_skips)

        def run(operands):
            u, inner_state = operands
            return inner.update(u, inner_state, params, **extra_args)

        def skipped(operands):
            u, inner_state = operands
            return jax.tree.map(jnp.zeros_like, u), inner_state

        out, inner_state = jax.lax.cond(skip, skipped, run, (updates, state.inner_state))
        keep = ~skip & jnp.isfinite(norm)
        norms, index = _stats.ring_push(state.norm_history, state.history_index, norm, keep)
        losses, _ = _stats.ring_push(state.loss_history, state.history_index, loss32, keep)
        stats = _stats.record(
            state.stats,
            pre_clip_norm=norm,
            post_clip_norm=jnp.where(skip, 0.0, norm),
            threshold=limit,
            clipped=skip,
        )
        return out, SkipSpikesState(
            stats=stats,
            inner_state=inner_state,
            norm_history=norms,
            loss_history=losses,
            history_index=index,
            finite_norm_count=_stats.increment(state.finite_norm_count, keep),
            consecutive_skips=jnp.where(skip, state.consecutive_skips + 1, 0).astype(I32),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
