"""The ghost path's lifted and materialised endpoints (`_ghost_plan`: `lifted` and `multi` leaves).

A *lifted* endpoint is a `dot_general` site whose weight operand `W` is an
isometric image of its leaves (concatenated kernels, a layer stacked under
a scan over layers): the site is rewritten as one `dot_general` over the
whole stack, the sliced scans' steps becoming leading weight-batch dims of
both operands, so the dense rules of `_ghost_ops` (ghost Gram norms or the
materialised einsum, certified) measure `W`'s per-example gradient `V`
(whose norm is the leaves' one); the clipped sum is the rules' sum in `W`'s
space, pulled back to the leaves by `F`'s VJP (a slice, a reshape).

A *multi* leaf (several sites, a slice, a non-isometric `F`, a cut value)
gets its per-example gradient materialised: at each endpoint, `V_e` per
example (the VJP of the site's op, vmapped over the steps, a per-step
slice of `W` for a sliced scan; a cut value's cotangent as it is), pulled
back through `F_e` and summed over the endpoints per leaf. Its norm is
measured on that float32 vector and its clipped sum adds the same vectors
weighted (the `kept` pattern), so its contribution is bounded as the vmap
path's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from . import _ghost_ops as ops
from ._ghost_plan import Endpoint, Site, evaluate_node
from ._ghost_trace import _vary
from ._per_example import _varying_axes

F32 = jnp.float32


@dataclasses.dataclass
class _Var:
    aval: Any


@dataclasses.dataclass
class _Eqn:
    """A `dot_general` equation made up for a lifted site (what the rules read of an equation)."""

    primitive: Any
    params: dict
    invars: list
    outvars: list


@dataclasses.dataclass
class Lifted:
    """A lifted endpoint: its pseudo-site and how its arrays come from the plan's."""

    endpoint: Endpoint
    site: Site
    sliced: tuple  # indices of the endpoint's scans its `W` varies over
    kept: tuple  # the other scans' indices
    record_map: dict  # lifted record id -> (plan record id, flags over the endpoint's scans)


def _lifted_aval(aval, steps: tuple):
    return aval.update(shape=(*steps, *aval.shape))


def lift(e: Endpoint, ids: dict) -> Lifted:
    """The endpoint's pseudo-site: the sliced scans' steps as leading batch dims of the dot.

    `ids` allots fresh integer ids to the lifted records and `G`s (`"records"`, `"points"`: the next
    free id of each; `"keys"`: those already allotted), so lifted sites share them as plain ones do.
    """
    eqn, pos = e.eqn, e.pos
    flags = tuple(e.sliced) + (False,) * (len(e.scans) - len(e.sliced))
    sliced = tuple(k for k, f in enumerate(flags) if f)
    kept = tuple(k for k, f in enumerate(flags) if not f)
    steps = tuple(e.scans[k].params["length"] for k in sliced)
    n = len(steps)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    shift = lambda dims: tuple(d + n for d in dims)
    dims = ((shift(lc), shift(rc)), (tuple(range(n)) + shift(lb), tuple(range(n)) + shift(rb)))
    params = {**eqn.params, "dimension_numbers": dims}
    invars = [_Var(_lifted_aval(u.aval, steps)) for u in eqn.invars]
    fake = _Eqn(eqn.primitive, params, invars, [_Var(_lifted_aval(eqn.outvars[0].aval, steps))])
    records, record_map = [], {}
    for r in e.records:
        if r is None:
            records.append(None)
            continue
        rid, rflags = r
        key = _allot(ids, "records", ("lift", rid, rflags, sliced, id(e.scans[0]) if e.scans else 0))
        record_map[key] = (rid, rflags)
        records.append((key, tuple(rflags[k] for k in kept)))
    site = Site(e.leaves[0], fake, pos, (), tuple(e.scans[k] for k in kept))
    site.point = _allot(ids, "points", ("lift", e.point, sliced))
    site.records = tuple(records)
    return Lifted(e, site, sliced, kept, record_map)


def _allot(ids: dict, kind: str, key: tuple) -> int:
    keys = ids.setdefault("keys", {})
    if key not in keys:
        keys[key] = ids[kind]
        ids[kind] += 1
    return keys[key]


def lift_g(lf: Lifted, g: jax.Array) -> jax.Array:
    """`G` `[steps..., B, out...]` as `[kept steps..., B, sliced steps..., out...]`."""
    n = len(lf.endpoint.scans)
    perm = [*lf.kept, n, *lf.sliced, *range(n + 1, g.ndim)]
    return jnp.transpose(g, perm)


def lift_record(lf: Lifted, a: jax.Array, bdim: int, rflags: tuple) -> jax.Array:
    """A record (batch axis at `bdim`, the steps `rflags` has) as `[B, kept steps it has..., sliced
    steps..., operand...]` (a record constant over a sliced scan is broadcast over its steps)."""
    a = jnp.moveaxis(a, bdim, 0)
    present = [k for k, f in enumerate(rflags) if f]
    steps = lf.endpoint.steps
    for k in lf.sliced:
        if k not in present:
            at = 1 + sum(1 for j in present if j < k)
            a = jnp.expand_dims(a, at)
            a = jnp.broadcast_to(a, (*a.shape[:at], steps[k], *a.shape[at + 1 :]))
            present = sorted([*present, k])
    order = [k for k in present if k not in lf.sliced] + list(lf.sliced)
    perm = [0, *(1 + present.index(k) for k in order), *range(1 + len(present), a.ndim)]
    return jnp.transpose(a, perm)


def pullback(e: Endpoint, leaves: list, consts: dict, cotangent: jax.Array, batched: bool) -> list:
    """`J_F^T cotangent` for each of the endpoint's leaves (float32), `cotangent` in `W`'s stacked
    space (`[B, ...]` per example with `batched`)."""
    primals = [ops._f32(leaves[i]) for i in e.leaves]

    def f(*ls):
        full = list(leaves)
        for i, v in zip(e.leaves, ls, strict=True):
            full[i] = v
        return evaluate_node(e.node, full, consts, f32=True)

    _, vjp = jax.vjp(f, *primals)
    if batched:
        return list(jax.vmap(vjp)(cotangent.astype(F32)))
    return list(vjp(cotangent.astype(F32)))


def endpoint_grads(e: Endpoint, recs: list, bdims: list, g: jax.Array) -> jax.Array:
    """`[B, W stacked...]`: each example's gradient of the endpoint's `W` (float32).

    A site: the VJP of its op (linear in `W`, so taken at `W = 0`), vmapped
    over the steps (a sliced scan's `W` per step); a cut: its cotangent,
    summed over the steps it does not vary over.
    """
    n = len(e.scans)
    flags = tuple(e.sliced) + (False,) * (n - len(e.sliced))
    if e.kind == "cut":
        g = jnp.moveaxis(g.astype(F32), n, 0)  # [B, steps..., W]
        summed = tuple(1 + k for k in range(n) if not flags[k])
        return jnp.sum(g, axis=summed) if summed else g
    w_aval = e.eqn.invars[e.pos].aval
    stacked = tuple(e.steps[k] for k in range(n) if flags[k])
    site = Site(-1, e.eqn, e.pos, (), e.scans, records=e.records)
    f = ops.site_fn(site, f32=True)
    rflags = [r[1] for r in e.records if r is not None]
    for k in reversed(range(n)):
        f = jax.vmap(
            f,
            in_axes=(0 if flags[k] else None, *(0 if fl[k] else None for fl in rflags)),
            axis_size=e.steps[k],
        )
    # `W = 0` varying over the shard_map axes `G` does (the VJP's cotangent type must match).
    zero = _vary(jnp.zeros((*stacked, *w_aval.shape), F32), frozenset(_varying_axes(g)))

    def one(recs_b, g_b):
        return jax.vjp(lambda w: f(w, *recs_b), zero)[1](ops._f32(g_b))[0]

    return jax.vmap(one, in_axes=(list(bdims), n), axis_size=g.shape[n])(recs, g)
