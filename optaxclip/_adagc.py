"""`adagc_clip`: per-tensor adaptive clipping against an EMA of each tensor's own clipped norms (AdaGC).

The per-tensor EMAs are one float32 vector in the optimizer state, so the
transform runs inside `jax.jit` with no host sync, vmaps over independent
states, and checkpoints/restores like any optax state. Its update has no
branch: warm-up and adaptive factors are both computed (a few scalars per
tensor) and one multiply per leaf applies the chosen one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _checks, _norms, _stats

F32 = jnp.float32
I32 = jnp.int32


class AdaGCClipState(NamedTuple):
    """State of `adagc_clip`.

    Attributes:
      stats: The `ClipStats`.
      norm_ema: float32 `[num_tensors]`, each tensor's EMA `gamma_i` of its
        clipped norm, in `jax.tree.leaves(params)` order (float leaves
        only); +inf for a tensor whose norm has not been recorded yet (none,
        or only zeros, so far).
      tensor_threshold: float32 `[num_tensors]`, the bound on each tensor's
        norm used this step: `clipping * gamma_i` after warm-up, +inf during
        warm-up (the global bound `max_norm` applies then).
      finite_norm_count: int32 `[]`, steps with a finite global norm so far
        (saturates); warm-up lasts `warmup_steps` of them.
      clipped_tensor_count: int32 `[]`, tensors scaled down this step.
    """

    stats: _stats.ClipStats
    norm_ema: jax.Array
    tensor_threshold: jax.Array
    finite_norm_count: jax.Array
    clipped_tensor_count: jax.Array


def adagc_clip(
    clipping: jax.typing.ArrayLike = 1.05,
    ema_decay: jax.typing.ArrayLike = 0.98,
    warmup_steps: int = 100,
    max_norm: jax.typing.ArrayLike = 1.0,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    """AdaGC: clips each tensor to `clipping` times an EMA of its own clipped norms.

    For each tensor (leaf) `i` with gradient `g_i`, the rules of Wang et al.
    (2025): during the first `warmup_steps` (finite) steps, the global norm is
    clipped to `max_norm` (their `lambda_abs`), `g_hat = min(1, max_norm /
    ||g||) * g`, and `gamma_i <- min(gamma_i, ||g_hat_i||)`. After that, each
    tensor on its own: `g_hat_i = min(1, clipping * gamma_i / ||g_i||) * g_i`
    (`clipping` is their `lambda_rel`) and
    `gamma_i <- ema_decay * gamma_i + (1 - ema_decay) * ||g_hat_i||`.
    A spike in one tensor is clipped back to that tensor's usual scale
    without shrinking the others, unlike a global-norm clip.

    Args:
      clipping: Bound on each tensor's norm relative to its EMA
        (`lambda_rel`); > 0. Schedulable.
      ema_decay: EMA decay `beta`, in [0, 1). Schedulable.
      warmup_steps: Steps of global clipping before the per-tensor clip
        starts; >= 0.
      max_norm: The global-norm bound during warm-up (`lambda_abs`); > 0.
        Schedulable.
      axis_name: Inside `shard_map`/`pmap`, when each device holds a
        disjoint shard of the updates, the axis to take the norms over.

    Returns:
      An `optax.GradientTransformation` whose `init` needs the params (it
      keeps one EMA per leaf); its state is an `AdaGCClipState`.
      `stats.threshold` is `max_norm` during warm-up and afterwards
      `sqrt(sum_i (clipping * gamma_i)**2)`, the largest global norm the
      output can have (+inf while some tensor has no EMA yet); `metrics()`
      also reports `finite_norm_count` and `clipped_tensor_count`.

    Edge cases:
      A zero norm is not recorded during warm-up (its minimum would set
      `gamma_i = 0` and clip the tensor to zero for good, as happens to
      layers below a zero-initialized head at step 1); a tensor with no
      recorded norm takes its first positive norm after warm-up as its EMA,
      unclipped (as the reference code initializes a missing state). A step
      whose global norm is NaN/inf changes no EMA and does not count toward
      warm-up; its non-finite tensors pass through unscaled (counted in
      `nonfinite_count`). A zero gradient stays zero. Inside
      `optax.MultiSteps` the EMAs advance once per real update. Norms are
      float32, and outputs keep the input dtypes. Integer and `float0`
      leaves are not gradients: they have no EMA and pass through untouched.

    Example:
      >>> import jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.adagc_clip(warmup_steps=2, max_norm=10.0)
      >>> g = {"a": jnp.array([1.0]), "b": jnp.array([1.0])}
      >>> state = tx.init(g)
      >>> for _ in range(3):
      ...     _, state = tx.update(g, state)
      >>> out, state = tx.update({"a": jnp.array([50.0]), "b": jnp.array([1.0])}, state)
      >>> print(f"{float(out['a'][0]):.3f} {float(out['b'][0]):.3f}")  # only the spike is clipped
      1.050 1.000

    References:
      Wang et al., AdaGC: Enhancing LLM Pretraining Stability via Adaptive
      Gradient Clipping, 2025. https://arxiv.org/abs/2502.11034
    """
    fn = "adagc_clip"
    _checks.positive(fn, "clipping", clipping)
    _checks.in_range(fn, "ema_decay", ema_decay, 0.0, 1.0, lo_open=False, hi_open=True)
    _checks.integer_at_least(fn, "warmup_steps", warmup_steps, 0)
    _checks.positive(fn, "max_norm", max_norm)
    _checks.axis_name(fn, axis_name)

    def init_fn(params):
        if params is None:
            raise ValueError(f"{fn}: `init` needs the params (one EMA per leaf), got params=None.")
        n = len(_float_leaves(params)[1])
        return AdaGCClipState(
            stats=_stats.init_stats(),
            norm_ema=jnp.full((n,), jnp.inf, F32),
            tensor_threshold=jnp.full((n,), jnp.inf, F32),
            finite_norm_count=jnp.zeros((), I32),
            clipped_tensor_count=jnp.zeros((), I32),
        )

    def update_fn(updates, state, params=None):
        del params
        _checks.state(f"{fn}.update", state, AdaGCClipState)
        leaves, idx = _float_leaves(updates)
        if len(idx) != state.norm_ema.shape[0]:
            raise ValueError(
                f"{fn}: the updates have {len(idx)} float leaves but the state was initialized for "
                f"{state.norm_ema.shape[0]}; pass `init` params with the structure of the updates "
                f"(the updates have structure {jax.tree.structure(updates)})."
            )
        if not idx:
            return updates, state._replace(stats=_stats.record(state.stats, **_empty()))
        norms = jnp.stack(_norms.leaf_norms([leaves[i] for i in idx], axis_name))
        pre = _norms.combine_norms([norms])
        finite = jnp.isfinite(pre)
        count = state.finite_norm_count
        in_warmup = count < jnp.asarray(warmup_steps, I32)

        gamma = state.norm_ema
        unset = jnp.isinf(gamma)
        bounds = jnp.where(unset, jnp.inf, jnp.asarray(clipping, F32) * gamma)
        global_factor = _norms.scale_factor(pre, jnp.asarray(max_norm, F32))
        factors = jnp.where(in_warmup, global_factor, _norms.scale_factor(norms, bounds))
        out = list(leaves)
        for k, i in enumerate(idx):
            out[i] = _norms.scale(leaves[i], factors[k])

        clipped_norms = norms * factors
        d = jnp.asarray(ema_decay, F32)
        warm_gamma = jnp.where(clipped_norms > 0, jnp.minimum(gamma, clipped_norms), gamma)
        first = jnp.where(clipped_norms > 0, clipped_norms, jnp.inf)
        ema_gamma = jnp.where(unset, first, d * gamma + (1 - d) * clipped_norms)
        new_gamma = jnp.where(finite, jnp.where(in_warmup, warm_gamma, ema_gamma), gamma)

        post, combined_bound = _norms.combine_norms([clipped_norms]), _norms.combine_norms([bounds])
        shrunk = factors < 1
        stats = _stats.record(
            state.stats,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=jnp.where(in_warmup, jnp.asarray(max_norm, F32), combined_bound),
            clipped=jnp.any(shrunk),
        )
        return jax.tree.unflatten(jax.tree.structure(updates), out), AdaGCClipState(
            stats=stats,
            norm_ema=new_gamma,
            tensor_threshold=jnp.where(in_warmup, jnp.inf, bounds),
            finite_norm_count=_stats.increment(count, finite),
            clipped_tensor_count=jnp.sum(shrunk).astype(I32),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _float_leaves(tree) -> tuple[list, list[int]]:
    """The leaves of `tree` and the indices of the float ones (integer, `float0`: not gradients)."""
    leaves = jax.tree.leaves(tree)
    return leaves, [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


def _empty() -> dict:
    zero = jnp.zeros((), F32)
    return {
        "pre_clip_norm": zero,
        "post_clip_norm": zero,
        "threshold": jnp.full((), jnp.inf, F32),
        "clipped": False,
    }
