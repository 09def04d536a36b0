"""Tests for optaxclip.privacy (accounting on dp_accounting)."""

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")

import optaxclip  # noqa: E402
from optaxclip import privacy  # noqa: E402


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_direct_dp_accounting(accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)), 500
    )
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    assert privacy.epsilon(1.3, 0.02, 500, 1e-5, accountant=accountant) == pytest.approx(
        acc.get_epsilon(1e-5)
    )


def test_noise_multiplier_for_target_epsilon_round_trips():
    nm = privacy.noise_multiplier_for(2.0, 0.01, 1000, 1e-5)
    eps = privacy.epsilon(nm, 0.01, 1000, 1e-5)
    assert eps <= 2.0 + 1e-6 and eps > 1.9


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`delta` must be in \(0.0, 1.0\).*delta=1.5"):
        privacy.epsilon(1.0, 0.1, 10, 1.5)
    with pytest.raises(ValueError, match=r"`sampling_rate`.*sampling_rate=0.0"):
        privacy.epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be > 0.*noise_multiplier=-1"):
        privacy.epsilon(-1.0, 0.1, 10, 1e-5)
    with pytest.raises(ValueError, match=r"`accountant`"):
        privacy.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")


def test_poisson_batch_pads_to_fixed_size_with_mask():
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(200):
        idx, mask = privacy.poisson_batch(rng, 1000, 0.05, 100)
        assert idx.shape == (100,) and mask.shape == (100,)
        assert np.all(idx[~mask] == 0) and len(set(idx[mask])) == mask.sum()
        sizes.append(mask.sum())
    assert abs(np.mean(sizes) - 50) < 2  # Poisson: mean n * q
    idx, mask = privacy.poisson_batch(rng, 1000, 0.5, 10)  # ~500 drawn: truncated, never an abort
    assert mask.all() and len(set(idx)) == 10 and np.all(np.diff(idx) > 0)


def test_poisson_batch_truncates_to_a_uniformly_random_subset():
    # 20 examples, ~18 drawn, 5 kept: keeping the first ones would favour low indices.
    rng = np.random.default_rng(1)
    counts = np.zeros(20)
    for _ in range(2000):
        idx, mask = privacy.poisson_batch(rng, 20, 0.9, 5)
        assert mask.all()
        counts[idx] += 1
    np.testing.assert_allclose(counts / 2000, 0.25, atol=0.04)
    # One sigma of headroom, as in a long run: many draws truncated, none raised.
    full = [privacy.poisson_batch(rng, 10_000, 0.01, 110)[1].all() for _ in range(500)]
    assert 0.05 < np.mean(full) < 0.4


def test_poisson_batch_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="poisson_batch: `batch_size`.*batch_size=0"):
        privacy.poisson_batch(rng, 100, 0.1, 0)
    with pytest.raises(ValueError, match="poisson_batch: `num_examples`.*num_examples=2.5"):
        privacy.poisson_batch(rng, 2.5, 0.1, 10)


TRUNCATED = {"truncated_batch_size": 120, "num_examples": 1000}  # 2 sigma above the mean 100


def test_truncated_epsilon_equals_direct_dp_accounting_and_costs_more():
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=1000, sampling_probability=0.1, truncated_batch_size=120, noise_multiplier=4.0
        ),
        10,
    )
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    eps = privacy.epsilon(4.0, 0.1, 10, 1e-5, **TRUNCATED)
    assert eps == pytest.approx(acc.get_epsilon(1e-5))
    plain = privacy.epsilon(4.0, 0.1, 10, 1e-5)
    assert eps > 1.2 * plain  # a truncated batch can differ in two examples: it costs privacy
    # Batches that can never be truncated cost exactly the untruncated run.
    never = privacy.epsilon(4.0, 0.1, 10, 1e-5, truncated_batch_size=1000, num_examples=1000)
    assert never == pytest.approx(plain)
    # adaptive_epsilon (PLD) accounts the equivalent single query on the truncated sample.
    assert privacy.adaptive_epsilon(4.0, 0.1, 10, 1e-5, 100, **TRUNCATED) == pytest.approx(eps)


def test_noise_multiplier_for_truncated_batches():
    nm = privacy.noise_multiplier_for(0.3, 0.1, 10, 1e-5, **TRUNCATED)
    assert 0.3 - 1e-3 < privacy.epsilon(nm, 0.1, 10, 1e-5, **TRUNCATED) <= 0.3 + 1e-6
    assert privacy.epsilon(nm, 0.1, 10, 1e-5) < 0.25  # calibrated without truncation: less noise


def test_truncation_bad_arguments():
    with pytest.raises(ValueError, match="epsilon: pass both `truncated_batch_size` and `num_examples`"):
        privacy.epsilon(4.0, 0.1, 10, 1e-5, truncated_batch_size=120)
    with pytest.raises(ValueError, match=r"`truncated_batch_size` must be an integer >= 1.*=0"):
        privacy.epsilon(4.0, 0.1, 10, 1e-5, truncated_batch_size=0, num_examples=1000)
    with pytest.raises(ValueError, match="noise_multiplier_for: truncated.*accountant='rdp'"):
        privacy.noise_multiplier_for(1.0, 0.1, 10, 1e-5, accountant="rdp", **TRUNCATED)
    with pytest.raises(ValueError, match="adaptive_epsilon: truncated.*accountant='rdp'"):
        privacy.adaptive_epsilon(4.0, 0.1, 10, 1e-5, 100, accountant="rdp", **TRUNCATED)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        privacy.dp_event(4.0, 0.1, 10, 2.0, **TRUNCATED)


def test_adaptive_epsilon_equals_the_composed_queries():
    z_grad, z_count = optaxclip.adaptive_noise_multipliers(1.1, 256)
    step = dp_accounting.PoissonSampledDpEvent(
        0.01,
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(z_grad), dp_accounting.GaussianDpEvent(z_count)]
        ),
    )
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(step, 1000))
    eps = privacy.adaptive_epsilon(1.1, 0.01, 1000, 1e-5, 256, accountant="rdp")
    assert eps == pytest.approx(acc.get_epsilon(1e-5))
    # Theorem 1 (Andrew et al.): the two composed queries cost what one query at noise 1.1
    # costs (PLD accounts that single query directly, so only RDP can show it).
    assert eps == pytest.approx(privacy.epsilon(1.1, 0.01, 1000, 1e-5, accountant="rdp"), rel=1e-6)
