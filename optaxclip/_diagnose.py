"""Reading a history of gradient norms: what is wrong, and what threshold to use.

These run on the host, on NumPy arrays of logged values (for example the
`pre_clip_norm` column that `optaxclip.metrics` gives each step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import _checks

SPIKE_FACTOR = 3.0  # a norm above 3x its rolling mean is a spike
SPIKE_WINDOW = 100  # rolling mean over the previous 100 finite norms
VANISHING = 1e-5  # norms persistently below this are vanishing


class Finding(NamedTuple):
    """One thing `diagnose` found.

    Attributes:
      code: A stable identifier: `"nonfinite"`, `"clip_rate_high"`,
        `"clip_rate_low"`, `"spikes"`, `"vanishing"`, `"loss_nonfinite"`,
        `"loss_diverging"` or `"ok"`.
      severity: `"error"`, `"warning"` or `"info"`.
      message: What was seen, with numbers.
      cause: The likely cause.
      action: What to do about it.
      steps: The steps concerned (the first 20 at most).
    """

    code: str
    severity: str
    message: str
    cause: str
    action: str
    steps: tuple[int, ...] = ()


def _as_array(fn: str, name: str, values, n: int | None = None, *, bools: bool = False) -> np.ndarray:
    """`values` as a float64 vector; a `TypeError` unless it is a 1-D sequence of real numbers.

    Refused (naming `fn`, `name` and the value): None, a string, a scalar,
    a nested or ragged sequence, strings or None among the values, complex
    numbers, and bools unless `bools` (the `clipped` flags).
    """
    what = "a 1-D sequence of " + ("bools or numbers" if bools else "real numbers") + ", one per step"
    if values is None or isinstance(values, (str, bytes)):
        raise TypeError(f"{fn}: `{name}` must be {what}, got {name}={_checks.describe(values)}.")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:  # ragged
        raise TypeError(
            f"{fn}: `{name}` must be {what}, got {name}={_checks.describe(values)} ({e})."
        ) from None
    if arr.dtype == object:  # e.g. None among numbers (which NumPy would read as NaN)
        try:
            if any(v is None or isinstance(v, (str, bytes, bool)) for v in arr.reshape(-1)):
                raise TypeError
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"{fn}: `{name}` must be {what}, got {name}={_checks.describe(values)} (not all numbers)."
            ) from None
    kinds = "iuf" + ("b" if bools else "")
    if arr.dtype.kind not in kinds or arr.ndim != 1:
        why = f"dtype {arr.dtype}" if arr.dtype.kind not in kinds else f"{arr.ndim} dimensions"
        raise TypeError(f"{fn}: `{name}` must be {what}, got {name}={_checks.describe(values)} ({why}).")
    arr = arr.astype(np.float64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{fn}: `{name}` must have one value per step ({n}), got {arr.shape[0]}.")
    return arr


def spike_steps(norms: Sequence[float]) -> np.ndarray:
    """Steps whose norm exceeds 3x the mean of the previous (up to) 100 finite norms.

    Args:
      norms: Global gradient norms, one per step.

    Returns:
      An int array of step indices (at least 10 earlier finite norms needed).
    """
    x = _as_array("spike_steps", "norms", norms)
    finite = np.isfinite(x)
    vals = np.concatenate([[0.0], np.cumsum(np.where(finite, x, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(finite)])
    t = np.arange(x.shape[0])
    lo = np.maximum(0, cnt[t] - SPIKE_WINDOW)  # index into finite-order, via searchsorted
    start = np.searchsorted(cnt, lo, side="left")  # first step with that many finite before
    s = vals[t] - vals[start]
    c = cnt[t] - cnt[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / c
    return np.flatnonzero(finite & (cnt[t] >= 10) & (x > SPIKE_FACTOR * mean))


def _loss_divergence(losses: Sequence[float]) -> tuple[float, float, int] | None:
    """Whether a loss history ended far above its best, judged on smoothed losses.

    Per-step losses are noisy: their minimum is an outlier, not the best the
    model reached. Both ends are window means instead: the mean of the last
    `max(window, n // 10)` finite losses against the lowest mean of `window`
    consecutive finite losses (`window = max(5, n // 20)`). It is divergence
    when the end is above the best by more than a quarter of the best's
    magnitude and by more than the noise could explain (4 standard errors of
    a window mean plus 2 of the end's mean; the per-step noise is estimated
    from step-to-step differences, so a trend does not count as noise).
    Measured on the demo's runs: the unclipped one ends 49% above its best,
    the clipped ones 2-4%; a flat loss with 13% noise (200 seeds, 400 steps)
    at most 18%.

    Returns `(end, best, window)` when the loss diverged, else None (also
    with fewer than 20 finite losses).
    """
    x = np.asarray(losses, np.float64)  # checked by `diagnose`
    x = x[np.isfinite(x)]
    n = x.shape[0]
    if n < 20:
        return None
    window = max(5, n // 20)
    means = np.convolve(x, np.ones(window) / window, mode="valid")
    best = float(np.min(means))
    end = x[-max(window, n // 10) :]
    tail = float(np.mean(end))
    d = np.diff(x)
    noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2)  # robust per-step std
    margin = max(0.25 * abs(best), noise * (4 / np.sqrt(window) + 2 / np.sqrt(end.size)), 1e-12)
    if tail - best > margin:
        return tail, best, window
    return None


def suggest_threshold(norms: Sequence[float], quantile: float = 0.95) -> float:
    """A global-norm clipping threshold near the top of the normal range.

    Non-finite norms and spikes (see `spike_steps`) are left out; the
    `quantile` of the rest is returned, so clipping fires on about
    `1 - quantile` of ordinary steps and on every spike.

    Args:
      norms: Global gradient norms, one per step.
      quantile: Where in the normal range to put the threshold, in (0, 1].

    Returns:
      The suggested `max_norm` for `clip_by_global_norm`.

    Raises:
      ValueError: if no finite norm is given, or `quantile` is out of range.

    Example:
      >>> import optaxclip
      >>> norms = [1.0, 1.2, 0.9, 1.1, 1.0] * 4 + [500.0]
      >>> print(f"{optaxclip.suggest_threshold(norms):.2f}")
      1.20
    """
    fn = "suggest_threshold"
    _checks.in_range(fn, "quantile", quantile, 0, 1, lo_open=True, hi_open=False, concrete=True)
    x = _as_array(fn, "norms", norms)
    keep = np.isfinite(x)
    keep[spike_steps(x)] = False
    if not keep.any():
        raise ValueError("suggest_threshold: `norms` holds no finite, non-spike value.")
    return float(np.quantile(x[keep], quantile))


# The transform advised where a run needs a clip: it clips a bad batch from step 1 and its
# threshold does not rise with norms that grow under too high a learning rate.
GUARD = "guard_clip() (the recommended default, chained before the optimizer)"


def diagnose(
    norms: Sequence[float],
    thresholds: Sequence[float] | None = None,
    losses: Sequence[float] | None = None,
    *,
    clipped: Sequence[bool] | None = None,
) -> list[Finding]:
    """Says what a history of gradient norms means, and what to do.

    The rules:
      - non-finite norms: overflow (use loss scaling or bfloat16, lower the
        learning rate, skip such steps with `optax.apply_if_finite`);
      - clipping fires on more than half the steps: the threshold is too
        low or the learning rate too high;
      - clipping almost never fires (< 1% of 100+ steps): the threshold is
        too high to matter;
      - a norm above 3x its rolling 100-step mean: a bad batch (clip it, for
        example with `guard_clip`, skip it with `skip_spikes`, or lower the
        learning rate);
      - norms persistently below 1e-5: vanishing gradients (initialization,
        residual connections, normalization);
      - with `losses`: non-finite losses, and a loss that ended far above
        its best (divergence), judged on window means, not on the noisy per-step minimum.

    If nothing is wrong, one `"ok"` finding gives the suggested threshold.

    The advice depends on whether the run was clipped: a threshold was in
    effect on some step (a finite entry of `thresholds`) or a `clipped` flag
    is set. An unclipped run is advised to clip with `guard_clip` first; a
    clipped run is never told to add clipping: for it the advice is about
    its threshold (which spikes passed it, whether it rose with the norms)
    and the learning rate.

    Args:
      norms: Pre-clip global norms, one per step.
      thresholds: Optional clipping threshold of each step (inf = none).
      losses: Optional training loss of each step.
      clipped: Optional per-step flags of whether clipping fired; without
        them, a step counts as clipped when its norm exceeds its threshold.

    Returns:
      A list of `Finding`s, most severe first.

    Raises:
      TypeError: if an argument is not a 1-D sequence of numbers (bools too
        for `clipped`).
      ValueError: if `norms` is empty, or another argument's length differs.

    Example:
      >>> import optaxclip
      >>> norms = [1.0, 1.1, 0.9, 1.0] * 5 + [50.0, 1.0, float("nan")]
      >>> for f in optaxclip.diagnose(norms):
      ...     print(f.code, f.steps)
      nonfinite (22,)
      spikes (20,)
      >>> print(optaxclip.diagnose(norms)[1].action.split(" (")[0])  # unclipped run: clip it
      clip with guard_clip()
    """
    fn = "diagnose"
    x = _as_array(fn, "norms", norms)
    n = x.shape[0]
    if n == 0:
        raise ValueError("diagnose: `norms` is empty.")
    thr = None if thresholds is None else _as_array(fn, "thresholds", thresholds, n)
    flags_given = None if clipped is None else _as_array(fn, "clipped", clipped, n, bools=True) > 0
    loss = None if losses is None else _as_array(fn, "losses", losses, n)
    finite = np.isfinite(x)
    out: list[Finding] = []

    bad = np.flatnonzero(~finite)
    if bad.size:
        out.append(
            Finding(
                "nonfinite",
                "error",
                f"{bad.size} of {n} steps have a non-finite gradient norm (first at step {bad[0]}).",
                "overflow: float16 without loss scaling, a learning rate too high, or a bad batch",
                "use loss scaling or bfloat16, lower the learning rate, and skip such steps by "
                "wrapping the chain in optax.apply_if_finite (clipping cannot make a NaN/inf finite)",
                tuple(int(s) for s in bad[:20]),
            )
        )

    flags = None
    active = np.ones(n, bool)  # steps on which a clipping threshold was in effect
    if thr is not None:
        active = np.isfinite(thr)
        flags = active & finite & (x > np.where(active, thr, np.inf))
    if flags_given is not None:
        flags = flags_given
    was_clipped = bool((thr is not None and active.any()) or (flags_given is not None and flags_given.any()))
    if flags is not None and active.sum() >= 20:
        rate = float(flags[active].mean())
        if rate > 0.5:
            out.append(
                Finding(
                    "clip_rate_high",
                    "warning",
                    f"clipping fired on {rate:.0%} of steps.",
                    "the threshold is too low for this model, or the learning rate is too high",
                    f"raise the threshold (suggested global-norm max_norm: {_suggest_or_nan(x):.3g}), "
                    f"or let {GUARD} set it from the run's typical norm, or lower the learning rate; "
                    "value clipping and AGC act on elements or units and fire on most steps by design",
                    tuple(int(s) for s in np.flatnonzero(flags)[:20]),
                )
            )
        elif rate < 0.01 and active.sum() >= 100:
            out.append(
                Finding(
                    "clip_rate_low",
                    "info",
                    f"clipping fired on {rate:.1%} of {int(active.sum())} steps.",
                    "the threshold is above nearly every norm: it only guards against extreme spikes",
                    "keep it if that is the intent; else lower it "
                    f"(suggested global-norm max_norm: {_suggest_or_nan(x):.3g})",
                )
            )

    spikes = spike_steps(x)
    if spikes.size:
        out.append(_spike_finding(x, spikes, thr, flags, was_clipped))

    recent = x[finite][-100:]
    if recent.size >= 10 and np.mean(recent < VANISHING) >= 0.9:
        out.append(
            Finding(
                "vanishing",
                "warning",
                f"{np.mean(recent < VANISHING):.0%} of the last {recent.size} finite norms are "
                f"below {VANISHING:g} (median {float(np.median(recent)):.2g}).",
                "vanishing gradients: poor initialization, saturated activations, or a deep stack "
                "without residual connections or normalization",
                "check the initialization, add residual connections or normalization, or raise "
                "the learning rate",
            )
        )

    if loss is not None:
        lbad = np.flatnonzero(~np.isfinite(loss))
        if lbad.size:
            action = (
                "lower the learning rate (or the clip threshold), check the data of that step, and "
                "skip such steps by wrapping the chain in optax.apply_if_finite"
                if was_clipped
                else f"clip with {GUARD}, lower the learning rate, and check the data of that step"
            )
            out.append(
                Finding(
                    "loss_nonfinite",
                    "error",
                    f"the loss is non-finite on {lbad.size} step(s) (first at step {lbad[0]}).",
                    "the model diverged or overflowed",
                    action,
                    tuple(int(s) for s in lbad[:20]),
                )
            )
        diverged = _loss_divergence(loss)
        if diverged is not None:
            out.append(_divergence_finding(diverged, thr, was_clipped))

    if not out:
        suggestion = f"a global-norm threshold near the top of the normal range: {_suggest_or_nan(x):.3g}"
        out.append(
            Finding(
                "ok",
                "info",
                f"no problem found in {n} steps (norms {float(np.min(x)):.3g} to {float(np.max(x)):.3g}).",
                "",
                suggestion
                if was_clipped
                else f"to guard against bad batches, clip with {GUARD}; {suggestion}",
            )
        )
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: order[f.severity])


def _spike_finding(x, spikes, thr, flags, was_clipped: bool) -> Finding:
    """The `spikes` finding; for a clipped run, which spikes the threshold let through."""
    message = (
        f"{spikes.size} step(s) with a norm above {SPIKE_FACTOR:g}x the rolling "
        f"{SPIKE_WINDOW}-step mean (first at step {spikes[0]}, up to {float(np.max(x[spikes])):.3g})."
    )
    cause = "a bad batch (corrupt or unusual data), or a learning rate near instability"
    if not was_clipped:
        action = f"clip with {GUARD}, skip such steps (skip_spikes), or lower the learning rate"
        return Finding("spikes", "warning", message, cause, action, tuple(int(s) for s in spikes[:20]))
    passed = spikes[~flags[spikes]] if flags is not None else spikes[:0]
    if passed.size:
        at = ""
        if thr is not None:
            shown = ", ".join(f"step {s}: norm {x[s]:.3g}, threshold {thr[s]:.3g}" for s in passed[:3])
            at = f" ({shown}{', ...' if passed.size > 3 else ''})"
        message += f" The clip let {passed.size} of them through unclipped{at}."
        action = (
            "the threshold was above these spikes: lower it, or switch to guard_clip() if it is an "
            "adaptive threshold that had risen with the norms (or had no history yet); skip such "
            "steps (skip_spikes) or lower the learning rate"
        )
        return Finding("spikes", "warning", message, cause, action, tuple(int(s) for s in passed[:20]))
    message += " The clip bounded every one (these are pre-clip norms)."
    action = (
        "nothing to add if the loss did not jump at these steps; if it did, skip such steps "
        "(skip_spikes) or lower the learning rate, and check the data of those batches"
    )
    return Finding("spikes", "info", message, cause, action, tuple(int(s) for s in spikes[:20]))


def _divergence_finding(diverged, thr, was_clipped: bool) -> Finding:
    """The `loss_diverging` finding; for a clipped run, whether its threshold rose with the norms."""
    tail, best, window = diverged
    message = f"the loss (mean over {window} steps) ended at {tail:.3g}, far above its best {best:.3g}."
    cause = "training diverged: the learning rate is too high or the updates too large"
    if not was_clipped:
        action = (
            f"clip with {GUARD} (its threshold does not rise with growing norms), or lower the learning rate"
        )
        return Finding("loss_diverging", "warning", message, cause, action)
    action = "the run was clipped: lower the learning rate, or lower the clip threshold"
    if thr is not None:
        seen = thr[np.isfinite(thr)]
        if seen.size >= 2 and seen[-1] > 2 * np.min(seen):
            message += f" The clip threshold rose from {float(np.min(seen)):.3g} to {float(seen[-1]):.3g}."
            cause = (
                "training diverged, and the clip threshold followed the growing norms up, so it stopped "
                "binding (as history-based thresholds do under too high a learning rate)"
            )
            action = (
                "switch to guard_clip() (its level rises by at most 0.3% per step and not while the "
                "loss rises; pass loss= to its update), or lower the learning rate"
            )
    return Finding("loss_diverging", "warning", message, cause, action)


def _suggest_or_nan(x: np.ndarray) -> float:
    try:
        return suggest_threshold(x)
    except ValueError:
        return float("nan")


def format_findings(findings: Sequence[Finding]) -> str:
    """Findings as readable text, one block each.

    Args:
      findings: What `diagnose` returned.

    Returns:
      A multi-line string.

    Example:
      >>> import optaxclip
      >>> print(optaxclip.format_findings(optaxclip.diagnose([1.0] * 30, thresholds=[2.0] * 30)))
      [info] ok: no problem found in 30 steps (norms 1 to 1).
        action: a global-norm threshold near the top of the normal range: 1
    """
    if isinstance(findings, (str, bytes, Finding)) or not isinstance(findings, Sequence):
        raise TypeError(
            "format_findings: `findings` must be a sequence of Finding (what diagnose returns), "
            f"got findings={_checks.describe(findings)}."
        )
    for i, f in enumerate(findings):
        if not isinstance(f, Finding):
            raise TypeError(
                f"format_findings: `findings[{i}]` must be a Finding (what diagnose returns), "
                f"got findings[{i}]={_checks.describe(f)}."
            )
    lines = []
    for f in findings:
        lines.append(f"[{f.severity}] {f.code}: {f.message}")
        if f.cause:
            lines.append(f"  cause: {f.cause}")
        lines.append(f"  action: {f.action}")
        if f.steps:
            more = "..." if len(f.steps) >= 20 else ""
            lines.append(f"  steps: {', '.join(map(str, f.steps))}{more}")
    return "\n".join(lines)
