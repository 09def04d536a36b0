"""Tests for optaxclip._stats: ClipStats, stats() and metrics()."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optaxclip

G = {"w": jnp.array([3.0, 4.0])}


def _step(tx, grads=G, n=1):
    state = tx.init(grads)
    for _ in range(n):
        _, state = tx.update(grads, state, grads)
    return state


def test_stats_single_transform_fields():
    st = optaxclip.stats(_step(optaxclip.clip_by_global_norm(1.0), n=2))
    assert isinstance(st, optaxclip.ClipStats)
    assert float(st.pre_clip_norm) == 5.0
    assert abs(float(st.post_clip_norm) - 1.0) < 1e-6
    assert float(st.threshold) == 1.0
    assert bool(st.clipped)
    assert (int(st.step_count), int(st.clip_count), int(st.nonfinite_count)) == (2, 2, 0)
    for field in st:
        assert isinstance(field, jax.Array) and field.shape == ()


@pytest.mark.parametrize(
    "wrap, path",
    [
        (lambda t: optax.chain(t, optax.adam(1e-3)), "0"),
        (lambda t: optax.MultiSteps(optax.chain(t, optax.sgd(1.0)), 1), "inner_opt_state/0"),
        (lambda t: optax.masked(t, {"w": True}), "inner_state"),
        (lambda t: optax.chain(optax.apply_if_finite(t, 3)), "0/inner_state"),
    ],
)
def test_stats_found_inside_nested_states(wrap, path):
    state = _step(wrap(optaxclip.clip_by_global_norm(1.0)))
    assert float(optaxclip.stats(state).pre_clip_norm) == 5.0
    two = optax.chain(wrap(optaxclip.clip_by_global_norm(1.0)), optaxclip.clip_by_value(0.5))
    found = optaxclip.stats(_step(two))
    assert isinstance(found, dict) and len(found) == 2
    assert f"0/{path}" in found and "1" in found
    assert float(found["1"].threshold) == 0.5


def test_stats_through_inject_hyperparams():
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=2.0)
    st = optaxclip.stats(_step(tx))
    assert float(st.threshold) == 2.0


def test_metrics_flat_dict_single_and_several():
    m = optaxclip.metrics(_step(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))))
    assert set(m) == set(optaxclip.ClipStats._fields)
    assert float(m["pre_clip_norm"]) == 5.0 and int(m["clip_count"]) == 1
    tx = optax.chain(optaxclip.clip_by_value(10.0), optaxclip.clip_by_global_norm(1.0))
    m2 = optaxclip.metrics(_step(tx))
    assert float(m2["0/pre_clip_norm"]) == 5.0 and not bool(m2["0/clipped"])
    assert bool(m2["1/clipped"]) and len(m2) == 2 * len(optaxclip.ClipStats._fields)


def test_metrics_inside_jit():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))

    @jax.jit
    def step(state):
        _, state = tx.update(G, state)
        return optaxclip.metrics(state)

    assert float(step(tx.init(G))["pre_clip_norm"]) == 5.0


def test_no_stats_raises_with_type():
    with pytest.raises(ValueError, match="no ClipStats.*ScaleByAdamState"):
        optaxclip.stats(optax.scale_by_adam().init(G))
    with pytest.raises(ValueError, match="no ClipStats"):
        optaxclip.metrics(optax.EmptyState())


def test_counters_saturate_not_wrap():
    from optaxclip import _stats

    st = _stats.init_stats()._replace(step_count=jnp.int32(2**31 - 1))
    st = _stats.record(
        st,
        pre_clip_norm=jnp.float32(1),
        post_clip_norm=jnp.float32(1),
        threshold=jnp.float32(1),
        clipped=False,
    )
    chex.assert_trees_all_equal(st.step_count, jnp.int32(2**31 - 1))


def test_state_can_be_donated_in_a_jitted_step():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    params = {"w": jnp.ones(2), "s": jnp.float32(1.0)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(0, 1))
    updates, state = step(params, state, {"w": jnp.array([3.0, 4.0]), "s": jnp.float32(0.0)})
    assert float(optaxclip.stats(state).pre_clip_norm) == 5.0
