"""`apply_gradients` (issue 29.4): a Linen TrainState step that hands `loss=` to the chain."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import optaxclip

STEPS = 12


def _grads(t):
    """Growing norms (x1.05 per step) under a rising loss: the case guard_clip's loss hold is for."""
    return {"w": jnp.full((3,), 1.05**t, jnp.float32), "b": jnp.asarray(0.5 * 1.05**t, jnp.float32)}


def _loss(t):
    return jnp.float32(1.0 + 0.1 * t)


def _create(tx):
    params = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)


class ApplyGradientsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_reaches_guard_clip_as_a_manual_update(self):
        tx = optax.chain(optaxclip.guard_clip(max_growth=0.01), optax.sgd(0.1))
        step = self.variant(lambda s, g, loss: optaxclip.apply_gradients(s, g, loss=loss))

        @self.variant
        def manual(params, opt_state, g, loss):
            updates, opt_state = tx.update(g, opt_state, params, loss=loss)
            return optax.apply_updates(params, updates), opt_state

        state = _create(tx)
        params, opt_state = state.params, tx.init(state.params)
        for t in range(STEPS):
            state = step(state, _grads(t), _loss(t))
            params, opt_state = manual(params, opt_state, _grads(t), _loss(t))
        assert int(state.step) == STEPS
        chex.assert_trees_all_equal(state.params, params)
        chex.assert_trees_all_equal(state.opt_state, opt_state)
        guard = state.opt_state[0]
        # The guard saw the losses: their EMAs and the rising flag are set.
        assert bool(guard.loss_rising) and float(guard.loss_slow) > 1.0

    def test_without_the_loss_the_guard_level_rises(self):
        """The difference the helper makes: with `loss=` the level holds under a rising loss."""
        tx = optax.chain(optaxclip.guard_clip(max_growth=0.01), optax.sgd(0.1))
        with_loss, without = _create(tx), _create(tx)
        for t in range(STEPS):
            with_loss = optaxclip.apply_gradients(with_loss, _grads(t), loss=_loss(t))
            without = without.apply_gradients(grads=_grads(t))  # Flax's own: no loss reaches tx
        assert np.isnan(float(without.opt_state[0].loss_fast))
        assert float(with_loss.opt_state[0].guard_norm) < float(without.opt_state[0].guard_norm)

    def test_subclass_with_extra_fields_and_other_extra_args(self):
        class State(train_state.TrainState):
            epoch: int = 0

        tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))  # ignores loss=
        state = State.create(apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx, epoch=3)
        state = optaxclip.apply_gradients(state, {"w": jnp.array([3.0, 4.0])}, loss=1.0)
        assert isinstance(state, State) and state.epoch == 3
        np.testing.assert_allclose(state.params["w"], [-0.6, -0.8], rtol=1e-6)

    def test_overwrite_with_gradient_collection_as_flax(self):
        tx = optax.chain(optaxclip.guard_clip(), optax.sgd(0.1))
        params = {"params": {"w": jnp.ones(2)}, "_overwrite_with_gradient": {"scale": jnp.ones(())}}
        state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
        grads = {"params": {"w": jnp.ones(2)}, "_overwrite_with_gradient": {"scale": jnp.full((), 7.0)}}
        ours = optaxclip.apply_gradients(state, grads)
        flax_s = state.apply_gradients(grads=grads)
        chex.assert_trees_all_equal(ours.params, flax_s.params)
        chex.assert_trees_all_equal(ours.opt_state, flax_s.opt_state)
        assert float(ours.params["_overwrite_with_gradient"]["scale"]) == 7.0

    def test_refuses_a_non_state_and_extra_args_a_tx_cannot_take(self):
        with pytest.raises(TypeError, match=r"apply_gradients: `state` must be a flax TrainState.*dict"):
            optaxclip.apply_gradients({"params": 1}, {})
        plain = optax.GradientTransformation(optax.sgd(0.1).init, optax.sgd(0.1).update)
        state = _create(plain)
        with pytest.raises(TypeError, match=r"apply_gradients: `state.tx` takes no extra arguments.*loss="):
            optaxclip.apply_gradients(state, state.params, loss=1.0)
        out = optaxclip.apply_gradients(state, jax.tree.map(jnp.ones_like, state.params))  # no extras: fine
        assert int(out.step) == 1
