"""Where the update-step overhead goes: an ablation, in units of adam's time.

Where a target of `update_step.py` misses (at 1e5 parameters, and for
`clip_by_value` at every size), this shows what the time is spent on. It
times, in one interleaved run (the same harness as `update_step.py`), steps
that add one piece at a time, so each piece's cost reads as a difference:

- global-norm clip: the norm as `global_norm`'s fast sum of squares alone
  (no overflow guard, no stats), then with its overflow-guarding `lax.cond`,
  then with the `ClipStats` state (seven scalar arrays, as DESIGN.md
  requires), and, for comparison only, the same stats packed in one
  float32[7] array;
- per-leaf clip (no stats): each leaf scaled by its own norm, then the same
  norms stacked so every scale waits for every leaf's reduction (what one
  guard over all leaves does), then a `lax.cond` per leaf; against optax's
  `clip_by_block_rms` and optaxclip's `clip_by_leaf_norm`;
- AGC (no stats): its unit norms of params and gradients unguarded, then
  behind optaxclip's guards; against optax's and optaxclip's AGC;
- value clip: adam plus one read of the gradients computing `sum(x**2)`
  (the floor), `sum(min(x**2, h**2))`, or both sums `clip_by_value`
  needs (`sum(min(x**2, h**2))` and `sum(max(x**2, h**2) - h**2)`), none
  clamping.

Run: `.venv/bin/python benchmarks/overheads.py [--sizes 1e5,1e6]` (about 20
s); it prints a table and writes `results/overheads.md`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import optaxclip
from optaxclip import _basic, _stats, _norms

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import update_step  # noqa: E402

F32 = jnp.float32
H = 0.01  # the value bound update_step.py uses


def _global_clip(stats: str, guarded: bool) -> optax.GradientTransformation:
    """Global-norm clip to 1.0; `stats` is "none", "clipstats" or "packed"."""

    def init(params):
        del params
        return {"none": optax.EmptyState(), "clipstats": _stats.init_stats(), "packed": jnp.zeros((7,), F32)}[
            stats
        ]

    def update(updates, state, params=None):
        del params
        if guarded:
            norm = optaxclip.global_norm(updates)
        else:
            norm = jnp.sqrt(_norms._tree_sumsq(jax.tree.leaves(updates)))  # global_norm's fast path
        if stats == "clipstats":
            return _basic.clip_to_bound(updates, state, norm, jnp.asarray(1.0, F32))
        factor = _norms.scale_factor(norm, jnp.asarray(1.0, F32))
        out = jax.tree.map(lambda g: _norms.scale(g, factor), updates)
        if stats == "packed":
            clipped = (factor < 1).astype(F32)
            state = jnp.stack(
                [
                    norm,
                    norm * factor,
                    jnp.asarray(1.0, F32),
                    clipped,
                    state[4] + 1,
                    state[5] + clipped,
                    state[6] + (~jnp.isfinite(norm)).astype(F32),
                ]
            )
        return out, state

    return optax.GradientTransformation(init, update)


def _leaf_clip(kind: str) -> optax.GradientTransformation:
    """Per-leaf norm clip to 0.1 without stats; `kind` says how the leaves' scales depend on the norms.

    "own": each leaf's scale from its own fast norm (unguarded); "coupled": the
    same norms stacked, so each scale depends on every reduction (as one guard
    over all leaves makes it); "cond": each leaf's norm behind its own guard
    whose untaken branch is empty (timing only: not a correct rescue).
    """

    def one(x, norm):
        return _norms.scale(x, _norms.scale_factor(norm, jnp.asarray(0.1, F32)))

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        fast = [jnp.sum(jnp.square(x.astype(F32))) for x in leaves]
        if kind == "coupled":
            norms = list(jnp.sqrt(jnp.stack(fast)))
        elif kind == "cond":
            norms = [jax.lax.cond(jnp.isfinite(f), jnp.sqrt, jnp.zeros_like, f) for f in fast]
        else:
            norms = [jnp.sqrt(f) for f in fast]
        return treedef.unflatten([one(x, n) for x, n in zip(leaves, norms, strict=True)]), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _agc(guarded: bool) -> optax.GradientTransformation:
    """AGC's arithmetic (clipping 0.01, eps 1e-3) without stats; unit norms guarded or not."""

    def update(updates, state, params):
        g_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = jax.tree.leaves(params)
        axes = [optaxclip.flax_unit_axes(None, p) for p in p_leaves]
        if guarded:
            p_norms, g_norms = _norms.unit_norms(p_leaves, axes), _norms.unit_norms(g_leaves, axes)
        else:
            norm = lambda x, a: jnp.sqrt(jnp.sum(jnp.square(x.astype(F32)), axis=a, keepdims=True))
            p_norms = [norm(x, a) for x, a in zip(p_leaves, axes, strict=True)]
            g_norms = [norm(x, a) for x, a in zip(g_leaves, axes, strict=True)]
        out = []
        for g, pn, gn in zip(g_leaves, p_norms, g_norms, strict=True):
            bound = 0.01 * jnp.maximum(pn, 1e-3)
            out.append(_norms.scale(g, _norms.scale_factor(gn, bound)))
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


NO_GUARD, GUARD = "global: fast norm, no guard, no stats", "global: + overflow-guard cond"
# (name, factory, the step it adds to) in the order of the table.
ABLATION = [
    ("adam", lambda: optax.adam(1e-3), None),
    (NO_GUARD, _chain(_global_clip("none", False)), "adam"),
    (GUARD, _chain(_global_clip("none", True)), NO_GUARD),
    ("global: + ClipStats (7 scalars)", _chain(_global_clip("clipstats", True)), GUARD),
    ("global: stats packed in one f32[7]", _chain(_global_clip("packed", True)), GUARD),
    ("leaf: each scale from its own norm", _chain(_leaf_clip("own")), "adam"),
    ("leaf: norms stacked (coupled)", _chain(_leaf_clip("coupled")), "leaf: each scale from its own norm"),
    ("leaf: a cond per leaf", _chain(_leaf_clip("cond")), "leaf: each scale from its own norm"),
    ("optax clip_by_block_rms + adam", _chain(optax.clip_by_block_rms(0.01)), "adam"),
    ("optaxclip clip_by_leaf_norm + adam", _chain(optaxclip.clip_by_leaf_norm(0.1)), "adam"),
    ("agc: unit norms unguarded", _chain(_agc(False)), "adam"),
    ("agc: unit norms guarded", _chain(_agc(True)), "agc: unit norms unguarded"),
    ("optax adaptive_grad_clip + adam", _chain(optax.adaptive_grad_clip(0.01)), "adam"),
    ("optaxclip adaptive_grad_clip + adam", _chain(optaxclip.adaptive_grad_clip(0.01)), "adam"),
    ("read sum(x^2) + adam (floor)", lambda: _read_then_adam("sumsq"), "adam"),
    ("read sum(min(x^2,h^2)) + adam", lambda: _read_then_adam("min"), "adam"),
    ("read clip_by_value's two sums + adam", lambda: _read_then_adam("both"), "adam"),
    ("optaxclip clip_by_value + adam", _chain(optaxclip.clip_by_value(H)), "adam"),
]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--inner", type=int, default=10)
    args = ap.parse_args(argv)
    for name, factory, _ in ABLATION:
        update_step.VARIANTS.setdefault(name, (factory, None))
    names = [name for name, _, _ in ABLATION]
    base = {name: ref for name, _, ref in ABLATION}
    lines = [
        "| params | step | median ms | vs adam | added, in adam units |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = []
    for size in args.sizes.split(","):
        got = update_step.bench(float(size), jnp.float32, args.repeats, args.inner, names)
        ms = {r["variant"]: r["median_ms"] for r in got}
        for r in got:
            ref = base[r["variant"]]
            added = "-" if ref is None else f"{(r['median_ms'] - ms[ref]) / ms['adam']:+.3f} (over {ref})"
            cells = [
                f"{r['params']:.2g}",
                r["variant"],
                f"{r['median_ms']:.3f}",
                f"{r['vs_adam']:.3f}",
                added,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        rows += got
    table = "\n".join(lines)
    print(table)
    out = HERE / "results" / "overheads.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"Device: {jax.devices()[0].device_kind}, jax {jax.__version__}.\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
