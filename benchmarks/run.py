"""The benchmark entry point: `make bench` (full) and `make bench-quick` (under 3 minutes).

Runs, in one process on one machine:
1. the update-step overhead of every transform chained before adam, with
   the optax counterparts, adam alone, the read-pass floor and a
   hand-fused clip + adam, on float32 model-shaped trees (`update_step.py`);
2. the same on a bfloat16 tree;
3. the DP-SGD step on a Flax LSTM against a non-private step,
   optax.contrib and jax_privacy (`dp_step.py`);
then checks the targets (PASS/MISS), and writes `results/<name>.json`,
`results/<name>.md` (the tables) and `results/<name>_scaling.png` (update
time against parameter count, DP step time against batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dp_step  # noqa: E402
import update_step  # noqa: E402

PLANS = {
    "quick": {
        "f32_sizes": (1e5, 1e6),
        "bf16_size": 1e6,
        "update": (7, 3),  # repeats, inner
        "dp": ((128, 64), (128, 128)),
        "dp_timing": (5, 1),
    },
    "full": {
        "f32_sizes": (1e5, 1e6, 1e7),
        "bf16_size": 1e7,
        "update": (15, 5),
        "dp": ((128, 64), (128, 256), (256, 64), (256, 256)),
        "dp_timing": (7, 2),
    },
}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, update_rows: list[dict], dp_rows: list[dict], checks: list[tuple[bool, str]]) -> str:
    out = [
        f"Machine: {meta['machine']}; jax {meta['jax']}, optax {meta['optax']}, "
        f"jax_privacy {meta['jax_privacy']}, device {meta['device']}; plan `{meta['plan']}`, "
        f"{meta['wall_s']:.0f} s.",
        "",
        "Update step (update + apply_updates, state and params donated), medians; "
        "`vs optax` is the ratio to the optax counterpart, `margin` the overhead over "
        "the counterpart's in units of adam's time (target <= +0.05).",
        "",
        "| params | dtype | variant | median ms | vs adam | vs fused | vs optax | margin | XLA temp MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in update_rows:
        out.append(
            f"| {r['params']:.2g} | {r['dtype']} | {r['variant']} | {r['median_ms']:.2f} "
            f"| {r['vs_adam']:.3f} | {_fmt(r['vs_fused'], '.3f')} | {_fmt(r['vs_counterpart'], '.3f')} "
            f"| {_fmt(r['overhead_margin'], '+.3f')} | {r['temp_MiB']:.2f} |"
        )
    out += [
        "",
        "DP-SGD step on a Flax NNX LSTM (vocab 64, seq 64; clip 1.0, noise 1.1), medians; "
        "`vs jax_privacy` compares with jax_privacy at the same microbatching.",
        "",
        "| hidden | batch | params | variant | median ms | vs non-private | vs jax_privacy | XLA temp MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in dp_rows:
        out.append(
            f"| {r['hidden']} | {r['batch']} | {r['params']:,} | {r['variant']} | {r['median_ms']:.1f} "
            f"| {r['vs_nonprivate']:.2f} | {r['vs_jax_privacy']:.3f} | {r['temp_MiB']:.1f} |"
        )
    out += ["", "Targets:", "", "```"]
    out += [("PASS: " if ok else "MISS: ") + line for ok, line in checks]
    out += ["```", ""]
    return "\n".join(out)


def plot(update_rows: list[dict], dp_rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_u, ax_d) = plt.subplots(1, 2, figsize=(13, 5))
    f32 = [r for r in update_rows if r["dtype"] == "float32"]
    shown = [
        "adam",
        "fused clip+adam (hand)",
        "optax clip_by_global_norm",
        "optaxclip clip_by_global_norm",
        "optaxclip adaptive_clip(window=1000)",
        "optaxclip zscore_clip",
        "optax clip",
        "optaxclip clip_by_value",
    ]
    for name in shown:
        rows = sorted((r for r in f32 if r["variant"] == name), key=lambda r: r["params"])
        ax_u.plot([r["params"] for r in rows], [r["median_ms"] for r in rows], marker="o", label=name)
    ax_u.set(xscale="log", yscale="log", xlabel="float32 parameters", ylabel="step time, ms (median)")
    ax_u.set_title("Update step: clip chained before adam")
    ax_u.legend(fontsize=7)
    for hidden, ls in ((128, "-"), (256, "--")):
        for i, name in enumerate(dict.fromkeys(r["variant"] for r in dp_rows)):
            rows = sorted(
                (r for r in dp_rows if r["variant"] == name and r["hidden"] == hidden),
                key=lambda r: r["batch"],
            )
            if rows:
                ax_d.plot(
                    [r["batch"] for r in rows],
                    [r["median_ms"] for r in rows],
                    ls=ls,
                    marker="o",
                    color=f"C{i}",
                    label=f"{name} (hidden {hidden})",
                )
    ax_d.set(xscale="log", yscale="log", xlabel="batch size", ylabel="step time, ms (median)")
    ax_d.set_title("DP-SGD step, Flax LSTM")
    ax_d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under 3 minutes)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    plan_name = "quick" if args.quick else "full"
    plan = PLANS[plan_name]
    t0 = time.perf_counter()
    update_rows = []
    for size in plan["f32_sizes"]:
        print(f"update step, float32, {size:.0e} params ...", flush=True)
        update_rows += update_step.bench(size, jnp.float32, *plan["update"])
    print(f"update step, bfloat16, {plan['bf16_size']:.0e} params ...", flush=True)
    update_rows += update_step.bench(plan["bf16_size"], jnp.bfloat16, *plan["update"])
    dp_rows = []
    for hidden, batch in plan["dp"]:
        print(f"DP step, hidden {hidden}, batch {batch} ...", flush=True)
        dp_rows += dp_step.bench(hidden, batch, *plan["dp_timing"])
    checks = update_step.targets(update_rows) + dp_step.targets(dp_rows)
    import jax_privacy

    meta = {
        "plan": plan_name,
        "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPU cores, "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s)",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "jax_privacy": jax_privacy.__version__,
        "wall_s": time.perf_counter() - t0,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench-quick" if args.quick else "bench"
    table = markdown(meta, update_rows, dp_rows, checks)
    (out / f"{name}.md").write_text(table)
    record = {
        **meta,
        "update": update_rows,
        "dp": dp_rows,
        "targets": [{"pass": ok, "check": c} for ok, c in checks],
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    plot(update_rows, dp_rows, out / f"{name}_scaling.png")
    print(table)
    print(f"Wrote {out / name}.json, .md and _scaling.png ({meta['wall_s']:.0f} s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
