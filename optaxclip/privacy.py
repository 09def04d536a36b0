"""Privacy accounting for DP-SGD on `dp_accounting` (install `optaxclip[dp]`).

Example:
  >>> from optaxclip import privacy
  >>> eps = privacy.epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=1000, delta=1e-5)
  >>> print(f"{eps:.3f}")
  1.515
"""

from __future__ import annotations

import functools

import numpy as np

from . import _checks
from ._dp import adaptive_noise_multipliers

ACCOUNTANTS = ("pld", "rdp")


# Accounting runs on the host: every number must be concrete (a traced value is a `TypeError`).


def _check(fn, noise_multiplier, sampling_rate, steps, delta, accountant):
    if fn != "noise_multiplier_for":  # which has none: it returns one
        _checks.positive(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.in_range(fn, "sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, hi_open=False, concrete=True)
    _checks.integer_at_least(fn, "steps", steps, 1, concrete=True)
    _checks.in_range(fn, "delta", delta, 0.0, 1.0, lo_open=True, hi_open=True, concrete=True)
    _checks.one_of(fn, "accountant", accountant, ACCOUNTANTS)


def _check_truncation(fn, truncated_batch_size, num_examples, accountant="pld"):
    """Both or neither; integers >= 1; only the PLD accountant accounts truncation."""
    if (truncated_batch_size is None) != (num_examples is None):
        raise ValueError(
            f"{fn}: pass both `truncated_batch_size` and `num_examples` (batches truncated to "
            f"`truncated_batch_size` of `num_examples` examples) or neither, got "
            f"truncated_batch_size={truncated_batch_size!r}, num_examples={num_examples!r}."
        )
    if truncated_batch_size is None:
        return
    _checks.integer_at_least(fn, "truncated_batch_size", truncated_batch_size, 1, concrete=True)
    _checks.integer_at_least(fn, "num_examples", num_examples, 1, concrete=True)
    if accountant != "pld":
        raise ValueError(
            f"{fn}: truncated Poisson sampling needs `accountant` 'pld' (dp_accounting's RDP "
            f"accountant cannot account it), got accountant={accountant!r}."
        )


def dp_event(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    count_noise_multiplier: float | None = None,
    *,
    truncated_batch_size: int | None = None,
    num_examples: int | None = None,
):
    """The `dp_accounting` event of `steps` Poisson-sampled Gaussian steps.

    With `count_noise_multiplier`, each step is the composition of the
    gradient query (`noise_multiplier`) and `dp_adaptive_aggregate`'s
    clipped-count query on the same sample. With `truncated_batch_size` and
    `num_examples`, each Poisson sample of the `num_examples` examples was
    truncated to a uniformly random `truncated_batch_size` of them (as
    `poisson_batch` does): a `dp_accounting.TruncatedSubsampledGaussianDpEvent`
    (PLD accountant only).

    Args:
      noise_multiplier: Noise std over the clip norm; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      count_noise_multiplier: Optional noise multiplier of a second query on
        the same sample (not with truncation).
      truncated_batch_size: Largest batch; batches above it were truncated.
      num_examples: Dataset size, with `truncated_batch_size`.

    Returns:
      A `dp_accounting.DpEvent`.

    Example:
      >>> from optaxclip import privacy
      >>> event = privacy.dp_event(1.1, 0.01, 100, truncated_batch_size=130, num_examples=10_000)
      >>> print(type(event.event).__name__, event.count)
      TruncatedSubsampledGaussianDpEvent 100
    """
    import dp_accounting

    fn = "dp_event"
    _checks.non_negative(fn, "noise_multiplier", noise_multiplier, concrete=True)
    _checks.in_range(fn, "sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, hi_open=False, concrete=True)
    _checks.integer_at_least(fn, "steps", steps, 1, concrete=True)
    if count_noise_multiplier is not None:
        _checks.non_negative(fn, "count_noise_multiplier", count_noise_multiplier, concrete=True)
    _check_truncation(fn, truncated_batch_size, num_examples)
    noise_multiplier, sampling_rate, steps = float(noise_multiplier), float(sampling_rate), int(steps)
    if truncated_batch_size is not None:
        if count_noise_multiplier is not None:
            raise ValueError(
                "dp_event: truncated sampling accounts one Gaussian query; got "
                f"count_noise_multiplier={count_noise_multiplier!r} with "
                f"truncated_batch_size={truncated_batch_size!r}."
            )
        step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=int(num_examples),
            sampling_probability=sampling_rate,
            truncated_batch_size=int(truncated_batch_size),
            noise_multiplier=noise_multiplier,
        )
        return dp_accounting.SelfComposedDpEvent(step, steps)
    query = dp_accounting.GaussianDpEvent(noise_multiplier)
    if count_noise_multiplier is not None:
        count = dp_accounting.GaussianDpEvent(float(count_noise_multiplier))
        query = dp_accounting.ComposedDpEvent([query, count])
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
    *,
    truncated_batch_size: int | None = None,
    num_examples: int | None = None,
) -> float:
    """Epsilon spent by `steps` DP-SGD steps with Poisson sampling.

    Args:
      noise_multiplier: Noise std over the clip norm; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      delta: Target delta, in (0, 1).
      accountant: `"pld"` (tighter) or `"rdp"`.
      truncated_batch_size: With `num_examples`: the batches were Poisson
        samples of `num_examples` examples truncated to at most this many
        (`poisson_batch(..., batch_size=truncated_batch_size)`). A truncated
        batch can differ from its neighbour in two examples, and the
        accounting includes that (PLD only). Without it, the epsilon assumes
        no batch was ever truncated.
      num_examples: Dataset size, with `truncated_batch_size`.

    Returns:
      The epsilon of the run at `delta`.

    Example:
      >>> from optaxclip import privacy
      >>> eps = privacy.epsilon(4.0, 0.1, 10, 1e-5, truncated_batch_size=120, num_examples=1000)
      >>> print(f"{eps:.3f} > {privacy.epsilon(4.0, 0.1, 10, 1e-5):.3f}")  # truncated vs never truncated
      0.451 > 0.305

    References:
      Mironov, Renyi Differential Privacy, 2017; Doroshenko et al., Connect
      the Dots: Tighter Discrete Approximations of Privacy Loss
      Distributions, 2022; Chua et al., Scalable DP-SGD: Shuffling vs.
      Poisson Subsampling, 2024 (truncated Poisson sampling).
      https://arxiv.org/abs/2411.04205
    """
    _check("epsilon", noise_multiplier, sampling_rate, steps, delta, accountant)
    _check_truncation("epsilon", truncated_batch_size, num_examples, accountant)
    delta = float(delta)
    acc = _accountant(accountant)
    acc.compose(
        dp_event(
            noise_multiplier,
            sampling_rate,
            steps,
            truncated_batch_size=truncated_batch_size,
            num_examples=num_examples,
        )
    )
    return float(acc.get_epsilon(delta))


def adaptive_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    expected_batch_size: int,
    clipped_count_stddev: float | None = None,
    accountant: str = "pld",
    *,
    truncated_batch_size: int | None = None,
    num_examples: int | None = None,
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
      truncated_batch_size: As in `epsilon` (PLD only: the equivalent single
        query on the truncated sample).
      num_examples: As in `epsilon`.

    Returns:
      The epsilon of the run at `delta`.

    References:
      Andrew et al., Differentially Private Learning with Adaptive Clipping,
      2021. https://arxiv.org/abs/1905.03871
    """
    _check("adaptive_epsilon", noise_multiplier, sampling_rate, steps, delta, accountant)
    _check_truncation("adaptive_epsilon", truncated_batch_size, num_examples, accountant)
    _checks.integer_at_least("adaptive_epsilon", "expected_batch_size", expected_batch_size, 1, concrete=True)
    if clipped_count_stddev is not None:
        _checks.positive("adaptive_epsilon", "clipped_count_stddev", clipped_count_stddev, concrete=True)
    delta = float(delta)
    z_grad, z_count = adaptive_noise_multipliers(noise_multiplier, expected_batch_size, clipped_count_stddev)
    acc = _accountant(accountant)
    if accountant == "rdp":
        acc.compose(dp_event(z_grad, sampling_rate, steps, count_noise_multiplier=z_count))
    else:
        truncation = {"truncated_batch_size": truncated_batch_size, "num_examples": num_examples}
        acc.compose(dp_event(noise_multiplier, sampling_rate, steps, **truncation))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    *,
    truncated_batch_size: int | None = None,
    num_examples: int | None = None,
) -> float:
    """The smallest noise multiplier whose run spends at most `target_epsilon`.

    Args:
      target_epsilon: The privacy budget; > 0.
      sampling_rate: Probability that an example is in a batch, in (0, 1].
      steps: Number of steps; >= 1.
      delta: Target delta, in (0, 1).
      accountant: `"pld"` or `"rdp"`.
      truncated_batch_size: As in `epsilon`: calibrate for batches truncated
        to this size (what `poisson_batch` draws with this `batch_size`).
      num_examples: Dataset size, with `truncated_batch_size`.

    Returns:
      The noise multiplier, searched from 0.3 up; with truncation from 0.6
      up (its analysis also runs a mechanism at half the noise, slow and
      memory-hungry below that). With a `batch_size` a few standard
      deviations above the expected one, the untruncated multiplier spends
      barely more than the target once truncation is accounted (measured:
      8.0011 for a target of 8 with batches of 192 for an expected 128 of
      20,000, 150 steps): calibrating without truncation and reporting
      `epsilon(..., truncated_batch_size=...)` is much faster (one truncated
      evaluation instead of about ten).

    Raises:
      ValueError: with truncation, if 0.6 already meets `target_epsilon`.

    Example:
      >>> from optaxclip import privacy
      >>> truncated = dict(truncated_batch_size=120, num_examples=1000)
      >>> nm = privacy.noise_multiplier_for(0.3, 0.1, 10, 1e-5, **truncated)
      >>> print(f"{nm:.2f} {privacy.epsilon(nm, 0.1, 10, 1e-5, **truncated):.3f}")
      5.45 0.300
    """
    _checks.positive("noise_multiplier_for", "target_epsilon", target_epsilon, concrete=True)
    _check("noise_multiplier_for", None, sampling_rate, steps, delta, accountant)
    _check_truncation("noise_multiplier_for", truncated_batch_size, num_examples, accountant)
    as_int = lambda v: None if v is None else int(v)  # noqa: E731
    # Python numbers for the cache's key (a JAX scalar is not hashable).
    return _calibrate(
        float(target_epsilon),
        float(sampling_rate),
        int(steps),
        float(delta),
        accountant,
        as_int(truncated_batch_size),
        as_int(num_examples),
    )


# A calibration is a pure function of its arguments and takes seconds (many PLD evaluations).
@functools.lru_cache(maxsize=32)
def _calibrate(target_epsilon, sampling_rate, steps, delta, accountant, truncated_batch_size, num_examples):
    import dp_accounting

    truncation = {"truncated_batch_size": truncated_batch_size, "num_examples": num_examples}
    make_event = lambda nm: dp_event(nm, sampling_rate, steps, **truncation)
    if truncated_batch_size is None:
        # Below 0.3 the PLD accountant needs tens of GiB; such noise is rarely useful.
        bracket = dp_accounting.LowerEndpointAndGuess(0.3, 1.0)
    else:
        bracket = _truncated_bracket(make_event, target_epsilon, delta)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant), make_event, target_epsilon, delta, bracket
        )
    )


def _truncated_bracket(make_event, target_epsilon, delta):
    """An interval holding the truncated run's noise multiplier, found from 2.0 by doubling or halving.

    The truncated analysis also runs a mechanism at half the noise, whose PLD
    is slow and large at small noise: evaluate as few small multipliers as
    possible, and none below 0.6.
    """
    import dp_accounting

    def eps(nm):
        acc = _accountant("pld")
        acc.compose(make_event(nm))
        return acc.get_epsilon(delta)

    if eps(2.0) > target_epsilon:
        lo, hi = 2.0, 4.0
        while eps(hi) > target_epsilon:
            if hi >= 2.0**30:
                raise ValueError(
                    f"noise_multiplier_for: no noise multiplier up to 2**30 reaches "
                    f"target_epsilon={target_epsilon!r}."
                )
            lo, hi = hi, 2 * hi
    else:
        lo, hi = 1.0, 2.0
        while eps(lo) <= target_epsilon:
            if lo <= 0.6:
                raise ValueError(
                    f"noise_multiplier_for: noise multiplier 0.6 already spends at most "
                    f"target_epsilon={target_epsilon!r} with truncated batches (smaller ones are "
                    "not searched)."
                )
            lo, hi = max(lo / 2, 0.6), lo
    return dp_accounting.ExplicitBracketInterval(lo, hi)


def poisson_batch(rng: np.random.Generator, num_examples: int, sampling_rate: float, batch_size: int):
    """Poisson-sampled example indices, padded to a fixed `batch_size`, with their mask.

    Each example is included independently with probability `sampling_rate`;
    the indices are padded (with index 0) to `batch_size` so a jitted step
    never recompiles, and `mask` marks the real rows for `dp_aggregate`.

    Edge cases:
      A draw of more than `batch_size` examples is truncated to a uniformly
      random `batch_size` of them (as jax-privacy's `CyclicPoissonSampling`
      with `truncated_batch_size`), so a long run never aborts. Truncation
      changes the privacy analysis: account the run with
      `privacy.epsilon(..., truncated_batch_size=batch_size,
      num_examples=num_examples)` (and calibrate with the same arguments to
      `noise_multiplier_for`). With `batch_size` a few standard deviations
      above `num_examples * sampling_rate` the truncated epsilon is the
      untruncated one to many digits.

    Args:
      rng: A NumPy generator.
      num_examples: Dataset size; >= 1.
      sampling_rate: Inclusion probability, in (0, 1].
      batch_size: Fixed padded size, and the most real rows a batch holds; >= 1.

    Returns:
      `(indices int64 [batch_size], mask bool [batch_size])`, the real
      indices ascending first.

    Example:
      >>> import numpy as np
      >>> from optaxclip import privacy
      >>> idx, mask = privacy.poisson_batch(np.random.default_rng(0), 1000, 0.5, batch_size=8)
      >>> print(idx.shape, int(mask.sum()))  # about 500 drawn, truncated to 8
      (8,) 8
    """
    fn = "poisson_batch"
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{fn}: `rng` must be a NumPy generator (np.random.default_rng(seed)), "
            f"got rng={_checks.describe(rng)} ({type(rng).__name__})."
        )
    _checks.integer_at_least(fn, "num_examples", num_examples, 1, concrete=True)
    _checks.in_range(fn, "sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, hi_open=False, concrete=True)
    _checks.integer_at_least(fn, "batch_size", batch_size, 1, concrete=True)
    num_examples, sampling_rate, batch_size = int(num_examples), float(sampling_rate), int(batch_size)
    chosen = np.flatnonzero(rng.random(num_examples) < sampling_rate)
    if chosen.size > batch_size:
        # A uniformly random subset: the truncated-sampling analysis assumes it (not the first ones).
        chosen = np.sort(rng.choice(chosen, size=batch_size, replace=False))
    indices = np.zeros(batch_size, np.int64)
    indices[: chosen.size] = chosen
    mask = np.arange(batch_size) < chosen.size
    return indices, mask
