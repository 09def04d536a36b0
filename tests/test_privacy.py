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
    with pytest.raises(ValueError, match="raise `batch_size`"):
        privacy.poisson_batch(rng, 1000, 0.5, 10)


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
