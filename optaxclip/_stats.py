"""`ClipStats`, the one function that updates it, and the readers `stats`/`metrics`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ClipStats(NamedTuple):
    """What a clipping transform did on its last step, and counters since init.

    Attributes:
      pre_clip_norm: float32 `[]`, global L2 norm of the incoming updates.
      post_clip_norm: float32 `[]`, global L2 norm of the outgoing updates.
      threshold: float32 `[]`, the global bound used this step (for
        transforms with many bounds, the summary their docstring gives).
      clipped: bool `[]`, whether any scaling or clamping happened.
      step_count: int32 `[]`, number of updates seen.
      clip_count: int32 `[]`, number of updates in which `clipped` was true.
      nonfinite_count: int32 `[]`, number of updates whose norm was NaN/inf.
    """

    pre_clip_norm: jax.Array
    post_clip_norm: jax.Array
    threshold: jax.Array
    clipped: jax.Array
    step_count: jax.Array
    clip_count: jax.Array
    nonfinite_count: jax.Array


def init_stats() -> ClipStats:
    """A fresh `ClipStats`: zero norms and counters."""
    # One buffer per field: a shared buffer cannot be donated twice in a jitted step.
    zero = lambda dtype: jnp.zeros((), dtype)
    return ClipStats(*(zero(jnp.float32) for _ in range(3)), zero(bool), *(zero(jnp.int32) for _ in range(3)))


def init_fn(params: Any) -> ClipStats:
    """`init` for transforms whose whole state is a `ClipStats`."""
    del params
    return init_stats()


def record(
    stats: ClipStats,
    *,
    pre_clip_norm: jax.Array,
    post_clip_norm: jax.Array,
    threshold: jax.Array,
    clipped: jax.Array,
) -> ClipStats:
    """Returns `stats` after one more step (scalars only: no pass over the updates)."""
    clipped = jnp.asarray(clipped, bool)
    nonfinite = ~jnp.isfinite(pre_clip_norm)
    return ClipStats(
        pre_clip_norm=jnp.asarray(pre_clip_norm, jnp.float32),
        post_clip_norm=jnp.asarray(post_clip_norm, jnp.float32),
        threshold=jnp.asarray(threshold, jnp.float32),
        clipped=clipped,
        step_count=increment(stats.step_count, True),
        clip_count=increment(stats.clip_count, clipped),
        nonfinite_count=increment(stats.nonfinite_count, nonfinite),
    )


def increment(count: jax.Array, flag: Any) -> jax.Array:
    """`count + 1` where `flag`, saturating at int32's max instead of wrapping."""
    bumped = jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)
    return jnp.where(flag, bumped, count).astype(jnp.int32)


def ring_push(history: jax.Array, index: jax.Array, value: jax.Array, keep: jax.Array):
    """Writes `value` at `index` of the ring buffer if `keep`; returns (history, index)."""
    window = history.shape[0]
    written = history.at[index % window].set(value)
    return jnp.where(keep, written, history), jnp.where(keep, (index + 1) % window, index)


def _path_str(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return "/".join(parts)


def _owns_stats(x: Any) -> bool:
    """A transform's own state NamedTuple: a `stats` field holding its `ClipStats`."""
    return isinstance(x, tuple) and isinstance(getattr(x, "stats", None), ClipStats)


def _find(opt_state: Any, prefix: str = "") -> dict[str, tuple[ClipStats, dict[str, Any], frozenset]]:
    """Each `ClipStats` in the state by path, with its owner's other scalar fields.

    The third item names the fields that are not differentially private
    (a DP state's `NONPRIVATE_FIELDS`).
    """
    is_leaf = lambda x: isinstance(x, ClipStats) or _owns_stats(x)
    found, _ = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_leaf)
    out = {}
    for path, node in found:
        where = "/".join(p for p in (prefix, _path_str(path)) if p)
        if isinstance(node, ClipStats):
            out[where] = (node, {}, frozenset())
        elif _owns_stats(node):
            extras = {}
            for name, value in node._asdict().items():
                if name == "stats":
                    continue
                if isinstance(value, jax.Array) and value.ndim == 0:
                    if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # not a metric
                        extras[name] = value
                elif not isinstance(value, jax.Array):  # a wrapped inner state
                    out.update(_find(value, "/".join(p for p in (where, name) if p)))
            out[where] = (node.stats, extras, getattr(type(node), "NONPRIVATE_FIELDS", frozenset()))
    return out


def stats(opt_state: Any) -> ClipStats | dict[str, ClipStats]:
    """Finds the `ClipStats` anywhere inside a (chained, nested) optimizer state.

    Works through `optax.chain`, `optax.MultiSteps`, `optax.masked`,
    `optax.inject_hyperparams` and any other pytree state.

    Args:
      opt_state: An optimizer state.

    Returns:
      The one `ClipStats` if the state holds exactly one; otherwise a dict
      from each one's path in the state (such as `"0"` or
      `"inner_opt_state/1"`) to it.

    Raises:
      ValueError: if the state holds no `ClipStats`.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> _, state = tx.update(g, tx.init(g))
      >>> s = optaxclip.stats(state)
      >>> print(float(s.pre_clip_norm), float(s.threshold), bool(s.clipped))
      5.0 1.0 True
    """
    found = _find(opt_state)
    if not found:
        raise ValueError(
            f"stats: `opt_state` holds no ClipStats (got a {type(opt_state).__name__}); "
            "is an optaxclip transform in the chain?"
        )
    if len(found) == 1:
        return next(iter(found.values()))[0]
    return {path: st for path, (st, _, _) in found.items()}


def metrics(opt_state: Any, *, private_only: bool = False) -> dict[str, jax.Array]:
    """The `ClipStats` in `opt_state` as a flat `dict[str, scalar]` for a logger.

    Keys are the field names (`"pre_clip_norm"`, ...) when the state holds
    one `ClipStats`, and `"<path>/<field>"` when it holds several. The
    scalar fields a transform keeps beside its `ClipStats` (such as
    `adaptive_clip`'s `quantile_estimate`) are included the same way. Also
    works inside `jax.jit`.

    In a DP transform's state, values computed from raw per-example data
    (the pre-clip norm, whether and how often examples were clipped,
    non-finite counts) are not differentially private: their keys read
    `nonprivate/<field>`, and `private_only=True` leaves them out. The
    released update's norm, the clip norm and `dp_adaptive_aggregate`'s
    noised unclipped fraction are private (post-processing of noised
    queries).

    Args:
      opt_state: An optimizer state.
      private_only: Drop the values that are not differentially private.

    Returns:
      A dict of scalar arrays.

    Example:
      >>> import jax.numpy as jnp, optax, optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> _, state = tx.update(g, tx.init(g))
      >>> m = optaxclip.metrics(state)
      >>> print(f"{float(m['pre_clip_norm']):.1f} {int(m['clip_count'])}")
      5.0 1
    """
    found = _find(opt_state)
    if not found:
        stats(opt_state)  # raises the error
    single = len(found) == 1
    out = {}
    for path, (st, extras, nonprivate) in found.items():
        for field, value in {**st._asdict(), **extras}.items():
            if field in nonprivate:
                if private_only:
                    continue
                field = f"nonprivate/{field}"
            out[field if single or not path else f"{path}/{field}"] = value
    return out
