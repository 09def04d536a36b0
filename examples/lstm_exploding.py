"""A Flax NNX LSTM that blows up unclipped and trains clipped: `make demo`.

A character-level language model on the Python standard library's own
source files (every Python install has them), trained with plain SGD as in
Pascanu et al. 2013, its learning rate warmed up over 100 steps to 25: a
rate at which the unclipped run hits gradient spikes that throw its loss far
above a uniform guess's, and it never gets back to where it was. The same
model, data and seed are trained with each clipping configuration; per-step
metrics are read from the optimizer state with `optaxclip.metrics` and saved
as CSV, a figure shows loss and pre-clip norm per step, a table sums each
run up, and `optaxclip.diagnose` says what each norm history means.

Run: `make demo`, or `python examples/lstm_exploding.py --help` for flags.
Runs on GPU/TPU when JAX has one, on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optaxclip

VOCAB = 128  # ASCII


def stdlib_corpus(n_chars: int = 400_000) -> np.ndarray:
    """ASCII codes of the first `n_chars` of the standard library's `*.py` files (sorted)."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
        total += len(parts[-1])
        if total >= n_chars:
            break
    text = "".join(parts)[:n_chars].encode("ascii", "replace")
    return np.frombuffer(text, np.uint8).astype(np.int32)


class CharLSTM(nnx.Module):
    """Embedding -> `nnx.RNN` over an `nnx.LSTMCell` -> linear head."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, embed: int = 32, vocab: int = VOCAB):
        self.embed = nnx.Embed(vocab, embed, rngs=rngs)
        self.rnn = nnx.RNN(nnx.LSTMCell(embed, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, vocab, rngs=rngs)
        self.hidden = hidden

    def __call__(self, tokens: jax.Array) -> jax.Array:
        zeros = jnp.zeros((tokens.shape[0], self.hidden))
        return self.head(self.rnn(self.embed(tokens), initial_carry=(zeros, zeros)))


CONFIGS = {
    # A clip that can never fire: same updates as no clipping, with the same stats.
    "none": lambda: optaxclip.clip_by_global_norm(math.inf),
    "global_norm": lambda: optaxclip.clip_by_global_norm(1.0),
    "value": lambda: optaxclip.clip_by_value(0.01),
    # Every layer, the classifier head included: with the NFNets mask that leaves
    # the head unclipped, this task's spikes come through the head (see docs/demo.md).
    "agc": lambda: optaxclip.adaptive_grad_clip(0.01),
    "adaptive": lambda: optaxclip.adaptive_clip(),
    "zscore": lambda: optaxclip.zscore_clip(),
    # AdaGC: the global clip of `global_norm` for 100 steps, then each tensor to 1.05x
    # an EMA of its own clipped norms.
    "adagc": lambda: optaxclip.adagc_clip(),
    # Per-layer value bounds, the long-sequence recipe's shape: the output layer gets a
    # range 10x wider than the recurrent layers (and the embedding feeding them).
    "layer_value": lambda: optaxclip.clip_by_value(layer_value_bound),
    # The typical norm of healthy training, which fast-growing norms (with a rising loss,
    # passed as `loss=`) cannot drag up.
    "guard": lambda: optaxclip.guard_clip(),
}

# The recipe's own bounds are [-100, 100] for the output layer and [-10, 10] for the
# recurrent layers. On this task they never fire: over the unclipped 300-step run the
# largest gradient elements are 0.68 (head), 7.5 (LSTM cell) and 1.4 (embedding), as this
# loss is a mean over 32x64 tokens. The demo keeps the recipe's 10:1 ratio at the scale
# of its `value` config (0.01); `scale=1.0` gives the recipe's own numbers.
LAYER_VALUE_SCALE = 1e-3


def layer_value_bound(path, leaf, scale: float = LAYER_VALUE_SCALE) -> float:
    """`clip_by_value` bound of a parameter: `100 * scale` for the output layer (`head`), else 10x less."""
    del leaf
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return (100.0 if "head" in names else 10.0) * scale


def batches(data: np.ndarray, steps: int, batch: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        start = rng.integers(0, len(data) - seq_len - 1, batch)
        idx = start[:, None] + np.arange(seq_len + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def train(name: str, clip, args, data, progress: bool = True) -> dict:
    """Trains one configuration; returns its per-step metrics and summary."""
    model = CharLSTM(args.hidden, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lr = optax.linear_schedule(0.0, args.lr, args.lr_warmup) if args.lr_warmup else args.lr
    tx = optax.chain(clip, optax.sgd(lr, momentum=args.momentum or None))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p, loss=loss)  # the chain hands `loss` to guard_clip
        m = optaxclip.metrics(s)
        out = {"loss": loss, **{k: m[k] for k in ("pre_clip_norm", "threshold", "clipped")}}
        return optax.apply_updates(p, updates), s, out, m

    writer = None
    if args.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(pathlib.Path(args.tensorboard) / name))
    rows, first_nonfinite = [], None
    bar = tqdm(total=args.steps, desc=f"{name:>11}", disable=not progress, leave=True)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches(data, args.steps, args.batch, args.seq_len, args.seed)):
        params, opt_state, out, m = step(params, opt_state, x, y)
        row = {k: float(v) for k, v in out.items()}
        row["step"] = i
        if writer is not None:  # every scalar optaxclip.metrics reports, as TensorBoard scalars
            writer.add_scalar("loss", row["loss"], i)
            for key, value in jax.device_get(m).items():
                writer.add_scalar(f"clip/{key}", float(value), i)
        rows.append(row)
        bar.update(1)
        if i % 10 == 0:
            bar.set_postfix(loss=f"{row['loss']:.3g}", norm=f"{row['pre_clip_norm']:.3g}")
        if not (math.isfinite(row["loss"]) and math.isfinite(row["pre_clip_norm"])):
            first_nonfinite = i  # the run is dead: everything after is NaN
            bar.set_postfix(loss="nan", note=f"non-finite at step {i}")
            break
    bar.close()
    wall = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    losses = np.array([r["loss"] for r in rows])
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "name": name,
        "rows": rows,
        "final_loss": float(np.mean(tail)) if first_nonfinite is None else math.nan,
        "min_loss": float(np.nanmin(losses)),
        # A loss spike: the largest rise of the loss above its best so far (finite steps).
        "max_rise": max_rise(losses),
        "first_nonfinite": first_nonfinite,
        "clip_rate": float(np.mean([r["clipped"] for r in rows])),
        "max_norm": float(np.nanmax([r["pre_clip_norm"] for r in rows])),
        "wall_s": wall,
    }


def max_rise(losses: np.ndarray) -> float:
    """The largest rise of the loss above its lowest value so far, over its finite steps."""
    finite = losses[np.isfinite(losses)]
    return float(np.max(finite - np.minimum.accumulate(finite))) if finite.size else math.nan


def write_csv(runs: list[dict], path: pathlib.Path) -> None:
    fields = ["config", "step", "loss", "pre_clip_norm", "threshold", "clipped"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for run in runs:
            for r in run["rows"]:
                w.writerow({"config": run["name"], **{k: r[k] for k in fields[1:]}})


def plot(runs: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i}"
        steps = [r["step"] for r in run["rows"]]
        loss = np.array([r["loss"] for r in run["rows"]])
        norm = np.array([r["pre_clip_norm"] for r in run["rows"]])
        thr = np.array([r["threshold"] for r in run["rows"]])
        ax_loss.plot(steps, loss, color=color, lw=1, label=run["name"])
        ax_norm.plot(steps, norm, color=color, lw=1, label=run["name"])
        if np.any(np.isfinite(thr)) and run["name"] not in ("agc", "value", "layer_value"):
            ax_norm.plot(steps, thr, color=color, lw=1, ls="--", alpha=0.7)
        if run["first_nonfinite"] is not None:
            s = run["first_nonfinite"]
            for ax in (ax_loss, ax_norm):
                ax.axvline(s, color=color, ls=":", lw=1.5)
            ax_loss.annotate(
                f"{run['name']}: non-finite",
                (s, 0.95),
                xycoords=("data", "axes fraction"),
                color=color,
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
    ax_loss.set_ylabel("training loss")
    finite = [r["loss"] for run in runs for r in run["rows"] if math.isfinite(r["loss"])]
    ax_loss.set_ylim(0, min(max(finite) * 1.05, 3 * math.log(VOCAB)))
    ax_norm.set_yscale("log")
    ax_norm.set_ylabel("pre-clip global norm (dashed: threshold)")
    ax_norm.set_xlabel("step")
    ax_loss.legend(ncol=3, fontsize=8)
    ax_loss.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(runs: list[dict]) -> str:
    head = (
        f"{'config':<12} {'final loss':>10} {'min loss':>9} {'max rise':>8} {'non-finite at':>13} "
        f"{'clip rate':>9} {'max norm':>9} {'wall s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        nf = "-" if r["first_nonfinite"] is None else str(r["first_nonfinite"])
        lines.append(
            f"{r['name']:<12} {r['final_loss']:>10.3f} {r['min_loss']:>9.3f} {r['max_rise']:>8.2f} {nf:>13} "
            f"{r['clip_rate']:>9.2f} {r['max_norm']:>9.3g} {r['wall_s']:>7.1f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=25.0, help="peak SGD learning rate")
    ap.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (0: plain SGD)")
    ap.add_argument("--lr-warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    ap.add_argument("--out", default="out/demo", help="folder for metrics.csv and lstm_exploding.png")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ap.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="write TensorBoard event files (loss and optaxclip.metrics per step) to DIR/<config>",
    )
    args = ap.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = stdlib_corpus()
    print(
        f"Char-LSTM (hidden {args.hidden}) on {len(data):,} chars of the stdlib's source; "
        f"SGD lr={args.lr} (warm-up {args.lr_warmup} steps), momentum {args.momentum}; "
        f"{args.steps} steps of {args.batch}x{args.seq_len}; "
        f"device: {jax.devices()[0].platform}"
    )
    runs = [train(c, CONFIGS[c](), args, data, not args.no_progress) for c in args.configs.split(",")]
    write_csv(runs, out / "metrics.csv")
    title = f"Char-LSTM, SGD lr={args.lr} (warm-up {args.lr_warmup} steps): clipping configurations"
    plot(runs, out / "lstm_exploding.png", title)
    print()
    print(summary_table(runs))
    print(
        "(final loss: mean of the last 10% of steps; max rise: the largest rise of the loss "
        f"above its best so far, a spike; a uniform guess scores ln({VOCAB}) = {math.log(VOCAB):.2f})"
    )
    print(f"\nWrote {out / 'metrics.csv'} and {out / 'lstm_exploding.png'}.")
    print("\nDiagnosis of each run's norm history (optaxclip.diagnose):")
    for r in runs:
        rows = r["rows"]
        findings = optaxclip.diagnose(
            [x["pre_clip_norm"] for x in rows],
            thresholds=[x["threshold"] for x in rows],
            losses=[x["loss"] for x in rows],
            clipped=[x["clipped"] for x in rows],  # value/AGC thresholds are not global norms
        )
        print(f"\n[{r['name']}]")
        print(optaxclip.format_findings(findings))
    return runs


if __name__ == "__main__":
    main()
