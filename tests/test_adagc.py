"""adagc_clip against a float64 NumPy reference of AdaGC's rules (Wang et al. 2025)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from conftest import assert_close_to_reference, mixed_tree, strict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optaxclip


def adagc_reference(grad_steps, clipping, ema_decay, warmup_steps, max_norm):
    """AdaGC in float64 from the paper's rules: each step's clipped leaves, and the final EMAs.

    Warm-up (the first `warmup_steps` finite steps): global clip to `max_norm`,
    gamma_i = min of the clipped norms (zeros not recorded). Then per tensor:
    clip ||g_i|| to clipping * gamma_i, gamma_i = beta * gamma_i + (1 - beta) * ||g_hat_i||
    (a tensor without a recorded norm takes its first positive one). A step whose global
    norm is not finite changes no EMA and does not count.
    """
    gamma, count, outs = None, 0, []
    for leaves in grad_steps:
        g = [np.asarray(x, np.float64) for x in leaves]
        norms = np.array([np.sqrt(np.sum(x**2)) for x in g])
        total = np.sqrt(np.sum(norms**2))
        gamma = np.full(len(g), np.inf) if gamma is None else gamma
        finite = np.isfinite(total)
        if count < warmup_steps:
            h = max_norm / total if finite and total > max_norm else 1.0
            factors = np.full(len(g), h)
        else:
            bound = clipping * gamma
            with np.errstate(invalid="ignore", divide="ignore"):
                clip = np.isfinite(norms) & np.isfinite(bound) & (norms > bound)
                factors = np.where(clip, bound / norms, 1.0)
        clipped = norms * factors
        if finite:
            if count < warmup_steps:
                gamma = np.where(clipped > 0, np.minimum(gamma, clipped), gamma)
            else:
                first = np.where(clipped > 0, clipped, np.inf)
                gamma = np.where(np.isinf(gamma), first, ema_decay * gamma + (1 - ema_decay) * clipped)
            count += 1
        outs.append([x * f for x, f in zip(g, factors, strict=True)])
    return outs, gamma


def spiky_steps(n_steps, spike_at, spike_leaf="kernel", scale=100.0):
    """mixed_tree gradients of varying size, with one tensor blown up by `scale` at `spike_at`."""
    steps = []
    for t in range(n_steps):
        g = mixed_tree(seed=t, scale=0.5 + 0.1 * (t % 4))
        if t in spike_at:
            g[spike_leaf] = (g[spike_leaf].astype(jnp.float32) * scale).astype(g[spike_leaf].dtype)
        steps.append(g)
    return steps


class AdaGCClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("defaults_short_warmup", 1.05, 0.98, 3, 1.0),
        ("tight", 1.0, 0.5, 2, 0.1),
        ("no_warmup", 1.5, 0.9, 0, 1.0),
    )
    def test_matches_reference(self, clipping, ema_decay, warmup_steps, max_norm):
        steps = spiky_steps(10, spike_at={5, 8})
        tx = optaxclip.adagc_clip(clipping, ema_decay, warmup_steps, max_norm)
        state = tx.init(steps[0])
        update = self.variant(strict(tx.update))
        expected, gamma = adagc_reference(
            [jax.tree.leaves(g) for g in steps], clipping, ema_decay, warmup_steps, max_norm
        )
        for g, ref_leaves in zip(steps, expected, strict=True):
            out, state = update(g, state)
            chex.assert_trees_all_equal_shapes_and_dtypes(out, g)
            assert_close_to_reference(out, jax.tree.unflatten(jax.tree.structure(g), ref_leaves))
        np.testing.assert_allclose(state.norm_ema, gamma, rtol=2e-5)
        assert int(state.finite_norm_count) == 10 and int(state.stats.step_count) == 10

    @chex.variants(with_jit=True, without_jit=True)
    def test_spike_in_one_tensor_leaves_the_others_alone(self):
        tx = optaxclip.adagc_clip(warmup_steps=2, max_norm=100.0)
        g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
        state = tx.init(g)
        update = self.variant(tx.update)
        for _ in range(4):
            out, state = update(g, state)
            chex.assert_trees_all_close(out, g)  # steady norms: nothing clipped
        spike = {"a": jnp.array([300.0, 400.0]), "b": jnp.array([1.0])}
        out, state = update(spike, state)
        np.testing.assert_allclose(optax.tree.norm(out["a"]), 1.05 * 5.0, rtol=1e-6)
        np.testing.assert_allclose(out["b"], [1.0])
        assert bool(state.stats.clipped) and int(state.clipped_tensor_count) == 1
        np.testing.assert_allclose(state.tensor_threshold, [1.05 * 5.0, 1.05], rtol=1e-6)
        np.testing.assert_allclose(float(state.stats.pre_clip_norm), np.sqrt(500.0**2 + 1), rtol=1e-6)
        np.testing.assert_allclose(float(state.stats.post_clip_norm), np.sqrt(5.25**2 + 1), rtol=1e-6)
        np.testing.assert_allclose(float(state.stats.threshold), np.sqrt(5.25**2 + 1.05**2), rtol=1e-6)
        # The EMA moved by the clipped norm only: 0.98 * 5 + 0.02 * 5.25.
        np.testing.assert_allclose(state.norm_ema, [0.98 * 5 + 0.02 * 5.25, 1.0], rtol=1e-6)

    def test_warmup_is_a_global_clip(self):
        tx = optaxclip.adagc_clip(warmup_steps=5, max_norm=1.0)
        g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
        out, state = tx.update(g, tx.init(g))
        chex.assert_trees_all_close(out, {"a": jnp.array([0.6]), "b": jnp.array([0.8])})
        assert float(state.stats.threshold) == 1.0 and bool(state.stats.clipped)
        assert int(state.clipped_tensor_count) == 2
        assert np.all(np.isinf(state.tensor_threshold))
        np.testing.assert_allclose(state.norm_ema, [0.6, 0.8], rtol=1e-6)  # the clipped norms

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("nan", jnp.nan), ("inf", jnp.inf))
    def test_nonfinite_step_never_poisons_the_ema(self, bad):
        tx = optaxclip.adagc_clip(warmup_steps=1, max_norm=100.0)
        g = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([2.0])}
        state = tx.init(g)
        update = self.variant(tx.update)
        for _ in range(3):
            _, state = update(g, state)
        before = state
        out, state = update({"a": jnp.array([bad, 1.0]), "b": jnp.array([20.0])}, state)
        assert not np.isfinite(float(out["a"][0]))  # passed through, not turned into garbage
        np.testing.assert_allclose(out["b"], [2.1], rtol=1e-6)  # the finite tensor is still clipped
        chex.assert_trees_all_equal(state.norm_ema, before.norm_ema)
        assert int(state.finite_norm_count) == int(before.finite_norm_count)
        assert int(state.stats.nonfinite_count) == 1

    def test_zero_gradient_stays_zero_and_zero_norms_do_not_freeze_a_tensor(self):
        tx = optaxclip.adagc_clip(warmup_steps=2, max_norm=10.0)
        zero = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
        state = tx.init(zero)
        out, state = jax.jit(tx.update)(zero, state)
        chex.assert_trees_all_equal(out, zero)
        # Layers below a zero-initialized head get zero gradients at first: not recorded.
        _, state = tx.update({"a": jnp.zeros(2), "b": jnp.array([1.0])}, state)
        assert np.isinf(float(state.norm_ema[0]))
        g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
        out, state = tx.update(g, state)
        chex.assert_trees_all_close(out, g)  # first positive norm after warm-up: taken, unclipped
        np.testing.assert_allclose(state.norm_ema, [5.0, 1.0], rtol=1e-6)
        out, _ = tx.update({"a": jnp.array([30.0, 40.0]), "b": jnp.array([1.0])}, state)
        np.testing.assert_allclose(optax.tree.norm(out["a"]), 5.25, rtol=1e-6)

    def test_integer_leaves_pass_through(self):
        tx = optaxclip.adagc_clip(warmup_steps=0)
        params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
        state = tx.init(params)
        assert state.norm_ema.shape == (1,)
        grads = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
        out, state = jax.jit(tx.update)(grads, state)
        assert out["step"].dtype == jnp.int32 and int(out["step"]) == 0

    def test_vmap_over_states(self):
        tx = optaxclip.adagc_clip(warmup_steps=1, max_norm=10.0)
        g = jnp.ones((3, 4))
        states = jax.vmap(tx.init)(g)
        _, states = jax.vmap(tx.update)(g, states)
        out, states = jax.jit(jax.vmap(tx.update))(g * jnp.array([[1.0], [10.0], [100.0]]), states)
        np.testing.assert_allclose(jnp.linalg.norm(out, axis=1), [2.0, 2.1, 2.1], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clipping": 0.0}, "clipping"),
        ({"clipping": float("nan")}, "clipping"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": -1.0}, "max_norm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"adagc_clip: `{match}`.*{match}="):
        optaxclip.adagc_clip(**kwargs)


def test_init_needs_params_of_the_updates_structure():
    tx = optaxclip.adagc_clip()
    with pytest.raises(ValueError, match="adagc_clip: `init` needs the params"):
        tx.init(None)
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="adagc_clip: the updates have 2 float leaves"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(1)}, state)


def test_multisteps_advances_the_ema_once_per_real_update():
    ms = optax.MultiSteps(
        optax.chain(optaxclip.adagc_clip(warmup_steps=1), optax.sgd(1.0)), every_k_schedule=3
    )
    params = jnp.zeros(2)
    state = ms.init(params)
    step = jax.jit(ms.update)
    for _ in range(9):
        _, state = step(jnp.full(2, 0.1), state, params)
    inner = state.inner_opt_state[0]
    assert int(optaxclip.stats(state).step_count) == 3 and int(inner.finite_norm_count) == 3


def test_apply_if_finite_leaves_the_ema_untouched_on_a_bad_step():
    tx = optax.apply_if_finite(optax.chain(optaxclip.adagc_clip(warmup_steps=1), optax.sgd(1.0)), 3)
    params = jnp.zeros(2)
    state = tx.init(params)
    _, state = tx.update(jnp.ones(2), state, params)
    ema = state.inner_state[0].norm_ema
    out, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
    chex.assert_trees_all_equal(out, jnp.zeros(2))
    chex.assert_trees_all_equal(state.inner_state[0].norm_ema, ema)
    assert int(optaxclip.metrics(state)["total_notfinite"]) == 1


def test_inject_hyperparams_without_retrace():
    tx = optax.inject_hyperparams(optaxclip.adagc_clip)(clipping=1.05, warmup_steps=2)
    grads = {"f32": jnp.ones((2, 2)), "bf16": jnp.ones((3,), jnp.bfloat16)}
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state)

    state = tx.init(grads)
    for i in range(8):
        prev_ema = state.inner_state.norm_ema
        out, state = step(jax.tree.map(lambda x, i=i: (x * (1 + i % 3)).astype(x.dtype), grads), state)
        if i == 4:
            state.hyperparams["clipping"] = jnp.asarray(2.0, state.hyperparams["clipping"].dtype)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    np.testing.assert_allclose(state.inner_state.tensor_threshold, 2.0 * prev_ema, rtol=1e-6)


def test_compiled_update_has_no_conditional():
    tx = optax.chain(optaxclip.adagc_clip(), optax.adam(1e-3))
    g = {"a": jnp.ones((16, 16)), "b": jnp.ones((16,), jnp.bfloat16)}
    hlo = jax.jit(tx.update).lower(g, tx.init(g), g).compile().as_text()
    assert "conditional(" not in hlo


def test_state_checkpoints_through_numpy():
    tx = optaxclip.adagc_clip(warmup_steps=2)
    steps = spiky_steps(6, spike_at={4})
    state = tx.init(steps[0])
    for g in steps[:3]:
        _, state = tx.update(g, state)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
    for g in steps[3:]:
        out_a, state = tx.update(g, state)
        out_b, restored = tx.update(g, restored)
        chex.assert_trees_all_equal(out_a, out_b)
    chex.assert_trees_all_equal(state, restored)


def test_metrics_and_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(optaxclip.adagc_clip(warmup_steps=1), optax.sgd(0.1)), wrt=nnx.Param
    )
    x = jnp.ones((4, 3))
    for s in (1.0, 1.0, 50.0):
        grads = nnx.grad(lambda m, s=s: s * jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)
    m = optaxclip.metrics(opt.opt_state)
    assert int(m["step_count"]) == 3 and int(m["finite_norm_count"]) == 3
    assert int(m["clipped_tensor_count"]) == 2  # kernel and bias, both spiked
    assert isinstance(m["pre_clip_norm"], jax.Array) and bool(m["clipped"])


@given(
    history=hnp.arrays(
        np.float32, (4, 2, 3), elements=st.floats(-10.0, 10.0, width=32, allow_subnormal=False)
    ),
    spike=st.floats(1e-3, 1e6),
    clipping=st.floats(0.5, 2.0),
)
@settings(max_examples=20, deadline=None)
def test_invariants_after_warmup(history, spike, clipping):
    """Each tensor's norm <= clipping * its EMA, direction kept, a zero tensor stays zero."""
    tx = optaxclip.adagc_clip(clipping=clipping, warmup_steps=2, max_norm=1e3)
    state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(3)})
    update = tx.update  # eager: a jit per example would recompile for each `clipping`
    for step in history[:3]:
        _, state = update({"a": jnp.asarray(step[0]), "b": jnp.asarray(step[1])}, state)
    g = {"a": jnp.asarray(history[3, 0]) * spike, "b": jnp.asarray(history[3, 1])}
    gamma = np.asarray(state.norm_ema, np.float64)
    out, _ = update(g, state)
    for i, name in enumerate(("a", "b")):
        x, y = np.asarray(g[name], np.float64), np.asarray(out[name], np.float64)
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        if np.isfinite(gamma[i]):
            assert ny <= clipping * gamma[i] * (1 + 1e-5) + 1e-30
        if nx == 0:
            assert ny == 0
        elif ny > 0:
            assert np.dot(x, y) / (nx * ny) > 1 - 1e-5  # direction kept


def test_masked_clips_only_the_selected_leaves():
    tx = optax.masked(optaxclip.adagc_clip(warmup_steps=0), {"a": True, "b": False})
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)
    out, state = tx.update({"a": jnp.full(2, 100.0), "b": jnp.full(2, 100.0)}, state)
    np.testing.assert_allclose(optax.tree.norm(out["a"]), 1.05 * np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(out["b"], [100.0, 100.0])
    assert optaxclip.stats(state).step_count == 2


def test_axis_name_inside_shard_map_matches_the_unsharded_clip():
    """With `axis_name` the per-tensor norms are psummed over the mesh axis (one host device here;
    tests/test_sharding.py runs the multi-device norm paths)."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("x",))
    steps = spiky_steps(5, spike_at={4})
    sharded = optaxclip.adagc_clip(warmup_steps=2, axis_name="x")
    plain = optaxclip.adagc_clip(warmup_steps=2)

    def run(tx, steps):
        state = tx.init(steps[0])
        for g in steps:
            out, state = tx.update(g, state)
        return out, state.norm_ema

    f32 = [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in steps]
    fn = jax.jit(jax.shard_map(lambda *gs: run(sharded, gs), mesh=mesh, in_specs=P(), out_specs=(P(), P())))
    out, ema = fn(*f32)
    ref_out, ref_ema = run(plain, f32)
    chex.assert_trees_all_close(out, ref_out, rtol=1e-6)
    np.testing.assert_allclose(ema, ref_ema, rtol=1e-6)
