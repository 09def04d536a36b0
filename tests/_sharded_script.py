"""Run by test_sharding.py in a subprocess with 8 host CPU devices."""

import itertools

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
    ("adagc", optaxclip.adagc_clip(warmup_steps=1)),
    ("guard", optaxclip.guard_clip()),
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
# 2b. guard_clip inside shard_map: disjoint shards of the updates, a different loss on each
# device; the state comes back replicated (out_specs=P()) and equals one device's run on the
# whole tree with the mean loss, step after step (growing norms, so the guard acts).
guard8, guard1 = optaxclip.guard_clip(axis_name="x"), optaxclip.guard_clip()


def guard_local(g, s, loss):
    return guard8.update(g, s, loss=loss[0])


guard_fn = jax.jit(
    jax.shard_map(guard_local, mesh=mesh, in_specs=(P("x"), P(), P("x")), out_specs=(P("x"), P()))
)
small = {k: v for k, v in grads.items() if k != "b"}  # finite norms: the guard's statistics move
st8, st1 = guard8.init(None), guard1.init(None)
for t in range(12):
    g_t = jax.tree.map(lambda x, t=t: (x * 1.6**t).astype(x.dtype), small)
    losses = jnp.asarray(3.0 + 0.1 * t + np.arange(8) * 0.05, jnp.float32)
    out8, st8 = guard_fn(shard(g_t), st8, jax.device_put(losses, NamedSharding(mesh, P("x"))))
    out1, st1 = guard1.update(g_t, st1, loss=jnp.mean(losses))
    for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(out1), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-5)
    for k, v in optaxclip.metrics(st1).items():
        np.testing.assert_allclose(
            np.asarray(optaxclip.metrics(st8)[k], np.float64), np.asarray(v, np.float64), rtol=2e-5, err_msg=k
        )
assert int(st1.stats.clip_count) > 3, int(st1.stats.clip_count)
print("guard shard_map 8 devices == 1 device, clips", int(st1.stats.clip_count))
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
# 4. The whole DP pipeline as users write it: replicated params P(), examples sharded,
# clipped_grad_sum -> dp_aggregate(axis_name) inside shard_map; the whole state comes
# back replicated (out_specs=P()) and equals one device's: updates and every stat.
w0 = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
xs = jnp.asarray(rng.standard_normal((16, 3)) * 4, jnp.float32)
xs_bad = xs.at[5].set(jnp.nan)  # one non-finite example: dropped and counted on every device
example_loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
sums = optaxclip.clipped_grad_sum(example_loss)
for (name, make), data in itertools.product(
    [
        ("dp_aggregate", lambda **kw: optaxclip.dp_aggregate(1.0, 1.1, jax.random.key(5), **kw)),
        (
            "dp_adaptive_aggregate",
            lambda **kw: optaxclip.dp_adaptive_aggregate(
                0.9, 1.1, jax.random.key(5), expected_batch_size=16, **kw
            ),
        ),
    ],
    [xs, xs_bad],
):
    tx8, tx1 = make(axis_name="x"), make()

    def pipeline(p, x, m, tx=tx8):
        state = tx.init(p)
        clip = getattr(state, "l2_norm_clip", 1.0)
        out, state = tx.update(sums(p, x, l2_norm_clip=clip, mask=m), state, p)
        return out, state

    fn = jax.jit(jax.shard_map(pipeline, mesh=mesh, in_specs=(P(), P("x"), P("x")), out_specs=(P(), P())))
    m = jnp.asarray(np.arange(16) % 7 != 3)
    out8, st8 = fn(w0, shard(data), jax.device_put(m, NamedSharding(mesh, P("x"))))
    st1 = tx1.init(w0)
    out1, st1 = tx1.update(sums(w0, data, l2_norm_clip=getattr(st1, "l2_norm_clip", 1.0), mask=m), st1, w0)
    for a, b in zip(jax.tree.leaves(out8), jax.tree.leaves(out1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    m8, m1 = optaxclip.metrics(st8), optaxclip.metrics(st1)
    assert m8.keys() == m1.keys(), (m8.keys(), m1.keys())
    for k in m1:
        np.testing.assert_allclose(
            np.asarray(m8[k], np.float64), np.asarray(m1[k], np.float64), rtol=1e-5, err_msg=k
        )
    bad = data is xs_bad
    assert (
        int(m1["nonprivate/nonfinite_example_count"]) == bad and int(m1["nonprivate/nonfinite_count"]) == bad
    )
    assert bad or np.isfinite(float(m8["nonprivate/pre_clip_norm"]))
    print(name, "pipeline 8 devices == 1 device, pre-clip norm", float(m8["nonprivate/pre_clip_norm"]))
print("SHARDING OK")
