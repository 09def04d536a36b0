"""The demo's default task over several seeds: does each configuration train on every seed?

`make demo` trains one seed. This script trains the same default task
(`examples/lstm_exploding.py` with its default flags) for each seed and
configuration, and writes `results/demo_seeds.json` and
`results/demo_seeds.md`: final loss, the largest rise of the loss above its
best so far, and the first non-finite step. A run counts as trained when it
stays finite and its final loss is below `--trained-below`, and as spiked
when it goes non-finite or its loss rises more than `--spike-rise` nats
above its best so far.

Run: `python benchmarks/demo_seeds.py [--seeds 0,1,2,3,4,5,6] [demo flags...]`
 (about 7 s per run on 2 CPU cores at the default sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
# The demo is a script, not a package: loaded from its file (the import path stays as it is).
_spec = importlib.util.spec_from_file_location(
    "lstm_exploding", HERE.parent / "examples" / "lstm_exploding.py"
)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6")
    ap.add_argument("--trained-below", type=float, default=2.0, help="final loss that counts as trained")
    ap.add_argument("--spike-rise", type=float, default=5.0, help="loss rise (nats) that counts as a spike")
    ap.add_argument("--name", default="demo_seeds", help="<out>/<name>.{json,md}")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the results")
    ours, demo_argv = ap.parse_known_args(argv)
    seeds = [int(s) for s in ours.seeds.split(",")]
    args = demo.parse_args(demo_argv + ["--no-progress"])
    data = demo.stdlib_corpus()
    t0 = time.perf_counter()
    results = {}
    for name in args.configs.split(","):
        runs = []
        for seed in seeds:
            args.seed = seed
            r = demo.train(name, demo.CONFIGS[name](), args, data, progress=False)
            runs.append(
                {k: r[k] for k in ("final_loss", "max_rise", "first_nonfinite", "max_norm", "clip_rate")}
            )
            print(
                f"{name:>11} seed {seed}: final {r['final_loss']:.3f} max rise {r['max_rise']:.2f}",
                flush=True,
            )
        results[name] = runs
    wall = time.perf_counter() - t0
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "seed", "configs")}

    def trained(r):
        return r["first_nonfinite"] is None and r["final_loss"] < ours.trained_below

    def spiked(r):
        return r["first_nonfinite"] is not None or r["max_rise"] > ours.spike_rise

    lines = [
        f"Default demo task ({settings}), seeds {seeds}; {wall:.0f} s.",
        "",
        "Final loss (largest rise of the loss above its best so far) per seed; `nf@k`: non-finite at step k.",
        "",
        "| config | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | trained (final < {ours.trained_below}) | spiked (rise > {ours.spike_rise}) |",
        "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- |",
    ]
    for name, runs in results.items():
        cells = [
            f"nf@{r['first_nonfinite']}"
            if r["first_nonfinite"] is not None
            else f"{r['final_loss']:.2f} ({r['max_rise']:.1f})"
            for r in runs
        ]
        counts = f" | {sum(map(trained, runs))}/{len(runs)} | {sum(map(spiked, runs))}/{len(runs)} |"
        lines.append(f"| {name} | " + " | ".join(cells) + counts)
    table = "\n".join(lines)
    print("\n" + table)
    out = pathlib.Path(ours.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": settings, "seeds": seeds, "wall_s": wall, "results": results}
    (out / f"{ours.name}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    (out / f"{ours.name}.md").write_text(table + "\n")
    return payload


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
