"""Where the update-step overhead goes: an ablation, in units of adam's time.

It times, in one interleaved run (the harness of `update_step.py`), steps
that add one piece at a time, each chained before adam, so each piece's
cost reads as a difference. The pieces are written here in plain `jnp`
(optaxclip is used only through its public API):

- global-norm clip to 1.0 without stats: the plain norm `sqrt(sum(x**2))`
  (overflows for large finite gradients), the two-accumulator norm (the
  plain sum and the sum scaled by `2**-64` in one read, picked by
  finiteness), `optaxclip.global_norm`; then the real
  `clip_by_global_norm` (adds `ClipStats`, seven scalars) and, for
  comparison, the same stats packed in one float32[7] array;
- per-leaf clip to 0.1 without stats: each leaf scaled by its own norm,
  the same norms stacked so every scale waits for every leaf's reduction,
  and a `lax.cond` per leaf (what an overflow-rescue branch per leaf
  costs); against optax's `clip_by_block_rms` and optaxclip's
  `clip_by_leaf_norm`;
- AGC (clipping 0.01, eps 1e-3) without stats, plain unit norms, against
  optax's and optaxclip's AGC;
- value clip: adam plus one read of the gradients computing `sum(x**2)`
  (the floor), `sum(min(x**2, h**2))`, or the two sums a clamped norm
  needs (`sum(min(x**2, h**2))` and `sum(max(x**2, h**2) - h**2)`), none
  clamping; against optax's `clip` and optaxclip's `clip_by_value`.

Run: `python benchmarks/overheads.py [--sizes 1.1e6] [--states 4]`
It prints a table and writes `results/overheads.md`.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
import update_step  # benchmarks/ is the script's path

import optaxclip

HERE = pathlib.Path(__file__).resolve().parent
F32 = jnp.float32
H = 0.01  # the value bound update_step.py uses


def _sumsq(x):
    return jnp.sum(jnp.square(x.astype(F32)))


def _plain_norm(leaves):
    return jnp.sqrt(sum(_sumsq(x) for x in leaves))


def _two_accumulator_norm(leaves):
    """One read, two sums: plain, and scaled by 2**-64 (finite up to float32's max); the finite one wins."""
    plain = sum(_sumsq(x) for x in leaves)
    small = sum(_sumsq(x.astype(F32) * 2.0**-64) for x in leaves)
    return jnp.where(jnp.isfinite(plain), jnp.sqrt(plain), jnp.sqrt(small) * 2.0**64)


def _scale(x, norm, bound):
    return (x * jnp.minimum(1.0, bound / norm)).astype(x.dtype)


def _global_clip(norm_fn, packed: bool = False) -> optax.GradientTransformation:
    """Global-norm clip to 1.0 with `norm_fn(leaves)`; no stats, or the seven stats packed in one f32[7]."""

    def init(params):
        del params
        return jnp.zeros((7,), F32) if packed else optax.EmptyState()

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norm = norm_fn(leaves)
        out = treedef.unflatten([_scale(x, norm, 1.0) for x in leaves])
        if packed:
            factor = jnp.minimum(1.0, 1.0 / norm)
            clipped = (factor < 1).astype(F32)
            nonfinite = (~jnp.isfinite(norm)).astype(F32)
            state = jnp.stack(
                [norm, norm * factor, 1.0, clipped, state[4] + 1, state[5] + clipped, state[6] + nonfinite]
            )
        return out, state

    return optax.GradientTransformation(init, update)


def _leaf_clip(kind: str) -> optax.GradientTransformation:
    """Per-leaf norm clip to 0.1 without stats; `kind` says how the leaves' scales depend on the norms.

    "own": each leaf's scale from its own norm; "coupled": the norms stacked,
    so each scale depends on every reduction (as one check over all leaves
    makes it); "cond": each leaf's norm behind its own `lax.cond` whose
    untaken branch is trivial (timing only: not a correct rescue).
    """

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        sums = [_sumsq(x) for x in leaves]
        if kind == "coupled":
            norms = list(jnp.sqrt(jnp.stack(sums)))
        elif kind == "cond":
            norms = [jax.lax.cond(jnp.isfinite(s), jnp.sqrt, jnp.zeros_like, s) for s in sums]
        else:
            norms = [jnp.sqrt(s) for s in sums]
        return treedef.unflatten([_scale(x, n, 0.1) for x, n in zip(leaves, norms, strict=True)]), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _agc() -> optax.GradientTransformation:
    """AGC's arithmetic (clipping 0.01, eps 1e-3) without stats, plain unit norms."""

    def update(updates, state, params):
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        out = []
        for g, p in zip(g_leaves, p_leaves, strict=True):
            axes = tuple(optaxclip.flax_unit_axes(None, p))
            norm = lambda x, a=axes: jnp.sqrt(jnp.sum(jnp.square(x.astype(F32)), axis=a, keepdims=True))
            out.append(_scale(g, norm(g), 0.01 * jnp.maximum(norm(p), 1e-3)))
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _read_then_adam(reads: str) -> optax.GradientTransformation:
    """adam after a read of the gradients computing `reads` (kept as state; nothing clamped)."""
    adam = optax.adam(1e-3)

    def sums(leaves):
        h2 = jnp.asarray(H * H, F32)
        sq = [jnp.square(x.astype(F32)) for x in leaves]
        if reads == "sumsq":
            return [sum(jnp.sum(s) for s in sq)]
        inside = sum(jnp.sum(jnp.minimum(s, h2)) for s in sq)
        if reads == "min":
            return [inside]
        return [inside, sum(jnp.sum(jnp.maximum(s, h2) - h2) for s in sq)]

    def init(params):
        return adam.init(params), jnp.zeros((), F32)

    def update(updates, state, params=None):
        total, updates = jax.lax.optimization_barrier((sum(sums(jax.tree.leaves(updates))), updates))
        out, inner = adam.update(updates, state[0], params)
        return out, (inner, total)

    return optax.GradientTransformation(init, update)


def _chain(tx):
    return lambda: optax.chain(tx, optax.adam(1e-3))


PLAIN = "global: plain norm, no stats"
TWO_ACC = "global: two-accumulator norm, no stats"
LIB_NORM = "global: optaxclip.global_norm, no stats"
OWN = "leaf: each scale from its own norm"
# (name, factory, the step it adds to) in the order of the table.
ABLATION = [
    ("adam", lambda: optax.adam(1e-3), None),
    (PLAIN, _chain(_global_clip(_plain_norm)), "adam"),
    (TWO_ACC, _chain(_global_clip(_two_accumulator_norm)), PLAIN),
    (LIB_NORM, _chain(_global_clip(lambda leaves: optaxclip.global_norm(leaves))), PLAIN),
    (
        "global: stats packed in one f32[7]",
        _chain(_global_clip(optaxclip.global_norm, packed=True)),
        LIB_NORM,
    ),
    ("optaxclip clip_by_global_norm + adam", _chain(optaxclip.clip_by_global_norm(1.0)), LIB_NORM),
    ("optax clip_by_global_norm + adam", _chain(optax.clip_by_global_norm(1.0)), PLAIN),
    (OWN, _chain(_leaf_clip("own")), "adam"),
    ("leaf: norms stacked (coupled)", _chain(_leaf_clip("coupled")), OWN),
    ("leaf: a cond per leaf", _chain(_leaf_clip("cond")), OWN),
    ("optax clip_by_block_rms + adam", _chain(optax.clip_by_block_rms(0.01)), "adam"),
    ("optaxclip clip_by_leaf_norm + adam", _chain(optaxclip.clip_by_leaf_norm(0.1)), OWN),
    ("agc: plain unit norms", _chain(_agc()), "adam"),
    ("optax adaptive_grad_clip + adam", _chain(optax.adaptive_grad_clip(0.01)), "agc: plain unit norms"),
    (
        "optaxclip adaptive_grad_clip + adam",
        _chain(optaxclip.adaptive_grad_clip(0.01)),
        "agc: plain unit norms",
    ),
    ("read sum(x^2) + adam (floor)", lambda: _read_then_adam("sumsq"), "adam"),
    ("read sum(min(x^2,h^2)) + adam", lambda: _read_then_adam("min"), "adam"),
    ("read the clamped norm's two sums + adam", lambda: _read_then_adam("both"), "adam"),
    ("optax clip + adam", _chain(optax.clip(H)), "adam"),
    ("optaxclip clip_by_value + adam", _chain(optaxclip.clip_by_value(H)), "read sum(x^2) + adam (floor)"),
]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1.1e6")
    ap.add_argument("--states", type=int, default=0, help="vmap the steps over this many states (0: one)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "overheads.md"))
    args = ap.parse_args(argv)
    factories = {name: factory for name, factory, _ in ABLATION}
    base = {name: ref for name, _, ref in ABLATION}
    lines = [
        "| params | states | step | median ms | vs adam | added, in adam units |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for size in args.sizes.split(","):
        got = update_step.bench(
            float(size), jnp.float32, args.repeats, args.inner, list(factories), args.states, factories
        )
        ms = {r["variant"]: r["median_ms"] for r in got}
        for r in got:
            ref = base[r["variant"]]
            added = "-" if ref is None else f"{(r['median_ms'] - ms[ref]) / ms['adam']:+.3f} (over {ref})"
            cells = [
                f"{r['params']:.2g}",
                str(r["states"]),
                r["variant"],
                f"{r['median_ms']:.3f}",
                f"{r['vs_adam']:.3f}",
                added,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        rows += got
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}.\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
