"""Every transform in the stacks users run it in: an orbax checkpoint round trip mid-run,
`optax.partition` (one labelled part clipped, the rest frozen), and `jax.vmap` over optimizer
states; each checked against the plain run of the same transform."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optaxclip

B = 3  # examples per DP batch

# name -> (factory, whether the updates carry a per-example batch axis). Thresholds bind on the
# stream below; the adaptive clips use short windows so that they act within the run.
CASES = {
    "clip_by_global_norm": (lambda: optaxclip.clip_by_global_norm(1.0), False),
    "clip_by_leaf_norm": (lambda: optaxclip.clip_by_leaf_norm(0.5), False),
    "clip_by_value": (lambda: optaxclip.clip_by_value(0.3), False),
    "clip_by_value_full": (lambda: optaxclip.clip_by_value(0.3, stats="full"), False),
    "adaptive_grad_clip": (lambda: optaxclip.adaptive_grad_clip(0.05), False),
    "adaptive_clip": (lambda: optaxclip.adaptive_clip(window=4, warmup_steps=2), False),
    "adaptive_clip_streaming": (
        lambda: optaxclip.adaptive_clip(estimator="streaming", warmup_steps=2),
        False,
    ),
    "zscore_clip": (lambda: optaxclip.zscore_clip(warmup_steps=2), False),
    "guard_clip": (lambda: optaxclip.guard_clip(), False),
    "adagc_clip": (lambda: optaxclip.adagc_clip(warmup_steps=2), False),
    "skip_spikes": (
        lambda: optaxclip.skip_spikes(optaxclip.clip_by_global_norm(1.0), window=4, warmup_steps=2),
        False,
    ),
    "dynamic_loss_scale": (
        lambda: optaxclip.dynamic_loss_scale(optaxclip.clip_by_global_norm(1.0), growth_interval=2),
        False,
    ),
    "dp_aggregate": (lambda: optaxclip.dp_aggregate(1.0, 0.5, jax.random.key(0)), True),
    "dp_adaptive_aggregate": (
        lambda: optaxclip.dp_adaptive_aggregate(1.0, 0.25, jax.random.key(1), expected_batch_size=B),
        True,
    ),
}
STEPS, SAVED_AT = 7, 4


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
        "h": jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16),
    }


def _grads(step, per_example, seed=0):
    """Step `step`'s gradients: ordinary norms, a 100x spike at step 3, a NaN at step 5."""
    rng = np.random.default_rng(1000 * seed + step)
    scale = 100.0 if step == 3 else 1.0
    lead = (B,) if per_example else ()
    g = {
        k: jnp.asarray(rng.standard_normal(lead + p.shape) * scale * 0.3, p.dtype)
        for k, p in _params().items()
    }
    if step == 5:
        g["b"] = g["b"].at[..., 0].set(jnp.nan)
    return g


def _update(tx):
    """The jitted `update(grads, state, params, loss)`; `loss=` only where the transform takes it."""
    takes_loss = isinstance(tx, optax.GradientTransformationExtraArgs)

    def update(g, s, p, loss):
        return tx.update(g, s, p, loss=loss) if takes_loss else tx.update(g, s, p)

    return jax.jit(update)


def _run(update, state, params, steps, per_example, seed=0):
    """Runs `steps` (a range) of the stream; returns the updates of each step and the last state."""
    outs = []
    for t in steps:
        upd, state = update(_grads(t, per_example, seed), state, params, jnp.float32(3.0 - 0.1 * t))
        outs.append(upd)
    return outs, state


def _assert_same(a, b, exact=True):
    """Equal leaves (NaN where NaN); `exact=False`: to float32 rounding (another program's sum order)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)


@functools.cache
def _case(name):
    factory, per_example = CASES[name]
    tx = factory()
    return tx, _update(tx), per_example


@pytest.mark.parametrize("name", sorted(CASES))
def test_orbax_round_trip_mid_run_resumes_bit_identically(name, tmp_path):
    tx, update, per_example = _case(name)
    params = _params()
    outs, state = _run(update, tx.init(params), params, range(SAVED_AT), per_example)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt_state", state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / "opt_state", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_same(restored, state)

    rest = range(SAVED_AT, STEPS)
    want, want_state = _run(update, state, params, rest, per_example)
    got, got_state = _run(update, restored, params, rest, per_example)
    _assert_same(got, want)
    _assert_same(got_state, want_state)
    # The stats read from the restored run are the uninterrupted run's, and they moved.
    _assert_same(optaxclip.metrics(got_state), optaxclip.metrics(want_state))
    assert int(np.max(jax.tree.leaves(optaxclip.metrics(got_state)["step_count"]))) >= STEPS - 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_partition_clips_its_part_as_alone_and_leaves_the_rest(name):
    tx, update_alone, per_example = _case(name)
    labels = {"w": "clip", "b": "clip", "h": "frozen"}
    part = optax.partition({"clip": tx, "frozen": optax.set_to_zero()}, labels)
    update = _update(part)
    params = _params()
    sub = {k: v for k, v in params.items() if labels[k] == "clip"}
    state, alone_state = part.init(params), tx.init(sub)
    for t in range(STEPS):
        g = _grads(t, per_example)
        loss = jnp.float32(3.0 - 0.1 * t)
        out, state = update(g, state, params, loss)
        want, alone_state = update_alone({k: g[k] for k in sub}, alone_state, sub, loss)
        _assert_same({k: out[k] for k in sub}, want, exact=False)
    # The same ClipStats, found under the partition's path (several: keyed by their paths).
    got, want = optaxclip.stats(state), optaxclip.stats(alone_state)
    if isinstance(want, dict):
        assert all(k.startswith("inner_states/clip/") for k in got) and len(got) == len(want)
        got, want = list(got.values()), list(want.values())
    _assert_same(got, want, exact=False)
    # metrics(): the same fields, in the same order, with the same values.
    got, want = optaxclip.metrics(state), optaxclip.metrics(alone_state)
    assert [k.rsplit("/", 1)[-1] for k in got] == [k.rsplit("/", 1)[-1] for k in want]
    _assert_same(list(got.values()), list(want.values()), exact=False)
    assert max(int(v) for k, v in got.items() if k.endswith("step_count")) >= STEPS - 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_over_optimizer_states_equals_each_run(name):
    tx, update, per_example = _case(name)
    seeds = (0, 1, 2)
    params = [_params(s) for s in seeds]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
    vupdate = jax.jit(jax.vmap(update))
    states = [tx.init(p) for p in params]
    vstate = jax.vmap(tx.init)(stack(params))
    for t in range(STEPS):
        grads = [_grads(t, per_example, s) for s in seeds]
        loss = jnp.full((len(seeds),), 3.0 - 0.1 * t, jnp.float32)
        vout, vstate = vupdate(stack(grads), vstate, stack(params), loss)
        for i in range(len(seeds)):
            out, states[i] = update(grads[i], states[i], params[i], loss[i])
            _assert_same(jax.tree.map(lambda x, i=i: x[i], vout), out, exact=False)
    for i in range(len(seeds)):
        _assert_same(jax.tree.map(lambda x, i=i: x[i], vstate), states[i], exact=False)
