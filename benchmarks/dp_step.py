"""DP-SGD step on a Flax NNX LSTM: optaxclip against a non-private step, optax.contrib and jax_privacy.

Every variant is one jitted training step (gradients, aggregation, adam,
`apply_updates`; params and optimizer state donated) on a character LSTM
(vocab 64, seq 64) and a batch of token windows:

- `non-private`: the mean loss's gradient + adam;
- `optaxclip`: `per_example_grads` + `dp_aggregate` + adam;
- `optaxclip mb16`: `clipped_grad_sum(microbatch_size=16)` + `dp_aggregate` + adam;
- `optaxclip ghost`: `ghost_clipped_grad_sum` (ghost norms and book-keeping on the
  stock Flax layers, no per-example gradients) + `dp_aggregate` + adam;
- `optax.contrib`: `jax.vmap(jax.grad)` + `optax.contrib.differentially_private_aggregate` + adam;
- `jax_privacy` and `jax_privacy mb16`: `jax_privacy.clipping.clipped_grad` (its
  own microbatching for mb16) + float32 Gaussian noise per leaf + adam.

All clip at 1.0 with noise multiplier 1.1. Reports median step time, ratios
to the non-private step and to jax_privacy, and XLA's compiled temp size
(peak scratch memory). `bench_dense` times the non-private and the ghost
step on an Embed + Dense-over-sequence model (a transformer block's MLP:
seq 128, width 256, batch 64). Run through `benchmarks/run.py`, or alone:
`python benchmarks/dp_step.py --configs 128x64` (`--dense` adds the MLP rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import print_checks, time_donated_steps  # benchmarks/ is the script's (or run.py's) path
from flax import nnx

import optaxclip

VOCAB, SEQ, CLIP, NOISE, MICRO = 64, 64, 1.0, 1.1, 16
DENSE_SEQ, DENSE_WIDTH, DENSE_BATCH = 128, 256, 64


# The demo's model (Embed -> `nnx.RNN(nnx.LSTMCell)` -> Linear), loaded from its file: the
# demo is a script, not a package, and the import path stays as it is.
_spec = importlib.util.spec_from_file_location(
    "lstm_exploding", pathlib.Path(__file__).resolve().parent.parent / "examples" / "lstm_exploding.py"
)
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)
CharLSTM = _demo.CharLSTM


class DenseLM(nnx.Module):
    """Embed -> a transformer block's MLP over the sequence (width -> 4 width -> width, residual) -> head."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, vocab: int = VOCAB):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        h = h + self.down(jax.nn.gelu(self.up(h)))
        return self.head(h)


def make_variants(hidden: int, batch: int):
    """`({name: (step, init)}, params)`, with `step(params, state, x, y) -> (params, state)`."""
    from jax_privacy import clipping

    model = CharLSTM(hidden, rngs=nnx.Rngs(0), vocab=VOCAB)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def batch_loss(p, x, y):  # mean over the rows given (one row for a per-example call)
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def example_loss(p, x, y):  # one example, without the batch axis
        return batch_loss(p, x[None], y[None])

    adam = optax.adam(1e-3)
    key = jax.random.key(0)

    def chain_step(tx, grads_of):
        def step(p, s, x, y):
            updates, s = tx.update(grads_of(p, x, y), s, p)
            return optax.apply_updates(p, updates), s

        return jax.jit(step, donate_argnums=(0, 1)), tx.init

    per_example = optaxclip.per_example_grads(example_loss, batch_argnums=(1, 2))
    summed = optaxclip.clipped_grad_sum(example_loss, batch_argnums=(1, 2), microbatch_size=MICRO)
    ghost = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    dp = lambda: optaxclip.dp_aggregate(CLIP, NOISE, key, expected_batch_size=batch)
    variants = {
        "non-private": chain_step(adam, jax.grad(batch_loss)),
        "optaxclip": chain_step(optax.chain(dp(), adam), per_example),
        f"optaxclip mb{MICRO}": chain_step(
            optax.chain(dp(), adam), lambda p, x, y: summed(p, x, y, l2_norm_clip=CLIP)
        ),
        "optaxclip ghost": chain_step(
            optax.chain(dp(), adam), lambda p, x, y: ghost(p, x, y, l2_norm_clip=CLIP)
        ),
        "optax.contrib": chain_step(
            optax.chain(optax.contrib.differentially_private_aggregate(CLIP, NOISE, key), adam),
            jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)),
        ),
    }

    def jax_privacy_step(microbatch_size):
        grad_fn = clipping.clipped_grad(
            batch_loss, l2_clip_norm=CLIP, batch_argnums=(1, 2), microbatch_size=microbatch_size
        )

        def init(p):
            return adam.init(p), key

        def step(p, s, x, y):
            inner, k = s
            k, noise_key = jax.random.split(k)
            total = grad_fn(p, x, y)
            leaves, treedef = jax.tree.flatten(total)
            noisy = [
                (g + NOISE * CLIP * jax.random.normal(jax.random.fold_in(noise_key, i), g.shape, jnp.float32))
                / batch
                for i, g in enumerate(leaves)
            ]
            updates, inner = adam.update(treedef.unflatten(noisy), inner, p)
            return optax.apply_updates(p, updates), (inner, k)

        return jax.jit(step, donate_argnums=(0, 1)), init

    variants["jax_privacy"] = jax_privacy_step(None)
    variants[f"jax_privacy mb{MICRO}"] = jax_privacy_step(MICRO)
    return variants, params


def bench(hidden: int, batch: int, repeats: int, inner: int) -> list[dict]:
    variants, params = make_variants(hidden, batch)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (batch, SEQ + 1)), jnp.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    n_params = sum(v.size for v in jax.tree.leaves(params))
    medians, temps = time_donated_steps(variants, params, (x, y), repeats, inner)
    base = medians["non-private"]
    rows = []
    for name, med in medians.items():
        ref = medians[f"jax_privacy mb{MICRO}" if "mb" in name else "jax_privacy"]
        rows.append(
            {
                "variant": name,
                "hidden": hidden,
                "batch": batch,
                "params": n_params,
                "median_ms": med * 1e3,
                "vs_nonprivate": med / base,
                "vs_jax_privacy": med / ref,
                "temp_MiB": temps[name] / 2**20,
            }
        )
    return rows


def bench_dense(repeats: int, inner: int) -> list[dict]:
    """Non-private vs ghost DP step on `DenseLM` (seq 128, width 256, batch 64); rows as `bench`'s."""
    model = DenseLM(DENSE_WIDTH, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def batch_loss(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def example_loss(p, x, y):
        return batch_loss(p, x[None], y[None])

    adam = optax.adam(1e-3)
    ghost = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    dp = optax.chain(
        optaxclip.dp_aggregate(CLIP, NOISE, jax.random.key(0), expected_batch_size=DENSE_BATCH), adam
    )

    def chain_step(tx, grads_of):
        def step(p, s, x, y):
            updates, s = tx.update(grads_of(p, x, y), s, p)
            return optax.apply_updates(p, updates), s

        return jax.jit(step, donate_argnums=(0, 1)), tx.init

    variants = {
        "dense non-private": chain_step(adam, jax.grad(batch_loss)),
        "dense optaxclip ghost": chain_step(dp, lambda p, x, y: ghost(p, x, y, l2_norm_clip=CLIP)),
    }
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (DENSE_BATCH, DENSE_SEQ + 1)), jnp.int32)
    medians, temps = time_donated_steps(variants, params, (tokens[:, :-1], tokens[:, 1:]), repeats, inner)
    base = medians["dense non-private"]
    n_params = sum(v.size for v in jax.tree.leaves(params))
    return [
        {
            "variant": name,
            "hidden": DENSE_WIDTH,
            "batch": DENSE_BATCH,
            "params": n_params,
            "median_ms": med * 1e3,
            "vs_nonprivate": med / base,
            "vs_jax_privacy": None,
            "temp_MiB": temps[name] / 2**20,
        }
        for name, med in medians.items()
    ]


def targets(rows: list[dict]) -> list[tuple[bool, str]]:
    """The DP targets of issues 4, 6 and 15 (the ghost path), each `(passed, line)`."""
    out = []
    dense = [r for r in rows if r["variant"].startswith("dense ")]
    rows = [r for r in rows if not r["variant"].startswith("dense ")]
    for hidden, batch in sorted({(r["hidden"], r["batch"]) for r in rows}):
        got = {r["variant"]: r for r in rows if (r["hidden"], r["batch"]) == (hidden, batch)}
        where = f"hidden {hidden}, batch {batch}"
        if "optaxclip ghost" in got:
            g = got["optaxclip ghost"]
            vs_vmap = g["median_ms"] / got["optaxclip"]["median_ms"]
            mem = g["temp_MiB"] / got["non-private"]["temp_MiB"]
            out.append(
                (
                    g["vs_nonprivate"] <= 1.6,
                    f"optaxclip ghost step vs non-private at {where}: "
                    f"{g['vs_nonprivate']:.3f} (target <= 1.6)",
                )
            )
            out.append(
                (
                    vs_vmap <= 0.5,
                    f"optaxclip ghost step vs vmap path at {where}: {vs_vmap:.3f} (target <= 0.5)",
                )
            )
            out.append(
                (mem <= 1.2, f"optaxclip ghost temp vs non-private at {where}: {mem:.3f} (target <= 1.2)")
            )
        for name in ("optaxclip", f"optaxclip mb{MICRO}"):
            ratio = got[name]["vs_jax_privacy"]
            out.append((ratio <= 1.0, f"{name} step vs jax_privacy at {where}: {ratio:.3f} (target <= 1.0)"))
        mem = got[f"optaxclip mb{MICRO}"]["temp_MiB"] / got["optaxclip"]["temp_MiB"]
        out.append(
            (
                mem <= 1 / 3,
                f"optaxclip mb{MICRO} peak temp / unmicrobatched at {where}: {mem:.3f} (target <= 0.333)",
            )
        )
    if dense:
        ratio = next(r["vs_nonprivate"] for r in dense if r["variant"] == "dense optaxclip ghost")
        out.append(
            (
                ratio <= 1.3,
                f"optaxclip ghost step vs non-private on the Dense-over-sequence model (seq {DENSE_SEQ}, "
                f"width {DENSE_WIDTH}, batch {DENSE_BATCH}): {ratio:.3f} (target <= 1.3)",
            )
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="128x64", help="comma-separated HIDDENxBATCH")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=2)
    ap.add_argument("--dense", action="store_true", help="also the Dense-over-sequence model (bench_dense)")
    args = ap.parse_args(argv)
    rows = []
    for config in args.configs.split(","):
        hidden, batch = (int(v) for v in config.split("x"))
        rows += bench(hidden, batch, args.repeats, args.inner)
    if args.dense:
        rows += bench_dense(args.repeats, args.inner)
    for r in rows:
        vs_jp = "-" if r["vs_jax_privacy"] is None else f"{r['vs_jax_privacy']:.3f}"
        print(
            f"| {r['hidden']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} "
            f"| {r['vs_nonprivate']:.2f} | {vs_jp} | {r['temp_MiB']:.1f} |"
        )
    print_checks(targets(rows))
    return rows


if __name__ == "__main__":
    main()
