"""DP-SGD aggregation: clip, sum, noise and normalize per-example gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _checks, _norms, _stats
from ._per_example import ClippedGradSum, _clip_and_sum, _row_mask

F32 = jnp.float32


_NONPRIVATE = frozenset(
    {"pre_clip_norm", "clipped", "clip_count", "nonfinite_count", "nonfinite_example_count"}
)


class DPAggregateState(NamedTuple):
    """State of `dp_aggregate`.

    Attributes:
      stats: `ClipStats` over the examples: `pre_clip_norm` is the L2 norm of
        all per-example gradients together, `post_clip_norm` that of the
        released (noised, normalized) update, `threshold` the clip norm,
        `clipped` whether any example was clipped, `nonfinite_count` steps
        with a non-finite example. Per-example quantities are NOT
        differentially private: `metrics()` names them `nonprivate/...`.
      rng_key: uint32, the data (`jax.random.key_data`) of the PRNG key the
        next step's noise is drawn from. The transform rewraps it with the
        impl of the key it was given (typed threefry or rbg, or a legacy
        key), so the stream is that key's, and the state holds plain arrays
        only: it survives flax msgpack (`to_bytes`/`from_bytes`),
        `to_state_dict`, orbax and pickle.
      nonfinite_example_count: int32 `[]`, examples dropped for a non-finite
        gradient so far (not private).
    """

    stats: _stats.ClipStats
    rng_key: jax.Array
    nonfinite_example_count: jax.Array

    # Computed from raw per-example data, so not differentially private;
    # `metrics()` names them `nonprivate/...`.
    NONPRIVATE_FIELDS = _NONPRIVATE


def _check_batch_axis(fn: str, updates, params) -> None:
    """Raises unless every leaf of `updates` has one leading batch axis of the same size."""
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    shapes = {jax.tree_util.keystr(p): jnp.shape(x) for p, x in paths}
    sizes = {k: v[0] if v else None for k, v in shapes.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise ValueError(
            f"{fn}: `updates` must be per-example gradients, every leaf with the same leading "
            f"batch axis (batch, *param.shape), got leaf shapes {shapes}."
        )
    if params is None:
        return
    p_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    p_shapes = {jax.tree_util.keystr(p): jnp.shape(x) for p, x in p_paths}
    if p_shapes.keys() == shapes.keys() and any(shapes[k][1:] != v for k, v in p_shapes.items()):
        raise ValueError(
            f"{fn}: `updates` must be per-example gradients of shape (batch, *param.shape) "
            f"(from `per_example_grads`), got leaf shapes {shapes} for params of shapes {p_shapes}."
        )


def _key_parts(key: jax.Array) -> tuple[jax.Array, object]:
    """`(data, impl)`: the key's uint32 data, kept in the state, and the impl to rewrap it with.

    The state holds plain uint32 arrays, so it survives every format that
    takes NumPy arrays (flax msgpack, `to_state_dict`, pickle, orbax); the
    transform rewraps the data with the user's impl (threefry, rbg, ...), so
    the stream is the one the user's key draws. `impl` is None for a legacy
    `uint32[2]` key, used as it is.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), jax.random.key_impl(key)
    return jnp.asarray(key, jnp.uint32), None


def _split_key(data: jax.Array, impl, num: int) -> tuple[jax.Array, list[jax.Array]]:
    """`(next data, keys)`: the state's next key data and `num - 1` fresh keys of the user's type."""
    key = data if impl is None else jax.random.wrap_key_data(data, impl=impl)
    keys = jax.random.split(key, num)
    next_data = keys[0] if impl is None else jax.random.key_data(keys[0])
    return next_data, [keys[i] for i in range(1, num)]


def _leaf_noise(key: jax.Array, index: int, like: jax.Array) -> jax.Array:
    """Standard normal float32 noise for leaf `index` (its position in the flattened tree).

    One draw per leaf from `fold_in(key, index)`: with JAX's partitionable
    threefry (`jax_threefry_partitionable`, the default) each element's bits
    depend only on the key and its index, so under `jit` with sharded params
    every device draws the noise of its own shard (no collective) and the
    values are the same however the leaf is sharded. On a mesh with
    `Explicit` axes the draw takes the sum's sharding (else JAX draws it
    replicated, a full copy per device, and slices it).
    """
    sharding = jax.typeof(like).sharding
    mesh = getattr(sharding, "mesh", None)
    explicit = mesh is not None and not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types
    key = jax.random.fold_in(key, index)
    if explicit:
        return jax.random.normal(key, like.shape, F32, out_sharding=sharding)
    return jax.random.normal(key, like.shape, F32)


def _is_float0(x) -> bool:
    return jnp.result_type(x) == jax.dtypes.float0


def _aggregate(fn, updates, stats, clip, std, denom, noise_key, mask, params, axis_name):
    """Clip (unless already), sum, psum, add noise, normalize, record: the shared DP step.

    Returns `(released, stats, norms, real, dropped)`. The stats' threshold
    is the clip norm actually applied (a `ClippedGradSum`'s own, if larger).
    Every released leaf is floating point and noised; `float0` leaves (no
    data) are released as `float0` zeros; integer/bool leaves are refused.
    """
    if isinstance(updates, ClippedGradSum):
        _checks.dp_leaf_dtypes(fn, "updates.grads", updates.grads, allow_float0=True)
        leaves, treedef = jax.tree.flatten(updates.grads)
        norms, real = updates.norms, updates.mask
        if mask is not None:
            raise ValueError(f"{fn}: pass `mask` to `clipped_grad_sum`, not to `update`, got mask={mask!r}.")
        data = [i for i, x in enumerate(leaves) if not _is_float0(x)]
        sums = [leaves[i] for i in data]
        # The sum's sensitivity is its own clip norm: noise for the larger of the two.
        std = std * jnp.maximum(updates.l2_norm_clip / clip, 1.0)
        clip = updates.l2_norm_clip
        like = jax.tree.leaves(params) if params is not None else leaves
        if len(like) != len(leaves):
            raise ValueError(
                f"{fn}: `params` must have the structure of the clipped sum's grads, got "
                f"{jax.tree.structure(params)} for grads {treedef}."
            )
        shapes = [jnp.shape(x) for x in leaves]
    else:
        _checks.dp_leaf_dtypes(fn, "updates", updates, allow_float0=True)
        leaves, treedef = jax.tree.flatten(updates)
        _check_batch_axis(fn, updates, params)
        norms = _norms.batch_global_norms(updates)
        real = _row_mask(mask, norms.shape[0], f"{fn}.update")
        data = [i for i, x in enumerate(leaves) if not _is_float0(x)]
        sums = _clip_and_sum([leaves[i] for i in data], norms, real, clip)
        like = leaves
        shapes = [jnp.shape(x)[1:] for x in leaves]
    finite = jnp.isfinite(norms)
    n_real = jnp.sum(real & finite).astype(F32)
    dropped = jnp.sum(real & ~finite).astype(jnp.int32)
    clipped_any = jnp.any(real & finite & (norms > clip))
    if axis_name is not None:  # every device ends with the same (replicated) values
        sums = [jax.lax.psum(s, axis_name) for s in sums]
        n_real = jax.lax.psum(n_real, axis_name)
        dropped = jax.lax.psum(dropped, axis_name)
        clipped_any = jax.lax.psum(clipped_any.astype(jnp.int32), axis_name) > 0
    denom = jnp.maximum(n_real, 1.0) if denom is None else jnp.asarray(denom, F32)
    out = [np.zeros(shape, jax.dtypes.float0) for shape in shapes]
    for i, s in zip(data, sums, strict=True):
        # Noise drawn and added in float32 whatever the leaf dtype (a bfloat16 draw would be coarse).
        dtype = jnp.result_type(like[i])
        dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else F32
        out[i] = ((s.astype(F32) + std * _leaf_noise(noise_key, i, s)) / denom).astype(dtype)
    released = treedef.unflatten(out)
    stats = _stats.record(
        stats,
        # Padding excluded; over all devices' examples.
        pre_clip_norm=_norms.combine_norms([jnp.where(real, norms, 0.0)], axis_name),
        post_clip_norm=_norms.global_norm(released),
        threshold=clip,
        clipped=clipped_any,
    )
    return released, stats, norms, real, dropped


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
    `per_example_grads`), or a `ClippedGradSum` from `clipped_grad_sum` (the
    memory-bounded path, already clipped). Each example's global norm is
    clipped to `l2_norm_clip`; the clipped gradients are summed in float32;
    Gaussian noise of std `noise_multiplier * l2_norm_clip`, drawn in
    float32 from a fresh key each step (leaf `i` of the flattened tree from
    `fold_in(key, i)`, so under `jit` with sharded params each device draws
    its own shard's noise, the same values as on one device), is added;
    the result is
    divided by `expected_batch_size` (Poisson sampling) or else by the
    number of real examples. An optional `mask=` argument to `update` (bool
    `[B]`) marks real rows: padded rows contribute exactly zero. An example
    whose gradient is NaN/inf contributes zero and is counted, so the
    add/remove sensitivity `l2_norm_clip` holds whatever the input
    (replacing one example by another moves the sum by up to twice that).

    Args:
      l2_norm_clip: Per-example clip norm; > 0 and finite (an infinite clip
        norm would make the noise infinite). Schedulable.
      noise_multiplier: Noise std in units of `l2_norm_clip`; >= 0.
        Schedulable.
      key: A PRNG key (typed, of any impl, or legacy); the state keeps its
        data and the transform its impl.
      expected_batch_size: Divide by this instead of the number of real
        examples (use with Poisson sampling); >= 1.
      axis_name: Inside `shard_map` over a data axis: each device clips its
        own examples, the sums are `psum`med and one noise draw (the same key
        on every device) is added, so N devices give the result of one.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a
      `DPAggregateState`; chain an optimizer after it. Outputs have the
      per-example gradients' dtypes (the params' dtypes for a
      `ClippedGradSum` when `params` are passed, else float32).

    Edge cases:
      A `ClippedGradSum` clipped with a larger norm than `l2_norm_clip` gets
      noise for its own (larger) norm, so the guarantee never weakens.
      Every released leaf is inside the sensitivity bound: each floating
      leaf (bfloat16 to float64) counts in the per-example norm and gets
      noise drawn and added in float32, then is cast to its dtype (a
      float16 output saturates to inf beyond 65504, as any float16 value
      does). Integer and bool leaves raise a `ValueError` naming their
      paths and dtypes: Gaussian noise cannot be represented in them, so
      they could only be released unnoised (a privacy leak) or dropped
      (silently losing them), and `jax.grad` never produces them. `float0`
      leaves (`jax.grad(..., allow_int=True)` for integer params) hold no
      data and are released as `float0`. Norms are float32: a float64
      example beyond float32's range counts as non-finite and adds zero.
      Per-shard noise needs `jax_threefry_partitionable` (JAX's default);
      with it off the noise is another stream (again the same sharded or
      not) and XLA may move it between devices. On XLA:CPU each leaf's draw holds its counters and
      bits (about three leaf-sized buffers, all leaves at once); on GPU and
      TPU the draw fuses.

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
    _checks.positive_finite(fn, "l2_norm_clip", l2_norm_clip)
    _checks.finite(fn, "noise_multiplier", noise_multiplier)
    _checks.prng_key(fn, "key", key)
    key_data, impl = _key_parts(key)
    _checks.non_negative(fn, "noise_multiplier", noise_multiplier)
    if expected_batch_size is not None:
        _checks.integer_at_least(fn, "expected_batch_size", expected_batch_size, 1)
    _checks.axis_name(fn, axis_name)

    def init_fn(params):
        del params
        return DPAggregateState(_stats.init_stats(), key_data, jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, mask=None, **extra_args):
        del extra_args
        _checks.state(f"{fn}.update", state, DPAggregateState)
        clip = jnp.asarray(l2_norm_clip, F32)
        next_key, (noise_key,) = _split_key(state.rng_key, impl, 2)
        std = jnp.asarray(noise_multiplier, F32) * clip
        released, stats, _, _, dropped = _aggregate(
            fn, updates, state.stats, clip, std, expected_batch_size, noise_key, mask, params, axis_name
        )
        return released, DPAggregateState(stats, next_key, _stats.add(state.nonfinite_example_count, dropped))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DPAdaptiveAggregateState(NamedTuple):
    """State of `dp_adaptive_aggregate`.

    Attributes:
      stats: As in `DPAggregateState`; `threshold` is the clip norm used.
      rng_key: uint32 key data, as in `DPAggregateState`.
      nonfinite_example_count: int32 `[]` (not private).
      l2_norm_clip: float32 `[]`, the clip norm the next step uses (private:
        it is computed from noised counts only).
      noised_unclipped_fraction: float32 `[]`, this step's noised estimate of
        the fraction of examples whose norm was <= the clip norm (private).
    """

    stats: _stats.ClipStats
    rng_key: jax.Array
    nonfinite_example_count: jax.Array
    l2_norm_clip: jax.Array
    noised_unclipped_fraction: jax.Array

    NONPRIVATE_FIELDS = _NONPRIVATE


def adaptive_noise_multipliers(
    noise_multiplier: float, expected_batch_size: int, clipped_count_stddev: float | None = None
) -> tuple[float, float]:
    """Splits a noise multiplier between the gradient and the clipped-count query.

    Andrew et al. 2021, Theorem 1: the gradient sum (sensitivity `C`) with
    noise multiplier `z_grad` and the centered unclipped count (sensitivity
    1/2) with noise std `clipped_count_stddev` cost together exactly one
    Gaussian query of noise multiplier `z` when
    `z_grad = (z**-2 - (2 * clipped_count_stddev)**-2) ** -0.5`.

    Args:
      noise_multiplier: The total noise multiplier `z`; >= 0.
      expected_batch_size: Expected examples per batch; >= 1.
      clipped_count_stddev: Noise std of the count; default
        `expected_batch_size / 20` (the paper's). Must exceed `z / 2`.

    Returns:
      `(z_grad, z_count)`, where `z_count = 2 * clipped_count_stddev` is the
      count query's noise multiplier (for accounting).

    Example:
      >>> import optaxclip
      >>> z_grad, z_count = optaxclip.adaptive_noise_multipliers(1.0, 256)
      >>> print(f"{z_grad:.4f} {z_count:.1f}")
      1.0008 25.6
    """
    fn = "adaptive_noise_multipliers"
    _checks.non_negative(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.finite(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.integer_at_least(fn, "expected_batch_size", expected_batch_size, 1, concrete=True)
    if clipped_count_stddev is None:
        clipped_count_stddev = float(expected_batch_size) / 20
    _checks.positive(fn, "clipped_count_stddev", clipped_count_stddev, concrete=True)
    z, z_count = float(noise_multiplier), 2.0 * float(clipped_count_stddev)
    if z == 0:
        return 0.0, z_count
    if not z_count > z:
        raise ValueError(
            f"{fn}: `clipped_count_stddev` must be > noise_multiplier / 2 so the count query "
            f"leaves privacy for the gradient, got clipped_count_stddev={clipped_count_stddev!r}, "
            f"noise_multiplier={noise_multiplier!r}."
        )
    return (z**-2 - z_count**-2) ** -0.5, z_count


def dp_adaptive_aggregate(
    initial_l2_norm_clip: float,
    noise_multiplier: float,
    key: jax.Array,
    *,
    expected_batch_size: int,
    target_unclipped_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD whose clip norm tracks a privately estimated quantile of per-example norms.

    Each step clips every example to the current clip norm `C`, sums and
    noises the gradients as `dp_aggregate` does (with the expected batch
    size), and also releases a noised count of the examples whose norm was
    <= `C`: `b = (sum_i (1[n_i <= C] - 1/2) + N(0, clipped_count_stddev**2))
    / expected_batch_size + 1/2`. The clip norm then moves geometrically
    toward the `target_unclipped_quantile` of the norms:
    `C <- C * exp(-clip_learning_rate * (b - target_unclipped_quantile))`.
    The gradient noise multiplier is raised (`adaptive_noise_multipliers`)
    so that both queries together cost exactly the privacy of one Gaussian
    query with `noise_multiplier`: account for the run with
    `privacy.adaptive_epsilon` (equal to `privacy.epsilon` with the same
    `noise_multiplier` under RDP).

    Args:
      initial_l2_norm_clip: The first step's clip norm; > 0.
      noise_multiplier: Total noise multiplier of the two queries; >= 0. A
        Python number: it is split between the queries at construction.
      key: A PRNG key (typed or legacy).
      expected_batch_size: Expected examples per batch (Poisson sampling);
        the gradient sum and the count are divided by it; >= 1.
      target_unclipped_quantile: Fraction of examples to leave unclipped,
        in (0, 1). Default 0.5 (the median norm).
      clip_learning_rate: Geometric step size of the clip norm; > 0.
      clipped_count_stddev: Noise std of the count; default
        `expected_batch_size / 20`.
      axis_name: As in `dp_aggregate`: per-device clipping, `psum`, one noise
        draw.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a
      `DPAdaptiveAggregateState`; `metrics()` reports the private
      `l2_norm_clip` and `noised_unclipped_fraction`. With
      `clipped_grad_sum`, pass it `l2_norm_clip=state.l2_norm_clip`.

    Edge cases:
      As `dp_aggregate`: every floating leaf is clipped and noised in
      float32; integer and bool leaves are refused (naming their paths and
      dtypes); `float0` leaves are released as `float0`.

    Example:
      >>> import jax, jax.numpy as jnp, optaxclip
      >>> tx = optaxclip.dp_adaptive_aggregate(
      ...     1.0, 0.0, jax.random.key(0), expected_batch_size=4, clipped_count_stddev=1e-6
      ... )
      >>> g = jnp.array([[0.1], [0.2], [0.3], [0.4]])  # all norms below the clip norm
      >>> _, state = tx.update(g, tx.init(None))
      >>> print(f"{float(state.l2_norm_clip):.4f}")  # exp(-0.2 * (1 - 0.5))
      0.9048

    References:
      Andrew et al., Differentially Private Learning with Adaptive Clipping,
      2021. https://arxiv.org/abs/1905.03871
    """
    fn = "dp_adaptive_aggregate"
    _checks.positive_finite(fn, "initial_l2_norm_clip", initial_l2_norm_clip)
    # Split between the two queries here, on the host: these must be concrete.
    _checks.finite(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.non_negative(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.prng_key(fn, "key", key)
    _checks.integer_at_least(fn, "expected_batch_size", expected_batch_size, 1, concrete=True)
    if clipped_count_stddev is not None:
        _checks.positive(fn, "clipped_count_stddev", clipped_count_stddev, concrete=True)
    key_data, impl = _key_parts(key)
    _checks.in_range(
        fn, "target_unclipped_quantile", target_unclipped_quantile, 0.0, 1.0, lo_open=True, hi_open=True
    )
    _checks.positive(fn, "clip_learning_rate", clip_learning_rate)
    _checks.axis_name(fn, axis_name)
    z_grad, z_count = adaptive_noise_multipliers(noise_multiplier, expected_batch_size, clipped_count_stddev)
    count_std = z_count / 2

    def init_fn(params):
        del params
        return DPAdaptiveAggregateState(
            _stats.init_stats(),
            key_data,
            jnp.zeros((), jnp.int32),
            jnp.full((), initial_l2_norm_clip, F32),
            jnp.full((), jnp.nan, F32),
        )

    def update_fn(updates, state, params=None, *, mask=None, **extra_args):
        del extra_args
        _checks.state(f"{fn}.update", state, DPAdaptiveAggregateState)
        clip = state.l2_norm_clip
        next_key, (noise_key, count_key) = _split_key(state.rng_key, impl, 3)
        released, stats, norms, real, dropped = _aggregate(
            fn,
            updates,
            state.stats,
            clip,
            z_grad * clip,
            expected_batch_size,
            noise_key,
            mask,
            params,
            axis_name,
        )
        # Centered bits: each real example adds +-1/2, so the count's sensitivity is 1/2.
        bits = jnp.where(real, jnp.where(norms <= clip, 0.5, -0.5), 0.0)
        count = jnp.sum(bits)
        if axis_name is not None:
            count = jax.lax.psum(count, axis_name)
        noised = count + count_std * jax.random.normal(count_key, (), F32)
        fraction = noised / expected_batch_size + 0.5
        new_clip = clip * jnp.exp(-clip_learning_rate * (fraction - target_unclipped_quantile))
        return released, DPAdaptiveAggregateState(
            stats, next_key, _stats.add(state.nonfinite_example_count, dropped), new_clip, fraction
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
