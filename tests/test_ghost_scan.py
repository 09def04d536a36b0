"""Issue 27: the ghost path on layers under `scan`, fused and shared weights, and any jaxpr.

The models are `tests/ghost_scan_models.py`'s (the issue's table: `nnx.scan`
over `nnx.vmap`-built blocks, Linen `nn.scan` over layers, `lax.scan` with
stacked params as `xs`, Linen `OptimizedLSTMCell` stacked by `nn.scan`, a
tied embedding with RMSNorm and causal MHA, an Equinox GRU from a learned
initial state; and the planner's hard cases: literals, `fori_loop`,
`while`, `cond`/`switch`, remat, `custom_vjp`, a nested `jit`). Each equals
`clipped_grad_sum` and a float64 reference, at a global bound, per-layer
bounds, under `jit` and microbatches, with its `.paths()` counts asserted;
the new paths keep issue 26's bound on offset inputs (`adversarial.py`'s
`contributions`); `shard_map` runs in a subprocess.
"""

import collections
import os
import pathlib
import subprocess
import sys
import warnings

import adversarial
import ghost_scan_models as sm
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip

RTOL = 1e-4
PER_LAYER = lambda path, leaf: 0.05 if leaf.ndim > 1 else 0.02  # noqa: E731
B = sm.B


def assert_close(a, b, rtol=RTOL):
    scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=rtol * scale
        )


def counts(paths) -> tuple[int, int, int]:
    c = collections.Counter(paths.values())
    return c["ghost"], c["materialised"], c["per-example"]


def float64_reference(loss, params, x, clip, mask=(True,) * B):
    """Each example's gradient (`jax.grad`, one at a time), clipped and summed in float64 over the
    examples `mask` keeps; and every example's norm."""
    grad = jax.jit(jax.grad(loss))
    rows = [[np.asarray(v, np.float64) for v in jax.tree.leaves(grad(params, x[b]))] for b in range(B)]
    norms = np.array([np.sqrt(sum(np.sum(v**2) for v in r)) for r in rows])
    total = [
        sum(r[k] * min(1.0, clip / n) for r, n, m in zip(rows, norms, mask, strict=True) if m)
        for k in range(len(rows[0]))
    ]
    return jax.tree.unflatten(jax.tree.structure(params), total), norms


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


@pytest.mark.parametrize("name", sorted(sm.CASES))
def test_equals_the_vmap_path_and_a_float64_reference(name):
    make, want = sm.CASES[name]
    loss, params, x = make()
    ghost = optaxclip.ghost_clipped_grad_sum(loss)
    vmap = optaxclip.clipped_grad_sum(loss)
    paths = ghost.paths(params, x)
    if want is not None:
        assert counts(paths) == want, ghost.explain(params, x)
    assert set(ghost.explain(params, x)) == set(paths)

    @jax.jit
    def run(p, x, clip, m):
        out = []
        for f in (ghost, vmap):
            out += [f(p, x, l2_norm_clip=clip, mask=m), f(p, x, l2_norm_clip=PER_LAYER, mask=m)]
        return out

    ones = jnp.ones(B, bool)
    unclipped = _quiet(run, params, x, jnp.float32(1e6), ones)[2]
    clip = float(np.median(np.asarray(unclipped.norms)))  # about half the examples clipped
    mask = ones.at[2].set(False)
    fast, fast_layer, slow, slow_layer = _quiet(run, params, x, jnp.float32(clip), mask)
    np.testing.assert_allclose(fast.norms, slow.norms, rtol=RTOL)
    assert_close(fast.grads, slow.grads)
    assert_close(fast_layer.grads, slow_layer.grads)
    ref, norms = float64_reference(loss, params, x, clip, np.asarray(mask))
    np.testing.assert_allclose(fast.norms, norms, rtol=RTOL)
    assert_close(fast.grads, ref)


@pytest.mark.parametrize("name", ["stacked_rnn", "fused_concat", "tied_embedding", "cond_switch"])
def test_microbatches_and_no_jit_give_the_same_sum(name):
    loss, params, x = sm.CASES[name][0]()
    whole = optaxclip.ghost_clipped_grad_sum(loss)
    chunks = optaxclip.ghost_clipped_grad_sum(loss, microbatch_size=2)
    a = _quiet(lambda: jax.jit(lambda p, x: whole(p, x, l2_norm_clip=0.1))(params, x))
    b = _quiet(lambda: jax.jit(lambda p, x: chunks(p, x, l2_norm_clip=0.1))(params, x))
    c = _quiet(lambda: whole(params, x, l2_norm_clip=0.1))  # eager
    np.testing.assert_allclose(a.norms, b.norms, rtol=RTOL)
    np.testing.assert_allclose(a.norms, c.norms, rtol=RTOL)
    assert_close(b.grads, a.grads)
    assert_close(c.grads, a.grads)


def test_the_issues_crash_reproduction():
    loss = lambda w, x: jax.lax.scan(  # noqa: E731
        lambda c, xt: (c + jnp.sum(jnp.tanh(xt @ w)), None), 0.0, x[None]
    )[0]
    w, x = jnp.eye(3), jnp.ones((4, 3))
    out = optaxclip.ghost_clipped_grad_sum(loss)(w, x, l2_norm_clip=0.1)
    ref = optaxclip.clipped_grad_sum(loss)(w, x, l2_norm_clip=0.1)
    assert_close(out.grads, ref.grads)


def test_fori_loop_with_static_bounds_does_not_crash_and_takes_no_per_example_path():
    loss, params, x = sm.fori_loop()
    f = optaxclip.ghost_clipped_grad_sum(loss)
    assert "per-example" not in f.paths(params, x).values()
    out = jax.jit(lambda p, x: f(p, x, l2_norm_clip=0.1))(params, x)
    assert_close(out.grads, optaxclip.clipped_grad_sum(loss)(params, x, l2_norm_clip=0.1).grads)


def test_per_example_leaves_warn_once_naming_the_leaf_and_the_op():
    loss, params, x = sm.cond_switch()
    f = optaxclip.ghost_clipped_grad_sum(loss)
    explain = f.explain(params, x)
    assert explain["['u']"].startswith("materialised")
    assert explain["['w']"].startswith("per-example") and "`cond`" in explain["['w']"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f(params, x, l2_norm_clip=0.1)
        f(params, x, l2_norm_clip=0.2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "['w']" in msgs[0] and "['s']" in msgs[0] and "`cond`" in msgs[0] and "['u']" not in msgs[0]
    assert caught[0].filename == __file__  # attributed to the caller, not to optaxclip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = optaxclip.ghost_clipped_grad_sum(sm.fused_concat()[0])
        g(*sm.fused_concat()[1:], l2_norm_clip=0.1)
    assert not caught  # nothing per-example: no warning


def test_stacked_dense_kernels_take_ghost_norms_per_step_slice():
    # A scan over 3 layers of 24 x 24 kernels at 2 positions: 2 N^2 = 8 < 576 = C F: ghost, per slice.
    def loss(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
        return jnp.sum(h**2)

    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 24, 24)) / 5, jnp.float32)}
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, 2, 24)), jnp.float32)
    f = optaxclip.ghost_clipped_grad_sum(loss)
    assert f.paths(params, x) == {"['w']": "ghost"}
    assert "per-step slice" in f.explain(params, x)["['w']"]
    out = jax.jit(lambda p, x: f(p, x, l2_norm_clip=0.5))(params, x)
    ref, norms = float64_reference(loss, params, x, 0.5)
    np.testing.assert_allclose(out.norms, norms, rtol=RTOL)
    assert_close(out.grads, ref)


def _offset_cases():
    """The new paths on offset inputs (`1e1 .. 1e4 + N(0, 1)`, one offset per example) under centred
    `sin` losses (no saturation: every example's gradient is large, so every example is clipped)."""
    off = adversarial._offsets(0, (sm.T, sm.D))
    rng = np.random.default_rng(7)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 6, jnp.float32)  # noqa: E731
    centred = lambda z: jnp.sum(jnp.sin(z - z.mean(0, keepdims=True)))  # noqa: E731

    def stacked(p, x):  # a dense layer stacked over 3 scan steps
        return centred(jax.lax.scan(lambda h, w: (jnp.sin(h @ w), None), x, p["w"])[0])

    def fused(p, x):
        k = jnp.concatenate([p["k0"], p["k1"], p["k2"], p["k3"]], axis=1)
        return centred(x @ k + jnp.concatenate([p["b0"], p["b1"]])[None])

    def sliced(p, x):
        return centred(x @ p["w"][:, : 2 * sm.H]) + centred(x @ p["w"][:, 2 * sm.H :])

    def two_scans(p, x):
        step = lambda h, xt: (jnp.sin(xt @ p["w"]) + 0.5 * (h @ p["u"]),) * 2  # noqa: E731
        h, _ = jax.lax.scan(step, jnp.zeros(sm.D), x)
        return centred(jax.lax.scan(step, h, x[::-1])[1])

    def tied(p, x):  # one kernel used twice, once inside a scan
        h = x @ p["w"]
        return centred(h) + centred(jax.lax.scan(lambda c, ht: (c, jnp.sin(ht @ p["w"])), 0.0, h)[1])

    def fused_wide(p, x):  # ghost norms: 2 positions, 24 x 96 fused kernel, stacked over 2 layers
        def layer(h, lp):
            return jnp.sin(h @ jnp.concatenate([lp[f"k{i}"] for i in range(4)], axis=1))[:, :24], None

        return centred(jax.lax.scan(layer, x, p)[0])

    fused_p = {f"k{i}": w(sm.D, sm.H) for i in range(4)} | {f"b{i}": w(2 * sm.H) for i in range(2)}
    wide_p = {f"k{i}": w(2, 24, 24) for i in range(4)}
    wide_x = adversarial._offsets(1, (2, 24))
    return [
        adversarial.Adversary("fused_stacked_ghost", wide_p, fused_wide, wide_x, 5e-7),
        adversarial.Adversary("stacked_scan", {"w": w(3, sm.D, sm.D)}, stacked, off, 1e-3),
        adversarial.Adversary("fused_concat", fused_p, fused, off, 0.1),
        adversarial.Adversary("sliced_kernel", {"w": w(sm.D, 3 * sm.H)}, sliced, off, 0.1),
        adversarial.Adversary("two_scans", {"w": w(sm.D, sm.D), "u": w(sm.D, sm.D)}, two_scans, off, 0.1),
        adversarial.Adversary("used_twice", {"w": w(sm.D, sm.D)}, tied, off, 1e-3),
    ]


@pytest.mark.parametrize("adv", _offset_cases(), ids=lambda a: a.name)
def test_new_paths_keep_the_sensitivity_bound_on_offset_inputs(adv):
    if adv.name == "fused_stacked_ghost":  # the lifted ghost rule, per step-slice of a fused stack
        paths = optaxclip.ghost_clipped_grad_sum(adv.loss_fn).paths(adv.params, adv.x)
        assert set(paths.values()) == {"ghost"}, paths
    got, norms = adversarial.contributions(optaxclip.ghost_clipped_grad_sum, adv)
    assert np.all(norms > adv.clip), norms  # every example is clipped
    assert np.max(got) <= adv.clip * (1 + 1e-5), got / adv.clip
    print(adv.name, "max contribution / C", float(np.max(got) / adv.clip))


@pytest.mark.distributed  # 8 forced host devices in a subprocess: make test-distributed
def test_shard_map_with_replicated_params_equals_one_device():
    script = pathlib.Path(__file__).with_name("_sharded_ghost_scan_script.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GHOST SCAN SHARDING OK" in out.stdout
