"""Which param leaf the ghost path taps where: the analysis of a normalised per-example jaxpr.

A leaf is tapped when all its uses run through one *chain* (ops on the
leaf's value and literals only: casts, reshapes, broadcasts, a constant
scale) into exactly one *site*: a `dot_general`, `conv_general_dilated`,
embedding `gather`, `mul`, `add`/`add_any` or `sub` whose other operand is
per-example (depends on the batched arguments). A leaf may enter a `scan`
as one of its constants; its site is then in the body, and the site's
output cotangent and other operand are stacked over the steps. Any other
use (two sites, a `custom_jvp`/`cond`/`while` body, a `scan` carry, a
product with another leaf) sends the leaf to the exact per-example
fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore

GHOST, MATERIALISED, PER_EXAMPLE = "ghost", "materialised", "per-example"
SITE_OPS = frozenset({"dot_general", "conv_general_dilated", "gather", "mul", "add", "add_any", "sub"})
_NO_RECORD = frozenset({"add", "add_any", "sub"})  # their weight gradient does not read the other operand
_ISOMETRIC = frozenset({"reshape", "transpose", "squeeze", "convert_element_type", "copy", "copy_p"})
_SUMS = frozenset({"add", "add_any"})


@dataclasses.dataclass(frozen=True)
class Record:
    """A value the rules read: `var` at the scope of the scans `scans` (outermost first).

    `flags[k]` says whether the site's k-th enclosing scan gives the record
    an axis (a value of the body's `xs` or computed in the body: stacked;
    one of its constants: not). `source` is the index of the jaxpr input it
    is, when it is one (then it is read from the arguments, not recorded).
    """

    var: Any
    scans: tuple
    source: int | None


@dataclasses.dataclass
class Site:
    """One tapped leaf: `eqn(..., chain(leaf), ...)` at operand `pos`, inside the scans `scans`."""

    leaf: int
    eqn: Any
    pos: int
    chain: tuple  # (eqn, operand position) from the leaf to the site operand
    scans: tuple  # the enclosing scan eqns, outermost first
    point: int = -1  # perturbation id: the site's output cotangent G
    records: tuple = ()  # per operand: (record id, flags) or None (the leaf's operand, a literal, unread)

    @property
    def kind(self) -> str:
        return self.eqn.primitive.name

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(e.params["length"] for e in self.scans)

    @property
    def isometric(self) -> bool:
        """Whether the chain keeps the norm of the gradient (reshape, transpose, cast)."""
        return all(_isometric(e) for e, _ in self.chain)


@dataclasses.dataclass
class Plan:
    sites: list[Site]
    points: dict  # var -> perturbation id
    point_shapes: list  # per perturbation id: (steps, aval)
    records: list[Record]  # per record id
    record_ids: dict  # var -> record id (recorded in the jaxpr; inputs are read directly)
    inner: dict  # id(scan eqn) -> (point ids, record ids) inside its body, however deep

    def tapped(self) -> dict[int, Site]:
        return {s.leaf: s for s in self.sites}


def _isometric(eqn) -> bool:
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
        return eqn.outvars[0].aval.size == eqn.invars[0].aval.size
    if name == "convert_element_type":
        return jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
    return name in _ISOMETRIC


class _Graph:
    """Uses and per-example dependence of every variable of a normalised jaxpr tree."""

    def __init__(self, closed, n_params: int):
        self.uses: dict = {}
        self.ex: set = set()  # depends on a batched input
        jaxpr = closed.jaxpr
        self.top = jaxpr
        self.ex.update(jaxpr.invars[n_params:])
        self._walk(jaxpr)

    def _walk(self, jaxpr) -> None:
        for v in jaxpr.outvars:
            self._use(v, None, -1)
        live = _live(jaxpr)
        for eqn in jaxpr.eqns:
            if id(eqn) not in live:
                continue
            for k, v in enumerate(eqn.invars):
                self._use(v, eqn, k)
            if eqn.primitive.name == "scan":
                self._scan(eqn)
                continue
            if any(v in self.ex for v in eqn.invars if not isinstance(v, jcore.Literal)):
                self.ex.update(eqn.outvars)

    def _use(self, v, eqn, k) -> None:
        if not isinstance(v, jcore.Literal):
            self.uses.setdefault(v, []).append((eqn, k))

    def _scan(self, eqn) -> None:
        body = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        flag = self.ex
        for _ in range(n_carry + 1):  # carries: to a fixed point
            for v, inner in zip(eqn.invars, body.invars, strict=True):
                if v in flag:
                    flag.add(inner)
            for k in range(n_carry):
                if body.outvars[k] in flag:
                    flag.add(body.invars[n_consts + k])
            self._propagate(body, flag)
        self._walk(body)
        flag.update(o for o, inner in zip(eqn.outvars, body.outvars, strict=True) if inner in flag)

    def _propagate(self, jaxpr, flag) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                body = eqn.params["jaxpr"].jaxpr
                flag.update(inner for v, inner in zip(eqn.invars, body.invars, strict=True) if v in flag)
                self._propagate(body, flag)
                flag.update(o for o, inner in zip(eqn.outvars, body.outvars, strict=True) if inner in flag)
            elif any(v in flag for v in eqn.invars if not isinstance(v, jcore.Literal)):
                flag.update(eqn.outvars)

    def static(self, v) -> bool:
        return isinstance(v, jcore.Literal)

    def only_use(self, v):
        uses = self.uses.get(v, [])
        return uses[0] if len(uses) == 1 else (None, -1)


def _live(jaxpr) -> set[int]:
    """The ids of the equations whose results reach the outputs (or that have effects)."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    live: set[int] = set()
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live.add(id(eqn))
            needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return live


def _follow(graph: _Graph, leaf: int) -> Site | None:
    """The leaf's one site, following its chain (and scan constants), or None (fallback)."""
    v, chain, scans = graph.top.invars[leaf], [], []
    while True:
        eqn, pos = graph.only_use(v)
        if eqn is None:
            return None
        name = eqn.primitive.name
        if name == "scan":
            if pos >= eqn.params["num_consts"]:
                return None
            v = eqn.params["jaxpr"].jaxpr.invars[pos]
            scans.append(eqn)
            continue
        if list(jcore.jaxprs_in_params(eqn.params)) or len(eqn.outvars) != 1:
            return None
        out = eqn.outvars[0]
        if not jnp.issubdtype(out.aval.dtype, jnp.floating):
            return None
        others = [u for k, u in enumerate(eqn.invars) if k != pos]
        if all(graph.static(u) for u in others):
            chain.append((eqn, pos))
            v = out
            continue
        if name in SITE_OPS and any(u in graph.ex for u in others) and _site_shape_ok(eqn, pos):
            return Site(leaf, eqn, pos, tuple(chain), tuple(scans))
        return None


def _site_shape_ok(eqn, pos: int) -> bool:
    if eqn.primitive.name == "gather":
        return pos == 0
    return True


def _root(graph: _Graph, v):
    """The variable whose cotangent equals `v`'s: up a chain of same-shape adds (`x W + b`)."""
    while True:
        eqn, _ = graph.only_use(v)
        if eqn is None or eqn.primitive.name not in _SUMS:
            return v
        out = eqn.outvars[0]
        if out.aval.shape != v.aval.shape or out.aval.dtype != v.aval.dtype:
            return v
        v = out


def _resolve(graph: _Graph, v, scans: tuple, n_params: int) -> tuple[Any, tuple, tuple, int | None]:
    """Where a site's operand is held: `(var, its scans, axis flags per site scan, input index)`.

    A body's `xs` or constant is the scan's operand outside (an `xs` has the
    steps as its leading axis, a constant none): no copy is recorded.
    """
    hops: list[bool] = []
    scans = list(scans)
    while scans:
        eqn = scans[-1]
        body = eqn.params["jaxpr"].jaxpr
        if v not in body.invars:
            break
        k = body.invars.index(v)
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        if n_consts <= k < n_consts + n_carry:
            break
        outer = eqn.invars[k]
        if isinstance(outer, jcore.Literal):
            break
        hops.insert(0, k >= n_consts + n_carry)
        v = outer
        scans.pop()
    source = None
    if not scans and v in graph.top.invars:
        source = graph.top.invars.index(v) - n_params
    return v, tuple(scans), tuple([True] * len(scans) + hops), source


def make_plan(closed, n_params: int) -> Plan:
    """Classifies every param leaf: a tapped site (with its perturbation and records) or the fallback."""
    graph = _Graph(closed, n_params)
    sites = [s for s in (_follow(graph, i) for i in range(n_params)) if s is not None]
    points: dict = {}
    point_shapes: list = []
    records: list[Record] = []
    record_keys: dict = {}
    for site in sites:
        root = _root(graph, site.eqn.outvars[0])
        if root not in points:
            points[root] = len(point_shapes)
            point_shapes.append((site.scans, root.aval))
        site.point = points[root]
        recs = []
        for k, u in enumerate(site.eqn.invars):
            if k == site.pos or isinstance(u, jcore.Literal) or site.kind in _NO_RECORD:
                recs.append(None)
                continue
            var, scans, flags, source = _resolve(graph, u, site.scans, n_params)
            if var not in record_keys:
                record_keys[var] = len(records)
                records.append(Record(var, scans, source))
            recs.append((record_keys[var], flags))
        site.records = tuple(recs)
    record_ids = {r.var: i for i, r in enumerate(records) if r.source is None}
    inner: dict = {}
    for pid in points.values():
        for eqn in point_shapes[pid][0]:
            inner.setdefault(id(eqn), ([], []))[0].append(pid)
    for i, r in enumerate(records):
        if r.source is None:
            for eqn in r.scans:
                inner.setdefault(id(eqn), ([], []))[1].append(i)
    return Plan(sites, points, point_shapes, records, record_ids, inner)
