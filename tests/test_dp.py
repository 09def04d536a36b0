"""Tests for optaxclip._dp: per_example_grads and dp_aggregate."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from conftest import (
    DP_FLOAT_DTYPES,
    DP_REFUSED_DTYPES,
    dtype_scope,
    extreme_value,
    refused_message,
    release_gap,
    strict,
)

import optaxclip


def per_example_tree(batch=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(batch, 3, 2)) * 2, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(batch, 2)), jnp.bfloat16),
    }


def reference(tree, clip, mask=None, denom=None):
    """Float64: clip each example's global norm, sum the real rows, divide."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    batch = leaves[0].shape[0]
    mask = np.ones(batch, bool) if mask is None else np.asarray(mask)
    norms = np.sqrt(sum(np.sum(x.reshape(batch, -1) ** 2, axis=1) for x in leaves))
    ok = mask & np.isfinite(norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(ok, np.minimum(1.0, clip / norms), 0.0)
    sums = [
        np.sum(
            np.where(ok.reshape(-1, *[1] * (x.ndim - 1)), x, 0.0) * f.reshape(-1, *[1] * (x.ndim - 1)), axis=0
        )
        for x in leaves
    ]
    d = denom if denom is not None else max(ok.sum(), 1)
    return jax.tree.unflatten(jax.tree.structure(tree), [s / d for s in sums])


def pre_noise_sum(tree, clip, mask=None):
    tx = optaxclip.dp_aggregate(clip, 0.0, jax.random.key(0), expected_batch_size=1)
    out, _ = tx.update(tree, tx.init(None), mask=mask)
    return out


class DPAggregateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("tight", 0.5), ("loose", 100.0))
    def test_matches_reference(self, clip):
        tree = per_example_tree()
        tx = optaxclip.dp_aggregate(clip, 0.0, jax.random.key(0))
        out, state = self.variant(strict(tx.update))(tree, tx.init(None))
        expected = reference(tree, clip)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: np.asarray(x, np.float64), out), expected, rtol=1e-2
        )
        assert out["b"].dtype == jnp.bfloat16 and out["w"].dtype == jnp.float32
        assert float(state.stats.threshold) == clip and bool(state.stats.clipped) == (clip < 1)

    def test_mask_makes_padding_contribute_zero(self):
        tree = per_example_tree(8)
        mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], bool)
        padded = jax.tree.map(lambda x: x.at[~mask].set(1e30 if x.dtype == jnp.float32 else 7.0), tree)
        tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0))
        out, _ = jax.jit(tx.update)(padded, tx.init(None), mask=mask)
        real = jax.tree.map(lambda x: x[mask], tree)
        out_real, _ = tx.update(real, tx.init(None))
        chex.assert_trees_all_close(out, out_real, rtol=1e-6)
        # NaN in padded rows is not a non-finite step: only real rows count.
        nan_padded = jax.tree.map(lambda x: x.at[~mask].set(np.nan), tree)
        out_nan, state = tx.update(nan_padded, tx.init(None), mask=mask)
        chex.assert_trees_all_close(out_nan, out_real, rtol=1e-6)
        assert int(state.stats.nonfinite_count) == 0 and np.isfinite(float(state.stats.pre_clip_norm))

    @parameterized.named_parameters(
        ("remove", "remove", 1),
        ("add_huge", "add", 1),
        ("replace_nan", np.nan, 1),
        ("replace_inf", np.inf, 1),
        ("replace_huge", 1e30, 2),
        ("replace_arbitrary", 123.0, 2),
    )
    def test_sensitivity_is_bounded_by_clip(self, change, bound):
        # Add/remove-one neighbours differ by at most C; replacing one example by
        # another finite gradient moves the sum by up to 2C (old out, new in), and
        # a NaN/inf replacement counts as a removal.
        clip = 0.7
        tree = per_example_tree(6, seed=1)
        if change == "remove":
            other = jax.tree.map(lambda x: x[:-1], tree)
        elif change == "add":
            other = jax.tree.map(lambda x: jnp.concatenate([x, jnp.full_like(x[:1], 1e30)]), tree)
        else:
            other = jax.tree.map(lambda x: x.at[2].set(change), tree)
        a, b = pre_noise_sum(tree, clip), pre_noise_sum(other, clip)
        diff = optaxclip.global_norm(
            jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b)
        )
        assert np.isfinite(float(diff)) and float(diff) <= bound * clip * (1 + 1e-3)

    def test_nonfinite_example_dropped_and_counted(self):
        tree = jax.tree.map(lambda x: x.at[1].set(np.nan), per_example_tree(4))
        tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0))
        out, state = tx.update(tree, tx.init(None))
        assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(out))
        assert int(state.nonfinite_example_count) == 1 and int(state.stats.nonfinite_count) == 1
        chex.assert_trees_all_close(out, reference(tree, 1.0), rtol=1e-2)  # divides by 3 real rows

    def test_noise_std_and_fresh_keys(self):
        clip, nm, denom = 2.0, 1.5, 4
        zeros = {"a": jnp.zeros((3, 40_000)), "b": jnp.zeros((3, 40_000))}
        tx = optaxclip.dp_aggregate(clip, nm, jax.random.key(42), expected_batch_size=denom)
        step = jax.jit(tx.update)
        state = tx.init(None)
        out1, state = step(zeros, state)
        out2, state = step(zeros, state)
        expected = nm * clip / denom
        for x in (out1["a"], out1["b"], out2["a"]):
            assert abs(float(jnp.std(x)) / expected - 1) < 0.03
        # No key reused across steps or leaves: the draws are uncorrelated.
        for x, y in ((out1["a"], out2["a"]), (out1["a"], out1["b"])):
            assert abs(float(jnp.corrcoef(x, y)[0, 1])) < 0.03

    def test_legacy_key_and_chain_before_adam(self):
        tx = optax.chain(optaxclip.dp_aggregate(1.0, 1.0, jax.random.PRNGKey(0)), optax.adam(1e-2))
        params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
        out, state = jax.jit(tx.update)(per_example_tree(), tx.init(params), params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
        assert int(optaxclip.stats(state).step_count) == 1

    def test_bad_arguments(self):
        key = jax.random.key(0)
        for args, kwargs, name in [
            ((-1.0, 1.0, key), {}, "l2_norm_clip"),
            ((0.0, 1.0, key), {}, "l2_norm_clip"),
            ((1.0, -0.5, key), {}, "noise_multiplier"),
            ((1.0, 1.0, key), {"expected_batch_size": 0}, "expected_batch_size"),
        ]:
            with pytest.raises(ValueError, match=rf"dp_aggregate: `{name}`.*{name}="):
                optaxclip.dp_aggregate(*args, **kwargs)

    @parameterized.named_parameters(("aggregate", "dp_aggregate"), ("adaptive", "dp_adaptive_aggregate"))
    def test_infinite_clip_norm_and_int_key_refused_at_construction(self, name):
        make = getattr(optaxclip, name)
        kwargs = {"expected_batch_size": 64} if name == "dp_adaptive_aggregate" else {}
        arg = "initial_l2_norm_clip" if name == "dp_adaptive_aggregate" else "l2_norm_clip"
        with pytest.raises(ValueError, match=rf"{name}: `{arg}` must be a finite number, got {arg}=inf"):
            make(jnp.inf, 0.0, jax.random.key(0), **kwargs)
        with pytest.raises(TypeError, match=rf"{name}: `{arg}` must be a scalar"):
            make(jnp.array([1.0, 2.0]), 0.0, jax.random.key(0), **kwargs)
        with pytest.raises(TypeError, match=rf"{name}: `key` must be a PRNG key.*got key=0"):
            make(1.0, 1.0, 0, **kwargs)
        with pytest.raises(TypeError, match=rf"{name}: `key` must be a PRNG key.*dtype int32"):
            make(1.0, 1.0, jnp.array([0, 1]), **kwargs)
        make(1.0, 1.0, jax.random.PRNGKey(0), **kwargs)  # a legacy key is accepted

    def test_gradients_without_a_batch_axis_raise(self):
        tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0))
        params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
        # Plain gradients passed with params: shapes (2, 2) and (2,) are not (batch, *shape).
        with pytest.raises(ValueError, match=r"dp_aggregate: `updates` must be per-example .*batch, \*param"):
            tx.update(params, tx.init(params), params)
        # Leaves with different leading sizes.
        bad = {"w": jnp.ones((3, 2, 2)), "b": jnp.ones((4, 2))}
        with pytest.raises(ValueError, match=r"dp_aggregate: `updates` must be per-example .*same leading"):
            tx.update(bad, tx.init(params))
        with pytest.raises(ValueError, match=r"same leading batch axis.*\(\)"):
            tx.update({"s": jnp.ones(())}, tx.init(None))


def _loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


# --- dp_adaptive_aggregate --------------------------------------------------------------


def _released_sum(entry, tree):
    """The un-normalised, noise-free release of `tree` by one of the two DP aggregators (clip 1)."""
    if entry == "dp_aggregate":
        tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0), expected_batch_size=1)
    else:
        tx = optaxclip.dp_adaptive_aggregate(
            1.0, 0.0, jax.random.key(0), expected_batch_size=1, clipped_count_stddev=1e-6
        )
    return jax.jit(tx.update)(tree, tx.init(None))


def _dtype_batch(dtype, extreme=False):
    """Three small examples with an `x` leaf of `dtype`; `extreme` appends one huge example."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3)) * 1e-2
    x = rng.normal(size=(3, 2)) * 1e-2
    if extreme:
        w = np.concatenate([w, np.zeros((1, 3))])
        x = np.concatenate([x, np.full((1, 2), extreme_value(dtype))])
    return {"w": jnp.asarray(w, jnp.float32), "x": jnp.asarray(x, dtype)}


class DTypeRuleTest(parameterized.TestCase):
    """Issue 20: every released leaf is inside the sensitivity bound, whatever its dtype."""

    @parameterized.product(entry=("dp_aggregate", "dp_adaptive_aggregate"), dtype=DP_FLOAT_DTYPES)
    def test_one_extreme_example_moves_the_release_by_at_most_the_clip_norm(self, entry, dtype):
        with dtype_scope(dtype):
            a, _ = _released_sum(entry, _dtype_batch(dtype))
            b, state = _released_sum(entry, _dtype_batch(dtype, extreme=True))
            assert a["x"].dtype == jnp.dtype(dtype) and b["x"].dtype == jnp.dtype(dtype)
            gap = release_gap(a, b)
        tol = 1e-2 if dtype in ("bfloat16", "float16") else 1e-5
        # The extreme example counts in the norm: it is clipped to the clip norm 1, not dropped.
        assert 1 - tol <= gap <= 1 + tol, gap
        assert bool(state.stats.clipped) and int(state.nonfinite_example_count) == 0

    @parameterized.product(entry=("dp_aggregate", "dp_adaptive_aggregate"), dtype=DP_REFUSED_DTYPES)
    def test_integer_and_bool_leaves_are_refused_by_path_and_dtype(self, entry, dtype):
        tree = {"w": jnp.ones((3, 3)), "x": jnp.asarray(np.full((3, 2), 100), dtype)}
        with pytest.raises(ValueError, match=refused_message("updates['x']", dtype)):
            _released_sum(entry, tree)

    def test_float0_leaves_are_released_as_float0(self):
        tree = {"w": jnp.ones((3, 2)), "step": np.zeros((3, 4), jax.dtypes.float0)}
        out, _ = _released_sum("dp_aggregate", tree)
        assert out["step"].dtype == jax.dtypes.float0 and out["step"].shape == (4,)
        np.testing.assert_allclose(np.asarray(out["w"]), np.full(2, 3 / np.sqrt(2)), rtol=1e-6)

    @parameterized.parameters("float16", "bfloat16")
    def test_half_precision_leaves_get_noise_of_the_right_std(self, dtype):
        clip, nm, denom = 2.0, 1.5, 4
        zeros = {"h": jnp.zeros((3, 40_000), dtype), "f": jnp.zeros((3, 40_000))}
        tx = optaxclip.dp_aggregate(clip, nm, jax.random.key(7), expected_batch_size=denom)
        out, _ = jax.jit(tx.update)(zeros, tx.init(None))
        assert out["h"].dtype == jnp.dtype(dtype)
        std = float(np.std(np.asarray(out["h"], np.float64)))
        assert abs(std / (nm * clip / denom) - 1) < 0.03, std


class DPAdaptiveAggregateTest(chex.TestCase):
    @parameterized.named_parameters(("median", 0.5), ("q80", 0.8))
    def test_clip_norm_converges_to_the_target_quantile(self, target):
        batch = 256
        tx = optaxclip.dp_adaptive_aggregate(
            0.01, 1.0, jax.random.key(0), expected_batch_size=batch, target_unclipped_quantile=target
        )

        @jax.jit
        def run(state, key):
            def body(state, k):
                norms = jnp.exp(jax.random.normal(k, (batch,)))  # lognormal per-example norms
                _, state = tx.update({"g": norms[:, None]}, state)
                return state, state.l2_norm_clip

            return jax.lax.scan(body, state, jax.random.split(key, 400))

        state, clips = run(tx.init(None), jax.random.key(1))
        truth = float(np.exp(jax.scipy.stats.norm.ppf(target)))
        assert abs(float(jnp.mean(clips[-100:])) / truth - 1) < 0.1, (float(jnp.mean(clips[-100:])), truth)
        assert abs(float(state.noised_unclipped_fraction) - target) < 0.15

    def test_first_step_without_noise_matches_dp_aggregate(self):
        tree = per_example_tree(8)
        ada = optaxclip.dp_adaptive_aggregate(
            0.7, 0.0, jax.random.key(0), expected_batch_size=64, clipped_count_stddev=1e-6
        )
        fixed = optaxclip.dp_aggregate(0.7, 0.0, jax.random.key(0), expected_batch_size=64)
        a, state = jax.jit(ada.update)(tree, ada.init(None))
        b, _ = fixed.update(tree, fixed.init(None))
        chex.assert_trees_all_close(a, b, rtol=1e-6)
        assert float(state.stats.threshold) == pytest.approx(0.7)
        # Noise-free count: the unclipped fraction b = sum(1[n_i <= C] - 1/2) / 64 + 1/2 over
        # the 8 examples, then C * exp(-0.2 * (b - 0.5)) (Andrew et al. 2021).
        leaves = [np.asarray(x, np.float64).reshape(8, -1) for x in jax.tree.leaves(tree)]
        norms = np.sqrt(sum(np.sum(x**2, 1) for x in leaves))
        b = np.sum(np.where(norms <= 0.7, 0.5, -0.5)) / 64 + 0.5
        np.testing.assert_allclose(float(state.noised_unclipped_fraction), b, rtol=1e-6)
        np.testing.assert_allclose(float(state.l2_norm_clip), 0.7 * np.exp(-0.2 * (b - 0.5)), rtol=1e-6)

    def test_gradient_noise_is_raised_by_theorem_1(self):
        # Batch 16: count std 0.8, so z = 1.2 becomes z_grad = (1.2**-2 - 1.6**-2)**-0.5 = 1.814.
        z_grad, z_count = optaxclip.adaptive_noise_multipliers(1.2, 16)
        np.testing.assert_allclose([z_grad, z_count], [(1.2**-2 - 1.6**-2) ** -0.5, 1.6])
        zeros = {"a": jnp.zeros((4, 40_000)), "b": jnp.zeros((4, 40_000))}
        tx = optaxclip.dp_adaptive_aggregate(2.0, 1.2, jax.random.key(3), expected_batch_size=16)
        out, _ = jax.jit(tx.update)(zeros, tx.init(None))
        for x in jax.tree.leaves(out):  # std z_grad * C / B, not z * C / B (33% smaller)
            np.testing.assert_allclose(float(jnp.std(x)), z_grad * 2.0 / 16, rtol=0.03)
        with pytest.raises(ValueError, match=r"`clipped_count_stddev` must be > noise_multiplier / 2"):
            optaxclip.adaptive_noise_multipliers(2.0, 16, clipped_count_stddev=1.0)

    def test_metrics_mark_nonprivate_values(self):
        tx = optax.chain(
            optaxclip.dp_adaptive_aggregate(1.0, 1.0, jax.random.key(0), expected_batch_size=64),
            optax.sgd(0.1),
        )
        params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
        _, state = tx.update(per_example_tree(), tx.init(params), params)
        m = optaxclip.metrics(state)
        assert {"nonprivate/pre_clip_norm", "nonprivate/clip_count", "nonprivate/clipped"} <= set(m)
        private = optaxclip.metrics(state, private_only=True)
        assert set(private) == {
            "l2_norm_clip",
            "noised_unclipped_fraction",
            "post_clip_norm",
            "step_count",
            "threshold",
        }
        assert "nonprivate/pre_clip_norm" in optaxclip.metrics(
            optaxclip.dp_aggregate(1.0, 1.0, jax.random.key(0)).init(None)
        )

    def test_bad_arguments(self):
        key = jax.random.key(0)
        for kwargs, name in [
            ({"initial_l2_norm_clip": -1.0}, "initial_l2_norm_clip"),
            ({"noise_multiplier": -1.0}, "noise_multiplier"),
            ({"target_unclipped_quantile": 1.0}, "target_unclipped_quantile"),
            ({"clip_learning_rate": 0.0}, "clip_learning_rate"),
            ({"expected_batch_size": 0}, "expected_batch_size"),
            ({"clipped_count_stddev": 0.1}, "clipped_count_stddev"),
        ]:
            args = {"initial_l2_norm_clip": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 64, **kwargs}
            with pytest.raises(ValueError, match=rf"`{name}`.*{name}="):
                optaxclip.dp_adaptive_aggregate(
                    args.pop("initial_l2_norm_clip"), args.pop("noise_multiplier"), key, **args
                )


def test_clipped_grad_sum_returns_per_example_aux_through_microbatches():
    aux_loss = lambda w, x: (_loss(w, x), jnp.sum(x))
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    micro = optaxclip.clipped_grad_sum(aux_loss, has_aux=True, microbatch_size=2)
    summed, aux = jax.jit(lambda w, x: micro(w, x, l2_norm_clip=0.5))(w, xs)
    whole, whole_aux = optaxclip.clipped_grad_sum(aux_loss, has_aux=True)(w, xs, l2_norm_clip=0.5)
    chex.assert_trees_all_close(aux, jnp.sum(xs, axis=1), rtol=1e-6)
    chex.assert_trees_all_close(whole_aux, aux, rtol=1e-6)
    chex.assert_trees_all_close(summed.grads, whole.grads, rtol=1e-5, atol=1e-6)
    assert summed.norms.shape == (8,) and bool(jnp.all(summed.mask))
    with pytest.raises(ValueError, match="multiple of `microbatch_size`"):
        optaxclip.clipped_grad_sum(aux_loss, has_aux=True, microbatch_size=3)(w, xs, l2_norm_clip=0.5)


def test_clipped_grad_sum_with_several_differentiated_arguments():
    loss = lambda a, b, x: (jnp.sum(a * x) * jnp.sum(b)) ** 2
    a, b = jnp.ones(3), jnp.asarray([0.5, -1.0])
    xs = jnp.arange(12.0).reshape(4, 3)
    micro = optaxclip.clipped_grad_sum(loss, argnums=(0, 1), batch_argnums=2, microbatch_size=2)
    whole = optaxclip.per_example_grads(loss, argnums=(0, 1), batch_argnums=2)(a, b, xs)
    expected = reference(whole, 1.0, denom=1)  # the clipped sum, in float64
    chex.assert_trees_all_close(micro(a, b, xs, l2_norm_clip=1.0).grads, expected, rtol=1e-5)
