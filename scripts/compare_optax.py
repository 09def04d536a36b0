"""Bad-input cases, side by side: optax's output and optaxclip's.

Prints a markdown table. Run: `make compare`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip


def run(make_tx, grads, params=None, inject=None):
    """Applies one update; `inject` sets hyperparams after init. Returns a short string."""
    try:
        tx = make_tx()
        state = tx.init(grads if params is None else params)
        if inject:
            for k, v in inject.items():
                state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
        out, _ = jax.jit(tx.update)(grads, state, params)
        return " ".join(
            f"{np.asarray(x, np.float64).round(4).tolist()}"
            + (f" {x.dtype}" if x.dtype != jnp.float32 else "")
            for x in jax.tree.leaves(out)
        )
    except Exception as e:  # noqa: BLE001 - the table shows what each library raises
        msg = str(e).split("\n")[0]
        return f"{type(e).__name__}: {msg[:90]}"


def ctor(fn, *args, **kwargs):
    """Constructs eagerly so errors raised at construction show."""
    tx = fn(*args, **kwargs)
    return lambda: tx


def _no_optax_counterpart():
    raise NotImplementedError("optax has no per-leaf norm clip with a threshold pytree")


def main():
    g16 = {"w": jnp.array([300.0, 400.0], jnp.float16)}
    g30 = {"w": jnp.array([1e30, 1e30])}
    g34 = {"w": jnp.array([3.0, 4.0])}
    zeros = {"w": jnp.zeros(2)}
    mixed = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([3.0, 4.0], jnp.bfloat16)}
    ginf = {"w": jnp.array([jnp.inf, 0.5])}
    cases = [
        (
            "global norm, float16 [300, 400], max_norm=1",
            g16,
            None,
            lambda: optax.clip_by_global_norm(1.0),
            lambda: optaxclip.clip_by_global_norm(1.0),
            None,
        ),
        (
            "global norm, float32 [1e30, 1e30], max_norm=1",
            g30,
            None,
            lambda: optax.clip_by_global_norm(1.0),
            lambda: optaxclip.clip_by_global_norm(1.0),
            None,
        ),
        (
            "global norm, zero grads, max_norm=0 (inject_hyperparams)",
            zeros,
            None,
            lambda: optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
            lambda: optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0),
            {"max_norm": 0.0},
        ),
        (
            "global norm, [3, 4], max_norm=-1",
            g34,
            None,
            lambda: ctor(optax.clip_by_global_norm, -1.0)(),
            lambda: ctor(optaxclip.clip_by_global_norm, -1.0)(),
            None,
        ),
        (
            "global norm, max_norm=0",
            g34,
            None,
            lambda: ctor(optax.clip_by_global_norm, 0.0)(),
            lambda: ctor(optaxclip.clip_by_global_norm, 0.0)(),
            None,
        ),
        (
            "inject_hyperparams, float32 + bfloat16 tree, max_norm=1",
            mixed,
            None,
            lambda: optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
            lambda: optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0),
            None,
        ),
        (
            "value clip [inf, 0.5] to 0.1 (optax.clip(0.1))",
            ginf,
            None,
            lambda: optax.clip(0.1),
            lambda: optaxclip.clip_by_value(0.1),
            None,
        ),
        (
            "value clip, min_value=2 > max_value=1 (optax: clip(-1))",
            g34,
            None,
            lambda: ctor(optax.clip, -1.0)(),
            lambda: ctor(optaxclip.clip_by_value, 1.0, min_value=2.0)(),
            None,
        ),
        (
            "leaf norm, threshold tree {'a'} for tree {'a', 'b'}",
            mixed,
            None,
            _no_optax_counterpart,
            lambda: optaxclip.clip_by_leaf_norm({"a": 1.0}),
            None,
        ),
        (
            "AGC without params",
            g34,
            None,
            lambda: optax.adaptive_grad_clip(0.01),
            lambda: optaxclip.adaptive_grad_clip(0.01),
            None,
        ),
        (
            "AGC, float16 grads [30000, 40000], params [1000, 1000]",
            {"w": jnp.array([30000.0, 40000.0], jnp.float16)},
            {"w": jnp.full((2,), 1000.0, jnp.float16)},
            lambda: optax.adaptive_grad_clip(0.01),
            lambda: optaxclip.adaptive_grad_clip(0.01),
            None,
        ),
    ]
    print(f"optax {optax.__version__}, optaxclip {optaxclip.__version__}, jax {jax.__version__}\n")
    print(f"| case | optax {optax.__version__} | optaxclip |")
    print("| --- | --- | --- |")
    for name, grads, params, make_optax, make_ours, inject in cases:
        a = run(make_optax, grads, params, inject)
        b = run(make_ours, grads, params, inject)
        print(f"| {name} | {a} | {b} |")


if __name__ == "__main__":
    main()
