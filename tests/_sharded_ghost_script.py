"""Run by test_ghost.py in a subprocess with 8 host CPU devices (XLA flags must be set first).

`ghost_clipped_grad_sum` inside `jax.shard_map` with replicated params
(`P()`, the default `check_vma=True`) on three frameworks' models (a Flax
NNX transformer, a Flax Linen LSTM, an Equinox LSTM cell in `lax.scan`):
each device's clipped sum, `psum`med, and the per-example norms equal the
one-device ghost result and the vmap path (global bounds, per-layer ones
on the LSTM), with a padding mask and a NaN example.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip


def close(a, b, what):
    scale = max(float(np.max(np.abs(np.asarray(v)))) for v in jax.tree.leaves(b))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def check(name, model, mesh, clip):
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    loss = lambda p, x, y, s: model.loss_fn(p, x, y) * s
    x, y = (jnp.concatenate([a, a[::-1]]) for a in model.batch)  # 8 examples, one per device
    scale = jnp.ones(8).at[5].set(jnp.nan)  # one non-finite example, on device 5
    mask = jnp.arange(8) != 2
    ghost = optaxclip.ghost_clipped_grad_sum(loss, batch_argnums=(1, 2, 3))
    vmap = optaxclip.clipped_grad_sum(loss, batch_argnums=(1, 2, 3))
    assert "per-example" not in ghost.paths(model.params, x, y, scale).values(), name

    def local(p, x, y, s, m):
        out = ghost(p, x, y, s, l2_norm_clip=clip, mask=m)
        return jax.lax.psum(out.grads, "data"), out.norms

    specs = (P(), P("data"), P("data"), P("data"), P("data"))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P("data"))))
    grads8, norms8 = sharded(model.params, *map(shard, (x, y, scale, mask)))
    call = lambda f: jax.jit(lambda p, *b: f(p, *b[:3], l2_norm_clip=clip, mask=b[3]))
    one = call(ghost)(model.params, x, y, scale, mask)
    ref = call(vmap)(model.params, x, y, scale, mask)
    close(grads8, one.grads, f"{name}: 8 devices vs one")
    close(grads8, ref.grads, f"{name}: 8 devices vs the vmap path")
    norms8 = np.asarray(norms8)
    np.testing.assert_allclose(norms8, np.asarray(ref.norms), rtol=1e-4)
    assert not np.isfinite(norms8[5]) and np.all(np.isfinite(np.delete(norms8, 5)))
    print(name, "8 devices == 1 device == vmap path")


def check_bound(adv, mesh):
    """Issue 26 under shard_map: one hostile example per device, each device's clipped sum (not
    `psum`med) is that example's contribution: <= C (1 + 1e-5), as on one device."""
    ghost = optaxclip.ghost_clipped_grad_sum(adv.loss_fn)
    x = jnp.concatenate([adv.x, adv.x[::-1]])  # 8 examples, one per device

    def local(p, x):
        out = ghost(p, x, l2_norm_clip=adv.clip)
        return jax.tree.map(lambda g: g[None], out.grads), out.norms

    sharded = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P("data")))
    )
    grads, norms = sharded(adv.params, jax.device_put(x, NamedSharding(mesh, P("data"))))
    per = np.sqrt(
        sum(np.sum(np.asarray(g, np.float64).reshape(8, -1) ** 2, axis=1) for g in jax.tree.leaves(grads))
    )
    assert np.all(np.asarray(norms) > adv.clip), norms
    assert np.max(per) <= adv.clip * (1 + 1e-5), (adv.name, per / adv.clip)
    print(adv.name, "under shard_map: max contribution / C", float(np.max(per) / adv.clip))


def main():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import ghost_models as gm
    from adversarial import ADVERSARIES

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",))
    per_layer = lambda path, leaf: 0.1
    for name, clip in (("nnx_transformer", 0.3), ("linen_lstm", per_layer), ("equinox_lstm", 0.3)):
        check(name, gm.MODELS[name](), mesh, clip)
    for name in ("centred_dense", "mixed_scales", "conv_instance_norm"):
        check_bound(ADVERSARIES[name](), mesh)
    print("GHOST SHARDING OK")


if __name__ == "__main__":  # pytest imports every file under tests/ for its doctests: run nothing then
    main()
