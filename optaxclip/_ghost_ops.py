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

import dataclasses
import math
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from . import _norms
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


# --- Rounding-error bounds (docs/ghost.md, "Numerics and the guarantee") ---------------------------

U = 2.0**-24  # float32's unit roundoff


def gamma(n: int) -> float:
    """`n u / (1 - n u)`: the relative bound of a float32 sum or inner product of `n` terms, any order."""
    return n * U / (1.0 - n * U)


def _margin(*ns: int) -> float:
    """A factor covering the float32 rounding of the bounds themselves (sums of non-negative terms)."""
    return 1.0 + 4.0 * gamma(max(ns) + 8)


@dataclasses.dataclass(frozen=True)
class Norm:
    """A leaf part's per-example norms `[B]` (float32).

    `est` estimates `||V_b||`, the norm of the vector the rules define for
    example `b` (reported as the example's norm); `cert` bounds, for any
    finite input, the norm of what the clipped sum adds for `b` divided by
    `b`'s clip factor: the norm of `V_b` plus every float32 rounding error
    of the norm and of the sum. The clip factor is taken from `cert`.
    """

    est: jax.Array
    cert: jax.Array


def exact(per: jax.Array) -> Norm:
    """The norms of per-example gradients `[B, ...]` that the sum adds as they are (`est == cert`)."""
    n = _norms.row_norms(per)
    return Norm(n, n)


def _scaled(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(rows * 2**-k, k)`: each example's rows (axis 0 the batch) scaled by an exact power of two so
    that the largest entry is in [0.5, 1): no square, Gram entry or product of them overflows."""
    k = _norms.exponent(jnp.max(jnp.abs(rows), axis=tuple(range(1, rows.ndim))))
    return rows * _rows(_norms.pow2(-k), rows), k


def _rows(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _unscale(x: jax.Array, *ks: jax.Array) -> jax.Array:
    """`x * 2**sum(ks)`, one exact power of two at a time (inf where the result overflows)."""
    for k in ks:
        x = x * _norms.pow2(k)
    return x


def _certify(sq: jax.Array, err: jax.Array, p: jax.Array, sum_gamma: float, margin: float) -> jax.Array:
    """The certified bound of a ghost norm: `||V||^2 <= sq + err` (`sq` the float32 Gram sum, `err`
    its rounding bound) and `||V|| <= P = sum_n |x_n||g_n|`; the clipped sum adds its own rounding,
    `sum_gamma P`."""
    cert_v = jnp.minimum(jnp.sqrt(jnp.maximum(sq + err, 0.0)) * (1.0 + 2 * U), margin * p)
    return ((1.0 + 2 * U) * cert_v + sum_gamma * margin * p) * (1.0 + 2 * U)


def _two_stage(*terms: jax.Array) -> list[jax.Array]:
    """Each `[B, H, N, M]` term summed over `M`, then over `H, N`: `[B]` each. (The bounds count all
    `H N M` terms, as if in one sum of any order: XLA:CPU expands the barrier before fusion, and may
    merge the two reductions; where it does not, the two stages round less.)"""
    rows = jax.lax.optimization_barrier([jnp.sum(t, axis=-1) for t in terms])
    return [jnp.sum(r, axis=(1, 2)) for r in rows]


# --- Dense (dot_general) sites -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DotLayout:
    """einsum terms of a dot site (the batch letter first where there is one) and its Gram layout.

    `a`: the record `A` (the batch axis at `bdim` among the step axes it
    has); `g`: `G`, `[steps..., B, out...]` (a step axis `A` lacks is summed
    in `G` first: an `A` constant over the steps); `w`: the weight operand;
    `mu`: the per-example mean of `A` over its positions `[B, xb..., xc...]`;
    `s`: the per-example sum of `G` over its positions `[B, xb..., wf...]`.
    """

    a: str
    g: str
    w: str
    mu: str
    s: str


def dot_layout(site: Site, bdim: int, flags: tuple) -> DotLayout:
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
    hb = "".join(xl[d] for d in xb)
    return DotLayout(
        a="".join(a),
        g="".join(steps + [batch] + out),
        w=batch + "".join(wl),
        mu=batch + hb + "".join(xl[d] for d in xc),
        s=batch + hb + "".join(free[1]),
    )


def _expand(x: jax.Array, src: str, dst: str) -> jax.Array:
    """`x` (einsum letters `src`, a subset of `dst`) laid out to broadcast against `dst`'s array."""
    order = [c for c in dst if c in src]
    x = jnp.transpose(x, [src.index(c) for c in order])
    shape, it = [], iter(x.shape)
    for c in dst:
        shape.append(next(it) if c in src else 1)
    return x.reshape(shape)


def _gram_a(site: Site, a: jax.Array, bdim: int, flags: tuple) -> jax.Array:
    """A record as float32 `[B, H, N, C]`: weight batch, positions (incl. every step), contracting."""
    xc, xb, xf, _ = _dot_dims(site)
    h, n, c, _ = dot_shapes(site)
    s = len(site.steps)
    a = _all_steps(a, bdim, flags, site.steps).astype(F32)
    perm = [0, *(1 + s + d for d in xb), *range(1, 1 + s), *(1 + s + d for d in xf), *(1 + s + d for d in xc)]
    return a.transpose(perm).reshape(a.shape[0], h, n, c)


def _gram_g(site: Site, g: jax.Array) -> jax.Array:
    """A site's `G` as float32 `[B, H, N, F]`."""
    xc, xb, xf, out = _dot_dims(site)
    h, n, _, f = dot_shapes(site)
    s, nb = len(site.steps), len(xb)
    batch = g.shape[s]
    g = jnp.moveaxis(g, s, 0)
    perm = [0, *(1 + s + d for d in out[:nb]), *range(1, 1 + s), *(1 + s + d for d in out[nb:])]
    return g.astype(F32).transpose(perm).reshape(batch, h, n, f)


def dot_centres(site: Site, a: jax.Array, bdim: int, flags: tuple, g: jax.Array, centres: dict) -> None:
    """Adds to `centres` the site's per-example mean record `mu` `[B, H, C]` and `G` sum `s` `[B, H, F]`.

    Any `mu` makes `V = sum_n (a_n - mu) g_n^T + mu s^T` the site's
    per-example gradient; the mean makes the first term small when the
    positions share a large offset (raw pixels, timestamps, an adversary's
    `3000 + noise`), where the uncentred Gram sum cancels catastrophically
    in float32. The norms and the sums must read these very arrays (the
    caller passes them through the same barrier as `A` and `G`).
    """
    a_key, g_key = gram_keys(site)
    if a_key not in centres:
        centres[a_key] = jnp.mean(_gram_a(site, a, bdim, flags), axis=2)
    if g_key not in centres:
        centres[g_key] = jnp.sum(_gram_g(site, g), axis=2)


def _centred_a(site: Site, a: jax.Array, bdim: int, flags: tuple, mu: jax.Array, lay: DotLayout):
    """The record minus its mean, in its own layout (float32; the same bits as the Gram layout's)."""
    xc, xb, _, _ = _dot_dims(site)
    x = site.eqn.invars[1 - site.pos].aval.shape
    mu = mu.reshape(mu.shape[0], *(x[d] for d in xb), *(x[d] for d in xc))
    return a.astype(F32) - _expand(mu, lay.mu, lay.a), mu


def _s_native(site: Site, s: jax.Array) -> jax.Array:
    """`G`'s per-example sums `[B, H, F]` as `[B, out batch dims..., w free dims...]` (`DotLayout.s`)."""
    _, xb, xf, out = _dot_dims(site)
    o = site.eqn.outvars[0].aval.shape
    dims = out[: len(xb)] + out[len(xb) + len(xf) :]
    return s.reshape(s.shape[0], *(o[d] for d in dims))


def _rows_and_scale(site, a, bdim, flags, g, centres, cache):
    """Scaled Gram-layout rows of the centred record (the mean as an extra row) and of `G` (the sum
    as the extra row), their exponents and row norms; cached per record / per `G`."""
    a_key, g_key = gram_keys(site)
    if ("rows", a_key) not in cache:
        mu = centres[a_key]
        x = _gram_a(site, a, bdim, flags) - mu[:, :, None, :]
        xs, kx = _scaled(jnp.concatenate([x, mu[:, :, None, :]], axis=2))
        cache["rows", a_key] = xs, kx, jnp.sqrt(jnp.sum(jnp.square(xs), axis=-1))
    if ("rows", g_key) not in cache:
        gm = jnp.concatenate([_gram_g(site, g), centres[g_key][:, :, None, :]], axis=2)
        gs, kg = _scaled(gm)
        cache["rows", g_key] = gs, kg, jnp.sqrt(jnp.sum(jnp.square(gs), axis=-1))
    return cache["rows", a_key], cache["rows", g_key]


def dot_norm(site: Site, leaf, a, bdim: int, flags: tuple, g, centres: dict, cache: dict) -> Norm:
    """A dense site's certified per-example norms, ghost (Gram matrices) or materialised.

    Rows: the centred record's positions plus its mean (`x_n`, `n <= N`),
    `G`'s positions plus its sum (`g_n`); `V = sum_n x_n g_n^T`. Ghost:
    `S = sum_h sum_{n,m} (x_n . x_m)(g_n . g_m)` from float32 Gram matrices,
    and its rounding error bounded by the computed
    `gamma_C sum a_n a_m |Gg_nm| + gamma_F sum b_n b_m |Ga_nm| + gamma_r sum |Ga_nm Gg_nm|`
    (`a_n = |x_n|`, `b_n = |g_n|`); materialised: the einsum per example,
    within `gamma_N P` of `V` (`P = sum_n a_n b_n`). Both add the sum's own
    rounding, `gamma_N P`. Rows are scaled per example by powers of two,
    so no finite example overflows.
    """
    (xs, kx, alpha), (gs, kg, beta) = _rows_and_scale(site, a, bdim, flags, g, centres, cache)
    h, n, c, f = dot_shapes(site)
    rows = n + 1
    length = rows + 4  # a sum's terms per example: positions, the mean row, weighting and the add
    p = jnp.sum(alpha * beta, axis=(1, 2))  # >= ||V||, scaled
    margin = _margin(c, f, h * rows * rows)
    a_key, g_key = gram_keys(site)
    for key, x in ((a_key, xs), (g_key, gs)):
        if ("gram", key) not in cache:
            cache["gram", key] = jnp.einsum("bhnc,bhmc->bhnm", x, x, precision=HIGHEST)
    ga, gg = cache["gram", a_key], cache["gram", g_key]
    outer = lambda v: v[..., :, None] * v[..., None, :]
    # The three error sums as one (non-negative terms, so one sum of their weighted total bounds
    # theirs): one more pass over the Gram matrices, not three.
    prod = ga * gg
    err_terms = (
        gamma(c + 2) * outer(alpha) * jnp.abs(gg)
        + gamma(f + 2) * outer(beta) * jnp.abs(ga)
        + gamma(h * rows * rows + 2) * jnp.abs(prod)  # any order: XLA may merge the two stages
    )
    s, err = _two_stage(prod, err_terms)
    err = margin * (err + 3 * gamma(c + 2) * gamma(f + 2) * p * p)
    cert = _certify(s, err, p, gamma(length), margin)
    est = jnp.sqrt(jnp.maximum(s, 0.0))
    return Norm(_unscale(est, kx, kg), _unscale(cert, kx, kg))


def dot_per_example(site: Site, leaf, a, bdim: int, flags: tuple, g, centres: dict) -> jax.Array:
    """`[B, *leaf.shape]`: each example's `V` (centred record einsum plus the rank-1 mean term)."""
    lay = dot_layout(site, bdim, flags)
    a_key, g_key = gram_keys(site)
    xa, mu = _centred_a(site, a, bdim, flags, centres[a_key], lay)
    s = _s_native(site, centres[g_key])
    per = jnp.einsum(f"{lay.a},{lay.g}->{lay.w}", xa, g.astype(F32), precision=HIGHEST)
    per = per + jnp.einsum(f"{lay.mu},{lay.s}->{lay.w}", mu, s, precision=HIGHEST)
    return jax.vmap(lambda x: _chain_vjp(site, leaf, x))(per) if site.chain else per


def dot_sum(site: Site, leaf, a, bdim: int, flags: tuple, wg, ws, keep, centres: dict) -> jax.Array:
    """The clipped sum of a dense site: `sum_b w_b V_b` as one einsum over the batch and positions
    (the non-private weight gradient's matmul) plus the rank-1 mean terms, then the chain's VJP.

    `wg` is the weighted, masked `G` (float32), `ws` the weighted, masked
    `G` sums `[B, H, F]`; `keep(x, bdim)` zeroes the rows that are not real and finite.
    """
    lay = dot_layout(site, bdim, flags)
    a_key, _ = gram_keys(site)
    xa, mu = _centred_a(site, a, bdim, flags, centres[a_key], lay)
    total = jnp.einsum(f"{lay.a},{lay.g}->{lay.w[1:]}", keep(xa, bdim), wg, precision=HIGHEST)
    ws = _s_native(site, ws)
    total = total + jnp.einsum(f"{lay.mu},{lay.s}->{lay.w[1:]}", keep(mu, 0), ws, precision=HIGHEST)
    return _chain_vjp(site, leaf, total) if site.chain else total


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


# --- Embedding (gather) sites --------------------------------------------------------------------


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


def embedding_norm(site: Site, recs, bdims, flags, g) -> Norm:
    """An embedding's certified per-example norms: ghost `sum_{n,m} [id_n == id_m] g_n . g_m` (with
    the gather's own index mode) or the materialised scatter; `V` is each row's sum of its positions'
    `g_n`, so `P = sum_n |g_n|` (valid ids) bounds it and every rounding is within `gamma P`."""
    vocab = site.eqn.invars[0].aval.shape[0]
    s = len(site.steps)
    batch = g.shape[s]
    ids = _all_steps(recs[0], bdims[0], flags[0], site.steps).reshape(batch, -1)
    n = ids.shape[1]
    gm, kg = _scaled(jnp.moveaxis(g, s, 0).astype(F32).reshape(batch, n, -1))
    if site.eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
        valid = (ids >= 0) & (ids < vocab)  # out of range: read as the fill value, no gradient
    else:
        ids, valid = jnp.clip(ids, 0, vocab - 1), jnp.ones(ids.shape, bool)
    beta = jnp.where(valid, jnp.sqrt(jnp.sum(jnp.square(gm), axis=-1)), 0.0)
    p = jnp.sum(beta, axis=1)
    d = gm.shape[-1]
    margin = _margin(d, n * n)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gg = jnp.where(same, jnp.einsum("bnd,bmd->bnm", gm, gm, precision=HIGHEST), 0.0)
    outer = jnp.where(same, beta[:, :, None] * beta[:, None, :], 0.0)
    sq, err = _two_stage(gg[:, None], (gamma(d + 2) * outer + gamma(n * n + 2) * jnp.abs(gg))[:, None])
    err = margin * err
    cert = _certify(sq, err, p, gamma(n + 4), margin)
    return Norm(_unscale(jnp.sqrt(jnp.maximum(sq, 0.0)), kg), _unscale(cert, kg))


# --- Every site: the VJP rules -------------------------------------------------------------------


def per_example_grads(site: Site, leaf, recs: list, bdims: list, flags: list, g: jax.Array) -> jax.Array:
    """`[B, *leaf.shape]`: each example's gradient of the leaf (the VJP of the site and its chain)."""
    s = len(site.scans)
    f = _stepped(site, f32=True)

    def one(recs_b, g_b):
        return jax.vjp(lambda w: f(w, *recs_b), _f32(leaf))[1](_f32(g_b))[0]

    return jax.vmap(one, in_axes=(list(bdims), s), axis_size=g.shape[s])(recs, g)


def weighted_sum(site: Site, leaf, recs: list, bdims: list, g: jax.Array) -> jax.Array:
    """`sum_b` of each example's gradient of the leaf at the weighted, masked cotangents `g` (float32):
    the VJP of the batched site (one scatter-add for an embedding, one conv for a kernel)."""
    s = len(site.scans)
    f = jax.vmap(_stepped(site, f32=True), in_axes=(None, *bdims), out_axes=s, axis_size=g.shape[s])
    return jax.vjp(lambda w: f(w, *recs), _f32(leaf))[1](g)[0]


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
