"""Clipping + adam, one jitted training step, against adam alone, the floor and optax.

Times `update + apply_updates` (params and optimizer state donated, as in a
real loop) on a ~20-leaf model-shaped tree for: adam alone; adam plus one
read pass (the floor); a hand-written fused global-norm clip + adam; every
optaxclip transform chained before adam; and the optax counterparts
(`clip_by_global_norm`, `clip`, `adaptive_grad_clip`, `clip_by_block_rms`).
Variants are interleaved, warmed up and repeated; medians are reported with
ratios to adam, to the fused version and to the optax counterpart, and
XLA's compiled temp size. Run through `benchmarks/run.py` (`make bench`),
or alone: `python benchmarks/update_step.py --sizes 1e6`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import print_checks, time_donated_steps  # noqa: E402


def model_tree(n_params: float, dtype=jnp.float32, seed=0):
    """~20 leaves shaped like an MLP/LSTM: kernels, biases, embeddings, norms."""
    h = int(np.sqrt(n_params / 12))
    shapes = {
        "embed": (h // 2, h),
        "lstm_ih": (h, 4 * h),
        "lstm_hh": (h, 4 * h),
        "lstm_b": (4 * h,),
        **{f"mlp{i}_k": (h, h) for i in range(5)},
        **{f"mlp{i}_b": (h,) for i in range(5)},
        "ln_scale": (h,),
        "ln_bias": (h,),
        "head_k": (h, 64),
        "head_b": (64,),
        "scalar": (),
        "conv": (3, 3, 8, h // 8 or 1),
    }
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.01, dtype) for k, s in shapes.items()
    }


def fused_clip_adam(max_norm=1.0, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """Hand-written: one norm, the scale folded into adam's moment updates."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # two buffers: both are donated
        return (jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(g, state, params=None):
        count, mu, nu = state
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)))
        s = jnp.minimum(1.0, max_norm / norm)
        count = count + 1
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * (x * s), mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * jnp.square(x * s), nu, g)
        c1, c2 = 1 - b1**count, 1 - b2**count
        upd = jax.tree.map(lambda m, v: -lr * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        return upd, (count, mu, nu)

    return optax.GradientTransformation(init, update)


def read_pass_adam():
    """The floor: adam plus one read of the gradients (their sum of squares, kept as state)."""
    adam = optax.adam(1e-3)

    def init(params):
        return adam.init(params), jnp.zeros((), jnp.float32)

    def update(g, state, params=None):
        sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
        # The barrier keeps XLA from fusing the read into adam's loops, which makes
        # it materialize a gradient-sized buffer (as optax's chain does).
        sq, g = jax.lax.optimization_barrier((sq, g))
        upd, inner = adam.update(g, state[0], params)
        return upd, (inner, sq)

    return optax.GradientTransformation(init, update)


def _adam():
    return optax.adam(1e-3)


# name -> (factory, optax counterpart or None). Thresholds bind on these gradients.
VARIANTS = {
    "adam": (_adam, None),
    "floor (adam + read pass)": (read_pass_adam, None),
    "fused clip+adam (hand)": (fused_clip_adam, None),
    "optax clip_by_global_norm": (lambda: optax.chain(optax.clip_by_global_norm(1.0), _adam()), None),
    "optax clip": (lambda: optax.chain(optax.clip(0.01), _adam()), None),
    "optax clip_by_block_rms": (lambda: optax.chain(optax.clip_by_block_rms(0.01), _adam()), None),
    "optax adaptive_grad_clip": (lambda: optax.chain(optax.adaptive_grad_clip(0.01), _adam()), None),
    "optaxclip clip_by_global_norm": (
        lambda: optax.chain(optaxclip.clip_by_global_norm(1.0), _adam()),
        "optax clip_by_global_norm",
    ),
    "optaxclip clip_by_value": (lambda: optax.chain(optaxclip.clip_by_value(0.01), _adam()), "optax clip"),
    "optaxclip clip_by_leaf_norm": (
        lambda: optax.chain(optaxclip.clip_by_leaf_norm(0.1), _adam()),
        "optax clip_by_block_rms",
    ),
    "optaxclip adaptive_grad_clip": (
        lambda: optax.chain(optaxclip.adaptive_grad_clip(0.01), _adam()),
        "optax adaptive_grad_clip",
    ),
    "optaxclip adaptive_clip(window=1000)": (
        lambda: optax.chain(optaxclip.adaptive_clip(window=1000), _adam()),
        "optax clip_by_global_norm",
    ),
    "optaxclip adaptive_clip(streaming)": (
        lambda: optax.chain(optaxclip.adaptive_clip(estimator="streaming"), _adam()),
        "optax clip_by_global_norm",
    ),
    "optaxclip zscore_clip": (
        lambda: optax.chain(optaxclip.zscore_clip(), _adam()),
        "optax clip_by_global_norm",
    ),
}
FUSED, ADAM = "fused clip+adam (hand)", "adam"


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def bench(n_params: float, dtype, repeats: int, inner: int, variants=None) -> list[dict]:
    """One row per variant: median ms, ratios, XLA temp MiB (all chained before adam)."""
    variants = variants or list(VARIANTS)
    params = model_tree(n_params, dtype)
    grads = jax.tree.map(lambda x: x * 100, model_tree(n_params, dtype, seed=1))
    n = sum(x.size for x in jax.tree.leaves(params))
    txs = {name: VARIANTS[name][0]() for name in variants}
    steps = {name: (make_step(tx), tx.init) for name, tx in txs.items()}
    med, temps = time_donated_steps(steps, params, (grads,), repeats, inner)
    rows = []
    for name in variants:
        counterpart = VARIANTS[name][1]
        rows.append(
            {
                "variant": name,
                "params": n,
                "dtype": jnp.dtype(dtype).name,
                "median_ms": med[name] * 1e3,
                "vs_adam": med[name] / med[ADAM],
                "vs_fused": med[name] / med[FUSED] if FUSED in med else None,
                "counterpart": counterpart,
                "vs_counterpart": med[name] / med[counterpart] if counterpart in med else None,
                # The overhead target: (t - t_adam) <= (t_optax - t_adam) + 5% of t_adam.
                "overhead_margin": (med[name] - med[counterpart]) / med[ADAM] if counterpart in med else None,
                "temp_MiB": temps[name] / 2**20,
            }
        )
    return rows


def targets(rows: list[dict]) -> list[tuple[bool, str]]:
    """The update-step targets of issue 6, each `(passed, line)`."""
    out = []
    for r in rows:
        where = f"{r['params']:.2g} {r['dtype']} params"
        # Issue 6 states these two for float32 trees (on CPU, XLA lowers bfloat16 arithmetic
        # through float32, so any transform before adam, optax.scale included, gets a copy).
        if r["variant"] == "optaxclip clip_by_global_norm" and r["params"] >= 1e6 and r["dtype"] == "float32":
            out.append(
                (
                    r["vs_fused"] <= 1.05,
                    f"global-norm chain vs hand-fused at {where}: {r['vs_fused']:.3f} (<= 1.05)",
                )
            )
            # "No gradient-sized temp": under 1% of the gradient bytes.
            limit = 0.01 * r["params"] * jnp.dtype(r["dtype"]).itemsize / 2**20
            out.append(
                (r["temp_MiB"] <= limit, f"global-norm chain temp at {where}: {r['temp_MiB']:.2f} MiB")
            )
        if r["variant"] == "optaxclip adaptive_clip(window=1000)" and r["params"] >= 1e6:
            v = r["vs_counterpart"]
            out.append(
                (v <= 1.10, f"adaptive_clip(window=1000) vs optax global at {where}: {v:.3f} (<= 1.10)")
            )
        if r["overhead_margin"] is not None:
            m = r["overhead_margin"]
            out.append(
                (
                    m <= 0.05,
                    f"{r['variant']} overhead minus {r['counterpart']}'s at {where}: "
                    f"{m:+.3f} of adam (<= +0.05)",
                )
            )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    args = ap.parse_args(argv)
    rows = []
    for size in args.sizes.split(","):
        rows += bench(float(size), jnp.dtype(args.dtype), args.repeats, args.inner)
    for r in rows:
        print(
            f"| {r['params']:.2g} | {r['variant']} | {r['median_ms']:.2f} "
            f"| {r['vs_adam']:.3f} | {r['temp_MiB']:.2f} |"
        )
    print_checks(targets(rows))
    return rows


if __name__ == "__main__":
    main()
