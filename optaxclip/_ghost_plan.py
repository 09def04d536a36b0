"""Which param leaf the ghost path taps where: the analysis of a normalised per-example jaxpr.

Every use of a param leaf is followed forward through the *param-only* part
of the graph (values computed from params, literals and constants, never
from an example): casts, reshapes, slices, concatenations with other
leaves, any elementwise op, and into `scan`s as a constant or as `xs` (a
stacked leaf sliced per step). Each path ends at an *endpoint*:

- a *site*: a `dot_general`, `conv_general_dilated`, embedding `gather`,
  `mul`, `add`/`add_any` or `sub` whose other operand is per-example; its
  weight operand `W` is a param-only value, a function `F` of some leaves
  (the endpoint's *DAG*), per step-slice of the scans the leaves entered
  as `xs`;
- a *cut*: a param-only value with a use the planner does not read (a
  `while`/`cond`/`custom_vjp` operand, a scan carry, an op mixing it with
  a per-example value, a loss output); its per-example cotangent is taken
  directly (a perturbation on it), with a reason.

A leaf's per-example gradient is `sum_e J_{F_e}^T V_e` over its endpoints
(cut values are constants in the other endpoints' DAGs, so nothing is
counted twice). Leaves are then classified (`Plan.kind`):

- `simple`: one site, reached by a chain of ops on the leaf and literals
  only, through scans as a constant: the per-op rules of `_ghost_ops`;
- `lifted`: one `dot_general` site whose `W` is an isometric image of its
  leaves (concatenated, reshaped, cast, sliced per scan step) and whose
  leaves reach nothing else: the dense rules on `W` with the sliced steps
  as weight batch dims (a fused LSTM kernel, a layer stacked under
  `nn.scan`/`nnx.scan`), pulled back to the leaves by `F`'s VJP;
- `multi`: anything else reachable (a leaf at several sites, a slice of a
  leaf, a cut): each endpoint's per-example `V_e` is materialised and
  pulled back, summed per leaf, and the leaf's sum adds the very vectors
  whose norms were measured;
- `fallback`: the leaf itself is cut: exact per-example gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

GHOST, MATERIALISED, PER_EXAMPLE = "ghost", "materialised", "per-example"
SITE_OPS = frozenset({"dot_general", "conv_general_dilated", "gather", "mul", "add", "add_any", "sub"})
_NO_RECORD = frozenset({"add", "add_any", "sub"})  # their weight gradient does not read the other operand
_ISOMETRIC = frozenset({"reshape", "transpose", "squeeze", "convert_element_type", "copy", "copy_p"})
_SUMS = frozenset({"add", "add_any"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call"})  # param-only: bound as they are, own rules
CARRY_REASON = "the initial carry of a `scan` (its per-example cotangent is taken there)"


@dataclasses.dataclass(frozen=True)
class Record:
    """A value the rules read: `var` at the scope of the scans `scans` (outermost first).

    `source` is the index of the jaxpr input it is, when it is one (then it
    is read from the arguments, not recorded).
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


# --- The DAG of a param-only value ---------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Node:
    """A param-only value as a function of the leaves.

    `op`: "leaf" (`arg` the leaf index), "lit" (`arg` a literal's value),
    "const" (`arg` a top-level constvar, its value in `Plan.consts`), "cut"
    (`arg` the cut var: a constant here, its value `children[0]`'s under a
    stop-gradient), "cross" (a scan's body input: `arg` True for an `xs`,
    its one child the outer value), "eqn" (`arg` `(eqn, output index)`).
    `flags[k]`: whether the value varies over the k-th scan of its scope
    (an axis of the stacked value, in scope order).
    """

    op: str
    arg: Any
    children: tuple
    flags: tuple


class Unresolved(Exception):
    """A value is not a function of the params alone (a carry, an example, a loop)."""


@dataclasses.dataclass
class Endpoint:
    """Where leaves' gradient is measured: a site operand or a cut value (see the module doc)."""

    kind: str  # "site" or "cut"
    var: Any  # the site's weight operand, or the cut value
    scans: tuple  # the scan eqns of `var`'s scope, outermost first
    eqn: Any = None
    pos: int = -1
    reason: str = ""
    node: Node | None = None
    leaves: tuple = ()
    point: int = -1
    records: tuple = ()  # per operand of a site, as `Site.records`

    @property
    def sliced(self) -> tuple:
        return self.node.flags

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(e.params["length"] for e in self.scans)


@dataclasses.dataclass
class Plan:
    sites: list[Site]  # the simple leaves' sites
    points: dict  # var -> perturbation id
    point_shapes: list  # per perturbation id: (scans, aval)
    records: list[Record]  # per record id
    record_ids: dict  # var -> record id (recorded in the jaxpr; inputs are read directly)
    inner: dict  # id(scan eqn) -> (point ids, record ids) inside its body, however deep
    endpoints: list = dataclasses.field(default_factory=list)  # the lifted and multi leaves' endpoints
    kind: dict = dataclasses.field(default_factory=dict)  # leaf -> simple | lifted | multi | fallback
    reasons: dict = dataclasses.field(default_factory=dict)  # leaf -> why some of it is per-example
    consts: dict = dataclasses.field(default_factory=dict)  # top constvar -> value

    def tapped(self) -> dict[int, Site]:
        return {s.leaf: s for s in self.sites}

    def fallback(self) -> list[int]:
        return sorted(i for i, k in self.kind.items() if k == "fallback")


def _isometric(eqn) -> bool:
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
        return eqn.outvars[0].aval.size == eqn.invars[0].aval.size
    if name == "convert_element_type":
        return jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
    return name in _ISOMETRIC


def _hashable(v) -> bool:
    return not isinstance(v, jcore.Literal)


class _Graph:
    """Uses, definitions, scopes and per-example dependence of every variable of a normalised jaxpr tree."""

    def __init__(self, closed, n_params: int):
        self.uses: dict = {}
        self.defs: dict = {}  # var -> (eqn, output index)
        self.binders: dict = {}  # body invar -> (scan eqn, operand index)
        self.scope: dict = {}  # var -> the scan eqns it is inside, outermost first
        self.ex: set = set()  # depends on a batched input
        jaxpr = closed.jaxpr
        self.top = jaxpr
        self.n_params = n_params
        self.ex.update(jaxpr.invars[n_params:])
        for v in (*jaxpr.invars, *jaxpr.constvars):
            self.scope[v] = ()
        self._walk(jaxpr, ())

    def _walk(self, jaxpr, scope: tuple) -> None:
        for v in jaxpr.outvars:
            self._use(v, None, -1)
        live = _live(jaxpr)
        for eqn in jaxpr.eqns:
            if id(eqn) not in live:
                continue
            for k, v in enumerate(eqn.invars):
                self._use(v, eqn, k)
            for k, o in enumerate(eqn.outvars):
                if not isinstance(o, jcore.DropVar):
                    self.defs[o] = (eqn, k)
                    self.scope[o] = scope
            if eqn.primitive.name == "scan":
                self._scan(eqn, scope)
                continue
            if any(v in self.ex for v in eqn.invars if _hashable(v)):
                self.ex.update(eqn.outvars)

    def _use(self, v, eqn, k) -> None:
        if _hashable(v):
            self.uses.setdefault(v, []).append((eqn, k))

    def _scan(self, eqn, scope: tuple) -> None:
        body = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        for k, inner in enumerate(body.invars):
            self.binders[inner] = (eqn, k)
            self.scope[inner] = (*scope, eqn)
        flag = self.ex
        for _ in range(n_carry + 1):  # carries: to a fixed point
            for v, inner in zip(eqn.invars, body.invars, strict=True):
                if _hashable(v) and v in flag:
                    flag.add(inner)
            for k in range(n_carry):
                out = body.outvars[k]
                if _hashable(out) and out in flag:
                    flag.add(body.invars[n_consts + k])
            self._propagate(body, flag)
        self._walk(body, (*scope, eqn))
        flag.update(
            o
            for o, inner in zip(eqn.outvars, body.outvars, strict=True)
            if _hashable(inner) and inner in flag
        )

    def _propagate(self, jaxpr, flag) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                body = eqn.params["jaxpr"].jaxpr
                flag.update(
                    inner
                    for v, inner in zip(eqn.invars, body.invars, strict=True)
                    if _hashable(v) and v in flag
                )
                self._propagate(body, flag)
                flag.update(
                    o
                    for o, inner in zip(eqn.outvars, body.outvars, strict=True)
                    if _hashable(inner) and inner in flag
                )
            elif any(v in flag for v in eqn.invars if _hashable(v)):
                flag.update(eqn.outvars)

    def static(self, v) -> bool:
        return isinstance(v, jcore.Literal)

    def only_use(self, v):
        uses = self.uses.get(v, [])
        return uses[0] if len(uses) == 1 else (None, -1)

    # --- param-only values ---

    def node(self, v, cuts: dict, memo: dict) -> Node:
        """`v`'s DAG (cut values other than `v` itself become constants); `Unresolved` if it is not
        a function of the params alone."""
        if isinstance(v, jcore.Literal):
            return Node("lit", v.val, (), ())
        if v in memo:
            return memo[v]
        scope = self.scope.get(v)
        if scope is None or v in self.ex:
            raise Unresolved(v)
        if v in cuts and cuts[v] is not memo.get("__root__"):
            inner = self.node(v, {}, {})  # its value: the DAG without cuts (a constant here)
            n = Node("cut", v, (inner,), inner.flags)
        elif v in self.binders:
            eqn, k = self.binders[v]
            n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            if n_consts <= k < n_consts + n_carry:
                raise Unresolved(v)
            outer = self.node(eqn.invars[k], cuts, memo)
            xs = k >= n_consts + n_carry
            n = Node("cross", xs, (outer,), (*_pad(outer.flags, len(scope) - 1), xs))
        elif v in self.defs:
            eqn, k = self.defs[v]
            name = eqn.primitive.name
            if name == "scan" or (list(jcore.jaxprs_in_params(eqn.params)) and name not in _CUSTOM):
                raise Unresolved(v)
            children = tuple(self.node(u, cuts, memo) for u in eqn.invars)
            flags = tuple(any(f) for f in zip(*(_pad(c.flags, len(scope)) for c in children), strict=True))
            n = Node("eqn", (eqn, k), children, flags if children else (False,) * len(scope))
        elif scope == () and v in self.top.invars:
            i = self.top.invars.index(v)
            if i >= self.n_params:
                raise Unresolved(v)
            n = Node("leaf", i, (), ())
        elif scope == () and v in self.top.constvars:
            n = Node("const", v, (), ())  # its value is read from the plan's consts
        else:
            raise Unresolved(v)
        memo[v] = n
        return n

    def resolvable(self, v, memo: dict) -> bool:
        try:
            self.node(v, {}, memo)
            return True
        except Unresolved:
            return False


def _pad(flags: tuple, n: int) -> tuple:
    return tuple(flags) + (False,) * (n - len(flags))


def leaves_of(node: Node) -> tuple[int, ...]:
    """The leaves a DAG reads with a gradient (not through a cut), in order."""
    out: dict = {}
    seen: set = set()

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        if n.op == "leaf":
            out[n.arg] = None
        elif n.op != "cut":
            for c in n.children:
                visit(c)

    visit(node)
    return tuple(out)


def _live(jaxpr) -> set[int]:
    """The ids of the equations whose results reach the outputs (or that have effects)."""
    needed = {v for v in jaxpr.outvars if _hashable(v)}
    live: set[int] = set()
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live.add(id(eqn))
            needed.update(v for v in eqn.invars if _hashable(v))
    return live


def _site_shape_ok(eqn, pos: int) -> bool:
    if eqn.primitive.name == "gather":
        return pos == 0
    return True


def _explore(graph: _Graph, leaf: int, memo: dict) -> tuple[dict, dict]:
    """Every use of the leaf, followed through the param-only graph: `(sites, cuts)`, sites keyed by
    `(id(eqn), pos)` -> `(eqn, pos)`, cuts by var -> reason."""
    sites: dict = {}
    cuts: dict = {}
    stack, seen = [graph.top.invars[leaf]], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        found, nxt, problem = {}, [], None
        for eqn, k in graph.uses.get(v, []):
            if eqn is None:
                problem = "an output of the loss or of a `scan` body"
                break
            name = eqn.primitive.name
            if name == "scan":
                n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
                if n_consts <= k < n_consts + n_carry:
                    problem = CARRY_REASON
                    break
                nxt.append(eqn.params["jaxpr"].jaxpr.invars[k])
                continue
            others = [u for j, u in enumerate(eqn.invars) if j != k]
            custom = name in _CUSTOM and not any(_hashable(u) and u in graph.ex for u in others)
            if list(jcore.jaxprs_in_params(eqn.params)) and not custom:
                problem = f"`{name}` (an op with a sub-jaxpr the planner does not enter)"
                break
            if any(_hashable(u) and u in graph.ex for u in others):
                out = eqn.outvars[0]
                if (
                    name in SITE_OPS
                    and len(eqn.outvars) == 1
                    and jnp.issubdtype(out.aval.dtype, jnp.floating)
                    and _site_shape_ok(eqn, k)
                ):
                    found[id(eqn), k] = (eqn, k)
                    continue
                problem = f"`{name}` with a per-example operand"
                break
            if not all(graph.resolvable(u, memo) for u in others):
                problem = f"`{name}` with an operand computed in a loop"
                break
            nxt.extend(
                o
                for o in eqn.outvars
                if not isinstance(o, jcore.DropVar) and jnp.issubdtype(o.aval.dtype, jnp.inexact)
            )
        if problem is not None:
            cuts[v] = problem
            continue
        sites.update(found)
        stack.extend(nxt)
    return sites, cuts


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


def _simple_chain(node: Node, leaf: int) -> tuple | None:
    """The `(eqn, pos)` chain of a DAG that is the leaf through ops with literal others and scan
    constants only (the `simple` rules' input), or None."""
    chain: list = []
    while node.op != "leaf":
        if node.op == "cross":
            if node.arg:
                return None
            node = node.children[0]
            continue
        if node.op != "eqn":
            return None
        eqn, k = node.arg
        if len(eqn.outvars) != 1:
            return None
        moving = [j for j, c in enumerate(node.children) if c.op != "lit"]
        if len(moving) != 1 or not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            return None
        chain.append((eqn, moving[0]))
        node = node.children[moving[0]]
    return tuple(reversed(chain)) if node.arg == leaf else None


def is_isometric_dag(node: Node) -> bool:
    """Whether `W = F(leaves)` keeps norms: each leaf read once, through concatenations, reshapes,
    transposes, float casts and scan crossings, every operand of an op varying over the same steps."""
    seen: set = set()

    def ok(n) -> bool:
        if n.op == "leaf":
            if n.arg in seen:
                return False
            seen.add(n.arg)
            return True
        if n.op == "cross":
            return ok(n.children[0])
        if n.op != "eqn":
            return False
        eqn, _ = n.arg
        name = eqn.primitive.name
        if name != "concatenate" and not (_isometric(eqn) and len(n.children) == 1):
            return False
        if len({c.flags for c in n.children}) != 1:
            return False
        return all(ok(c) for c in n.children)

    return ok(node)


def make_plan(closed, n_params: int) -> Plan:
    """Classifies every param leaf (simple, lifted, multi, fallback) with its endpoints, perturbations
    and records."""
    graph = _Graph(closed, n_params)
    memo: dict = {}
    site_keys: dict = {}
    cuts: dict = {}
    for i in range(n_params):
        sites, leaf_cuts = _explore(graph, i, memo)
        site_keys.update(sites)
        for v, why in leaf_cuts.items():
            cuts.setdefault(v, why)
    kind: dict = {}
    reasons: dict = {}
    top_cuts = {graph.top.invars.index(v): why for v, why in cuts.items() if v in graph.top.invars[:n_params]}
    for i, why in top_cuts.items():
        kind[i], reasons[i] = "fallback", why
    cut_ids = {v: object() for v in cuts}
    endpoints: list[Endpoint] = []
    for eqn, pos in site_keys.values():
        v = eqn.invars[pos]
        m = {"__root__": cut_ids.get(v)}
        node = graph.node(v, cut_ids, m)
        endpoints.append(Endpoint("site", v, graph.scope[v], eqn, pos, node=node))
    for v, why in cuts.items():
        if v in graph.top.invars[:n_params]:
            continue
        m = {"__root__": cut_ids[v]}
        node = graph.node(v, cut_ids, m)
        endpoints.append(Endpoint("cut", v, graph.scope[v], reason=why, node=node))
    per_leaf: dict = {}
    for e in endpoints:
        e.leaves = tuple(i for i in leaves_of(e.node) if i not in top_cuts)
        for i in e.leaves:
            per_leaf.setdefault(i, []).append(e)
    simple: list[Site] = []
    rest: list[Endpoint] = []
    for e in endpoints:
        if not e.leaves:
            continue
        alone = all(len(per_leaf[i]) == 1 for i in e.leaves)
        chain = _simple_chain(e.node, e.leaves[0]) if e.kind == "site" and len(e.leaves) == 1 else None
        if alone and chain is not None:
            simple.append(Site(e.leaves[0], e.eqn, e.pos, chain, e.scans))
            kind[e.leaves[0]] = "simple"
            continue
        lifted = alone and e.kind == "site" and e.eqn.primitive.name == "dot_general"
        lifted = lifted and is_isometric_dag(e.node)
        for i in e.leaves:
            kind[i] = "lifted" if lifted else "multi"
            if e.kind == "cut" and e.reason != CARRY_REASON:
                reasons.setdefault(i, e.reason)
        rest.append(e)
    for i in range(n_params):
        kind.setdefault(i, "unused")
    plan = Plan(simple, {}, [], [], {}, {}, rest, kind, reasons)
    plan.consts = dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    _taps(graph, plan, n_params)
    return plan


def _taps(graph: _Graph, plan: Plan, n_params: int) -> None:
    """The perturbation points (site outputs, cut values) and the records of every site."""
    record_keys: dict = {}

    def point(v, scans) -> int:
        if v not in plan.points:
            plan.points[v] = len(plan.point_shapes)
            plan.point_shapes.append((scans, v.aval))
        return plan.points[v]

    def records(eqn, pos, scans) -> tuple:
        recs = []
        for k, u in enumerate(eqn.invars):
            if k == pos or isinstance(u, jcore.Literal) or eqn.primitive.name in _NO_RECORD:
                recs.append(None)
                continue
            var, rscans, flags, source = _resolve(graph, u, scans, n_params)
            if var not in record_keys:
                record_keys[var] = len(plan.records)
                plan.records.append(Record(var, rscans, source))
            recs.append((record_keys[var], flags))
        return tuple(recs)

    for site in plan.sites:
        site.point = point(_root(graph, site.eqn.outvars[0]), site.scans)
        site.records = records(site.eqn, site.pos, site.scans)
    for e in plan.endpoints:
        if e.kind == "site":
            e.point = point(_root(graph, e.eqn.outvars[0]), e.scans)
            e.records = records(e.eqn, e.pos, e.scans)
        else:
            e.point = point(e.var, e.scans)
    plan.record_ids = {r.var: i for i, r in enumerate(plan.records) if r.source is None}
    for pid in plan.points.values():
        for eqn in plan.point_shapes[pid][0]:
            plan.inner.setdefault(id(eqn), ([], []))[0].append(pid)
    for i, r in enumerate(plan.records):
        if r.source is None:
            for eqn in r.scans:
                plan.inner.setdefault(id(eqn), ([], []))[1].append(i)


# --- Evaluating a DAG ----------------------------------------------------------------------------


def _f32(x):
    return x.astype(jnp.float32) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x


def evaluate_node(node: Node, leaves: list, consts: dict, f32: bool = False):
    """The stacked value of a DAG (leading axes: the scans it varies over, in scope order).

    With `f32`, float values are float32 and float-to-float casts are skipped
    (the pullbacks run in float32, as `_ghost_ops`' chains do).
    """
    cache: dict = {}

    def ev(n):
        if id(n) in cache:
            return cache[id(n)]
        if n.op == "leaf":
            out = leaves[n.arg]
            out = _f32(out) if f32 else out
        elif n.op in ("lit", "const"):
            val = consts[n.arg] if n.op == "const" else n.arg
            out = _f32(jnp.asarray(val)) if f32 else val
        elif n.op == "cut":
            out = jax.lax.stop_gradient(ev(n.children[0]))
        elif n.op == "cross":
            out = ev(n.children[0])
        else:
            eqn, k = n.arg
            vals = [ev(c) for c in n.children]
            out = _bind_stacked(eqn, vals, [c.flags for c in n.children], n.flags, f32)[k]
        cache[id(n)] = out
        return out

    return ev(node)


def _bind_stacked(eqn, vals: list, flags: list, out_flags: tuple, f32: bool) -> list:
    """`eqn` on operands stacked over the scans in `flags` (vmapped where an operand varies)."""
    depth = len(out_flags)
    flags = [_pad(f, depth) for f in flags]

    def bind(*xs):
        if f32 and eqn.primitive.name == "convert_element_type":
            if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating) and jnp.issubdtype(
                jnp.result_type(xs[0]), jnp.floating
            ):
                return [xs[0]]
        params = eqn.primitive.get_bind_params(eqn.params)
        out = eqn.primitive.bind(*xs, **params)
        return list(out) if eqn.primitive.multiple_results else [out]

    f = bind
    for k in reversed(range(depth)):
        if not out_flags[k]:
            continue
        axes = [0 if fl[k] else None for fl in flags]
        f = jax.vmap(f, in_axes=axes)
    return f(*vals)
