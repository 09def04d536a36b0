"""Tests for optaxclip._norms: the one place norms are computed."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from absl.testing import parameterized
from conftest import mixed_tree, strict

from optaxclip import _norms


class GlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference_on_mixed_tree(self):
        tree = mixed_tree()
        got = self.variant(strict(_norms.global_norm))(tree)
        self.assertEqual(got.dtype, jnp.float32)
        np.testing.assert_allclose(float(got), ref.global_norm(tree), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("f32_huge", [1e30, 1e30], jnp.float32),
        ("f32_near_max", [3e38, 1e38], jnp.float32),
        ("f16_near_max", [60000.0, 60000.0], jnp.float16),
        ("bf16_huge", [1e30, -1e30], jnp.bfloat16),
        ("f32_tiny", [1e-30, 1e-30], jnp.float32),
        ("f32_squares_underflow", [1e-19, 3e-20], jnp.float32),
        ("f16_tiny", [1e-4, 1e-4], jnp.float16),
    )
    def test_extreme_finite_values_give_finite_correct_norm(self, values, dtype):
        x = jnp.asarray(values, dtype)
        got = float(self.variant(strict(_norms.global_norm))({"x": x}))
        expected = float(np.sqrt(np.sum(np.asarray(x, np.float64) ** 2)))
        self.assertTrue(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("inf", [1.0, np.inf], np.inf),
        ("neg_inf", [-np.inf, 1e30], np.inf),
        ("nan", [np.nan, 1.0], np.nan),
        ("nan_and_inf", [np.nan, np.inf], np.nan),
    )
    def test_nonfinite_input_gives_nonfinite_norm(self, values, expected):
        got = float(self.variant(strict(_norms.global_norm))([jnp.asarray(values)]))
        np.testing.assert_equal(got, expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_norm_beyond_float32_range_is_inf(self):
        got = self.variant(strict(_norms.global_norm))([jnp.array([3e38, 3e38])])
        self.assertEqual(float(got), np.inf)  # 4.2e38 has no float32; documented

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_and_empty(self):
        norm = self.variant(strict(_norms.global_norm))
        self.assertEqual(float(norm({"a": jnp.zeros(3), "b": jnp.zeros((), jnp.bfloat16)})), 0.0)
        self.assertEqual(float(norm({})), 0.0)


class LeafAndUnitNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_leaf_norms_match_reference(self):
        tree = mixed_tree(1)
        got = self.variant(strict(_norms.leaf_norms))(tree)
        expected = jax.tree.map(lambda x: ref.global_norm([x]), tree)
        chex.assert_trees_all_close(got, jax.tree.map(np.float32, expected), rtol=1e-6)
        chex.assert_trees_all_equal_dtypes(got, jax.tree.map(lambda _: jnp.float32(0), tree))

    def test_leaf_norms_one_huge_leaf_does_not_spoil_others(self):
        got = _norms.leaf_norms({"big": jnp.array([1e30, 1e30]), "small": jnp.array([3.0, 4.0])})
        np.testing.assert_allclose(float(got["big"]), np.sqrt(2) * 1e30, rtol=1e-6)
        np.testing.assert_allclose(float(got["small"]), 5.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unit_norms_keep_dims_and_scale(self):
        x = jnp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 1e30)
        (got,) = self.variant(strict(lambda x: _norms.unit_norms([x], [(0, 1)])))(x)
        expected = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=(0, 1), keepdims=True))
        self.assertEqual(got.shape, (1, 1, 4))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rescue_path_rescales_only_the_units_that_need_it(self):
        # Unit 0 overflows, unit 1 is ordinary but small (its elements would flush if
        # scaled by 2**-64), unit 2's squares underflow, unit 3 is zero.
        cols = [[3e30, 4e30], [3e-3, 4e-3], [3e-25, 4e-25], [0.0, 0.0]]
        x = jnp.asarray(np.array(cols, np.float32).T)
        (got,) = self.variant(strict(lambda x: _norms.unit_norms([x], [(0,)])))(x)
        np.testing.assert_allclose(np.asarray(got)[0], [5e30, 5e-3, 5e-25, 0.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_norm_over_many_small_leaves(self):
        # 40 leaves of 4000 elements: concatenated in three groups; with one huge
        # element in the last leaf the rescue path runs through the groups too.
        rng = np.random.default_rng(0)
        tree = [jnp.asarray(rng.standard_normal(4000).astype(np.float32)) for _ in range(40)]
        norm = self.variant(strict(_norms.global_norm))
        np.testing.assert_allclose(float(norm(tree)), ref.global_norm(tree), rtol=1e-5)
        tree[-1] = tree[-1].at[7].set(1e30)
        np.testing.assert_allclose(float(norm(tree)), ref.global_norm(tree), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_global_norms(self):
        tree = {"a": jnp.array([[3.0, 0.0], [1e30, 0.0]]), "b": jnp.array([[4.0], [1e30]])}
        got = self.variant(strict(_norms.batch_global_norms))(tree)
        np.testing.assert_allclose(np.asarray(got), [5.0, np.sqrt(2) * 1e30], rtol=1e-6)

    def test_combine_norms_is_overflow_safe(self):
        got = _norms.combine_norms([jnp.array(3e30), jnp.array([4e30, 0.0])])
        np.testing.assert_allclose(float(got), 5e30, rtol=1e-6)
        self.assertTrue(np.isnan(float(_norms.combine_norms([jnp.array(np.nan), jnp.array(1.0)]))))
        self.assertEqual(float(_norms.combine_norms([jnp.array(np.inf), jnp.array(1.0)])), np.inf)

    def test_combine_norms_each_keeps_groups_apart(self):
        # Groups of different lengths (zero-padded together), one overflow-sized, one
        # NaN, one empty: each gets its own norm.
        got = _norms.combine_norms_each(
            [jnp.array(3e30), jnp.array([4e30, 0.0])],
            [jnp.array([3.0, 4.0, 12.0])],
            [jnp.array(np.nan), jnp.array(1.0)],
            [],
        )
        self.assertEqual(len(got), 4)
        np.testing.assert_allclose([float(v) for v in got[:2]], [5e30, 13.0], rtol=1e-6)
        self.assertTrue(np.isnan(float(got[2])))
        self.assertEqual(float(got[3]), 0.0)

    def test_scale_factor_edge_cases(self):
        f = lambda n, b: float(_norms.scale_factor(jnp.float32(n), jnp.float32(b)))
        self.assertEqual(f(0.0, 0.0), 1.0)  # zero stays zero, no 0/0
        self.assertAlmostEqual(f(5.0, 1.0), 0.2, places=7)
        self.assertEqual(f(0.5, 1.0), 1.0)
        self.assertEqual(f(np.inf, 1.0), 1.0)  # non-finite passes through
        self.assertEqual(f(np.nan, 1.0), 1.0)
        self.assertEqual(f(5.0, -1.0), 0.0)  # a negative traced bound acts as 0
