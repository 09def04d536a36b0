"""Tests for optaxclip._diagnose and the `python -m optaxclip diagnose` command line."""

import csv

import numpy as np
import pytest

import optaxclip
from optaxclip.__main__ import main as cli


def codes(findings):
    return [f.code for f in findings]


def steady(n=200, seed=0):
    return np.random.default_rng(seed).lognormal(0.0, 0.1, n)


def test_nonfinite_rule():
    norms = steady(50)
    norms[[10, 30]] = [np.nan, np.inf]
    (f,) = [f for f in optaxclip.diagnose(norms) if f.code == "nonfinite"]
    assert f.severity == "error" and f.steps == (10, 30)
    assert "loss scaling" in f.action and "apply_if_finite" in f.action


def test_clip_rate_rules():
    norms = steady()
    high = optaxclip.diagnose(norms, thresholds=np.full(200, 0.5))
    assert codes(high)[0] == "clip_rate_high" and "100%" in high[0].message
    assert "raise the threshold" in high[0].action and "lower the learning rate" in high[0].action
    low = optaxclip.diagnose(norms, thresholds=np.full(200, 100.0))
    assert "clip_rate_low" in codes(low)
    few = optaxclip.diagnose(norms[:50], thresholds=np.full(50, 100.0))  # < 100 steps: no verdict
    assert "clip_rate_low" not in codes(few)
    none = optaxclip.diagnose(norms, thresholds=np.full(200, np.inf), clipped=np.zeros(200))
    assert codes(none) == ["ok"]  # no threshold in effect: no clip-rate finding
    flags = optaxclip.diagnose(norms, clipped=np.arange(200) % 3 != 0)
    assert "clip_rate_high" in codes(flags)


def test_spike_rule():
    norms = steady()
    norms[150] *= 3.5
    norms[20] *= 2.5  # below 3x: not a spike
    (f,) = [f for f in optaxclip.diagnose(norms) if f.code == "spikes"]
    assert f.steps == (150,)
    np.testing.assert_array_equal(optaxclip.spike_steps(norms), [150])


def test_vanishing_rule():
    norms = np.concatenate([steady(100), steady(100) * 1e-7])
    (f,) = [f for f in optaxclip.diagnose(norms) if f.code == "vanishing"]
    assert "initialization" in f.cause and "residual" in f.cause
    assert "vanishing" not in codes(optaxclip.diagnose(steady()))


def test_loss_rules():
    norms = steady(100)
    loss = np.linspace(3, 1, 100)
    assert codes(optaxclip.diagnose(norms, losses=loss)) == ["ok"]
    diverging = np.concatenate([np.linspace(3, 1, 50), np.linspace(1, 8, 50)])
    assert "loss_diverging" in codes(optaxclip.diagnose(norms, losses=diverging))
    loss[70] = np.nan
    assert codes(optaxclip.diagnose(norms, losses=loss))[0] == "loss_nonfinite"


@pytest.mark.parametrize("seed", range(5))
def test_loss_diverging_judges_smoothed_losses(seed):
    rng = np.random.default_rng(seed)
    norms = steady(400, seed)
    flat = 3.0 + 0.4 * rng.standard_normal(400)  # healthy noise: its raw minimum is far below 2
    assert np.min(flat) < 2.0 and "loss_diverging" not in codes(optaxclip.diagnose(norms, losses=flat))
    rising = np.concatenate([np.linspace(3, 1, 200), np.linspace(1, 6, 200)]) + 0.4 * rng.standard_normal(400)
    (f,) = [f for f in optaxclip.diagnose(norms, losses=rising) if f.code == "loss_diverging"]
    end, best = (float(w) for w in f.message.rstrip(".").split("ended at ")[1].split(", far above its best "))
    assert 5.0 < end < 6.2 and 0.7 < best < 1.3 and "mean over 20 steps" in f.message
    # As the demo's unclipped run: a spike, then stuck well above the best it had reached.
    stuck = np.concatenate([np.linspace(4.8, 2.6, 100), np.full(20, 14.0), np.full(180, 3.8)])
    stuck += 0.3 * rng.standard_normal(300)
    assert "loss_diverging" in codes(optaxclip.diagnose(steady(300, seed), losses=stuck))
    ended_near_best = np.concatenate([np.linspace(3, 1.5, 300), np.full(100, 1.55)])
    ended_near_best += 0.1 * rng.standard_normal(400)
    assert "loss_diverging" not in codes(optaxclip.diagnose(norms, losses=ended_near_best))


def test_ok_gives_suggested_threshold():
    (f,) = optaxclip.diagnose(steady())
    assert f.code == "ok" and f.severity == "info"
    assert f"{optaxclip.suggest_threshold(steady()):.3g}" in f.action


def test_suggest_threshold_excludes_spikes_and_nonfinite():
    norms = steady(300)
    with_junk = norms.copy()
    with_junk[[100, 200]] = [1e6, np.nan]
    expected = np.quantile(np.delete(norms, [100, 200]), 0.95)
    assert optaxclip.suggest_threshold(with_junk) == pytest.approx(expected)
    assert optaxclip.suggest_threshold(norms, quantile=0.5) == pytest.approx(np.median(norms))


def test_bad_input():
    with pytest.raises(ValueError, match="`norms` is empty"):
        optaxclip.diagnose([])
    with pytest.raises(ValueError, match="`thresholds` must have one value per step"):
        optaxclip.diagnose([1.0, 2.0], thresholds=[1.0])
    with pytest.raises(TypeError, match=r"diagnose: `norms` must be a 1-D sequence of real numbers.*'a'"):
        optaxclip.diagnose(["a", "b"])
    with pytest.raises(ValueError, match="quantile=1.5"):
        optaxclip.suggest_threshold([1.0], quantile=1.5)
    with pytest.raises(ValueError, match="no finite"):
        optaxclip.suggest_threshold([np.nan, np.inf])


# --- command line ------------------------------------------------------------------------


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_cli_diagnoses_each_config_and_plots(tmp_path, capsys):
    norms = steady(120)
    norms[90] *= 10
    rows = [("a", i, n, 1.0, 0.5, int(n > 1.0)) for i, n in enumerate(norms)]
    rows += [("b", i, n, np.inf, 0.5, 0) for i, n in enumerate(steady(120, 1))]
    path = write_csv(
        tmp_path / "m.csv",
        ["config", "step", "pre_clip_norm", "threshold", "loss", "clipped"],
        rows,
    )
    png = tmp_path / "out.png"
    assert cli(["diagnose", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "[a] 120 steps" in out and "[b] 120 steps" in out
    assert "spikes" in out and "steps: 90" in out
    assert png.stat().st_size > 10_000


def _captured_figure(monkeypatch, argv):
    """Runs the command line; returns the lines of the figure it saved, by label."""
    figure = pytest.importorskip("matplotlib.figure")
    saved, save = [], figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        saved.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(figure.Figure, "savefig", savefig)
    assert cli(argv) == 0
    (fig,) = saved
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_cli_plot_draws_the_threshold_column_and_clipped_steps(tmp_path, monkeypatch):
    norms = steady(120)
    rows = [("fixed", i, n, 1.0, int(n > 1.0)) for i, n in enumerate(norms)]
    rows += [("none", i, n, np.inf, 0) for i, n in enumerate(norms)]
    path = write_csv(tmp_path / "m.csv", ["config", "step", "pre_clip_norm", "threshold", "clipped"], rows)
    lines = _captured_figure(monkeypatch, ["diagnose", str(path), "--plot", str(tmp_path / "p.png")])
    np.testing.assert_array_equal(lines["fixed: threshold"].get_ydata(), np.ones(120))
    hits = np.flatnonzero(norms > 1.0)
    (clipped,) = [v for k, v in lines.items() if k.startswith("fixed: clipped")]
    np.testing.assert_array_equal(clipped.get_xdata(), hits)
    np.testing.assert_allclose(clipped.get_ydata(), norms[hits])
    assert f"({hits.size} of 120 steps)" in clipped.get_label()
    # The unclipped run: no threshold to draw, no clipped step (only its suggested threshold).
    assert [k for k in lines if k.startswith("none: ")] == [
        f"none: suggested threshold {optaxclip.suggest_threshold(norms):.3g}"
    ]


def test_cli_plot_shows_how_an_adaptive_threshold_moved(tmp_path, monkeypatch):
    norms = steady(60)
    thresholds = np.r_[np.full(10, np.inf), np.linspace(1.2, 0.9, 50)]  # warm-up: no threshold yet
    path = write_csv(
        tmp_path / "a.csv", ["grad_norm", "threshold"], list(zip(norms, thresholds, strict=True))
    )
    lines = _captured_figure(monkeypatch, ["diagnose", str(path), "--plot", str(tmp_path / "a.png")])
    drawn = lines["grad_norm: threshold"].get_ydata()
    assert np.all(np.isnan(drawn[:10])) and lines["grad_norm: threshold"].get_drawstyle() == "steps-post"
    np.testing.assert_allclose(drawn[10:], thresholds[10:])
    (clipped,) = [
        v for k, v in lines.items() if k.startswith("grad_norm: clipped")
    ]  # no column: norm > threshold
    np.testing.assert_array_equal(clipped.get_xdata(), np.flatnonzero(norms > thresholds))


def test_cli_any_norm_column_and_explicit_column(tmp_path, capsys):
    path = write_csv(tmp_path / "g.csv", ["grad_norm", "other"], [(x, 1) for x in steady(30)])
    assert cli(["diagnose", str(path)]) == 0
    assert "30 steps of 'grad_norm'" in capsys.readouterr().out
    assert cli(["diagnose", str(path), "--column", "other"]) == 0


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (["step", "loss"], [(0, 1.0)], "no norm column"),
        (["norm"], [], "no data rows"),
        (["norm"], [("1.0",), ("abc",)], "line 3: column 'norm' is not a number: 'abc'"),
    ],
)
def test_cli_clear_errors(tmp_path, capsys, header, rows, message):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    assert cli(["diagnose", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_file_and_unknown_column(tmp_path, capsys):
    assert cli(["diagnose", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = write_csv(tmp_path / "n.csv", ["norm"], [(1.0,)])
    assert cli(["diagnose", str(path), "--column", "zzz"]) == 2
    assert "no column 'zzz'" in capsys.readouterr().err


# --- advice: guard_clip first, and none to add clipping to a clipped run (issue 28) ----------

TRANSFORM_NAMES = (
    "guard_clip",
    "adaptive_clip",
    "zscore_clip",
    "adagc_clip",
    "clip_by_global_norm",
    "clip_by_value",
    "adaptive_grad_clip",
    "skip_spikes",
)
ADD_CLIPPING = ("clip with", "clip the gradients", "clip (", "add clipping")


def troubled_run(n=200):
    """Norms with two spikes, a loss that diverges and is NaN once: every finding that advises a clip."""
    norms = steady(n)
    norms[[120, 160]] *= 20
    rng = np.random.default_rng(3)
    losses = np.concatenate([np.linspace(3, 1, n // 2), np.linspace(1, 6, n - n // 2)])
    losses += 0.05 * rng.standard_normal(n)
    losses[150] = np.nan
    return norms, losses


def first_transform(text):
    found = [(text.find(t), t) for t in TRANSFORM_NAMES if t in text]
    return min(found)[1] if found else None


def test_unclipped_run_is_advised_guard_clip_first():
    norms, losses = troubled_run()
    findings = optaxclip.diagnose(norms, losses=losses)
    assert {"spikes", "loss_diverging", "loss_nonfinite"} <= set(codes(findings))
    for f in findings:
        if f.code in ("spikes", "loss_diverging", "loss_nonfinite"):
            assert f.action.startswith("clip with guard_clip()"), (f.code, f.action)
    (ok,) = optaxclip.diagnose(steady())
    assert first_transform(ok.action) == "guard_clip" and "clip with guard_clip()" in ok.action
    # Every finding that names a transform names guard_clip first.
    for f in findings:
        assert first_transform(f.action) in (None, "guard_clip", "skip_spikes"), f.action
        if f.code != "nonfinite" and first_transform(f.action):
            assert first_transform(f.action) == "guard_clip", f.action


@pytest.mark.parametrize("given", ["thresholds", "clipped"])
def test_clipped_run_is_not_told_to_add_clipping(given):
    norms, losses = troubled_run()
    thresholds = np.full(norms.shape, 2.0)
    kwargs = {"thresholds": thresholds} if given == "thresholds" else {"clipped": norms > 2.0}
    findings = optaxclip.diagnose(norms, losses=losses, **kwargs)
    assert {"spikes", "loss_diverging", "loss_nonfinite"} <= set(codes(findings))
    for f in findings:
        assert not any(phrase in f.action for phrase in ADD_CLIPPING), (f.code, f.action)
    (spikes,) = [f for f in findings if f.code == "spikes"]
    assert "bounded every one" in spikes.message and spikes.severity == "info"
    assert spikes.steps == (120, 160)
    (ok,) = optaxclip.diagnose(steady(60), thresholds=np.full(60, 2.0))  # < 100 steps: no rate verdict
    assert "guard_clip" not in ok.action and "threshold near the top" in ok.action


def test_spikes_that_passed_the_threshold_are_named():
    norms, _ = troubled_run()
    thresholds = np.full(norms.shape, 2.0)
    thresholds[160] = 1e3  # an adaptive threshold that had risen: this spike got through
    (f,) = [f for f in optaxclip.diagnose(norms, thresholds=thresholds) if f.code == "spikes"]
    assert f.steps == (160,) and f.severity == "warning"
    assert "let 1 of them through" in f.message and f"norm {norms[160]:.3g}, threshold 1e+03" in f.message
    assert "lower it" in f.action and "guard_clip()" in f.action
    assert not any(phrase in f.action for phrase in ADD_CLIPPING)


def test_threshold_that_rose_with_the_norms_is_called_out():
    norms, losses = troubled_run()
    losses[150] = 1.0
    rising = np.geomspace(1.0, 8.0, norms.size)  # history-based: followed the norms up
    (f,) = [f for f in optaxclip.diagnose(norms, rising, losses) if f.code == "loss_diverging"]
    assert "rose from 1 to 8" in f.message and f.action.startswith("switch to guard_clip()")
    flat = np.full(norms.size, 2.0)
    (g,) = [f for f in optaxclip.diagnose(norms, flat, losses) if f.code == "loss_diverging"]
    assert "rose" not in g.message and "lower the learning rate" in g.action
    assert not any(phrase in g.action for phrase in ADD_CLIPPING)


def test_cli_advice_follows_the_csv(tmp_path, capsys):
    norms, losses = troubled_run()
    rows = [("plain", i, n, np.inf, loss) for i, (n, loss) in enumerate(zip(norms, losses, strict=True))]
    rows += [("clipped", i, n, 2.0, loss) for i, (n, loss) in enumerate(zip(norms, losses, strict=True))]
    path = write_csv(tmp_path / "m.csv", ["config", "step", "pre_clip_norm", "threshold", "loss"], rows)
    assert cli(["diagnose", str(path)]) == 0
    plain, clipped = capsys.readouterr().out.split("[clipped]")
    assert "action: clip with guard_clip()" in plain
    assert not any(phrase in clipped for phrase in ADD_CLIPPING)


# --- the plot: its folder is made, its legend stays off the curves -----------------------------


def test_cli_plot_makes_missing_folders(tmp_path, capsys):
    path = write_csv(tmp_path / "m.csv", ["norm"], [(x,) for x in steady(30)])
    png = tmp_path / "out" / "x" / "y.png"
    assert cli(["diagnose", str(path), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000 and f"Wrote {png}" in capsys.readouterr().out
    blocked = tmp_path / "m.csv" / "y.png"  # a file where the folder should be: a clear error
    assert cli(["diagnose", str(path), "--plot", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the plot to {blocked}" in err and "Traceback" not in err


def test_cli_plot_legend_sits_outside_the_axes(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    rng = np.random.default_rng(0)
    rows = []
    for c in range(9):  # 9 configs, each with a threshold, clipped steps and a suggestion: 36 entries
        for i, n in enumerate(rng.lognormal(0.0, 0.3, 150)):
            rows.append((f"config_{c}_with_a_long_name", i, n, 1.2, int(n > 1.2)))
    path = write_csv(tmp_path / "m.csv", ["config", "step", "pre_clip_norm", "threshold", "clipped"], rows)
    saved, save = [], figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        saved.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(figure.Figure, "savefig", savefig)
    assert cli(["diagnose", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    (fig,) = saved
    canvas = pytest.importorskip("matplotlib.backends.backend_agg").FigureCanvasAgg(fig)  # closed: redraw
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    assert fig.axes[0].get_legend() is None  # not an in-axes legend
    leg, ax, whole = legend.get_window_extent(renderer), fig.axes[0].get_window_extent(renderer), fig.bbox
    assert not leg.overlaps(ax) and leg.x0 >= ax.x1  # to the right of the axes
    assert whole.x0 <= leg.x0 and leg.x1 <= whole.x1 and whole.y0 <= leg.y0 and leg.y1 <= whole.y1
    assert ax.width / fig.dpi > 6.0  # the axes keep their width however many entries
    assert len(legend.get_texts()) == 36
    assert {t.get_text() for t in legend.get_texts()} >= {
        f"config_{c}_with_a_long_name: threshold" for c in range(9)
    }
