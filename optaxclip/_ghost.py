"""Ghost clipping for any JAX model: the clipped per-example gradient sum without per-example gradients.

The loss of one example is traced to a jaxpr (`_ghost_trace`); every param
leaf that reaches the loss through one op whose other operand is
per-example (a dense or einsum projection, a conv, an embedding gather, a
LayerNorm scale or bias, inside a `scan` or not) is a *site*
(`_ghost_plan`). The jaxpr is evaluated again under `vmap` with a zero
perturbation on each site's output and its other operand recorded: one
backward pass with respect to the perturbations gives each site's output
cotangents `G` per example; the per-example norms and the clipped sum
follow from `A` and `G` by the per-op rules (`_ghost_ops`). The other
leaves take exact per-example gradients, in the same backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _norms
from . import _ghost_ops as ops
from . import _ghost_parts as parts
from ._ghost_plan import CARRY_REASON, GHOST, MATERIALISED, PER_EXAMPLE, Plan, make_plan
from ._ghost_trace import Taps, Traced, evaluate, trace_example
from ._per_example import (
    ClippedGradSum,
    _batch_size,
    _check_argnums,
    _check_wrt_dtypes,
    _layer_bounds,
    _microbatched,
    _row_mask,
    _vary_like_batch,
    _varying_axes,
    layer_sensitivity,
)

F32 = jnp.float32
__all__ = ["GHOST", "MATERIALISED", "PER_EXAMPLE", "ghost_clipped_grad_sum"]


@dataclasses.dataclass
class _Analysis:
    """The traced loss, its plan, the lifted endpoints and each rule site's mode (ghost or materialised)."""

    traced: Traced
    plan: Plan
    lifted: list  # `_ghost_parts.Lifted`
    modes: dict  # rule site leaf -> ghost | materialised


def _analyse(loss_fn, args, argnums, batch_argnums, has_aux) -> _Analysis:
    traced = trace_example(loss_fn, args, argnums, batch_argnums, has_aux)
    plan = make_plan(traced.jaxpr, traced.n_params)
    ids = {"records": len(plan.records), "points": len(plan.point_shapes)}
    lifted = [parts.lift(e, ids) for e in plan.endpoints if plan.kind[e.leaves[0]] == "lifted"]
    modes = ops.choose_modes([*plan.sites, *(lf.site for lf in lifted)])
    return _Analysis(traced, plan, lifted, modes)


def _labels(an: _Analysis) -> dict[int, tuple[str, str]]:
    """Each leaf's path and why (`paths()` and `explain()`)."""
    plan, out = an.plan, {}
    group = {i: lf for lf in an.lifted for i in lf.endpoint.leaves}
    for i, kind in plan.kind.items():
        if kind == "simple":
            site = next(s for s in plan.sites if s.leaf == i)
            scans = f" inside {len(site.scans)} scan(s)" if site.scans else ""
            out[i] = (an.modes[i], f"one `{site.kind}` site{scans}")
        elif kind == "lifted":
            lf = group[i]
            e = lf.endpoint
            how = []
            if len(e.leaves) > 1:
                how.append(f"fused with {len(e.leaves) - 1} other leaves into one kernel")
            if lf.sliced:
                how.append(f"a per-step slice of a stack over {len(lf.sliced)} scan(s)")
            out[i] = (an.modes[e.leaves[0]], f"one `dot_general` site, {' and '.join(how) or 'reshaped'}")
        elif kind == "multi":
            ends = [e for e in plan.endpoints if i in e.leaves]
            why = plan.reasons.get(i)
            if why is not None:
                out[i] = (PER_EXAMPLE, f"the cotangent of a value computed from it, used by {why}")
                continue
            sites = [e for e in ends if e.kind == "site"]
            what = ", ".join(sorted({f"`{e.eqn.primitive.name}`" for e in sites}))
            what = f"{len(sites)} sites ({what})" if len(sites) > 1 else f"one {what} site"
            if any(e.sliced and any(e.sliced) for e in sites):
                what += ", per step-slice of a stack under `scan`"
            if any(e.kind == "cut" for e in ends):
                what += " and the initial carry of a `scan`"
            out[i] = (MATERIALISED, f"per-example gradient materialised at {what}, summed per example")
        elif kind == "fallback":
            why = plan.reasons[i]
            label = MATERIALISED if why == CARRY_REASON else PER_EXAMPLE
            out[i] = (label, f"used by {why}")
        else:
            out[i] = (MATERIALISED, "does not reach the loss with a gradient (its gradient is 0)")
    return out


def _user_stacklevel() -> int:
    """The `stacklevel` of the first caller outside optaxclip and JAX (under `jit`, microbatches)."""
    here = os.path.dirname(os.path.abspath(__file__))
    jax_dir = os.path.dirname(os.path.abspath(jax.__file__))
    frame, level = sys._getframe(2), 2  # level 1: `on_plan`, which calls `warnings.warn`
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(here) or name.startswith(jax_dir) or name.endswith("functools.py")):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _backward(an: _Analysis, leaves: list, examples: list, batch: int):
    """One forward and one backward pass of the batched loss with the taps on.

    Returns `(records, bdims, G per perturbation, per-example grads of the
    fallback leaves, their indices, aux)`; records by id (an input record is
    the batched argument itself).
    """
    traced, plan = an.traced, an.plan
    fallback = plan.fallback()
    recorded = list(plan.record_ids.values())
    inner = lambda eqn: plan.inner.get(id(eqn), ([], []))
    # Arrays of a scan's steps are time-major, `[steps..., B, ...]`, as the scans stack them.
    z_axes = [len(scans) for scans, _ in plan.point_shapes]
    rec_axes = [len(plan.records[r].scans) for r in recorded]

    def one(fb_vals, zs, ex):
        params = list(leaves)
        for i, v in zip(fallback, fb_vals, strict=True):
            params[i] = v
        taps = Taps(plan.points, plan.record_ids, dict(enumerate(zs)), {}, inner)
        outs = evaluate(traced.jaxpr.jaxpr, traced.jaxpr.consts, [*params, *ex], taps)
        return outs[0], ([taps.out[r] for r in recorded], outs[1:])

    like = next((x for x in leaves if _varying_axes(x)), None)
    zs = [_zeros((*_steps(scans), batch, *aval.shape), aval.dtype, like) for scans, aval in plan.point_shapes]
    fb = [jnp.broadcast_to(leaves[i], (batch, *jnp.shape(leaves[i]))) for i in fallback]
    batched = jax.vmap(one, in_axes=(0, z_axes, 0), out_axes=(0, (rec_axes, 0)))
    losses, vjp_fn, (recs, aux) = jax.vjp(lambda fb, zs: batched(fb, zs, examples), fb, zs, has_aux=True)
    g_fb, g_zs = vjp_fn(jnp.ones_like(losses))
    records = dict(zip(recorded, recs, strict=True))
    bdims = {}
    for rid, r in enumerate(plan.records):
        if r.source is not None:
            records[rid] = examples[r.source]
        bdims[rid] = 0 if r.source is not None else len(r.scans)
    g_zs = dict(enumerate(g_zs))
    for lf in an.lifted:  # the lifted sites' views of their records and `G`
        g_zs.setdefault(lf.site.point, parts.lift_g(lf, g_zs[lf.endpoint.point]))
        for key, (rid, rflags) in lf.record_map.items():
            if key not in records:
                records[key] = parts.lift_record(lf, records[rid], bdims[rid], rflags)
                bdims[key] = 0
    return records, bdims, g_zs, g_fb, fallback, aux


def _steps(scans) -> tuple[int, ...]:
    return tuple(e.params["length"] for e in scans)


def _zeros(shape, dtype, like) -> jax.Array:
    """Zeros varying over the shard_map axes the params were cast to (so the vjp keeps them per device)."""
    z = jnp.zeros(shape, dtype)  # a constant outside shard_map: XLA folds `y + 0` away, no buffer
    if like is not None:
        return z + jnp.zeros_like(jnp.ravel(like)[:1].reshape(()), dtype)
    return z


def _site_records(site, records: dict, bdims: dict) -> tuple[list, list, list]:
    """The site's record arrays, their batch axes and their step flags, in operand order."""
    used = [r for r in site.records if r is not None]
    return [records[rid] for rid, _ in used], [bdims[rid] for rid, _ in used], [flags for _, flags in used]


def _rule(site, modes) -> str:
    """How a site's leaf is measured and summed: `dot` and `embedding` (ghost: certified norms from
    Gram matrices, the sum by the batched VJP), else `kept`: its per-example gradients, summed as
    measured (the vmap path's guarantee: the release reads the very vectors whose norms it clipped,
    so no recomputation by XLA can make the two differ)."""
    if not site.isometric or modes[site.leaf] != GHOST:
        return "kept"
    if site.kind == "dot_general":
        return "dot"
    return "embedding" if ops.is_embedding(site) else "kept"


def _centres(sites, modes, records, bdims, g_zs) -> dict:
    """The dense sites' per-example record means and `G` sums (read by the norms and the sums)."""
    centres: dict = {}
    for site in sites:
        if site.kind == "dot_general" and site.isometric:
            recs, bd, flags = _site_records(site, records, bdims)
            ops.dot_centres(site, recs[0], bd[0], flags[0], g_zs[site.point], centres)
    return centres


def _multi_grads(an: _Analysis, ends: list, leaves, records, bdims, g_zs) -> dict:
    """The materialised leaves' per-example gradients: each endpoint's `V_e` pulled back, summed."""
    per: dict = {}
    for e in ends:
        recs, bd, _ = _site_records(e, records, bdims) if e.kind == "site" else ([], [], [])
        v = parts.endpoint_grads(e, recs, bd, g_zs[e.point])
        for i, g in zip(e.leaves, parts.pullback(e, leaves, an.plan.consts, v, batched=True), strict=True):
            per[i] = g if i not in per else per[i] + g
    return per


def _leaf_norms(an, sites, lifted, leaves, records, bdims, g_zs, kept, centres) -> dict:
    """Each rule site's certified per-example norms (`ops.Norm`, by its leaf) and the per-example
    gradients of the leaves whose sum adds them as measured (`kept`, filled in)."""
    norms: dict = {}
    cache: dict = {}
    modes = an.modes
    by_site = {id(lf.site): lf for lf in lifted}
    for site in sites:
        recs, bd, flags = _site_records(site, records, bdims)
        g, rule, lf = g_zs[site.point], _rule(site, modes), by_site.get(id(site))
        leaf = leaves[site.leaf] if site.leaf >= 0 and lf is None else None
        if rule == "dot":
            norms[site.leaf] = ops.dot_norm(site, leaf, recs[0], bd[0], flags[0], g, centres, cache)
        elif rule == "embedding":
            norms[site.leaf] = ops.embedding_norm(site, recs, bd, flags, g)
        elif site.kind == "dot_general" and site.isometric:  # materialised: centred, then kept
            per = ops.dot_per_example(site, leaf, recs[0], bd[0], flags[0], g, centres)
            if lf is None:
                kept[site.leaf] = per
                continue
            # A lifted site's `W` is a view of its leaves (a stack, a concatenation): each leaf's
            # per-example gradient is its part of `per`, kept and summed as measured.
            pulled = parts.pullback(lf.endpoint, leaves, an.plan.consts, per, batched=True)
            for i, t in zip(lf.endpoint.leaves, pulled, strict=True):
                kept[i] = t if i not in kept else kept[i] + t
        else:
            kept[site.leaf] = ops.per_example_grads(site, leaf, recs, bd, flags, g)
    for i, per in kept.items():
        norms[i] = ops.exact(per)
    return norms


def _row(v: jax.Array, x: jax.Array, bdim: int) -> jax.Array:
    """`v` (`[B]`) shaped to broadcast against `x`, whose batch axis is `bdim`."""
    return v.reshape((1,) * bdim + (-1,) + (1,) * (x.ndim - bdim - 1))


def _keep(ok: jax.Array, x: jax.Array, bdim: int = 0) -> jax.Array:
    """Rows that are not real and finite read as 0 (a select fused into the consumer; 0 * NaN is NaN)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return jnp.where(_row(ok, x, bdim), x, jnp.zeros((), x.dtype))


def _sums(an, sites, lifted, leaves, records, bdims, g_zs, kept, centres, weights, ok) -> list:
    """Each leaf's clipped sum (float32): the sites' weighted VJPs, the kept gradients' weighted sums.

    The masked records and the masked, weighted cotangents are made once and
    shared by the sites that read them (an LSTM gate's input kernel, hidden
    kernel and bias share one `G`; with one global clip factor, one weighted
    copy serves them all). A lifted site's sum is taken in its `W`'s space
    and pulled back to its leaves.
    """
    modes = an.modes
    sums: list = [None] * len(leaves)
    shared: dict = {}
    keep = lambda x, bdim: _keep(ok, x, bdim)
    by_site = {id(lf.site): lf for lf in lifted}
    for site in sites:
        if site.leaf in kept:
            continue
        recs, bd, flags = _site_records(site, records, bdims)
        rids = [r[0] for r in site.records if r is not None]
        s, w = len(site.scans), weights[site.leaf]
        if (site.point, id(w)) not in shared:
            g = keep(g_zs[site.point], s)
            shared[site.point, id(w)] = g.astype(F32) * _row(w, g, s)  # float32: see ops.weighted_sum
        wg = shared[site.point, id(w)]
        lf = by_site.get(id(site))
        leaf = None if lf is not None else leaves[site.leaf]
        if _rule(site, modes) == "dot":
            _, g_key = ops.gram_keys(site)
            ws = keep(centres[g_key], 0) * w[:, None, None]
            total = ops.dot_sum(site, leaf, recs[0], bd[0], flags[0], wg, ws, keep, centres)
        else:
            for rid, r, d in zip(rids, recs, bd, strict=True):
                if rid not in shared:
                    shared[rid] = keep(r, d)
            total = ops.weighted_sum(site, leaf, [shared[rid] for rid in rids], bd, wg)
        if lf is None:
            sums[site.leaf] = total.astype(F32)
            continue
        pulled = parts.pullback(lf.endpoint, leaves, an.plan.consts, total, batched=False)
        for i, t in zip(lf.endpoint.leaves, pulled, strict=True):
            sums[i] = t.astype(F32)
    for i, per in kept.items():
        per = keep(per.astype(F32), 0)
        sums[i] = jnp.tensordot(weights[i], per, axes=1, precision=jax.lax.Precision.HIGHEST)
    for i, t in enumerate(sums):
        if t is None:  # no gradient reaches the loss
            sums[i] = jnp.zeros(jnp.shape(leaves[i]), F32)
    return sums


def _weight(cert: jax.Array, bound: jax.Array, ok: jax.Array) -> jax.Array:
    """`min(1, bound / cert)` for the real, finite examples, 0 for the rest (a certified bound too
    large for float32 gives 0: the example cannot be clipped to the bound in float32)."""
    factor = jnp.where(cert <= bound, 1.0, bound / jnp.where(jnp.isnan(cert), jnp.inf, cert))
    return jnp.where(ok, factor, 0.0)


def _clipped_sum(loss_fn, argnums, batch_argnums, has_aux, on_plan, args, real, bounds, clip):
    """`(clipped sums, norms, aux)` of the examples in `args` (the whole batch or one microbatch)."""
    leaves, treedef = jax.tree.flatten(args[argnums])
    an = _analyse(loss_fn, args, argnums, batch_argnums, has_aux)
    on_plan(an, args)
    plan = an.plan
    examples = [x for i in batch_argnums for x in jax.tree.leaves(args[i])]
    batch = real.shape[0]
    records, bdims, g_zs, g_fb, fallback, aux = _backward(an, leaves, examples, batch)
    # Per-layer bounds need each leaf's own norm: a fused group is materialised per leaf then.
    lifted = [lf for lf in an.lifted if bounds is None or len(lf.endpoint.leaves) == 1]
    multi = [e for e in plan.endpoints if plan.kind[e.leaves[0]] == "multi"]
    multi += [lf.endpoint for lf in an.lifted if lf not in lifted]
    sites = [*plan.sites, *(lf.site for lf in lifted)]
    centres = _centres(sites, an.modes, records, bdims, g_zs)
    # The norms and the sums read the same bits: XLA could otherwise compute a bfloat16 `G` (or a
    # mean, a sum) twice, rounded or ordered differently in each consumer.
    records, g_zs, g_fb, centres = jax.lax.optimization_barrier((records, g_zs, g_fb, centres))
    kept = _multi_grads(an, multi, leaves, records, bdims, g_zs)
    for i, g in zip(fallback, g_fb, strict=True):
        kept[i] = g
    parts_ = _leaf_norms(an, sites, lifted, leaves, records, bdims, g_zs, kept, centres)
    if parts_:
        norms = _norms.combine_rows([n.est for n in parts_.values()])
        cert = _norms.combine_rows([n.cert for n in parts_.values()]) * (1.0 + ops.gamma(len(parts_) + 4))
    else:
        norms = cert = jnp.zeros((batch,), F32)
    ok = real & jnp.isfinite(norms)
    if bounds is None:  # one global factor: one weights array, so sites sharing a `G` share its copy
        weights = [_weight(cert, clip, ok)] * len(leaves)
    else:
        zero = ops.Norm(jnp.zeros((batch,), F32), jnp.zeros((batch,), F32))
        weights = [_weight(parts_.get(i, zero).cert, b, ok) for i, b in enumerate(bounds)]
    sums = _sums(an, sites, lifted, leaves, records, bdims, g_zs, kept, centres, weights, ok)
    aux = jax.tree.unflatten(an.traced.aux_tree, aux) if has_aux else None
    return treedef.unflatten(sums), norms, aux


def ghost_clipped_grad_sum(
    loss_fn: Callable[..., Any],
    argnums: int = 0,
    batch_argnums: int | Sequence[int] = 1,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
    """The clipped per-example gradient sum of `clipped_grad_sum`, by ghost norms and book-keeping.

    Same arguments, same result (`ClippedGradSum`, for `dp_aggregate` /
    `dp_adaptive_aggregate`), same semantics, for any JAX model (Flax NNX,
    Flax Linen, Equinox, plain functions): the loss of one example is
    traced to a jaxpr, and every param leaf that reaches the loss through
    one op whose other operand is per-example (a site: `dot_general`, i.e.
    dense, einsum and attention projections; `conv_general_dilated`; an
    embedding `gather`; the `mul`/`add` of a LayerNorm or RMSNorm scale, a
    bias, learned positions; inside a `scan` too, e.g. the kernels of an
    LSTM or GRU cell) takes no per-example gradient. One backward pass of
    the batched loss gives each site's output cotangents `G` per example
    (its other operand `A` is recorded on the way); each such leaf's
    per-example norm is the ghost norm `sum_{n,m} (a_n . a_m)(g_n . g_m)`
    over its positions (token equality for an embedding) or the norm of
    its per-example gradient materialised from the op's VJP, whichever
    holds less (ghost while `2 N^2 < d_in d_out`, `N` positions incl.
    scan steps; also where the Gram matrices it needs are made for other
    sites anyway and cost fewer flops, as an LSTM's input kernels beside
    its hidden ones). A ghost site's clipped sum is the op's VJP at the
    factor-weighted `G` (one matmul for a dense layer); a materialised
    site's per-example gradients are summed as measured. Layers stacked
    under a `scan` over layers (`nnx.scan` over `nnx.vmap`-built blocks,
    Linen `nn.scan`, `lax.scan` with stacked params as `xs`) and fused
    kernels (gate kernels concatenated before one dot, Linen's
    `OptimizedLSTMCell`) take the same rules per step-slice, the steps as
    weight batch dims. A leaf used at several sites (a tied embedding, a
    layer applied twice, a weight in two scan bodies), a slice of a leaf,
    or a learned initial `scan` carry has its per-example gradient
    materialised at each site and summed per example (its norm is measured
    on the very vectors its sum adds). A leaf used inside a `cond`,
    `while`, `custom_vjp` or `custom_jvp` (or by an op mixing it with the
    example in a way not listed) takes exact per-example gradients for that
    use (`jax.vmap` of the VJP, restricted to it), in the same backward
    pass, and the first call warns (a `UserWarning` naming the leaves and
    the op). `f.paths(*args)` says which leaf took which path and
    `f.explain(*args)` why.

    Args:
      loss_fn: `loss_fn(params, example, ...) -> scalar` (or `(scalar, aux)`)
        for one example, as in `clipped_grad_sum`; `params` (argument
        `argnums`) is a pytree of float arrays (for Flax NNX, the
        `nnx.Param` state: `nnx.merge(graphdef, params, rest)` inside
        `loss_fn`; for Linen `variables["params"]`; for Equinox the
        inexact-array half of `eqx.partition`).
      argnums: The one argument to differentiate (an int).
      batch_argnums: Which arguments carry the batch axis; the others are
        closed over (a Python flag among them stays static).
      has_aux: Whether `loss_fn` returns `(loss, aux)`.
      microbatch_size: Examples per sequential chunk, as in `clipped_grad_sum`
        (the batch size must be a multiple of it); each chunk's clipped sum
        is added to a float32 running sum, so the cotangents and records
        held at once scale with the chunk, not the batch. `None`: the whole
        batch at once.

    Returns:
      A function `f(*args, l2_norm_clip, mask=None)` returning a
      `ClippedGradSum` (and the per-example aux with `has_aux`), with
      `f.paths(*args) -> {parameter path: "ghost" | "materialised" |
      "per-example"}` and `f.explain(*args) -> {parameter path: "<path>:
      <why>"}`. `l2_norm_clip` is a number or per-layer bounds (a
      pytree or a callable `(path, leaf) -> bound`), as in `clipped_grad_sum`.

    Example:
      >>> import jax, jax.numpy as jnp, optaxclip
      >>> params = {"embed": jnp.ones((16, 8)) / 4, "w": jnp.ones((8, 4)) / 8, "b": jnp.zeros(4)}
      >>> def loss(p, tokens):  # one example: a sequence of tokens
      ...     h = p["embed"][tokens] @ p["w"] + p["b"][None, :]
      ...     return jnp.mean(jnp.tanh(h) ** 2)
      >>> f = optaxclip.ghost_clipped_grad_sum(loss)
      >>> tokens = jax.random.randint(jax.random.key(0), (3, 5), 0, 16)
      >>> fast = jax.jit(lambda p, t: f(p, t, l2_norm_clip=0.1))(params, tokens)
      >>> slow = optaxclip.clipped_grad_sum(loss)(params, tokens, l2_norm_clip=0.1)
      >>> print(bool(jnp.allclose(fast.norms, slow.norms, rtol=1e-5)))
      True
      >>> f.paths(params, tokens)
      {"['b']": 'materialised', "['embed']": 'ghost', "['w']": 'materialised'}
      >>> f.explain(params, tokens)["['w']"]
      'materialised: one `dot_general` site'

    Edge cases:
      Padded rows (`mask`) add exactly zero; an example with a NaN/inf
      anywhere in its loss or gradient adds exactly zero (its `A` and `G`
      rows are zeroed by a select, no data-dependent branch) and keeps a
      non-finite entry in `norms`, which `dp_aggregate` counts. Each
      example's contribution to the sum has norm <= `l2_norm_clip`
      (1 + 1e-5) for any finite input, as on the vmap path: the records
      are centred on their per-example mean (large common offsets cannot
      cancel), scaled per example by powers of two (no square overflows),
      and the clip factor comes from a certified upper bound of the norm
      with every float32 rounding error of the norm and of the sum
      (docs/ghost.md, "Numerics and the guarantee"); on badly conditioned
      inputs that bound may clip slightly more than the exact factor. An
      example whose norm overflows float32 (> 3.4e38) counts as
      non-finite and is dropped. Inside `shard_map` with replicated
      params, as `per_example_grads`. Integer and bool parameter leaves are
      refused (a `ValueError` naming their paths and dtypes), as in
      `clipped_grad_sum`. The result equals `clipped_grad_sum`'s to float32
      rounding (sums are taken in another order). Call it inside
      `jax.jit`: each eager call traces the loss again to plan the sites.

    References:
      Li et al., Large Language Models Can Be Strong Differentially Private
      Learners, 2021. https://arxiv.org/abs/2110.05679
      Bu et al., Scalable and Efficient Training of Large Convolutional Neural
      Networks with Differential Privacy (mixed ghost clipping), 2022.
      https://arxiv.org/abs/2205.10683
      Bu et al., Differentially Private Optimization on Large Model at Small
      Cost (book-keeping), 2023. https://arxiv.org/abs/2210.00038
    """
    fn = "ghost_clipped_grad_sum"
    _checks.function(fn, "loss_fn", loss_fn)
    _checks.boolean(fn, "has_aux", has_aux)
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise TypeError(f"{fn}: `argnums` must be one int (the params argument), got argnums={argnums!r}.")
    _, batch_argnums = _check_argnums(fn, argnums, batch_argnums)
    if microbatch_size is not None:
        _checks.integer_at_least(fn, "microbatch_size", microbatch_size, 1, concrete=True)  # a shape

    def _labelled(args) -> dict[str, tuple[str, str]]:
        _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, (argnums,))
        labels = _labels(_analyse(loss_fn, args, argnums, batch_argnums, has_aux))
        flat, _ = jax.tree_util.tree_flatten_with_path(args[argnums])
        return {jax.tree_util.keystr(k): labels[i] for i, (k, _) in enumerate(flat)}

    def paths(*args) -> dict[str, str]:
        return {k: path for k, (path, _) in _labelled(args).items()}

    def explain(*args) -> dict[str, str]:
        return {k: f"{path}: {why}" for k, (path, why) in _labelled(args).items()}

    warned: list = []

    def on_plan(an: _Analysis, args) -> None:
        """Warns once per function when some leaves take per-example gradients (issue 28)."""
        if warned:
            return
        warned.append(True)
        labels = _labels(an)
        slow = [i for i, (path, _) in labels.items() if path == PER_EXAMPLE]
        if not slow:
            return
        flat, _ = jax.tree_util.tree_flatten_with_path(args[argnums])
        names = ", ".join(f"{jax.tree_util.keystr(flat[i][0])} ({labels[i][1]})" for i in slow[:8])
        more = f" and {len(slow) - 8} more" if len(slow) > 8 else ""
        warnings.warn(
            f"{fn}: {len(slow)} parameter leaves take exact per-example gradients (the vmap path's "
            f"memory for them): {names}{more}. `f.explain(*args)` says why for every leaf.",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )

    def run(*args, l2_norm_clip, mask=None):
        batch = _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, (argnums,))
        args = _vary_like_batch(args, (argnums,), batch_argnums)
        bounds = _layer_bounds(fn, l2_norm_clip, args[argnums])
        clip = jnp.asarray(l2_norm_clip, F32) if bounds is None else layer_sensitivity(bounds)
        real = _row_mask(mask, batch, fn)
        chunk_sum = functools.partial(_clipped_sum, loss_fn, argnums, batch_argnums, has_aux, on_plan)
        if microbatch_size is None:
            grads, norms, aux = chunk_sum(args, real, bounds, clip)
        else:

            def body(total, chunk, chunk_real):
                part, norms, aux = chunk_sum(chunk, chunk_real, bounds, clip)
                return jax.tree.map(jnp.add, total, part), (norms, aux)

            zeros = jax.tree.map(lambda p: jnp.zeros_like(p, F32), args[argnums])
            grads, (norms, aux) = _microbatched(fn, args, batch_argnums, microbatch_size, body, zeros, real)
        result = ClippedGradSum(grads, norms, real, clip)
        return (result, aux) if has_aux else result

    run.paths = paths
    run.explain = explain
    return run
