"""`guard_clip`: a global-norm clip whose notion of "normal" cannot be dragged up by growing norms.

History-based clips (AutoClip's quantile, ZClip's EMA, AdaGC's per-tensor
EMA, the step-skip rules of LLM stacks) learn the threshold from recent
norms, so when the learning rate itself is too high the threshold follows
the norms as they grow and stops binding. `guard_clip` keeps two levels:
a tracker of the typical norm (which may follow the norms), and the guarded
level the threshold is built on, which follows the tracker down at once but
up only slowly, and not at all while the loss is rising.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats
from ._clip import clip_to_bound

F32 = jnp.float32
I32 = jnp.int32


class GuardClipState(NamedTuple):
    """State of `guard_clip` (every field a scalar; all are reported by `metrics()`).

    Attributes:
      stats: The `ClipStats`; `threshold` is `multiplier * guard_norm`.
      typical_norm: float32, the tracker: a geometric EMA of the norms, each
        capped at `spike_factor` times the tracker (0 until the first
        finite, nonzero norm).
      guard_norm: float32, the guarded level: follows `typical_norm` down at
        once, up by at most `max_growth` per step and not while the loss rises.
      loss_fast: float32, fast EMA of the `loss=` values (NaN until one was given).
      loss_slow: float32, slow EMA of the losses.
      loss_rising: bool, `loss_fast > loss_slow` after this step: the level
        could not rise.
      level_held: bool, the guarded level is below the tracker after this
        step (held back by the growth cap or a rising loss).
      spike: bool, this step's norm was above `spike_factor * typical_norm`.
      spike_count: int32, spikes so far (saturates).
      finite_norm_count: int32, finite nonzero norms seen so far (saturates).
    """

    stats: _stats.ClipStats
    typical_norm: jax.Array
    guard_norm: jax.Array
    loss_fast: jax.Array
    loss_slow: jax.Array
    loss_rising: jax.Array
    level_held: jax.Array
    spike: jax.Array
    spike_count: jax.Array
    finite_norm_count: jax.Array


def guard_clip(
    multiplier: jax.typing.ArrayLike = 1.5,
    max_growth: jax.typing.ArrayLike = 0.003,
    *,
    spike_factor: jax.typing.ArrayLike = 4.0,
    ema_decay: jax.typing.ArrayLike = 0.95,
    fast_loss_decay: jax.typing.ArrayLike = 0.9,
    slow_loss_decay: jax.typing.ArrayLike = 0.98,
    initial_max_norm: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Clips the global norm to the typical norm of healthy training, which growing norms cannot drag up.

    Two levels are kept: the typical norm `t` (a tracker that may follow
    the norms) and the guarded level `g` the threshold is built on. Each
    step, with global norm `n`:

    1. The update is clipped to `multiplier * g` (no clip at step 0, which
       has no history, unless `initial_max_norm` is given).
    2. The tracker takes the norm, capped at `spike_factor * t` (a larger
       norm is a spike, a bad batch): `log t <- d * log t + (1 - d) *
       log(min(n, spike_factor * t))`, a geometric EMA with decay `d`.
    3. The level follows the tracker down at once and up by a factor of at
       most `1 + max_growth` per step: `g <- min(t, g * (1 + max_growth))`;
       while the loss is rising it does not rise at all (pass `loss=` to
       `update`: rising means a fast EMA of the losses above a slow one).

    A bad batch is clipped from step 1 on. Norms that fall, or rise slowly
    (by less than `max_growth` per step, 0.3%: x2 in 230 steps), move the
    level. Norms that grow fast, as when the learning rate is too high,
    leave it near where healthy training had it: the clip keeps binding
    there, as a well-chosen fixed threshold would, where thresholds learned
    from the norm history (`adaptive_clip`) rise with the norms or, with no
    history yet, let the first steps through (see the guide "Choosing a
    clip", docs/guides/choosing.md, for the measured outcomes).

    Args:
      multiplier: The threshold is `multiplier` times the guarded level;
        > 0 (1.5 clips the steps well above the typical norm). Schedulable.
      max_growth: Largest rise of the guarded level per step, as a fraction;
        >= 0 (0: the level never rises). Schedulable.
      spike_factor: A norm above `spike_factor` times the tracker is a
        spike; it enters the tracker at that cap; > 1. Schedulable.
      ema_decay: Decay of the tracker's EMA, in [0, 1). Schedulable.
      fast_loss_decay: Decay of the fast loss EMA, in [0, 1). Schedulable.
      slow_loss_decay: Decay of the slow loss EMA, in [0, 1), and
        >= `fast_loss_decay`. Schedulable.
      initial_max_norm: Optional bound for the steps before a norm was
        recorded (the first step); > 0. Without it the first step passes.
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of the updates, the axis to take the norm over; a
        `loss=` is averaged over it, so every device keeps the same state.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` takes an
      optional `loss=` (a scalar; an `optax.chain` passes it on); its state
      is a `GuardClipState`, and `metrics()` reports every field.

    Edge cases:
      A NaN/inf norm passes through unscaled (counted in `nonfinite_count`)
      and changes no statistic; so do a zero norm (a zero gradient stays
      zero) and a NaN/inf loss. The loss of a lone spike step does not
      enter the loss EMAs; in a run of spikes, the losses from the second
      step on do. Without `loss=` only the growth cap holds the level.
      Inside `optax.MultiSteps` the statistics advance once per real update.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.guard_clip()
      >>> state = tx.init(None)
      >>> for n in [1.0, 1.1, 0.9, 1.0, 3.0, 6.0, 12.0]:  # healthy, then growing fast
      ...     out, state = tx.update(jnp.array([n]), state)
      >>> print(f"{float(out[0]):.2f} {float(state.guard_norm):.2f} {int(state.stats.clip_count)}")
      1.51 1.01 3

    References:
      Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training,
      2025 (EMA statistics of the norm). https://arxiv.org/abs/2504.02507
      Wang et al., AdaGC: Enhancing LLM Pretraining Stability via Adaptive
      Gradient Clipping, 2025 (a threshold that rises slowly).
      https://arxiv.org/abs/2502.11034
      Huang et al., SPAM: Spike-Aware Adam with Momentum Reset for Stable
      LLM Training, 2025 (spikes up to 1000x). https://arxiv.org/abs/2501.06842
      Pascanu et al., On the difficulty of training recurrent neural
      networks, 2013. https://arxiv.org/abs/1211.5063
    """
    fn = "guard_clip"
    _checks.positive(fn, "multiplier", multiplier)
    _checks.non_negative(fn, "max_growth", max_growth)
    _checks.finite(fn, "max_growth", max_growth)
    _checks.in_range(fn, "spike_factor", spike_factor, 1.0, float("inf"), lo_open=True, hi_open=True)
    for name, value in (("ema_decay", ema_decay), ("fast_loss_decay", fast_loss_decay)):
        _checks.in_range(fn, name, value, 0.0, 1.0, lo_open=False, hi_open=True)
    _checks.in_range(fn, "slow_loss_decay", slow_loss_decay, 0.0, 1.0, lo_open=False, hi_open=True)
    _checks.ordered(fn, "fast_loss_decay", fast_loss_decay, "slow_loss_decay", slow_loss_decay)
    if initial_max_norm is not None:
        _checks.positive(fn, "initial_max_norm", initial_max_norm)
    _checks.axis_name(fn, axis_name)

    def init_fn(params):
        del params
        scalar = lambda value, dtype=F32: jnp.full((), value, dtype)  # separate buffers: donatable
        return GuardClipState(
            stats=_stats.init_stats(),
            typical_norm=scalar(0.0),
            guard_norm=scalar(0.0),
            loss_fast=scalar(jnp.nan),
            loss_slow=scalar(jnp.nan),
            loss_rising=scalar(False, bool),
            level_held=scalar(False, bool),
            spike=scalar(False, bool),
            spike_count=scalar(0, I32),
            finite_norm_count=scalar(0, I32),
        )

    def update_fn(updates, state, params=None, *, loss=None, **extra_args):
        del params, extra_args
        _checks.state(f"{fn}.update", state, GuardClipState)
        _checks.loss(f"{fn}.update", loss)
        norm = _norms.global_norm(updates, axis_name)
        if loss is not None and axis_name is not None:  # every device's state takes the mean loss
            loss = jax.lax.pmean(jnp.asarray(loss, F32), axis_name)
        usable = jnp.isfinite(norm) & (norm > 0)
        log_norm = jnp.log(jnp.where(usable, norm, 1.0))
        started = state.finite_norm_count > 0
        log_t = jnp.log(jnp.where(started, state.typical_norm, 1.0))
        log_g = jnp.log(jnp.where(started, state.guard_norm, 1.0))

        fallback = jnp.inf if initial_max_norm is None else jnp.asarray(initial_max_norm, F32)
        bound = jnp.where(started, jnp.asarray(multiplier, F32) * jnp.exp(log_g), fallback)
        out, stats = clip_to_bound(updates, state.stats, norm, bound)

        cap = log_t + jnp.log(jnp.asarray(spike_factor, F32))
        spike = started & usable & (log_norm > cap)
        # The loss of a lone spike (a bad batch) is left out; from the second spike in a row on,
        # the losses count, so a run of spikes with a climbing loss freezes the level.
        loss_fast, loss_slow = _loss_emas(state, loss, ~spike | state.spike, fast_loss_decay, slow_loss_decay)
        rising = loss_fast > loss_slow  # False while no loss was given (NaN)

        d = jnp.where(started, jnp.asarray(ema_decay, F32), 0.0)  # the first norm sets the tracker
        new_log_t = log_t + (1 - d) * (jnp.where(started, jnp.minimum(log_norm, cap), log_norm) - log_t)
        growth = jnp.where(rising, 0.0, jnp.log1p(jnp.asarray(max_growth, F32)))
        new_log_g = jnp.where(started, jnp.minimum(new_log_t, log_g + growth), new_log_t)
        # A step without a usable norm moves nothing.
        new_log_t, new_log_g = jnp.where(usable, new_log_t, log_t), jnp.where(usable, new_log_g, log_g)
        now_started = started | usable
        return out, GuardClipState(
            stats=stats,
            typical_norm=jnp.where(now_started, jnp.exp(new_log_t), 0.0),
            guard_norm=jnp.where(now_started, jnp.exp(new_log_g), 0.0),
            loss_fast=loss_fast,
            loss_slow=loss_slow,
            loss_rising=rising,
            level_held=now_started & (new_log_g < new_log_t),
            spike=spike,
            spike_count=_stats.increment(state.spike_count, spike),
            finite_norm_count=_stats.increment(state.finite_norm_count, usable),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _loss_emas(state: GuardClipState, loss, record, fast_decay, slow_decay):
    """The fast and slow loss EMAs after this step's `loss` (kept as they are if None or non-finite)."""
    if loss is None:
        return state.loss_fast, state.loss_slow
    loss = jnp.asarray(loss, F32)  # a real scalar: checked by update
    record = record & jnp.isfinite(loss)
    first = jnp.isnan(state.loss_fast)

    def ema(old, decay):
        d = jnp.asarray(decay, F32)
        return jnp.where(record, jnp.where(first, loss, d * old + (1 - d) * loss), old)

    return ema(state.loss_fast, fast_decay), ema(state.loss_slow, slow_decay)
