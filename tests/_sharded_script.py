"""Run by test_sharding.py in a subprocess with 8 host CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("x",))
rng = np.random.default_rng(0)
grads = {
    "w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal((8,)) * 1e20, jnp.float32),
    "h": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
}
params = jax.tree.map(lambda g: (g * 0.5 + 1).astype(g.dtype), grads)
shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x"))), t)

# 1. Sharded under jit gives the same norms and updates as unsharded.
for name, tx in [
    ("global", optaxclip.clip_by_global_norm(1.0)),
    ("leaf", optaxclip.clip_by_leaf_norm(1.0)),
    ("value", optaxclip.clip_by_value(0.5)),
    ("agc", optaxclip.adaptive_grad_clip(0.01)),
    ("adaptive", optaxclip.adaptive_clip(window=8, warmup_steps=0, initial_max_norm=1.0)),
    ("zscore", optaxclip.zscore_clip(warmup_steps=1)),
]:
    chain = optax.chain(tx, optax.adam(1e-3))
    step = jax.jit(chain.update)
    st_s, st_u = chain.init(shard(params)), chain.init(params)
    for _ in range(3):  # a few steps, so adaptive histories are used
        out_s, st_s = step(shard(grads), st_s, shard(params))
        out_u, st_u = step(grads, st_u, params)
    assert out_s["w"].sharding.spec[0] == "x", (name, out_s["w"].sharding)  # stays sharded
    for a, b in zip(jax.tree.leaves(out_s), jax.tree.leaves(out_u), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5)
    sa, sb = optaxclip.stats(st_s), optaxclip.stats(st_u)
    np.testing.assert_allclose(float(sa.pre_clip_norm), float(sb.pre_clip_norm), rtol=1e-6)
    print(name, "sharded == unsharded, norm", float(sa.pre_clip_norm))

# 2. Inside shard_map with axis_name the norm is global.
full = optaxclip.global_norm(grads)
for name, tx in [
    ("global", optaxclip.clip_by_global_norm(1.0, axis_name="x")),
    ("leaf", optaxclip.clip_by_leaf_norm(1.0, axis_name="x")),
]:

    def local(g, tx=tx):
        out, st = tx.update(g, tx.init(g))
        return out, st.pre_clip_norm

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P())))
    out, norm = fn(shard(grads))
    np.testing.assert_allclose(float(norm), float(full), rtol=1e-6)
    plain = optaxclip.clip_by_global_norm(1.0) if name == "global" else optaxclip.clip_by_leaf_norm(1.0)
    ref_out, _ = plain.update(grads, plain.init(grads))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5)
    print(name, "shard_map axis_name norm", float(norm), "== full", float(full))
# 3. DP-SGD data parallel: each device clips its own examples; psum; one noise draw.
per_example = {
    "w": jnp.asarray(rng.standard_normal((16, 4, 3)) * 3, jnp.float32),
    "b": jnp.asarray(rng.standard_normal((16, 3)), jnp.float32),
}
mask = jnp.asarray(np.arange(16) % 5 != 0)
dp = optaxclip.dp_aggregate(1.0, 1.3, jax.random.key(7), expected_batch_size=12, axis_name="x")
dp_one = optaxclip.dp_aggregate(1.0, 1.3, jax.random.key(7), expected_batch_size=12)


def dp_local(g, m):
    out, _ = dp.update(g, dp.init(None), mask=m)
    return out


fn = jax.jit(jax.shard_map(dp_local, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P()))
out8 = fn(shard(per_example), jax.device_put(mask, NamedSharding(mesh, P("x"))))
out1, _ = dp_one.update(per_example, dp_one.init(None), mask=mask)
for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(out1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("dp 8 devices == 1 device")
# The adaptive DP clip norm: the same released update and the same next clip norm.
ada = optaxclip.dp_adaptive_aggregate(0.8, 1.0, jax.random.key(3), expected_batch_size=64, axis_name="x")
ada_one = optaxclip.dp_adaptive_aggregate(0.8, 1.0, jax.random.key(3), expected_batch_size=64)


def ada_local(g, m):
    out, state = ada.update(g, ada.init(None), mask=m)
    return out, state.l2_norm_clip


fn = jax.jit(jax.shard_map(ada_local, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P(), P())))
out8, clip8 = fn(shard(per_example), jax.device_put(mask, NamedSharding(mesh, P("x"))))
out1, state1 = ada_one.update(per_example, ada_one.init(None), mask=mask)
for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(out1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(float(clip8), float(state1.l2_norm_clip), rtol=1e-6)
print("dp_adaptive 8 devices == 1 device, next clip", float(clip8))
print("SHARDING OK")
