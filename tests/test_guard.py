"""Tests for optaxclip._guard: guard_clip."""

import pickle

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

DEFAULTS = {
    "multiplier": 1.5,
    "max_growth": 0.003,
    "spike_factor": 4.0,
    "ema_decay": 0.95,
    "fast_loss_decay": 0.9,
    "slow_loss_decay": 0.98,
    "initial_max_norm": None,
}
FIELDS = ("typical_norm", "guard_norm", "loss_rising", "level_held", "spike")


def guard_reference(norms, losses=None, **kwargs):
    """The guard's state machine in float64, step by step from the docstring's rules.

    Returns a dict of per-step arrays: the threshold used, the output norm and
    each state field after the step.
    """
    h = {**DEFAULTS, **kwargs}
    log_t = log_g = None
    fast, slow = np.nan, np.nan
    rows = []
    for i, n in enumerate(np.asarray(norms, np.float64)):
        usable = bool(np.isfinite(n) and n > 0)
        if log_t is None:
            threshold = np.inf if h["initial_max_norm"] is None else h["initial_max_norm"]
            spike = False
        else:
            threshold = h["multiplier"] * np.exp(log_g)
            spike = usable and n > h["spike_factor"] * np.exp(log_t)
        out = n * min(1.0, threshold / n) if usable else n
        loss = None if losses is None else float(losses[i])
        lone_spike = spike and not (rows and rows[-1]["spike"])
        if loss is not None and np.isfinite(loss) and not lone_spike:
            fast = loss if np.isnan(fast) else h["fast_loss_decay"] * fast + (1 - h["fast_loss_decay"]) * loss
            slow = loss if np.isnan(slow) else h["slow_loss_decay"] * slow + (1 - h["slow_loss_decay"]) * loss
        rising = bool(fast > slow)
        if usable and log_t is None:
            log_t = log_g = np.log(n)
        elif usable:
            d = h["ema_decay"]
            log_t = d * log_t + (1 - d) * min(np.log(n), log_t + np.log(h["spike_factor"]))
            log_g = min(log_t, log_g + (0.0 if rising else np.log1p(h["max_growth"])))
        rows.append(
            {
                "threshold": threshold,
                "out": out,
                "typical_norm": 0.0 if log_t is None else np.exp(log_t),
                "guard_norm": 0.0 if log_g is None else np.exp(log_g),
                "loss_rising": rising,
                "level_held": log_t is not None and log_g < log_t,
                "spike": spike,
            }
        )
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def run_stream(tx, norms, losses=None, update=None):
    """Feeds gradients `[n]` (and `loss=`) through `tx`; per-step outputs, thresholds, fields; final state.

    The whole stream is one jitted `lax.scan`, or, with `update`, a Python loop over `update`.
    """

    def body(state, x):
        n, loss = x
        out, state = (update or tx.update)(jnp.reshape(n, (1,)), state, loss=None if losses is None else loss)
        row = {"out": out[0], "threshold": state.stats.threshold, **{f: getattr(state, f) for f in FIELDS}}
        return state, row

    xs = (
        jnp.asarray(norms, jnp.float32),
        jnp.asarray(np.zeros(len(norms)) if losses is None else losses, jnp.float32),
    )
    if update is None:
        state, rows = jax.jit(lambda s, x: jax.lax.scan(body, s, x))(tx.init(None), xs)
        return {k: np.asarray(v) for k, v in rows.items()}, state
    state, rows = tx.init(None), []
    for x in zip(*xs, strict=True):
        state, row = body(state, x)
        rows.append(row)
    return {k: np.array([np.asarray(r[k]) for r in rows]) for k in rows[0]}, state


def scenario(seed=0):
    """Healthy noise, a 1000x spike, growth x1.5/step with a rising loss, recovery, a slow drift up
    with a falling loss, NaN/inf/zero steps."""
    rng = np.random.default_rng(seed)
    healthy = rng.lognormal(0.0, 0.2, 30)
    growth = 1.5 ** np.arange(1, 13)
    recovery = rng.lognormal(0.0, 0.2, 20)
    drift = np.exp(np.linspace(0.0, 0.6, 150)) * rng.lognormal(0.0, 0.1, 150)
    norms = np.concatenate([healthy, [1000.0], healthy[:5], growth, recovery, [np.nan, np.inf, 0.0], drift])
    losses = np.concatenate(
        [
            3.0 - 0.01 * np.arange(30),
            [3000.0],
            np.full(5, 2.7),
            2.7 + 0.3 * np.arange(1, 13),  # the loss climbs with the norms
            np.linspace(3.5, 2.6, 20),
            [np.nan, 2.6, 2.6],
            np.linspace(2.6, 2.0, 150),  # the drift comes with progress
        ]
    )
    return norms.astype(np.float32), losses.astype(np.float32)


GROWTH = slice(36, 48)
DRIFT = slice(71, 221)


class GuardClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("with_loss", True), ("without_loss", False))
    def test_state_machine_matches_float64_reference(self, with_loss):
        norms, losses = scenario()
        losses = losses if with_loss else None
        tx = optaxclip.guard_clip()
        got, _ = run_stream(tx, norms, losses, update=self.variant(strict(tx.update)))
        want = guard_reference(norms, losses)
        for key in ("threshold", "out", "typical_norm", "guard_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
        for key in ("loss_rising", "level_held", "spike"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    def test_growth_with_rising_loss_does_not_move_the_level(self):
        norms, losses = scenario()
        got, _ = run_stream(optaxclip.guard_clip(), norms, losses)
        level_before = got["guard_norm"][GROWTH.start - 1]
        # Norms x1.5 per step up to 130x: the level rises at the growth cap until the loss EMAs
        # see the climb (a few steps), then holds; the clip binds at it.
        level, rising = got["guard_norm"][GROWTH], got["loss_rising"][GROWTH]
        first = int(np.argmax(rising))
        assert 0 < first <= 4 and np.all(rising[first:]) and np.all(got["level_held"][GROWTH][1:])
        assert np.all(level[first:] == level[first - 1])
        assert level[-1] <= level_before * 1.003**first * (1 + 1e-6)
        assert np.all(got["out"][GROWTH] <= 1.5 * level[-1] * (1 + 1e-6))
        # A quantile of the recent norms follows the same growth and stops binding.
        outs = _outs(optaxclip.adaptive_clip(window=50), norms)
        assert outs[GROWTH.stop - 1] > 10 * level_before

    def test_slow_drift_with_progress_is_followed(self):
        norms, losses = scenario()
        got, _ = run_stream(optaxclip.guard_clip(), norms, losses)
        end = DRIFT.stop - 1
        typical = np.exp(np.mean(np.log(norms[end - 20 : end + 1])))
        assert abs(got["guard_norm"][end] / typical - 1) < 0.15
        assert np.mean(got["out"][DRIFT] < norms[DRIFT]) < 0.3  # clipped steps are the exception

    def test_bad_batch_from_step_1_and_nonfinite_steps_poison_nothing(self):
        norms = np.array([2.0, 2000.0, 2.1, np.nan, np.inf, 0.0, 1.9], np.float32)
        got, state = run_stream(optaxclip.guard_clip(), norms)
        np.testing.assert_allclose(got["out"][1], 1.5 * 2.0, rtol=1e-6)  # clipped at step 1
        assert got["spike"][1] and np.isnan(got["out"][3]) and np.isinf(got["out"][4]) and got["out"][5] == 0
        # The NaN, inf and zero steps change nothing: same state as a stream without them.
        _, clean = run_stream(optaxclip.guard_clip(), norms[[0, 1, 2, 6]])
        for f in ("typical_norm", "guard_norm", "finite_norm_count", "spike_count"):
            np.testing.assert_array_equal(getattr(state, f), getattr(clean, f), err_msg=f)
        assert int(state.stats.nonfinite_count) == 2 and int(state.finite_norm_count) == 4

    def test_lasting_change_of_scale_is_followed_without_loss(self):
        norms = np.concatenate([np.ones(20), np.full(1500, 10.0)]).astype(np.float32)
        got, _ = run_stream(optaxclip.guard_clip(), norms)
        # The tracker takes a spike at 4x itself, so it climbs to 10 within a hundred steps;
        # the level at the growth cap (1.003**770 ~ 10).
        assert got["typical_norm"][120] > 9.5 and not got["spike"][-1]
        assert 1.5 < got["guard_norm"][250] < 2.5 and got["guard_norm"][-1] > 9.5

    def test_initial_max_norm_and_max_growth_zero(self):
        got, _ = run_stream(optaxclip.guard_clip(initial_max_norm=0.5, max_growth=0.0), [4.0, 8.0, 4.0])
        np.testing.assert_allclose(got["out"], [0.5, 1.5 * 4.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(got["guard_norm"], 4.0, rtol=1e-6)  # never rises

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_tree_clipped_like_global_norm(self):
        grads = mixed_tree()
        tx = optaxclip.guard_clip()
        update = self.variant(strict(tx.update))
        state = tx.init(grads)
        _, state = update(grads, state)
        big = jax.tree.map(lambda g: (g * 5).astype(g.dtype), grads)
        out, state = update(big, state, loss=jnp.float32(1.0))
        bound = ref.global_norm(grads) * 1.5
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        assert_close_to_reference(out, ref.clip_global(big, bound))
        np.testing.assert_allclose(float(state.stats.threshold), bound, rtol=1e-2)  # bf16 leaves in the norm
        assert bool(state.spike)  # 5x the first norm, beyond spike_factor=4
        zero, _ = update(jax.tree.map(jnp.zeros_like, grads), state)
        chex.assert_trees_all_equal(zero, jax.tree.map(jnp.zeros_like, grads))

    def test_bad_arguments(self):
        bad = [
            ({"multiplier": 0.0}, "multiplier"),
            ({"max_growth": -0.1}, "max_growth"),
            ({"max_growth": float("inf")}, "max_growth"),
            ({"spike_factor": 1.0}, "spike_factor"),
            ({"ema_decay": 1.0}, "ema_decay"),
            ({"fast_loss_decay": -0.5}, "fast_loss_decay"),
            ({"slow_loss_decay": 1.5}, "slow_loss_decay"),
            ({"fast_loss_decay": 0.99, "slow_loss_decay": 0.9}, "fast_loss_decay"),
            ({"initial_max_norm": 0.0}, "initial_max_norm"),
            ({"ema_decay": jnp.array(float("nan"))}, "ema_decay"),
        ]
        for kwargs, name in bad:
            with pytest.raises(ValueError, match=f"guard_clip: `{name}`"):
                optaxclip.guard_clip(**kwargs)
        with pytest.raises(TypeError, match="guard_clip: `multiplier` must be a scalar"):
            optaxclip.guard_clip(multiplier=jnp.array([1.0, 2.0]))
        tx = optaxclip.guard_clip()
        with pytest.raises(TypeError, match=r"guard_clip.update: `loss` must be a scalar.*shape \(3,\)"):
            tx.update(jnp.ones(2), tx.init(None), loss=jnp.ones(3))


def _outs(tx, norms):
    def body(state, n):
        out, state = tx.update(jnp.reshape(n, (1,)), state)
        return state, out[0]

    return np.asarray(jax.jit(lambda s, x: jax.lax.scan(body, s, x))(tx.init(None), jnp.asarray(norms))[1])


def test_vmap_over_independent_states():
    tx = optaxclip.guard_clip()
    k, steps = 4, 10
    rng = np.random.default_rng(10)
    g = jnp.asarray(rng.lognormal(size=(steps, k, 3)), jnp.float32).at[6, 1].multiply(100.0)
    losses = jnp.asarray(rng.normal(size=(steps, k)) + 3.0, jnp.float32)
    states = jax.vmap(tx.init)(jnp.zeros((k, 3)))
    vstep = jax.jit(jax.vmap(lambda u, s, loss: tx.update(u, s, loss=loss)))
    vouts = []
    for t in range(steps):
        vout, states = vstep(g[t], states, losses[t])
        vouts.append(vout)
    for i in range(k):
        state = tx.init(None)
        for t in range(steps):  # every step's output, the spike's (step 6, state 1) included
            out, state = tx.update(g[t, i], state, loss=losses[t, i])
            np.testing.assert_allclose(np.asarray(vouts[t][i]), np.asarray(out), rtol=1e-6)
        np.testing.assert_allclose(float(states.stats.threshold[i]), float(state.stats.threshold), rtol=1e-6)
        assert bool(states.spike[i]) == bool(state.spike) and int(states.spike_count[i]) == int(
            state.spike_count
        )
    assert int(states.spike_count[1]) >= 1 and float(vouts[6][1].max()) < float(g[6, 1].max()) / 10


def test_axis_name_takes_the_norm_and_the_mean_loss_over_the_axis():
    # Four "devices" (vmap with an axis name), each holding a disjoint shard of the updates and its
    # own loss: every device's state equals one device's run on the whole tree with the mean loss.
    tx, whole = optaxclip.guard_clip(axis_name="d"), optaxclip.guard_clip()
    rng = np.random.default_rng(3)
    steps, k = 40, 4
    g = rng.lognormal(size=(steps, k, 5)).astype(np.float32)
    g[20:] *= np.float32(1.5) ** np.arange(1, steps - 19)[:, None, None]  # growing norms
    losses = (3 + rng.normal(size=(steps, k)) + np.linspace(0, 2, steps)[:, None]).astype(np.float32)
    step = jax.jit(jax.vmap(lambda u, s, loss: tx.update(u, s, loss=loss), axis_name="d"))
    states = jax.vmap(tx.init)(jnp.zeros((k, 5)))
    state = whole.init(None)
    for t in range(steps):
        out, states = step(jnp.asarray(g[t]), states, jnp.asarray(losses[t]))
        want, state = whole.update(jnp.asarray(g[t]), state, loss=jnp.float32(losses[t].mean()))
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5)
        for f in ("guard_norm", "typical_norm", "loss_fast", "loss_slow"):
            got = np.asarray(getattr(states, f))
            np.testing.assert_allclose(got, np.full(k, float(getattr(state, f))), rtol=2e-5, err_msg=f)
        assert np.all(np.asarray(states.loss_rising) == bool(state.loss_rising))
    assert int(state.stats.clip_count) > 10  # the guard acted in the run compared


def test_inject_hyperparams_changes_the_output_by_the_right_amount():
    tx = optax.inject_hyperparams(optaxclip.guard_clip)(multiplier=1.5)
    grads = {"f32": jnp.ones((2, 2)), "bf16": jnp.ones((3,), jnp.bfloat16)}
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state, loss=jnp.float32(1.0))

    state = tx.init(grads)
    _, state = step(grads, state)
    spiked = jax.tree.map(lambda x: (x * 50).astype(x.dtype), grads)
    out_a, _ = step(spiked, state)
    state.hyperparams["multiplier"] = jnp.asarray(3.0, state.hyperparams["multiplier"].dtype)
    out_b, _ = step(spiked, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_b, grads)
    # Both clip to multiplier x the level (the first norm): the outputs differ by exactly 3 / 1.5.
    ratio = np.asarray(out_b["f32"], np.float64) / np.asarray(out_a["f32"], np.float64)
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.norm(out_a)), 1.5 * ref.global_norm(grads), rtol=1e-2)


def test_apply_if_finite_and_multisteps():
    inner = optax.chain(optaxclip.guard_clip(), optax.sgd(1.0))
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    params = jnp.zeros(2)
    state = tx.init(params)
    step = jax.jit(lambda g, s: tx.update(g, s, params, loss=jnp.float32(2.0)))
    for g in ([1.0, 1.0], [jnp.nan, 1.0], [1.0, 1.0]):
        _, state = step(jnp.asarray(g), state)
    m = optaxclip.metrics(state)
    assert int(m["total_notfinite"]) == 1 and int(m["finite_norm_count"]) == 2 and int(m["step_count"]) == 2
    ms = optax.MultiSteps(optax.chain(optaxclip.guard_clip(), optax.sgd(1.0)), every_k_schedule=3)
    state = ms.init(params)
    step = jax.jit(lambda g, s: ms.update(g, s, params))
    for _ in range(9):
        _, state = step(jnp.ones(2), state)
    assert int(optaxclip.stats(state).step_count) == 3
    assert int(state.inner_opt_state[0].finite_norm_count) == 3


def test_nnx_optimizer_metrics_show_every_decision():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(optaxclip.guard_clip(), optax.sgd(0.1)), wrt=nnx.Param)
    x = jnp.ones((4, 3))
    logged = []
    for s in (1.0, 1.0, 1000.0):
        loss, grads = nnx.value_and_grad(lambda m, s=s: s * jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads, loss=loss)
        logged.append(optaxclip.metrics(opt.opt_state))
    m = logged[-1]
    for key in ("pre_clip_norm", "threshold", "clipped", *FIELDS, "loss_fast", "loss_slow", "spike_count"):
        assert isinstance(m[key], jax.Array) and m[key].shape == (), key
    assert bool(m["spike"]) and bool(m["clipped"]) and int(m["spike_count"]) == 1
    assert not bool(logged[1]["spike"])  # each step's own values, not a live reference
    np.testing.assert_allclose(float(m["loss_fast"]), float(logged[1]["loss_fast"]))  # spikes left out


def test_checkpoint_resume_is_bit_identical(tmp_path):
    tx = optax.chain(optaxclip.guard_clip(), optax.adam(1e-2))
    rng = np.random.default_rng(9)
    grads = [jnp.asarray(rng.normal(size=(3, 2)) * (50 if i == 12 else 1), jnp.float32) for i in range(20)]
    step = jax.jit(lambda p, s, g, loss: tx.update(g, s, p, loss=loss))

    def train(params, state, gs, start):
        for i, g in enumerate(gs):
            updates, state = step(params, state, g, jnp.float32(3.0 - 0.01 * (start + i)))
            params = optax.apply_updates(params, updates)
        return params, state

    params = jnp.zeros((3, 2))
    p_full, s_full = train(params, tx.init(params), grads, 0)
    p_half, s_half = train(params, tx.init(params), grads[:10], 0)
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps(jax.device_get((p_half, s_half))))
    p_loaded, s_loaded = jax.tree.map(jnp.asarray, pickle.loads(path.read_bytes()))
    p_res, s_res = train(p_loaded, s_loaded, grads[10:], 10)
    chex.assert_trees_all_equal(p_res, p_full)
    chex.assert_trees_all_equal(s_res, s_full)


def test_compiled_step_with_loss_has_no_conditional():
    tx = optax.chain(optaxclip.guard_clip(), optax.adam(1e-3))
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}
    step = lambda p, s, g, loss: tx.update(g, s, p, loss=loss)
    lowered = jax.jit(step).lower(params, tx.init(params), params, jnp.float32(1.0))
    text = lowered.as_text() + lowered.compile().as_text()
    assert "conditional(" not in text and "stablehlo.if" not in text and "stablehlo.case" not in text
