"""Interleaved timing shared by the benchmarks: warm-up, repeats, medians."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# What the benchmarks time: "wall" (time.perf_counter, the default: what a user waits) or "cpu"
# (time.process_time: CPU seconds of all of this process's threads, which other processes' load
# on a shared machine barely changes; meaningless for work done on a GPU).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = "wall"


def set_clock(name: str) -> None:
    """Chooses the clock every later timing uses (`CLOCKS`)."""
    global clock
    if name not in CLOCKS:
        raise ValueError(f"set_clock: `name` must be one of {sorted(CLOCKS)}, got name={name!r}.")
    clock = name


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each `steps[name]()` (which must block), variants interleaved.

    Each variant is called twice first (compile and warm up); then every
    repeat times `inner` calls of each variant in turn, so slow drifts of the
    machine hit all variants alike. Seconds of the chosen `clock`.
    """
    now = CLOCKS[clock]
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = now()
            for _ in range(inner):
                step()
            times[name].append((now() - t0) / inner)
    return {name: float(np.median(t)) for name, t in times.items()}


def temp_bytes(jitted, *args) -> int:
    """XLA's compiled temp allocation of `jitted(*args)` (its peak scratch memory)."""
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def time_donated_steps(
    variants: dict[str, tuple[Callable, Callable]], params, extra: tuple, repeats: int, inner: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Times training steps that donate params and state, as in a real loop.

    `variants[name] = (step, init)`, with the jitted `step(params, state,
    *extra) -> (params, state)` and `init(params) -> state`. Each variant
    gets its own copies of `params` and its state (donation consumes them)
    and carries its outputs into its next call. Returns the median seconds
    per step (`interleaved_medians`) and XLA's compiled temp bytes, by name.
    """
    live, lowered, steps, temps = {}, {}, {}, {}
    for name, (step, init) in variants.items():
        p = jax.tree.map(jnp.copy, params)
        s = jax.tree.map(jnp.copy, init(p))
        lowered[name] = step.lower(p, s, *extra)
        live[name] = [p, s]
    # Compiled once, ahead of time (the executable timed is the one whose temp size is reported),
    # in threads: XLA compiles without the GIL, and compiling is most of a benchmark's wall time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        executables = dict(zip(lowered, pool.map(lambda low: low.compile(), lowered.values()), strict=True))
    for name, compiled in executables.items():
        temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)

        def run(name=name, step=compiled):
            live[name][0], live[name][1] = step(live[name][0], live[name][1], *extra)
            jax.block_until_ready(live[name][0])

        steps[name] = run
    return interleaved_medians(steps, repeats, inner), temps


def print_checks(checks: list[tuple[bool, str]]) -> None:
    """Prints each target check as `PASS: ...` or `MISS: ...`."""
    for ok, line in checks:
        print(("PASS: " if ok else "MISS: ") + line)
