"""Every transform's state through the ecosystem's formats (issue 29.3): flax msgpack
(`to_bytes`/`from_bytes`), `to_state_dict`/`from_state_dict`, `pickle` of `jax.device_get`
and orbax, mid-run, with typed PRNG keys (threefry and rbg) in the DP states; each restored
run continues bit-identically to the uninterrupted one."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from test_stacks import CASES, SAVED_AT, STEPS, _assert_same, _case, _params, _run, _update

import optaxclip


def _msgpack(state, init, tmp_path):
    del tmp_path
    return serialization.from_bytes(init, serialization.to_bytes(state))


def _state_dict(state, init, tmp_path):
    del tmp_path
    return serialization.from_state_dict(init, serialization.to_state_dict(state))


def _pickle(state, init, tmp_path):
    del init
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps(jax.device_get(state)))
    return pickle.loads(path.read_bytes())


def _orbax(state, init, tmp_path):
    del init
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    return checkpointer.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))


FORMATS = {"msgpack": _msgpack, "state_dict": _state_dict, "pickle": _pickle, "orbax": _orbax}

# The DP transforms again with keys of another impl and a legacy key: the state keeps each one's stream.
KEYED = {
    "dp_aggregate_rbg": (lambda: optaxclip.dp_aggregate(1.0, 0.5, jax.random.key(3, impl="rbg")), True),
    "dp_aggregate_legacy": (lambda: optaxclip.dp_aggregate(1.0, 0.5, jax.random.PRNGKey(3)), True),
    "dp_adaptive_aggregate_rbg": (
        lambda: optaxclip.dp_adaptive_aggregate(
            1.0, 0.25, jax.random.key(4, impl="rbg"), expected_batch_size=3
        ),
        True,
    ),
}


def _tx(name):
    if name in CASES:
        return _case(name)
    factory, per_example = KEYED[name]
    tx = factory()
    return tx, _update(tx), per_example


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("name", sorted(CASES) + sorted(KEYED))
def test_round_trip_mid_run_resumes_bit_identically(name, fmt, tmp_path):
    if fmt == "orbax" and name in CASES:
        pytest.skip("test_stacks.py runs orbax over CASES")
    tx, update, per_example = _tx(name)
    params = _params()
    _, state = _run(update, tx.init(params), params, range(SAVED_AT), per_example)
    restored = FORMATS[fmt](state, tx.init(params), tmp_path)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_same(restored, state)  # same dtypes (bfloat16 and uint32 key data too) and values

    rest = range(SAVED_AT, STEPS)
    want, want_state = _run(update, state, params, rest, per_example)
    got, got_state = _run(update, restored, params, rest, per_example)
    _assert_same(got, want)
    _assert_same(got_state, want_state)


def _reference_noise(key, shapes):
    """The documented draw: `split(key)` -> (next, noise key); leaf i's noise from `fold_in(noise key, i)`."""
    next_key, noise_key = jax.random.split(key)
    noise = [
        jax.random.normal(jax.random.fold_in(noise_key, i), s, jnp.float32) for i, s in enumerate(shapes)
    ]
    return next_key, noise


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "legacy"])
def test_state_holds_key_data_and_the_noise_is_the_users_stream(impl):
    key = jax.random.PRNGKey(7) if impl == "legacy" else jax.random.key(7, impl=impl)
    tx = optaxclip.dp_aggregate(1.0, 2.0, key)
    grads = {"a": jnp.zeros((4, 3, 2)), "b": jnp.zeros((4, 5))}  # zero examples: the release is noise / 4
    state = tx.init(None)
    data = key if impl == "legacy" else jax.random.key_data(key)
    assert state.rng_key.dtype == jnp.uint32 and not jax.dtypes.issubdtype(
        state.rng_key.dtype, jax.dtypes.prng_key
    )
    np.testing.assert_array_equal(state.rng_key, data)
    for _ in range(3):  # the key advances as the user's key would
        out, state = jax.jit(tx.update)(grads, state)
        next_key, noise = _reference_noise(key, [(3, 2), (5,)])
        np.testing.assert_array_equal(out["a"], 2.0 * noise[0] / 4)
        np.testing.assert_array_equal(out["b"], 2.0 * noise[1] / 4)
        key = next_key
        np.testing.assert_array_equal(state.rng_key, key if impl == "legacy" else jax.random.key_data(key))


def test_msgpack_bytes_restore_into_a_fresh_process_state():
    """What a user does: save the whole train state, rebuild the optimizer, restore, continue."""
    tx = optax.chain(optaxclip.dp_aggregate(1.0, 1.0, jax.random.key(0)), optax.adam(1e-2))
    params = _params()
    update = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones((3,) + p.shape, p.dtype), params)
    for _ in range(2):
        _, state = update(grads, state, params)
    blob = serialization.to_bytes({"params": params, "opt_state": state})
    tx2 = optax.chain(optaxclip.dp_aggregate(1.0, 1.0, jax.random.key(0)), optax.adam(1e-2))
    restored = serialization.from_bytes({"params": params, "opt_state": tx2.init(params)}, blob)
    a, _ = update(grads, state, params)
    b, _ = jax.jit(tx2.update)(grads, restored["opt_state"], restored["params"])
    _assert_same(a, b)
