"""Command line: `python -m optaxclip diagnose metrics.csv [--plot out.png]`.

Reads a CSV with a column of gradient norms (`pre_clip_norm`, `norm`,
`grad_norm` or `global_norm`; optional `threshold`, `loss`, `clipped`, and a
`config` column to diagnose several runs of one file separately), prints
what `optaxclip.diagnose` finds, and optionally plots the norm history with
the suggested threshold, the CSV's `threshold` column (each step's, so an
adaptive threshold shows how it moved) and the clipped steps.
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys

from ._diagnose import diagnose, format_findings, spike_steps, suggest_threshold

LEGEND_ROWS = 22
AXES_WIDTH = 8.5  # inches of the figure for the axes and their labels; the legend's are added
NORM_COLUMNS = ("pre_clip_norm", "norm", "grad_norm", "global_norm", "gradient_norm")


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _read(path: pathlib.Path, column: str | None) -> tuple[str, dict[str, dict[str, list[float]]]]:
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if column is not None and column not in header:
            raise CliError(f"{path}: no column {column!r}; columns are {header}")
        norm_col = column or next((c for c in NORM_COLUMNS if c in header), None)
        if norm_col is None:
            raise CliError(
                f"{path}: no norm column; expected one of {list(NORM_COLUMNS)} (or pass "
                f"--column), got columns {header}"
            )
        wanted = [c for c in (norm_col, "threshold", "loss", "clipped") if c in header]
        runs: dict[str, dict[str, list[float]]] = {}
        for line, row in enumerate(reader, start=2):
            run = runs.setdefault(row.get("config") or "", {c: [] for c in wanted})
            for c in wanted:
                text = (row.get(c) or "").strip()
                if c == "clipped" and text.lower() in ("true", "false"):
                    text = "1" if text.lower() == "true" else "0"
                try:
                    run[c].append(float(text))
                except ValueError:
                    raise CliError(f"{path}, line {line}: column {c!r} is not a number: {text!r}") from None
    if not runs:
        raise CliError(f"{path}: no data rows")
    return norm_col, runs


def _clipped_steps(cols, norm_col: str) -> list[int]:
    """Steps that clipped: the `clipped` column, else norm > `threshold` (as `diagnose` counts them)."""
    norms = cols[norm_col]
    if "clipped" in cols:
        return [i for i, c in enumerate(cols["clipped"]) if c > 0]
    if "threshold" in cols:
        return [i for i, (n, t) in enumerate(zip(norms, cols["threshold"], strict=True)) if n > t]
    return []


def _figure(runs, norm_col: str):
    """The plot of each run: norms, spikes, the suggested threshold, and, when the CSV has them, the
    threshold column (each step's threshold, so an adaptive one shows how it moved) and the clipped
    steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'optaxclip[examples]'") from None
    # Constrained layout keeps the legend, placed outside the axes on the right, inside the figure.
    fig, ax = plt.subplots(figsize=(AXES_WIDTH, 4.5), layout="constrained")
    for i, (name, cols) in enumerate(runs.items()):
        norms = cols[norm_col]
        color = f"C{i}"
        label = name or norm_col
        ax.plot(range(len(norms)), norms, color=color, lw=1, label=label)
        spikes = spike_steps(norms)
        ax.plot(spikes, [norms[s] for s in spikes], "x", color=color, ms=6)
        thresholds = cols.get("threshold")
        if thresholds is not None and any(math.isfinite(t) for t in thresholds):
            # Non-finite entries (no clipping that step) leave gaps.
            shown = [t if math.isfinite(t) else math.nan for t in thresholds]
            ax.plot(
                range(len(shown)),
                shown,
                color=color,
                ls="-.",
                lw=1.2,
                drawstyle="steps-post",
                label=f"{label}: threshold",
            )
        clipped = _clipped_steps(cols, norm_col)
        if clipped:
            ax.plot(
                clipped,
                [norms[s] for s in clipped],
                "o",
                mfc="none",
                color=color,
                ms=4,
                label=f"{label}: clipped ({len(clipped)} of {len(norms)} steps)",
            )
        try:
            thr = suggest_threshold(norms)
            shown = f"{name}: suggested threshold" if name else "suggested threshold"
            ax.axhline(thr, color=color, ls="--", lw=1, label=f"{shown} {thr:.3g}")
        except ValueError:
            pass
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{norm_col} (x: spikes, o: clipped)")
    # Outside the axes, so that no number of runs covers the curves: one column per 22 entries
    # (what fits beside 4.5 inches of axes at this size), the figure widened by the legend's width
    # so the axes keep theirs.
    handles, labels = ax.get_legend_handles_labels()
    ncol = max(1, math.ceil(len(labels) / LEGEND_ROWS))
    legend = fig.legend(handles, labels, loc="outside right upper", fontsize=8, ncol=ncol)
    width = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi
    fig.set_figwidth(AXES_WIDTH + width)
    return fig


def _plot(runs, norm_col: str, out: pathlib.Path) -> None:
    """Writes the figure to `out`, making its folder; a path that cannot be written is a `CliError`."""
    fig = _figure(runs, norm_col)
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as e:  # a folder in the way, no permission, an unknown image format
        raise CliError(f"cannot write the plot to {out}: {e}") from None
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optaxclip", description="optaxclip tools")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diagnose", help="say what a CSV of gradient norms means")
    d.add_argument("csv", type=pathlib.Path, help="a CSV file with a column of norms")
    d.add_argument("--column", help=f"the norm column (default: first of {list(NORM_COLUMNS)})")
    d.add_argument(
        "--plot",
        type=pathlib.Path,
        help="write a PNG of the norm history (with the thresholds and clipped steps) here; "
        "missing folders are made",
    )
    args = ap.parse_args(argv)
    try:
        norm_col, runs = _read(args.csv, args.column)
        for name, cols in runs.items():
            norms = cols[norm_col]
            if not norms:
                raise CliError(f"{args.csv}: no values in column {norm_col!r}")
            findings = diagnose(
                norms,
                thresholds=cols.get("threshold"),
                losses=cols.get("loss"),
                clipped=cols.get("clipped"),
            )
            title = f"[{name}] " if name else ""
            finite = [x for x in norms if math.isfinite(x)]
            print(
                f"{title}{len(norms)} steps of {norm_col!r}"
                + (f", suggested threshold {suggest_threshold(norms):.4g}" if finite else "")
            )
            print(format_findings(findings))
            print()
        if args.plot:
            _plot(runs, norm_col, args.plot)
            print(f"Wrote {args.plot}")
    except CliError as e:
        print(f"optaxclip diagnose: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
