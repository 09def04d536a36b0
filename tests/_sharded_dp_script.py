"""Run by test_sharding.py in a subprocess with 8 host CPU devices (issue 29.1).

FSDP-style sharding under `jax.jit`: Dense kernels sharded `P('data', None)`, biases
replicated, the batch sharded over 'data'. Counts the collectives of each compiled train
step (clip or DP aggregate chained before adam) and checks that the DP noise is drawn where
each shard lives: no collective-permute, no all-gather beyond the non-private step's, no
full-size copy of a sharded leaf, and the same key gives the same release as on one device.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

assert jax.device_count() == 8, jax.devices()
assert jax.config.jax_threefry_partitionable, "per-shard noise needs partitionable threefry"
mesh = jax.make_mesh((8,), ("data",), (AxisType.Auto,))
B, D_IN, D_H, D_OUT = 32, 64, 128, 16
rng = np.random.default_rng(0)
host_params = {
    "l1": {"kernel": rng.standard_normal((D_IN, D_H)) * 0.1, "bias": np.zeros(D_H)},
    "l2": {"kernel": rng.standard_normal((D_H, D_OUT)) * 0.1, "bias": np.zeros(D_OUT)},
}
host_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), host_params)
host_x = jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)
host_y = jnp.asarray(rng.integers(0, D_OUT, B), jnp.int32)


def put(tree, spec):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)


fsdp = lambda x: P("data", None) if x.ndim == 2 else P()  # noqa: E731
params = put(host_params, fsdp)
x, y = put((host_x, host_y), lambda a: P("data"))


def loss_one(p, x, y):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return -jax.nn.log_softmax(h @ p["l2"]["kernel"] + p["l2"]["bias"])[y]


KEY = jax.random.key(0)


def mean_grad_step(tx):
    def step(p, s, x, y):
        g = jax.grad(lambda p: jnp.mean(jax.vmap(loss_one, (None, 0, 0))(p, x, y)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return tx, step


def summed_step(tx, summer, private):
    """The DP step (private) or the same clipped sum averaged without noise (non-private)."""

    def step(p, s, x, y):
        g = summer(loss_one, batch_argnums=(1, 2))(p, x, y, l2_norm_clip=1.0)
        u, s = tx.update(g if private else g.grads, s, p)
        return optax.apply_updates(p, u), s

    return tx, step


adam = lambda: optax.adam(1e-3)  # noqa: E731
dp = lambda: optaxclip.dp_aggregate(1.0, 1.1, KEY, expected_batch_size=B)  # noqa: E731
dp_adaptive = lambda: optaxclip.dp_adaptive_aggregate(1.0, 1.1, KEY, expected_batch_size=B)  # noqa: E731
mean = lambda: optax.scale(1.0 / B)  # noqa: E731
CASES = {
    "adam": mean_grad_step(adam()),
    "global": mean_grad_step(optax.chain(optaxclip.clip_by_global_norm(1.0), adam())),
    "optax_global": mean_grad_step(optax.chain(optax.clip_by_global_norm(1.0), adam())),
    "value": mean_grad_step(optax.chain(optaxclip.clip_by_value(0.1), adam())),
    "optax_value": mean_grad_step(optax.chain(optax.clip(0.1), adam())),
}
for summer in ("clipped_grad_sum", "ghost_clipped_grad_sum"):
    f = getattr(optaxclip, summer)
    CASES[f"{summer}/nonprivate"] = summed_step(optax.chain(mean(), adam()), f, False)
    CASES[f"{summer}/dp_aggregate"] = summed_step(optax.chain(dp(), adam()), f, True)
    CASES[f"{summer}/dp_adaptive_aggregate"] = summed_step(optax.chain(dp_adaptive(), adam()), f, True)

_OP = re.compile(
    r"= (\([^=]*?\)|\S+) (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(?:-start)?\("
)


def collectives(text):
    """{kind: sorted list of result shapes} of the compiled (SPMD-partitioned) HLO."""
    out = collections.defaultdict(list)
    for shape, kind in _OP.findall(text):
        out[kind].append(re.sub(r"\{[^}]*\}", "", shape))
    return {k: sorted(v) for k, v in out.items()}


texts, results = {}, {}
for name, (tx, step) in CASES.items():
    state = jax.jit(tx.init)(params)
    compiled = jax.jit(step).lower(params, state, x, y).compile()
    texts[name] = compiled.as_text()
    results[name] = (compiled, state)
counts = {name: collectives(t) for name, t in texts.items()}
for name, c in counts.items():
    print("COLLECTIVES", name, {k: len(v) for k, v in c.items()})


def operands(name, kind):
    """The multiset of single array shapes that `name`'s collectives of `kind` carry (tuples
    split: XLA's combiner packs independent all-reduces, e.g. scalars with a gradient's)."""
    return collections.Counter(a for s in counts[name].get(kind, []) for a in re.findall(r"\w+\[[\d,]*\]", s))


def extra(name, base, kind):
    """The arrays `name`'s collectives of `kind` carry beyond `base`'s, and those it lacks."""
    got, ref = operands(name, kind), operands(name=base, kind=kind)
    return sorted((got - ref).elements()), sorted((ref - got).elements())


def scalar(shape):
    return shape.endswith("[]")


for summer in ("clipped_grad_sum", "ghost_clipped_grad_sum"):
    base = f"{summer}/nonprivate"
    assert not counts[base].get("collective-permute"), (base, counts[base])
    for agg in ("dp_aggregate", "dp_adaptive_aggregate"):
        name = f"{summer}/{agg}"
        assert not counts[name].get("collective-permute"), (name, counts[name])
        for kind in ("all-gather", "all-to-all", "reduce-scatter"):
            more, _ = extra(name, base, kind)
            assert not more, (name, kind, more, counts[name], counts[base])
        more, fewer = extra(name, base, "all-reduce")
        # The DP step adds only scalars to the all-reduces (counts, flags, norms of the release);
        # the gradient sums over the batch are the non-private step's.
        assert all(scalar(s) for s in more) and not [s for s in fewer if not scalar(s)], (name, more, fewer)
        n_more = len(counts[name].get("all-reduce", [])) - len(counts[base].get("all-reduce", []))
        print(
            f"{name}: 0 collective-permute, no all-gather beyond the non-private step, "
            f"{n_more} more all-reduce op(s), carrying only scalars {more}"
        )

# The clips: each adds only scalars to the all-reduces; the global norm one all-reduce at most,
# the value clip's stats (sum of squares, max, min: three reducer kinds) three at most.
for name, base, most in (("global", "adam", 1), ("value", "optax_value", 3)):
    more, _ = extra(name, base, "all-reduce")
    n_more = len(counts[name].get("all-reduce", [])) - len(counts[base].get("all-reduce", []))
    assert all(scalar(s) for s in more) and n_more <= most, (name, more, n_more, counts[name], counts[base])
    for kind in ("all-gather", "collective-permute", "all-to-all", "reduce-scatter"):
        assert counts[name].get(kind, []) == counts[base].get(kind, []), (
            name,
            kind,
            counts[name],
            counts[base],
        )
    print(f"{name}: {n_more} more all-reduce op(s) than {base}, carrying only scalars {more}")

# No full-size copy of a sharded kernel anywhere in the DP aggregate's partitioned program: each
# device holds and draws only its shard (f32[8,128], f32[16,16]), never f32[64,128] / f32[128,16].
for agg_name, agg in (("dp_aggregate", dp()), ("dp_adaptive_aggregate", dp_adaptive())):
    summed = optaxclip.clipped_grad_sum(loss_one, batch_argnums=(1, 2))(params, x, y, l2_norm_clip=1.0)
    summed = summed._replace(grads=put(jax.tree.map(jnp.asarray, summed.grads), fsdp))
    text = jax.jit(agg.update).lower(summed, agg.init(params), params).compile().as_text()
    for full in (f"f32[{D_IN},{D_H}]", f"f32[{D_H},{D_OUT}]"):
        assert full not in text, (agg_name, full)
    assert "collective-permute" not in text and "all-gather" not in text, agg_name
    print(f"{agg_name}: update on sharded sums holds no full-size kernel and gathers nothing")

# The same key gives the same release sharded and on one device: zero sums, so the release is the
# noise alone, bit for bit; and the whole DP step's params agree to float32 rounding.
zero_sum = optaxclip.ClippedGradSum(
    jax.tree.map(jnp.zeros_like, host_params), jnp.zeros(B), jnp.ones(B, bool), jnp.float32(1.0)
)
for agg_name, make in (("dp_aggregate", dp), ("dp_adaptive_aggregate", dp_adaptive)):
    agg = make()
    one, _ = jax.jit(agg.update)(zero_sum, agg.init(host_params), host_params)
    sharded_sum = zero_sum._replace(grads=put(zero_sum.grads, fsdp))
    eight, _ = jax.jit(agg.update)(sharded_sum, agg.init(params), params)
    kernel = eight["l1"]["kernel"]
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2), kernel.sharding
    for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.std(one["l1"]["kernel"])) > 0.01  # the noise is there
    print(f"{agg_name}: same key, same release sharded and on one device (bit-identical noise)")

# The same on a mesh with Explicit axes (jax.make_mesh's default): the draw takes the sum's sharding.
explicit = jax.make_mesh((8,), ("data",), (AxisType.Explicit,))
with jax.set_mesh(explicit):
    for agg_name, make in (("dp_aggregate", dp), ("dp_adaptive_aggregate", dp_adaptive)):
        agg = make()
        one, _ = jax.jit(agg.update)(zero_sum, agg.init(host_params), host_params)
        grads = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(explicit, fsdp(x))), zero_sum.grads)
        ps = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(explicit, fsdp(x))), host_params)
        update = jax.jit(agg.update)
        eight, _ = update(zero_sum._replace(grads=grads), agg.init(ps), ps)
        text = update.lower(zero_sum._replace(grads=grads), agg.init(ps), ps).compile().as_text()
        for full in (f"f32[{D_IN},{D_H}]", f"f32[{D_H},{D_OUT}]"):
            assert full not in text, (agg_name, "explicit", full)
        assert "collective-permute" not in text and "all-gather" not in text, agg_name
        assert str(jax.typeof(eight["l1"]["kernel"])) == f"float32[{D_IN}@data,{D_H}]", jax.typeof(
            eight["l1"]["kernel"]
        )
        for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print(f"{agg_name}: explicit mesh, noise drawn per shard, same release as one device")

for summer in ("clipped_grad_sum", "ghost_clipped_grad_sum"):
    tx, step = CASES[f"{summer}/dp_aggregate"]
    p8, s8 = params, results[f"{summer}/dp_aggregate"][1]
    p1, s1 = host_params, tx.init(host_params)
    jitted = jax.jit(step)
    for _ in range(3):
        p8, s8 = jitted(p8, s8, x, y)
        p1, s1 = jitted(p1, s1, host_x, host_y)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print(f"{summer}: 3 DP steps sharded == one device")
print("DP SHARDING OK")
