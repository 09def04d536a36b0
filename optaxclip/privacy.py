"""Privacy accounting for DP-SGD on `dp_accounting` (install `optaxclip[dp]`).

Example:
  >>> from optaxclip import privacy
  >>> eps = privacy.epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=1000, delta=1e-5)
  >>> print(f"{eps:.3f}")
  1.515
"""

from __future__ import annotations

import numpy as np

from . import _checks
from ._dp import adaptive_noise_multipliers

ACCOUNTANTS = ("pld", "rdp")


def _check(fn, noise_multiplier, sampling_rate, steps, delta, accountant):
    if noise_multiplier is not None:
        _checks.positive(fn, "noise_multiplier", noise_multiplier)
    _checks.in_range(fn, "sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, hi_open=False)
    _checks.integer_at_least(fn, "steps", steps, 1)
    _checks.in_range(fn, "delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
    _checks.one_of(fn, "accountant", accountant, ACCOUNTANTS)


def dp_event(
    noise_multiplier: float, sampling_rate: float, steps: int, count_noise_multiplier: float | None = None
):
    """The `dp_accounting` event of `steps` Poisson-sampled Gaussian steps.

    With `count_noise_multiplier`, each step is the composition of the
    gradient query (`noise_multiplier`) and `dp_adaptive_aggregate`'s
    clipped-count query on the same sample.
    """
    import dp_accounting

    query = dp_accounting.GaussianDpEvent(noise_multiplier)
    if count_noise_multiplier is not None:
        query = dp_accounting.ComposedDpEvent([query, dp_accounting.GaussianDpEvent(count_noise_multiplier)])
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(sampling_rate, query), steps)


def _accountant(name: str):
    import dp_accounting

    return dp_accounting.pld.PLDAccountant() if name == "pld" else dp_accounting.rdp.RdpAccountant()


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """Epsilon spent by `steps` DP-SGD steps with Poisson sampling.

    Args:
      noise_multiplier: Noise std over the clip norm; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      delta: Target delta, in (0, 1).
      accountant: `"pld"` (tighter) or `"rdp"`.

    Returns:
      The epsilon of the run at `delta`.

    References:
      Mironov, Renyi Differential Privacy, 2017; Doroshenko et al., Connect
      the Dots: Tighter Discrete Approximations of Privacy Loss
      Distributions, 2022.
    """
    _check("epsilon", noise_multiplier, sampling_rate, steps, delta, accountant)
    acc = _accountant(accountant)
    acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def adaptive_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    expected_batch_size: int,
    clipped_count_stddev: float | None = None,
    accountant: str = "pld",
) -> float:
    """Epsilon spent by `steps` steps of `dp_adaptive_aggregate` with Poisson sampling.

    Accounts for the two queries each step releases (the gradient sum with
    the raised noise multiplier and the clipped count) composed, with the
    same arguments as the transform. The RDP accountant composes the two
    Gaussian queries inside each sampled step; `dp_accounting`'s PLD
    accountant cannot, so it accounts the single Gaussian query they are
    equivalent to, `(z_grad**-2 + z_count**-2)**-0.5`, which is
    `noise_multiplier` itself (Andrew et al. 2021, Theorem 1): under PLD this
    is `epsilon(noise_multiplier, ...)`, and under RDP the composition equals
    it up to float rounding (tested).

    Args:
      noise_multiplier: The transform's total noise multiplier; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      delta: Target delta, in (0, 1).
      expected_batch_size: As passed to `dp_adaptive_aggregate`.
      clipped_count_stddev: As passed to `dp_adaptive_aggregate`.
      accountant: `"pld"` or `"rdp"`.

    Returns:
      The epsilon of the run at `delta`.

    References:
      Andrew et al., Differentially Private Learning with Adaptive Clipping,
      2021. https://arxiv.org/abs/1905.03871
    """
    _check("adaptive_epsilon", noise_multiplier, sampling_rate, steps, delta, accountant)
    z_grad, z_count = adaptive_noise_multipliers(noise_multiplier, expected_batch_size, clipped_count_stddev)
    acc = _accountant(accountant)
    if accountant == "rdp":
        acc.compose(dp_event(z_grad, sampling_rate, steps, count_noise_multiplier=z_count))
    else:
        acc.compose(dp_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """The smallest noise multiplier whose run spends at most `target_epsilon`.

    Args:
      target_epsilon: The privacy budget; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      delta: Target delta, in (0, 1).
      accountant: `"pld"` or `"rdp"`.

    Returns:
      The noise multiplier (searched from 0.3 up).
    """
    import dp_accounting

    _checks.positive("noise_multiplier_for", "target_epsilon", target_epsilon)
    _check("noise_multiplier_for", None, sampling_rate, steps, delta, accountant)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda nm: dp_event(nm, sampling_rate, steps),
            target_epsilon,
            delta,
            # Below 0.3 the PLD accountant needs tens of GiB; such noise is rarely useful.
            dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
        )
    )


def poisson_batch(rng: np.random.Generator, num_examples: int, sampling_rate: float, batch_size: int):
    """Poisson-sampled example indices, padded to a fixed `batch_size`, with their mask.

    Each example is included independently with probability `sampling_rate`;
    the indices are padded (with index 0) to `batch_size` so a jitted step
    never recompiles, and `mask` marks the real rows for `dp_aggregate`. If
    more than `batch_size` examples are drawn, a `ValueError` is raised
    (truncating would break the privacy analysis): choose `batch_size` a few
    standard deviations above `num_examples * sampling_rate`.

    Args:
      rng: A NumPy generator.
      num_examples: Dataset size.
      sampling_rate: Inclusion probability, in (0, 1].
      batch_size: Fixed padded size.

    Returns:
      `(indices int64 [batch_size], mask bool [batch_size])`.
    """
    _checks.in_range("poisson_batch", "sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, hi_open=False)
    chosen = np.flatnonzero(rng.random(num_examples) < sampling_rate)
    if chosen.size > batch_size:
        raise ValueError(
            f"poisson_batch: drew {chosen.size} examples, more than batch_size={batch_size}; "
            "raise `batch_size`."
        )
    indices = np.zeros(batch_size, np.int64)
    indices[: chosen.size] = chosen
    mask = np.arange(batch_size) < chosen.size
    return indices, mask
