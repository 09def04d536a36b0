"""The model zoo of issue 21 (tests/ghost_models.py): every model runs on both DP paths, which agree.

tests/test_ghost.py tests the ghost path in depth; this file checks the zoo
itself (finite one-example losses, the vmap path's sum against the summed
loss's gradient), that the ghost path equals the vmap path on every model,
and issue 21's and 27's coverage: `.paths()` puts every leaf on a ghost or
materialised path (a leaf used twice: materialised per site and summed). One compile per
model (`pytest -s` prints the path counts).
"""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optaxclip

pytest.importorskip("flax")
pytest.importorskip("equinox")
import ghost_models as gm  # noqa: E402  (needs flax and equinox)

PATHS = {"ghost", "materialised", "per-example"}


def _both_paths(model):
    """One jitted function: the per-example losses, the summed loss's gradient, both paths' clipped sums."""
    slow = optaxclip.clipped_grad_sum(model.loss_fn, batch_argnums=(1, 2))
    fast = optaxclip.ghost_clipped_grad_sum(model.loss_fn, batch_argnums=(1, 2))

    @jax.jit
    def run(params, x, y, clip):  # `clip` traced: one compile for both bounds
        batch_loss = lambda p: jax.vmap(model.loss_fn, in_axes=(None, 0, 0))(p, x, y)
        losses, vjp = jax.vjp(batch_loss, params)
        (summed,) = vjp(jnp.ones_like(losses))
        return losses, summed, slow(params, x, y, l2_norm_clip=clip), fast(params, x, y, l2_norm_clip=clip)

    return run, fast


def _assert_close(got, want):
    """float32 rounding: sums taken in another order (rtol 1e-4, atol relative to the largest entry)."""
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(gm.MODELS))
def test_model_runs_and_both_paths_agree(name):
    model = gm.MODELS[name]()
    run, fast = _both_paths(model)
    losses, summed, slow_sum, fast_sum = run(model.params, *model.batch, jnp.float32(1e6))
    assert losses.shape == (gm.BATCH,) and bool(jnp.all(jnp.isfinite(losses))), losses
    norms = np.asarray(slow_sum.norms)
    assert np.all(np.isfinite(norms)) and np.all(norms > 0), norms
    _assert_close(slow_sum.grads, summed)  # no clip active at 1e6: the plain gradient of the summed loss
    _assert_close(fast_sum.grads, summed)

    clip = float(np.median(norms))  # half the examples clipped, half not
    _, _, slow_sum, fast_sum = run(model.params, *model.batch, jnp.float32(clip))
    assert 0 < int(jnp.sum(slow_sum.norms > clip)) < gm.BATCH
    np.testing.assert_allclose(fast_sum.norms, slow_sum.norms, rtol=1e-4)
    _assert_close(fast_sum.grads, slow_sum.grads)

    paths = fast.paths(model.params, *model.batch)
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(model.params)[0]]
    assert sorted(paths) == sorted(keys) and set(paths.values()) <= PATHS, paths
    # Issues 21 and 27: every leaf takes a ghost or materialised path; a leaf that reaches the loss
    # twice (a tied embedding, a layer applied twice) has its per-site gradients materialised and summed.
    tied = [k for k in keys if any(k.startswith(f"['{prefix}']") for prefix in gm.TIED.get(name, ()))]
    assert "per-example" not in paths.values(), paths
    assert all(paths[k] == "materialised" for k in tied), paths
    print(name, dict(collections.Counter(paths.values())))  # pytest -s: the paths per model


def test_nnx_transformer_has_the_issues_leaf_count():
    """4 blocks: 70 parameter leaves (issue 21's motivating model); 2 blocks (the zoo's): 38."""
    for blocks, leaves in ((4, 70), (2, 38)):
        params = gm.nnx_transformer(blocks=blocks).params
        assert len(jax.tree.leaves(params)) == leaves
