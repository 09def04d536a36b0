"""Tests for optaxclip._stats: ClipStats, stats() and metrics()."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import strict

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


# --- what users log: NNX optimizer state, wrappers' counters, no bookkeeping ----------------


def _nnx_run(jit):
    """Two steps of `nnx.Optimizer` (adaptive_clip + sgd), metrics logged after each."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(optaxclip.adaptive_clip(), optax.sgd(0.1)), wrt=nnx.Param)

    def train_step(model, opt, scale):
        grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)) * scale)))(model)
        opt.update(model, grads)
        return optaxclip.metrics(opt.opt_state), optaxclip.stats(opt.opt_state)

    step = nnx.jit(train_step) if jit else train_step
    logs = [step(model, opt, jnp.float32(s)) for s in (1.0, 10.0)]
    return logs, opt, nnx


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx_jit"])
def test_nnx_optimizer_metrics_are_plain_copies_with_all_fields(jit):
    logs, opt, nnx = _nnx_run(jit)
    # Step 1: the gradient of sum(W x + b) at x = (1, 1) is (1, 1, 1); step 2 at x = (10, 10).
    pre = [float(m["pre_clip_norm"]) for m, _ in logs]
    chex.assert_trees_all_close(pre, [3**0.5, (201.0) ** 0.5], rtol=1e-6)
    chex.assert_trees_all_close([float(s.pre_clip_norm) for _, s in logs], pre, rtol=1e-6)
    tx = optax.chain(optaxclip.adaptive_clip(), optax.sgd(0.1))
    plain = optaxclip.metrics(tx.init({"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}))
    assert set(logs[-1][0]) == set(plain) and "quantile_estimate" in plain
    for m, st in logs:
        for value in [*m.values(), *st]:
            assert type(value) is type(jnp.zeros(())) and not isinstance(value, nnx.Variable)
    assert int(logs[0][0]["step_count"]) == 1 and int(logs[1][0]["step_count"]) == 2
    # The optimizer's own state moved on; what was logged did not.
    assert int(optaxclip.stats(opt.opt_state).step_count) == 2


def test_metrics_survive_a_donated_next_step():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))
    step = jax.jit(lambda s, g: tx.update(g, s)[1], donate_argnums=0)
    state = step(tx.init(G), G)
    logged, st = optaxclip.metrics(state), optaxclip.stats(state)
    state = step(state, {"w": jnp.array([6.0, 8.0])})
    assert float(logged["pre_clip_norm"]) == 5.0 and int(st.step_count) == 1
    assert float(optaxclip.metrics(state)["pre_clip_norm"]) == 10.0


@strict
def test_apply_if_finite_counters_show_the_skipped_step():
    tx = optax.apply_if_finite(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)), 3)
    state = tx.init(G)
    _, state = tx.update(G, state)
    _, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state)
    m = optaxclip.metrics(state)
    # The inner state was rolled back: only the wrapper's counters record the NaN step.
    assert int(m["nonfinite_count"]) == 0 and int(m["step_count"]) == 1
    assert (int(m["notfinite_count"]), int(m["total_notfinite"]), bool(m["last_finite"])) == (1, 1, False)
    assert set(m) == {*optaxclip.ClipStats._fields, "notfinite_count", "last_finite", "total_notfinite"}
    _, state = tx.update(G, state)
    m = optaxclip.metrics(state)
    assert (int(m["notfinite_count"]), int(m["total_notfinite"]), bool(m["last_finite"])) == (0, 1, True)


class LossScaleLikeState(NamedTuple):
    """A wrapper's state that declares its metrics, as the loss-scale wrapper does."""

    loss_scale: jax.Array
    skipped_count: jax.Array
    growth_index: jax.Array  # declared metrics only: this is not reported
    inner_state: Any

    METRIC_FIELDS = ("loss_scale", "skipped_count")


def _wrap(inner):
    return LossScaleLikeState(jnp.float32(2.0**15), jnp.int32(3), jnp.int32(7), inner)


def test_metric_fields_of_a_wrapper_without_clip_stats():
    inner = optax.adam(1e-3).init(G)
    m = optaxclip.metrics(_wrap(inner))
    assert m == {"loss_scale": 2.0**15, "skipped_count": 3}
    with pytest.raises(ValueError, match="no ClipStats.*LossScaleLikeState"):
        optaxclip.stats(_wrap(inner))


def test_metric_fields_of_a_wrapper_around_a_clip_and_nested_wrappers():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))
    m = optaxclip.metrics(_wrap(_step(tx)))
    assert set(m) == {*optaxclip.ClipStats._fields, "loss_scale", "skipped_count"}
    assert float(m["pre_clip_norm"]) == 5.0 and float(m["loss_scale"]) == 2.0**15
    assert float(optaxclip.stats(_wrap(_step(tx))).pre_clip_norm) == 5.0
    twice = optaxclip.metrics(_wrap(_wrap(_step(tx))))  # same names twice: prefixed by path
    assert {"loss_scale", "inner_state/loss_scale", "pre_clip_norm"} <= set(twice)
    assert "skipped_count" in twice and "inner_state/skipped_count" in twice


def test_bookkeeping_left_out_meaningful_fields_kept():
    m = optaxclip.metrics(_step(optaxclip.adaptive_clip(window=8), n=3))
    assert "history_index" not in m
    assert {"quantile_estimate", "finite_norm_count"} <= set(m) and int(m["finite_norm_count"]) == 3
    z = optaxclip.metrics(_step(optaxclip.zscore_clip(), n=2))
    assert {"norm_ema_mean", "norm_ema_var", "finite_norm_count"} <= set(z)
    skip = optaxclip.skip_spikes(optax.sgd(1.0), window=8, warmup_steps=4)
    s = optaxclip.metrics(_step(skip, n=2))
    assert "history_index" not in s and "consecutive_skips" in s


def test_metrics_report_the_full_value_clip_fraction():
    tx = optax.chain(optaxclip.clip_by_value(0.5, stats="full"), optax.sgd(1.0))
    m = optaxclip.metrics(_step(tx))
    assert float(m["clipped_fraction"]) == 1.0 and bool(m["clipped"])
    assert set(m) == {*optaxclip.ClipStats._fields, "clipped_fraction"}
