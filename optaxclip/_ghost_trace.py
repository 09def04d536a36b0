"""The ghost path's view of a loss: its jaxpr, normalised, and an interpreter that taps it.

`trace_example` traces the loss of one example to a jaxpr whose inputs are
the param leaves and the leaves of the batched arguments (the other
arguments are closed over). `normalise` re-traces it with every call
(`jit`, `closed_call`, `core_call`, `checkpoint`) inlined and every `scan`
body normalised in turn, so that one flat jaxpr per scope remains and each
of its variables is defined once in the whole tree. `evaluate` runs a
normalised jaxpr again, under whatever JAX transformation is tracing it,
adding a perturbation to the chosen variables and recording others; inside
a `scan` the perturbations come in as extra `xs` (one per step) and the
records go out as extra `ys` (stacked over the steps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ._per_example import _varying_axes

_INLINED = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat2", "remat"})


@dataclasses.dataclass
class Traced:
    """A per-example loss as a normalised closed jaxpr.

    `jaxpr.invars` are the param leaves (`n_params` of them) then the
    batched arguments' leaves (one example); its outputs are the loss then
    the aux leaves (`aux_tree`, None without aux).
    """

    jaxpr: Any
    n_params: int
    aux_tree: Any


def _struct(x, drop: int = 0) -> jax.ShapeDtypeStruct:
    """`x`'s shape (less `drop` leading axes) and dtype, without shard_map's varying axes: the loss is
    traced as on one device (a carry a model starts from zeros would not vary as its steps do);
    `evaluate` makes its scans' carries vary as their steps do."""
    return jax.ShapeDtypeStruct(jnp.shape(x)[drop:], jnp.result_type(x))


def trace_example(
    loss_fn: Callable, args: tuple, argnums: int, batch_argnums: Sequence[int], has_aux: bool
) -> Traced:
    """Traces `loss_fn` on one example; the params and the batched leaves become the jaxpr's inputs."""
    param_leaves, param_tree = jax.tree.flatten(args[argnums])
    batched = {i: jax.tree.flatten(args[i]) for i in batch_argnums}
    aux_tree: list = [None]

    def flat_loss(params, examples):
        full = list(args)
        full[argnums] = param_tree.unflatten(params)
        k = 0
        for i, (leaves, tree) in batched.items():
            full[i] = tree.unflatten(examples[k : k + len(leaves)])
            k += len(leaves)
        out = loss_fn(*full)
        loss, aux = out if has_aux else (out, ())
        aux_leaves, aux_tree[0] = jax.tree.flatten(aux)
        return [jnp.asarray(loss), *aux_leaves]

    params = [_struct(x) for x in param_leaves]
    examples = [_struct(x, 1) for leaves, _ in batched.values() for x in leaves]
    closed = jax.make_jaxpr(flat_loss)(params, examples)
    return Traced(normalise(closed), len(params), aux_tree[0] if has_aux else None)


def normalise(closed):
    """The same function with calls inlined and scan bodies normalised (a fresh, flat jaxpr)."""
    structs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda xs: evaluate(closed.jaxpr, closed.consts, xs, Taps()))(structs)


@dataclasses.dataclass
class Taps:
    """What `evaluate` adds to a scope: perturbations and records, by variable.

    `points` maps a variable to its perturbation id, `records` a variable to
    its record id; `zs` holds this scope's perturbation values (for points
    inside a scan: one step's slice); `out` collects the recorded values.
    `inner(eqn)` lists the (points, records) inside a scan's body, however
    deep, so the scan can pass their steps in and out.
    """

    points: dict = dataclasses.field(default_factory=dict)
    records: dict = dataclasses.field(default_factory=dict)
    zs: dict = dataclasses.field(default_factory=dict)
    out: dict = dataclasses.field(default_factory=dict)
    inner: Callable[[Any], tuple[list, list]] = lambda eqn: ([], [])

    def child(self, zs: dict) -> Taps:
        return Taps(self.points, self.records, zs, {}, self.inner)

    def write(self, env: dict, var, value) -> None:
        if isinstance(var, jcore.DropVar):
            return
        pid = self.points.get(var)
        if pid is not None:
            value = value + self.zs[pid].astype(value.dtype)
        env[var] = value
        rid = self.records.get(var)
        if rid is not None:
            self.out[rid] = value


def evaluate(jaxpr, consts: Sequence, args: Sequence, taps: Taps) -> list:
    """Evaluates `jaxpr` with the taps' perturbations and records (calls inlined, scans rebuilt)."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        taps.write(env, v, x)
    for v, x in zip(jaxpr.invars, args, strict=True):
        taps.write(env, v, x)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINED:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            outs = evaluate(inner, inner_consts, invals, taps)
        elif name == "scan":
            outs = _scan(eqn, invals, taps)
        else:
            invals = _same_vma(invals)
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            taps.write(env, v, x)
    return [read(v) for v in jaxpr.outvars]


def _scan(eqn, invals: list, taps: Taps) -> list:
    """A scan whose body is evaluated with the taps: perturbations as extra xs, records as extra ys."""
    p = eqn.params
    body, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    points, records = taps.inner(eqn)

    axes = frozenset().union(*(_varying_axes(x) for x in invals))
    init = [_vary(c, axes) for c in init]

    def step(carry, x):
        xs_t, zs_t = x
        sub = taps.child(dict(zip(points, zs_t, strict=True)))
        outs = evaluate(body.jaxpr, body.consts, [*consts, *carry, *xs_t], sub)
        carry = [_vary(c, axes) for c in outs[:n_carry]]
        return carry, (outs[n_carry:], [sub.out[r] for r in records])

    carry, (ys, recs) = jax.lax.scan(
        step,
        init,
        (list(xs), [taps.zs[q] for q in points]),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    taps.out.update(zip(records, recs, strict=True))
    return [*carry, *ys]


def _vary(x, axes: frozenset):
    """`x` cast to vary over `axes` too (a scan's carry must vary as its steps' results do)."""
    missing = tuple(sorted(axes - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _same_vma(values: list) -> list:
    """The operands cast to vary over the same shard_map axes (the jaxpr was traced as on one device)."""
    axes = frozenset().union(*(_varying_axes(x) for x in values))
    return [_vary(jnp.asarray(x), axes) for x in values] if axes else values
