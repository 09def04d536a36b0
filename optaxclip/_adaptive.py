"""Adaptive clipping: rolling-quantile `adaptive_clip`, z-score `zscore_clip`, `skip_spikes`.

All three keep their norm history as jnp arrays in the optimizer state, so
they run inside `jax.jit` with no host sync, vmap over independent states,
and checkpoint/restore like any optax state.
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


class AdaptiveClipState(NamedTuple):
    """State of `adaptive_clip`.

    Attributes:
      stats: The `ClipStats`.
      norm_history: float32 `[window]` ring buffer of recent finite norms
        (`[1]`, unused, with `estimator="streaming"`).
      history_index: int32 `[]`, where the next norm is written.
      sorted_norm_history: float32 `[window]`, the same norms in ascending
        order, +inf where the window is not yet full (`[1]`, unused, when streaming).
      finite_norm_count: int32 `[]`, finite norms recorded so far (saturates).
      quantile_estimate: float32 `[]`, the estimated quantile the next step's
        threshold is built from (inf until a norm was recorded).
    """

    stats: _stats.ClipStats
    norm_history: jax.Array
    history_index: jax.Array
    sorted_norm_history: jax.Array
    finite_norm_count: jax.Array
    quantile_estimate: jax.Array


def _window_quantile(ordered: jax.Array, size: jax.Array, q: jax.Array) -> jax.Array:
    """Exact `q`-quantile (linear interpolation, as `np.quantile`) of the sorted `ordered[:size]`."""
    pos = q * (jnp.maximum(size, 1) - 1).astype(F32)
    lo = jnp.floor(pos).astype(I32)
    hi = jnp.minimum(lo + 1, jnp.maximum(size - 1, 0))
    a, b = ordered[lo], ordered[hi]
    value = a + (pos - lo.astype(F32)) * jnp.where(hi > lo, b - a, 0.0)
    return jnp.where(size > 0, value, jnp.inf)


def _sorted_replace(ordered: jax.Array, evicted: jax.Array, value: jax.Array, keep: jax.Array) -> jax.Array:
    """`ordered` (ascending, +inf padded) with one `evicted` removed and `value` inserted, if `keep`.

    A few elementwise passes over the window instead of a sort each step (an
    XLA:CPU sort of 1000 floats takes about 0.2 ms, half an adam step at 1e5
    parameters). `evicted` is +inf while the window is filling (a padding
    slot goes), else an entry of `ordered` bit for bit.
    """
    i = jnp.arange(ordered.shape[0])
    inf = jnp.full((1,), jnp.inf, F32)
    at = jnp.argmax(ordered == evicted)  # first match
    removed = jnp.where(i < at, ordered, jnp.concatenate([ordered[1:], inf]))
    rank = jnp.sum(removed < value)
    shifted = jnp.concatenate([inf, removed[:-1]])
    inserted = jnp.where(i < rank, removed, jnp.where(i == rank, value, shifted))
    return jnp.where(keep, inserted, ordered)


def adaptive_clip(
    quantile: jax.typing.ArrayLike = 0.9,
    window: int = 1000,
    *,
    warmup_steps: int = 10,
    initial_max_norm: jax.typing.ArrayLike | None = None,
    max_norm: jax.typing.ArrayLike | None = None,
    multiplier: jax.typing.ArrayLike = 1.0,
    record_clipped: bool = False,
    estimator: str = "window",
    streaming_lr: jax.typing.ArrayLike = 0.01,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """Rolling-quantile adaptive clipping (AutoClip): threshold = a quantile of recent norms.

    Each step, the global norm is clipped to
    `min(multiplier * q_hat, max_norm)`, where `q_hat` is the `quantile` of
    the finite global norms of earlier steps; then this step's norm is
    recorded. With `estimator="window"` (default) `q_hat` is the exact
    quantile (linear interpolation) of the last `window` norms, kept in a
    ring buffer in the state; it uses all recorded norms while fewer than
    `window` exist, so with defaults the clip protects training from step
    `warmup_steps` on (a 1000x norm at step 100 is clipped to about the 0.9
    quantile of the first 99). With `estimator="streaming"`, `q_hat` is an
    O(1)-memory estimate: the running maximum during warm-up, then the
    geometric update of Andrew et al. 2021,
    `q_hat <- q_hat * exp(-streaming_lr * (1[norm <= q_hat] - quantile))`,
    whose fixed point is the `quantile` of the norm distribution and which
    moves by at most a factor `exp(streaming_lr)` per step.

    Args:
      quantile: Which quantile of recent norms is the threshold, in (0, 1].
        Schedulable.
      window: Number of recent norms kept (window estimator), >= 1. Fixed
        at `init` (the buffer size); a value injected later is ignored.
      warmup_steps: Number of finite norms to record before clipping starts,
        >= 0. Before that, `initial_max_norm` is used if given, else no
        clipping (threshold +inf).
      initial_max_norm: Optional fixed threshold during warm-up; > 0.
      max_norm: Optional hard ceiling on the threshold; > 0.
      multiplier: Scale on the quantile (e.g. 1.5 clips only norms well
        above the usual range); > 0. Schedulable.
      record_clipped: Record the clipped norm instead of the raw one. The
        default (False) records raw norms, so the threshold follows a real
        upward drift of the norms: a quantile < 1 of norms capped at the
        threshold can never rise, so recording clipped norms ratchets the
        threshold down. A single spike moves a windowed quantile by one rank
        at most.
      estimator: `"window"` (exact, `window` floats of state) or
        `"streaming"` (O(1) state, for very long horizons).
      streaming_lr: Step size of the streaming estimator, > 0.
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of the updates, the axis to take the norm over.

    Returns:
      An `optax.GradientTransformation` whose state is an
      `AdaptiveClipState`; its `stats.threshold` is the bound used this step
      (inf while warming up with no `initial_max_norm`), and `metrics()`
      also reports `quantile_estimate` and `finite_norm_count`.

    Edge cases:
      Non-finite norms are never recorded and pass through unscaled (counted
      in `nonfinite_count`). Inside `optax.MultiSteps`, the history advances
      once per real (accumulated) update. A zero gradient stays zero.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.adaptive_clip(quantile=0.5, window=4, warmup_steps=3)
      >>> state = tx.init(None)
      >>> for n in [1.0, 2.0, 3.0, 100.0]:
      ...     out, state = tx.update(jnp.array([n]), state)
      >>> print(float(out[0]), float(state.stats.threshold))  # median of 1, 2, 3
      2.0 2.0

    References:
      Seetharaman et al., AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks, 2020. https://arxiv.org/abs/2007.14469
      Andrew et al., Differentially Private Learning with Adaptive Clipping,
      2021 (geometric quantile update). https://arxiv.org/abs/1905.03871
    """
    fn = "adaptive_clip"
    _checks.in_range(fn, "quantile", quantile, 0.0, 1.0, lo_open=True, hi_open=False)
    _checks.integer_at_least(fn, "window", window, 1)
    _checks.integer_at_least(fn, "warmup_steps", warmup_steps, 0)
    _checks.positive(fn, "multiplier", multiplier)
    _checks.positive(fn, "streaming_lr", streaming_lr)
    for name, value in (("initial_max_norm", initial_max_norm), ("max_norm", max_norm)):
        if value is not None:
            _checks.positive(fn, name, value)
    _checks.one_of(fn, "estimator", estimator, ("window", "streaming"))
    _checks.boolean(fn, "record_clipped", record_clipped, arrays=True, traced=True)
    _checks.axis_name(fn, axis_name)

    def init_fn(params):
        del params
        # Streaming keeps one unused slot, not an empty array: orbax refuses to save zero-size arrays.
        size = int(window) if estimator == "window" else 1
        return AdaptiveClipState(
            stats=_stats.init_stats(),
            norm_history=jnp.zeros((size,), F32),
            history_index=jnp.zeros((), I32),
            sorted_norm_history=jnp.full((size,), jnp.inf, F32),
            finite_norm_count=jnp.zeros((), I32),
            quantile_estimate=jnp.full((), jnp.inf, F32),
        )

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, AdaptiveClipState)
        norm = _norms.global_norm(updates, axis_name)
        count = state.finite_norm_count
        warm = count >= jnp.asarray(warmup_steps, I32)
        bound = jnp.asarray(multiplier, F32) * state.quantile_estimate
        if max_norm is not None:
            bound = jnp.minimum(bound, jnp.asarray(max_norm, F32))
        fallback = jnp.inf if initial_max_norm is None else jnp.asarray(initial_max_norm, F32)
        bound = jnp.where(warm, bound, fallback)
        out, stats = clip_to_bound(updates, state.stats, norm, bound)

        finite = jnp.isfinite(norm)
        value = jnp.where(jnp.asarray(record_clipped), stats.post_clip_norm, norm)
        q = jnp.asarray(quantile, F32)
        new_count = _stats.increment(count, finite)
        if estimator == "window":
            window_full = count >= state.norm_history.shape[0]
            evicted = jnp.where(window_full, state.norm_history[state.history_index], jnp.inf)
            ordered = _sorted_replace(state.sorted_norm_history, evicted, value, finite)
            history, index = _stats.ring_push(state.norm_history, state.history_index, value, finite)
            estimate = _window_quantile(ordered, jnp.minimum(new_count, history.shape[0]), q)
        else:
            history, index, ordered = state.norm_history, state.history_index, state.sorted_norm_history
            old = state.quantile_estimate
            below = (value <= old).astype(F32)
            geometric = old * jnp.exp(-jnp.asarray(streaming_lr, F32) * (below - q))
            running_max = jnp.where(count > 0, jnp.maximum(old, value), value)
            estimate = jnp.where(new_count <= jnp.asarray(warmup_steps, I32), running_max, geometric)
            estimate = jnp.where(finite, estimate, old)
        return out, AdaptiveClipState(stats, history, index, ordered, new_count, estimate)

    return optax.GradientTransformation(init_fn, update_fn)


class ZScoreClipState(NamedTuple):
    """State of `zscore_clip`.

    Attributes:
      stats: The `ClipStats`.
      norm_ema_mean: float32 `[]`, EMA of the (clipped) global norm; during
        warm-up the plain mean of the norms so far.
      norm_ema_var: float32 `[]`, EMA variance likewise.
      finite_norm_count: int32 `[]`, finite norms seen (saturates).
    """

    stats: _stats.ClipStats
    norm_ema_mean: jax.Array
    norm_ema_var: jax.Array
    finite_norm_count: jax.Array


def zscore_clip(
    z_threshold: jax.typing.ArrayLike = 2.5,
    ema_decay: jax.typing.ArrayLike = 0.97,
    warmup_steps: int = 25,
    *,
    mode: str = "reciprocal",
    max_norm: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-6,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """Z-score spike clipping (ZClip): clip norms far above their EMA.

    Keeps an exponential moving average `mu` and variance `var` of the
    global norm `g` (`sigma = sqrt(var)`). After `warmup_steps` finite norms
    (whose plain mean and variance initialize the EMA), a step with z-score
    `z = (g - mu) / (sigma + eps) > z_threshold` is clipped to
    `mu + z_threshold**2 * sigma / z` (`mode="reciprocal"`, the paper's
    default: the larger the spike, the harder it is clipped) or to `mu`
    (`mode="mean"`); the EMA is then updated with the clipped norm:
    `mu <- d * mu + (1 - d) * g'`, `var <- d * var + (1 - d) * (g' - mu)**2`.
    There is no hidden fixed ceiling (the reference implementation's
    default `max_grad_norm=1.0` clips every norm above 1); pass `max_norm`
    for one.

    Args:
      z_threshold: z-score above which a norm is a spike; > 0. Schedulable.
      ema_decay: EMA decay `d`, in [0, 1). Schedulable.
      warmup_steps: Finite norms used to initialize the EMA before clipping
        starts; >= 1.
      mode: `"reciprocal"` or `"mean"`, the clip target for a spike.
      max_norm: Optional hard ceiling on the threshold; > 0.
      eps: Added to `sigma` in the z-score; > 0.
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of the updates, the axis to take the norm over.

    Returns:
      An `optax.GradientTransformation` whose state is a `ZScoreClipState`.
      `stats.threshold` is the clip target on a spike step and otherwise the
      spike boundary `mu + z_threshold * sigma` (inf during warm-up, or
      `max_norm`); `metrics()` also reports `norm_ema_mean`, `norm_ema_var`.

    Edge cases:
      Ordinary steps pass through bit for bit (scaled by exactly 1). Non-finite
      norms never enter the EMA and pass through unscaled. Inside
      `optax.MultiSteps`, the EMA advances once per real update.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.zscore_clip(warmup_steps=4)
      >>> state = tx.init(None)
      >>> for n in [1.0, 1.2, 0.8, 1.0, 50.0]:
      ...     out, state = tx.update(jnp.array([n]), state)
      >>> print(f"{float(out[0]):.3f} clipped={bool(state.stats.clipped)}")
      1.003 clipped=True

    References:
      Kumar et al., ZClip: Adaptive Spike Mitigation for LLM Pre-Training,
      2025. https://arxiv.org/abs/2504.02507
    """
    fn = "zscore_clip"
    _checks.positive(fn, "z_threshold", z_threshold)
    _checks.in_range(fn, "ema_decay", ema_decay, 0.0, 1.0, lo_open=False, hi_open=True)
    _checks.integer_at_least(fn, "warmup_steps", warmup_steps, 1)
    _checks.one_of(fn, "mode", mode, ("reciprocal", "mean"))
    _checks.positive(fn, "eps", eps)
    if max_norm is not None:
        _checks.positive(fn, "max_norm", max_norm)
    _checks.axis_name(fn, axis_name)

    def init_fn(params):
        del params
        zero = lambda: jnp.zeros((), F32)  # separate buffers: state may be donated
        return ZScoreClipState(_stats.init_stats(), zero(), zero(), jnp.zeros((), I32))

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, ZScoreClipState)
        norm = _norms.global_norm(updates, axis_name)
        zt, d = jnp.asarray(z_threshold, F32), jnp.asarray(ema_decay, F32)
        mu, var, count = state.norm_ema_mean, state.norm_ema_var, state.finite_norm_count
        warm = count >= jnp.asarray(warmup_steps, I32)
        sigma = jnp.sqrt(var)
        z = (norm - mu) / (sigma + jnp.asarray(eps, F32))
        spike = warm & jnp.isfinite(norm) & (z > zt)
        if mode == "reciprocal":
            target = mu + zt * zt * sigma / jnp.where(spike, z, 1.0)
        else:
            target = mu
        bound = jnp.where(spike, target, jnp.where(warm, mu + zt * sigma, jnp.inf))
        if max_norm is not None:
            bound = jnp.minimum(bound, jnp.asarray(max_norm, F32))
        out, stats = clip_to_bound(updates, state.stats, norm, bound)

        finite = jnp.isfinite(norm)
        g = stats.post_clip_norm
        # Warm-up: running (population) mean and variance of the norms so far.
        n = (count + 1).astype(F32)
        w_mu = mu + (g - mu) / n
        w_var = var + ((g - mu) * (g - w_mu) - var) / n
        # After warm-up: the EMA, updated with the clipped norm (mean first).
        e_mu = d * mu + (1 - d) * g
        e_var = d * var + (1 - d) * jnp.square(g - e_mu)
        new_mu = jnp.where(finite, jnp.where(warm, e_mu, w_mu), mu)
        new_var = jnp.where(finite, jnp.where(warm, e_var, w_var), var)
        return out, ZScoreClipState(stats, new_mu, new_var, _stats.increment(count, finite))

    return optax.GradientTransformation(init_fn, update_fn)
