"""Tests for optaxclip._agc: adaptive_grad_clip (AGC)."""

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


def flax_like_params(seed=0):
    """A Dense, a Conv, LSTM cell kernels and a classifier, Flax layouts, mixed dtypes."""
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    return {
        "conv": {"kernel": r(3, 3, 2, 4).astype(jnp.bfloat16), "bias": r(4)},
        "lstm": {"ii": {"kernel": r(4, 6)}, "hi": {"kernel": r(6, 6).astype(jnp.float16)}},
        "dense": {"kernel": r(6, 5), "bias": r(5).astype(jnp.float16)},
        "head": {"kernel": r(5, 3), "bias": r(3)},
        "scale": r(),
    }


class AdaptiveGradClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("tight", 0.01), ("loose", 10.0), ("mid", 0.3))
    def test_matches_reference(self, clipping):
        params = flax_like_params(0)
        grads = jax.tree.map(lambda p: p * 0.5 + 0.1, flax_like_params(1))
        tx = optaxclip.adaptive_grad_clip(clipping, eps=1e-3)
        out, state = self.variant(strict(tx.update))(grads, tx.init(params), params)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        expected = ref.agc(grads, params, clipping, 1e-3)
        assert_close_to_reference(out, expected)
        np.testing.assert_allclose(float(state.pre_clip_norm), ref.global_norm(grads), rtol=1e-5)
        np.testing.assert_allclose(float(state.post_clip_norm), ref.global_norm(expected), rtol=1e-3)
        self.assertEqual(bool(state.clipped), clipping < 1.0)

    def test_threshold_summary_is_norm_of_unit_bounds(self):
        params = {"k": jnp.array([[3.0, 0.0], [4.0, 0.0]])}  # unit norms 5 and 0 (-> eps)
        tx = optaxclip.adaptive_grad_clip(0.1, eps=0.5)
        _, st = tx.update(params, tx.init(params), params)
        np.testing.assert_allclose(float(st.threshold), np.hypot(0.5, 0.05), rtol=1e-6)

    def test_mixed_tree_from_conftest(self):
        grads, params = mixed_tree(0), mixed_tree(1)
        tx = optaxclip.adaptive_grad_clip(0.05)
        out, _ = strict(tx.update)(grads, tx.init(params), params)
        assert_close_to_reference(out, ref.agc(grads, params, 0.05, 1e-3))

    @parameterized.named_parameters(("pytree", "tree"), ("callable", "callable"))
    def test_mask_leaves_classifier_unclipped(self, kind):
        params = flax_like_params(0)
        grads = jax.tree.map(lambda p: p * 3.0, params)
        mask_tree = {k: jax.tree.map(lambda _, k=k: k != "head", v) for k, v in params.items()}
        mask = mask_tree if kind == "tree" else (lambda p: mask_tree)
        tx = optaxclip.adaptive_grad_clip(0.01, mask=mask)
        out, st = tx.update(grads, tx.init(params), params)
        chex.assert_trees_all_equal(out["head"], grads["head"])
        assert_close_to_reference(out, ref.agc(grads, params, 0.01, 1e-3, mask_tree))
        np.testing.assert_allclose(float(st.pre_clip_norm), ref.global_norm(grads), rtol=1e-5)

    def test_flax_nnx_lstm_layout(self):
        nnx = pytest.importorskip("flax.nnx")
        cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
        params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(cell, nnx.Param)))
        kernels = [x for x in jax.tree.leaves(params) if x.ndim == 2]
        assert kernels and all(k.shape[-1] == 4 for k in kernels)  # output-last
        grads = jax.tree.map(lambda p: p * 5.0 + 1.0, params)
        tx = optaxclip.adaptive_grad_clip(0.02)
        out, _ = tx.update(grads, tx.init(params), params)
        assert_close_to_reference(out, ref.agc(grads, params, 0.02, 1e-3))

    def test_custom_unit_axes(self):
        params = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
        grads = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
        tx = optaxclip.adaptive_grad_clip(0.1, unit_axes=lambda path, p: (1,))  # unit = row
        out, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(out["w"]), [[0.3, 0.4], [0.0, 0.1]], rtol=1e-6)

    def test_huge_and_f16_gradients(self):
        params = {"a": jnp.ones((2, 2)), "h": jnp.full((2,), 1000.0, jnp.float16)}
        grads = {"a": jnp.full((2, 2), 1e30), "h": jnp.array([30000.0, 40000.0], jnp.float16)}
        tx = optaxclip.adaptive_grad_clip(0.01)
        out, st = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(out["a"]), np.full((2, 2), 0.01), rtol=1e-6)  # 1e30 -> 0.01 * 1
        np.testing.assert_allclose(
            np.asarray(out["h"], np.float64),
            [0.01 * 1414.2136 * 0.6, 0.01 * 1414.2136 * 0.8],
            rtol=2e-3,
        )
        self.assertTrue(np.isfinite(float(st.pre_clip_norm)))

    def test_bad_arguments_raise(self):
        for name, kwargs in [
            ("clipping", {"clipping": 0.0}),
            ("clipping", {"clipping": -1.0}),
            ("eps", {"eps": -1e-3}),
            ("eps", {"eps": float("nan")}),
        ]:
            with pytest.raises(ValueError, match=rf"adaptive_grad_clip: `{name}` must be > 0.*{name}="):
                optaxclip.adaptive_grad_clip(**kwargs)
        g = {"w": jnp.ones((2, 2))}
        tx = optaxclip.adaptive_grad_clip()
        with pytest.raises(ValueError, match=r"adaptive_grad_clip: `params` must be passed.*params=None"):
            tx.update(g, tx.init(g))
        with pytest.raises(ValueError, match=r"`params` must have the structure"):
            tx.update(g, tx.init(g), {"v": jnp.ones((2, 2))})
        tx = optaxclip.adaptive_grad_clip(mask={"x": True})
        with pytest.raises(ValueError, match=r"`mask` must have the structure"):
            tx.update(g, tx.init(g), g)

    def test_optax_masked_and_chain(self):
        params = flax_like_params(0)
        grads = jax.tree.map(lambda p: p * 3.0, params)
        mask = {k: jax.tree.map(lambda _, k=k: k != "head", v) for k, v in params.items()}
        tx = optax.chain(optax.masked(optaxclip.adaptive_grad_clip(0.01), mask), optax.sgd(1.0))
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        expected = ref.agc(grads, params, 0.01, 1e-3, mask)
        assert_close_to_reference(out, jax.tree.map(lambda e: -e, expected))
        self.assertEqual(int(optaxclip.stats(state).step_count), 1)
