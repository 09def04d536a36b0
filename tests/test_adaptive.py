"""Tests for optaxclip._adaptive: adaptive_clip, zscore_clip, skip_spikes."""

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


def run_stream(tx, norms, state=None):
    """Feeds gradients `[n]` with the given norms; returns (outs, thresholds, final state)."""

    def body(state, n):
        out, state = tx.update(jnp.reshape(n, (1,)), state)
        return state, (out[0], state.stats.threshold, state.stats.clipped)

    state = tx.init(None) if state is None else state
    state, (outs, thresholds, clipped) = jax.jit(lambda s, n: jax.lax.scan(body, s, n))(
        state, jnp.asarray(norms, jnp.float32)
    )
    return np.asarray(outs), np.asarray(thresholds), np.asarray(clipped), state


def lognormal(n, seed=0, sigma=0.5):
    return np.random.default_rng(seed).lognormal(0.0, sigma, n).astype(np.float32)


# --- adaptive_clip -----------------------------------------------------------------------


def window_reference(norms, q, window, warmup, multiplier=1.0):
    """Threshold each step: `multiplier` x np.quantile of the previous `window` finite norms (float64).

    `q` and `multiplier` are numbers or one value per step (a scheduled hyperparameter).
    """
    out, hist = [], []
    qs, ms = np.broadcast_to(q, len(norms)), np.broadcast_to(multiplier, len(norms))
    for n, q, m in zip(np.asarray(norms, np.float64), qs, ms, strict=True):
        out.append(m * np.quantile(hist[-window:], q) if len(hist) >= warmup else np.inf)
        if np.isfinite(n):
            hist.append(n)
    return np.array(out)


def streaming_reference(norms, q, lr, warmup):
    """The streaming estimate after each step (float64): the running maximum of the first
    `warmup` finite norms, then Andrew et al.'s `q_hat * exp(-lr * (1[norm <= q_hat] - q))`."""
    out, est, count = [], np.inf, 0
    for n in np.asarray(norms, np.float64):
        if np.isfinite(n):
            count += 1
            est = (
                (n if count == 1 else max(est, n))
                if count <= warmup
                else est * np.exp(-lr * ((n <= est) - q))
            )
        out.append(est)
    return np.array(out)


class AdaptiveClipTest(chex.TestCase):
    def test_threshold_matches_numpy_quantile_every_step(self):
        norms = lognormal(300)
        norms[[50, 51, 200]] = [np.nan, np.inf, 1e4]
        _, thr, _, _ = run_stream(optaxclip.adaptive_clip(0.8, window=64, warmup_steps=5), norms)
        np.testing.assert_allclose(thr, window_reference(norms, 0.8, 64, 5), rtol=1e-5)

    def test_threshold_matches_numpy_quantile_with_repeated_norms(self):
        # The window is kept sorted incrementally: equal norms enter and leave it.
        norms = np.random.default_rng(3).choice([0.0, 1.0, 2.0, 3.0], 200).astype(np.float32)
        _, thr, _, state = run_stream(optaxclip.adaptive_clip(0.7, window=16, warmup_steps=1), norms)
        np.testing.assert_allclose(thr, window_reference(norms, 0.7, 16, 1), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(state.sorted_norm_history), np.sort(norms[-16:]))

    @parameterized.named_parameters(("window", "window", 0.10), ("streaming", "streaming", 0.10))
    def test_stationary_lognormal_within_10_percent(self, estimator, tol):
        norms = lognormal(4000, seed=1)
        true_q = float(np.exp(0.5 * 1.2815515655446004))  # 0.9-quantile of lognormal(0, 0.5)
        tx = optaxclip.adaptive_clip(0.9, window=1000, estimator=estimator)
        _, thr, _, _ = run_stream(tx, norms)
        after = thr[1500:]
        assert np.max(np.abs(after / true_q - 1)) < tol, (after.min(), after.max(), true_q)

    def test_follows_10x_jump_within_two_windows_and_ignores_a_spike(self):
        w = 200
        norms = np.concatenate([lognormal(1000, 2), 10 * lognormal(2 * w, 3)])
        _, thr, _, _ = run_stream(optaxclip.adaptive_clip(0.9, window=w), norms)
        new_q = np.quantile(norms[-w:], 0.9)
        assert abs(thr[-1] / new_q - 1) < 0.05  # followed the jump within two windows
        # Recording clipped norms instead ratchets: the threshold cannot rise.
        _, thr_c, _, _ = run_stream(optaxclip.adaptive_clip(0.9, window=w, record_clipped=True), norms)
        assert thr_c[-1] < 0.2 * new_q
        # A single 1000x spike moves the threshold by < 5% and is clipped.
        base = lognormal(1200, 4)
        spiked = base.copy()
        spiked[1000] *= 1000
        outs, t_spike, _, _ = run_stream(optaxclip.adaptive_clip(0.9, window=w), spiked)
        _, t_base, _, _ = run_stream(optaxclip.adaptive_clip(0.9, window=w), base)
        assert np.max(np.abs(t_spike[1001:] / t_base[1001:] - 1)) < 0.05
        assert outs[1000] <= t_spike[1000] * (1 + 1e-6)
        _, s_spike, _, _ = run_stream(optaxclip.adaptive_clip(0.9, estimator="streaming"), spiked)
        _, s_base, _, _ = run_stream(optaxclip.adaptive_clip(0.9, estimator="streaming"), base)
        assert np.max(np.abs(s_spike[1001:] / s_base[1001:] - 1)) < 0.05

    def test_defaults_stop_a_1000x_batch_at_step_100(self):
        norms = lognormal(150, 5)
        norms[100] *= 1000
        outs, thr, clipped, _ = run_stream(optaxclip.adaptive_clip(), norms)
        assert clipped[100] and outs[100] <= 2 * np.max(norms[:100])
        assert not np.any(clipped[:10])  # warm-up: no clipping without initial_max_norm

    def test_warmup_ceiling_multiplier_and_initial_max_norm(self):
        norms = np.full(20, 4.0, np.float32)
        tx = optaxclip.adaptive_clip(
            0.5, window=8, warmup_steps=5, initial_max_norm=1.0, max_norm=3.0, multiplier=2.0
        )
        _, thr, _, _ = run_stream(tx, norms)
        np.testing.assert_allclose(thr[:5], 1.0)  # initial_max_norm while warming up
        np.testing.assert_allclose(thr[5:], 3.0)  # min(2 * 4, ceiling 3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mixed_tree_clipped_like_global_norm(self):
        grads = mixed_tree()
        tx = optaxclip.adaptive_clip(0.5, window=4, warmup_steps=2)
        state = tx.init(grads)
        update = self.variant(strict(tx.update))
        for scale in (1.0, 0.5, 0.25):
            _, state = update(jax.tree.map(lambda g, s=scale: (g * s).astype(g.dtype), grads), state)
        out, state = update(grads, state)
        norm = ref.global_norm(grads)
        bound = np.quantile([norm, norm / 2, norm / 4], 0.5)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        assert_close_to_reference(out, ref.clip_global(grads, bound))
        np.testing.assert_allclose(float(state.stats.threshold), bound, rtol=1e-2)

    @parameterized.named_parameters(("window", "window"), ("streaming", "streaming"))
    def test_metrics_report_history_statistics(self, estimator):
        norms = [1.0, 2.0, 3.0]
        tx = optaxclip.adaptive_clip(window=8, warmup_steps=2, estimator=estimator)
        _, _, _, state = run_stream(tx, norms)
        m = optaxclip.metrics(optax.chain(optax.identity()).init(None) + (state,))
        assert int(m["finite_norm_count"]) == 3
        if estimator == "window":  # the window holds 1, 2, 3: its 0.9 quantile is 2.8
            want = np.quantile(norms, 0.9)
        else:  # running max 2 after the 2 warm-up norms, then one geometric step: 2 * exp(0.009)
            want = streaming_reference(norms, 0.9, 0.01, warmup=2)[-1]
        np.testing.assert_allclose(float(m["quantile_estimate"]), want, rtol=1e-6)
        np.testing.assert_allclose(want, 2.8 if estimator == "window" else 2 * np.exp(0.009), rtol=1e-12)

    def test_streaming_estimate_matches_reference_every_step(self):
        norms = lognormal(400, 11)
        norms[[50, 300]] = [np.nan, 1e4]
        tx = optaxclip.adaptive_clip(0.8, estimator="streaming", warmup_steps=5, streaming_lr=0.05)
        _, thr, _, _ = run_stream(tx, norms)
        want = streaming_reference(norms, 0.8, 0.05, warmup=5)
        np.testing.assert_allclose(thr[5:], want[4:-1], rtol=1e-4)  # each step clips to the previous estimate

    def test_bad_arguments(self):
        bad = [
            ({"quantile": 0.0}, "quantile"),
            ({"quantile": 1.5}, "quantile"),
            ({"window": 0}, "window"),
            ({"window": 2.5}, "window"),
            ({"warmup_steps": -1}, "warmup_steps"),
            ({"multiplier": 0.0}, "multiplier"),
            ({"max_norm": -1.0}, "max_norm"),
            ({"initial_max_norm": 0.0}, "initial_max_norm"),
            ({"estimator": "median"}, "estimator"),
            ({"streaming_lr": -0.1}, "streaming_lr"),
        ]
        for kwargs, name in bad:
            with pytest.raises(ValueError, match=rf"adaptive_clip: `{name}`.*{name}="):
                optaxclip.adaptive_clip(**kwargs)


# --- zscore_clip -------------------------------------------------------------------------


def zclip_reference(norms, zt=2.5, d=0.97, warmup=25, mode="reciprocal"):
    """ZClip (Kumar et al. 2025) in float64: returns each step's output norm.

    `zt` and `d` are numbers or one value per step (a scheduled hyperparameter).
    """
    out, buf, mu, var = [], [], None, None
    zts, ds = np.broadcast_to(zt, len(norms)), np.broadcast_to(d, len(norms))
    for g, zt, d in zip(np.asarray(norms, np.float64), zts, ds, strict=True):
        if mu is None:
            out.append(g)
            buf.append(g)
            if len(buf) == warmup:
                mu, var = np.mean(buf), np.var(buf)
            continue
        sd = np.sqrt(var)
        z = (g - mu) / (sd + 1e-6)
        gc = g
        if z > zt:
            gc = mu + zt**2 * sd / z if mode == "reciprocal" else mu
        out.append(gc)
        mu = d * mu + (1 - d) * gc
        var = d * var + (1 - d) * (gc - mu) ** 2
    return np.array(out)


class ZScoreClipTest(chex.TestCase):
    @parameterized.named_parameters(("reciprocal", "reciprocal"), ("mean", "mean"))
    def test_matches_reference(self, mode):
        norms = lognormal(300, 6, sigma=0.2)
        norms[[100, 200]] *= [30, 8]
        outs, _, _, _ = run_stream(optaxclip.zscore_clip(mode=mode), norms)
        np.testing.assert_allclose(outs, zclip_reference(norms, mode=mode), rtol=1e-4)

    def test_clips_10_sigma_spike_leaves_ordinary_steps_identical(self):
        rng = np.random.default_rng(7)
        grads = [
            {
                "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=3), jnp.bfloat16),
            }
            for _ in range(60)
        ]
        tx = optaxclip.zscore_clip()
        step = jax.jit(tx.update)
        state = tx.init(grads[0])
        for g in grads[:50]:
            out, state = step(g, state)
            chex.assert_trees_all_equal(out, g)  # bit for bit
        mu, sd = float(state.norm_ema_mean), float(np.sqrt(state.norm_ema_var))
        target = mu + 10 * sd
        spike = jax.tree.map(
            lambda x: (x * (target / optaxclip.global_norm(grads[50]))).astype(x.dtype), grads[50]
        )
        out, state = step(spike, state)
        assert bool(state.stats.clipped)
        assert float(optaxclip.global_norm(out)) < mu + 2.5 * sd
        out, state = step(grads[51], state)
        chex.assert_trees_all_equal(out, grads[51])

    def test_nonfinite_never_enters_ema_and_no_hidden_ceiling(self):
        norms = np.full(40, 5.0, np.float32)  # well above 1: the reference's hidden ceiling
        norms[30] = np.nan
        outs, _, clipped, state = run_stream(optaxclip.zscore_clip(), norms)
        assert not clipped[:30].any() and np.all(outs[:30] == 5.0)
        assert np.isnan(outs[30]) and float(state.norm_ema_mean) == 5.0
        assert int(state.stats.nonfinite_count) == 1

    def test_bad_arguments(self):
        bad = [
            ({"z_threshold": 0.0}, "z_threshold"),
            ({"ema_decay": -0.1}, "ema_decay"),
            ({"ema_decay": 1.0}, "ema_decay"),
            ({"warmup_steps": 0}, "warmup_steps"),
            ({"mode": "median"}, "mode"),
            ({"max_norm": 0.0}, "max_norm"),
        ]
        for kwargs, name in bad:
            with pytest.raises(ValueError, match=rf"zscore_clip: `{name}`.*{name}="):
                optaxclip.zscore_clip(**kwargs)


# --- skip_spikes -------------------------------------------------------------------------


class SkipSpikesTest(chex.TestCase):
    def test_spike_step_leaves_params_and_inner_state_exactly(self):
        params = {"w": jnp.ones((3,)), "b": jnp.zeros((), jnp.float32)}
        inner = optax.chain(optaxclip.clip_by_global_norm(10.0), optax.adam(0.1))
        tx = optaxclip.skip_spikes(inner, window=16, warmup_steps=5)
        rng = np.random.default_rng(8)
        grads = [
            {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.float32(0.1)} for _ in range(12)
        ]
        grads[8] = jax.tree.map(lambda x: x * 1e3, grads[8])
        step = jax.jit(tx.update)
        inner_step = jax.jit(inner.update)
        state, ref_state, p, ref_p = tx.init(params), inner.init(params), params, params
        for i, g in enumerate(grads):
            updates, state = step(g, state, p)
            if i == 8:
                chex.assert_trees_all_equal(optax.apply_updates(p, updates), p)
                chex.assert_trees_all_equal(state.inner_state, ref_state)
                assert bool(state.stats.clipped)
                continue
            ref_updates, ref_state = inner_step(g, ref_state, ref_p)
            chex.assert_trees_all_equal(updates, ref_updates)  # behaves as the inner chain
            p, ref_p = optax.apply_updates(p, updates), optax.apply_updates(ref_p, ref_updates)
        assert int(state.stats.clip_count) == 1
        found = optaxclip.stats(state)
        assert set(found) == {"", "inner_state/0"}
        m = optaxclip.metrics(state)
        assert int(m["clip_count"]) == 1 and "consecutive_skips" in m  # outer: bare names
        assert float(m["inner_state/0/threshold"]) == 10.0

    def test_loss_spike_skips(self):
        tx = optaxclip.skip_spikes(optax.sgd(1.0), window=8, warmup_steps=4)
        state = tx.init(jnp.zeros(1))
        step = jax.jit(tx.update)
        for i in range(6):
            _, state = step(jnp.array([1.0 + 0.01 * i]), state, loss=jnp.float32(2.0 + 0.01 * i))
        out, state = step(jnp.array([1.0]), state, loss=jnp.float32(50.0))
        assert bool(state.stats.clipped) and float(out[0]) == 0.0

    def test_lasting_change_is_accepted_after_max_consecutive_skips(self):
        tx = optaxclip.skip_spikes(optax.sgd(1.0), window=8, warmup_steps=4, max_consecutive_skips=3)
        norms = [1.0, 1.1, 0.9, 1.0, 1.05] + [100.0] * 6
        outs, _, clipped, _ = run_stream(tx, norms)
        # The accepted 100 is recorded, so the bound widens and the new regime passes.
        assert clipped.tolist() == [False] * 5 + [True] * 3 + [False] * 3

    def test_bad_arguments(self):
        for kwargs, name in [
            ({"sigma": 0.0}, "sigma"),
            ({"window": 1}, "window"),
            ({"warmup_steps": 1}, "warmup_steps"),
            ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ]:
            with pytest.raises(ValueError, match=rf"skip_spikes: `{name}`.*{name}="):
                optaxclip.skip_spikes(optax.sgd(1.0), **kwargs)
        with pytest.raises(ValueError, match=r"`warmup_steps` must be <= `window`"):
            optaxclip.skip_spikes(optax.sgd(1.0), window=4, warmup_steps=5)


# --- shared behaviour --------------------------------------------------------------------

ADAPTIVE = {
    "adaptive": lambda: optaxclip.adaptive_clip(0.9, window=16, warmup_steps=3),
    "streaming": lambda: optaxclip.adaptive_clip(0.9, window=16, warmup_steps=3, estimator="streaming"),
    "zscore": lambda: optaxclip.zscore_clip(warmup_steps=3),
    "skip": lambda: optaxclip.skip_spikes(optax.adam(1e-2), window=16, warmup_steps=3),
}


def _train(tx, params, grads_seq, state=None):
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    state = tx.init(params) if state is None else state
    for g in grads_seq:
        updates, state = step(params, state, g)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", ADAPTIVE)
def test_checkpoint_resume_is_bit_identical(name, tmp_path):
    tx = ADAPTIVE[name]() if name == "skip" else optax.chain(ADAPTIVE[name](), optax.adam(1e-2))
    rng = np.random.default_rng(9)
    grads = [
        {"w": jnp.asarray(rng.normal(size=(3, 2)) * (50 if i == 12 else 1), jnp.float32)} for i in range(20)
    ]
    params = {"w": jnp.zeros((3, 2))}
    p_full, s_full = _train(tx, params, grads)
    p_half, s_half = _train(tx, params, grads[:10])
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps(jax.device_get((p_half, s_half))))  # NumPy on disk
    p_loaded, s_loaded = pickle.loads(path.read_bytes())
    p_loaded, s_loaded = jax.tree.map(jnp.asarray, (p_loaded, s_loaded))
    p_res, s_res = _train(tx, p_loaded, grads[10:], s_loaded)
    chex.assert_trees_all_equal(p_res, p_full)
    chex.assert_trees_all_equal(s_res, s_full)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_vmap_over_independent_states(name):
    tx = ADAPTIVE[name]()
    k, steps = 4, 8
    rng = np.random.default_rng(10)
    g = jnp.asarray(rng.lognormal(size=(steps, k, 3)), jnp.float32).at[6, 1].multiply(100.0)
    params = jnp.zeros((k, 3))
    states = jax.vmap(tx.init)(params)
    vstep = jax.jit(jax.vmap(tx.update))
    for t in range(steps):
        vout, states = vstep(g[t], states, params)
    for i in range(k):
        state = tx.init(params[i])
        for t in range(steps):
            out, state = tx.update(g[t, i], state, params[i])
        np.testing.assert_allclose(np.asarray(vout[i]), np.asarray(out), rtol=1e-6)
        np.testing.assert_allclose(float(states.stats.threshold[i]), float(state.stats.threshold), rtol=1e-6)


@pytest.mark.parametrize("name", ["adaptive", "zscore"])
def test_multisteps_advances_history_once_per_real_update(name):
    ms = optax.MultiSteps(optax.chain(ADAPTIVE[name](), optax.sgd(1.0)), every_k_schedule=3)
    params = jnp.zeros(2)
    state = ms.init(params)
    step = jax.jit(ms.update)
    for _ in range(9):
        _, state = step(jnp.ones(2), state, params)
    inner = optaxclip.stats(state)
    assert int(inner.step_count) == 3
    assert int(state.inner_opt_state[0].finite_norm_count) == 3


@pytest.mark.parametrize(
    "factory, arg, value",
    [
        (optaxclip.adaptive_clip, "quantile", 0.5),
        (optaxclip.adaptive_clip, "multiplier", 0.5),
        (optaxclip.zscore_clip, "z_threshold", 1.0),
        (optaxclip.zscore_clip, "ema_decay", 0.5),
    ],
)
def test_inject_hyperparams_without_retrace(factory, arg, value):
    initial = 0.9 if arg != "z_threshold" else 2.5
    tx = optax.inject_hyperparams(factory)(**{arg: initial})
    grads = {"f32": jnp.ones((2, 2)), "bf16": jnp.ones((3,), jnp.bfloat16)}
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state)

    scales = [(1 + i % 3) * (1 + 9 * (i == 29)) for i in range(30)]  # step 29: a 10x spike

    def run(change):
        state, outs = tx.init(grads), []
        for i, c in enumerate(scales):
            out, state = step(jax.tree.map(lambda x, c=c: (x * c).astype(x.dtype), grads), state)
            outs.append(out)
            if change and i == 15:
                state.hyperparams[arg] = jnp.asarray(value, state.hyperparams[arg].dtype)
        return outs, state

    base, _ = run(change=False)
    outs, state = run(change=True)
    chex.assert_trees_all_equal_shapes_and_dtypes(outs[-1], grads)
    assert float(state.hyperparams[arg]) == value
    chex.assert_trees_all_equal(outs[15], base[15])  # same output up to the change
    # After it, each step's output is the float64 reference's with the new value from step 16 on.
    norms = np.sqrt(7.0) * np.asarray(scales, np.float64)
    for run_outs, changed in ((base, False), (outs, True)):
        per_step = np.where(np.arange(30) > 15, value if changed else initial, initial)
        other = {"quantile": 0.9, "multiplier": 1.0, "z_threshold": 2.5, "ema_decay": 0.97}
        hp = {**other, arg: per_step}
        if factory is optaxclip.adaptive_clip:
            bound = window_reference(norms, hp["quantile"], 1000, 10, hp["multiplier"])
            want = np.minimum(norms, bound)
        else:
            want = zclip_reference(norms, hp["z_threshold"], hp["ema_decay"])
        got = [float(np.linalg.norm(np.asarray(o["f32"], np.float64))) * np.sqrt(7 / 4) for o in run_outs]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(np.asarray(outs[-1]["f32"]), np.asarray(base[-1]["f32"]))
