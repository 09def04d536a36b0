"""The demo's pipeline end to end at tiny sizes (examples/lstm_exploding.py)."""

import csv
import importlib.util
import math
import pathlib

import pytest

from optaxclip.__main__ import main as cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("flax")
pytest.importorskip("matplotlib")


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_writes_csv_png_table_and_diagnosis(tmp_path, capsys):
    demo = load("lstm_exploding")
    out = tmp_path / "demo"
    args = [
        "--steps",
        "15",
        "--hidden",
        "8",
        "--seq-len",
        "8",
        "--batch",
        "4",
        "--lr-warmup",
        "5",
        "--configs",
        "none,global_norm,agc,adaptive",
        "--out",
        str(out),
        "--no-progress",
    ]
    runs = demo.main(args)
    text = capsys.readouterr().out
    assert [r["name"] for r in runs] == ["none", "global_norm", "agc", "adaptive"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 15
    assert set(rows[0]) == {"config", "step", "loss", "pre_clip_norm", "threshold", "clipped"}
    none = [float(r["threshold"]) for r in rows if r["config"] == "none"]
    assert all(math.isinf(t) for t in none)  # the unclipped run never clips
    assert all(math.isfinite(float(r["pre_clip_norm"])) for r in rows)
    assert (out / "lstm_exploding.png").stat().st_size > 20_000
    assert "final loss" in text and "clip rate" in text and "[global_norm]" in text
    assert cli(["diagnose", str(out / "metrics.csv")]) == 0
    assert "[adaptive] 15 steps of 'pre_clip_norm'" in capsys.readouterr().out


def test_demo_default_task_spikes_unclipped_and_trains_clipped():
    """The real default settings (seed 0, 300 steps, five configurations: about 50 s).

    Seed 0 measured: the unclipped loss rose 25 nats above its best and ended
    at 3.83; the clipped runs rose at most 4.7 nats and ended at 1.49-1.64.
    `benchmarks/demo_seeds.py` records the same task over seven seeds.
    """
    demo = load("lstm_exploding")
    args = demo.parse_args(["--no-progress"])
    data = demo.stdlib_corpus()
    # Five of the configurations (agc, adagc and layer_value run in the other demo tests and
    # demo_seeds.py); each is ~10 s.
    names = ("none", "global_norm", "value", "adaptive", "zscore")
    runs = {name: demo.train(name, demo.CONFIGS[name](), args, data, progress=False) for name in names}
    none = runs.pop("none")
    assert none["first_nonfinite"] is not None or none["max_rise"] > 10.0, none["max_rise"]
    for name, r in runs.items():
        assert r["first_nonfinite"] is None, name
        assert r["max_rise"] < 6.0 and r["final_loss"] < 2.0, (name, r["max_rise"], r["final_loss"])
        assert r["clip_rate"] > 0, name  # the clip did fire
    worst = max(r["final_loss"] for r in runs.values())
    assert not math.isfinite(none["final_loss"]) or none["final_loss"] > 1.5 * worst, (
        none["final_loss"],
        worst,
    )


def read_tensorboard_scalars(folder):
    """`{tag: [(step, value)]}` from the TFRecord event files in `folder`, parsed by hand."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_demo_tensorboard_event_files_hold_the_metrics(tmp_path):
    """`--tensorboard DIR`: one run folder per config; every `optaxclip.metrics` key per step."""
    pytest.importorskip("tensorboardX")
    demo = load("lstm_exploding")
    tb = tmp_path / "tb"
    argv = ["--steps", "4", "--hidden", "8", "--seq-len", "8", "--batch", "4", "--lr-warmup", "2"]
    argv += ["--configs", "adagc,layer_value", "--out", str(tmp_path / "demo"), "--no-progress"]
    runs = demo.main(argv + ["--tensorboard", str(tb)])
    adagc = read_tensorboard_scalars(tb / "adagc")
    tags = ("loss", "clip/pre_clip_norm", "clip/threshold", "clip/clip_count", "clip/clipped_tensor_count")
    for tag in tags:
        assert [s for s, _ in adagc[tag]] == [0, 1, 2, 3], tag
    logged = [v for _, v in adagc["clip/pre_clip_norm"]]
    expected = [r["pre_clip_norm"] for r in runs[0]["rows"]]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert [v for _, v in adagc["loss"]] == pytest.approx([r["loss"] for r in runs[0]["rows"]], rel=1e-6)
    layer = read_tensorboard_scalars(tb / "layer_value")
    assert [v for _, v in layer["clip/threshold"]] == pytest.approx([0.1] * 4)  # the head's bound
    assert runs[1]["clip_rate"] > 0  # the per-layer bounds fire on this tiny model too


def test_demo_layer_value_bounds():
    import jax
    from flax import nnx

    demo = load("lstm_exploding")
    params = nnx.split(demo.CharLSTM(8, rngs=nnx.Rngs(0)), nnx.Param, ...)[1]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    bounds = {}
    for path, leaf in leaves:
        bounds.setdefault(path[0].key, set()).add(demo.layer_value_bound(path, leaf))
    assert bounds == {"embed": {0.01}, "rnn": {0.01}, "head": {0.1}}
    recipe = {path[0].key: demo.layer_value_bound(path, leaf, scale=1.0) for path, leaf in leaves}
    assert recipe == {"embed": 10.0, "rnn": 10.0, "head": 100.0}  # the recipe's own numbers


def test_demo_rejects_unknown_config():
    demo = load("lstm_exploding")
    with pytest.raises(SystemExit):
        demo.parse_args(["--configs", "none,bogus"])


def test_toy_demo_clipped_run_survives_the_bad_batch(capsys):
    load("toy_clipping").main()
    lines = capsys.readouterr().out.splitlines()
    none = next(line for line in lines if line.startswith("no clipping")).split()
    clipped = next(line for line in lines if line.startswith("clip_by_global_norm")).split()
    assert float(none[-3]) > 1e5 and float(clipped[-3]) < 1.0  # loss right after the bad batch


@pytest.mark.parametrize("adaptive", [False, True])
def test_dp_example_reports_epsilon_next_to_a_non_private_run(capsys, adaptive):
    pytest.importorskip("dp_accounting")
    from optaxclip import privacy

    dp = load("dp_lstm")
    argv = ["--steps", "3", "--batch", "8", "--microbatch", "4", "--seq-len", "8", "--hidden", "8"]
    # The adaptive count query needs noise_multiplier < 2 * batch / 20 (0.8 here): a looser target.
    target = 4.0 if adaptive else 1.0
    argv += ["--train-examples", "200", "--epsilon", str(target), "--no-progress"] + (
        ["--adaptive"] if adaptive else []
    )
    runs = dp.main(argv)
    text = capsys.readouterr().out
    assert [r["name"] for r in runs] == ["non-private", "DP-SGD"]
    assert all(math.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in runs)
    nm = float(text.split("noise multiplier ")[1].split()[0])
    # The run's epsilon accounts for the sampler's truncation to the padded batch (24 of 200).
    truncated = {"truncated_batch_size": dp.padded_size(dp.parse_args(argv)), "num_examples": 200}
    expected = (
        privacy.adaptive_epsilon(nm, 0.04, 3, 1e-5, 8, **truncated)
        if adaptive
        else privacy.epsilon(nm, 0.04, 3, 1e-5, **truncated)
    )
    # (nm is read back rounded to 3 digits, hence the tolerance.)
    assert runs[1]["epsilon"] == pytest.approx(expected, rel=1e-2) and runs[1]["epsilon"] <= target * 1.01
    assert f"epsilon = {runs[1]['epsilon']:.3f}" in text
    # The fast (ghost) path is the default, and its speed is printed next to the vmap path's.
    assert "DP-SGD (ghost path)" in text and "this run used the ghost path" in text
    ms = runs[1]["clipped_sum_ms"]
    assert ms["ghost"] > 0 and ms["vmap"] > 0
    assert f"ghost path {ms['ghost']:.1f} ms, vmap path {ms['vmap']:.1f} ms" in text


def test_nnx_optimizer_example_logs_each_steps_own_metrics(capsys):
    rows = load("nnx_optimizer").main(["--steps", "30", "--bad-step", "20", "--hidden", "8", "--every", "10"])
    text = capsys.readouterr().out
    assert len(rows) == 30 and "quantile_estimate" in rows[0] and "history_index" not in rows[0]
    # Each row is its own step's metrics (not the last step's, as live NNX references would be).
    assert [int(r["step_count"]) for r in rows] == list(range(1, 31))
    assert len({r["pre_clip_norm"] for r in rows}) == 30
    bad = rows[20]
    assert bad["clipped"] == 1.0 and bad["pre_clip_norm"] > 100 * bad["threshold"]
    assert int(rows[-1]["clip_count"]) >= 1 and math.isfinite(rows[-1]["loss"])
    assert "quantile_estimate" in text and "was clipped to" in text


def test_dp_frameworks_example_runs_the_same_dp_loop_on_each_framework(capsys):
    """examples/dp_frameworks.py at tiny sizes: an NNX transformer, a Linen and an Equinox LSTM."""
    pytest.importorskip("dp_accounting")
    pytest.importorskip("equinox")
    from optaxclip import privacy

    ex = load("dp_frameworks")
    argv = ["--steps", "3", "--batch", "4", "--seq-len", "6", "--width", "16", "--heads", "2"]
    argv += ["--blocks", "1", "--hidden", "8", "--train-examples", "100", "--reps", "1"]
    runs = ex.main(argv)
    text = capsys.readouterr().out
    assert [r["model"] for r in runs] == ["nnx_transformer", "linen_lstm", "equinox_lstm"]
    for r in runs:
        assert sum(r["paths"].values()) == r["leaves"] > 0, r  # .paths() names every leaf once
        assert all(ms > 0 for ms in r["ms"].values()) and set(r["ms"]) == {"ghost", "vmap", "non-private"}
        assert all(math.isfinite(v) for v in r["test_loss"]), r
        p = r["paths"]
        assert (
            f"{r['leaves']}: {p['ghost']} / {p['materialised']} / {p['per-example']}" in text
            and f"{r['ms']['ghost']:>19.1f}" in text
        )
    # Accounted with the truncation to the padded batch (20 of 100), which at 5 sigma above the
    # expected batch moves epsilon by 4e-7 relative (the untruncated PLD epsilon: 0.4 s, not 3 s).
    expected = privacy.epsilon(1.0, 4 / 100, 3, 1e-5)
    assert runs[0]["epsilon"] == pytest.approx(expected, rel=1e-5)
    assert f"epsilon = {runs[0]['epsilon']:.3f}" in text and "truncated to 20" in text
    with pytest.raises(SystemExit):
        ex.parse_args(["--models", "nnx_transformer,haiku"])
