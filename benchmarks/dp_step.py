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
seq 128, width 256, batch 64). `bench_models` times issue 21's models
(`--models`: an NNX and a Linen char-LSTM of the same shape, a 4-block NNX
transformer of width 256 at seq 128; also an Equinox LSTM and a Linen
transformer), each a non-private step, the vmap path and the ghost path,
and prints how many leaves took each ghost path. Run through
`benchmarks/run.py`, or alone: `python benchmarks/dp_step.py --configs
128x64` (`--dense` adds the MLP rows; `--configs "" --models issue21` runs
the three issue-21 models only).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import (
    CLOCKS,
    print_checks,
    set_clock,
    time_donated_steps,
)  # benchmarks/ is the script's (or run.py's) path
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

# The framework models of `examples/dp_frameworks.py` (NNX/Linen transformer, NNX/Linen/Equinox LSTM),
# loaded the same way: the benchmark times the models a user reads there, at benchmark size.
_spec = importlib.util.spec_from_file_location(
    "dp_frameworks", pathlib.Path(__file__).resolve().parent.parent / "examples" / "dp_frameworks.py"
)
_frameworks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_frameworks)

# Issue 21's models at benchmark size: `(builder kwargs, seq, batch)`, vocab
# VOCAB. The LSTMs are the char-LSTM's shape (embed 32, hidden 128, seq 64, batch 64); the
# transformers have 4 blocks of width 256, 4 heads, MLP 4 x 256, seq 128, at a batch whose
# non-private step takes ~0.3-0.5 s on the 2-core CPU. The ghost path also runs in chunks of half
# the batch (`microbatch_size`), which holds half the cotangents and records at once.
MODELS = {
    "nnx_lstm": (dict(hidden=128, embed=32), SEQ, 64),
    "linen_lstm": (dict(hidden=128, embed=32), SEQ, 64),
    "equinox_lstm": (dict(hidden=128, embed=32), SEQ, 64),
    "nnx_transformer": (dict(width=256, heads=4, blocks=4), 128, 8),
    "linen_transformer": (dict(width=256, heads=4, blocks=4), 128, 8),
}
ISSUE_21 = ("nnx_lstm", "linen_lstm", "nnx_transformer")  # the models the targets name


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


def _chain_step(tx, grads_of):
    """`(jitted step(p, s, x, y) -> (p, s), init)`: `grads_of` through `tx`, params and state donated."""

    def step(p, s, x, y):
        updates, s = tx.update(grads_of(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    return jax.jit(step, donate_argnums=(0, 1)), tx.init


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

    per_example = optaxclip.per_example_grads(example_loss, batch_argnums=(1, 2))
    summed = optaxclip.clipped_grad_sum(example_loss, batch_argnums=(1, 2), microbatch_size=MICRO)
    ghost = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    dp = lambda: optaxclip.dp_aggregate(CLIP, NOISE, key, expected_batch_size=batch)
    variants = {
        "non-private": _chain_step(adam, jax.grad(batch_loss)),
        "optaxclip": _chain_step(optax.chain(dp(), adam), per_example),
        f"optaxclip mb{MICRO}": _chain_step(
            optax.chain(dp(), adam), lambda p, x, y: summed(p, x, y, l2_norm_clip=CLIP)
        ),
        "optaxclip ghost": _chain_step(
            optax.chain(dp(), adam), lambda p, x, y: ghost(p, x, y, l2_norm_clip=CLIP)
        ),
        "optax.contrib": _chain_step(
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

    variants = {
        "dense non-private": _chain_step(adam, jax.grad(batch_loss)),
        "dense optaxclip ghost": _chain_step(dp, lambda p, x, y: ghost(p, x, y, l2_norm_clip=CLIP)),
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


def _gradient_temps(grads_of: dict, params, x, y) -> dict[str, float]:
    """XLA temp MiB of each gradient computation alone (no noise, no adam): the engine's own share."""
    return {
        name: jax.jit(f).lower(params, x, y).compile().memory_analysis().temp_size_in_bytes / 2**20
        for name, f in grads_of.items()
    }


def bench_models(
    names, repeats: int, inner: int, batch: int | None = None, grad_temp: bool = False
) -> list[dict]:
    """Issue 21's rows: per model (`MODELS`), the non-private, vmap-path and ghost-path DP steps.

    Each variant is one jitted step with adam (params and state donated): the
    mean loss's gradient; `clipped_grad_sum` (per-example gradients by vmap,
    one chunk) + `dp_aggregate`; `ghost_clipped_grad_sum` + `dp_aggregate`,
    whole and in chunks of half the batch (`ghost mb<m>`).
    Rows as `bench`'s (`hidden` is the LSTM hidden size or the transformer
    width), plus `model` and, on the ghost row, `paths`: `{path: (leaves,
    parameters)}` from `.paths()`. `batch` overrides every model's batch.
    `grad_temp` adds `grad_temp_MiB`, the temp of the gradient computation
    alone (compiled, not timed), which separates the engine's memory from
    `dp_aggregate`'s and adam's.
    """
    rows = []
    for name in names:
        kwargs, seq, b = MODELS[name]
        b = batch or b
        micro = b // 2 if b % 2 == 0 else None
        params, apply = getattr(_frameworks, name)(VOCAB, seq, **kwargs)
        batch_loss, example_loss = _frameworks.losses_of(apply)
        adam = optax.adam(1e-3)
        dp = optax.chain(optaxclip.dp_aggregate(CLIP, NOISE, jax.random.key(0), expected_batch_size=b), adam)
        ghost = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
        vmap = optaxclip.clipped_grad_sum(example_loss, batch_argnums=(1, 2))
        grads_of = {
            f"{name} non-private": jax.grad(batch_loss),
            f"{name} vmap": lambda p, x, y, f=vmap: f(p, x, y, l2_norm_clip=CLIP),
            f"{name} ghost": lambda p, x, y, f=ghost: f(p, x, y, l2_norm_clip=CLIP),
        }
        if micro:
            chunked = optaxclip.ghost_clipped_grad_sum(
                example_loss, batch_argnums=(1, 2), microbatch_size=micro
            )
            grads_of[f"{name} ghost mb{micro}"] = lambda p, x, y, f=chunked: f(p, x, y, l2_norm_clip=CLIP)
        variants = {k: _chain_step(adam if k.endswith("non-private") else dp, f) for k, f in grads_of.items()}
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (b, seq + 1)), jnp.int32)
        x, y = tokens[:, :-1], tokens[:, 1:]
        medians, temps = time_donated_steps(variants, params, (x, y), repeats, inner)
        grad_temps = _gradient_temps(grads_of, params, x, y) if grad_temp else {}
        sizes = {jax.tree_util.keystr(k): v.size for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        paths = {}
        for leaf, path in ghost.paths(params, x, y).items():
            n, size = paths.get(path, (0, 0))
            paths[path] = (n + 1, size + sizes[leaf])
        base = medians[f"{name} non-private"]
        for variant, med in medians.items():
            row = {"variant": variant, "model": name, "hidden": kwargs.get("hidden", kwargs.get("width"))}
            row |= {"batch": b, "params": sum(sizes.values()), "median_ms": med * 1e3}
            row |= {"vs_nonprivate": med / base, "vs_jax_privacy": None, "temp_MiB": temps[variant] / 2**20}
            row |= {"grad_temp_MiB": grad_temps[variant]} if grad_temps else {}
            rows.append(row | ({"paths": paths} if variant.endswith(" ghost") else {}))
    return rows


def model_targets(rows: list[dict]) -> list[tuple[bool, str]]:
    """Issue 21: the ghost DP step <= 1.3x the non-private step, compiled temp <= 1.2x, per model."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows if "model" in r):
        got = {r["variant"].removeprefix(f"{name} "): r for r in rows if r.get("model") == name}
        for variant in (v for v in got if v.startswith("ghost")):
            g = got[variant]
            mem = g["temp_MiB"] / max(got["non-private"]["temp_MiB"], 1e-9)
            where = f"{name} (hidden/width {g['hidden']}, batch {g['batch']})"
            ratio = g["vs_nonprivate"]
            out.append((ratio <= 1.3, f"{variant} step vs non-private, {where}: {ratio:.3f} (target <= 1.3)"))
            out.append((mem <= 1.2, f"{variant} temp vs non-private, {where}: {mem:.3f} (target <= 1.2)"))
    return out


def path_lines(rows: list[dict]) -> list[str]:
    """Per model: how many leaves (parameters) took each path."""
    out = []
    for r in rows:
        if "paths" in r:
            parts = [f"{p} {n} ({size:,})" for p, (n, size) in sorted(r["paths"].items())]
            out.append(f"{r['model']}: {r['params']:,} parameters; leaves (parameters): " + ", ".join(parts))
    for name in dict.fromkeys(r["model"] for r in rows if "grad_temp_MiB" in r):
        temps = {
            r["variant"].removeprefix(f"{name} "): r["grad_temp_MiB"] for r in rows if r.get("model") == name
        }
        out.append(
            f"{name}: gradient computation alone, XLA temp MiB: "
            + ", ".join(f"{k} {v:.1f}" for k, v in temps.items())
            + f" (ghost / non-private {temps['ghost'] / max(temps['non-private'], 1e-9):.3f})"
        )
    return out


def targets(rows: list[dict]) -> list[tuple[bool, str]]:
    """The DP targets of issues 4, 6 and 15 (the ghost path) and 21 (per model), each `(passed, line)`."""
    out = model_targets(rows)
    rows = [r for r in rows if "model" not in r]
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
    ap.add_argument(
        "--models",
        default="",
        help=f"comma-separated issue-21 models, of {', '.join(MODELS)} ('issue21': {', '.join(ISSUE_21)})",
    )
    ap.add_argument("--model-batch", type=int, help="batch of every --models model (default: MODELS')")
    ap.add_argument(
        "--grad-temp", action="store_true", help="--models: also the temp of the gradient computation alone"
    )
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: what a user waits; cpu: process CPU seconds, steadier on a shared machine (CPU only)",
    )
    args = ap.parse_args(argv)
    set_clock(args.clock)
    models = [m for m in args.models.split(",") if m]
    models = [n for m in models for n in (ISSUE_21 if m == "issue21" else (m,))]
    if unknown := sorted(set(models) - set(MODELS)):
        ap.error(f"unknown --models {unknown}; choose from {', '.join(MODELS)} or issue21")
    rows = []
    for config in args.configs.split(",") if args.configs else ():
        hidden, batch = (int(v) for v in config.split("x"))
        rows += bench(hidden, batch, args.repeats, args.inner)
    if args.dense:
        rows += bench_dense(args.repeats, args.inner)
    rows += bench_models(models, args.repeats, args.inner, args.model_batch, args.grad_temp)
    for r in rows:
        vs_jp = "-" if r["vs_jax_privacy"] is None else f"{r['vs_jax_privacy']:.3f}"
        print(
            f"| {r['hidden']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} "
            f"| {r['vs_nonprivate']:.2f} | {vs_jp} | {r['temp_MiB']:.1f} |"
        )
    for line in path_lines(rows):
        print(line)
    print_checks(targets(rows))
    return rows


if __name__ == "__main__":
    main()
