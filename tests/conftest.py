"""Shared test set-up: strict JAX numerics and small helpers."""

import jax
import jax.numpy as jnp
import numpy as np

import optaxclip

jax.config.update("jax_numpy_rank_promotion", "raise")

# Run in a subprocess by test_sharding.py (needs 8 host devices), not imported here.
collect_ignore = ["_sharded_script.py", "_sharded_per_example_script.py", "_sharded_dp_script.py"]

# Output precision of each dtype, for comparing against float64 references.
RTOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}


def strict(fn):
    """Runs `fn` under strict dtype promotion (optaxclip must cast explicitly)."""

    def wrapped(*args, **kwargs):
        with jax.numpy_dtype_promotion("strict"):
            return fn(*args, **kwargs)

    return wrapped


def mixed_tree(seed=0, scale=1.0):
    """A scalar, vector, matrix and 4-D kernel in float32, bfloat16 and float16."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
    return {
        "scalar": jnp.asarray(r(), jnp.float32),
        "vec": jnp.asarray(r(5), jnp.bfloat16),
        "mat": jnp.asarray(r(4, 3), jnp.float32),
        "kernel": jnp.asarray(r(3, 3, 2, 4), jnp.float16),
        "nested": {"bias": jnp.asarray(r(4), jnp.float16), "w": jnp.asarray(r(2, 4), jnp.bfloat16)},
    }


def assert_close_to_reference(out, ref):
    """Checks `out` (any dtypes) against a float64 NumPy reference, per-dtype rtol."""
    out_leaves = jax.tree.leaves(out)
    ref_leaves = jax.tree.leaves(ref)
    assert len(out_leaves) == len(ref_leaves)
    for o, r in zip(out_leaves, ref_leaves, strict=True):
        rtol = RTOL[jnp.dtype(o.dtype).type]
        atol = rtol * max(float(np.max(np.abs(r), initial=0.0)), 1e-30)
        np.testing.assert_allclose(np.asarray(o, np.float64), r, rtol=rtol, atol=atol)


# Every dtype a DP entry point may be handed (issue 20): floats are clipped and noised,
# integer and bool leaves are refused by name.
DP_FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
DP_REFUSED_DTYPES = ("int8", "int32", "uint8", "uint32", "bool")


def dtype_scope(dtype: str):
    """float64 exists only with x64 enabled: a scope that enables it for that dtype alone."""
    import contextlib

    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def extreme_value(dtype: str) -> float:
    """A huge finite value of `dtype` that float32 (the norms' dtype) still holds."""
    return float(min(float(jnp.finfo(dtype).max), 1e30))


def release_gap(a, b) -> float:
    """Float64 L2 distance between two released pytrees (float leaves; float0 leaves skipped)."""
    leaves = [
        (np.asarray(x, np.float64), np.asarray(y, np.float64))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in leaves)))


def refused_message(path: str, dtype: str) -> str:
    """The regex a refused leaf's `ValueError` must match: its path and its dtype."""
    import re

    return re.escape(f"{path}: {jnp.dtype(dtype).name}")


def dtype_loss(params, x):
    """One example's loss: `v` (the leaf under test, any dtype) scales the last two inputs."""
    return jnp.sum(params["w"] * x[:3]) + jnp.sum(params["v"].astype(jnp.float32) * x[3:])


def dtype_params_and_batch(dtype: str, extreme: float | None = None):
    """Params with a `v` leaf of `dtype`, three small examples, and optionally one with `extreme` values."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)) * 1e-2
    if extreme is not None:  # its only large gradient is the `v` leaf's
        x = np.concatenate([x, np.concatenate([np.zeros((1, 3)), np.full((1, 2), extreme)], 1)])
    params = {"w": jnp.zeros(3), "v": jnp.asarray(np.ones(2), dtype)}
    return params, jnp.asarray(x, jnp.float32)


def dp_release_of_clipped_sum(grad_sum_fn, dtype: str, extreme: float | None = None):
    """`dp_aggregate` (clip 1, no noise, un-normalised) of `grad_sum_fn(dtype_loss)`'s sum."""
    params, xs = dtype_params_and_batch(dtype, extreme)
    f = grad_sum_fn(dtype_loss)
    tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0), expected_batch_size=1)
    return jax.jit(lambda p, x: tx.update(f(p, x, l2_norm_clip=1.0), tx.init(None), p))(params, xs)
