"""Tests for optaxclip._basic: clip_by_global_norm, clip_by_leaf_norm, clip_by_value."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from absl.testing import parameterized
from conftest import assert_close_to_reference, mixed_tree, strict
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip

NORM = ref.global_norm(mixed_tree())  # about 8.5


def _leaf_bound(path, leaf):
    del leaf
    return 0.5 if "kernel" in jax.tree_util.keystr(path) else 2.0


class ClipByGlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("idle", 1e3), ("active", 0.5), ("just_below", NORM * 0.999))
    def test_matches_reference(self, max_norm):
        grads = mixed_tree()
        tx = optaxclip.clip_by_global_norm(max_norm)
        out, state = self.variant(strict(tx.update))(grads, tx.init(grads))
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        assert_close_to_reference(out, ref.clip_global(grads, max_norm))
        np.testing.assert_allclose(float(state.pre_clip_norm), NORM, rtol=1e-6)
        np.testing.assert_allclose(float(state.post_clip_norm), min(NORM, max_norm), rtol=1e-6)
        self.assertEqual(bool(state.clipped), max_norm < NORM)
        self.assertEqual(int(state.clip_count), int(max_norm < NORM))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("f16", [300.0, 400.0], jnp.float16, [0.6, 0.8]),
        ("f32_1e30", [1e30, 1e30], jnp.float32, [0.70710678, 0.70710678]),
        ("bf16_1e30", [1e30, 1e30], jnp.bfloat16, [0.70710678, 0.70710678]),
    )
    def test_large_finite_gradients_clip_correctly(self, values, dtype, expected):
        tx = optaxclip.clip_by_global_norm(1.0)
        g = {"w": jnp.asarray(values, dtype)}
        out, _ = self.variant(strict(tx.update))(g, tx.init(g))
        self.assertEqual(out["w"].dtype, dtype)
        np.testing.assert_allclose(np.asarray(out["w"], np.float64), expected, rtol=4e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nonfinite_stays_nonfinite_and_is_counted(self):
        tx = optaxclip.clip_by_global_norm(1.0)
        g = {"a": jnp.array([np.inf, 1.0]), "b": jnp.array([np.nan], jnp.bfloat16)}
        out, state = self.variant(strict(tx.update))(g, tx.init(g))
        self.assertEqual(float(out["a"][0]), np.inf)
        self.assertTrue(np.isnan(float(out["b"][0])))
        self.assertEqual(int(state.nonfinite_count), 1)
        self.assertFalse(bool(state.clipped))

    def test_bad_max_norm_raises(self):
        for bad in (0, 0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match=r"clip_by_global_norm: `max_norm`.*max_norm="):
                optaxclip.clip_by_global_norm(bad)
        with pytest.raises(TypeError, match=r"clip_by_global_norm: `max_norm`.*max_norm=True"):
            optaxclip.clip_by_global_norm(True)  # a bool is not the threshold 1

    @given(
        x=hnp.arrays(
            np.float32,
            (7,),
            elements=st.floats(
                -1.0000000150474662e30, 1.0000000150474662e30, width=32, allow_subnormal=False
            ),
        ),
        max_norm=st.floats(1e-3, 1e3),
    )
    @settings(max_examples=25, deadline=None)
    def test_invariants(self, x, max_norm):
        tx = optaxclip.clip_by_global_norm(max_norm)
        once, _ = tx.update(jnp.asarray(x), tx.init(None))
        twice, _ = tx.update(once, tx.init(None))
        n = ref.global_norm([x])
        n_out = ref.global_norm([once])
        assert n_out <= max_norm * (1 + 1e-5)  # norm <= bound
        np.testing.assert_allclose(np.asarray(twice), np.asarray(once), rtol=1e-5, atol=1e-30)
        if n > 0:  # direction kept
            cos = np.dot(np.asarray(once, np.float64), x.astype(np.float64)) / (n_out * n)
            assert cos > 1 - 1e-5 or n_out == 0
        else:
            assert not np.any(np.asarray(once))


class ClipByLeafNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("scalar_bound", "scalar"), ("tree_bound", "tree"), ("callable_bound", "callable")
    )
    def test_matches_reference(self, kind):
        grads = mixed_tree(2)
        bounds_tree = jax.tree_util.tree_map_with_path(_leaf_bound, grads)
        max_norm = {"scalar": 1.0, "tree": bounds_tree, "callable": _leaf_bound}[kind]
        expected_bounds = jax.tree.map(lambda _: 1.0, grads) if kind == "scalar" else bounds_tree
        tx = optaxclip.clip_by_leaf_norm(max_norm)
        out, state = self.variant(strict(tx.update))(grads, tx.init(grads))
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        expected = ref.clip_leaf(grads, expected_bounds)
        assert_close_to_reference(out, expected)
        np.testing.assert_allclose(float(state.pre_clip_norm), ref.global_norm(grads), rtol=1e-6)
        np.testing.assert_allclose(float(state.post_clip_norm), ref.global_norm(expected), rtol=1e-5)
        bound_norm = np.sqrt(sum(b**2 for b in jax.tree.leaves(expected_bounds)))
        np.testing.assert_allclose(float(state.threshold), bound_norm, rtol=1e-6)
        self.assertTrue(bool(state.clipped))

    def test_f16_and_huge_leaves(self):
        tx = optaxclip.clip_by_leaf_norm(1.0)
        g = {"h": jnp.array([300.0, 400.0], jnp.float16), "b": jnp.array([1e30, 1e30])}
        out, st = tx.update(g, tx.init(g))
        np.testing.assert_allclose(np.asarray(out["h"], np.float64), [0.6, 0.8], rtol=2e-3)
        np.testing.assert_allclose(np.asarray(out["b"]), [0.70710678] * 2, rtol=1e-6)
        self.assertTrue(np.isfinite(float(st.pre_clip_norm)))

    def test_bad_bounds_raise(self):
        with pytest.raises(ValueError, match=r"clip_by_leaf_norm: `max_norm`.*max_norm=-1"):
            optaxclip.clip_by_leaf_norm(-1.0)
        with pytest.raises(ValueError, match=r"max_norm\['b'\]=0"):
            optaxclip.clip_by_leaf_norm({"a": 1.0, "b": 0.0})
        g = {"a": jnp.ones(2), "b": jnp.ones(2)}
        tx = optaxclip.clip_by_leaf_norm({"a": 1.0})
        with pytest.raises(ValueError, match=r"`max_norm` must be .*structure"):
            tx.update(g, tx.init(g))
        tx = optaxclip.clip_by_leaf_norm(lambda path, leaf: -2.0)
        with pytest.raises(ValueError, match=r"max_norm\['a'\]=-2.0"):
            tx.update(g, tx.init(g))


def _clamped_fraction(grads, lo, hi):
    """Float64 reference: the fraction of float elements outside `[lo, hi]`."""
    xs = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)]
    return sum(int(np.sum((x > hi) | (x < lo))) for x in xs) / sum(x.size for x in xs)


class ClipByValueTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(bounds=((0.5, None), (1.0, -0.25)), stats=("norm", "full"))
    def test_matches_reference(self, bounds, stats):
        max_value, min_value = bounds
        grads = mixed_tree(3)
        tx = optaxclip.clip_by_value(max_value, min_value, stats=stats)
        out, state = self.variant(strict(tx.update))(grads, tx.init(grads))
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        lo = -max_value if min_value is None else min_value
        expected = ref.clip_value(grads, lo, max_value)
        assert_close_to_reference(out, expected)
        st = optaxclip.stats(state)
        np.testing.assert_allclose(float(st.pre_clip_norm), ref.global_norm(grads), rtol=1e-6)
        if stats == "full":
            np.testing.assert_allclose(float(st.post_clip_norm), ref.global_norm(out), rtol=1e-6)
            fraction = _clamped_fraction(grads, lo, max_value)
            self.assertEqual(float(state.clipped_fraction), np.float32(fraction))
        else:  # not computed on a step that clamps
            assert isinstance(state, optaxclip.ClipStats) and np.isnan(float(st.post_clip_norm))
        self.assertEqual(float(st.threshold), max(abs(lo), max_value))
        self.assertTrue(bool(st.clipped))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("norm", "full")
    def test_inf_stays_inf_nan_stays_nan(self, stats):
        tx = optaxclip.clip_by_value(1.0, stats=stats)
        g = {"w": jnp.array([np.inf, -np.inf, np.nan, 5.0])}
        out, state = self.variant(strict(tx.update))(g, tx.init(g))
        np.testing.assert_equal(np.asarray(out["w"]), [np.inf, -np.inf, np.nan, 1.0])
        self.assertEqual(int(optaxclip.stats(state).nonfinite_count), 1)
        self.assertFalse(bool(optaxclip.stats(state).clipped))  # counted as non-finite, as the norm clips
        if stats == "full":
            assert np.isnan(float(state.clipped_fraction))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("huge_bound", 1e30, None, [3e30, -4e30, 1.0], [1e30, -1e30, 1.0]),
        ("zero_floor", 1.0, 0.0, [-5.0, 0.5, 2.0], [0.0, 0.5, 1.0]),
        ("nothing_clamped", 10.0, None, [3.0, 4.0, 0.0], [3.0, 4.0, 0.0]),
        # The plain squared sums overflow (pre-clip norm from the scaled sum), or are tiny.
        ("huge_updates_small_bound", 1e-3, None, [1e30, -2e30, 1e-4], [1e-3, -1e-3, 1e-4]),
        ("tiny_updates_huge_bound", 1e20, None, [3e-18, 4e-18, 0.0], [3e-18, 4e-18, 0.0]),
        # Ordinary updates: scaled to the huge bound their squares underflow, the plain ones don't.
        ("ordinary_updates_huge_bound", 1e20, None, [1e-3, -2e-3, 0.5], [1e-3, -2e-3, 0.5]),
        # One element a float32 ulp above the bound is clamped, and counted as clipped.
        (
            "one_ulp_over",
            1.0,
            None,
            [float(np.nextafter(np.float32(1), np.float32(2))), -1.0, 1.0],
            [1.0, -1.0, 1.0],
        ),
        (
            "one_ulp_over_small",
            3e-8,
            None,
            [float(np.nextafter(np.float32(3e-8), np.float32(1))), 0.0, 0.0],
            [3e-8, 0.0, 0.0],
        ),
        (
            "one_ulp_under_min",
            1.0,
            -1.0,
            [float(np.nextafter(np.float32(-1), np.float32(-2))), 0.5],
            [-1.0, 0.5],
        ),
    )
    def test_full_stats_are_exact(self, max_value, min_value, values, expected):
        tx = optaxclip.clip_by_value(max_value, min_value, stats="full")
        g = {"a": jnp.asarray(values, jnp.float32), "b": jnp.zeros((2, 2), jnp.bfloat16)}
        out, state = self.variant(strict(tx.update))(g, tx.init(g))
        np.testing.assert_allclose(np.asarray(out["a"]), expected)
        st = state.stats
        np.testing.assert_allclose(float(st.pre_clip_norm), ref.global_norm(g), rtol=1e-6)
        np.testing.assert_allclose(float(st.post_clip_norm), np.linalg.norm(expected), rtol=1e-6)
        clamped = int(np.sum(np.asarray(expected) != np.asarray(values)))
        self.assertEqual(bool(st.clipped), clamped > 0)
        self.assertEqual(float(state.clipped_fraction), np.float32(clamped / (len(values) + 4)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("nothing_clamped", 10.0, None, [3.0, 4.0, 0.0]),
        ("one_ulp_over", 1.0, None, [float(np.nextafter(np.float32(1), np.float32(2))), -1.0, 1.0]),
        ("one_ulp_under_min", 1.0, -1.0, [float(np.nextafter(np.float32(-1), np.float32(-2))), 0.5, 1.0]),
        ("at_the_bounds", 1.0, -2.0, [1.0, -2.0, 0.0]),
        # Norm 1.7e19: the plain sum of squares (2.9e38) is still finite.
        ("near_overflow_clamped", 1e19, None, [1.2e19, -1.2e19, 1.0]),
        ("near_overflow_not_clamped", 2e19, None, [1.2e19, -1.2e19, 1.0]),
        # Beyond ~1.8e19 the default stats read inf (their one sum of squares overflows).
        ("overflow", 1e-3, None, [1e30, -2e30, 1e-4]),
    )
    def test_default_stats(self, max_value, min_value, values):
        tx = optaxclip.clip_by_value(max_value, min_value)
        g = {"a": jnp.asarray(values, jnp.float32), "b": jnp.zeros((2, 2), jnp.bfloat16)}
        out, st = self.variant(strict(tx.update))(g, tx.init(g))
        lo = -max_value if min_value is None else min_value
        expected = np.clip(np.asarray(values, np.float32), np.float32(lo), np.float32(max_value))
        np.testing.assert_array_equal(np.asarray(out["a"]), expected)
        norm = ref.global_norm(g)
        if norm > 1.8e19:
            assert float(st.pre_clip_norm) == np.inf and int(st.nonfinite_count) == 1
            assert not bool(st.clipped)
            return
        clamped = bool(np.any(expected != np.asarray(values, np.float32)))
        np.testing.assert_allclose(float(st.pre_clip_norm), norm, rtol=1e-6)
        self.assertEqual(bool(st.clipped), clamped)
        if clamped:
            assert np.isnan(float(st.post_clip_norm))
        else:
            self.assertEqual(float(st.post_clip_norm), float(st.pre_clip_norm))

    @parameterized.parameters("norm", "full")
    def test_zero_size_leaf(self, stats):
        tx = optaxclip.clip_by_value(1.0, stats=stats)
        out, state = jax.jit(tx.update)({"e": jnp.zeros((0, 3)), "a": jnp.array([0.5, 3.0])}, tx.init(None))
        assert out["e"].shape == (0, 3)
        np.testing.assert_array_equal(np.asarray(out["a"]), [0.5, 1.0])
        st = optaxclip.stats(state)
        assert bool(st.clipped) and int(st.clip_count) == 1
        np.testing.assert_allclose(float(st.pre_clip_norm), np.hypot(0.5, 3.0), rtol=1e-6)

    @parameterized.parameters("norm", "full")
    def test_one_element_barely_out_among_a_million_in_range(self, stats):
        x = np.full(1_000_000, 0.5, np.float32)
        x[123_456] = np.nextafter(np.float32(1), np.float32(2))
        tx = optaxclip.clip_by_value(1.0, stats=stats)
        _, state = jax.jit(tx.update)({"w": jnp.asarray(x)}, tx.init(None))
        assert bool(optaxclip.stats(state).clipped)
        if stats == "full":
            self.assertEqual(float(state.clipped_fraction), np.float32(1e-6))

    def test_bad_arguments_raise(self):
        with pytest.raises(ValueError, match=r"clip_by_value: `min_value` must be <= `max_value`"):
            optaxclip.clip_by_value(1.0, min_value=2.0)
        with pytest.raises(ValueError, match=r"`max_value` must be > 0.*max_value=-1"):
            optaxclip.clip_by_value(-1.0)
        with pytest.raises(ValueError, match=r"`max_value` must be a finite.*max_value=nan"):
            optaxclip.clip_by_value(float("nan"))
        with pytest.raises(ValueError, match=r"`stats` must be one of .*stats='fast'"):
            optaxclip.clip_by_value(1.0, stats="fast")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("tree", "tree"), ("callable", "callable"))
    def test_per_layer_bounds_match_reference(self, kind):
        # The long-sequence recipe: output layer in [-100, 100], recurrent layers in [-10, 10].
        rng = np.random.default_rng(5)
        grads = {
            "head": jnp.asarray(rng.normal(size=(4, 3)) * 80, jnp.float32),
            "rnn": {"kernel": jnp.asarray(rng.normal(size=(3, 3)) * 20, jnp.bfloat16)},
        }
        bounds = {"head": 100.0, "rnn": {"kernel": 10.0}}
        if kind == "tree":
            tx = optaxclip.clip_by_value(bounds)
        else:
            tx = optaxclip.clip_by_value(lambda path, leaf: 100.0 if path[0].key == "head" else 10.0)
        out, state = self.variant(strict(tx.update))(grads, tx.init(grads))
        expected = jax.tree.map(lambda g, b: np.clip(np.asarray(g, np.float64), -b, b), grads, bounds)
        assert_close_to_reference(out, expected)
        np.testing.assert_allclose(float(state.pre_clip_norm), ref.global_norm(grads), rtol=1e-5)
        self.assertEqual(float(state.threshold), 100.0)
        self.assertTrue(bool(state.clipped))

    def test_per_layer_asymmetric_bounds(self):
        g = {"a": jnp.array([-5.0, 5.0]), "b": jnp.array([-5.0, 5.0])}
        tx = optaxclip.clip_by_value({"a": 1.0, "b": 4.0}, min_value={"a": 0.0, "b": -2.0})
        out, _ = tx.update(g, tx.init(g))
        np.testing.assert_array_equal(np.asarray(out["a"]), [0.0, 1.0])
        np.testing.assert_array_equal(np.asarray(out["b"]), [-2.0, 4.0])

    def test_per_layer_bad_bounds_raise(self):
        g = {"a": jnp.ones(2), "b": jnp.ones(2)}
        with pytest.raises(ValueError, match=r"clip_by_value: `max_value\['b'\]` must be > 0.*=-1"):
            optaxclip.clip_by_value({"a": 1.0, "b": -1.0})
        tx = optaxclip.clip_by_value({"a": 1.0})
        with pytest.raises(ValueError, match=r"clip_by_value: `max_value` must be .*structure"):
            tx.update(g, tx.init(g))
        tx = optaxclip.clip_by_value(lambda path, leaf: float("inf"))
        with pytest.raises(ValueError, match=r"`max_value\['a'\]` must be a finite.*=inf"):
            tx.update(g, tx.init(g))
        tx = optaxclip.clip_by_value({"a": 1.0, "b": 1.0}, min_value={"a": 0.0, "b": 2.0})
        with pytest.raises(ValueError, match=r"`min_value` must be <= `max_value`.*min_value=2.0"):
            tx.update(g, tx.init(g))


# --- behaviour every fixed transform shares -------------------------------------------

TRANSFORMS = {
    "global": (optaxclip.clip_by_global_norm, "max_norm"),
    "leaf": (optaxclip.clip_by_leaf_norm, "max_norm"),
    "value": (optaxclip.clip_by_value, "max_value"),
    "agc": (optaxclip.adaptive_grad_clip, "clipping"),
}


def _update(tx, grads, state, params):
    return tx.update(grads, state, params)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_zero_gradient_zero_threshold_gives_zero(name):
    factory, arg = TRANSFORMS[name]
    grads = mixed_tree()
    zeros = jax.tree.map(jnp.zeros_like, grads)
    tx = optax.inject_hyperparams(factory)(**{arg: 1.0})
    state = tx.init(grads)
    state.hyperparams[arg] = jnp.zeros_like(state.hyperparams[arg])
    out, state = jax.jit(_update, static_argnums=0)(tx, zeros, state, grads)
    chex.assert_trees_all_equal(out, zeros)
    assert float(optaxclip.stats(state).pre_clip_norm) == 0.0


@pytest.mark.parametrize("name", TRANSFORMS)
def test_inject_hyperparams_changes_threshold_without_retrace(name):
    factory, arg = TRANSFORMS[name]
    grads = {"f32": jnp.full((3, 2), 2.0), "bf16": jnp.full((2,), 3.0, jnp.bfloat16)}
    params = jax.tree.map(jnp.ones_like, grads)
    tx = optax.inject_hyperparams(factory)(**{arg: 100.0})
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state):
        return tx.update(grads, state, params)

    state = tx.init(params)
    out_idle, state = step(state)
    chex.assert_trees_all_equal(out_idle, grads)
    state.hyperparams[arg] = jnp.asarray(0.1, state.hyperparams[arg].dtype)
    out_tight, state = step(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(out_tight, grads)
    assert bool(optaxclip.stats(state).clipped)
    assert ref.global_norm(out_tight) < ref.global_norm(grads)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_nonfinite_never_made_finite_and_counted(name):
    factory, _ = TRANSFORMS[name]
    grads = {"a": jnp.array([np.inf, 2.0, -np.inf]), "b": jnp.array([[np.nan, 1.0]], jnp.float16)}
    params = jax.tree.map(jnp.ones_like, grads)
    tx = factory(0.5)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for o, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        bad = ~np.isfinite(np.asarray(g, np.float64))
        assert not np.any(np.isfinite(np.asarray(o, np.float64)[bad]))
    assert int(optaxclip.stats(state).nonfinite_count) == 1


@pytest.mark.parametrize("name", TRANSFORMS)
def test_apply_if_finite_skips_nonfinite_steps(name):
    factory, _ = TRANSFORMS[name]
    params = {"w": jnp.ones((2, 3))}
    tx = optax.apply_if_finite(optax.chain(factory(0.5), optax.adam(0.1)), max_consecutive_errors=5)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    bad = {"w": jnp.array([[np.nan, 1.0, 1.0], [1.0, 1.0, 1.0]])}
    updates, state = step(bad, state, params)
    new_params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(new_params, params)  # the NaN step was skipped
    assert int(state.notfinite_count) == 1
    good = {"w": jnp.full((2, 3), 0.1)}
    updates, state = step(good, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"]))) and np.any(np.asarray(updates["w"]))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_in_chain_multisteps_and_vmap(name):
    factory, _ = TRANSFORMS[name]
    grads = mixed_tree(4)
    params = mixed_tree(5)
    # In a chain before adam.
    tx = optax.chain(factory(0.05), optax.adam(1e-3))
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    assert int(optaxclip.stats(state).step_count) == 1
    # MultiSteps: the clip sees the mean of the accumulated gradients, once per k steps.
    clip = factory(0.05)
    ms = optax.MultiSteps(optax.chain(clip, optax.sgd(1.0)), every_k_schedule=2)
    ms_state = ms.init(params)
    g2 = jax.tree.map(lambda g: g * 3, grads)
    _, ms_state = ms.update(grads, ms_state, params)
    assert int(optaxclip.stats(ms_state).step_count) == 0
    ms_out, ms_state = ms.update(g2, ms_state, params)
    mean = jax.tree.map(lambda a, b: ((a.astype(jnp.float32) + b) / 2).astype(a.dtype), grads, g2)
    direct, _ = optax.chain(clip, optax.sgd(1.0)).update(mean, ms.init(params).inner_opt_state, params)
    chex.assert_trees_all_close(ms_out, direct, rtol=2e-2)
    assert int(optaxclip.stats(ms_state).step_count) == 1
    # vmap over independent states and gradients (different norms per row).
    k = 3
    gb = jax.tree.map(lambda g: jnp.stack([g * (i + 1) for i in range(k)]), grads)
    pb = jax.tree.map(lambda p: jnp.stack([p] * k), params)
    sb = jax.vmap(clip.init)(pb)
    ob, sb = jax.vmap(clip.update)(gb, sb, pb)
    for i in range(k):
        gi = jax.tree.map(lambda x, i=i: x[i], gb)
        oi, si = clip.update(gi, clip.init(params), params)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], ob), oi, rtol=1e-6)
        np.testing.assert_allclose(
            float(optaxclip.stats(sb).pre_clip_norm[i]), float(optaxclip.stats(si).pre_clip_norm), rtol=1e-6
        )


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([1.0, 2.0], TypeError, r"must be a scalar, got \w+=\[1.0, 2.0\]"),
        (jnp.array([1.0]), TypeError, r"must be a scalar, got \w+=an array of shape \(1,\)"),
        (jnp.array(-1.0), ValueError, r"must be > 0, got \w+=-1.0"),
        (jnp.array(jnp.nan), ValueError, r"must be (> 0|a finite number), got \w+=nan"),
    ],
)
def test_vector_and_concrete_array_thresholds_raise(name, bad, error, match):
    factory, arg = TRANSFORMS[name]
    if name in ("leaf", "value") and isinstance(bad, list):
        pytest.skip("a list is a per-leaf pytree of bounds here (checked against the updates)")
    with pytest.raises(error, match=rf"{factory.__name__}: `{arg}.*" + match):
        factory(bad)


def test_list_bound_must_match_the_updates():
    g = {"w": jnp.ones((2, 2))}
    for factory in (optaxclip.clip_by_value, optaxclip.clip_by_leaf_norm):
        tx = factory([0.5, 1.0])
        with pytest.raises(ValueError, match=rf"{factory.__name__}: `\w+` must be .*structure"):
            tx.update(g, tx.init(g))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("jit", [False, True])
def test_integer_and_float0_leaves_pass_through_untouched(name, jit):
    # A step counter in the params pytree, and jax.grad(..., allow_int=True)'s float0.
    factory, arg = TRANSFORMS[name]
    tx = factory(**{arg: 0.01})
    params = {"w": jnp.array([3.0, 4.0]), "step": jnp.array(7, jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] * 100.0), allow_int=True)(params)
    grads = {**grads, "count": jnp.array(7, jnp.int32)}
    params = {**params, "count": jnp.array(7, jnp.int32)}
    update = jax.jit(_update, static_argnums=0) if jit else _update
    out, state = update(tx, grads, tx.init(params), params)
    assert out["step"].dtype == jax.dtypes.float0
    assert int(out["count"]) == 7 and out["count"].dtype == jnp.int32
    np.testing.assert_allclose(float(optaxclip.stats(state).pre_clip_norm), 100.0 * np.sqrt(2), rtol=1e-6)
    assert bool(optaxclip.stats(state).clipped)
