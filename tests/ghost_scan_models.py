"""Losses of one example for issue 27 (layers under `scan`, fused and shared weights, any jaxpr).

Each entry of `CASES` is `(name, loss, params, x, paths)`: `loss(params, x_b)`
the loss of ONE example (`batch_argnums=1`), `x` a batch of `B` examples,
`paths` the `.paths()` counts `(ghost, materialised, per-example)` the ghost
path must give (None: not asserted). Plain JAX unless the name says
otherwise; tiny shapes so each compiles in about a second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

B, T, D, H = 4, 5, 6, 3  # batch, positions (scan steps), width, hidden


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _x(seed=0, shape=(T, D)):
    return _normal(100 + seed, B, *shape)


def literal_carry():
    """The issue's crash: a scan whose carry starts from a Python scalar."""
    loss = lambda w, x: jax.lax.scan(lambda c, xt: (c + jnp.sum(jnp.tanh(xt @ w)), None), 0.0, x)[0]
    return loss, _normal(0, D, D, scale=0.4), _x()


def fori_loop():
    """`lax.fori_loop` with static bounds (a scan whose counter is a literal-initialised carry)."""

    def loss(p, x):
        body = lambda i, h: jnp.tanh(h @ p["w"] + x[i] @ p["u"])
        return jnp.sum(jax.lax.fori_loop(0, T, body, jnp.zeros(D)) ** 2)

    return loss, {"w": _normal(1, D, D, scale=0.4), "u": _normal(2, D, D, scale=0.4)}, _x()


def while_loop():
    """A `while` over the example alone (a data-dependent trip count: JAX cannot reverse-differentiate
    a `while` that reads the params), then a dense layer on its result, and a `fori_loop` with
    dynamic bounds on the example."""

    def loss(p, x):
        def body(c):
            i, h = c
            return i + 1, h / 2

        _, h = jax.lax.while_loop(lambda c: jnp.max(jnp.abs(c[1])) > 1.0, body, (0, x))
        n = jnp.argmax(x[:, 0] > 0)
        h = jax.lax.fori_loop(0, n, lambda i, h: h * 0.9, h)
        return jnp.sum(jnp.tanh(h @ p["w"]) ** 2)

    return loss, {"w": _normal(1, D, D, scale=0.4)}, _x()


def cond_switch():
    """`lax.cond` and `lax.switch` on a per-example predicate, around a dense layer."""

    def loss(p, x):
        h = jnp.tanh(x @ p["u"])
        h = jax.lax.cond(x[0, 0] > 0, lambda h: h @ p["w"], lambda h: -h, h)
        k = (x[0, 1] > 0).astype(jnp.int32)
        h = jax.lax.switch(k, [lambda h: jnp.sin(h), lambda h: h * p["s"][None]], h)
        return jnp.sum(h**2)

    params = {"u": _normal(1, D, D, scale=0.4), "w": _normal(2, D, D, scale=0.4), "s": _normal(3, D)}
    return loss, params, _x()


def remat_pjit_custom_vjp():
    """`jax.checkpoint`, a nested `jax.jit` and a `custom_vjp` (the weight passes through it)."""

    @jax.custom_vjp
    def scale_grad(w):
        return w

    scale_grad.defvjp(lambda w: (w, None), lambda _, g: (g,))

    @jax.jit
    def dense(w, h):
        return jnp.tanh(h @ w)

    def loss(p, x):
        h = jax.checkpoint(dense)(p["a"], x)
        h = dense(scale_grad(p["b"]), h)
        return jnp.sum(h**2)

    return loss, {"a": _normal(1, D, D, scale=0.4), "b": _normal(2, D, D, scale=0.4)}, _x()


def stacked_scan():
    """`lax.scan` over layers with stacked params as `xs` (each step a per-layer slice)."""

    def loss(p, x):
        def layer(h, lp):
            return jnp.tanh(h @ lp["w"] + lp["b"][None]), None

        h, _ = jax.lax.scan(layer, x, p)
        return jnp.sum(h**2)

    return loss, {"w": _normal(1, 3, D, D, scale=0.4), "b": _normal(2, 3, D, scale=0.1)}, _x()


def stacked_rnn():
    """Nested: a scan over 2 stacked layers around a scan over time (the stacked kernels are a
    constant of the inner scan)."""

    def loss(p, x):
        def layer(xs, lp):
            def step(h, xt):
                h = jnp.tanh(xt @ lp["wi"] + h @ lp["wh"])
                return h, h

            _, hs = jax.lax.scan(step, jnp.zeros(D), xs)
            return hs, None

        hs, _ = jax.lax.scan(layer, x, p)
        return jnp.sum(hs**2)

    return loss, {"wi": _normal(1, 2, D, D, scale=0.4), "wh": _normal(2, 2, D, D, scale=0.4)}, _x()


def fused_concat():
    """A fused kernel: four gate kernels concatenated before one dot (OptimizedLSTMCell's way), and
    four biases concatenated before one add."""

    def loss(p, x):
        k = jnp.concatenate([p["k0"], p["k1"], p["k2"], p["k3"]], axis=1)
        b = jnp.concatenate([p["b0"], p["b1"], p["b2"], p["b3"]])
        z = x @ k + b[None]
        return jnp.sum(jnp.tanh(z) ** 2)

    params = {f"k{i}": _normal(i, D, H, scale=0.4) for i in range(4)}
    params |= {f"b{i}": _normal(10 + i, H, scale=0.1) for i in range(4)}
    return loss, params, _x()


def sliced_kernel():
    """One leaf sliced into two gate kernels (a GRU's `wi[:, :2h]` and `wi[:, 2h:]`)."""

    def loss(p, x):
        a = x @ p["w"][:, : 2 * H]
        c = x @ p["w"][:, 2 * H :]
        return jnp.sum(jnp.tanh(a[:, :H] * c) ** 2)

    return loss, {"w": _normal(1, D, 3 * H, scale=0.4)}, _x()


def tied_embedding():
    """A tied embedding: the table gathered, then used as the output projection."""

    def loss(p, ids):
        e = p["embed"][ids]
        h = jnp.tanh(e @ p["mix"])
        logits = h @ p["embed"].T
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 9, (B, T)), jnp.int32)
    return loss, {"embed": _normal(1, 9, D, scale=0.5), "mix": _normal(2, D, D, scale=0.4)}, ids


def twice_in_two_scans():
    """One weight used in two scan bodies (an encoder and a decoder sharing a cell)."""

    def loss(p, x):
        step = lambda h, xt: (jnp.tanh(xt @ p["w"] + h @ p["u"]),) * 2
        h, _ = jax.lax.scan(step, jnp.zeros(D), x)
        _, ys = jax.lax.scan(step, h, x[::-1])
        return jnp.sum(ys**2)

    return loss, {"w": _normal(1, D, D, scale=0.4), "u": _normal(2, D, D, scale=0.4)}, _x()


def gru_learned_init():
    """An Equinox-style GRU in `lax.scan` with a learned initial state (plain JAX, as `eqx.nn.GRUCell`
    computes it: `weight_ih @ x + bias`, `weight_hh @ h + bias_n`, split into gates)."""

    def cell(p, h, x):
        igates = jnp.split(p["weight_ih"] @ x + p["bias"], 3)
        hgates = jnp.split(p["weight_hh"] @ h, 3)
        r = jax.nn.sigmoid(igates[0] + hgates[0])
        z = jax.nn.sigmoid(igates[1] + hgates[1])
        n = jnp.tanh(igates[2] + r * (hgates[2] + p["bias_n"]))
        return (1 - z) * h + z * n

    def loss(p, x):
        step = lambda h, xt: (cell(p, h, xt),) * 2
        _, hs = jax.lax.scan(step, p["h0"], x)
        return jnp.sum(jnp.sin(hs @ p["out"]))

    params = {
        "weight_ih": _normal(1, 3 * H, D, scale=0.4),
        "weight_hh": _normal(2, 3 * H, H, scale=0.4),
        "bias": _normal(3, 3 * H, scale=0.1),
        "bias_n": _normal(4, H, scale=0.1),
        "h0": _normal(5, H, scale=0.5),
        "out": _normal(6, H, 2, scale=0.5),
    }
    return loss, params, _x()


def weight_decay_in_loss():
    """A param-only term in the loss (`+ 1e-2 |w|^2`): a site whose `W` is a nonlinear function."""

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2) + 1e-2 * jnp.sum(p["w"] ** 2)

    return loss, {"w": _normal(1, D, D, scale=0.4)}, _x()


CASES = {
    # name: (constructor, (ghost, materialised, per-example) or None)
    "literal_carry": (literal_carry, (0, 1, 0)),
    "fori_loop": (fori_loop, (0, 2, 0)),
    "while_loop": (while_loop, (0, 1, 0)),
    "cond_switch": (cond_switch, (0, 1, 2)),
    "remat_pjit_custom_vjp": (remat_pjit_custom_vjp, (0, 2, 0)),
    "stacked_scan": (stacked_scan, (0, 2, 0)),
    "stacked_rnn": (stacked_rnn, (0, 2, 0)),
    "fused_concat": (fused_concat, (4, 4, 0)),
    "sliced_kernel": (sliced_kernel, (0, 1, 0)),
    "tied_embedding": (tied_embedding, (0, 2, 0)),
    "twice_in_two_scans": (twice_in_two_scans, (0, 2, 0)),
    "gru_learned_init": (gru_learned_init, (1, 5, 0)),
    "weight_decay_in_loss": (weight_decay_in_loss, (0, 1, 0)),
}


# ---------------------------------------------------------------- the table (frameworks)


def _xent(logits, y):
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def _tokens(seed=0, vocab=11, seq=T):
    t = np.random.default_rng(seed).integers(0, vocab, (B, seq + 1))
    return jnp.asarray(t, jnp.int32)  # [B, seq + 1]: inputs t[:, :-1], targets t[:, 1:]


def _fill(abstract, seed=0):
    """Concrete float32 values for an abstract params pytree (N(0, 1/fan_in); vectors 0.1 N, + 1 for
    a `scale`)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            fan = (
                np.prod(shape[-3:-1])
                if "layers" in jax.tree_util.keystr(path) and len(shape) >= 3
                else shape[0]
            )
            return jnp.asarray(rng.standard_normal(shape) / np.sqrt(max(fan, 1)), jnp.float32)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def nnx_scanned_blocks(layers=3, width=8, heads=2, vocab=11, seq=T):
    """Flax NNX: blocks built by `nnx.vmap` (stacked params) and run by `nnx.scan` over layers:
    LayerNorm -> causal MultiHeadAttention -> LayerNorm -> MLP, then a LayerNorm and a head."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(width, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(width, rngs=rngs)
            self.up = nnx.Linear(width, 2 * width, rngs=rngs)
            self.down = nnx.Linear(2 * width, width, rngs=rngs)

        def __call__(self, h, mask):
            h = h + self.attn(self.ln1(h), mask=mask)
            return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)

            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)
            self.ln = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x)
            mask = nnx.make_causal_mask(x)

            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
            def run(h, block, mask):
                return block(h, mask)

            h = run(h, self.layers, mask)
            return self.head(self.ln(h))

    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))), nnx.Param, ...)
    params = _fill(params)
    rest = jax.tree.map(
        lambda v: (
            jax.random.key(0)
            if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
            else jnp.zeros(v.shape, v.dtype)
        ),
        rest,
    )

    def loss(p, t):
        return _xent(nnx.merge(graphdef, p, rest)(t[None, :-1])[0], t[1:])

    return loss, params, _tokens(0, vocab, seq)


def linen_scanned_layers(layers=3, width=8, vocab=11):
    """Flax Linen: `nn.scan` over layers (`variable_axes={"params": 0}`) of a Dense + LayerNorm block."""
    from flax import linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + nn.Dense(width)(jax.nn.gelu(nn.Dense(2 * width)(nn.LayerNorm()(h)))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Embed(vocab, width)(x)
            Stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
            h, _ = Stack()(h, None)
            return nn.Dense(vocab)(h)

    m = Model()
    t = _tokens(1, vocab)
    params = _fill(jax.eval_shape(m.init, jax.random.key(0), t[:1, :-1])["params"])

    def loss(p, t):
        return _xent(m.apply({"params": p}, t[None, :-1])[0], t[1:])

    return loss, params, t


def linen_optimized_lstm(layers=2, hidden=H, vocab=11):
    """Flax Linen: a stack of `nn.RNN(nn.OptimizedLSTMCell)` built with `nn.scan` over layers (the
    gate kernels concatenated before one dot, the layers' params stacked), an embedding and a head."""
    from flax import linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.RNN(nn.OptimizedLSTMCell(hidden))(h), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Embed(vocab, hidden)(x)
            Stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
            h, _ = Stack()(h, None)
            return nn.Dense(vocab)(h)

    m = Model()
    t = _tokens(2, vocab)
    params = _fill(jax.eval_shape(m.init, jax.random.key(0), t[:1, :-1])["params"])

    def loss(p, t):
        return _xent(m.apply({"params": p}, t[None, :-1])[0], t[1:])

    return loss, params, t


def nnx_tied_rms_mha(width=8, heads=2, vocab=11):
    """Flax NNX: tied embedding (`nnx.Embed` in, `.attend` out), RMSNorm, causal MultiHeadAttention."""
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.norm = nnx.RMSNorm(width, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.out_norm = nnx.RMSNorm(width, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x)
            h = h + self.attn(self.norm(h), mask=nnx.make_causal_mask(x))
            return self.embed.attend(self.out_norm(h))

    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))), nnx.Param, ...)
    params = _fill(params)
    rest = jax.tree.map(
        lambda v: (
            jax.random.key(0)
            if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
            else jnp.zeros(v.shape, v.dtype)
        ),
        rest,
    )

    def loss(p, t):
        return _xent(nnx.merge(graphdef, p, rest)(t[None, :-1])[0], t[1:])

    return loss, params, _tokens(3, vocab)


def equinox_gru_learned_init(hidden=H):
    """Equinox: `eqx.nn.GRUCell` in `lax.scan` from a learned initial state, a linear readout."""
    import equinox as eqx

    def build():
        k = jax.random.split(jax.random.key(0), 2)
        return {
            "cell": eqx.nn.GRUCell(D, hidden, key=k[0]),
            "h0": jnp.zeros(hidden),
            "out": eqx.nn.Linear(hidden, 2, key=k[1]),
        }

    abstract = eqx.filter_eval_shape(build)
    params, static = eqx.partition(abstract, lambda v: isinstance(v, jax.ShapeDtypeStruct))
    params = _fill(params, seed=4)

    def loss(p, x):
        m = eqx.combine(p, static)
        _, hs = jax.lax.scan(lambda h, xt: (m["cell"](xt, h),) * 2, m["h0"], x)
        return jnp.sum(jnp.sin(jax.vmap(m["out"])(hs)))

    return loss, params, _x(4)


CASES |= {
    "nnx_scanned_blocks": (nnx_scanned_blocks, None),
    "linen_scanned_layers": (linen_scanned_layers, None),
    "linen_optimized_lstm": (linen_optimized_lstm, None),
    "nnx_tied_rms_mha": (nnx_tied_rms_mha, None),
    "equinox_gru_learned_init": (equinox_gru_learned_init, None),
}


def param_only_custom_rules():
    """Param-only `custom_jvp` (`jax.nn.softplus`, `jax.nn.relu` of a weight) and `custom_vjp`
    functions before a dense layer (weight reparametrisations): bound as they are, not cut."""

    @jax.custom_vjp
    def halve_grad(w):
        return w

    halve_grad.defvjp(lambda w: (w, None), lambda _, g: (g / 2,))

    def loss(p, x):
        w = jax.nn.softplus(p["w"]) - jax.nn.relu(p["v"])
        return jnp.sum(jnp.tanh(x @ halve_grad(w)) ** 2)

    return loss, {"w": _normal(1, D, D, scale=0.4), "v": _normal(2, D, D, scale=0.4)}, _x()


CASES["param_only_custom_rules"] = (param_only_custom_rules, (0, 2, 0))
