"""`apply_gradients`: Flax Linen's `TrainState.apply_gradients` that hands `loss=` to the chain."""

from __future__ import annotations

from typing import Any

import optax

# Flax's key for params updated by their gradients directly (fp8 scales), not by the optimizer.
_OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"


def apply_gradients(state: Any, grads: Any, **extra_args: Any) -> Any:
    """One optimizer step on a Flax Linen `TrainState`, with `extra_args` passed to `tx.update`.

    Flax's `TrainState.apply_gradients(grads=..., **kwargs)` calls
    `tx.update(grads, opt_state, params)` and hands `kwargs` to
    `state.replace`, so a `loss=` given there never reaches `guard_clip`
    (which then runs without its loss hold; in Flax a `loss` that is not a
    field of the state raises). This helper does what Flax's does (step + 1,
    `optax.apply_updates`, Flax's `_overwrite_with_gradient` collection
    taken from the gradients) and calls
    `tx.update(grads, opt_state, params, **extra_args)`: `optax.chain` passes
    `loss=` to the transforms that take it (`guard_clip`) and the others
    ignore it.

    Args:
      state: A `flax.training.train_state.TrainState` (or any dataclass
        with `step`, `params`, `tx`, `opt_state` and `replace`).
      grads: Gradients with the structure of `state.params`.
      **extra_args: Keyword arguments for `tx.update`, e.g. `loss=loss`
        (a scalar); `tx` must then be an
        `optax.GradientTransformationExtraArgs` (`optax.chain` is).

    Returns:
      The state with `step + 1`, the updated `params` and the new
      `opt_state`.

    Raises:
      TypeError: `state` lacks a `TrainState` field, or `extra_args` are
        given for a `tx` that takes none.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optaxclip
      >>> from flax.training import train_state
      >>> tx = optax.chain(optaxclip.guard_clip(), optax.sgd(0.1))
      >>> state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=tx)
      >>> state = optaxclip.apply_gradients(state, {"w": jnp.ones(2)}, loss=jnp.float32(2.5))
      >>> print(int(state.step), float(state.opt_state[0].loss_fast))  # the guard saw the loss
      1 2.5

    Edge cases:
      Works under `jax.jit` (the state is a pytree) and inside `shard_map`
      (a `guard_clip(axis_name=...)` averages the loss over the axis).
    """
    fn = "apply_gradients"
    missing = [f for f in ("step", "params", "tx", "opt_state", "replace") if not hasattr(state, f)]
    if missing:
        raise TypeError(
            f"{fn}: `state` must be a flax TrainState (fields step, params, tx, opt_state), got "
            f"state={type(state).__name__} without {', '.join(missing)}."
        )
    if extra_args and not isinstance(state.tx, optax.GradientTransformationExtraArgs):
        raise TypeError(
            f"{fn}: `state.tx` takes no extra arguments, got {', '.join(sorted(extra_args))}= for "
            f"tx={type(state.tx).__name__}; build it with optax.chain(...) (which passes them on) "
            f"or optax.with_extra_args_support(tx)."
        )
    overwrite = isinstance(grads, dict) and _OVERWRITE_WITH_GRADIENT in grads
    grads_opt = grads["params"] if overwrite else grads
    params_opt = state.params["params"] if overwrite else state.params
    updates, opt_state = state.tx.update(grads_opt, state.opt_state, params_opt, **extra_args)
    params = optax.apply_updates(params_opt, updates)
    if overwrite:
        params = {"params": params, _OVERWRITE_WITH_GRADIENT: grads[_OVERWRITE_WITH_GRADIENT]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
