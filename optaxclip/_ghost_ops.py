"""Per-op rules of the ghost path: a site's per-example norm and its clipped sum.

A site computes `op(..., chain(leaf), ...)`; its other operands `A`
(records) and its output cotangent `G` come per example, with one axis per
enclosing scan step. `G` is time-major, `[steps..., B, ...]` (as a scan
stacks its outputs: no transpose at the scan's boundary), and so is a
record made inside scans; `bdims` says where each array's batch axis is.
From them:

- the materialised per-example gradient (any site): the VJP of the site,
  vmapped over the steps and the batch;
- the ghost norm of a `dot_general` (Gram matrices over the positions) or
  an embedding `gather` (token equality), when it is the cheaper;
- the clipped sum: the VJP of the batched site at the factor-weighted `G`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from ._ghost_plan import GHOST, MATERIALISED, Site

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _bind(eqn, invals: Sequence):
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out[0] if eqn.primitive.multiple_results else out


def _f32(x):
    """Float arrays and literals as float32 (exact for every narrower float); others as they are."""
    return x.astype(F32) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x


def _apply_chain(site: Site, w, f32: bool):
    """The chain's ops on `w`; with `f32`, in float32 (float-to-float casts skipped, literals upcast).

    The sums and per-example gradients run the chain's VJP in float32: a
    cotangent rounded to a bfloat16 weight operand would move the released
    sum by a rounding error that grows with the sum, past the clip norm.
    """
    for eqn, pos in site.chain:
        cast = eqn.primitive.name == "convert_element_type"
        if f32 and cast and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
            if jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
                continue
        w = _bind(eqn, [w if k == pos else (_f32(u.val) if f32 else u.val) for k, u in enumerate(eqn.invars)])
    return w


def site_fn(site: Site, f32: bool = False) -> Callable:
    """`f(leaf, *records) -> op output` for one step of one example (the chain and the op, re-bound).

    With `f32`, the chain and the op run in float32 (see `_apply_chain`).
    """
    up = _f32 if f32 else (lambda x: x)

    def f(leaf, *recs):
        w = _apply_chain(site, up(leaf), f32)
        it = iter(recs)
        ins = []
        for k, u in enumerate(site.eqn.invars):
            if k == site.pos:
                ins.append(w)
            elif site.records[k] is not None:
                ins.append(up(next(it)))
            elif hasattr(u, "val"):  # a literal
                ins.append(up(u.val))
            else:  # an operand the weight gradient does not read (add, sub)
                ins.append(up(jnp.zeros(u.aval.shape, u.aval.dtype)))
        return _bind(site.eqn, ins)

    return f


def _stepped(site: Site, f32: bool = False) -> Callable:
    """`site_fn` vmapped over the enclosing scans' steps (records without a step axis broadcast)."""
    f = site_fn(site, f32)
    flags = [r[1] for r in site.records if r is not None]
    for k in reversed(range(len(site.scans))):
        f = jax.vmap(f, in_axes=(None, *(0 if fl[k] else None for fl in flags)), axis_size=site.steps[k])
    return f


def _chain_vjp(site: Site, leaf, cotangent: jax.Array) -> jax.Array:
    """The VJP of the site's chain at `leaf`, in float32, for a float32 `cotangent` of its output."""
    return jax.vjp(lambda w: _apply_chain(site, w, True), _f32(leaf))[1](cotangent)[0]


def _dot_spec(site: Site, bdim: int, flags: tuple) -> tuple[str, str, str]:
    """einsum terms of a dot site: its record `A`, its `G`, its weight operand (the batch letter first).

    `A` has the batch axis at `bdim` among the step axes it has (`flags`),
    `G` is `[steps..., B, out...]`; a step axis `A` lacks is summed in `G`
    first (an `A` constant over the steps).
    """
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    x_pos = 1 - site.pos
    (xc, wc), (xb, wb) = ((lc, rc), (lb, rb)) if x_pos == 0 else ((rc, lc), (rb, lb))
    x_ndim, w_ndim = site.eqn.invars[x_pos].aval.ndim, site.eqn.invars[site.pos].aval.ndim
    letters = iter(string.ascii_letters)
    steps = [next(letters) for _ in site.scans]
    batch = next(letters)
    xl, wl = [""] * x_ndim, [""] * w_ndim
    for dx, dw in zip((*xc, *xb), (*wc, *wb), strict=True):
        xl[dx] = wl[dw] = next(letters)
    xf = [d for d in range(x_ndim) if not xl[d]]
    wf = [d for d in range(w_ndim) if not wl[d]]
    for d in xf:
        xl[d] = next(letters)
    for d in wf:
        wl[d] = next(letters)
    free = [xl[d] for d in xf], [wl[d] for d in wf]
    out = [xl[d] for d in xb] + (free[0] + free[1] if x_pos == 0 else free[1] + free[0])
    present = [s for s, f in zip(steps, flags, strict=True) if f]
    a = present[:bdim] + [batch] + present[bdim:] + xl
    return "".join(a), "".join(steps + [batch] + out), batch + "".join(wl)


def per_example_grads(site: Site, leaf, recs: list, bdims: list, flags: list, g: jax.Array) -> jax.Array:
    """`[B, *leaf.shape]`: each example's gradient of the leaf (the site's VJP; one einsum for a dot)."""
    s = len(site.scans)
    if site.kind == "dot_general":
        a, gs, w = _dot_spec(site, bdims[0], flags[0])
        per = jnp.einsum(f"{a},{gs}->{w}", recs[0], g, precision=HIGHEST, preferred_element_type=F32)
        return jax.vmap(lambda x: _chain_vjp(site, leaf, x))(per) if site.chain else per
    f = _stepped(site, f32=True)

    def one(recs_b, g_b):
        return jax.vjp(lambda w: f(w, *recs_b), _f32(leaf))[1](_f32(g_b))[0]

    return jax.vmap(one, in_axes=(list(bdims), s), axis_size=g.shape[s])(recs, g)


def weighted_sum(site: Site, leaf, recs: list, bdims: list, flags: list, g: jax.Array) -> jax.Array:
    """`sum_b` of each example's gradient of the leaf at cotangents `g` (float32, weighted and masked).

    For a dot, one einsum over the batch and the positions (the weight
    gradient of the non-private backward pass, laid out as XLA prefers),
    then the chain's VJP; else the VJP of the batched site. All in float32:
    rounding the weighted `g` or the sum to a narrower weight dtype could
    move the sum by more than the clip norm per example.
    """
    s = len(site.scans)
    if site.kind == "dot_general":
        a, gs, w = _dot_spec(site, bdims[0], flags[0])
        total = jnp.einsum(f"{a},{gs}->{w[1:]}", recs[0], g, precision=HIGHEST, preferred_element_type=F32)
        return _chain_vjp(site, leaf, total) if site.chain else total
    f = jax.vmap(_stepped(site, f32=True), in_axes=(None, *bdims), out_axes=s, axis_size=g.shape[s])
    return jax.vjp(lambda w: f(w, *recs), _f32(leaf))[1](g)[0]


def _all_steps(a: jax.Array, bdim: int, flags: tuple, steps: tuple) -> jax.Array:
    """A record (batch axis at `bdim`, some steps' axes) as `[B, steps..., ...]`."""
    a = jnp.moveaxis(a, bdim, 0)
    for k, present in enumerate(flags):
        if not present:
            a = jnp.expand_dims(a, 1 + k)
    return jnp.broadcast_to(a, a.shape[:1] + steps + a.shape[1 + len(steps) :])


def _dot_dims(site: Site) -> tuple[tuple, tuple, tuple, tuple]:
    """`(x contracting, x batch, x free, out dims as [batch, x free, w free])` of a dot site."""
    (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
    x_pos = 1 - site.pos
    xc, xb = (lc, lb) if x_pos == 0 else (rc, rb)
    x_ndim = site.eqn.invars[x_pos].aval.ndim
    w_ndim = site.eqn.invars[site.pos].aval.ndim
    xf = tuple(d for d in range(x_ndim) if d not in xc and d not in xb)
    nb, n_wf = len(lb), w_ndim - len(lc) - len(lb)
    if x_pos == 0:  # out = [batch, x free, w free]
        out = tuple(range(nb + len(xf) + n_wf))
    else:  # out = [batch, w free, x free]
        out = tuple(range(nb)) + tuple(range(nb + n_wf, nb + n_wf + len(xf))) + tuple(range(nb, nb + n_wf))
    return tuple(xc), tuple(xb), xf, out


def dot_shapes(site: Site) -> tuple[int, int, int, int]:
    """`(H, N, C, F)`: weight batch size, positions (incl. steps), contracting and free sizes."""
    xc, xb, xf, _ = _dot_dims(site)
    x = site.eqn.invars[1 - site.pos].aval.shape
    size = lambda dims: math.prod(x[d] for d in dims)
    out = site.eqn.outvars[0].aval.size
    h, n, c = size(xb), size(xf) * math.prod(site.steps), size(xc)
    return h, n, c, out // max(h * size(xf), 1)


def gram_keys(site: Site) -> tuple[tuple, tuple]:
    """Keys of a dot site's two Gram matrices: sites reading one record, or one `G`, share them."""
    xc, xb, xf, out = _dot_dims(site)
    h, n, _, f = dot_shapes(site)
    rid, flags = next(r for r in site.records if r is not None)
    # The steps are in the record's key: one record read by sites in sibling scans of other lengths.
    return ("a", rid, flags, xc, xb, xf, tuple(site.steps)), ("g", site.point, out, len(xb), h, n, f)


def dot_ghost_sq(site: Site, a: jax.Array, bdim: int, flags: tuple, g, grams: dict) -> jax.Array:
    """`sum_h sum_{n,m} (a_hn . a_hm)(g_hn . g_hm)` per example (Li et al. 2021).

    The Gram matrices are cached in `grams`: an LSTM gate's input and hidden
    kernels share the Gram of its `G`, q/k/v projections the Gram of their
    input.
    """
    xc, xb, xf, out = _dot_dims(site)
    h, n, c, f = dot_shapes(site)
    s = len(site.steps)
    batch = g.shape[s]
    a_key, g_key = gram_keys(site)
    if a_key not in grams:
        a = _all_steps(a, bdim, flags, site.steps).astype(F32)
        perm = [
            0,
            *(1 + s + d for d in xb),
            *range(1, 1 + s),
            *(1 + s + d for d in xf),
            *(1 + s + d for d in xc),
        ]
        x = a.transpose(perm).reshape(batch, h, n, c)
        grams[a_key] = jnp.einsum("bhnc,bhmc->bhnm", x, x, precision=HIGHEST)
    if g_key not in grams:
        nb = len(xb)
        g = jnp.moveaxis(g, s, 0)
        perm = [0, *(1 + s + d for d in out[:nb]), *range(1, 1 + s), *(1 + s + d for d in out[nb:])]
        gm = g.astype(F32).transpose(perm).reshape(batch, h, n, f)
        grams[g_key] = jnp.einsum("bhnf,bhmf->bhnm", gm, gm, precision=HIGHEST)
    return jnp.sum(grams[a_key] * grams[g_key], axis=(1, 2, 3))


def is_embedding(site: Site) -> bool:
    """A `gather` of whole rows of the table by one index per position (`table[ids]`, `jnp.take`)."""
    if site.kind != "gather":
        return False
    dn, p = site.eqn.params["dimension_numbers"], site.eqn.params
    table, ids = site.eqn.invars[0].aval, site.eqn.invars[1].aval
    n_off = table.ndim - 1
    out_ndim = site.eqn.outvars[0].aval.ndim
    return (
        tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not dn.operand_batching_dims
        and tuple(p["slice_sizes"]) == (1, *table.shape[1:])
        and tuple(dn.offset_dims) == tuple(range(out_ndim - n_off, out_ndim))
        and ids.shape[-1:] == (1,)
    )


def embedding_ghost_sq(site: Site, ids: jax.Array, bdim: int, flags: tuple, g: jax.Array) -> jax.Array:
    """`sum_{n,m} [id_n == id_m] g_n . g_m` per example, with the gather's own index mode."""
    vocab = site.eqn.invars[0].aval.shape[0]
    s = len(site.steps)
    g, batch = jnp.moveaxis(g, s, 0), g.shape[s]
    ids = _all_steps(ids, bdim, flags, site.steps).reshape(batch, -1)
    g = g.astype(F32).reshape(batch, ids.shape[1], -1)
    if site.eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        valid = (ids >= 0) & (ids < vocab)  # out of range: read as the fill value, no gradient
    else:
        ids, valid = jnp.clip(ids, 0, vocab - 1), jnp.ones(ids.shape, bool)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return jnp.sum(jnp.where(same, jnp.einsum("bnd,bmd->bnm", g, g, precision=HIGHEST), 0.0), axis=(1, 2))


def choose_mode(site: Site) -> str:
    """Ghost norm or materialised gradient, by per-example memory (Bu et al. 2022, mixed ghost clipping).

    A dense layer's ghost norm holds two `N x N` Gram matrices per weight
    batch index, its materialised gradient `C x F`; both take about the
    same flops. An embedding's ghost norm holds `N x N`, its gradient
    `V x d`. The ghost norm needs a chain that keeps norms (a reshape, a
    transpose, a cast).
    """
    if not site.isometric:
        return MATERIALISED
    if site.kind == "dot_general":
        _, n, c, f = dot_shapes(site)
        return GHOST if 2 * n * n < c * f else MATERIALISED
    if is_embedding(site):
        table = site.eqn.invars[0].aval
        n = math.prod(site.eqn.invars[1].aval.shape[:-1]) * math.prod(site.steps)
        return GHOST if 2 * n * n < table.size else MATERIALISED
    return MATERIALISED


def choose_modes(sites: list[Site]) -> dict[int, str]:
    """Each site's mode: `choose_mode`, then a dense site turns ghost where the Gram matrices it
    still needs cost fewer flops than its materialised gradient and no more memory (an LSTM's input
    kernels: the Gram of each gate's `G` is made for its hidden kernel already; q/k/v share one)."""
    modes = {site.leaf: choose_mode(site) for site in sites}
    dots = [site for site in sites if site.kind == "dot_general" and site.isometric]
    made = {key for site in dots if modes[site.leaf] == GHOST for key in gram_keys(site)}
    for site in dots:
        if modes[site.leaf] == GHOST:
            continue
        h, n, c, f = dot_shapes(site)
        a_key, g_key = gram_keys(site)
        new = [(key, width) for key, width in ((a_key, c), (g_key, f)) if key not in made]
        flops = sum(h * n * n * width for _, width in new)
        if flops < h * n * c * f and len(new) * n * n <= c * f:
            modes[site.leaf] = GHOST
            made.update(key for key, _ in new)
    return modes
