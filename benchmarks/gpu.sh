#!/usr/bin/env bash
# The benchmarks on a CUDA GPU, within 8 minutes, with no network.
#
# For a machine where jax (with CUDA) and optax are already installed, and,
# for the DP step and the demo, flax, jax_privacy, tqdm and matplotlib: a
# part whose imports are missing is skipped and says so. Not run by
# `make test`. From the repository root:
#
#   bash benchmarks/gpu.sh [OUT_DIR] [extra benchmarks/run.py flags...]
#
# OUT_DIR (default benchmarks/results/gpu) gets:
#   update.{json,md}   the update-step targets at GPU sizes (up to 1e8 parameters), one state and vmapped
#   dp.{json,md}       the DP-SGD step (Flax LSTM) against jax_privacy
#   dp_sharded.{json,md} the DP step (ghost_clipped_grad_sum + dp_aggregate + adam) on params sharded
#                      P('data', None) over every GPU: time, temp per device, collectives (issue 29)
#   demo/              the demo's metrics.csv and plot; demo.log its printed summary
#   gpu.{json,md}      the machine, each part's status and wall time, and the two tables
#   *.log              each part's output
# Extra flags go to both benchmark runs (the update run ignores --dp, the DP run the sizes), e.g. a
# tiny CPU check of the entry points:
#   DP_SHARDED_FLAGS="--width 256 --layers 2 --batch 32 --repeats 2 --inner 1" \
#   bash benchmarks/gpu.sh /tmp/gpu-check --sizes 3e4 --bf16-sizes= --vmap-sizes=3e4 --dp=16x16 --repeats 2 --inner 1
# DP_SHARDED_FLAGS (default: ~67M params, width 4096 x 4 layers, batch 64) go to dp_sharded.py only.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
shift $(($# > 0 ? 1 : 0))
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}  # all parts together stay under 8 minutes
mkdir -p "$OUT"
start=$SECONDS
status_file="$OUT/status.tsv"
: >"$status_file"

left() { echo $((TOTAL_S - (SECONDS - start))); }

# run NAME BUDGET_S CMD...: runs CMD with a timeout of min(BUDGET_S, time left), logs to NAME.log.
run() {
    local name=$1 budget=$2
    shift 2
    local limit
    limit=$(left)
    ((budget < limit)) && limit=$budget
    if ((limit < 10)); then
        printf '%s\tskipped (no time left)\t0\n' "$name" >>"$status_file"
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (up to ${limit} s): $*"
    local t0=$SECONDS rc=0
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local what="ok"
    ((rc == 124 || rc == 137)) && what="timed out after ${limit} s"
    ((rc != 0 && rc != 124 && rc != 137)) && what="failed (exit $rc, see $name.log)"
    printf '%s\t%s\t%s\n' "$name" "$what" $((SECONDS - t0)) >>"$status_file"
    tail -n 3 "$OUT/$name.log"
    echo "== $name: $what"
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

# 1. optaxclip itself, without dependencies and without build isolation (no network). If pip cannot
#    build it (pyproject.toml's license string needs setuptools >= 77), a .pth file in site-packages
#    points at this checkout instead (the same effect as an editable install).
run install 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
if ! (cd / && "$PY" -c "import optaxclip") >/dev/null 2>&1; then
    "$PY" - "$PWD" <<'EOF' | tee -a "$OUT/install.log"
import os, site, sys

for d in [*site.getsitepackages(), site.getusersitepackages()]:
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "optaxclip-checkout.pth"), "w") as f:
            f.write(sys.argv[1] + "\n")
        print(f"pip could not install optaxclip: {d}/optaxclip-checkout.pth points at {sys.argv[1]}")
        break
    except OSError:
        continue
EOF
    if (cd / && "$PY" -c "import optaxclip") >/dev/null 2>&1; then
        printf 'install (.pth fallback)\tok\t0\n' >>"$status_file"
    else
        printf 'install (.pth fallback)\tfailed (running from the checkout)\t0\n' >>"$status_file"
    fi
fi
(cd / && "$PY" -c "import optaxclip; print('optaxclip', optaxclip.__version__, 'from', optaxclip.__file__)") |
    tee -a "$OUT/install.log"
"$PY" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.log"

# 2. The update step at GPU sizes (plan `gpu` in benchmarks/run.py). run.py writes its files after
#    every part and starts no part after --budget-s, so a slow machine still leaves results.
if have optax; then
    run update 200 "$PY" benchmarks/run.py --plan gpu --out "$OUT" --name update --budget-s 140 "$@" --dp=
else
    printf 'update\tskipped (optax missing)\t0\n' >>"$status_file"
fi

# 3. The DP step (needs flax and jax_privacy).
if have flax && have jax_privacy; then
    run dp 110 "$PY" benchmarks/run.py --plan gpu --out "$OUT" --name dp --budget-s 55 "$@" \
        --sizes= --bf16-sizes= --vmap-sizes=
else
    printf 'dp\tskipped (flax or jax_privacy missing)\t0\n' >>"$status_file"
fi

# 3b. The DP step on FSDP-sharded params over every device (optax and optaxclip only).
# shellcheck disable=SC2086  # the flags are meant to split
run dp_sharded 60 "$PY" benchmarks/dp_sharded.py --out "$OUT" \
    ${DP_SHARDED_FLAGS:---width 4096 --layers 4 --batch 64 --repeats 5 --inner 2}

# 4. The demo (needs flax, tqdm, matplotlib): unclipped vs clipped LSTM training.
if have flax && have tqdm && have matplotlib; then
    run demo 90 "$PY" examples/lstm_exploding.py --no-progress --out "$OUT/demo"
else
    printf 'demo\tskipped (flax, tqdm or matplotlib missing)\t0\n' >>"$status_file"
fi

# 5. One summary, JSON and Markdown.
"$PY" - "$OUT" $((SECONDS - start)) <<'EOF'
import json, pathlib, platform, subprocess, sys

out, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2])
parts = []
for line in (out / "status.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    parts.append({"part": name, "status": status, "wall_s": int(seconds)})
try:
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20,
    ).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = "nvidia-smi not available"
devices = (out / "devices.log").read_text().strip() if (out / "devices.log").exists() else "?"
record = {"machine": platform.platform(), "gpu": gpu, "devices": devices, "wall_s": wall, "parts": parts}
md = [f"GPU run: {gpu}; {devices}; {wall} s in all.", "", "| part | status | wall s |", "| --- | --- | --- |"]
md += [f"| {p['part']} | {p['status']} | {p['wall_s']} |" for p in parts]
for name in ("update", "dp"):
    f = out / f"{name}.json"
    if f.exists():
        data = json.loads(f.read_text())
        record[name] = {k: data[k] for k in ("targets", "reported", "skipped", "complete", "device", "jax")}
        md += ["", f"## {name}", "", (out / f"{name}.md").read_text()]
f = out / "dp_sharded.json"
if f.exists():
    record["dp_sharded"] = json.loads(f.read_text())
    md += ["", "## dp_sharded", "", (out / "dp_sharded.md").read_text()]
demo = out / "demo.log"
if demo.exists():
    md += ["", "## demo", "", "```", *demo.read_text().splitlines()[-40:], "```"]
(out / "gpu.json").write_text(json.dumps(record, indent=1) + "\n")
(out / "gpu.md").write_text("\n".join(md) + "\n")
print(f"Wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({wall} s).")
EOF
