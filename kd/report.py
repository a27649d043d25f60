"""Plots of finished runs, written next to ``kd-report``'s table (and a run's own curves).

* :func:`metric_points` / :func:`plot_metric`: the trained model's metric (its ``student,
  <recipe>`` row of ``metrics.json``) against each swept knob, i.e. each override key
  whose value differs between the runs (the seed excepted): one panel per knob, one line
  per combination of the other knobs, mean over seeds with the seeds' standard deviation
  as error bars. Numeric knobs are placed by value, others in order of first appearance.
* :func:`read_curves` / :func:`plot_curves`: training curves (every logged ``train/*``
  term and the validation metrics, ``val/kl_to_teacher`` among them) of each run, read
  from its TensorBoard event files (``tensorboard/``) or, failing those, from the CSV
  logger's ``metrics.csv``.

:func:`main` is ``kd-report``: the table of :func:`kd.evaluation.summarize`, then these plots.
Matplotlib draws off screen (Agg); nothing is shown.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from kd.evaluation import student_value

#: the curves drawn when present (prefixes of logged tags), in this order
CURVE_PREFIXES = ("train/", "val/")


def _pairs(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o and not o.startswith("seed="))


def swept_knobs(runs: Sequence[dict]) -> list[str]:
    """Override keys whose value is not the same in every run (a key missing from a run
    counts as a value of its own), in order of first appearance."""
    keys = list(dict.fromkeys(k for r in runs for k in _pairs(r)))
    return [k for k in keys if len({_pairs(r).get(k) for r in runs}) > 1]


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def metric_points(runs: Sequence[dict], metric: str) -> dict[str, dict[str, list[tuple[str, float, float, int]]]]:
    """``{knob: {series: [(value, mean, std, seeds), ...]}}`` for :func:`plot_metric`: per
    knob, one series per combination of the other swept knobs (``""`` when there is none),
    its points ordered by value (numbers by size); std is 0 for a single seed."""
    knobs = swept_knobs(runs)
    out: dict[str, dict[str, list[tuple[str, float, float, int]]]] = {}
    for knob in knobs:
        cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for run in runs:
            pairs = _pairs(run)
            value = student_value(run, metric)
            if value is None:
                continue
            series = " ".join(f"{k}={pairs.get(k, '-')}" for k in knobs if k != knob)
            cells[series][pairs.get(knob, "-")].append(value)
        out[knob] = {}
        for series, by_value in cells.items():
            order = sorted(by_value, key=lambda v: (_number(v) is None, _number(v) or 0.0, list(by_value).index(v)))
            out[knob][series] = [(v, statistics.fmean(by_value[v]),
                                  statistics.stdev(by_value[v]) if len(by_value[v]) > 1 else 0.0, len(by_value[v]))
                                 for v in order]
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(runs: Sequence[dict], metric: str, path: str | Path) -> Path | None:
    """Write :func:`metric_points` as a PNG at ``path``; None (nothing written) when no
    knob varies or no run has the metric."""
    points = metric_points(runs, metric)
    points = {k: v for k, v in points.items() if v}
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.6), squeeze=False)
    for ax, (knob, series) in zip(axes[0], points.items()):
        numeric = all(_number(v) is not None for s in series.values() for v, *_ in s)
        labels = list(dict.fromkeys(v for s in series.values() for v, *_ in s))
        for name, pts in series.items():
            xs = [_number(v) if numeric else labels.index(v) for v, *_ in pts]
            ax.errorbar(xs, [m for _, m, _, _ in pts], yerr=[s for _, _, s, _ in pts], marker="o", capsize=3,
                        label=name or None)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel(knob)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if any(series):
            ax.legend(fontsize=7)
    fig.suptitle(f"{metric}: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the scalars a run logged under ``train/`` and
    ``val/``: from its TensorBoard event files, else its CSV logger's ``metrics.csv``."""
    run_dir = Path(run_dir)
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    events = sorted(run_dir.glob("tensorboard/**/events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for f in events:
            acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                if tag.startswith(CURVE_PREFIXES):
                    curves[tag] += [(e.step, e.value) for e in acc.Scalars(tag)]
    else:
        for f in sorted(run_dir.glob("csv/**/metrics.csv")):
            with open(f, newline="") as fh:
                for row in csv.DictReader(fh):
                    for tag, value in row.items():
                        if tag.startswith(CURVE_PREFIXES) and value not in ("", None):
                            curves[tag].append((int(row.get("step") or 0), float(value)))
    return {tag: sorted(points) for tag, points in curves.items() if points}


def plot_curves(run_dirs: Iterable[str | Path], path: str | Path, labels: Sequence[str] | None = None) -> Path | None:
    """Write the runs' training curves as one PNG (a panel per tag, a line per run); None
    when no run logged any."""
    run_dirs = list(run_dirs)
    per_run = [read_curves(d) for d in run_dirs]
    tags = sorted({t for c in per_run for t in c if not t.endswith(("/lr", "targets_per_s"))},
                  key=lambda t: (not t.startswith("train/"), t))
    if not tags:
        return None
    plt = _pyplot()
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    names = list(labels) if labels else [Path(d).name for d in run_dirs]
    for ax, tag in zip(axes.flat, tags):
        for name, curves in zip(names, per_run):
            if tag in curves:
                steps, values = zip(*curves[tag])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    if 1 < len(run_dirs) <= 12:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: Sequence[dict], metric: str, out_dir: str | Path) -> list[Path]:
    """The plots of :func:`plot_metric` (``report_<metric>.png``) and :func:`plot_curves`
    (``curves.png``) for ``runs`` (parsed ``metrics.json`` with their ``output_dir``) in
    ``out_dir``; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_metric(runs, metric, out_dir / f"report_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png")]
    dirs = [r["output_dir"] for r in runs if r.get("output_dir") and Path(r["output_dir"]).is_dir()]
    labels = [" ".join(o for o in r.get("overrides", [])) or Path(r["output_dir"]).name
              for r in runs if r.get("output_dir") and Path(r["output_dir"]).is_dir()]
    written.append(plot_curves(dirs, out_dir / "curves.png", labels) if dirs else None)
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> None:
    """``kd-report DIR...``: the summary table of finished runs (mean ± std over seeds,
    per-seed paired differences against ``--baseline``) and its plots."""
    import argparse
    import sys

    from kd import ConfigError
    from kd.evaluation import headline_metric, load_runs, summarize

    parser = argparse.ArgumentParser(prog="kd-report", description=main.__doc__)
    parser.add_argument("paths", nargs="+", help="run or sweep directories (searched for metrics.json)")
    parser.add_argument("--metric", default=None, help="metric to tabulate (default: test/exact_match if present, else test/acc)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="where to write the plots (default: the first path given, or its folder for a file)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only")
    parser.add_argument("--baseline", default=None,
                        help="a setting (its overrides without seed=, as the table heads print it): every other "
                             "setting also gets its per-seed paired differences against it")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"kd-report: error: {', '.join(missing)} does not exist; pass run or sweep directories "
              "(or metrics.json files)", file=sys.stderr)
        sys.exit(2)
    from kd.pipeline import load_pipelines, summarize_pipelines

    skipped: list[str] = []
    runs = load_runs(args.paths, skipped)
    pipelines = load_pipelines(args.paths, skipped)
    for entry in skipped:
        print(f"kd-report: skipped the unreadable run {entry}", file=sys.stderr)
    if pipelines and not runs:
        print(summarize_pipelines(pipelines))
        return
    metric = args.metric or headline_metric(runs)
    try:
        print(summarize(runs, metric=metric, baseline=args.baseline))
    except ConfigError as e:
        print(f"kd-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    if runs and not args.no_plots:
        first = Path(args.paths[0])
        out = Path(args.plots) if args.plots else (first if first.is_dir() else first.parent)
        for path in write_report(runs, metric, out):
            print(f"plot: {path}")


__all__ = ["swept_knobs", "metric_points", "plot_metric", "read_curves", "plot_curves", "write_report", "main"]

