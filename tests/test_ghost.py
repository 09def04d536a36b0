"""Tests for optaxclip._ghost: ghost_clipped_grad_sum equals the vmap path (clipped_grad_sum) on any model.

The models are `tests/ghost_models.py`'s (plain JAX, Flax NNX, Flax Linen,
Equinox); `tests/test_ghost_models.py` checks each at a global bound, this
file the rest: masks, NaN and huge examples, per-layer bounds, a float64
reference, batch 1, aux, every site op under both modes, scans (nested,
reversed, constants), calls and remat, sensitivity, shard_map, the compiled
step's structure, bad input, and the DP dtype rule.
"""

import contextlib
import os
import pathlib
import re
import subprocess
import sys
from unittest import mock

import chex
import ghost_models as gm
import jax
import jax.numpy as jnp
import numpy as np
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
)

import optaxclip
from optaxclip import _ghost_ops

NO_BRANCH = re.compile(r"\bconditional\(|stablehlo\.(if|case)\b")
RTOL = 1e-4  # float32, sums taken in another order than the vmap path's
B = gm.BATCH
PER_LAYER = staticmethod(lambda path, leaf: 0.05 if leaf.ndim > 1 else 0.02)


def assert_close(a, b, rtol=RTOL):
    """Leafwise, to `rtol` of the whole tree's largest entry (a leaf whose true gradient is 0, e.g. an
    attention key bias, holds float32 rounding noise of the rest)."""
    scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=rtol * scale
        )


def max_rel_error(a, b) -> float:
    """The largest entry-wise difference over the tree, relative to the tree's largest entry."""
    scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in jax.tree.leaves(b))
    diff = max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    return diff / max(scale, 1e-30)


class Case:
    """A zoo model with a per-example loss scale (NaN: a non-finite example; 1e4: a huge one), both
    paths and one jitted call of each at a global bound (with a mask) and at per-layer bounds."""

    def __init__(self, name):
        self.name, model = name, gm.MODELS[name]()
        self.params, (self.x, self.y), base = model.params, model.batch, model.loss_fn
        self.loss = lambda p, x, y, s: base(p, x, y) * s
        self.ghost = optaxclip.ghost_clipped_grad_sum(self.loss, batch_argnums=(1, 2, 3))
        self.vmap = optaxclip.clipped_grad_sum(self.loss, batch_argnums=(1, 2, 3))
        self.grad = jax.jit(jax.grad(base))

        def both(f):
            def run(p, x, y, s, m, clip):
                kw = {"mask": m}
                return f(p, x, y, s, l2_norm_clip=clip, **kw), f(p, x, y, s, l2_norm_clip=PER_LAYER, **kw)

            return jax.jit(run)

        self.jit_ghost, self.jit_vmap = both(self.ghost), both(self.vmap)

    def run(self, scale=None, mask=None, clip=0.3):
        scale = jnp.ones(B) if scale is None else scale
        mask = jnp.ones(B, bool) if mask is None else jnp.asarray(mask)
        args = (self.params, self.x, self.y, scale, mask, jnp.float32(clip))
        return self.jit_ghost(*args), self.jit_vmap(*args)

    def float64_reference(self, clip, mask):
        """Float64: clip each example's exact gradient (jax.grad, one at a time), sum the real ones."""
        rows = []
        for b in range(B):
            g = self.grad(self.params, self.x[b], self.y[b])
            rows.append([np.asarray(v, np.float64) for v in jax.tree.leaves(g)])
        norms = np.array([np.sqrt(sum(np.sum(v**2) for v in r)) for r in rows])
        total = [np.zeros_like(v) for v in rows[0]]
        for b, r in enumerate(rows):
            if mask[b]:
                total = [t + v * min(1.0, clip / norms[b]) for t, v in zip(total, r, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(self.params), total), norms


_CASES: dict = {}


def case(name) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


ZOO = ("einsum_attention", "nnx_transformer", "linen_transformer", "nnx_lstm", "nnx_gru", "linen_lstm")
ZOO += ("equinox_lstm", "nnx_conv", "nnx_layer_twice")  # (the tied embedding: test_ghost_models.py)


class GhostMatchesVmapPathTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(n, n) for n in ZOO])
    def test_mask_nan_huge_example_and_per_layer_bounds(self, name):
        c = case(name)
        scale = jnp.ones(B).at[1].set(jnp.nan).at[3].set(1e4)  # row 1 non-finite, row 3 huge
        mask = np.array([True, True, False, True])
        (fast, fast_layer), (slow, slow_layer) = c.run(scale, mask)
        assert isinstance(fast, optaxclip.ClippedGradSum)
        assert not np.isfinite(float(fast.norms[1])) and not np.isfinite(float(slow.norms[1]))
        np.testing.assert_allclose(np.delete(fast.norms, 1), np.delete(slow.norms, 1), rtol=RTOL)
        assert_close(fast.grads, slow.grads)
        chex.assert_trees_all_equal_structs(fast.grads, c.params)
        assert all(x.dtype == jnp.float32 and np.all(np.isfinite(x)) for x in jax.tree.leaves(fast.grads))
        np.testing.assert_array_equal(fast.mask, mask)
        assert_close(fast_layer.grads, slow_layer.grads)
        np.testing.assert_allclose(float(fast_layer.l2_norm_clip), float(slow_layer.l2_norm_clip), rtol=1e-6)
        tx = optaxclip.dp_aggregate(0.3, 0.0, jax.random.key(0))
        _, state = tx.update(fast, tx.init(c.params), c.params)
        assert int(state.nonfinite_example_count) == 1
        ok = np.isfinite(np.asarray(slow.norms))
        errors = [max_rel_error(fast.grads, slow.grads), max_rel_error(fast_layer.grads, slow_layer.grads)]
        errors.append(max_rel_error(np.asarray(fast.norms)[ok], np.asarray(slow.norms)[ok]))
        print(f"{name}: max rel error vs the vmap path {max(errors):.1e}")  # the figure the README quotes

    def test_equal_a_float64_reference(self):
        c = case("einsum_attention")
        mask = np.array([True, False, True, True])
        (fast, _), _ = c.run(mask=mask, clip=0.2)
        ref, ref_norms = c.float64_reference(0.2, mask)
        np.testing.assert_allclose(fast.norms, ref_norms, rtol=RTOL)
        assert_close(fast.grads, ref)

    def test_batch_of_one(self):
        c = case("nnx_lstm")
        f = jax.jit(lambda p, x, y: c.ghost(p, x, y, jnp.ones(1), l2_norm_clip=0.1))
        g = jax.jit(lambda p, x, y: c.vmap(p, x, y, jnp.ones(1), l2_norm_clip=0.1))
        fast, slow = f(c.params, c.x[:1], c.y[:1]), g(c.params, c.x[:1], c.y[:1])
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    @parameterized.named_parameters(("global", 0.3), ("per_layer", PER_LAYER))
    def test_microbatches_give_the_same_sum_norms_and_aux(self, clip):
        c = case("nnx_lstm")
        aux_loss = lambda p, x, y, s: (c.loss(p, x, y, s), jnp.sum(x))
        f = optaxclip.ghost_clipped_grad_sum(
            aux_loss, batch_argnums=(1, 2, 3), has_aux=True, microbatch_size=2
        )
        scale, mask = jnp.ones(B).at[3].set(jnp.nan), jnp.array([True, False, True, True])
        fast, aux = jax.jit(lambda *a: f(*a, l2_norm_clip=clip, mask=mask))(c.params, c.x, c.y, scale)
        _, (slow, slow_layer) = c.run(scale, mask)
        slow = slow if clip == 0.3 else slow_layer
        np.testing.assert_array_equal(aux, jnp.sum(c.x, axis=1))
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: `microbatch_size` .*=0"):
            optaxclip.ghost_clipped_grad_sum(aux_loss, microbatch_size=0)
        with pytest.raises(ValueError, match=r"batch size \(4\) must be a multiple of `microbatch_size`"):
            optaxclip.ghost_clipped_grad_sum(c.loss, batch_argnums=(1, 2, 3), microbatch_size=3)(
                c.params, c.x, c.y, scale, l2_norm_clip=1.0
            )

    def test_has_aux_returns_per_example_aux(self):
        m = gm.mlp()
        aux_loss = lambda p, x, y: (m.loss_fn(p, x, y), {"n": jnp.sum(x), "z": jnp.zeros(2)})
        f = optaxclip.ghost_clipped_grad_sum(aux_loss, batch_argnums=(1, 2), has_aux=True)
        fast, aux = jax.jit(lambda p, x, y: f(p, x, y, l2_norm_clip=0.3))(m.params, *m.batch)
        np.testing.assert_allclose(aux["n"], jnp.sum(m.batch[0], axis=1), rtol=1e-6)
        assert aux["z"].shape == (B, 2)
        slow = optaxclip.clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2))(
            m.params, *m.batch, l2_norm_clip=0.3
        )
        assert_close(fast.grads, slow.grads)


def _forced_ghost(site):
    """Every dense and embedding site with a norm-keeping chain takes the ghost norm."""
    if site.isometric and (site.kind == "dot_general" or _ghost_ops.is_embedding(site)):
        return "ghost"
    return "materialised"


def _structures():
    """Plain-JAX losses of one example `(name, loss, params, x)` for the site ops and their places."""
    k = jax.random.split(jax.random.key(0), 8)
    w = jax.random.normal(k[0], (6, 6)) * 0.5
    x = jax.random.normal(k[1], (B, 5, 6))
    ids = jnp.array([[0, 1, 1, 9], [3, 3, 3, 3], [2, 7, 0, 1], [1, -1, 2, 2]])  # 9, -1: out of range

    def nested_scan(p, x):  # a scan in a scan: the kernel's steps are 5 x 3 positions
        def outer(h, xt):
            h2, _ = jax.lax.scan(lambda g, _: (jnp.tanh(g @ p["w"] + xt), None), h, None, length=3)
            return h2, h2

        return jnp.sum(jax.lax.scan(outer, jnp.zeros(6), x)[1] ** 2)

    def reversed_remat(p, x):  # a reverse scan of a checkpointed step
        step = jax.checkpoint(lambda h, xt: (jnp.tanh(h @ p["w"] + xt @ p["u"]),) * 2)
        return jnp.sum(jax.lax.scan(step, jnp.zeros(6), x, reverse=True)[1] ** 2)

    def context(p, x):  # a per-example value that is a constant of the scan (no step axis)
        c = jnp.tanh(x.mean(0))
        step = lambda h, xt: (jnp.tanh(h @ p["w"] + c @ p["u"] + xt),) * 2
        return jnp.sum(jax.lax.scan(step, jnp.zeros(6), x)[1] ** 2)

    def heads(p, x):  # per-head weights (a dot batch dim shared with the weight), bf16 cast, a scalar
        y = jnp.einsum("hte,hef->htf", x.reshape(5, 2, 3).transpose(1, 0, 2), p["wh"])
        z = y.astype(jnp.bfloat16) @ p["wb"]
        return jnp.sum(jnp.tanh(z.astype(jnp.float32) * p["temp"]) ** 2)

    dense = jax.jit(lambda w, h: jnp.tanh(h @ w))

    def jit_twice(p, x):  # one jitted function called with two weights: two sites
        return jnp.sum(dense(p["b"], dense(p["a"], x)) ** 2)

    def conv(p, img):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(img[None], p["k"], (2, 1), "SAME", dimension_numbers=dn)
        return jnp.sum(jnp.tanh(y + p["b"].reshape(1, 1, 1, -1)) ** 2)

    def embed(p, ids):  # `fill` drops out-of-range ids, `clip` clamps them
        a = jnp.take(p["e"], ids, axis=0, mode="fill", fill_value=0.0)
        return jnp.sum(jnp.tanh((a + jnp.take(p["e2"], ids, axis=0, mode="clip")) @ p["w"]) ** 2)

    bf16 = jax.random.normal(k[3], (4, 4)).astype(jnp.bfloat16)
    tables = {"e": jax.random.normal(k[5], (8, 5)), "e2": jax.random.normal(k[6], (8, 5))}
    return [
        ("nested_scan", nested_scan, {"w": w}, x),
        ("reversed_remat", reversed_remat, {"w": w, "u": w.T}, x),
        ("scan_constant", context, {"w": w, "u": w.T}, x),
        (
            "per_head_bf16_scalar",
            heads,
            {"wh": jax.random.normal(k[2], (2, 3, 4)), "wb": bf16, "temp": jnp.float32(0.7)},
            x,
        ),
        ("jit_called_twice", jit_twice, {"a": w, "b": w.T}, x),
        (
            "conv",
            conv,
            {"k": jax.random.normal(k[4], (3, 3, 2, 3)), "b": jnp.zeros(3)},
            x[..., :4].reshape(B, 5, 2, 2),
        ),
        ("embed_fill_clip", embed, {**tables, "w": jax.random.normal(k[7], (5, 3))}, ids),
    ]


class SiteOpsTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(s[0], s) for s in _structures()])
    def test_each_mode_equals_the_vmap_path(self, structure):
        name, loss, params, x = structure
        ghost = optaxclip.ghost_clipped_grad_sum(loss)
        slow = jax.jit(lambda p, x: optaxclip.clipped_grad_sum(loss)(p, x, l2_norm_clip=0.3))(params, x)
        tol = 2e-2 if "bf16" in name else RTOL  # a bfloat16 matmul: rounded in another order
        for forced in (False, True):
            with (
                mock.patch.object(_ghost_ops, "choose_mode", _forced_ghost)
                if forced
                else contextlib.nullcontext()
            ):
                paths = ghost.paths(params, x)
                fast = jax.jit(lambda p, x: ghost(p, x, l2_norm_clip=0.3))(params, x)
            assert "per-example" not in paths.values(), paths
            np.testing.assert_allclose(fast.norms, slow.norms, rtol=tol)
            assert_close(fast.grads, slow.grads, rtol=tol)
        assert name == "conv" or "ghost" in paths.values(), paths  # the forced run took ghost norms


class PathsTest(parameterized.TestCase):
    def test_the_issues_transformer_takes_no_per_example_gradient(self):
        # Issue 21's model: 4 blocks of nnx.MultiHeadAttention + LayerNorm + MLP, width 256, seq 128 (70
        # leaves; the Flax class patching left 51 of them per-example). Planned only, not compiled.
        m = gm.nnx_transformer(blocks=4, width=256, heads=4, seq=128)
        x = jnp.zeros((2, 128), jnp.int32)
        paths = optaxclip.ghost_clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2)).paths(m.params, x, x)
        assert len(paths) == 70 and "per-example" not in paths.values()
        kernels = {k for k in paths if k.endswith("['kernel'].value") and "blocks" in k}
        assert len(kernels) == 24 and all(paths[k] == "ghost" for k in kernels)  # 2 N^2 < d_in d_out
        assert {paths[k] for k in paths if k not in kernels} == {"materialised"}  # norms, biases, positions

    @parameterized.named_parameters(*[(n, n) for n in gm.MODELS])
    def test_no_leaf_takes_per_example_gradients_leaves_used_twice_are_materialised(self, name):
        m = gm.MODELS[name]()
        paths = optaxclip.ghost_clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2)).paths(m.params, *m.batch)
        assert "per-example" not in paths.values(), paths
        tied = {k for k in paths if any(k.startswith(f"['{t}']") for t in gm.TIED.get(name, ()))}
        assert all(paths[k] == "materialised" for k in tied), paths  # issue 27: summed over its sites

    def test_ghost_or_materialised_by_per_example_memory(self):
        # A dense kernel C x F over N positions is ghost while 2 N^2 < C F: 8 x 32 at N = 11 (242 < 256)
        # is ghost, at N = 12 (288) materialised; the bias is materialised.
        loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"][None]) ** 2)
        params = {"w": jnp.ones((8, 32)) / 8, "b": jnp.zeros(32)}
        f = optaxclip.ghost_clipped_grad_sum(loss)
        assert f.paths(params, jnp.ones((2, 11, 8))) == {"['b']": "materialised", "['w']": "ghost"}
        assert f.paths(params, jnp.ones((2, 12, 8)))["['w']"] == "materialised"

    def test_an_lstms_input_kernels_share_their_gates_gram_matrices(self):
        # Benchmark shape (hidden 128, embed 32, 64 steps): each gate's hidden kernel is ghost (2 64^2 <
        # 128^2); its input kernel (32 x 128) would be materialised by memory alone (8192 > 4096), but
        # the Gram of the gate's G is made anyway, so its ghost norm costs less and takes no more memory.
        build = lambda rngs: gm.NNXRNNLM(gm.nnx.LSTMCell, 128, embed=32, rngs=rngs)
        m = gm._nnx_model(build, 0, gm.tokens())
        x = jnp.zeros((2, 64), jnp.int32)
        paths = optaxclip.ghost_clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2)).paths(m.params, x, x)
        cell = {k: v for k, v in paths.items() if "cell" in k and "kernel" in k}
        assert len(cell) == 8 and set(cell.values()) == {"ghost"}, cell


class StructureTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("lstm", "nnx_lstm", "f32[4,8,8]"), ("attention", "einsum_attention", "f32[4,8,2,4]")
    )
    def test_no_conditional_and_no_per_example_kernel_in_the_compiled_step(self, name, per_example_kernel):
        c = case(name)
        args = (c.params, c.x, c.y, jnp.ones(B), jnp.ones(B, bool), jnp.float32(1.0))
        paths = c.ghost.paths(c.params, c.x, c.y, jnp.ones(B))
        assert sum(v == "ghost" for v in paths.values()) >= 4, paths
        fast = c.jit_ghost.lower(*args)
        compiled = fast.compile().as_text()
        assert not NO_BRANCH.search(fast.as_text()) and not NO_BRANCH.search(compiled)
        assert per_example_kernel in c.jit_vmap.lower(*args).compile().as_text()
        assert per_example_kernel not in compiled


class SensitivityTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("remove", "remove", 1), ("replace_nan", "nan", 1), ("replace_huge", "huge", 2)
    )
    def test_neighbouring_batches_differ_by_at_most_the_clip_norm(self, change, bound):
        c = case("nnx_lstm")
        clip = 0.05  # below every example's norm: each example is clipped
        scale, mask = jnp.ones(B), jnp.ones(B, bool)
        (base, _), _ = c.run(scale, mask, clip)
        if change == "remove":  # a padded row is a removed example
            (other, _), _ = c.run(scale, mask.at[2].set(False), clip)
        else:
            (other, _), _ = c.run(scale.at[2].set(jnp.nan if change == "nan" else -1e4), mask, clip)
        diff = optaxclip.global_norm(jax.tree.map(jnp.subtract, base.grads, other.grads))
        assert np.isfinite(float(diff)) and float(diff) <= bound * clip * (1 + 1e-4)
        assert float(diff) >= 0.5 * clip  # the change is seen: the bound is not vacuous

    def test_per_layer_bounds_bound_each_leaf_and_the_sum(self):
        c = case("linen_lstm")
        (_, full), _ = c.run()
        (_, less), _ = c.run(mask=jnp.arange(B) != 0)
        flat = jax.tree_util.tree_flatten_with_path(c.params)[0]
        bounds = [PER_LAYER(k, v) for k, v in flat]
        sens = float(np.sqrt(np.sum(np.square(bounds))))
        np.testing.assert_allclose(float(full.l2_norm_clip), sens, rtol=1e-6)
        diffs = [
            float(jnp.linalg.norm(a - b))
            for a, b in zip(jax.tree.leaves(full.grads), jax.tree.leaves(less.grads), strict=True)
        ]
        assert all(d <= bnd * (1 + 1e-4) for d, bnd in zip(diffs, bounds, strict=True))
        assert 0.5 * sens <= np.sqrt(np.sum(np.square(diffs))) <= sens * (1 + 1e-4)


class UsageTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_with_and_without_jit(self):
        m = gm.mlp()
        ghost = optaxclip.ghost_clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2))
        fast = self.variant(lambda p, x, y: ghost(p, x, y, l2_norm_clip=0.3))(m.params, *m.batch)
        slow = optaxclip.clipped_grad_sum(m.loss_fn, batch_argnums=(1, 2))(
            m.params, *m.batch, l2_norm_clip=0.3
        )
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    @pytest.mark.distributed  # 8 forced host devices in a subprocess: make test-distributed
    def test_shard_map_with_replicated_params_equals_one_device(self):
        script = pathlib.Path(__file__).with_name("_sharded_ghost_script.py")
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "GHOST SHARDING OK" in out.stdout

    def test_bad_arguments(self):
        c = case("einsum_attention")
        ones = jnp.ones(B)
        with pytest.raises(
            TypeError, match=r"ghost_clipped_grad_sum: `argnums` must be one int.*argnums=\(0, 1\)"
        ):
            optaxclip.ghost_clipped_grad_sum(c.loss, argnums=(0, 1))
        with pytest.raises(
            ValueError, match=r"ghost_clipped_grad_sum: `batch_argnums` must not overlap.*=\(0,\)"
        ):
            optaxclip.ghost_clipped_grad_sum(c.loss, batch_argnums=0)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: `l2_norm_clip` must be > 0.*=-1.0"):
            c.ghost(c.params, c.x, c.y, ones, l2_norm_clip=-1.0)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: .*argument 1: 4.*argument 3: 3"):
            c.ghost(c.params, c.x, c.y, jnp.ones(3), l2_norm_clip=1.0)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: `l2_norm_clip` must be .*structure"):
            c.ghost(c.params, c.x, c.y, ones, l2_norm_clip={"w": 1.0})


class DTypeRuleTest(parameterized.TestCase):
    """Issue 20: any float dtype stays within the clip norm on the fast path; int/bool refused."""

    @parameterized.parameters(*DP_FLOAT_DTYPES)
    def test_one_extreme_example_moves_the_release_by_at_most_the_clip_norm(self, dtype):
        with dtype_scope(dtype):
            a, _ = dp_release_of_clipped_sum(optaxclip.ghost_clipped_grad_sum, dtype)
            # The largest value of the dtype float32 holds (1e30, float16's 65504): its squares
            # overflow float32, but the rows are scaled by powers of two (issue 26), so the example is
            # clipped, not dropped as non-finite; an inf example (float16's 1e30) is dropped.
            b, state = dp_release_of_clipped_sum(
                optaxclip.ghost_clipped_grad_sum, dtype, extreme_value(dtype)
            )
            c, dropped = dp_release_of_clipped_sum(optaxclip.ghost_clipped_grad_sum, dtype, extreme=jnp.inf)
            assert b["v"].dtype == jnp.dtype(dtype)
            gap, gap_dropped = release_gap(a, b), release_gap(a, c)
        tol = 1e-2 if dtype in ("bfloat16", "float16") else 1e-5
        assert 1 - tol <= gap <= 1 + tol, gap  # clipped to the clip norm, not dropped
        assert bool(state.stats.clipped) and int(state.stats.nonfinite_count) == 0
        # A non-finite example is dropped and counted: it moves nothing.
        assert gap_dropped == 0.0 and int(dropped.nonfinite_example_count) == 1

    @parameterized.parameters(*DP_REFUSED_DTYPES)
    def test_integer_and_bool_params_are_refused_by_path_and_dtype(self, dtype):
        params, xs = dtype_params_and_batch("float32")
        params["v"] = params["v"].astype(dtype)
        f = optaxclip.ghost_clipped_grad_sum(lambda p, x: jnp.sum(p["w"] * x[:3]))
        with pytest.raises(ValueError, match=refused_message("argument 0['v']", dtype)):
            f(params, xs, l2_norm_clip=1.0)


def _bf16_dense_loss(p, x):
    """A bfloat16 dense site (bf16 weight, or a float32 weight cast to bf16: a chain) and a bf16 scale."""
    h = x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)
    return jnp.sum((h * p["scale"].astype(jnp.bfloat16)[None, :]).astype(jnp.float32) ** 2)


def _sibling_scans_loss(p, x):
    """One per-example record read by sites in two sibling scans of different lengths."""
    c = jnp.tanh(x.mean(0))
    first = jax.lax.scan(lambda h, _: (jnp.tanh(h + c @ p["w1"]),) * 2, jnp.zeros(16), None, length=3)[1]
    second = jax.lax.scan(lambda h, _: (jnp.tanh(h + c @ p["w2"]),) * 2, jnp.zeros(16), None, length=5)[1]
    return jnp.sum(first**2) + jnp.sum(second**2)


class PrecisionAndScanTest(parameterized.TestCase):
    @parameterized.parameters(jnp.bfloat16, jnp.float32)
    def test_one_bfloat16_example_is_clipped_to_the_norm_in_float32(self, weight_dtype):
        # The clipped sum of ONE example is that example's contribution: its norm must be at most the
        # clip norm to float32 rounding. Weighting the bf16 cotangents in bf16 overshot it by up to 0.2%.
        clip = 0.1234567
        ghost = optaxclip.ghost_clipped_grad_sum(_bf16_dense_loss)
        f = jax.jit(lambda p, x: ghost(p, x, l2_norm_clip=clip))
        worst = 0.0
        for seed in range(8):
            k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
            p = {
                "w": jax.random.normal(k1, (16, 16)).astype(weight_dtype),
                "scale": (1 + jax.random.normal(k3, (16,))).astype(weight_dtype),
            }
            x = jax.random.normal(k2, (1, 3, 16))
            out = f(p, x)
            assert float(out.norms[0]) > 10 * clip  # the example is clipped
            leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(out.grads)]
            total = np.sqrt(sum(np.sum(np.square(g)) for g in leaves))
            worst = max(worst, total / clip)
        assert worst <= 1 + 1e-6, worst

    def test_sibling_scans_of_other_lengths_reading_one_record(self):
        k = jax.random.split(jax.random.key(0), 3)
        p = {"w1": jax.random.normal(k[0], (16, 16)) * 0.3, "w2": jax.random.normal(k[1], (16, 16)) * 0.3}
        x = jax.random.normal(k[2], (3, 4, 16))
        ghost = optaxclip.ghost_clipped_grad_sum(_sibling_scans_loss)
        assert set(ghost.paths(p, x).values()) <= {"ghost", "materialised"}
        got = jax.jit(lambda p, x: ghost(p, x, l2_norm_clip=1.0))(p, x)
        want = optaxclip.clipped_grad_sum(_sibling_scans_loss)(p, x, l2_norm_clip=1.0)
        np.testing.assert_allclose(got.norms, want.norms, rtol=RTOL)
        assert_close(got.grads, want.grads)
