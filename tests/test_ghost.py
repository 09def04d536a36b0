"""Tests for optaxclip._ghost: ghost_clipped_grad_sum equals the vmap path (clipped_grad_sum)."""

import re

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
)

import optaxclip

nnx = pytest.importorskip("flax.nnx")

NO_BRANCH = re.compile(r"\bconditional\(|stablehlo\.(if|case)\b")
VOCAB, SEQ, BATCH = 16, 6, 5
RTOL = 1e-4  # float32, sums taken in another order than the vmap path's


class CharRNN(nnx.Module):
    """Embed -> nnx.RNN(cell) -> Linear, as the benchmark's char-LSTM (tiny)."""

    def __init__(self, cell, hidden=8, *, rngs, embed=6):
        self.embed = nnx.Embed(VOCAB, embed, rngs=rngs)
        self.rnn = nnx.RNN(cell(embed, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, VOCAB, rngs=rngs)
        self.hidden, self.gru = hidden, cell is nnx.GRUCell

    def __call__(self, tokens):
        zeros = jnp.zeros((tokens.shape[0], self.hidden))
        return self.head(self.rnn(self.embed(tokens), initial_carry=zeros if self.gru else (zeros, zeros)))


class MLPBlock(nnx.Module):
    """Embed -> a transformer block's MLP over the sequence (+ LayerNorm, which falls back) -> head."""

    def __init__(self, width=8, *, rngs):
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = self.norm(h + self.down(jax.nn.gelu(self.up(h))))
        return self.head(h)


class TiedLM(nnx.Module):
    """The output layer reuses the embedding (`Embed.attend`) and one Linear is called twice."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
        self.mix = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, tokens):
        h = self.mix(jnp.tanh(self.mix(self.embed(tokens))))
        return self.embed.attend(h)


class SimpleRNN(nnx.Module):
    """An `nnx.RNN` over a cell the fast path does not know: its Linears run inside a scan."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(VOCAB, 6, rngs=rngs)
        self.rnn = nnx.RNN(nnx.SimpleCell(6, 8, rngs=rngs))
        self.head = nnx.Linear(8, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.rnn(self.embed(tokens), initial_carry=jnp.zeros((tokens.shape[0], 8))))


MODELS = {
    "lstm": lambda: CharRNN(nnx.LSTMCell, rngs=nnx.Rngs(0)),
    "optimized_lstm": lambda: CharRNN(nnx.OptimizedLSTMCell, rngs=nnx.Rngs(1)),
    "gru": lambda: CharRNN(nnx.GRUCell, rngs=nnx.Rngs(2)),
    "mlp": lambda: MLPBlock(rngs=nnx.Rngs(3)),
    "tied": lambda: TiedLM(rngs=nnx.Rngs(4)),
    "simple_rnn": lambda: SimpleRNN(rngs=nnx.Rngs(5)),
}
_CACHE = {}


class Setup:
    """A model's params and loss, the two paths, and their jitted calls (built once per model).

    The loss of one example is scaled by a per-example `scale` (batched too): a NaN scale makes that
    example's whole gradient NaN, a large one makes it large, without another compilation.
    """

    def __init__(self, name):
        graphdef, self.params, rest = nnx.split(MODELS[name](), nnx.Param, ...)

        def loss(p, row, scale):  # one example: a window of seq + 1 tokens
            logits = nnx.merge(graphdef, p, rest)(row[None, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits[0], row[1:]).mean() * scale

        self.loss = loss
        self.ghost = optaxclip.ghost_clipped_grad_sum(loss, batch_argnums=(1, 2))
        self.vmapped = optaxclip.clipped_grad_sum(loss, batch_argnums=(1, 2))
        call = lambda f: jax.jit(lambda p, r, s, m, c: f(p, r, s, l2_norm_clip=c, mask=m))
        self.jit_ghost, self.jit_vmapped = call(self.ghost), call(self.vmapped)
        self.grad = jax.jit(jax.grad(loss))

    def rows(self, batch=BATCH, seq=SEQ, seed=0):
        return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, VOCAB)

    def both(self, rows, scale=None, mask=None, clip=0.3):
        scale = jnp.ones(rows.shape[0]) if scale is None else scale
        mask = jnp.ones(rows.shape[0], bool) if mask is None else jnp.asarray(mask)
        args = (self.params, rows, scale, mask, jnp.float32(clip))
        return self.jit_ghost(*args), self.jit_vmapped(*args)


def setup(name) -> Setup:
    if name not in _CACHE:
        _CACHE[name] = Setup(name)
    return _CACHE[name]


def float64_reference(m: Setup, rows, clip, mask=None):
    """Float64: clip each example's exact gradient (jax.grad, one example at a time), sum the real ones."""
    grads = [m.grad(m.params, r, jnp.float32(1.0)) for r in rows]
    leaves = [[np.asarray(x, np.float64) for x in jax.tree.leaves(g)] for g in grads]
    norms = np.array([np.sqrt(sum(np.sum(x**2) for x in ls)) for ls in leaves])
    mask = np.ones(len(rows), bool) if mask is None else np.asarray(mask)
    ok = mask & np.isfinite(norms)
    total = [np.zeros_like(x) for x in leaves[0]]
    for b, ls in enumerate(leaves):
        if ok[b]:
            total = [t + x * min(1.0, clip / norms[b]) for t, x in zip(total, ls, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(m.params), total), norms


def assert_close(a, b, rtol=RTOL):
    """Leafwise, relative to each leaf's largest entry (a sum of clipped terms has near-zero entries)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * max(np.max(np.abs(y)), 1e-12))


def max_rel_error(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(np.asarray(y))), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


class GhostMatchesVmapPathTest(chex.TestCase):
    @parameterized.named_parameters(*[(n, n) for n in ("lstm", "optimized_lstm", "gru", "mlp")])
    def test_clipped_sum_and_norms_equal_the_vmap_path_and_float64(self, name):
        m = setup(name)
        rows, mask = m.rows(), np.array([1, 1, 0, 1, 1], bool)
        fast, slow = m.both(rows, mask=mask)
        assert isinstance(fast, optaxclip.ClippedGradSum)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)
        ref, ref_norms = float64_reference(m, rows, 0.3, mask)
        np.testing.assert_allclose(fast.norms, ref_norms, rtol=RTOL)
        assert_close(fast.grads, ref)
        chex.assert_trees_all_equal_structs(fast.grads, m.params)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fast.grads))
        assert float(fast.l2_norm_clip) == pytest.approx(0.3) and np.array_equal(fast.mask, mask)

    @chex.variants(with_jit=True, without_jit=True)
    def test_with_and_without_jit(self):
        m = setup("mlp")
        rows = m.rows(seed=1)
        fast = self.variant(lambda p, r, s: m.ghost(p, r, s, l2_norm_clip=0.3))(
            m.params, rows, jnp.ones(BATCH)
        )
        _, slow = m.both(rows)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    @parameterized.named_parameters(("lstm", "lstm"), ("gru", "gru"), ("mlp", "mlp"))
    def test_a_nan_example_adds_zero_and_is_counted(self, name):
        m = setup(name)
        fast, slow = m.both(m.rows(), scale=jnp.ones(BATCH).at[1].set(jnp.nan), mask=np.arange(BATCH) != 3)
        assert not np.isfinite(float(fast.norms[1])) and np.all(
            np.isfinite(np.delete(np.asarray(fast.norms), 1))
        )
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(fast.grads))
        assert_close(fast.grads, slow.grads)
        tx = optaxclip.dp_aggregate(0.3, 0.0, jax.random.key(0))
        _, state = tx.update(fast, tx.init(m.params), m.params)
        assert int(state.nonfinite_example_count) == 1

    @parameterized.named_parameters(
        ("lstm_batch1", "lstm", 1, SEQ),
        ("gru_seq1", "gru", 3, 1),
        ("mlp_batch1_seq1", "mlp", 1, 1),
    )
    def test_batch_one_and_sequence_length_one(self, name, batch, seq):
        m = setup(name)
        fast, slow = m.both(m.rows(batch, seq, seed=7), clip=0.2)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    @parameterized.named_parameters(
        ("lstm", "lstm", 3, "['rnn']['cell']['hi']['kernel'].value"),
        ("optimized_lstm", "optimized_lstm", 3, "['rnn']['cell']['dense_h']['kernel'].value"),
        ("gru", "gru", 2, "['rnn']['cell']['dense_h']['kernel'].value"),
    )
    def test_ghost_norms_of_recurrent_kernels_global_and_per_layer(self, name, seq, hidden_kernel):
        m = setup(name)
        rows = m.rows(seq=seq, seed=4)
        assert m.ghost.paths(m.params, rows, jnp.ones(BATCH))[hidden_kernel] == "ghost"
        fast, slow = m.both(rows, mask=np.arange(BATCH) != 1)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)
        bound = lambda path, leaf: 0.05 if "cell" in jax.tree_util.keystr(path) else 0.02
        ones = jnp.ones(BATCH)

        @jax.jit
        def layered(p, r):
            return m.ghost(p, r, ones, l2_norm_clip=bound), m.vmapped(p, r, ones, l2_norm_clip=bound)

        fast, slow = layered(m.params, rows)
        assert_close(fast.grads, slow.grads)
        np.testing.assert_allclose(float(fast.l2_norm_clip), float(slow.l2_norm_clip), rtol=1e-6)

    def test_through_dp_aggregate_same_update_and_stats(self):
        m = setup("lstm")
        fast, slow = m.both(m.rows(seed=2))
        tx = optaxclip.dp_aggregate(0.3, 1.1, jax.random.key(3), expected_batch_size=5)
        a, sa = tx.update(fast, tx.init(m.params), m.params)
        b, sb = tx.update(slow, tx.init(m.params), m.params)
        assert_close(a, b, rtol=1e-3)  # the noise (std 0.066) dwarfs the sums: compare relative to it
        np.testing.assert_allclose(sa.stats.pre_clip_norm, sb.stats.pre_clip_norm, rtol=RTOL)
        assert int(sa.stats.clip_count) == int(sb.stats.clip_count)

    def test_has_aux_returns_per_example_aux(self):
        m = setup("mlp")
        rows = m.rows()
        aux_loss = lambda p, r: (m.loss(p, r, 1.0), jnp.sum(r))
        fast, aux = jax.jit(
            lambda p, r: optaxclip.ghost_clipped_grad_sum(aux_loss, has_aux=True)(p, r, l2_norm_clip=0.3)
        )(m.params, rows)
        _, slow = m.both(rows)
        np.testing.assert_array_equal(aux, jnp.sum(rows, axis=1))
        assert_close(fast.grads, slow.grads)


class PathsTest(chex.TestCase):
    def test_stock_layers_are_tapped_and_the_rest_falls_back(self):
        m = setup("mlp")
        paths = m.ghost.paths(m.params, m.rows(), jnp.ones(BATCH))
        assert "per-example" not in paths.values()  # the LayerNorm's scale and bias too
        assert paths["['norm']['scale'].value"] == "materialised"
        assert paths["['embed']['embedding'].value"] == "ghost"  # 6 positions < 16 rows
        lstm = setup("lstm")
        assert set(lstm.ghost.paths(lstm.params, lstm.rows(), jnp.ones(BATCH)).values()) <= {
            "ghost",
            "materialised",
        }

    def test_ghost_or_materialised_by_cost(self):
        # Ghost while 2 N^2 < d_in d_out: the MLP's up kernel (8 x 32) is ghost at 3 positions
        # (18 < 256), materialised at 12 (288 >= 256).
        m = setup("mlp")
        key = "['up']['kernel'].value"
        assert m.ghost.paths(m.params, m.rows(seq=3), jnp.ones(BATCH))[key] == "ghost"
        assert m.ghost.paths(m.params, m.rows(seq=12), jnp.ones(BATCH))[key] == "materialised"
        fast, slow = m.both(m.rows(seq=3))  # the ghost norms are exact too
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    @parameterized.named_parameters(("tied_and_reused", "tied"), ("unknown_cell_in_a_scan", "simple_rnn"))
    def test_parameters_used_outside_a_tap_fall_back_exactly(self, name):
        m = setup(name)
        rows = m.rows()
        paths = m.ghost.paths(m.params, rows, jnp.ones(BATCH))
        if name == "tied":  # the embedding is also the output layer, `mix` is called twice
            assert paths["['embed']['embedding'].value"] == "per-example"
            assert paths["['mix']['kernel'].value"] == "per-example"
        else:  # the cell's Linears run inside nnx.RNN's scan: tapped there
            assert paths["['rnn']['cell']['dense_h']['kernel'].value"] == "materialised"
            assert paths["['head']['kernel'].value"] != "per-example"
        fast, slow = m.both(rows)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        assert_close(fast.grads, slow.grads)

    def test_plain_jax_params_are_tapped(self):
        w = {"w": jnp.ones((3, 2))}
        loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)
        xs = jnp.arange(12.0).reshape(4, 3) / 10
        f = optaxclip.ghost_clipped_grad_sum(loss)
        assert f.paths(w, xs) == {"['w']": "ghost"}  # one position: 2 < 3 x 2
        assert_close(
            f(w, xs, l2_norm_clip=0.1).grads, optaxclip.clipped_grad_sum(loss)(w, xs, l2_norm_clip=0.1).grads
        )


class SensitivityTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("remove", "remove", 1),
        ("replace_nan", "nan", 1),
        ("replace_huge", "huge", 2),
    )
    def test_neighbouring_batches_differ_by_at_most_the_clip_norm(self, change, bound):
        m = setup("lstm")
        clip = 0.05  # below every example's norm: each example is clipped
        rows, scale, mask = m.rows(seed=11), jnp.ones(BATCH), jnp.ones(BATCH, bool)
        args = lambda s, k: (m.params, rows, s, k, jnp.float32(clip))
        base = m.jit_ghost(*args(scale, mask))
        if change == "remove":  # a padded row is a removed example
            other = m.jit_ghost(*args(scale, mask.at[2].set(False)))
        elif change == "nan":
            other = m.jit_ghost(*args(scale.at[2].set(jnp.nan), mask))
        else:
            other = m.jit_ghost(*args(scale.at[2].set(-1e4), mask))
        diff = optaxclip.global_norm(jax.tree.map(jnp.subtract, base.grads, other.grads))
        assert np.isfinite(float(diff)) and float(diff) <= bound * clip * (1 + 1e-4)
        assert float(diff) >= 0.5 * clip  # the change is seen: the bound is not vacuous

    def test_per_layer_bounds_match_the_vmap_path_and_their_sensitivity(self):
        m = setup("lstm")
        rows, ones = m.rows(seed=5), jnp.ones(BATCH)
        bound = lambda path, leaf: 0.02 if "kernel" in jax.tree_util.keystr(path) else 0.01

        @jax.jit
        def both(p, r, mask):
            kw = {"l2_norm_clip": bound, "mask": mask}
            return m.ghost(p, r, ones, **kw), m.vmapped(p, r, ones, **kw)

        fast, slow = both(m.params, rows, jnp.ones(BATCH, bool))
        assert_close(fast.grads, slow.grads)
        np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
        bounds = [bound(k, v) for k, v in jax.tree_util.tree_flatten_with_path(m.params)[0]]
        sens = float(np.sqrt(np.sum(np.square(bounds))))
        np.testing.assert_allclose(float(fast.l2_norm_clip), sens, rtol=1e-6)
        # Removing one example moves the sum by at most sqrt(sum C_l^2), and each leaf by at most its C_l.
        less, _ = both(m.params, rows, jnp.arange(BATCH) != 0)
        diffs = [
            float(jnp.linalg.norm(a - b))
            for a, b in zip(jax.tree.leaves(fast.grads), jax.tree.leaves(less.grads), strict=True)
        ]
        assert all(d <= c * (1 + 1e-4) for d, c in zip(diffs, bounds, strict=True))
        assert np.sqrt(np.sum(np.square(diffs))) <= sens * (1 + 1e-4)
        assert np.sqrt(np.sum(np.square(diffs))) >= 0.5 * sens  # the removed example was clipped per layer


class StructureAndErrorsTest(parameterized.TestCase):
    def test_compiled_step_has_no_conditional_and_no_per_example_kernels(self):
        m = setup("lstm")
        rows = m.rows(seq=3)  # 3 positions: the hidden kernels (8 x 32 together) take ghost norms
        assert (
            m.ghost.paths(m.params, rows, jnp.ones(BATCH))["['rnn']['cell']['hi']['kernel'].value"] == "ghost"
        )
        args = (m.params, rows, jnp.ones(BATCH), jnp.ones(BATCH, bool), jnp.float32(1.0))
        fast = m.jit_ghost.lower(*args)
        assert not NO_BRANCH.search(fast.as_text()) and not NO_BRANCH.search(fast.compile().as_text())
        # Per-example gradients of the LSTMCell's hidden kernels: one gate's, or the four together.
        assert "f32[5,8,8]" in m.jit_vmapped.lower(*args).compile().as_text()
        compiled = fast.compile().as_text()
        assert "f32[5,8,8]" not in compiled and "f32[5,8,32]" not in compiled

    def test_bad_arguments(self):
        m = setup("mlp")
        rows, ones = m.rows(), jnp.ones(BATCH)
        with pytest.raises(
            ValueError, match=r"ghost_clipped_grad_sum: `argnums` must be one int.*argnums=\(0, 1\)"
        ):
            optaxclip.ghost_clipped_grad_sum(m.loss, argnums=(0, 1))
        with pytest.raises(
            ValueError, match=r"ghost_clipped_grad_sum: `batch_argnums` must not overlap.*=\(0,\)"
        ):
            optaxclip.ghost_clipped_grad_sum(m.loss, batch_argnums=0)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: `l2_norm_clip` must be > 0.*=-1.0"):
            m.ghost(m.params, rows, ones, l2_norm_clip=-1.0)
        with pytest.raises(ValueError, match=r"ghost_clipped_grad_sum: .*argument 1: 5.*argument 2: 3"):
            m.ghost(m.params, rows, jnp.ones(3), l2_norm_clip=1.0)


def test_exactness_figures_against_the_vmap_path():
    # The largest relative error (per leaf, to its largest entry; and of the norms) over the four models.
    errors = {}
    for name in ("lstm", "optimized_lstm", "gru", "mlp"):
        m = setup(name)
        fast, slow = m.both(m.rows(seed=3))
        errors[name] = max(max_rel_error(fast.grads, slow.grads), max_rel_error(fast.norms, slow.norms))
    print("max rel error vs vmap path:", errors)
    assert max(errors.values()) < RTOL, errors


class DTypeRuleTest(parameterized.TestCase):
    """Issue 20: any float dtype stays within the clip norm on the fast path; int/bool refused."""

    @parameterized.parameters(*DP_FLOAT_DTYPES)
    def test_one_extreme_example_moves_the_release_by_at_most_the_clip_norm(self, dtype):
        with dtype_scope(dtype):
            a, _ = dp_release_of_clipped_sum(optaxclip.ghost_clipped_grad_sum, dtype)
            # 1e18: the fast path's per-example squared norms are float32 (documented: an
            # example whose norm exceeds ~1.8e19 is dropped as non-finite, checked below).
            huge = min(extreme_value(dtype), 1e18)
            b, state = dp_release_of_clipped_sum(optaxclip.ghost_clipped_grad_sum, dtype, extreme=huge)
            c, dropped = dp_release_of_clipped_sum(optaxclip.ghost_clipped_grad_sum, dtype, extreme=1e30)
            assert b["v"].dtype == jnp.dtype(dtype)
            gap, gap_dropped = release_gap(a, b), release_gap(a, c)
        tol = 1e-2 if dtype in ("bfloat16", "float16") else 1e-5
        assert 1 - tol <= gap <= 1 + tol, gap  # clipped to the clip norm, not dropped
        assert bool(state.stats.clipped)
        # A 1e30 example (inf in float16) is dropped and counted: it moves nothing.
        assert gap_dropped == 0.0 and int(dropped.nonfinite_example_count) == 1

    @parameterized.parameters(*DP_REFUSED_DTYPES)
    def test_integer_and_bool_params_are_refused_by_path_and_dtype(self, dtype):
        params, xs = dtype_params_and_batch("float32")
        params["v"] = params["v"].astype(dtype)
        f = optaxclip.ghost_clipped_grad_sum(lambda p, x: jnp.sum(p["w"] * x[:3]))
        with pytest.raises(ValueError, match=refused_message("argument 0['v']", dtype)):
            f(params, xs, l2_norm_clip=1.0)
