"""`dynamic_loss_scale`: float16 loss scaling as a wrapper around a whole optax chain.

Like `optax.apply_if_finite` it wraps the whole chain, and skipping the inner
update is part of its purpose: its update takes one `lax.cond` (the inner
chain runs only on steps whose unscaled gradients are all finite), as
`skip_spikes` does. Under `jax.vmap` the cond becomes a select and both
branches run.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _stats

F32 = jnp.float32
I32 = jnp.int32


class DynamicLossScaleState(NamedTuple):
    """State of `dynamic_loss_scale`.

    Attributes:
      loss_scale: float32 `[]`, the scale the training step multiplies the
        loss by before `jax.grad` (read it with `optaxclip.loss_scale`).
      finite_step_streak: int32 `[]`, finite steps since the scale last
        changed (torch's growth tracker).
      skipped_step_count: int32 `[]`, steps skipped because an unscaled
        gradient was NaN/inf (saturates).
      step_skipped: bool `[]`, whether the last step was skipped.
      inner_state: The wrapped transformation's state (untouched on a skip).
    """

    loss_scale: jax.Array
    finite_step_streak: jax.Array
    skipped_step_count: jax.Array
    step_skipped: jax.Array
    inner_state: Any

    # The scalar fields `optaxclip.metrics` reports for this state.
    METRIC_FIELDS = ("loss_scale", "skipped_step_count", "step_skipped")


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones((), bool)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _like(new, old):
    """`new` cast leaf by leaf to the dtypes of `old`, so both branches of the cond agree."""
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new, old)


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    initial_scale: jax.typing.ArrayLike = 2.0**16,
    growth_factor: jax.typing.ArrayLike = 2.0,
    backoff_factor: jax.typing.ArrayLike = 0.5,
    growth_interval: int = 2000,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic loss scaling for float16 training, wrapping a whole chain.

    The training step multiplies its loss by `optaxclip.loss_scale(opt_state)`
    before `jax.grad`, so that small float16 gradients do not flush to zero,
    and passes the scaled gradients to this transform's `update`. There
    they are cast to float32 and divided by the scale, so `inner` (and so
    every clip in it) sees the true gradients: a `max_norm` of 1.0 means 1.0,
    not `1.0 / scale`. If any unscaled gradient is NaN/inf, the step is
    skipped: zero updates, the inner state exactly as it was (the inner
    `update` does not run), and the scale is multiplied by `backoff_factor`.
    After `growth_interval` finite steps in a row the scale is multiplied by
    `growth_factor`. The defaults are those of `torch.amp.GradScaler`.

    bfloat16 needs no loss scale: it has float32's exponent range, so its
    gradients do not underflow where float32's would not (and optaxclip's
    norms are float32 anyway).

    Args:
      inner: The transformation to wrap (typically the whole chain).
      initial_scale: The first loss scale; > 0 and finite.
      growth_factor: Factor applied after `growth_interval` finite steps;
        >= 1. Schedulable.
      backoff_factor: Factor applied after a non-finite step; in (0, 1].
        Schedulable.
      growth_interval: Finite steps in a row before the scale grows; >= 1.

    Returns:
      An `optax.GradientTransformationExtraArgs` (extra arguments go to
      `inner`) whose state is a `DynamicLossScaleState`; `optaxclip.metrics`
      reports its `loss_scale`, `skipped_step_count` and `step_skipped`. The
      updates are `inner`'s, computed from float32 gradients
      (`optax.apply_updates` casts them to the parameters' dtypes); on a
      skipped step they are zeros of the same dtypes.

    Edge cases:
      The inner state keeps its dtypes: a float16 leaf (such as adam's
      moments of float16 parameters) is cast back to float16 after the
      inner update. The scale never grows to inf (growth that would
      overflow float32 is not applied) and never shrinks below the
      smallest normal float32. Inside `optax.MultiSteps` the scaled
      gradients are accumulated and unscaled once per real update.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.dynamic_loss_scale(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1)))
      >>> params = jnp.array([1.0, 2.0])
      >>> state = tx.init(params)
      >>> scale = optaxclip.loss_scale(state)
      >>> grads = jax.grad(lambda p: scale * jnp.sum(p**2))(params)  # scaled loss
      >>> updates, state = tx.update(grads, state, params)
      >>> print(float(scale), [round(float(u), 3) for u in updates])  # clipped true gradient
      65536.0 [-0.045, -0.089]
      >>> _, state = tx.update(jnp.array([jnp.inf, 0.0]), state, params)  # overflow: skip
      >>> print(float(optaxclip.loss_scale(state)), int(state.skipped_step_count))
      32768.0 1

    References:
      Micikevicius et al., Mixed Precision Training, 2018.
      https://arxiv.org/abs/1710.03740
      PyTorch `torch.amp.GradScaler`.
      https://pytorch.org/docs/stable/amp.html#gradient-scaling
    """
    fn = "dynamic_loss_scale"
    _checks.transformation(fn, "inner", inner)
    _checks.positive(fn, "initial_scale", initial_scale)
    _checks.finite(fn, "initial_scale", initial_scale)
    _checks.in_range(fn, "growth_factor", growth_factor, 1.0, float("inf"), lo_open=False, hi_open=True)
    _checks.in_range(fn, "backoff_factor", backoff_factor, 0.0, 1.0, lo_open=True, hi_open=False)
    _checks.integer_at_least(fn, "growth_interval", growth_interval, 1)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return DynamicLossScaleState(
            loss_scale=jnp.asarray(initial_scale, F32),
            finite_step_streak=jnp.zeros((), I32),
            skipped_step_count=jnp.zeros((), I32),
            step_skipped=jnp.zeros((), bool),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _checks.state(f"{fn}.update", state, DynamicLossScaleState)
        scale = state.loss_scale
        unscaled = jax.tree.map(lambda g: g.astype(F32) / scale, updates)
        finite = _all_finite(unscaled)
        out_shapes, _ = jax.eval_shape(
            lambda u, s: inner.update(u, s, params, **extra_args), unscaled, state.inner_state
        )

        def run(operands):
            u, inner_state = operands
            out, new_state = inner.update(u, inner_state, params, **extra_args)
            return out, _like(new_state, inner_state)

        def skipped(operands):
            _, inner_state = operands
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes), inner_state

        out, inner_state = jax.lax.cond(finite, run, skipped, (unscaled, state.inner_state))

        streak = jnp.where(finite, state.finite_step_streak + 1, 0).astype(I32)
        grow = streak >= jnp.asarray(growth_interval, I32)
        grown = scale * jnp.asarray(growth_factor, F32)
        grown = jnp.where(jnp.isfinite(grown), grown, scale)
        shrunk = jnp.maximum(scale * jnp.asarray(backoff_factor, F32), jnp.finfo(F32).tiny)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), shrunk)
        return out, DynamicLossScaleState(
            loss_scale=new_scale.astype(F32),
            finite_step_streak=jnp.where(grow, 0, streak).astype(I32),
            skipped_step_count=_stats.increment(state.skipped_step_count, ~finite),
            step_skipped=~finite,
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def loss_scale(opt_state: Any) -> jax.Array:
    """The current loss scale of the `dynamic_loss_scale` state inside `opt_state`.

    Works through `optax.chain`, `optax.MultiSteps`, `optax.inject_hyperparams`
    and Flax NNX optimizer state (`nnx.Optimizer(...).opt_state`).

    Args:
      opt_state: An optimizer state holding one `DynamicLossScaleState`.

    Returns:
      A float32 scalar array: multiply the loss by it before `jax.grad`.

    Raises:
      ValueError: if the state holds no `DynamicLossScaleState`, or several.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optaxclip.dynamic_loss_scale(optax.sgd(0.1), initial_scale=1024.0)
      >>> print(float(optaxclip.loss_scale(tx.init(jnp.zeros(2)))))
      1024.0
    """
    is_leaf = lambda x: isinstance(x, DynamicLossScaleState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_leaf) if is_leaf(x)]
    if len(found) != 1:
        raise ValueError(
            f"loss_scale: `opt_state` must hold exactly one dynamic_loss_scale state, found {len(found)} "
            f"(got a {type(opt_state).__name__}); is the chain wrapped in optaxclip.dynamic_loss_scale?"
        )
    scale = found[0].loss_scale
    nnx = sys.modules.get("flax.nnx")  # nnx.Optimizer wraps each array in a Variable
    if nnx is not None and isinstance(scale, nnx.Variable):
        scale = scale.get_value() if hasattr(type(scale), "get_value") else scale.value
    return jnp.asarray(scale)
