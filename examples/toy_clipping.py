"""A toy model trained with and without clipping, one bad batch in the middle.

A linear regression trained with SGD; at step 30 one batch has its targets
multiplied by 1e4 (a corrupted batch). Unclipped, that one step throws the
weights far away; clipped with `optaxclip.clip_by_global_norm(1.0)`, training
carries on. The pre-clip norms are read from the optimizer state with
`optaxclip.metrics`.

Run: `python examples/toy_clipping.py` (about 2 s; `make demo` runs the Flax LSTM demo,
`examples/lstm_exploding.py`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

STEPS, BAD_STEP, LR = 60, 30, 0.1


def make_batches(seed=0):
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(8).astype(np.float32)
    for step in range(STEPS):
        x = rng.standard_normal((32, 8)).astype(np.float32)
        y = x @ w_true + 0.01 * rng.standard_normal(32).astype(np.float32)
        if step == BAD_STEP:
            y = y * 1e4  # a corrupted batch
        yield step, jnp.asarray(x), jnp.asarray(y)


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


def train(tx):
    w = jnp.zeros(8)
    state = tx.init(w)

    @jax.jit
    def step(w, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(w, x, y)
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state, loss

    losses, norms = [], []
    for _, x, y in make_batches():
        w, state, loss = step(w, state, x, y)
        losses.append(float(loss))
        norms.append(float(optaxclip.metrics(state)["pre_clip_norm"]))
    return losses, norms, state


def main():
    runs = {
        # clip_by_global_norm(1e30) never fires: an unclipped run with the same stats.
        "no clipping": optax.chain(optaxclip.clip_by_global_norm(1e30), optax.sgd(LR)),
        "clip_by_global_norm(1.0)": optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(LR)),
    }
    print(f"Linear regression, SGD lr={LR}, {STEPS} steps; batch {BAD_STEP} is corrupted (x1e4).\n")
    print(f"{'run':<26} {'norm@1':>10} {'norm@bad':>10} {'loss@bad+1':>12} {'final loss':>12} {'clips':>6}")
    for name, tx in runs.items():
        losses, norms, state = train(tx)
        st = optaxclip.stats(state)
        print(
            f"{name:<26} {norms[0]:>10.3g} {norms[BAD_STEP]:>10.3g} "
            f"{losses[BAD_STEP + 1]:>12.4g} {losses[-1]:>12.4g} {int(st.clip_count):>6}"
        )
    print("\nPre-clip norms (clipped run), read with optaxclip.metrics(opt_state):")
    _, norms, _ = train(runs["clip_by_global_norm(1.0)"])
    print(
        " ".join(f"{n:.3g}" for n in norms[BAD_STEP - 3 : BAD_STEP + 4]),
        f"(steps {BAD_STEP - 3}-{BAD_STEP + 3})",
    )


if __name__ == "__main__":
    main()
