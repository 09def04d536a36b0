"""Ghost norms and book-keeping: the clipped per-example gradient sum without per-example gradients.

For a Dense kernel applied over a sequence, `y_n = a_n W`, one example's
gradient is `A^T G` (`A` the layer inputs, `G` the cotangents of its
outputs). Its squared norm is `sum_{n,m} (a_n . a_m)(g_n . g_m)` (the ghost
norm) or, when cheaper, the squared sum of the materialised `A^T G`; and the
clipped sum over the batch is one matmul `sum_b A_b^T (c_b G_b)`
(book-keeping). So one ordinary backward pass, with respect to the layer
outputs only, gives everything: no `batch x params` gradient is formed.

Layers are tapped by their class while `ghost_clipped_grad_sum` traces the
loss: `flax.nnx.Linear`, `flax.nnx.Embed`, and `flax.nnx.RNN` over an
`nnx.LSTMCell`, `nnx.OptimizedLSTMCell` or `nnx.GRUCell` (run with its input
projection hoisted out of the scan, so that the cotangent of the projection
is the gate pre-activation cotangent at every step). Every parameter that
no tap covers exactly, or that is also used outside its tap (weight tying,
a custom layer, a LayerNorm scale), takes exact per-example gradients.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _norms
from ._per_example import (
    ClippedGradSum,
    _batch_size,
    _check_argnums,
    _check_wrt_dtypes,
    _layer_bounds,
    _row_mask,
    _vary_like_batch,
    _varying_axes,
    clip_factors,
    layer_sensitivity,
)

F32 = jnp.float32
GHOST, MATERIALISED, PER_EXAMPLE = "ghost", "materialised", "per-example"

_LOCAL = threading.local()
_PATCH_LOCK = threading.RLock()


def _nnx():
    """`flax.nnx`, imported when first needed (flax is an optional dependency); None without flax."""
    try:
        from flax import nnx
    except ImportError:  # no flax: nothing to tap, every parameter takes per-example gradients
        return None
    return nnx


def _trace_state():
    return jax.extend.core.get_opaque_trace_state(convention="nnx")


class _Tape:
    """What the tapped layers of one traced forward pass record.

    `ids` maps `id(parameter value)` to its leaf index, for the leaves that
    may be tapped; a layer is tapped only when its parameters are among them
    and it runs at the trace level the forward started at (not inside a scan
    body or a nested jit, whose values cannot leave that trace).
    """

    def __init__(self, ids: dict[int, int], perturbations: list | None):
        self.ids = ids
        self.perturbations = perturbations
        self.records: list[dict] = []
        self.level = _trace_state()

    def index(self, variable) -> int | None:
        if variable is None or _trace_state() != self.level:
            return None
        return self.ids.get(id(variable.get_value()))

    def add(self, out: jax.Array, acts: dict, pairs: list) -> jax.Array:
        """Records a tap whose output `out` gets a zero perturbation (its cotangent is `G`)."""
        k = len(self.records)
        self.records.append({"out": jax.ShapeDtypeStruct(out.shape, out.dtype), "acts": acts, "pairs": pairs})
        if self.perturbations is None:
            return out
        return out + self.perturbations[k].astype(out.dtype)


def _tape() -> _Tape | None:
    return getattr(_LOCAL, "tape", None)


@contextlib.contextmanager
def _stopped(*variables):
    """Within the block the variables hold `stop_gradient` of their values."""
    old = [v.get_value() for v in variables]
    for v, x in zip(variables, old, strict=True):
        v.set_value(jax.lax.stop_gradient(x))
    try:
        yield
    finally:
        for v, x in zip(variables, old, strict=True):
            v.set_value(x)


_ORIG: dict[str, Callable] = {}


def _linear_call(self, inputs, *args, **kwargs):
    tape = _tape()
    kernel = tape.index(self.kernel) if tape is not None and not args and not kwargs else None
    if kernel is None:
        return _ORIG["linear"](self, inputs, *args, **kwargs)
    bias = tape.index(self.bias) if self.bias is not None else None
    with _stopped(self.kernel, *([self.bias] if bias is not None else [])):
        y = _ORIG["linear"](self, inputs)
    pairs = [(kernel, "kernel", "a", None)] + ([(bias, "bias", None, None)] if bias is not None else [])
    return tape.add(y, {"a": inputs}, pairs)


def _embed_call(self, inputs, *args, **kwargs):
    tape = _tape()
    table = tape.index(self.embedding) if tape is not None and not args and not kwargs else None
    if table is None or self.num_embeddings == 1 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        return _ORIG["embed"](self, inputs, *args, **kwargs)
    with _stopped(self.embedding):
        y = _ORIG["embed"](self, inputs)
    return tape.add(y, {"ids": inputs}, [(table, "embed", "ids", None)])


def _cell_params(cell):
    """`(kind, input kernels, input bias or None, hidden kernels, hidden biases)` of a stock cell, or None."""
    nnx = _nnx()
    if type(cell) is nnx.LSTMCell:
        gates_i, gates_h = (cell.ii, cell.if_, cell.ig, cell.io), (cell.hi, cell.hf, cell.hg, cell.ho)
        return (
            "lstm",
            [m.kernel for m in gates_i],
            None,
            [m.kernel for m in gates_h],
            [m.bias for m in gates_h],
        )
    if type(cell) is nnx.OptimizedLSTMCell:
        return "lstm", [cell.dense_i.kernel], None, [cell.dense_h.kernel], [cell.dense_h.bias]
    if type(cell) is nnx.GRUCell:
        return "gru", [cell.dense_i.kernel], cell.dense_i.bias, [cell.dense_h.kernel], []
    return None


def _rnn_call(self, inputs, **kwargs):
    tape = _tape()
    spec = _cell_params(self.cell) if tape is not None else None
    initial_carry = kwargs.get("initial_carry")
    plain = (
        spec is None
        or any(kwargs.get(k) not in (None, False) for k in ("seq_lengths", "time_major", "reverse", "rngs"))
        or self.time_major
        or self.reverse
        or self.cell.dtype is not None
        or (initial_carry is None and self.cell.carry_init is not None)
        or inputs.ndim < 2
        or not jnp.issubdtype(inputs.dtype, jnp.floating)
    )
    if not plain:
        kind, in_k, in_b, h_k, h_b = spec
        variables = in_k + ([in_b] if in_b is not None else []) + h_k + h_b
        idx = [tape.index(v) for v in variables]
        plain = any(i is None for i in idx)
    if plain:
        return _ORIG["rnn"](self, inputs, **kwargs)
    return _hoisted_rnn(self, tape, kind, variables, idx, len(in_k), in_b is not None, inputs, kwargs)


def _hoisted_rnn(self, tape, kind, variables, idx, n_in, has_in_bias, inputs, kwargs):
    """The cell's recurrence with the input projection (and the constant bias) outside the scan."""
    cell = self.cell
    hidden = cell.hidden_features
    values = [jax.lax.stop_gradient(v.get_value()) for v in variables]
    w_in = jnp.concatenate(values[:n_in], axis=-1)
    rest = values[n_in:]
    if has_in_bias:  # GRU: dense_i's bias, dense_h has none
        bias, w_h = rest[0], rest[1]
    else:  # LSTM: the hidden projections' biases, constant over time
        w_h = jnp.concatenate(rest[: len(rest) // 2], axis=-1)
        bias = jnp.concatenate(rest[len(rest) // 2 :], axis=-1)
    dtype = jnp.result_type(inputs.dtype, w_in.dtype)
    zx = jnp.matmul(inputs.astype(dtype), w_in.astype(dtype))
    zx = zx + bias.astype(dtype).reshape((1,) * (zx.ndim - 1) + (-1,))
    acts = {"x": inputs}
    if kind == "lstm":
        per = [(slice(j * hidden, (j + 1) * hidden) if n_in > 1 else None) for j in range(n_in)]
        n_h = len(variables) - n_in
        pairs = [(idx[j], "kernel", "x", per[j]) for j in range(n_in)]
        pairs += [(idx[n_in + j], "kernel", "h_prev", per[j]) for j in range(n_h // 2)]
        pairs += [(idx[n_in + n_h // 2 + j], "bias", None, per[j]) for j in range(n_h // 2)]
    else:
        pairs = [
            (idx[0], "kernel", "x", None),
            (idx[1], "bias", None, None),
            (idx[2], "kernel", "h_prev", "gru"),
        ]
    zx = tape.add(zx, acts, pairs)
    batch_dims = inputs.shape[:-2]
    carry = kwargs.get("initial_carry")
    if carry is None:
        zeros = jnp.zeros(batch_dims + (hidden,), cell.param_dtype)
        carry = (zeros, zeros) if kind == "lstm" else zeros
    w_h = w_h.astype(dtype)
    axes = _varying_axes(zx)  # inside shard_map the carry must vary as the steps' outputs do

    def vary(c):
        missing = tuple(sorted(axes - _varying_axes(c)))
        return jax.lax.pcast(c, missing, to="varying") if missing else c

    carry = jax.tree.map(vary, carry)

    def lstm_step(carry, z_in):
        c, h = carry
        z = z_in + jnp.matmul(h.astype(dtype), w_h)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        i, f, g, o = cell.gate_fn(i), cell.gate_fn(f), cell.activation_fn(g), cell.gate_fn(o)
        new_c = f * c + i * g
        new_h = o * cell.activation_fn(new_c)
        return (new_c, new_h), (new_h,)

    def gru_step(h, z_in):
        hh = jnp.matmul(h.astype(dtype), w_h)
        xr, xz, xn = jnp.split(z_in, 3, axis=-1)
        hr, hz, hn = jnp.split(hh, 3, axis=-1)
        r, z = cell.gate_fn(xr + hr), cell.gate_fn(xz + hz)
        n = cell.activation_fn(xn + r * hn)
        new_h = (1.0 - z) * n + z * h
        return new_h, (new_h, r)

    step = lstm_step if kind == "lstm" else gru_step
    h0 = carry[1] if kind == "lstm" else carry
    carry, outs = jax.lax.scan(step, carry, jnp.moveaxis(zx, -2, 0), unroll=self.unroll)
    # The hidden kernel's inputs: the initial state, then every output but the last (one stacked output).
    h_prev = jnp.concatenate([h0[None].astype(outs[0].dtype), outs[0][:-1]], axis=0)
    hs = jnp.moveaxis(outs[0], 0, -2)
    acts["h_prev"] = jnp.moveaxis(h_prev, 0, -2)
    if kind == "gru":
        acts["r"] = jnp.moveaxis(outs[1], 0, -2)
    return_carry = kwargs.get("return_carry")
    return_carry = self.return_carry if return_carry is None else return_carry
    return (carry, hs) if return_carry else hs


@contextlib.contextmanager
def _tapping(ids: dict[int, int], perturbations: list | None):
    """Installs the layer taps (class-level, for this thread's trace only) and a fresh tape."""
    nnx = _nnx()
    if nnx is None:
        outer, _LOCAL.tape = _tape(), _Tape(ids, perturbations)
        try:
            yield _LOCAL.tape
        finally:
            _LOCAL.tape = outer
        return
    with _PATCH_LOCK:
        if not _ORIG:
            _ORIG.update(linear=nnx.Linear.__call__, embed=nnx.Embed.__call__, rnn=nnx.RNN.__call__)
        depth = getattr(_LOCAL, "depth", 0)
        if depth == 0:
            nnx.Linear.__call__, nnx.Embed.__call__, nnx.RNN.__call__ = _linear_call, _embed_call, _rnn_call
        _LOCAL.depth = depth + 1
    outer, _LOCAL.tape = _tape(), _Tape(ids, perturbations)
    try:
        yield _LOCAL.tape
    finally:
        _LOCAL.tape = outer
        with _PATCH_LOCK:
            _LOCAL.depth -= 1
            if _LOCAL.depth == 0:
                nnx.Linear.__call__, nnx.Embed.__call__, nnx.RNN.__call__ = (
                    _ORIG["linear"],
                    _ORIG["embed"],
                    _ORIG["rnn"],
                )


def _select_g(g: jax.Array, acts: dict, sel) -> jax.Array:
    """The output cotangent of one parameter's pair: all of `g`, a slice of gates, or the GRU's hidden one."""
    if sel is None:
        return g
    if isinstance(sel, slice):
        return g[..., sel]
    gr, gz, gn = jnp.split(g, 3, axis=-1)  # GRU: hh_n enters as r * hh_n
    return jnp.concatenate([gr, gz, gn * acts["r"].astype(gn.dtype)], axis=-1)


def _flat(x: jax.Array, batched: bool) -> jax.Array:
    """`[B, ..., d] -> [B, N, d]` (or `[..., d] -> [N, d]`)."""
    lead = 1 if batched else 0
    return x.reshape(x.shape[:lead] + (-1, x.shape[-1]))


def _pair_mode(kind: str, leaf_shape, n: int) -> str:
    """Ghost or materialised norm for one layer (`n` positions), by cost.

    Materialising `A^T G` per example costs `N d_in d_out` and gives the
    clipped sum for one weighted reduction; the ghost norm costs
    `N^2 (d_in + d_out)` on top of the book-keeping matmul (`N d_in d_out`),
    so it pays only for its memory: `B N^2` instead of `B d_in d_out`. So a
    kernel is materialised while its per-example gradient is at most twice
    the size of the layer's inputs and output cotangents (which the
    backward pass holds anyway), and whenever `2 N^2 >= d_in d_out` (Bu et
    al. 2022: there the ghost norm is the larger in memory too).
    """
    if kind == "kernel":
        d_in, d_out = leaf_shape[0], leaf_shape[1]
        small = d_in * d_out <= 2 * n * (d_in + d_out)
        return MATERIALISED if small or 2 * n * n >= d_in * d_out else GHOST
    if kind == "embed":
        return GHOST if n <= leaf_shape[0] else MATERIALISED
    return MATERIALISED  # a bias: the sum over positions is the per-example gradient


def _jaxpr_used_inputs(closed) -> list[bool]:
    """Which top-level inputs of a jaxpr any equation (or output) reads."""
    jaxpr = closed.jaxpr
    used = set()
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
    used.update(v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal))
    return [v in used for v in jaxpr.invars]


class _Plan:
    """Which leaves are tapped (and how), found by tracing one example abstractly."""

    def __init__(self, ghost: list[int], records: list[dict], modes: dict[int, str]):
        self.ghost, self.records, self.modes = ghost, records, modes


def ghost_clipped_grad_sum(
    loss_fn: Callable[..., Any],
    argnums: int = 0,
    batch_argnums: int | Sequence[int] = 1,
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """The clipped per-example gradient sum of `clipped_grad_sum`, by ghost norms and book-keeping.

    Same arguments, same result (`ClippedGradSum`, for `dp_aggregate` /
    `dp_adaptive_aggregate`), same semantics: but per-example gradients are
    never formed for the parameters of the tapped layers. One ordinary
    backward pass gives each tapped layer's inputs `A` and output cotangents
    `G` per example; each parameter's per-example norm is the ghost norm
    `sum_{n,m} (a_n . a_m)(g_n . g_m)` or the norm of the materialised
    `A^T G`, chosen per layer by cost (`N` positions: materialised while
    `d_in d_out <= 2 N (d_in + d_out)` or `2 N^2 >= d_in d_out`, else ghost),
    and the clipped sum is one matmul with the clip factors folded into `G`
    (or one weighted reduction of the materialised gradients).

    Tapped without changing the model: `flax.nnx.Linear`, `flax.nnx.Embed`,
    and `flax.nnx.RNN` over `nnx.LSTMCell`, `nnx.OptimizedLSTMCell` or
    `nnx.GRUCell` (forward direction, batch-major, `dtype=None`). Any other
    parameter, and any tapped parameter that is also used outside its layer
    call (a tied embedding, a layer called twice, a layer inside a user's
    scan or nested jit), takes exact per-example gradients (`jax.vmap` of
    `jax.grad` restricted to those parameters). `.paths(*args)` says which
    parameter took which path.

    Args:
      loss_fn: `loss_fn(params, example, ...) -> scalar` (or `(scalar, aux)`)
        for one example, as in `clipped_grad_sum`; `params` (argument
        `argnums`) is the pytree of float arrays the model is merged from
        (for Flax NNX, the `nnx.Param` state: `nnx.merge(graphdef, params,
        rest)` inside `loss_fn`).
      argnums: The one argument to differentiate (an int).
      batch_argnums: Which arguments carry the batch axis.
      has_aux: Whether `loss_fn` returns `(loss, aux)`.

    Returns:
      A function `f(*args, l2_norm_clip, mask=None)` returning a
      `ClippedGradSum` (and the per-example aux with `has_aux`), with
      `f.paths(*args) -> {parameter path: "ghost" | "materialised" |
      "per-example"}`. `l2_norm_clip` is a number or per-layer bounds (a
      pytree or a callable `(path, leaf) -> bound`), as in `clipped_grad_sum`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, optaxclip
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Embed(16, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
      >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      >>> def loss(p, tokens):  # one example: a sequence of tokens
      ...     return jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
      >>> f = optaxclip.ghost_clipped_grad_sum(loss)
      >>> tokens = jax.random.randint(jax.random.key(0), (3, 5), 0, 16)
      >>> fast = f(params, tokens, l2_norm_clip=0.1)
      >>> slow = optaxclip.clipped_grad_sum(loss)(params, tokens, l2_norm_clip=0.1)
      >>> print(bool(jnp.allclose(fast.norms, slow.norms, rtol=1e-5)))
      True
      >>> sorted(set(f.paths(params, tokens).values()))
      ['ghost', 'materialised']

    Edge cases:
      Padded rows (`mask`) add exactly zero; an example with a NaN/inf
      anywhere in its loss or gradient adds exactly zero (branch-free
      masks, no data-dependent branch) and keeps a non-finite entry in `norms`, which
      `dp_aggregate` counts. Per-example squared norms are float32: an
      example whose gradient norm exceeds about 1.8e19 is counted as
      non-finite and dropped (the add/remove sensitivity stays the clip
      norm). Inside `shard_map` with replicated params, as `per_example_grads`.
      Integer and bool parameter leaves are refused (a `ValueError` naming
      their paths and dtypes), as in `clipped_grad_sum`.
      The result equals `clipped_grad_sum`'s to float32 rounding (sums are
      taken in another order). Call it inside `jax.jit`: each eager call
      traces the model again to find the layers and plan their paths.

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
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise ValueError(f"{fn}: `argnums` must be one int (the params argument), got argnums={argnums!r}.")
    _, batch_argnums = _check_argnums(fn, argnums, batch_argnums)

    def call(args, leaves, treedef, ghost_vals, ghost_idx, perturbations, fallback_vals, fallback_idx):
        """`loss_fn` on one example with the taps on (the params rebuilt from two lists of leaves)."""
        full = list(leaves)
        for i, v in zip(ghost_idx, ghost_vals, strict=True):
            full[i] = v
        for i, v in zip(fallback_idx, fallback_vals, strict=True):
            full[i] = v
        args = list(args)
        args[argnums] = treedef.unflatten(full)
        with _tapping({id(v): i for i, v in zip(ghost_idx, ghost_vals, strict=True)}, perturbations) as tape:
            out = loss_fn(*args)
        loss, aux = out if has_aux else (out, None)
        return loss, aux, tape.records

    def plan(args) -> _Plan:
        leaves, treedef = jax.tree.flatten(args[argnums])
        example = [
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), a)
            if i in batch_argnums
            else a
            for i, a in enumerate(args)
        ]
        float_idx = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        candidates = list(float_idx)
        for _ in range(8):  # demote until the taps and the candidates agree (a fixed point, 1-3 rounds)
            records: list = []

            def discover(ghost_vals, ex, candidates=candidates, records=records):
                _, _, recs = call(ex, leaves, treedef, ghost_vals, candidates, None, [], [])
                records.extend(recs)
                return [r["acts"] for r in recs]

            ghost_vals = [leaves[i] for i in candidates]
            jax.eval_shape(discover, ghost_vals, example)
            seen: dict[int, int] = {}
            for r in records:
                for leaf, *_ in r["pairs"]:
                    seen[leaf] = seen.get(leaf, 0) + 1
            tapped = [i for i in candidates if seen.get(i) == 1]

            # A tapped parameter must reach the loss only through its tap: the loss's JVP with
            # respect to it, with the taps holding it as stop_gradient, must not read its tangent.
            def tangent_out(tangents, ex, tapped=tapped):
                vals = [leaves[i] for i in tapped]

                def f(vals):
                    return call(ex, leaves, treedef, vals, tapped, None, [], [])[0]

                return jax.jvp(f, (vals,), (tangents,))[1]

            if tapped:
                zeros = [jnp.zeros(jnp.shape(leaves[i]), jnp.result_type(leaves[i])) for i in tapped]
                closed = jax.make_jaxpr(tangent_out)(zeros, _concrete_like(example))
                used = _jaxpr_used_inputs(closed)[: len(tapped)]
                tapped = [i for i, u in zip(tapped, used, strict=True) if not u]
            if tapped == candidates:
                break
            candidates = tapped
        else:
            candidates, records = [], []
        modes = {}
        for k, kind, act, group in _groups(records):
            r = records[k]
            shape = r["acts"][act].shape if act is not None else r["out"].shape
            n = 1
            for d in shape[:-1] if kind != "embed" else shape:
                n *= d
            leaf_shape = jnp.shape(leaves[group[0][0]])
            if kind == "kernel":
                leaf_shape = (leaf_shape[0], sum(_width(sel, r["out"].shape[-1]) for _, sel in group))
            for leaf, _ in group:
                modes[leaf] = _pair_mode(kind, leaf_shape, n)
        return _Plan(candidates, records, modes)

    def paths(*args) -> dict[str, str]:
        flat, _ = jax.tree_util.tree_flatten_with_path(args[argnums])
        p = plan(args)
        return {jax.tree_util.keystr(k): p.modes.get(i, PER_EXAMPLE) for i, (k, _) in enumerate(flat)}

    def run(*args, l2_norm_clip, mask=None):
        batch = _batch_size(fn, args, batch_argnums)
        _check_wrt_dtypes(fn, args, (argnums,))
        args = _vary_like_batch(args, (argnums,), batch_argnums)
        leaves, treedef = jax.tree.flatten(args[argnums])
        bounds = _layer_bounds(fn, l2_norm_clip, args[argnums])
        clip = jnp.asarray(l2_norm_clip, F32) if bounds is None else layer_sensitivity(bounds)
        real = _row_mask(mask, batch)
        p = plan(args)
        ghost_idx = p.ghost
        fallback_idx = [i for i in range(len(leaves)) if i not in set(ghost_idx)]
        ghost_vals = [leaves[i] for i in ghost_idx]
        meta: list = []

        def one(fallback_vals, perturbations, *ex):
            loss, aux, recs = call(
                ex, leaves, treedef, ghost_vals, ghost_idx, perturbations, fallback_vals, fallback_idx
            )
            meta[:] = recs
            return loss, ([r["acts"] for r in recs], aux)

        in_axes = (0, 0) + tuple(0 if i in batch_argnums else None for i in range(len(args)))
        batched = jax.vmap(one, in_axes=in_axes)
        fallback_b = [jnp.broadcast_to(leaves[i], (batch,) + jnp.shape(leaves[i])) for i in fallback_idx]
        zs = [_zeros_like_varying((batch,) + r["out"].shape, r["out"].dtype, leaves) for r in p.records]
        losses, vjp_fn, (acts, aux) = jax.vjp(
            lambda fb, zs: batched(fb, zs, *args), fallback_b, zs, has_aux=True
        )
        g_fallback, g_zs = vjp_fn(jnp.ones_like(losses))

        # Per-leaf per-example squared norms, from the (input, cotangent) pairs and the fallback grads.
        sq: list = [jnp.zeros((batch,), F32)] * len(leaves)
        work: list[tuple] = []
        for k, kind, name, group in _groups(meta):
            g, act = g_zs[k], acts[k]
            members = [leaf for leaf, _ in group]
            widths = [_width(sel, g.shape[-1]) for _, sel in group]
            G = g if len(group) > 1 else _select_g(g, act, group[0][1])
            if kind == "embed":
                ids, G = act[name].reshape(batch, -1), G.reshape(batch, -1, G.shape[-1]).astype(F32)
                sq[members[0]] = _embed_sq(ids, G, jnp.shape(leaves[members[0]])[0], p.modes[members[0]])
                work.append(("embed", members, widths, ids, G))
                continue
            G = _flat(G, True).astype(F32)
            if kind == "bias":
                per = G.sum(axis=1)
                work.append(("per", members, widths, per))
                for leaf, q in zip(members, _split_sq(per, widths, bounds), strict=False):  # as below
                    sq[leaf] = q
                continue
            A = _flat(act[name], True).astype(F32)
            if p.modes[members[0]] == GHOST:
                gram_a = jnp.einsum("bni,bmi->bnm", A, A)
                parts = [G] if bounds is None else jnp.split(G, _offsets(widths), axis=-1)
                qs = [jnp.sum(gram_a * jnp.einsum("bno,bmo->bnm", x, x), axis=(1, 2)) for x in parts]
                work.append(("bk", members, widths, A, G))
            else:
                per = jnp.einsum("bni,bno->bio", A, G)
                qs = _split_sq(per, widths, bounds)
                work.append(("per", members, widths, per))
            for leaf, q in zip(members, qs, strict=False):  # one total for the group under a global clip
                sq[leaf] = q
        for i, g in zip(fallback_idx, g_fallback, strict=True):
            g = g.astype(F32)
            work.append(("per", [i], [g.shape[-1] if g.ndim > 1 else 1], g))
            sq[i] = jnp.sum(jnp.square(g).reshape(batch, -1), axis=1)

        norms, factors = clip_factors(sq, bounds, clip)
        ok = real & jnp.isfinite(norms)
        one = jnp.where(ok, _norms.scale_factor(norms, clip), 0.0) if factors is None else None

        def keep(x):  # rows that are not real and finite read as 0 (a select fused into the product)
            return jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)

        sums: list = [None] * len(leaves)
        for kind, members, widths, *arrays in work:
            ws = [one if one is not None else jnp.where(ok, factors[m], 0.0) for m in members]
            if kind == "embed":
                ids, G = arrays
                vocab = jnp.shape(leaves[members[0]])[0]
                ids = jnp.where(ids < 0, ids + vocab, ids)
                out = [
                    jnp.zeros(jnp.shape(leaves[members[0]]), F32)
                    .at[ids.reshape(-1)]
                    .add((keep(G) * ws[0][:, None, None]).reshape(-1, G.shape[-1]), mode="drop")
                ]
            elif kind == "bk":
                A, G = arrays
                if len(members) == 1 or one is not None:
                    cols = ws[0][:, None, None]
                else:
                    cols = jnp.concatenate(
                        [jnp.broadcast_to(w[:, None], (batch, n)) for w, n in zip(ws, widths, strict=True)],
                        -1,
                    )[:, None, :]
                out = jnp.split(jnp.einsum("bni,bno->io", keep(A), keep(G) * cols), _offsets(widths), axis=-1)
            else:
                (per,) = arrays
                if len(members) == 1 or one is not None:
                    total = jnp.tensordot(ws[0], keep(per), axes=1)
                    out = jnp.split(total, _offsets(widths), axis=-1) if len(members) > 1 else [total]
                else:
                    parts = jnp.split(keep(per), _offsets(widths), axis=-1)
                    out = [jnp.tensordot(w, x, axes=1) for w, x in zip(ws, parts, strict=True)]
            for m, x in zip(members, out, strict=True):
                sums[m] = x.reshape(jnp.shape(leaves[m]))
        result = ClippedGradSum(treedef.unflatten(sums), norms, real, clip)
        return (result, aux) if has_aux else result

    run.paths = paths
    return run


def _groups(records: list[dict]):
    """`(record, kind, act, [(leaf, selector)])`: pairs that slice one cotangent's columns go together.

    A stock `nnx.LSTMCell` keeps one kernel per gate; its four hidden kernels
    read the same activations and four column blocks of one cotangent, so
    one einsum (and under a global clip one ghost norm) serves all four.
    """
    for k, rec in enumerate(records):
        sliced: dict[tuple, list] = {}
        for leaf, kind, name, sel in rec["pairs"]:
            if isinstance(sel, slice) and kind in ("kernel", "bias"):
                sliced.setdefault((kind, name), []).append((leaf, sel))
            else:
                yield k, kind, name, [(leaf, sel)]
        width = rec["out"].shape[-1]
        for (kind, name), group in sliced.items():
            stops = [0] + [sel.stop for _, sel in group]
            contiguous = all(sel.start == stops[j] for j, (_, sel) in enumerate(group)) and stops[-1] == width
            if contiguous:
                yield k, kind, name, group
            else:
                for pair in group:
                    yield k, kind, name, [pair]


def _width(sel, width: int) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else width


def _offsets(widths: list[int]) -> list[int]:
    out, total = [], 0
    for w in widths[:-1]:
        total += w
        out.append(total)
    return out


def _split_sq(per: jax.Array, widths: list[int], bounds) -> list:
    """Squared norms `[B]` of a materialised per-example gradient: the group's total, or per column block."""
    axes = tuple(range(1, per.ndim))
    if bounds is None or len(widths) == 1:
        return [jnp.sum(jnp.square(per), axis=axes)]
    return [jnp.sum(jnp.square(x), axis=axes) for x in jnp.split(per, _offsets(widths), axis=-1)]


def _embed_sq(ids: jax.Array, G: jax.Array, vocab: int, mode: str) -> jax.Array:
    """Per-example squared norm of an embedding table's gradient: `sum_{n,m} [id_n == id_m] g_n . g_m`."""
    ids = jnp.where(ids < 0, ids + vocab, ids)
    valid = (ids >= 0) & (ids < vocab)  # out-of-range ids read the fill value: no gradient
    if mode == GHOST:
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        return jnp.sum(jnp.where(same, jnp.einsum("bnd,bmd->bnm", G, G), 0.0), axis=(1, 2))
    onehot = jax.nn.one_hot(jnp.where(valid, ids, -1), vocab, dtype=F32)
    return jnp.sum(jnp.square(jnp.einsum("bnv,bnd->bvd", onehot, G)), axis=(1, 2))


def _zeros_like_varying(shape, dtype, leaves) -> jax.Array:
    """Zeros that vary over the shard_map axes the params were cast to (so the vjp keeps them per device)."""
    z = jnp.zeros(shape, dtype)  # a constant outside shard_map: XLA folds `y + 0` away, no buffer
    like = next((x for x in leaves if hasattr(x, "shape") and _varying_axes(x)), None)
    if like is not None:
        return z + jnp.zeros_like(jnp.ravel(like)[:1].reshape(()), dtype)
    return z


def _concrete_like(example):
    """Zeros for the abstract example arguments (make_jaxpr traces them anyway)."""
    return jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, example
    )
