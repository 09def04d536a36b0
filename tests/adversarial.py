"""Hostile inputs for the DP paths (issue 26): models and batches on which float32 norms cancel.

Each constructor returns an `Adversary(name, params, loss_fn, x, clip)`:
`loss_fn(params, x_b)` is the loss of ONE example (`batch_argnums=1`), `x`
the batch (a leading axis of `len(x)` examples, each a different hostile
input), `clip` a clip norm below every example's gradient norm, so that
every example is clipped and its contribution must be `<= clip`.

What makes them hostile: positions that share a large offset while their
output cotangents nearly sum to zero (a mean-centring, an instance norm, a
softmax), near-constant activations, per-feature scales from 1e-6 to 1e6,
512 positions, a loss that is the difference of two near-equal terms,
bfloat16, and a repeated token. Uncentred float32 Gram sums lose the norm
on these (the released sum passed the clip norm by up to 99% before issue 26).
Shapes are small and fixed so that each model compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

OFFSETS = (1e1, 1e2, 1e3, 1e4)


def _allow(loss: Callable) -> Callable:
    """The losses broadcast a bias or a row against a matrix, as models do: rank promotion allowed
    (the test suite raises on it elsewhere)."""

    def wrapped(*args):
        with jax.numpy_rank_promotion("allow"):
            return loss(*args)

    return wrapped


class Adversary(NamedTuple):
    name: str
    params: Any
    loss_fn: Callable
    x: Any
    clip: float


def _normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _offsets(seed: int, shape: tuple, noise: float = 1.0) -> jax.Array:
    """One example per offset in `OFFSETS`: `offset + noise * N(0, 1)`."""
    return _f32(np.stack([o + _normal(seed + i, *shape, scale=noise) for i, o in enumerate(OFFSETS)]))


def centred_dense(seed: int = 0) -> Adversary:
    """The issue's reproduction: `sum(sin(h - mean(h)))`, `h = x @ w`, `x = offset + N(0, 1)`."""

    def loss(p, x):
        h = x @ p["w"]
        return jnp.sum(jnp.sin(h - h.mean(0, keepdims=True)))

    return Adversary(
        "centred_dense", {"w": _f32(_normal(seed, 32, 32, scale=1 / 6))}, loss, _offsets(seed, (16, 32)), 1.0
    )


def _instance_norm(h, eps=1e-6):
    mu = jnp.mean(h, axis=(0, 1), keepdims=True)
    return (h - mu) * jax.lax.rsqrt(jnp.var(h, axis=(0, 1), keepdims=True) + eps)


def conv_instance_norm(seed: int = 0) -> Adversary:
    """A patch-embedding conv (4x4, stride 4), an instance norm, a dense head: raw-pixel offsets."""

    def loss(p, x):
        h = jax.lax.conv_general_dilated(
            x[None], p["k"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = _instance_norm(h[0] + p["b"])
        return jnp.sum(jnp.tanh(h.reshape(-1) @ p["head"]))

    params = {
        "k": _f32(_normal(seed, 4, 4, 3, 8, scale=0.1)),
        "b": jnp.zeros(8),
        "head": _f32(_normal(seed + 1, 4 * 4 * 8, 3, scale=0.1)),
    }
    return Adversary("conv_instance_norm", params, loss, _offsets(seed, (16, 16, 3), noise=0.1), 0.5)


class _PatchNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Conv(3, 8, (4, 4), strides=(4, 4), rngs=rngs)
        self.norm = nnx.InstanceNorm(8, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 8, 5, rngs=rngs)

    def __call__(self, x):
        h = self.norm(self.embed(x[None]))
        return self.head(h.reshape(1, -1))[0]


def nnx_instance_norm(seed: int = 0) -> Adversary:
    """The issue's second reproduction: NNX `Conv` -> `InstanceNorm` -> `Linear`, `1e3 + 0.1 N(0, 1)`."""
    graphdef, params, rest = nnx.split(_PatchNet(nnx.Rngs(seed)), nnx.Param, ...)

    def loss(p, x):
        logits = nnx.merge(graphdef, p, rest)(x)
        return jax.nn.logsumexp(logits) - logits[0]

    x = _f32(1e3 + _normal(seed, 6, 16, 16, 3, scale=0.1))
    return Adversary("nnx_instance_norm", params, loss, x, 0.05)


def _lstm(p, x):
    def step(carry, xt):
        h, c = carry
        z = xt @ p["wi"] + h @ p["wh"] + p["b"]
        i, f, g, o = jnp.split(z, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    hid = p["wh"].shape[0]
    _, hs = jax.lax.scan(step, (jnp.zeros(hid), jnp.zeros(hid)), x)
    return hs


def _gru(p, x):
    def step(h, xt):
        r, z = jnp.split(jax.nn.sigmoid(xt @ p["wi"][:, : 2 * hid] + h @ p["wh"][:, : 2 * hid]), 2)
        n = jnp.tanh(xt @ p["wi"][:, 2 * hid :] + r * (h @ p["wh"][:, 2 * hid :]))
        h = (1 - z) * n + z * h
        return h, h

    hid = p["wh"].shape[0]
    return jax.lax.scan(step, jnp.zeros(hid), x)[1]


def recurrent(cell: str, seed: int = 0) -> Adversary:
    """An LSTM or GRU over 12 steps of `offset + N(0, 1)` (a small input kernel, so the largest
    offsets do not saturate the gates), then a mean-centred readout."""
    hid, d = 6, 5
    gates = 4 if cell == "lstm" else 3
    run = _lstm if cell == "lstm" else _gru

    def loss(p, x):
        hs = run(p, x)
        return jnp.sum(jnp.sin((hs - hs.mean(0, keepdims=True)) @ p["out"]))

    params = {
        "wi": _f32(_normal(seed, d, gates * hid, scale=1e-4)),
        "wh": _f32(_normal(seed + 1, hid, gates * hid, scale=0.3)),
        "out": _f32(_normal(seed + 2, hid, 3)),
    }
    if cell == "lstm":
        params["b"] = jnp.zeros(gates * hid)
    return Adversary(f"{cell}_offsets", params, loss, _offsets(seed, (12, d)), 0.01)


def layer_norm_near_constant(seed: int = 0) -> Adversary:
    """Near-constant activations into a LayerNorm: `1e3 + 1e-3 N(0, 1)` through a dense layer."""

    def loss(p, x):
        h = x @ p["w1"]
        h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)
        h = h * p["scale"] + p["bias"]
        return jnp.sum(jnp.tanh(h @ p["w2"]))

    params = {
        "w1": _f32(_normal(seed, 8, 16, scale=0.3)),
        "scale": jnp.ones(16),
        "bias": jnp.zeros(16),
        "w2": _f32(_normal(seed + 1, 16, 4, scale=0.3)),
    }
    x = _f32(np.stack([o + _normal(seed + i, 10, 8, scale=1e-3) for i, o in enumerate(OFFSETS)]))
    return Adversary("layer_norm_near_constant", params, loss, x, 0.1)


def mixed_scales(seed: int = 0, width: int = 7) -> Adversary:
    """Per-feature scales from 1e-6 to 1e6 (with offsets) into a centred dense layer `12 x width`:
    7 takes the materialised norm; 96 (`mixed_scales_wide`, 9 positions) the Gram (ghost) norm, with
    a cotangent XLA may compute twice (cosines of arguments near 1e4)."""

    def loss(p, x):
        h = x @ p["w"]
        return jnp.sum(jnp.cos(h - h.mean(0, keepdims=True)) * p["v"])

    scales = 10.0 ** np.linspace(-6, 6, 12)
    x = np.stack([(o + _normal(seed + i, 9, 12)) * scales for i, o in enumerate(OFFSETS)])
    params = {"w": _f32(_normal(seed, 12, width, scale=1e-3)), "v": _f32(_normal(seed + 1, width))}
    return Adversary("mixed_scales" if width == 7 else "mixed_scales_wide", params, loss, _f32(x), 1.0)


def many_positions(seed: int = 0) -> Adversary:
    """512 positions sharing an offset, a centred loss: the Gram sums have 512**2 terms."""

    def loss(p, x):
        h = x @ p["w"]
        return jnp.sum(jnp.sin(h - h.mean(0, keepdims=True)))

    return Adversary(
        "many_positions", {"w": _f32(_normal(seed, 8, 8, scale=0.3))}, loss, _offsets(seed, (512, 8)), 1.0
    )


def softmax_outputs(seed: int = 0) -> Adversary:
    """Softmax outputs: each position's cotangent sums to zero over its features (cancellation in `G`),
    and attention probabilities (a softmax) are the record of the value projection."""

    def loss(p, x):
        q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
        att = jax.nn.softmax(q @ k.T / 4.0, axis=-1)
        out = (att @ v) @ p["o"]
        return jnp.sum(jax.nn.softmax(out, axis=-1) * jnp.arange(out.shape[-1], dtype=out.dtype))

    params = {n: _f32(_normal(seed + i, 16, 16, scale=0.05)) for i, n in enumerate("qkvo")}
    return Adversary("softmax_outputs", params, loss, _offsets(seed, (12, 16)), 0.01)


def near_equal_difference(seed: int = 0) -> Adversary:
    """A loss that is the difference of two near-equal terms: `G` is float32 noise of its size."""

    def loss(p, x):
        h = x @ p["w"]
        return 1e3 * (jnp.sum(jnp.tanh(h / 1e3)) - jnp.sum(jnp.tanh((h + 1e-3) / 1e3)))

    return Adversary(
        "near_equal_difference", {"w": _f32(_normal(seed, 16, 16))}, loss, _offsets(seed, (12, 16)), 1e-4
    )


def bfloat16_offsets(seed: int = 0) -> Adversary:
    """bfloat16 params and activations with large offsets, a centred loss."""

    def loss(p, x):
        h = x @ p["w"]
        return jnp.sum(jnp.sin((h - h.mean(0, keepdims=True)).astype(jnp.float32)))

    w = jnp.asarray(_normal(seed, 16, 16, scale=0.2), jnp.bfloat16)
    return Adversary("bfloat16_offsets", {"w": w}, loss, _offsets(seed, (12, 16)).astype(jnp.bfloat16), 0.5)


def repeated_token(seed: int = 0) -> Adversary:
    """An embedding read at one repeated token with a centred loss: the row's gradient, a sum of
    cotangents that nearly cancel, is far below the sum of their norms."""
    vocab, width, n = 64, 32, 16

    def loss(p, ids):
        e = p["table"][ids]
        h = e @ p["w"]
        return jnp.sum(jnp.sin(h - h.mean(0, keepdims=True)))

    ids = np.zeros((4, n), np.int32)
    ids[1, ::2] = 3  # two tokens, alternating
    ids[2] = np.arange(n) % 2 * 7
    ids[3, -1] = 5
    table = _f32(100.0 + _normal(seed, vocab, width))  # rows sharing a large offset
    params = {"table": table, "w": _f32(_normal(seed + 1, width, 8, scale=0.1))}
    return Adversary("repeated_token", params, loss, jnp.asarray(ids), 0.1)


ADVERSARIES_RAW = {
    "centred_dense": centred_dense,
    "conv_instance_norm": conv_instance_norm,
    "nnx_instance_norm": nnx_instance_norm,
    "lstm_offsets": lambda seed=0: recurrent("lstm", seed),
    "gru_offsets": lambda seed=0: recurrent("gru", seed),
    "layer_norm_near_constant": layer_norm_near_constant,
    "mixed_scales": mixed_scales,
    "mixed_scales_wide": lambda seed=0: mixed_scales(seed, width=96),
    "many_positions": many_positions,
    "softmax_outputs": softmax_outputs,
    "near_equal_difference": near_equal_difference,
    "bfloat16_offsets": bfloat16_offsets,
    "repeated_token": repeated_token,
}


def _allowed(make: Callable) -> Callable:
    def build(seed: int = 0) -> Adversary:
        adv = make(seed)
        return adv._replace(loss_fn=_allow(adv.loss_fn))

    return build


ADVERSARIES = {name: _allowed(make) for name, make in ADVERSARIES_RAW.items()}


def contributions(fn, adv: Adversary, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`(each example's contribution norm, the reported norms)`, float64: the clipped sum of one real
    example at a time (the others masked to exact zeros), by `fn` (`ghost_clipped_grad_sum` or
    `clipped_grad_sum`) at `adv.clip`; `kwargs` go to the constructor (`microbatch_size`)."""
    f = fn(adv.loss_fn, **kwargs)
    batch = jax.tree.leaves(adv.x)[0].shape[0]
    run = jax.jit(lambda p, x, m: f(p, x, l2_norm_clip=adv.clip, mask=m))
    out = []
    for b in range(batch):
        res = run(adv.params, adv.x, jnp.arange(batch) == b)
        out.append(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(res.grads))))
    norms = run(adv.params, adv.x, jnp.ones(batch, bool)).norms
    return np.array(out), np.asarray(norms, np.float64)
