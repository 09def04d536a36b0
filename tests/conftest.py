"""Shared test set-up: strict JAX numerics and small helpers."""

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_numpy_rank_promotion", "raise")

# Run in a subprocess by test_sharding.py (needs 8 host devices), not imported here.
collect_ignore = ["_sharded_script.py", "_sharded_per_example_script.py"]

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
