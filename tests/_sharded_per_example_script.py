"""Run by test_per_example.py in a subprocess with 8 host CPU devices (XLA flags must be set first).

Inside `jax.shard_map` with replicated params (`P()`) and the default
`check_vma=True`, per-example gradients and clipped sums must equal the
one-device results (JAX would otherwise sum the gradient of the unvarying
params over the mesh axis: one example per device).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",))
rng = np.random.default_rng(0)
params = {
    "w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
}
xs = jnp.asarray(rng.normal(size=(16, 5)) * 2, jnp.float32)
ys = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
mask = jnp.asarray(np.arange(16) % 5 != 0)
xs = xs.at[6].set(np.nan)  # one non-finite example on device 3
shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))


def loss(p, x, y):
    return (jnp.sum(jnp.tanh(x @ p["w"] + p["b"])) - y) ** 2


def close(a, b, what):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5, err_msg=what)


# 1. per_example_grads: rows are per-example, not sums over devices.
pe = optaxclip.per_example_grads(loss, batch_argnums=(1, 2))
for micro in (None, 2):
    pe = optaxclip.per_example_grads(loss, batch_argnums=(1, 2), microbatch_size=micro)
    f = jax.jit(jax.shard_map(pe, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
    close(f(params, shard(xs), shard(ys)), jax.jit(pe)(params, xs, ys), f"per_example_grads micro={micro}")
print("per_example_grads 8 devices == 1 device")

# 2. clipped_grad_sum: each device's clipped sum, psum'd, equals the one-device sum;
#    global and per-layer clip, with and without microbatching, with a mask.
for micro in (None, 2):
    for clip in (0.5, {"w": 0.3, "b": 0.2}):
        cs = optaxclip.clipped_grad_sum(loss, batch_argnums=(1, 2), microbatch_size=micro)

        def local(p, x, y, m, cs=cs, clip=clip):
            s = cs(p, x, y, l2_norm_clip=clip, mask=m)
            return jax.lax.psum(s.grads, "data"), s.norms, s.l2_norm_clip

        f = jax.jit(
            jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P(), P("data"), P("data"), P("data")),
                out_specs=(P(), P("data"), P()),
            )
        )
        grads8, norms8, clip8 = f(params, shard(xs), shard(ys), shard(mask))
        one = jax.jit(lambda p, x, y, m, cs=cs, clip=clip: cs(p, x, y, l2_norm_clip=clip, mask=m))(
            params, xs, ys, mask
        )
        close(grads8, one.grads, f"clipped_grad_sum micro={micro} clip={clip}")
        np.testing.assert_allclose(np.asarray(norms8), np.asarray(one.norms), rtol=1e-4)
        np.testing.assert_allclose(float(clip8), float(one.l2_norm_clip), rtol=1e-6)
print("clipped_grad_sum 8 devices == 1 device")

# 3. ghost_clipped_grad_sum (Flax NNX Embed -> RNN(LSTMCell) -> Linear): the same as one device.
from flax import nnx  # noqa: E402


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(8, 4, rngs=rngs)
        self.rnn = nnx.RNN(nnx.LSTMCell(4, 4, rngs=rngs))
        self.head = nnx.Linear(4, 8, rngs=rngs)

    def __call__(self, t):
        z = jnp.zeros((t.shape[0], 4))
        return self.head(self.rnn(self.embed(t), initial_carry=(z, z)))


graphdef, nparams, rest = nnx.split(Tiny(nnx.Rngs(0)), nnx.Param, ...)


def lm_loss(p, row):
    logits = nnx.merge(graphdef, p, rest)(row[None, :-1])[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, row[1:, None], -1)[:, 0])


rows = jnp.asarray(rng.integers(0, 8, (16, 6)), jnp.int32)
ghost = optaxclip.ghost_clipped_grad_sum(lm_loss)
assert "per-example" not in ghost.paths(nparams, rows).values()
for clip in (0.05, lambda path, leaf: 0.03):

    def ghost_local(p, r, m, clip=clip):
        s = ghost(p, r, l2_norm_clip=clip, mask=m)
        return jax.lax.psum(s.grads, "data"), s.norms

    f = jax.jit(
        jax.shard_map(
            ghost_local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"))
        )
    )
    grads8, norms8 = f(nparams, shard(rows), shard(mask))
    one = jax.jit(lambda p, r, m, clip=clip: ghost(p, r, l2_norm_clip=clip, mask=m))(nparams, rows, mask)
    vmap_one = optaxclip.clipped_grad_sum(lm_loss)(nparams, rows, l2_norm_clip=clip, mask=mask)
    close(grads8, one.grads, "ghost 8 devices")
    close(grads8, vmap_one.grads, "ghost 8 devices vs vmap path")
    np.testing.assert_allclose(np.asarray(norms8), np.asarray(vmap_one.norms), rtol=1e-4)
print("ghost_clipped_grad_sum 8 devices == 1 device")
print("PER EXAMPLE SHARDING OK")
