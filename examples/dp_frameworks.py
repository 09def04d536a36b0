"""DP-SGD on any JAX model: a Flax NNX transformer, a Flax Linen LSTM and an Equinox LSTM.

The same DP-SGD loop runs on a model of each framework, unchanged: Poisson
sampled batches (padded to a fixed size with a mask), the clipped
per-example gradient sum by `optaxclip.ghost_clipped_grad_sum` (the fast
path: it works from the loss function, whatever built the model), Gaussian
noise and averaging by `optaxclip.dp_aggregate`, then adam. For each model
it prints which parameters took which path (`.paths()`: "ghost" and
"materialised" form no per-example gradients; "per-example" leaves take
exact `vmap(grad)` gradients), the time of the clipped per-example sum on
the fast path next to the vmap path (`optaxclip.clipped_grad_sum`) and the
non-private gradient (noise and adam cost the same on every path), and
the test loss before and after; then the epsilon the runs spent
(`optaxclip.privacy`; every run samples the same way, so one epsilon).

The one thing a framework changes is how the per-example loss rebuilds the
model from a params pytree:

- Flax NNX: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`,
  then `nnx.merge(graphdef, p, rest)(x)`;
- Flax Linen: `params = module.init(key, x)["params"]`, then
  `module.apply({"params": p}, x)`;
- Equinox: `params, static = eqx.partition(model, eqx.is_inexact_array)`,
  then `eqx.combine(p, static)(x)`;
- plain JAX: the params dict itself.

Run: `python examples/dp_frameworks.py` (`--help` for flags; `--models`
picks from nnx_transformer, linen_transformer, nnx_lstm, linen_lstm,
equinox_lstm). `benchmarks/dp_step.py --models ...` times the same models at
benchmark size. Runs on GPU/TPU when JAX has one, on the CPU otherwise.
"""

import argparse
import collections
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import optaxclip
from optaxclip import privacy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from lstm_exploding import VOCAB, CharLSTM, stdlib_corpus  # noqa: E402  (ASCII corpus, NNX LSTM)

DELTA = 1e-5


# ------------------------------------------------------------------ the models
# Each builder returns `(params, apply)`: `apply(params, tokens [B, T]) -> logits [B, T, vocab]`.


class NNXBlock(nnx.Module):
    """Pre-norm causal transformer block: LayerNorm, MultiHeadAttention, LayerNorm, MLP (4x)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class NNXTransformer(nnx.Module):
    """Token embedding + learned positions -> blocks -> LayerNorm -> linear head."""

    def __init__(self, vocab: int, seq: int, width: int, heads: int, blocks: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, width)))
        self.blocks = nnx.List([NNXBlock(width, heads, rngs=rngs) for _ in range(blocks)])
        self.ln = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens) + self.pos[...][None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln(h))


def nnx_split(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, lambda p, x: nnx.merge(graphdef, p, rest)(x)


def nnx_transformer(vocab, seq, width=64, heads=4, blocks=2, seed=0, **_):
    return nnx_split(NNXTransformer(vocab, seq, width, heads, blocks, rngs=nnx.Rngs(seed)))


def nnx_lstm(vocab, seq, hidden=64, embed=32, seed=0, **_):
    return nnx_split(CharLSTM(hidden, rngs=nnx.Rngs(seed), embed=embed, vocab=vocab))


class LinenTransformer(nn.Module):
    """The NNX transformer's twin in Linen (attention q/k/v/out are `DenseGeneral`)."""

    vocab: int
    seq: int
    width: int
    heads: int
    blocks: int

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.width))
        h = nn.Embed(self.vocab, self.width)(tokens) + pos[None]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.blocks):
            a = nn.LayerNorm()(h)
            h = h + nn.MultiHeadDotProductAttention(self.heads)(a, a, mask=mask)
            h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


class LinenLSTM(nn.Module):
    """`nn.Embed` -> `nn.RNN(nn.LSTMCell)` -> `nn.Dense`: the NNX `CharLSTM`'s twin."""

    vocab: int
    hidden: int
    embed: int = 32

    @nn.compact
    def __call__(self, tokens):
        h = nn.RNN(nn.LSTMCell(self.hidden))(nn.Embed(self.vocab, self.embed)(tokens))
        return nn.Dense(self.vocab)(h)


def linen_split(module: nn.Module, seq: int, seed: int):
    params = module.init(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))["params"]
    return params, lambda p, x: module.apply({"params": p}, x)


def linen_transformer(vocab, seq, width=64, heads=4, blocks=2, seed=0, **_):
    return linen_split(LinenTransformer(vocab, seq, width, heads, blocks), seq, seed)


def linen_lstm(vocab, seq, hidden=64, embed=32, seed=0, **_):
    return linen_split(LinenLSTM(vocab, hidden, embed), seq, seed)


class EquinoxLSTM(eqx.Module):
    """`eqx.nn.Embedding` -> an `eqx.nn.LSTMCell` in `lax.scan` -> `eqx.nn.Linear` (one sequence)."""

    embed: eqx.nn.Embedding
    cell: eqx.nn.LSTMCell
    head: eqx.nn.Linear

    def __init__(self, vocab: int, hidden: int, embed: int, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, embed, key=k1)
        self.cell = eqx.nn.LSTMCell(embed, hidden, key=k2)
        self.head = eqx.nn.Linear(hidden, vocab, key=k3)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        def step(carry, e):
            carry = self.cell(e, carry)
            return carry, carry[0]

        zeros = jnp.zeros(self.cell.hidden_size)
        _, hs = jax.lax.scan(step, (zeros, zeros), jax.vmap(self.embed)(tokens))
        return jax.vmap(self.head)(hs)


def equinox_lstm(vocab, seq, hidden=64, embed=32, seed=0, **_):
    params, static = eqx.partition(
        EquinoxLSTM(vocab, hidden, embed, jax.random.key(seed)), eqx.is_inexact_array
    )
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


MODELS = {
    "nnx_transformer": nnx_transformer,
    "linen_transformer": linen_transformer,
    "nnx_lstm": nnx_lstm,
    "linen_lstm": linen_lstm,
    "equinox_lstm": equinox_lstm,
}


def losses_of(apply):
    """`(batch_loss, example_loss)`: mean next-token cross-entropy of a batch, and of one example."""

    def batch_loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    def example_loss(p, x, y):  # one example, without the batch axis
        return batch_loss(p, x[None], y[None])

    return batch_loss, example_loss


def path_counts(paths: dict[str, str]) -> dict[str, int]:
    counts = collections.Counter(paths.values())
    return {k: counts[k] for k in ("ghost", "materialised", "per-example")}


# ------------------------------------------------------------------ the DP loop


def gradient_fns(args, example_loss, batch_loss):
    """`{"ghost" | "vmap" | "non-private": jitted (params, x, y, mask) -> gradients}` and the ghost sum.

    The two DP paths return the clipped per-example sum (`ClippedGradSum`,
    which `dp_aggregate` noises and averages); the non-private one the mean
    loss's gradient, for the time a private step adds.
    """
    fast = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    slow = optaxclip.clipped_grad_sum(example_loss, batch_argnums=(1, 2))

    def clipped(f):
        return jax.jit(
            lambda p, x, y, mask: f(p, x, y, l2_norm_clip=args.clip, mask=mask)
        )  # padded rows add 0

    plain = jax.jit(lambda p, x, y, mask: jax.grad(batch_loss)(p, x, y))
    return {"ghost": clipped(fast), "vmap": clipped(slow), "non-private": plain}, fast


def median_ms(fns: dict, *args, reps: int) -> dict[str, float]:
    """Median ms per call of each `fns[name](*args)`, compiled first, the calls interleaved (so a
    busy machine slows every path alike)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def run(name: str, args, rows: np.ndarray, test: np.ndarray, noise: float) -> dict:
    """Times the three gradient paths on one padded batch, then trains `args.steps` DP-SGD steps."""
    params, apply = MODELS[name](VOCAB, args.seq_len, **vars(args))
    batch_loss, example_loss = losses_of(apply)
    grads, fast = gradient_fns(args, example_loss, batch_loss)
    padded = padded_size(args.batch)
    x0, y0 = jnp.asarray(rows[:padded, :-1]), jnp.asarray(rows[:padded, 1:])
    ms = median_ms(grads, params, x0, y0, jnp.ones(padded, bool), reps=args.reps)

    tx = optax.chain(
        optaxclip.dp_aggregate(args.clip, noise, jax.random.key(args.seed), expected_batch_size=args.batch),
        optax.adam(args.lr),
    )

    @jax.jit
    def update(p, s, clipped_sum):  # noise, average, adam
        updates, s = tx.update(clipped_sum, s, p)
        return optax.apply_updates(p, updates), s

    test_loss = jax.jit(batch_loss)
    tx_, ty = jnp.asarray(test[:, :-1]), jnp.asarray(test[:, 1:])
    before, state = float(test_loss(params, tx_, ty)), tx.init(params)
    rng = np.random.default_rng(args.seed)
    for _ in range(args.steps):
        idx, mask = privacy.poisson_batch(rng, len(rows), args.batch / len(rows), padded)
        batch = (jnp.asarray(rows[idx, :-1]), jnp.asarray(rows[idx, 1:]), jnp.asarray(mask))
        params, state = update(params, state, grads["ghost"](params, *batch))
    return {
        "model": name,
        "params": sum(v.size for v in jax.tree.leaves(params)),
        "leaves": len(jax.tree.leaves(params)),
        "paths": path_counts(fast.paths(params, x0, y0)),
        "ms": ms,
        "test_loss": (before, float(test_loss(params, tx_, ty))),
    }


def padded_size(batch: int) -> int:
    return batch + 4 * int(np.sqrt(batch)) + 8  # Poisson batches fit with overwhelming odds


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="nnx_transformer,linen_lstm,equinox_lstm")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="expected batch size (Poisson sampling)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument(
        "--width", type=int, default=64, help="transformer width (heads --heads, blocks --blocks)"
    )
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64, help="LSTM hidden size")
    ap.add_argument("--train-examples", type=int, default=5_000)
    ap.add_argument("--lr", type=float, default=3e-3, help="adam learning rate")
    ap.add_argument("--clip", type=float, default=1.0, help="per-example L2 clip norm")
    ap.add_argument("--noise", type=float, default=1.0, help="noise multiplier")
    ap.add_argument("--reps", type=int, default=15, help="timed calls of each path (interleaved)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        ap.error(f"unknown --models {sorted(unknown)}; choose from {sorted(MODELS)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    data = stdlib_corpus((args.train_examples + 200) * (args.seq_len + 1))
    rows = data[: len(data) // (args.seq_len + 1) * (args.seq_len + 1)].reshape(-1, args.seq_len + 1)
    train_rows, test_rows = rows[: args.train_examples], rows[args.train_examples :]
    rate = args.batch / len(train_rows)
    spent = privacy.epsilon(
        args.noise,
        rate,
        args.steps,
        DELTA,
        truncated_batch_size=padded_size(args.batch),
        num_examples=len(train_rows),
    )
    print(
        f"DP-SGD on {len(train_rows):,} windows of {args.seq_len} chars of the stdlib's source: "
        f"{args.steps} steps, expected batch {args.batch} (padded to {padded_size(args.batch)}), "
        f"clip {args.clip}, noise multiplier {args.noise}; device: {jax.devices()[0].platform}\n"
    )
    runs = [run(name, args, train_rows, test_rows, args.noise) for name in args.models.split(",")]
    print(
        f"{'model':<18} {'params':>8}  {'leaves: ghost / materialised / per-example':<44}"
        f"{'gradients ms: fast':>19} {'vmap':>8} {'non-private':>12}  test loss"
    )
    for r in runs:
        p, ms = r["paths"], r["ms"]
        leaves = f"{r['leaves']}: {p['ghost']} / {p['materialised']} / {p['per-example']}"
        print(
            f"{r['model']:<18} {r['params']:>8,}  {leaves:<44}{ms['ghost']:>19.1f} {ms['vmap']:>8.1f} "
            f"{ms['non-private']:>12.1f}  {r['test_loss'][0]:.3f} -> {r['test_loss'][1]:.3f}"
        )
    print(
        f"\nPrivacy spent by each run: epsilon = {spent:.3f} at delta = {DELTA} "
        f"(PLD accountant, Poisson sampling truncated to {padded_size(args.batch)})."
    )
    for r in runs:
        r["epsilon"] = spent
    return runs


if __name__ == "__main__":
    main()
