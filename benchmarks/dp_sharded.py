"""The DP-SGD step on FSDP-sharded params (issue 29.5): time, memory and collectives.

An MLP of `--layers` Dense layers of `--width` (kernels sharded
`P('data', None)` over every device, biases replicated, the batch sharded
over 'data'), under `jax.jit`, each step followed by adam:

- `nonprivate`: the mean gradient (`jax.grad` of the batch loss);
- `ghost_sum`: `ghost_clipped_grad_sum`, its clipped sum averaged, no noise
  (the DP step without `dp_aggregate`);
- `ghost_dp`: `ghost_clipped_grad_sum` + `dp_aggregate` (noise multiplier
  1.1): the DP step;
- `vmap_dp` (with `--vmap`): `clipped_grad_sum` + `dp_aggregate`.

For each: median step time (`_timing.interleaved_medians`, params and state
donated), XLA's temp bytes per device, and the collectives of the compiled
step. Checks (PASS/MISS): `dp_aggregate` adds no collective-permute and no
all-gather to `ghost_sum`, and its time over `ghost_sum` (the noise and the
release) is at most 0.15 of the non-private step. On one device the
collective counts are zero by construction; on a CPU force devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.

    python benchmarks/dp_sharded.py --width 4096 --layers 4 --batch 64      # ~67M params, a GPU
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python benchmarks/dp_sharded.py --width 256 --layers 2 --batch 32 --repeats 3   # a CPU check

Writes `dp_sharded.{json,md}` under `--out`.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _timing  # noqa: E402

import optaxclip  # noqa: E402

_OP = re.compile(r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(")


def collectives(text: str) -> dict[str, int]:
    return dict(collections.Counter(_OP.findall(text)))


def build(width: int, layers: int, batch: int, vmap: bool):
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",), (AxisType.Auto,))
    spec = lambda x: P("data", None) if x.ndim == 2 and x.shape[0] % n == 0 else P()  # noqa: E731
    place = lambda tree: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)  # noqa: E731
    # Outputs constrained to the inputs' layout, so each step's outputs feed the next call.
    keep = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x))), tree
    )
    rng = np.random.default_rng(0)
    params = {
        f"l{i}": {
            "kernel": jnp.asarray(rng.standard_normal((width, width)) / np.sqrt(width), jnp.float32),
            "bias": jnp.zeros(width, jnp.float32),
        }
        for i in range(layers)
    }
    x = jnp.asarray(rng.standard_normal((batch, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, width, batch), jnp.int32)
    params, (x, y) = (
        place(params),
        jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))), (x, y)),
    )

    def loss_one(p, x, y):
        h = x
        for i in range(layers):
            h = jnp.tanh(h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
        return -jax.nn.log_softmax(h)[y]

    dp = lambda: optaxclip.dp_aggregate(1.0, 1.1, jax.random.key(0), expected_batch_size=batch)  # noqa: E731

    def mean_step(tx):
        def step(p, s, x, y):
            g = jax.grad(lambda p: jnp.mean(jax.vmap(loss_one, (None, 0, 0))(p, x, y)))(p)
            u, s = tx.update(g, s, p)
            return keep(optax.apply_updates(p, u)), keep(s)

        return step

    def summed_step(tx, summer, private):
        f = summer(loss_one, batch_argnums=(1, 2))

        def step(p, s, x, y):
            g = f(p, x, y, l2_norm_clip=1.0)
            u, s = tx.update(g if private else g.grads, s, p)
            return keep(optax.apply_updates(p, u)), keep(s)

        return step

    variants = {
        "nonprivate": (optax.adam(1e-3), mean_step),
        "ghost_sum": (
            optax.chain(optax.scale(1.0 / batch), optax.adam(1e-3)),
            lambda tx: summed_step(tx, optaxclip.ghost_clipped_grad_sum, False),
        ),
        "ghost_dp": (
            optax.chain(dp(), optax.adam(1e-3)),
            lambda tx: summed_step(tx, optaxclip.ghost_clipped_grad_sum, True),
        ),
    }
    if vmap:
        variants["vmap_dp"] = (
            optax.chain(dp(), optax.adam(1e-3)),
            lambda tx: summed_step(tx, optaxclip.clipped_grad_sum, True),
        )
    return params, (x, y), variants, place


def bench(width: int, layers: int, batch: int, repeats: int, inner: int, vmap: bool) -> list[dict]:
    params, extra, variants, place = build(width, layers, batch, vmap)
    n_params = sum(v.size for v in jax.tree.leaves(params))
    live, runs, rows = {}, {}, []
    for name, (tx, make) in variants.items():
        step = jax.jit(make(tx), donate_argnums=(0, 1))
        p = jax.tree.map(jnp.copy, params)
        s = place(jax.jit(tx.init)(p))
        compiled = step.lower(p, s, *extra).compile()
        live[name] = [p, s]

        def run(name=name, compiled=compiled):
            live[name][0], live[name][1] = compiled(live[name][0], live[name][1], *extra)
            jax.block_until_ready(live[name][0])

        runs[name] = run
        rows.append(
            {
                "variant": name,
                "width": width,
                "layers": layers,
                "batch": batch,
                "params": n_params,
                "devices": jax.device_count(),
                "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                "collectives": collectives(compiled.as_text()),
            }
        )
    medians = _timing.interleaved_medians(runs, repeats, inner)
    for r in rows:
        r["ms"] = medians[r["variant"]] * 1e3
        r["vs_nonprivate"] = medians[r["variant"]] / medians["nonprivate"]
    return rows


def targets(rows: list[dict]) -> list[tuple[bool, str]]:
    by = {r["variant"]: r for r in rows}
    dp, base, plain = by["ghost_dp"], by["ghost_sum"], by["nonprivate"]
    checks = []
    for kind in ("collective-permute", "all-gather", "all-to-all", "reduce-scatter"):
        more = dp["collectives"].get(kind, 0) - base["collectives"].get(kind, 0)
        checks.append((more <= 0, f"dp_aggregate adds {more} {kind} to the ghost step (target 0)"))
    noise = (dp["ms"] - base["ms"]) / plain["ms"]
    checks.append(
        (
            noise <= 0.15,
            f"dp_aggregate's time over the ghost sum: {noise:.3f} of the non-private step (<= 0.15)",
        )
    )
    return checks


def markdown(meta: dict, rows: list[dict], checks) -> str:
    lines = [
        f"DP step on FSDP-sharded params: {meta['device']} x {meta['devices']}, jax {meta['jax']}.",
        "",
        "| variant | params | batch | ms | x non-private | temp MiB/device | collectives |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        coll = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "none"
        lines.append(
            f"| {r['variant']} | {r['params']:.3g} | {r['batch']} | {r['ms']:.2f} | {r['vs_nonprivate']:.3f} "
            f"| {r['temp_mib']:.1f} | {coll} |"
        )
    lines += ["", *[("PASS: " if ok else "MISS: ") + line for ok, line in checks]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--vmap", action="store_true", help="also clipped_grad_sum (per-example grads: memory)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for dp_sharded.{json,md}")
    args = ap.parse_args(argv)
    rows = bench(args.width, args.layers, args.batch, args.repeats, args.inner, args.vmap)
    checks = targets(rows)
    meta = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
        "args": vars(args),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(meta, rows, checks)
    (out / "dp_sharded.md").write_text(text)
    (out / "dp_sharded.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=1) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
