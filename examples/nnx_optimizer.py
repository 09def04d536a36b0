"""A Flax NNX training loop with `nnx.Optimizer`, logging optaxclip's metrics each step.

A small MLP fits a smooth function with adam behind `optaxclip.adaptive_clip`;
one batch in the middle has its targets multiplied by 1000 (a corrupted
batch). The jitted step returns `optaxclip.metrics(optimizer.opt_state)`:
plain jax arrays, copies that later steps do not change, so the loop keeps
them without a host sync per step and reads them at the end. The log shows
the pre-clip norm, the adaptive threshold, whether the step was clipped and
the quantile the next threshold is built from; the corrupted batch's norm
is clipped back to the threshold.

Run: `python examples/nnx_optimizer.py` (a few seconds on a CPU; on GPU/TPU
when JAX has one), `--help` for flags.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip

COLUMNS = ("pre_clip_norm", "threshold", "clipped", "quantile_estimate", "clip_count")


class MLP(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.hidden(x)))[:, 0]


def batches(steps: int, bad_step: int, seed: int, size: int = 32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(4).astype(np.float32)
    for step in range(steps):
        x = rng.standard_normal((size, 4)).astype(np.float32)
        y = np.sin(x @ w)
        if step == bad_step:
            y = y * 1000.0  # a corrupted batch
        yield jnp.asarray(x), jnp.asarray(y)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, optaxclip.metrics(optimizer.opt_state)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bad-step", type=int, default=None, help="the corrupted batch (default: steps // 2)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2, help="adam learning rate")
    ap.add_argument("--every", type=int, default=20, help="print every this many steps (and the bad one)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Trains, prints a table of the logged metrics; returns one dict of floats per step."""
    args = parse_args(argv)
    bad = args.steps // 2 if args.bad_step is None else args.bad_step
    model = MLP(args.hidden, nnx.Rngs(args.seed))
    tx = optax.chain(optaxclip.adaptive_clip(quantile=0.9, window=100), optax.adam(args.lr))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    logged = []
    for x, y in batches(args.steps, bad, args.seed):
        loss, metrics = train_step(model, optimizer, x, y)
        logged.append({"loss": loss, **metrics})  # arrays: no host sync in the loop
    rows = [{"step": i, **{k: float(v) for k, v in m.items()}} for i, m in enumerate(logged)]

    print(
        f"MLP (hidden {args.hidden}) with nnx.Optimizer: adaptive_clip(0.9) + adam({args.lr}), "
        f"{args.steps} steps; batch {bad} is corrupted (targets x1000); device: "
        f"{jax.devices()[0].platform}\n"
    )
    header = f"{'step':>5} {'loss':>10} " + " ".join(f"{c:>17}" for c in COLUMNS)
    print(header)
    for r in rows:
        if r["step"] % args.every == 0 or r["step"] == bad or r["step"] == args.steps - 1:
            cells = " ".join(
                f"{int(r[c]):>17d}" if c in ("clipped", "clip_count") else f"{r[c]:>17.4g}" for c in COLUMNS
            )
            print(f"{r['step']:>5d} {r['loss']:>10.4g} {cells}")
    last = rows[-1]
    print(
        f"\nclipped {int(last['clip_count'])} of {int(last['step_count'])} steps; the corrupted batch's "
        f"norm {rows[bad]['pre_clip_norm']:.4g} was clipped to {rows[bad]['threshold']:.4g}; final loss "
        f"{last['loss']:.4g}."
    )
    return rows


if __name__ == "__main__":
    main()
