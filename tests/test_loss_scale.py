"""dynamic_loss_scale: unscale in float32, skip non-finite steps, grow and back off the scale."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from absl.testing import parameterized
from conftest import assert_close_to_reference, mixed_tree, strict

import optaxclip


def scale_reference(finite_steps, initial, growth, backoff, interval):
    """torch.amp.GradScaler's update rule in float64: the scale after each step."""
    scale, streak, out = float(initial), 0, []
    for finite in finite_steps:
        if finite:
            streak += 1
            if streak == interval:
                scale, streak = scale * growth, 0
        else:
            scale, streak = scale * backoff, 0
        out.append(scale)
    return out


def sgd_clip(max_norm=1.0):
    return optax.chain(optaxclip.clip_by_global_norm(max_norm), optax.sgd(1.0))


class DynamicLossScaleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("idle", 1e3), ("active", 0.5))
    def test_inner_chain_sees_unscaled_float32_gradients(self, max_norm):
        grads = mixed_tree()
        tx = optaxclip.dynamic_loss_scale(sgd_clip(max_norm), initial_scale=2.0**12)
        state = tx.init(grads)
        scaled = jax.tree.map(lambda g: (g.astype(jnp.float32) * 2.0**12).astype(g.dtype), grads)
        out, state = self.variant(strict(tx.update))(scaled, state, grads)
        expected = jax.tree.map(lambda x: -x, ref.clip_global(grads, max_norm))  # exact: power-of-two scale
        chex.assert_trees_all_equal_structs(out, grads)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
        assert_close_to_reference(out, expected)
        clip = optaxclip.stats(state)
        np.testing.assert_allclose(float(clip.pre_clip_norm), ref.global_norm(grads), rtol=1e-5)
        assert not bool(state.step_skipped) and int(state.skipped_step_count) == 0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("nan", jnp.nan), ("inf", jnp.inf), ("overflow", 6e4))
    def test_nonfinite_step_is_skipped_and_backs_off(self, bad):
        params = {"w": jnp.ones((3,), jnp.float16), "b": jnp.ones((2, 2), jnp.float32)}
        tx = optaxclip.dynamic_loss_scale(optax.chain(sgd_clip(), optax.adam(0.1)), initial_scale=2.0**-120)
        state = tx.init(params)
        good = jax.tree.map(lambda p: jnp.full(p.shape, 2.0**-120, p.dtype), params)
        _, state = self.variant(tx.update)(jax.tree.map(lambda g: g.astype(jnp.float32), good), state, params)
        before = state.inner_state
        grads = {"w": jnp.array([1.0, bad, 1.0], jnp.float32), "b": jnp.ones((2, 2))}
        out, state = self.variant(tx.update)(grads, state, params)
        chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, out))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
        chex.assert_trees_all_equal(state.inner_state, before)  # bit for bit, dtypes included
        chex.assert_trees_all_equal_dtypes(state.inner_state, before)
        assert float(state.loss_scale) == 2.0**-121
        assert bool(state.step_skipped) and int(state.skipped_step_count) == 1
        assert int(state.finite_step_streak) == 0

    def test_scale_follows_torch_rules(self):
        pattern = [True] * 5 + [False, True, True, True, False, False] + [True] * 7
        tx = optaxclip.dynamic_loss_scale(
            optax.sgd(1.0), 8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=3
        )
        state = tx.init(jnp.zeros(2))
        step = jax.jit(tx.update)
        got = []
        for finite in pattern:
            _, state = step(jnp.array([1.0, 1.0 if finite else jnp.inf]), state)
            got.append(float(state.loss_scale))
        np.testing.assert_allclose(got, scale_reference(pattern, 8.0, 3.0, 0.25, 3), rtol=1e-7)
        assert int(state.skipped_step_count) == 3

    def test_defaults_are_torch_gradscaler(self):
        tx = optaxclip.dynamic_loss_scale(optax.sgd(1.0))
        state = tx.init(jnp.zeros(1))
        assert float(optaxclip.loss_scale(state)) == 2.0**16
        step = jax.jit(tx.update)
        for _ in range(1999):
            _, state = step(jnp.ones(1), state)
        assert float(state.loss_scale) == 2.0**16
        _, state = step(jnp.ones(1), state)
        assert float(state.loss_scale) == 2.0**17  # grew after 2000 finite steps
        _, state = step(jnp.full(1, jnp.nan), state)
        assert float(state.loss_scale) == 2.0**16  # backoff 0.5

    def test_scale_stays_finite_and_positive(self):
        tx = optaxclip.dynamic_loss_scale(optax.sgd(1.0), 2.0**126, growth_factor=4.0, growth_interval=1)
        state = tx.init(jnp.zeros(1))
        _, state = tx.update(jnp.zeros(1), state)
        assert float(state.loss_scale) == 2.0**126  # 2**128 would overflow float32
        tx = optaxclip.dynamic_loss_scale(optax.sgd(1.0), 2.0**-125, backoff_factor=0.5)
        state = tx.init(jnp.zeros(1))
        for _ in range(3):
            _, state = tx.update(jnp.full(1, jnp.inf), state)
        assert float(state.loss_scale) == float(jnp.finfo(jnp.float32).tiny)

    def test_zero_gradient_gives_zero_update(self):
        tx = optaxclip.dynamic_loss_scale(sgd_clip())
        out, state = jax.jit(tx.update)(jnp.zeros(3), tx.init(jnp.zeros(3)))
        chex.assert_trees_all_equal(out, jnp.zeros(3))
        assert not bool(state.step_skipped)

    def test_float16_inner_state_keeps_its_dtype(self):
        params = {"w": jnp.ones((4,), jnp.float16)}
        tx = optaxclip.dynamic_loss_scale(optax.adam(1e-2), initial_scale=2.0**10)
        state = tx.init(params)
        before = jax.tree.map(lambda x: x.dtype, state)
        step = jax.jit(tx.update)
        for g in (1.0, jnp.inf, 2.0):
            _, state = step({"w": jnp.full((4,), g * 2.0**10, jnp.float16)}, state, params)
        assert jax.tree.map(lambda x: x.dtype, state) == before
        assert int(state.skipped_step_count) == 1

    def test_vmap_over_states(self):
        tx = optaxclip.dynamic_loss_scale(sgd_clip(), initial_scale=4.0)
        states = jax.vmap(tx.init)(jnp.zeros((3, 2)))
        grads = jnp.array([[4.0, 0.0], [jnp.inf, 0.0], [0.4, 0.0]])
        out, states = jax.jit(jax.vmap(tx.update))(grads, states)
        np.testing.assert_allclose(out, [[-1.0, 0.0], [0.0, 0.0], [-0.1, 0.0]], rtol=1e-6)
        np.testing.assert_array_equal(states.loss_scale, [4.0, 2.0, 4.0])
        np.testing.assert_array_equal(states.step_skipped, [False, True, False])

    def test_extra_args_go_to_inner(self):
        inner = optaxclip.skip_spikes(optax.sgd(1.0), warmup_steps=2)
        tx = optaxclip.dynamic_loss_scale(inner, initial_scale=2.0)
        state = tx.init(jnp.zeros(1))
        for loss in (1.0, 1.0, 1.0, jnp.nan):
            out, state = tx.update(jnp.array([2.0]), state, loss=jnp.asarray(loss))
        assert float(out[0]) == 0.0 and not bool(state.step_skipped)  # the inner skip_spikes skipped
        assert int(state.inner_state.stats.clip_count) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_scale": 0.0}, "initial_scale"),
        ({"initial_scale": float("inf")}, "initial_scale"),
        ({"initial_scale": float("nan")}, "initial_scale"),
        ({"growth_factor": 0.5}, "growth_factor"),
        ({"backoff_factor": 0.0}, "backoff_factor"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"growth_interval": 2.5}, "growth_interval"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"dynamic_loss_scale: `{match}`.*{match}="):
        optaxclip.dynamic_loss_scale(optax.sgd(1.0), **kwargs)


def test_bad_inner():
    with pytest.raises(
        TypeError, match="dynamic_loss_scale: `inner` must be an optax.GradientTransformation.*inner=1.0"
    ):
        optaxclip.dynamic_loss_scale(1.0)


def test_loss_scale_reader_needs_one_state():
    with pytest.raises(ValueError, match="loss_scale: .*found 0"):
        optaxclip.loss_scale(optax.sgd(1.0).init(jnp.zeros(1)))
    tx = optax.chain(
        optaxclip.dynamic_loss_scale(optax.sgd(1.0)), optaxclip.dynamic_loss_scale(optax.sgd(1.0))
    )
    with pytest.raises(ValueError, match="found 2"):
        optaxclip.loss_scale(tx.init(jnp.zeros(1)))


def test_multisteps_unscales_once_per_real_update():
    tx = optax.MultiSteps(optaxclip.dynamic_loss_scale(sgd_clip(), initial_scale=8.0), every_k_schedule=2)
    state = tx.init(jnp.zeros(2))
    step = jax.jit(tx.update)
    out, state = step(jnp.array([8.0, 0.0]), state)  # accumulating
    assert float(optaxclip.loss_scale(state)) == 8.0
    out, state = step(jnp.array([24.0, 0.0]), state)  # mean 16 / scale 8 = 2: clipped to 1
    np.testing.assert_allclose(out, [-1.0, 0.0])
    out, state = step(jnp.array([jnp.inf, 0.0]), state)
    out, state = step(jnp.array([1.0, 0.0]), state)
    chex.assert_trees_all_equal(out, jnp.zeros(2))
    assert float(optaxclip.loss_scale(state)) == 4.0
    assert int(optaxclip.stats(state).step_count) == 1  # the inner clip ran once


def test_wraps_multisteps_and_apply_if_finite():
    inner = optax.MultiSteps(optax.apply_if_finite(sgd_clip(), 3), every_k_schedule=2)
    tx = optaxclip.dynamic_loss_scale(inner, initial_scale=2.0)
    state = tx.init(jnp.zeros(1))
    step = jax.jit(tx.update)
    for g in (2.0, jnp.inf, 2.0):
        out, state = step(jnp.array([g]), state)
    np.testing.assert_allclose(out, [-1.0])  # mean of 1 and 2 (unscaled by 2, then by 1), clipped to 1
    assert float(optaxclip.loss_scale(state)) == 1.0
    assert int(state.inner_state.gradient_step) == 1


def test_inject_hyperparams_changes_backoff_without_retrace():
    tx = optax.inject_hyperparams(optaxclip.dynamic_loss_scale, static_args=("growth_interval",))(
        inner=sgd_clip(), backoff_factor=0.5
    )
    state = tx.init({"f32": jnp.zeros(2), "bf16": jnp.zeros(2, jnp.bfloat16)})
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state)

    bad = {"f32": jnp.full(2, jnp.inf), "bf16": jnp.zeros(2, jnp.bfloat16)}
    _, state = step(bad, state)
    assert float(optaxclip.loss_scale(state)) == 2.0**15
    state.hyperparams["backoff_factor"] = jnp.asarray(0.25, jnp.float32)
    _, state = step(bad, state)
    assert float(optaxclip.loss_scale(state)) == 2.0**13
    assert state.inner_state.inner_state[0].pre_clip_norm.dtype == jnp.float32


def test_compiled_step_has_one_conditional_for_the_skip():
    tx = optaxclip.dynamic_loss_scale(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))
    g = {"a": jnp.ones((8, 8)), "b": jnp.ones((8,))}
    hlo = jax.jit(tx.update).lower(g, tx.init(g)).compile().as_text()
    assert hlo.count("conditional(") == 1


def test_metrics_report_scale_and_skips():
    tx = optaxclip.dynamic_loss_scale(sgd_clip(), initial_scale=4.0)
    state = tx.init(jnp.zeros(2))
    _, state = jax.jit(tx.update)(jnp.array([jnp.nan, 0.0]), state)
    m = optaxclip.metrics(state)
    by_field = {k.rsplit("/", 1)[-1]: v for k, v in m.items()}
    assert float(by_field["loss_scale"]) == 2.0
    assert int(by_field["skipped_step_count"]) == 1 and bool(by_field["step_skipped"])
    assert "clip_count" in by_field  # the inner clip's stats are still there


def test_nnx_optimizer_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optaxclip.dynamic_loss_scale(sgd_clip(), initial_scale=8.0), wrt=nnx.Param)
    scale = optaxclip.loss_scale(opt.opt_state)
    assert isinstance(scale, jax.Array) and float(scale) == 8.0
    grads = nnx.grad(lambda m: scale * jnp.sum(m(jnp.ones((1, 3)))))(model)
    kernel = jnp.array(model.kernel[...])
    opt.update(model, grads)
    assert not np.allclose(model.kernel[...], kernel)
    bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    kernel = jnp.array(model.kernel[...])
    opt.update(model, bad)
    np.testing.assert_array_equal(model.kernel[...], kernel)  # skipped: params unchanged
    assert float(optaxclip.loss_scale(opt.opt_state)) == 4.0
    assert float(scale) == 8.0  # the reader returned a value, not a reference


def _fp16_task():
    """A float16-compute NNX MLP (float32 master params) whose small gradients underflow float16."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, dtype, rngs):
            kw = {"dtype": dtype, "param_dtype": jnp.float32, "rngs": rngs}
            self.l1 = nnx.Linear(16, 64, **kw)
            self.l2 = nnx.Linear(64, 64, **kw)
            self.l3 = nnx.Linear(64, 1, kernel_init=nnx.initializers.normal(1e-3), **kw)

        def __call__(self, x):
            return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 16)).astype(np.float32)
    y = (1e-3 * np.tanh(x @ rng.standard_normal((16, 1)))).astype(np.float32)

    def make(dtype):
        graphdef, params = nnx.split(MLP(dtype, nnx.Rngs(0)), nnx.Param)

        def loss_fn(p):
            pred = nnx.merge(graphdef, p)(jnp.asarray(x, dtype)).astype(jnp.float32)
            return jnp.mean(jnp.square(pred - y))

        return params, loss_fn

    return make


def _train(params, loss_fn, tx, steps=100, scaled=True):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        scale = optaxclip.loss_scale(s) if scaled else 1.0
        grads = jax.grad(lambda p: scale * loss_fn(p))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    for _ in range(steps):
        params, state = step(params, state)
    return float(loss_fn(params)), state


def test_float16_underflow_without_scaling_and_float32_match_with_it():
    """Measured (seed 0, 5313 gradient elements): 4263 flush to zero in float16 unscaled, none
    with the default scale 2**16; after 100 adam steps the float16 run with the wrapper ends at
    the float32 run's loss to 4 digits (1.834e-07 vs 1.834e-07; 1.905e-07 unscaled)."""
    make = _fp16_task()
    p16, loss16 = make(jnp.float16)
    p32, loss32 = make(jnp.float32)
    g32 = jax.tree.leaves(jax.grad(loss32)(p32))

    def flushed(grads):
        return sum(
            int(jnp.sum((a == 0) & (b != 0))) for a, b in zip(jax.tree.leaves(grads), g32, strict=True)
        )

    total = sum(g.size for g in g32)
    unscaled = flushed(jax.grad(loss16)(p16))
    scaled = flushed(jax.grad(lambda p: 2.0**16 * loss16(p))(p16))
    assert unscaled > total // 2, (unscaled, total)
    assert scaled == 0

    inner = lambda: optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    final32, _ = _train(p32, loss32, inner(), scaled=False)
    final16, state = _train(p16, loss16, optaxclip.dynamic_loss_scale(inner()))
    initial = float(loss32(p32))
    assert final32 < 0.05 * initial
    np.testing.assert_allclose(final16, final32, rtol=1e-2)
    assert int(state.skipped_step_count) == 0


def test_float16_overflowing_scale_backs_off_and_still_trains():
    make = _fp16_task()
    p16, loss16 = make(jnp.float16)
    p32, loss32 = make(jnp.float32)
    inner = lambda: optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    tx = optaxclip.dynamic_loss_scale(inner(), initial_scale=2.0**40, growth_interval=50)
    final16, state = _train(p16, loss16, tx)
    final32, _ = _train(p32, loss32, inner(), steps=100 - int(state.skipped_step_count), scaled=False)
    assert int(state.skipped_step_count) > 0  # float16 overflowed at 2**40
    assert float(state.loss_scale) < 2.0**40
    np.testing.assert_allclose(final16, final32, rtol=5e-2)
