"""The DP user's question: the largest batch whose DP step fits a memory budget (issue 27).

For three models large enough to need ghost clipping -

- `transformer`: 12 pre-norm blocks of width 512 (8 heads, MLP 4 x 512), built
  with `nnx.vmap` and run by `nnx.scan` over layers, vocab 8192, seq 256
  (about 42M parameters);
- `lstm`: Flax Linen, 4 layers of `nn.RNN(nn.OptimizedLSTMCell(512))` stacked
  with `nn.scan` over layers, embed 512, vocab 256, seq 128 (about 8.7M);
- `convnet`: Flax NNX, 3x3 convs 64-128-256 (two per stage, the second
  strided), global mean pool, a 10-class head, on 32x32x3 images (about 1.2M)

- each DP step (`ghost_clipped_grad_sum` + `dp_aggregate` + adam; the vmap path,
`clipped_grad_sum` + `dp_aggregate` + adam; the non-private mean-loss gradient +
adam, params and optimizer state donated) is compiled (never run) at
power-of-two batches, and XLA's `memory_analysis()` gives its temp + argument
bytes. The largest batch within the budget (8 GiB) is found by doubling. Then
each variant's step is timed where it fits this machine (`--time`), at
`--time-batch` examples (the found batch is too slow to run on 2 CPU cores for
the transformer), one warm-up and `--repeats` timed steps; time per example is
reported. Goals (issue 27): ghost's batch >= 0.5x the non-private batch on all
three; ghost's time per example <= 1.3x non-private on the transformer and the
conv net.

Run: `python benchmarks/dp_memory.py [--models transformer,lstm,convnet]
[--time] [--time-batch 4]`; writes `benchmarks/results/dp_memory.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import optaxclip

BUDGET = 8 * 2**30
CLIP, NOISE = 1.0, 1.1
MAX_BATCH = 2**14
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _abstract_nnx(build):
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param, ...)
    concrete = lambda v: (  # noqa: E731
        jax.random.key(0)
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
        else jnp.zeros(v.shape, v.dtype)
    )
    return graphdef, params, jax.tree.map(concrete, rest)


def transformer(layers=12, width=512, heads=8, vocab=8192, seq=256):
    """`(abstract params, example_loss, batch_loss, make_batch)`: the scanned NNX transformer."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(width, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(width, rngs=rngs)
            self.up = nnx.Linear(width, 4 * width, rngs=rngs)
            self.down = nnx.Linear(4 * width, width, rngs=rngs)

        def __call__(self, h, mask):
            h = h + self.attn(self.ln1(h), mask=mask)
            return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.pos = nnx.Param(jnp.zeros((seq, width)))

            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)
            self.ln = nnx.LayerNorm(width, rngs=rngs)
            self.head = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x) + self.pos[...][None]
            mask = nnx.make_causal_mask(x)

            @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
            def run(h, block, mask):
                return block(h, mask)

            return self.head(self.ln(run(h, self.layers, mask)))

    graphdef, params, rest = _abstract_nnx(Model)

    def batch_loss(p, x, y):
        return _xent(nnx.merge(graphdef, p, rest)(x), y)

    return params, batch_loss, _tokens(vocab, seq)


def lstm(layers=4, hidden=512, vocab=256, seq=128):
    """Linen: `nn.scan` over layers of `nn.RNN(nn.OptimizedLSTMCell)`."""

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.RNN(nn.OptimizedLSTMCell(hidden))(h), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Embed(vocab, hidden)(x)
            stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
            h, _ = stack()(h, None)
            return nn.Dense(vocab)(h)

    m = Model()
    params = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]

    def batch_loss(p, x, y):
        return _xent(m.apply({"params": p}, x), y)

    return params, batch_loss, _tokens(vocab, seq)


def convnet(classes=10, size=32):
    """NNX: 3x3 convs 64-128-256, two per stage (the second strided), mean pool, a linear head."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            chans = [3, 64, 64, 128, 128, 256, 256]
            self.convs = nnx.List(
                [
                    nnx.Conv(chans[i], chans[i + 1], (3, 3), strides=(2, 2) if i % 2 else (1, 1), rngs=rngs)
                    for i in range(6)
                ]
            )
            self.head = nnx.Linear(256, classes, rngs=rngs)

        def __call__(self, x):
            for conv in self.convs:
                x = jax.nn.relu(conv(x))
            return self.head(x.mean(axis=(1, 2)))

    graphdef, params, rest = _abstract_nnx(Net)

    def batch_loss(p, x, y):
        return _xent(nnx.merge(graphdef, p, rest)(x), y)

    def make_batch(batch, concrete=False):
        if not concrete:
            return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32), jax.ShapeDtypeStruct(
                (batch,), jnp.int32
            )
        rng = np.random.default_rng(0)
        return (
            jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32),
            jnp.asarray(rng.integers(0, classes, batch), jnp.int32),
        )

    return params, batch_loss, make_batch


def _tokens(vocab, seq):
    def make_batch(batch, concrete=False):
        if not concrete:
            s = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
            return s, s
        t = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1))
        return jnp.asarray(t[:, :-1], jnp.int32), jnp.asarray(t[:, 1:], jnp.int32)

    return make_batch


MODELS = {"transformer": transformer, "lstm": lstm, "convnet": convnet}
GOALS = {"transformer": True, "lstm": False, "convnet": True}  # whether the time goal applies


def variants(batch_loss, batch: int) -> dict:
    """`{name: step(params, state, x, y) -> (params, state)}` and the optimizer of each."""
    example_loss = lambda p, x, y: batch_loss(p, x[None], y[None])  # noqa: E731
    adam = optax.adam(1e-3)
    dp = optax.chain(optaxclip.dp_aggregate(CLIP, NOISE, jax.random.key(0), expected_batch_size=batch), adam)
    ghost = optaxclip.ghost_clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    vmap = optaxclip.clipped_grad_sum(example_loss, batch_argnums=(1, 2))
    grads = {
        "ghost": (dp, lambda p, x, y: ghost(p, x, y, l2_norm_clip=CLIP)),
        "vmap": (dp, lambda p, x, y: vmap(p, x, y, l2_norm_clip=CLIP)),
        "non-private": (adam, jax.grad(batch_loss)),
    }

    def stepper(tx, grads_of):
        def step(p, s, x, y):
            updates, s = tx.update(grads_of(p, x, y), s, p)
            return optax.apply_updates(p, updates), s

        return jax.jit(step, donate_argnums=(0, 1)), tx

    return {k: stepper(tx, g) for k, (tx, g) in grads.items()}, ghost


def step_bytes(model: str, variant: str, batch: int) -> int:
    """Temp + argument bytes of the compiled step at `batch` (compiled, not run)."""
    params, batch_loss, make_batch = MODELS[model]()
    steps, _ = variants(batch_loss, batch)
    step, tx = steps[variant]
    state = jax.eval_shape(tx.init, params)
    compiled = step.lower(params, state, *make_batch(batch)).compile()
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes)


def largest_batch(model: str, variant: str, log) -> tuple[int, dict]:
    """The largest power-of-two batch whose step needs <= BUDGET, and the bytes at each batch tried."""
    tried: dict = {}
    batch, best = 1, 0
    while batch <= MAX_BATCH:
        t0 = time.perf_counter()
        tried[batch] = step_bytes(model, variant, batch)
        log(
            f"  {model} {variant} batch {batch}: {tried[batch] / 2**30:.2f} GiB "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        if tried[batch] > BUDGET:
            break
        best, batch = batch, batch * 2
    return best, tried


def time_per_example(model: str, variant: str, batch: int, repeats: int) -> float:
    """Seconds per example of the step at `batch` (concrete params, one warm-up step)."""
    abstract, batch_loss, make_batch = MODELS[model]()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, s.dtype), abstract)
    steps, _ = variants(batch_loss, batch)
    step, tx = steps[variant]
    state = tx.init(params)
    x, y = make_batch(batch, concrete=True)
    params, state = step(params, state, x, y)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, state = step(params, state, x, y)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="transformer,lstm,convnet")
    ap.add_argument("--time", action="store_true", help="also time each variant per example")
    ap.add_argument("--time-batch", type=int, default=4, help="batch for the timing (0: the found batch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "dp_memory"))
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = []
    for model in args.models.split(","):
        params, batch_loss, make_batch = MODELS[model]()
        n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
        _, ghost = variants(batch_loss, 2)
        paths = ghost.paths(params, *make_batch(2, concrete=True))
        counts = {
            k: sum(1 for v in paths.values() if v == k) for k in ("ghost", "materialised", "per-example")
        }
        log(f"{model}: {n / 1e6:.1f}M parameters, ghost paths {counts}")
        row = {"model": model, "params": n, "paths": counts}
        for variant in ("ghost", "vmap", "non-private"):
            best, tried = largest_batch(model, variant, log)
            row[variant] = {"batch": best, "bytes": {str(k): v for k, v in tried.items()}}
            if args.time:
                b = args.time_batch or best
                if b:
                    row[variant]["time_batch"] = b
                    row[variant]["s_per_example"] = time_per_example(model, variant, b, args.repeats)
                    log(
                        f"  {model} {variant}: {row[variant]['s_per_example'] * 1e3:.1f} ms/example "
                        f"at batch {b}"
                    )
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    pathlib.Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    pathlib.Path(args.out + ".md").write_text(table)
    print(table)


def markdown(rows) -> str:
    lines = [
        "| model | params | ghost paths (g/m/p) | largest batch <= 8 GiB: ghost / vmap / non-private | "
        "ghost / non-private batch (goal >= 0.5) | time per example ghost / vmap / non-private | "
        "ghost / non-private time (goal <= 1.3) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        g, v, np_ = r["ghost"], r["vmap"], r["non-private"]
        ratio = g["batch"] / max(np_["batch"], 1)
        batch_goal = f"{ratio:.2f}x {'PASS' if ratio >= 0.5 else 'MISS'}"
        if "s_per_example" in g and "s_per_example" in np_:
            t = [f"{x['s_per_example'] * 1e3:.1f}" for x in (g, v, np_)]
            tr = g["s_per_example"] / np_["s_per_example"]
            timing = " / ".join(t) + f" ms (batch {g['time_batch']})"
            time_goal = (
                f"{tr:.2f}x " + ("PASS" if tr <= 1.3 else "MISS")
                if GOALS[r["model"]]
                else f"{tr:.2f}x (no goal)"
            )
        else:
            timing, time_goal = "not timed", "-"
        p = r["paths"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | "
            f"{p['ghost']}/{p['materialised']}/{p['per-example']} | "
            f"{g['batch']} / {v['batch']} / {np_['batch']} | {batch_goal} | {timing} | {time_goal} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
