"""Tiny models of every framework the ghost path must cover (issue 21), for the DP tests.

Each constructor returns a `GhostModel(params, loss_fn, batch)`:

- `loss_fn(params, x, y) -> scalar` is the loss of ONE example (no batch
  axis), in the `clipped_grad_sum` convention: `argnums=0`,
  `batch_argnums=(1, 2)`;
- `params` is the pytree of float arrays the model is rebuilt from inside
  `loss_fn` (NNX: the `nnx.Param` state; Linen: `variables["params"]`;
  Equinox: the inexact-array half of `eqx.partition`; plain JAX: a dict);
- `batch` is `(x, y)` with a leading batch axis of `BATCH` examples.

So `f = optaxclip.ghost_clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2))`
and `f(m.params, *m.batch, l2_norm_clip=...)` is what a user writes, on
every model alike. Sizes are tiny (a few hundred to a few thousand
parameters, batch 4, sequence 5) so each model compiles in about a second.
`MODELS` maps a name to its constructor; `TIED` names the models with a
parameter that reaches the loss twice (a tied embedding, a layer applied
twice), whose leaves are materialised at each site and summed (issue 27).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

VOCAB, SEQ, BATCH, WIDTH, HEADS = 11, 5, 4, 8, 2


class GhostModel(NamedTuple):
    params: Any
    loss_fn: Any
    batch: tuple


def tokens(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> tuple:
    """`(x, y)`: int32 `[batch, seq]` token windows and their next tokens."""
    t = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1))
    return jnp.asarray(t[:, :-1], jnp.int32), jnp.asarray(t[:, 1:], jnp.int32)


def _features(seed: int, shape: tuple, classes: int) -> tuple:
    """`(x, y)`: float32 `[batch, *shape]` inputs and int32 labels in `[0, classes)`."""
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal((BATCH, *shape)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, classes, BATCH), jnp.int32)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def init_values(abstract, seed: int = 0):
    """Concrete float32 values, drawn with NumPy, for an abstract params pytree.

    The models are built abstractly (`nnx.eval_shape`, `jax.eval_shape` of a
    Linen `init`, `eqx.filter_eval_shape`) and filled here: the frameworks'
    eager initialisers compile one XLA kernel per op and shape, which cost
    24 s of CPU for the eleven models (measured; about 1 s this way).
    Matrices and kernels get N(0, 1/fan_in) (fan_in: all but the last axis),
    vectors 0.1 N(0, 1), plus 1 for a norm's `scale`.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            return jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _shapes(**shapes):
    return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


# ---------------------------------------------------------------- plain JAX


def mlp(seed: int = 0) -> GhostModel:
    """Plain JAX: 6 -> 16 -> 3 classifier (`x @ w + b`), float features and an int label."""
    params = init_values(_shapes(w1=(6, 16), b1=(16,), w2=(16, 3), b2=(3,)), seed)

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return _xent(h @ p["w2"] + p["b2"], y)

    return GhostModel(params, loss_fn, _features(seed, (6,), 3))


def _layer_norm(h, scale, bias):
    mu = h.mean(-1, keepdims=True)
    var = jnp.square(h - mu).mean(-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + 1e-6) * scale[None] + bias[None]


def _rms_norm(h, scale):
    return h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + 1e-6) * scale[None]


def einsum_attention(seed: int = 0) -> GhostModel:
    """Plain JAX: one pre-norm causal self-attention block written with einsums.

    Embedding gather + learned positions, LayerNorm (scale, bias), q/k/v
    projections `[d, heads, d_head]` and the output projection
    `[heads, d_head, d]` as `jnp.einsum`, RMSNorm (scale), an MLP and an
    untied head.
    """
    d, h, dh = WIDTH, HEADS, WIDTH // HEADS
    shapes = _shapes(embed=(VOCAB, d), pos=(SEQ, d), q=(d, h, dh), k=(d, h, dh), v=(d, h, dh), out=(h, dh, d))
    shapes |= _shapes(up=(d, 2 * d), down=(2 * d, d), head=(d, VOCAB))
    shapes |= {"ln": _shapes(scale=(d,), bias=(d,)), "rms": _shapes(scale=(d,))}
    params = init_values(shapes, seed)

    def loss_fn(p, x, y):
        e = p["embed"][x] + p["pos"]
        a = _layer_norm(e, p["ln"]["scale"], p["ln"]["bias"])
        q, kk, v = (jnp.einsum("td,dhk->thk", a, p[n]) for n in ("q", "k", "v"))
        s = jnp.einsum("thk,shk->hts", q, kk) / np.sqrt(dh)
        s = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), s, -1e9)
        o = jnp.einsum("hts,shk->thk", jax.nn.softmax(s, axis=-1), v)
        e = e + jnp.einsum("thk,hkd->td", o, p["out"])
        m = _rms_norm(e, p["rms"]["scale"])
        e = e + jax.nn.gelu(m @ p["up"]) @ p["down"]
        return _xent(e @ p["head"], y)

    return GhostModel(params, loss_fn, tokens(seed))


# ---------------------------------------------------------------- Flax NNX


class NNXBlock(nnx.Module):
    """Pre-norm causal transformer block: LayerNorm -> MultiHeadAttention -> LayerNorm -> MLP."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class NNXTransformer(nnx.Module):
    """`nnx.Embed` + learned positions (an `nnx.Param`) -> blocks -> LayerNorm -> untied head."""

    def __init__(self, blocks: int, width: int, heads: int, seq: int, *, rngs: nnx.Rngs, vocab: int = VOCAB):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, width)))
        self.blocks = nnx.List([NNXBlock(width, heads, rngs=rngs) for _ in range(blocks)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x) + self.pos[...][None]
        mask = nnx.make_causal_mask(x)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln(h))


class NNXRNNLM(nnx.Module):
    """`nnx.Embed` -> `nnx.RNN(cell)` -> `nnx.Linear`."""

    def __init__(self, cell, hidden: int, *, rngs: nnx.Rngs, embed: int = 6, vocab: int = VOCAB):
        self.embed = nnx.Embed(vocab, embed, rngs=rngs)
        self.rnn = nnx.RNN(cell(embed, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, vocab, rngs=rngs)
        self.hidden, self.gru = hidden, cell is nnx.GRUCell

    def __call__(self, x):
        zeros = jnp.zeros((x.shape[0], self.hidden))
        return self.head(self.rnn(self.embed(x), initial_carry=zeros if self.gru else (zeros, zeros)))


class NNXConvNet(nnx.Module):
    """Two `nnx.Conv` 3x3 (the second strided) -> mean pool -> `nnx.Linear`."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.head(h.mean(axis=(1, 2)))


class NNXTiedLM(nnx.Module):
    """The output projection is the input embedding (`nnx.Embed.attend`)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.mix = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return self.embed.attend(jnp.tanh(self.mix(self.embed(x))))


class NNXTwiceLM(nnx.Module):
    """One `nnx.Linear` (`mix`) applied twice in a row."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.mix = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, x):
        return self.head(self.mix(jnp.tanh(self.mix(self.embed(x)))))


def _nnx_model(build, seed, batch) -> GhostModel:
    """`build(rngs)` traced abstractly; params from `init_values`, the rest (RNG state) made concrete."""
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(seed))), nnx.Param, ...)
    params = init_values(params, seed)
    rest = jax.tree.map(_concrete, rest)

    def loss_fn(p, x, y):  # one example: the layers run on a batch of one
        return _xent(nnx.merge(graphdef, p, rest)(x[None])[0], y)

    return GhostModel(params, loss_fn, batch)


def _concrete(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key(0)
    return jnp.zeros(leaf.shape, leaf.dtype)


def nnx_transformer(
    seed: int = 0, blocks: int = 2, width: int = WIDTH, heads: int = HEADS, seq: int = SEQ
) -> GhostModel:
    """Flax NNX: a pre-norm causal transformer (the issue's motivating model).

    `nnx.Embed` + learned positions (an `nnx.Param`), then per block
    `nnx.LayerNorm` -> `nnx.MultiHeadAttention` (q/k/v/out `LinearGeneral`)
    -> residual -> `nnx.LayerNorm` -> MLP (`nnx.Linear` width -> 4 width ->
    width) -> residual; a final `nnx.LayerNorm` and an untied `nnx.Linear`
    head.
    """
    build = lambda rngs: NNXTransformer(blocks, width, heads, seq, rngs=rngs)
    return _nnx_model(build, seed, tokens(seed, seq=seq))


def nnx_lstm(seed: int = 0, hidden: int = WIDTH) -> GhostModel:
    """Flax NNX: `nnx.Embed` -> `nnx.RNN(nnx.LSTMCell)` -> `nnx.Linear`."""
    return _nnx_model(lambda rngs: NNXRNNLM(nnx.LSTMCell, hidden, rngs=rngs), seed, tokens(seed))


def nnx_gru(seed: int = 0, hidden: int = WIDTH) -> GhostModel:
    """Flax NNX: `nnx.Embed` -> `nnx.RNN(nnx.GRUCell)` -> `nnx.Linear`."""
    return _nnx_model(lambda rngs: NNXRNNLM(nnx.GRUCell, hidden, rngs=rngs), seed, tokens(seed))


def nnx_conv(seed: int = 0) -> GhostModel:
    """Flax NNX: `NNXConvNet` on 6x6x3 images, 3 classes."""
    return _nnx_model(lambda rngs: NNXConvNet(rngs=rngs), seed, _features(seed, (6, 6, 3), 3))


def nnx_tied_embedding(seed: int = 0) -> GhostModel:
    """Flax NNX: tied input/output embedding (`NNXTiedLM`)."""
    return _nnx_model(lambda rngs: NNXTiedLM(rngs=rngs), seed, tokens(seed))


def nnx_layer_twice(seed: int = 0) -> GhostModel:
    """Flax NNX: one layer applied twice (`NNXTwiceLM`: its kernel and bias reach the loss twice)."""
    return _nnx_model(lambda rngs: NNXTwiceLM(rngs=rngs), seed, tokens(seed))


# ---------------------------------------------------------------- Flax Linen


def _linen_model(module, x, seed):
    params = init_values(jax.eval_shape(module.init, jax.random.key(seed), x[:1])["params"], seed)

    def loss_fn(p, x, y):
        return _xent(module.apply({"params": p}, x[None])[0], y)

    return params, loss_fn


def linen_transformer(seed: int = 0, width: int = WIDTH, heads: int = HEADS) -> GhostModel:
    """Flax Linen: one pre-norm causal transformer block (`nn.MultiHeadDotProductAttention`,
    whose q/k/v/out are `DenseGeneral`; `nn.LayerNorm`; `nn.Dense` MLP), learned positions, head."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = (
                nn.Embed(VOCAB, width)(x)
                + self.param("pos", nn.initializers.normal(0.02), (SEQ, width))[None]
            )
            a = nn.LayerNorm()(h)
            h = h + nn.MultiHeadDotProductAttention(heads)(a, a, mask=nn.make_causal_mask(x))
            m = nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(h))))
            return nn.Dense(VOCAB)(nn.LayerNorm()(h + m))

    x, y = tokens(seed)
    return GhostModel(*_linen_model(Block(), x, seed), (x, y))


def linen_lstm(seed: int = 0, hidden: int = WIDTH) -> GhostModel:
    """Flax Linen: `nn.Embed` -> `nn.RNN(nn.LSTMCell)` -> `nn.Dense`."""

    class LSTMLM(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.RNN(nn.LSTMCell(hidden))(nn.Embed(VOCAB, 6)(x))
            return nn.Dense(VOCAB)(h)

    x, y = tokens(seed)
    return GhostModel(*_linen_model(LSTMLM(), x, seed), (x, y))


# ---------------------------------------------------------------- Equinox


def equinox_lstm(seed: int = 0, hidden: int = WIDTH) -> GhostModel:
    """Equinox: `eqx.nn.Embedding` -> an `eqx.nn.LSTMCell` run by `lax.scan` -> `eqx.nn.Linear`."""
    import equinox as eqx

    def build():
        k = jax.random.split(jax.random.key(seed), 3)
        return {
            "embed": eqx.nn.Embedding(VOCAB, 6, key=k[0]),
            "cell": eqx.nn.LSTMCell(6, hidden, key=k[1]),
            "head": eqx.nn.Linear(hidden, VOCAB, key=k[2]),
        }

    abstract = eqx.filter_eval_shape(build)
    params, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    params = init_values(params, seed)

    def loss_fn(p, x, y):
        m = eqx.combine(p, static)

        def step(carry, e):
            carry = m["cell"](e, carry)
            return carry, carry[0]

        zeros = jnp.zeros(hidden)
        _, hs = jax.lax.scan(step, (zeros, zeros), jax.vmap(m["embed"])(x))
        return _xent(jax.vmap(m["head"])(hs), y)

    return GhostModel(params, loss_fn, tokens(seed))


MODELS = {
    "mlp": mlp,
    "einsum_attention": einsum_attention,
    "nnx_transformer": nnx_transformer,
    "linen_transformer": linen_transformer,
    "nnx_lstm": nnx_lstm,
    "nnx_gru": nnx_gru,
    "linen_lstm": linen_lstm,
    "equinox_lstm": equinox_lstm,
    "nnx_conv": nnx_conv,
    "nnx_tied_embedding": nnx_tied_embedding,
    "nnx_layer_twice": nnx_layer_twice,
}
TIED = {"nnx_tied_embedding": ("embed",), "nnx_layer_twice": ("mix",)}  # model: its leaves used twice
