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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks, _norms
from . import _ghost_ops as ops
from ._ghost_plan import GHOST, MATERIALISED, PER_EXAMPLE, Plan, make_plan
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


def _analyse(loss_fn, args, argnums, batch_argnums, has_aux) -> tuple[Traced, Plan, dict[int, str]]:
    """The traced loss, its plan, and each tapped leaf's mode (ghost or materialised)."""
    traced = trace_example(loss_fn, args, argnums, batch_argnums, has_aux)
    plan = make_plan(traced.jaxpr, traced.n_params)
    return traced, plan, ops.choose_modes(plan.sites)


def _backward(traced: Traced, plan: Plan, leaves: list, examples: list, batch: int):
    """One forward and one backward pass of the batched loss with the taps on.

    Returns `(records, G per perturbation, per-example grads of the fallback
    leaves, their indices, aux)`; records by id (an input record is the
    batched argument itself).
    """
    tapped = plan.tapped()
    fallback = [i for i in range(len(leaves)) if i not in tapped]
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
    for rid, r in enumerate(plan.records):
        if r.source is not None:
            records[rid] = examples[r.source]
    return records, g_zs, g_fb, fallback, aux


def _steps(scans) -> tuple[int, ...]:
    return tuple(e.params["length"] for e in scans)


def _zeros(shape, dtype, like) -> jax.Array:
    """Zeros varying over the shard_map axes the params were cast to (so the vjp keeps them per device)."""
    z = jnp.zeros(shape, dtype)  # a constant outside shard_map: XLA folds `y + 0` away, no buffer
    if like is not None:
        return z + jnp.zeros_like(jnp.ravel(like)[:1].reshape(()), dtype)
    return z


def _site_records(plan, site, records: dict) -> tuple[list, list, list]:
    """The site's record arrays, their batch axes and their step flags, in operand order."""
    used = [r for r in site.records if r is not None]
    bdims = [0 if plan.records[rid].source is not None else len(plan.records[rid].scans) for rid, _ in used]
    return [records[rid] for rid, _ in used], bdims, [flags for _, flags in used]


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


def _centres(plan, modes, records, g_zs) -> dict:
    """The dense sites' per-example record means and `G` sums (read by the norms and the sums)."""
    centres: dict = {}
    for site in plan.sites:
        if site.kind == "dot_general" and site.isometric:
            recs, bdims, flags = _site_records(plan, site, records)
            ops.dot_centres(site, recs[0], bdims[0], flags[0], g_zs[site.point], centres)
    return centres


def _leaf_norms(plan, modes, leaves, records, g_zs, g_fb, fallback, centres) -> tuple[list, dict]:
    """Each leaf's certified per-example norms (`ops.Norm`), and the per-example gradients of the
    leaves whose sum adds them as measured (`kept`)."""
    norms: list = [None] * len(leaves)
    kept: dict = {}
    cache: dict = {}
    for site in plan.sites:
        recs, bdims, flags = _site_records(plan, site, records)
        g, leaf, rule = g_zs[site.point], leaves[site.leaf], _rule(site, modes)
        if rule == "dot":
            norms[site.leaf] = ops.dot_norm(site, leaf, recs[0], bdims[0], flags[0], g, centres, cache)
        elif rule == "embedding":
            norms[site.leaf] = ops.embedding_norm(site, recs, bdims, flags, g)
        elif site.kind == "dot_general" and site.isometric:  # materialised: centred, then kept
            kept[site.leaf] = ops.dot_per_example(site, leaf, recs[0], bdims[0], flags[0], g, centres)
        else:
            kept[site.leaf] = ops.per_example_grads(site, leaf, recs, bdims, flags, g)
    for i, g in zip(fallback, g_fb, strict=True):
        kept[i] = g
    for i, per in kept.items():
        norms[i] = ops.exact(per)
    return norms, kept


def _row(v: jax.Array, x: jax.Array, bdim: int) -> jax.Array:
    """`v` (`[B]`) shaped to broadcast against `x`, whose batch axis is `bdim`."""
    return v.reshape((1,) * bdim + (-1,) + (1,) * (x.ndim - bdim - 1))


def _keep(ok: jax.Array, x: jax.Array, bdim: int = 0) -> jax.Array:
    """Rows that are not real and finite read as 0 (a select fused into the consumer; 0 * NaN is NaN)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return jnp.where(_row(ok, x, bdim), x, jnp.zeros((), x.dtype))


def _sums(plan, modes, leaves, records, g_zs, kept, centres, weights, ok) -> list:
    """Each leaf's clipped sum (float32): the sites' weighted VJPs, the kept gradients' weighted sums.

    The masked records and the masked, weighted cotangents are made once and
    shared by the sites that read them (an LSTM gate's input kernel, hidden
    kernel and bias share one `G`; with one global clip factor, one weighted
    copy serves them all).
    """
    sums: list = [None] * len(leaves)
    shared: dict = {}
    keep = lambda x, bdim: _keep(ok, x, bdim)
    for site in plan.sites:
        if site.leaf in kept:
            continue
        recs, bdims, flags = _site_records(plan, site, records)
        rids = [r[0] for r in site.records if r is not None]
        s, w = len(site.scans), weights[site.leaf]
        if (site.point, id(w)) not in shared:
            g = keep(g_zs[site.point], s)
            shared[site.point, id(w)] = g.astype(F32) * _row(w, g, s)  # float32: see ops.weighted_sum
        wg = shared[site.point, id(w)]
        if _rule(site, modes) == "dot":
            _, g_key = ops.gram_keys(site)
            ws = keep(centres[g_key], 0) * w[:, None, None]
            total = ops.dot_sum(site, leaves[site.leaf], recs[0], bdims[0], flags[0], wg, ws, keep, centres)
        else:
            for rid, r, d in zip(rids, recs, bdims, strict=True):
                if rid not in shared:
                    shared[rid] = keep(r, d)
            total = ops.weighted_sum(site, leaves[site.leaf], [shared[rid] for rid in rids], bdims, wg)
        sums[site.leaf] = total.astype(F32)
    for i, per in kept.items():
        per = keep(per.astype(F32), 0)
        sums[i] = jnp.tensordot(weights[i], per, axes=1, precision=jax.lax.Precision.HIGHEST)
    return sums


def _weight(cert: jax.Array, bound: jax.Array, ok: jax.Array) -> jax.Array:
    """`min(1, bound / cert)` for the real, finite examples, 0 for the rest (a certified bound too
    large for float32 gives 0: the example cannot be clipped to the bound in float32)."""
    factor = jnp.where(cert <= bound, 1.0, bound / jnp.where(jnp.isnan(cert), jnp.inf, cert))
    return jnp.where(ok, factor, 0.0)


def _clipped_sum(loss_fn, argnums, batch_argnums, has_aux, args, real, bounds, clip):
    """`(clipped sums, norms, aux)` of the examples in `args` (the whole batch or one microbatch)."""
    leaves, treedef = jax.tree.flatten(args[argnums])
    traced, plan, modes = _analyse(loss_fn, args, argnums, batch_argnums, has_aux)
    examples = [x for i in batch_argnums for x in jax.tree.leaves(args[i])]
    records, g_zs, g_fb, fallback, aux = _backward(traced, plan, leaves, examples, real.shape[0])
    centres = _centres(plan, modes, records, g_zs)
    # The norms and the sums read the same bits: XLA could otherwise compute a bfloat16 `G` (or a
    # mean, a sum) twice, rounded or ordered differently in each consumer.
    records, g_zs, g_fb, centres = jax.lax.optimization_barrier((records, g_zs, g_fb, centres))
    parts, kept = _leaf_norms(plan, modes, leaves, records, g_zs, g_fb, fallback, centres)
    norms = _norms.combine_rows([n.est for n in parts])
    cert = _norms.combine_rows([n.cert for n in parts]) * (1.0 + ops.gamma(len(parts) + 4))
    ok = real & jnp.isfinite(norms)
    if bounds is None:  # one global factor: one weights array, so sites sharing a `G` share its copy
        weights = [_weight(cert, clip, ok)] * len(leaves)
    else:
        weights = [_weight(n.cert, b, ok) for n, b in zip(parts, bounds, strict=True)]
    sums = _sums(plan, modes, leaves, records, g_zs, kept, centres, weights, ok)
    aux = jax.tree.unflatten(traced.aux_tree, aux) if has_aux else None
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
    site's per-example gradients are summed as measured. A leaf used twice (a tied
    embedding, a layer applied twice), used inside a `custom_jvp`, `cond`
    or `while`, or through an op not listed takes exact per-example
    gradients (`jax.vmap` of the VJP, restricted to those leaves), in the
    same backward pass. `f.paths(*args)` says which leaf took which path.

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
      "per-example"}`. `l2_norm_clip` is a number or per-layer bounds (a
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

    def paths(*args) -> dict[str, str]:
        _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, (argnums,))
        _, _, modes = _analyse(loss_fn, args, argnums, batch_argnums, has_aux)
        flat, _ = jax.tree_util.tree_flatten_with_path(args[argnums])
        return {jax.tree_util.keystr(k): modes.get(i, PER_EXAMPLE) for i, (k, _) in enumerate(flat)}

    def run(*args, l2_norm_clip, mask=None):
        batch = _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, (argnums,))
        args = _vary_like_batch(args, (argnums,), batch_argnums)
        bounds = _layer_bounds(fn, l2_norm_clip, args[argnums])
        clip = jnp.asarray(l2_norm_clip, F32) if bounds is None else layer_sensitivity(bounds)
        real = _row_mask(mask, batch, fn)
        chunk_sum = functools.partial(_clipped_sum, loss_fn, argnums, batch_argnums, has_aux)
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
    return run
