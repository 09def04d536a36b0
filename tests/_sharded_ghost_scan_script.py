"""Run by test_ghost_scan.py in a subprocess with 4 host CPU devices (XLA flags must be set first).

`ghost_clipped_grad_sum` inside `jax.shard_map` with replicated params on
issue 27's new paths (layers stacked under `scan`, a fused kernel, a tied
embedding, a learned initial carry): each device's clipped sum, `psum`med,
and the per-example norms equal the one-device ghost result and the vmap
path, with a padding mask (per-layer bounds on one model).
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


def check(name, loss, params, x, mesh, clip):
    n = jax.device_count()
    x = jnp.concatenate([x, x[::-1]])[:n]  # one example per device
    mask = jnp.arange(n) != 1
    ghost = optaxclip.ghost_clipped_grad_sum(loss)
    vmap = optaxclip.clipped_grad_sum(loss)
    assert "per-example" not in ghost.paths(params, x).values(), name

    def local(p, x, m):
        out = ghost(p, x, l2_norm_clip=clip, mask=m)
        return jax.lax.psum(out.grads, "data"), out.norms

    sharded = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data")))
    )
    shard = lambda v: jax.device_put(v, NamedSharding(mesh, P("data")))
    grads_n, norms_n = sharded(params, shard(x), shard(mask))
    one = jax.jit(lambda p, x, m: ghost(p, x, l2_norm_clip=clip, mask=m))(params, x, mask)
    ref = jax.jit(lambda p, x, m: vmap(p, x, l2_norm_clip=clip, mask=m))(params, x, mask)
    close(grads_n, one.grads, f"{name}: {n} devices vs one")
    close(grads_n, ref.grads, f"{name}: {n} devices vs the vmap path")
    np.testing.assert_allclose(np.asarray(norms_n), np.asarray(ref.norms), rtol=1e-4)
    print(name, f"{n} devices == 1 device == vmap path")


def main():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import ghost_scan_models as sm

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    per_layer = lambda path, leaf: 0.05
    for name, clip in (
        ("stacked_rnn", 0.1),
        ("fused_concat", per_layer),
        ("gru_learned_init", 0.1),
        ("linen_optimized_lstm", 0.1),
    ):
        loss, params, x = sm.CASES[name][0]()
        check(name, loss, params, x, mesh, clip)
    print("GHOST SCAN SHARDING OK")


if __name__ == "__main__":  # pytest imports every file under tests/ for its doctests: run nothing then
    main()
