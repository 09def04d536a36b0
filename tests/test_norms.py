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
        ("f32_small", [3e-18, 4e-18], jnp.float32),
        ("f16_tiny", [1e-4, 1e-4], jnp.float16),
        ("f16_300_400", [300.0, 400.0], jnp.float16),
        ("f32_3e30_4e30", [3e30, 4e30], jnp.float32),
    )
    def test_extreme_finite_values_give_finite_correct_norm(self, values, dtype):
        x = jnp.asarray(values, dtype)
        got = float(self.variant(strict(_norms.global_norm))({"x": x}))
        expected = float(np.sqrt(np.sum(np.asarray(x, np.float64) ** 2)))
        self.assertTrue(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_norms_below_1e_minus_19_read_as_zero(self):
        # Documented: squares below float32's smallest normal flush to zero (one read,
        # no rescaling pass); such a gradient is left unscaled by every clip.
        got = self.variant(strict(_norms.global_norm))({"x": jnp.array([1e-30, 3e-20])})
        self.assertEqual(float(got), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_integer_and_float0_leaves_are_left_out(self):
        tree = {
            "w": jnp.array([3.0, 4.0]),
            "step": jnp.array(7, jnp.int32),
            "flag": jnp.array(True),
            "f0": np.zeros((2,), jax.dtypes.float0),
        }
        self.assertEqual(float(self.variant(_norms.global_norm)(tree)), 5.0)

    def test_under_vmap_each_state_gets_its_own_norm(self):
        x = jnp.array([[3.0, 4.0], [3e30, 4e30], [np.nan, 1.0]])
        got = jax.jit(jax.vmap(lambda r: _norms.global_norm({"x": r})))(x)
        np.testing.assert_allclose(np.asarray(got)[:2], [5.0, 5e30], rtol=1e-6)
        self.assertTrue(np.isnan(float(got[2])))

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
        leaves = jax.tree.leaves(tree)
        got = self.variant(strict(_norms.leaf_norms))(leaves)
        expected = [np.float32(ref.global_norm([x])) for x in leaves]
        chex.assert_trees_all_close(got, expected, rtol=1e-6)
        self.assertTrue(all(n.dtype == jnp.float32 and n.shape == () for n in got))

    def test_leaf_norms_one_huge_leaf_does_not_spoil_others(self):
        big, small = _norms.leaf_norms([jnp.array([1e30, 1e30]), jnp.array([3e-3, 4e-3])])
        np.testing.assert_allclose(float(big), np.sqrt(2) * 1e30, rtol=1e-6)
        np.testing.assert_allclose(float(small), 5e-3, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unit_norms_keep_dims_and_scale(self):
        x = jnp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 1e30)
        (got,) = self.variant(strict(lambda x: _norms.unit_norms([x], [(0, 1)])))(x)
        expected = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=(0, 1), keepdims=True))
        self.assertEqual(got.shape, (1, 1, 4))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_each_unit_picks_its_own_accumulator(self):
        # Unit 0 overflows the plain sum, unit 1 is ordinary but small (its elements
        # flush in the scaled sum), unit 2 is zero, unit 3 holds an inf.
        cols = [[3e30, 4e30], [3e-3, 4e-3], [0.0, 0.0], [np.inf, 1.0]]
        x = jnp.asarray(np.array(cols, np.float32).T)
        (got,) = self.variant(strict(lambda x: _norms.unit_norms([x], [(0,)])))(x)
        np.testing.assert_allclose(np.asarray(got)[0], [5e30, 5e-3, 0.0, np.inf], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_norm_over_many_small_leaves(self):
        # 40 leaves of 4000 elements; with one huge element in the last leaf the plain
        # sum overflows and the scaled sums of all leaves are used.
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

    def test_combine_norms_tiny_and_empty(self):
        got = _norms.combine_norms([jnp.array([3e-3, 4e-3]), jnp.zeros((0,))])
        np.testing.assert_allclose(float(got), 5e-3, rtol=1e-6)
        self.assertEqual(float(_norms.combine_norms([])), 0.0)

    def test_scale_factor_edge_cases(self):
        f = lambda n, b: float(_norms.scale_factor(jnp.float32(n), jnp.float32(b)))
        self.assertEqual(f(0.0, 0.0), 1.0)  # zero stays zero, no 0/0
        self.assertAlmostEqual(f(5.0, 1.0), 0.2, places=7)
        self.assertEqual(f(0.5, 1.0), 1.0)
        self.assertEqual(f(np.inf, 1.0), 1.0)  # non-finite passes through
        self.assertEqual(f(np.nan, 1.0), 1.0)
        self.assertEqual(f(5.0, -1.0), 0.0)  # a negative traced bound acts as 0
