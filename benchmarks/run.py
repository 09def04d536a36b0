"""The benchmark entry point: `make bench` (full), `make bench-quick` (about 4 minutes), `benchmarks/gpu.sh`.

Run as a script, `python benchmarks/run.py [--plan quick|full|gpu]` (its folder is then on the
import path: the benchmarks import each other by module name, optaxclip as installed).
In one process on one machine it runs:
1. the update-step cost of every transform chained before adam, with adam
   alone, the read floors, a hand-fused clip + adam and the optax
   counterparts, one optimizer state and vmapped over 4 (`update_step.py`),
   on float32 and bfloat16 model-shaped trees;
2. the DP-SGD step on a Flax LSTM against a non-private step, optax.contrib
   and jax_privacy (`dp_step.py`);
then checks issue 20's targets (each printed PASS/MISS; the untargeted
figures printed as "reported"), and writes `<out>/<name>.json` (every
measurement and the machine), `<out>/<name>.md` (the tables and the target
lines) and `<out>/<name>_scaling.png`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import time

import _timing
import jax
import jax.numpy as jnp
import optax
import update_step

HERE = pathlib.Path(__file__).resolve().parent

# sizes: float32 and bfloat16 trees, each timed single-state and vmapped over `states` states
# (at the sizes in "vmap"); "update"/"vmap_timing": (repeats, inner); "dp": (hidden, batch) pairs.
PLANS = {
    "quick": {
        "f32_sizes": (1.1e6, 1.1e7),
        "bf16_sizes": (1.1e6,),
        "vmap_sizes": (1.1e6, 1.1e7),
        "update": (21, 8),
        "vmap_timing": (15, 4),
        "dp": ((128, 64),),
        "dp_timing": (5, 1),
    },
    "full": {
        "f32_sizes": (1.2e5, 1.1e6, 1.1e7),
        "bf16_sizes": (1.1e7,),
        "vmap_sizes": (1.2e5, 1.1e6, 1.1e7),
        "update": (15, 5),
        "vmap_timing": (9, 3),
        "dp": ((128, 64), (128, 256), (256, 64), (256, 256)),
        "dp_timing": (7, 2),
    },
    # A CUDA GPU (benchmarks/gpu.sh): model sizes up to 1e8 parameters, larger DP batches.
    # Largest first: a part not started within gpu.sh's time budget is skipped.
    "gpu": {
        "f32_sizes": (1e8, 1.1e7, 1.1e6),
        "bf16_sizes": (1e8, 1.1e7),
        "vmap_sizes": (1.1e6, 1.1e7),
        "update": (15, 5),
        "vmap_timing": (9, 3),
        "dp": ((256, 256), (512, 512)),
        "dp_timing": (7, 2),
    },
}
STATES = 4


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "?")


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(meta: dict, update_rows, dp_rows, checks, reported) -> str:
    out = [
        f"Machine: {meta['machine']}; jax {meta['jax']}, optax {meta['optax']}, "
        f"jax_privacy {meta['jax_privacy']}, device {meta['device']}; plan `{meta['plan']}`, "
        f"{meta['wall_s']:.0f} s; steps timed by the {meta['clock']} clock.",
        "",
        "Update step (update + apply_updates, state and params donated), medians; `single`: one "
        f"optimizer state, `vmap{STATES}`: the step vmapped over {STATES} stacked states. `over floor`: "
        "(t - t_floor) / t_adam, in the same mode (target <= +0.05, value clip +0.1, from 1e6 "
        "parameters); `vs optax`: ratio to the optax counterpart with the same reads.",
        "",
        *update_step.table(update_rows),
    ]
    if dp_rows:
        out += [
            "",
            "DP-SGD step on a Flax NNX LSTM (vocab 64, seq 64; clip 1.0, noise 1.1), medians; "
            "`vs jax_privacy` compares with jax_privacy at the same microbatching.",
            "",
            "| hidden | batch | params | variant | median ms | vs non-private | vs jax_privacy "
            "| XLA temp MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in dp_rows:
            out.append(
                f"| {r['hidden']} | {r['batch']} | {r['params']:,} | {r['variant']} | {r['median_ms']:.1f} "
                f"| {r['vs_nonprivate']:.2f} | {_ratio(r['vs_jax_privacy'])} | {r['temp_MiB']:.1f} |"
            )
    if meta["skipped"]:
        out += ["", f"Skipped (past the time budget): {'; '.join(meta['skipped'])}."]
    n_pass = sum(ok for ok, _ in checks)
    out += ["", f"Targets ({n_pass} PASS / {len(checks) - n_pass} MISS):", "", "```"]
    out += [("PASS: " if ok else "MISS: ") + line for ok, line in checks]
    out += ["```", "", "Reported, not targeted:", "", "```", *reported, "```", ""]
    return "\n".join(out)


def plot(update_rows: list[dict], dp_rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_u, ax_d) = plt.subplots(1, 2, figsize=(13, 5))
    shown = [
        update_step.ADAM,
        update_step.FLOOR,
        update_step.FUSED,
        update_step.OPTAX_GLOBAL,
        update_step.GLOBAL,
        "optaxclip adaptive_clip(window=1000)",
        "optaxclip zscore_clip",
        update_step.OPTAX_CLIP,
        update_step.VALUE,
    ]
    for mode, ls in (("single", "-"), (f"vmap{STATES}", ":")):
        f32 = [r for r in update_rows if r["dtype"] == "float32" and r["mode"] == mode]
        for i, name in enumerate(shown):
            rows = sorted((r for r in f32 if r["variant"] == name), key=lambda r: r["params"])
            if rows:
                ax_u.plot(
                    [r["params"] for r in rows],
                    [r["median_ms"] for r in rows],
                    ls=ls,
                    marker="o",
                    color=f"C{i}",
                    label=f"{name} ({mode})",
                )
    ax_u.set(xscale="log", yscale="log", xlabel="float32 parameters (per state)", ylabel="step ms (median)")
    ax_u.set_title("Update step: clip chained before adam")
    ax_u.legend(fontsize=6)
    for hidden, ls in zip(sorted({r["hidden"] for r in dp_rows}), ("-", "--", ":", "-."), strict=False):
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
    if dp_rows:
        ax_d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def _configs(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in c.split("x")) for c in text.split(",") if c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", choices=sorted(PLANS), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --plan quick")
    ap.add_argument("--sizes", type=_floats, help="float32 sizes, e.g. 1.1e6,1.1e7 (overrides the plan)")
    ap.add_argument("--bf16-sizes", type=_floats, help="bfloat16 sizes ('' for none)")
    ap.add_argument("--vmap-sizes", type=_floats, help=f"sizes also timed vmapped over {STATES} states")
    ap.add_argument("--dp", type=_configs, help="DP configs HIDDENxBATCH,... ('' for none)")
    ap.add_argument("--repeats", type=int, help="timing repeats of every part (overrides the plan)")
    ap.add_argument("--inner", type=int, help="calls per timed repeat (overrides the plan)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", help="file stem under --out (default: bench, bench-quick or bench-gpu)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--budget-s", type=float, help="skip the parts not started within this many seconds")
    ap.add_argument(
        "--clock",
        choices=sorted(_timing.CLOCKS),
        default="wall",
        help="time each step by the wall clock (default) or by this process's CPU seconds (steadier on a "
        "machine other jobs share; CPU only)",
    )
    args = ap.parse_args(argv)
    _timing.set_clock(args.clock)
    plan_name = "quick" if args.quick else args.plan
    plan = dict(PLANS[plan_name])
    for key, value in (
        ("f32_sizes", args.sizes),
        ("bf16_sizes", args.bf16_sizes),
        ("vmap_sizes", args.vmap_sizes),
        ("dp", args.dp),
    ):
        if value is not None:
            plan[key] = value
    for key in ("update", "vmap_timing", "dp_timing"):
        repeats, inner = plan[key]
        plan[key] = (args.repeats or repeats, args.inner or inner)
    name = args.name or {"full": "bench", "quick": "bench-quick", "gpu": "bench-gpu"}[plan_name]

    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    update_rows, dp_rows, skipped, part_s = [], [], [], {}

    def write(final: bool):
        """Writes the JSON and Markdown of what has run (after every part, so a timeout keeps them)."""
        checks, reported = update_step.targets(update_rows)
        if dp_rows:
            import dp_step

            checks += dp_step.targets(dp_rows)
        meta = {
            "plan": plan_name,
            "settings": plan,
            "complete": final and not skipped,
            "skipped": skipped,
            "part_s": part_s,
            "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPU cores, "
            f"{len(jax.devices())} {jax.devices()[0].platform} device(s)",
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "jax_privacy": _version("jax_privacy"),
            "wall_s": time.perf_counter() - t0,
            "clock": _timing.clock,
        }
        text = markdown(meta, update_rows, dp_rows, checks, reported)
        (out / f"{name}.md").write_text(text)
        record = {
            **meta,
            "update": update_rows,
            "dp": dp_rows,
            "targets": [{"pass": bool(ok), "check": c} for ok, c in checks],
            "reported": reported,
        }
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        return text, meta

    parts = []
    for dtype, sizes in ((jnp.float32, plan["f32_sizes"]), (jnp.bfloat16, plan["bf16_sizes"])):
        for size in sizes:
            parts.append((f"update step, {jnp.dtype(dtype).name}, {size:.2g} params", size, dtype, 0))
            if size in plan["vmap_sizes"]:
                label = f"update step, {jnp.dtype(dtype).name}, {size:.2g} params, vmap{STATES}"
                parts.append((label, size, dtype, STATES))
    parts += [(f"DP step, hidden {h}, batch {b}", h, b, None) for h, b in plan["dp"]]
    if plan["dp"]:  # the Dense-over-sequence model of the fast DP path's target
        parts.append(("DP step, Dense-over-sequence model", None, None, "dense"))
    for label, a, b, states in parts:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            print(f"{label}: skipped (past the {args.budget_s:.0f} s budget)", flush=True)
            skipped.append(label)
            continue
        print(f"{label} ...", flush=True)
        t_part = time.perf_counter()
        if states in (None, "dense"):
            import dp_step

            if states == "dense":
                dp_rows += dp_step.bench_dense(*plan["dp_timing"])
            else:
                dp_rows += dp_step.bench(a, b, *plan["dp_timing"])
        else:
            timing = plan["vmap_timing"] if states else plan["update"]
            update_rows += update_step.bench(a, b, *timing, states=states)
        part_s[label] = round(time.perf_counter() - t_part, 1)
        print(f"{label}: {part_s[label]:.0f} s", flush=True)
        write(final=False)
    text, meta = write(final=True)
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no plot.")
        else:
            plot(update_rows, dp_rows, out / f"{name}_scaling.png")
    print(text)
    print(f"Wrote {out / name}.json and .md ({meta['wall_s']:.0f} s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
