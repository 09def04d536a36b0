"""DP-SGD on a Flax NNX LSTM, next to a non-private run, with the epsilon spent.

A character-level language model on windows of the Python standard
library's own source (every Python install has them); each window is one
example (one "user record"). The private run samples batches by Poisson
sampling (padded to a fixed size with a mask, so nothing recompiles), clips
each example's gradient without forming per-example gradients
(`optaxclip.ghost_clipped_grad_sum`: ghost norms and book-keeping on the
stock `nnx.Embed`, `nnx.RNN(nnx.LSTMCell)` and `nnx.Linear`; `--path vmap`
takes `optaxclip.clipped_grad_sum`, per-example gradients clipped inside
the microbatch loop), adds Gaussian noise and averages
(`optaxclip.dp_aggregate`, or `dp_adaptive_aggregate` with `--adaptive`),
then takes an adam step; it prints the clipped sum's time on both paths.
The noise multiplier is calibrated for the target epsilon, and the epsilon
actually spent is reported with
`optaxclip.privacy`. The non-private run uses the same model, data, batch
size and optimizer.

Run: `python examples/dp_lstm.py` (`--help` for flags). Runs on GPU/TPU when
JAX has one, on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optaxclip
from optaxclip import privacy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from lstm_exploding import CharLSTM, stdlib_corpus  # noqa: E402  (same model and corpus)

DELTA = 1e-5


def windows(seq_len: int, n_train: int, n_test: int):
    """Disjoint `(seq_len + 1)`-character windows: `n_train` to train on, `n_test` held out."""
    data = stdlib_corpus((n_train + n_test) * (seq_len + 1))
    rows = data[: (n_train + n_test) * (seq_len + 1)].reshape(n_train + n_test, seq_len + 1)
    return rows[:n_train], rows[n_train:]


def evaluate(graphdef, params, rest, rows):
    logits = nnx.merge(graphdef, params, rest)(jnp.asarray(rows[:, :-1]))
    labels = jnp.asarray(rows[:, 1:])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return float(loss), float(jnp.mean(jnp.argmax(logits, -1) == labels))


def clipped_sum_fn(args, example_loss, path: str):
    """The clipped per-example sum: ghost norms + book-keeping, or vmap(grad) in microbatches."""
    if path == "ghost":
        return optaxclip.ghost_clipped_grad_sum(example_loss)
    return optaxclip.clipped_grad_sum(example_loss, microbatch_size=args.microbatch)


def padded_size(args) -> int:
    padded = args.batch + 4 * int(np.sqrt(args.batch)) + 8  # Poisson batches fit with overwhelming odds
    return padded + (-padded % args.microbatch)


def train(args, train_rows, test_rows, private: bool, noise_multiplier: float) -> dict:
    model = CharLSTM(args.hidden, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def example_loss(p, row):  # one example: a window, without the batch axis
        logits = nnx.merge(graphdef, p, rest)(row[None, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits[0], row[1:]).mean()

    key = jax.random.key(args.seed)
    if not private:
        tx = optax.adam(args.lr)
    elif args.adaptive:
        tx = optax.chain(
            optaxclip.dp_adaptive_aggregate(args.clip, noise_multiplier, key, expected_batch_size=args.batch),
            optax.adam(args.lr),
        )
    else:
        tx = optax.chain(
            optaxclip.dp_aggregate(args.clip, noise_multiplier, key, expected_batch_size=args.batch),
            optax.adam(args.lr),
        )
    opt_state = tx.init(params)
    clipped_sum = clipped_sum_fn(args, example_loss, args.path)

    @jax.jit
    def private_step(p, s, rows, mask):
        clip = s[0].l2_norm_clip if args.adaptive else args.clip
        summed = clipped_sum(p, rows, l2_norm_clip=clip, mask=mask)
        updates, s = tx.update(summed, s, p)
        return optax.apply_updates(p, updates), s, optaxclip.metrics(s, private_only=True)

    @jax.jit
    def plain_step(p, s, rows, mask):
        def batch_loss(p):
            losses = jax.vmap(example_loss, in_axes=(None, 0))(p, rows)
            return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

        grads = jax.grad(batch_loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, {}

    step = private_step if private else plain_step
    rng = np.random.default_rng(args.seed)
    rate = args.batch / len(train_rows)
    padded = padded_size(args)
    name = "DP-SGD" if private else "non-private"
    t0 = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"{name:>11}", disable=args.no_progress):
        idx, mask = privacy.poisson_batch(rng, len(train_rows), rate, padded)
        params, opt_state, m = step(params, opt_state, jnp.asarray(train_rows[idx]), jnp.asarray(mask))
    jax.block_until_ready(params)
    wall = time.perf_counter() - t0
    loss, acc = evaluate(graphdef, params, rest, test_rows)
    out = {"name": name, "test_loss": loss, "test_accuracy": acc, "wall_s": wall}
    if private:
        out["final_clip_norm"] = float(m["l2_norm_clip"] if args.adaptive else m["threshold"])
    return out


def step_times(args, train_rows, reps: int = 3) -> dict[str, float]:
    """Median ms of the clipped per-example sum (jitted, compiled first) on one padded batch, per path."""
    model = CharLSTM(args.hidden, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def example_loss(p, row):
        logits = nnx.merge(graphdef, p, rest)(row[None, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits[0], row[1:]).mean()

    rows = jnp.asarray(train_rows[: padded_size(args)])
    out = {}
    for path in ("ghost", "vmap"):
        f = clipped_sum_fn(args, example_loss, path)
        step = jax.jit(lambda p, r, f=f: f(p, r, l2_norm_clip=args.clip).grads)
        jax.block_until_ready(step(params, rows))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, rows))
            times.append(time.perf_counter() - t0)
        out[path] = 1e3 * float(np.median(times))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=128, help="expected batch size (Poisson sampling)")
    ap.add_argument("--microbatch", type=int, default=32, help="examples clipped per sequential chunk")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--train-examples", type=int, default=20_000)
    ap.add_argument("--lr", type=float, default=1e-2, help="adam learning rate")
    ap.add_argument(
        "--clip", type=float, default=1.0, help="per-example L2 clip norm (initial, with --adaptive)"
    )
    ap.add_argument("--epsilon", type=float, default=8.0, help="target epsilon at delta=1e-5")
    ap.add_argument("--adaptive", action="store_true", help="dp_adaptive_aggregate (median clip norm)")
    ap.add_argument(
        "--path",
        choices=("ghost", "vmap"),
        default="ghost",
        help="ghost: ghost_clipped_grad_sum (no per-example gradients); vmap: clipped_grad_sum",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    train_rows, test_rows = windows(args.seq_len, args.train_examples, 1000)
    rate = args.batch / len(train_rows)
    # Calibrated without truncation (fast); the epsilon reported is the run's, which
    # accounts for poisson_batch truncating a draw above the padded size.
    nm = privacy.noise_multiplier_for(args.epsilon, rate, args.steps, DELTA)
    truncated = {"truncated_batch_size": padded_size(args), "num_examples": len(train_rows)}
    if args.adaptive:
        spent = privacy.adaptive_epsilon(nm, rate, args.steps, DELTA, args.batch, **truncated)
    else:
        spent = privacy.epsilon(nm, rate, args.steps, DELTA, **truncated)
    print(
        f"Char-LSTM (hidden {args.hidden}) on {len(train_rows):,} windows of {args.seq_len} chars "
        f"of the stdlib's source; {args.steps} steps, expected batch {args.batch} "
        f"(sampling rate {rate:.4f}); device: {jax.devices()[0].platform}\n"
        f"DP-SGD ({args.path} path): clip {args.clip}{' (adaptive, median)' if args.adaptive else ''}, "
        f"noise multiplier {nm:.3f} for epsilon {args.epsilon} at delta {DELTA}"
    )
    runs = [train(args, train_rows, test_rows, private, nm) for private in (False, True)]
    print(f"\n{'run':<12} {'test loss':>9} {'test acc':>9} {'epsilon':>8} {'wall s':>7}")
    for r in runs:
        eps = f"{spent:.3f}" if r["name"] == "DP-SGD" else "inf"
        print(
            f"{r['name']:<12} {r['test_loss']:>9.3f} {r['test_accuracy']:>9.3f} {eps:>8} {r['wall_s']:>7.1f}"
        )
    runs[1]["epsilon"] = spent
    print(
        f"\nPrivacy spent: epsilon = {spent:.3f} at delta = {DELTA} "
        f"(PLD accountant, Poisson sampling truncated to {padded_size(args)})."
    )
    print(f"Final clip norm: {runs[1]['final_clip_norm']:.3f}")
    ms = step_times(args, train_rows)
    runs[1]["clipped_sum_ms"] = ms
    print(
        f"Clipped per-example sum of one padded batch ({padded_size(args)} rows): "
        f"ghost path {ms['ghost']:.1f} ms, vmap path {ms['vmap']:.1f} ms "
        f"(ghost / vmap: {ms['ghost'] / ms['vmap']:.2f}x); this run used the {args.path} path."
    )
    return runs


if __name__ == "__main__":
    main()
