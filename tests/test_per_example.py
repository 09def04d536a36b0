"""Tests for optaxclip._per_example: per_example_grads and clipped_grad_sum (the vmap path)."""

import os
import pathlib
import re
import subprocess
import sys

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
    dp_release_of_clipped_sum,
    dtype_params_and_batch,
    dtype_scope,
    extreme_value,
    refused_message,
    release_gap,
    strict,
)

import optaxclip

NO_BRANCH = re.compile(r"\bconditional\(|stablehlo\.(if|case)\b")


def _loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def _model_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (jnp.sum(h * params["w2"]) - y) ** 2


def _model(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    }
    xs = jnp.asarray(rng.normal(size=(batch, 5)) * 3, jnp.float32)
    ys = jnp.asarray(rng.normal(size=(batch,)), jnp.float32)
    return params, xs, ys


def reference_clipped_sum(per_example, clip, mask=None, layer_clips=None):
    """Float64: clip each example (globally, or each leaf to its own bound), sum the real finite rows."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(per_example)]
    batch = leaves[0].shape[0]
    mask = np.ones(batch, bool) if mask is None else np.asarray(mask)
    sq = [np.sum(x.reshape(batch, -1) ** 2, axis=1) for x in leaves]
    norms = np.sqrt(sum(sq))
    ok = mask & np.isfinite(norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        if layer_clips is None:
            factors = [np.where(ok, np.minimum(1.0, clip / norms), 0.0)] * len(leaves)
        else:
            factors = [
                np.where(ok, np.minimum(1.0, c / np.sqrt(q)), 0.0)
                for q, c in zip(sq, layer_clips, strict=True)
            ]
    sums = [
        np.sum(np.where(ok.reshape(-1, *[1] * (x.ndim - 1)), x, 0.0) * f.reshape(-1, *[1] * (x.ndim - 1)), 0)
        for x, f in zip(leaves, factors, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(per_example), sums), norms


def test_per_example_grads_match_a_loop_and_microbatching():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    full = optaxclip.per_example_grads(_loss)(w, xs)
    loop = jnp.stack([jax.grad(_loss)(w, x) for x in xs])
    chex.assert_trees_all_close(full, loop, rtol=1e-5, atol=1e-6)
    micro = jax.jit(optaxclip.per_example_grads(_loss, microbatch_size=2))(w, xs)
    chex.assert_trees_all_close(micro, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of `microbatch_size`"):
        optaxclip.per_example_grads(_loss, microbatch_size=3)(w, xs)
    aux_fn = optaxclip.per_example_grads(lambda w, x: (_loss(w, x), jnp.sum(x)), has_aux=True)
    g, aux = aux_fn(w, xs)
    chex.assert_trees_all_close(g, full, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(aux, jnp.sum(xs, axis=1), rtol=1e-6)


class ArgnumsValidationTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("per_example_grads", optaxclip.per_example_grads), ("clipped_grad_sum", optaxclip.clipped_grad_sum)
    )
    def test_bad_argnums_are_refused_at_construction(self, factory):
        name = factory.__name__
        with pytest.raises(
            ValueError, match=rf"{name}: `batch_argnums` must not overlap.*batch_argnums=\(0,\)"
        ):
            factory(_loss, argnums=0, batch_argnums=0)
        with pytest.raises(
            ValueError, match=rf"{name}: `batch_argnums` must not overlap.*batch_argnums=\(1, 2\)"
        ):
            factory(_model_loss, argnums=(0, 1), batch_argnums=(1, 2))
        with pytest.raises(
            ValueError, match=rf"{name}: `batch_argnums` must name at least one.*batch_argnums=\(\)"
        ):
            factory(_loss, batch_argnums=())
        with pytest.raises(
            ValueError, match=rf"{name}: `batch_argnums` must be non-negative.*batch_argnums=\(-1,\)"
        ):
            factory(_loss, batch_argnums=-1)

    @parameterized.named_parameters(
        ("per_example_grads", optaxclip.per_example_grads, {}),
        ("clipped_grad_sum", optaxclip.clipped_grad_sum, {"l2_norm_clip": 1.0}),
    )
    def test_inconsistent_batch_sizes_name_the_arguments(self, factory, kwargs):
        name = factory.__name__
        params, xs, ys = _model()
        f = factory(_model_loss, batch_argnums=(1, 2))
        with pytest.raises(
            ValueError,
            match=rf"{name}: .*same leading \(batch\) size.*argument 1: 8.*"
            r"argument 2: 6.*batch_argnums=\(1, 2\)",
        ):
            f(params, xs, ys[:6], **kwargs)
        with pytest.raises(ValueError, match=rf"{name}: .*argument 2: no batch axis"):
            f(params, xs, ys[0], **kwargs)
        with pytest.raises(ValueError, match=rf"{name}: `batch_argnums` must index the 2 positional"):
            factory(_model_loss, batch_argnums=(1, 2))(params, xs, **kwargs)


class ClippedGradSumTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("whole", None), ("micro2", 2), ("micro4", 4))
    def test_equals_the_per_example_path(self, microbatch_size):
        params, xs, ys = _model()
        xs = xs.at[3].set(np.nan)  # a non-finite example: dropped and counted on both paths
        mask = np.array([1, 1, 1, 1, 1, 0, 1, 0], bool)
        per_example = optaxclip.per_example_grads(_model_loss, batch_argnums=(1, 2))(params, xs, ys)
        fn = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2), microbatch_size=microbatch_size)
        summed = self.variant(lambda p, x, y: fn(p, x, y, l2_norm_clip=0.5, mask=mask))(params, xs, ys)
        assert isinstance(summed, optaxclip.ClippedGradSum)
        tx = optaxclip.dp_aggregate(0.5, 1.3, jax.random.key(5))
        a, sa = tx.update(per_example, tx.init(params), params, mask=mask)
        b, sb = tx.update(summed, tx.init(params), params)
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)  # same clip, same noise draw
        chex.assert_trees_all_equal_shapes_and_dtypes(b, params)
        for field in ("pre_clip_norm", "clipped", "nonfinite_count"):
            np.testing.assert_allclose(getattr(sa.stats, field), getattr(sb.stats, field), rtol=1e-5)
        assert int(sb.nonfinite_example_count) == 1

    @pytest.mark.filterwarnings(
        "ignore:optax.global_norm is deprecated:DeprecationWarning"
    )  # optax's own call
    def test_matches_jax_privacy_and_optax(self):
        clipping = pytest.importorskip("jax_privacy.clipping")
        params, xs, ys = _model(seed=1, batch=16)
        clip = 0.8
        ours = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2), microbatch_size=4)
        ours = jax.jit(lambda p, x, y: ours(p, x, y, l2_norm_clip=clip))(params, xs, ys).grads

        def batch_loss(p, x, y):  # jax_privacy differentiates a batched loss, summed over rows
            return jnp.sum(jax.vmap(_model_loss, in_axes=(None, 0, 0))(p, x, y))

        theirs = clipping.clipped_grad(batch_loss, l2_clip_norm=clip, batch_argnums=(1, 2))(params, xs, ys)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)
        per_example = optaxclip.per_example_grads(_model_loss, batch_argnums=(1, 2))(params, xs, ys)
        leaves, treedef = jax.tree.flatten(per_example)
        optax_sum, _ = optax.per_example_global_norm_clip(leaves, clip)
        chex.assert_trees_all_close(ours, treedef.unflatten(optax_sum), rtol=1e-5, atol=1e-6)

    def test_microbatching_bounds_peak_memory(self):
        rng = np.random.default_rng(0)
        params = {"w": jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)}
        xs = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
        loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

        def temp(microbatch_size):
            fn = optaxclip.clipped_grad_sum(loss, microbatch_size=microbatch_size)
            step = jax.jit(lambda p, x: fn(p, x, l2_norm_clip=1.0).grads)
            return step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes

        whole, micro = temp(None), temp(16)
        assert whole >= 64 * 256 * 256 * 4  # batch x params float32 per-example gradients
        assert micro <= whole / 3, (micro, whole)

    def test_mask_argument_goes_to_clipped_grad_sum(self):
        params, xs, ys = _model()
        summed = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2))(
            params, xs, ys, l2_norm_clip=1.0
        )
        tx = optaxclip.dp_aggregate(1.0, 0.0, jax.random.key(0))
        with pytest.raises(ValueError, match="pass `mask` to `clipped_grad_sum`"):
            tx.update(summed, tx.init(params), params, mask=np.ones(8, bool))
        with pytest.raises(ValueError, match=r"`l2_norm_clip` must be > 0.*l2_norm_clip=-1"):
            optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2))(params, xs, ys, l2_norm_clip=-1.0)

    def test_larger_clip_than_the_transform_gets_its_own_noise(self):
        zeros = {"a": jnp.zeros((4, 20_000))}
        summed = optaxclip.ClippedGradSum(
            {"a": jnp.zeros(20_000)}, jnp.zeros(4), jnp.ones(4, bool), jnp.asarray(3.0)
        )
        tx = optaxclip.dp_aggregate(1.0, 1.0, jax.random.key(1), expected_batch_size=1)
        small, _ = tx.update(zeros, tx.init(None))
        big, state = tx.update(summed, tx.init(None))
        np.testing.assert_allclose(float(jnp.std(small["a"])), 1.0, rtol=0.03)
        np.testing.assert_allclose(float(jnp.std(big["a"])), 3.0, rtol=0.03)
        assert float(state.stats.threshold) == 3.0  # the clip norm actually applied

    def test_compiled_sum_has_no_conditional_and_drops_nan_rows(self):
        params, xs, ys = _model()
        fn = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2))
        step = jax.jit(lambda p, x, y: fn(p, x, y, l2_norm_clip=0.5))
        lowered = step.lower(params, xs, ys)
        assert not NO_BRANCH.search(lowered.as_text()) and not NO_BRANCH.search(lowered.compile().as_text())
        bad = xs.at[2].set(np.inf)
        out = step(params, bad, ys)
        per_example = optaxclip.per_example_grads(_model_loss, batch_argnums=(1, 2))(params, bad, ys)
        expected, norms = reference_clipped_sum(per_example, 0.5)
        assert not np.isfinite(float(out.norms[2])) and np.all(np.isfinite(np.asarray(out.norms)[[0, 1, 3]]))
        chex.assert_trees_all_close(out.grads, expected, rtol=1e-5, atol=1e-6)


class DTypeRuleTest(parameterized.TestCase):
    """Issue 20: the clipped sum of any float dtype stays within the clip norm; int/bool refused."""

    @parameterized.parameters(*DP_FLOAT_DTYPES)
    def test_one_extreme_example_moves_the_release_by_at_most_the_clip_norm(self, dtype):
        with dtype_scope(dtype):
            a, _ = dp_release_of_clipped_sum(optaxclip.clipped_grad_sum, dtype)
            b, state = dp_release_of_clipped_sum(
                optaxclip.clipped_grad_sum, dtype, extreme=extreme_value(dtype)
            )
            assert b["v"].dtype == jnp.dtype(dtype)
            gap = release_gap(a, b)
        tol = 1e-2 if dtype in ("bfloat16", "float16") else 1e-5
        assert 1 - tol <= gap <= 1 + tol, gap  # clipped to the clip norm, not dropped
        assert bool(state.stats.clipped)

    @parameterized.product(
        dtype=DP_REFUSED_DTYPES, factory=(optaxclip.clipped_grad_sum, optaxclip.per_example_grads)
    )
    def test_integer_and_bool_params_are_refused_by_path_and_dtype(self, dtype, factory):
        params, xs = dtype_params_and_batch("float32")
        params["v"] = params["v"].astype(dtype)
        f = factory(lambda p, x: jnp.sum(p["w"] * x[:3]))
        kwargs = {"l2_norm_clip": 1.0} if factory is optaxclip.clipped_grad_sum else {}
        with pytest.raises(ValueError, match=refused_message("argument 0['v']", dtype)):
            f(params, xs, **kwargs)


class PerLayerClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("whole", None), ("micro4", 4))
    def test_pytree_and_callable_bounds_match_reference(self, microbatch_size):
        params, xs, ys = _model(seed=2)
        xs = xs.at[1].set(np.nan)
        mask = np.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
        bounds = {"w1": 0.3, "b1": 0.1, "w2": 2.0}
        fn = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2), microbatch_size=microbatch_size)
        per_example = optaxclip.per_example_grads(_model_loss, batch_argnums=(1, 2))(params, xs, ys)
        expected, norms = reference_clipped_sum(per_example, None, mask, jax.tree.leaves(bounds))
        by_key = lambda path, leaf: bounds[path[0].key]
        for spec in (bounds, by_key):
            out = self.variant(strict(lambda p, x, y, spec=spec: fn(p, x, y, l2_norm_clip=spec, mask=mask)))(
                params, xs, ys
            )
            chex.assert_trees_all_close(out.grads, expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(out.norms)[mask], norms[mask], rtol=1e-5)
            np.testing.assert_allclose(float(out.l2_norm_clip), np.sqrt(0.09 + 0.01 + 4.0), rtol=1e-6)

    @parameterized.named_parameters(("remove", "remove"), ("replace_nan", np.nan), ("replace_huge", 1e6))
    def test_sensitivity_is_the_root_sum_of_squared_bounds(self, change):
        params, xs, ys = _model(seed=3, batch=6)
        bounds = {"w1": 0.3, "b1": 0.1, "w2": 0.5}
        sens = np.sqrt(0.09 + 0.01 + 0.25)
        fn = jax.jit(
            lambda p, x, y: optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2))(
                p, x, y, l2_norm_clip=bounds
            )
        )
        if change == "remove":
            other_x, other_y, bound = xs[:-1], ys[:-1], sens
        elif np.isnan(change):
            other_x, other_y, bound = xs.at[2].set(change), ys, sens  # a NaN example counts as removed
        else:
            other_x, other_y, bound = xs, ys.at[2].set(change), 2 * sens
        a, b = fn(params, xs * 10, ys), fn(params, other_x * 10, other_y)
        diff = optaxclip.global_norm(jax.tree.map(jnp.subtract, a.grads, b.grads))
        assert np.isfinite(float(diff)) and float(diff) <= bound * (1 + 1e-4)
        assert float(diff) > 0.5 * sens  # the examples are clipped: the bound is nearly reached
        np.testing.assert_allclose(float(a.l2_norm_clip), sens, rtol=1e-6)

    def test_bad_bounds(self):
        params, xs, ys = _model()
        fn = optaxclip.clipped_grad_sum(_model_loss, batch_argnums=(1, 2))
        with pytest.raises(ValueError, match=r"clipped_grad_sum: `l2_norm_clip\['b1'\]` must be > 0"):
            fn(params, xs, ys, l2_norm_clip={"w1": 1.0, "b1": 0.0, "w2": 1.0})
        with pytest.raises(ValueError, match=r"clipped_grad_sum: `l2_norm_clip` must be a number.*structure"):
            fn(params, xs, ys, l2_norm_clip={"w1": 1.0})
        with pytest.raises(ValueError, match=r"`l2_norm_clip\['w2'\]` must be > 0"):
            fn(params, xs, ys, l2_norm_clip=lambda path, leaf: -1.0 if path[0].key == "w2" else 1.0)
        # An infinite clip norm would make the noise std infinite (inf / inf downstream).
        with pytest.raises(ValueError, match=r"clipped_grad_sum: `l2_norm_clip` must be a finite.*=inf"):
            fn(params, xs, ys, l2_norm_clip=float("inf"))
        with pytest.raises(ValueError, match=r"`l2_norm_clip\['w1'\]` must be a finite.*=inf"):
            fn(params, xs, ys, l2_norm_clip={"w1": float("inf"), "b1": 1.0, "w2": 1.0})


@pytest.mark.distributed  # 8 forced host devices in a subprocess: make test-distributed
def test_per_example_grads_and_clipped_sum_under_shard_map_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = pathlib.Path(__file__).with_name("_sharded_per_example_script.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "per_example_grads 8 devices == 1 device" in proc.stdout
    assert "clipped_grad_sum 8 devices == 1 device" in proc.stdout
    assert "ghost_clipped_grad_sum 8 devices == 1 device" in proc.stdout
    assert "PER EXAMPLE SHARDING OK" in proc.stdout
