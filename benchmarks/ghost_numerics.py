"""The ghost path's sensitivity bound and over-clip on hostile inputs (issue 26).

For each input of `tests/adversarial.py`, one example at a time (the
others masked): the norm of its contribution to the released sum over the
clip norm C, by the ghost path and by the vmap path. `max` must be <= 1 +
1e-5. `min` over the clipped examples shows the over-clip of the certified
bound: an exact clip gives 1.0, so `1 - min` is the largest fraction of an
example's clipped gradient lost to the certificate's slack. Writes
`benchmarks/results/ghost_numerics.md`.

    python benchmarks/ghost_numerics.py
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from adversarial import ADVERSARIES, contributions  # noqa: E402

import optaxclip  # noqa: E402


def main() -> None:
    rows = ["| input | paths (ghost/mat./per-ex.) | ghost max / C | ghost min / C (clipped) | vmap max / C |"]
    rows.append("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for name, make in ADVERSARIES.items():
        adv = make()
        paths = list(optaxclip.ghost_clipped_grad_sum(adv.loss_fn).paths(adv.params, adv.x).values())
        counts = "/".join(str(paths.count(k)) for k in ("ghost", "materialised", "per-example"))
        ghost, norms = contributions(optaxclip.ghost_clipped_grad_sum, adv)
        vmap, _ = contributions(optaxclip.clipped_grad_sum, adv)
        clipped = norms > adv.clip
        lo = np.min(ghost[clipped]) / adv.clip if np.any(clipped) else float("nan")
        hi, vhi = np.max(ghost) / adv.clip, np.max(vmap) / adv.clip
        worst = max(worst, hi)
        rows.append(f"| {name} | {counts} | {hi:.7f} | {lo:.7f} | {vhi:.7f} |")
        print(rows[-1], flush=True)
    rows.append(f"\nLargest contribution / C over every example: {worst:.7f} (jax {jax.__version__}).")
    out = ROOT / "benchmarks" / "results" / "ghost_numerics.md"
    out.write_text("\n".join(rows) + "\n")
    print(rows[-1], f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
