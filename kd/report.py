"""Plots of finished runs, written next to ``kd-report``'s table (and a run's own curves).

* :func:`metric_points` / :func:`draw_metric` / :func:`plot_metric`: the trained model's
  metric (its ``student, <recipe>`` row of ``metrics.json``) against each swept knob, i.e.
  each override key whose value differs between the runs (the seed excepted), one panel per
  knob. Every seed's value is a dot; the mean over seeds is a bar (a short horizontal mark)
  with the seeds' standard deviation as error bars. Numeric knobs are placed by value and
  their means joined by a line, one per combination of the other knobs; categorical knobs
  (recipe, divergence, experiment, ...) are placed in order of first appearance with no line
  between them, each combination of the other knobs beside the others. The teacher's value
  and the baseline student's (trained from scratch, or the SFT it started from), each the
  mean over the runs, are horizontal reference lines. Fractions (accuracy, exact match,
  Rouge-L) are drawn as percentages, as the table prints them. With ``baseline`` (a setting, as
  ``kd-report --baseline`` takes it) a last panel shows every other setting's per-seed
  paired differences against it (same seed), with zero marked.
* :func:`read_curves` / :func:`draw_curves` / :func:`plot_curves`: training curves (every
  logged ``train/*`` term and the validation metrics, ``val/kl_to_teacher`` among them) of
  each run, read from its TensorBoard event files (``tensorboard/``) or, failing those,
  from the CSV logger's ``metrics.csv``. The teacher's validation metrics
  (``val/teacher_<m>``) are drawn as a horizontal line in the panel of ``val/<m>``, not as
  panels of their own; a baseline's validation curves (the scratch student's, recorded by
  its cached sub-run) are overlaid dashed; metrics that never change (a constant, e.g. a
  frozen teacher's) are left out.

:func:`main` is ``kd-report``: the table of :func:`kd.evaluation.summarize`, then these plots.
Matplotlib draws off screen (Agg); nothing is shown.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kd.evaluation import BASELINE_ROWS, is_percent, match_setting, paired_differences, setting_of, student_value

#: the curves drawn when present (prefixes of logged tags), in this order
CURVE_PREFIXES = ("train/", "val/")
#: the colours of the reference lines
TEACHER_COLOR, BASELINE_COLOR = "black", "tab:gray"

Curves = dict[str, list[tuple[int, float]]]


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


def _by_value(runs: Sequence[dict], metric: str) -> dict[str, dict[str, dict[str, dict[Any, float]]]]:
    """``{knob: {series: {value: {seed: metric}}}}``, values ordered (numbers by size)."""
    knobs = swept_knobs(runs)
    out: dict[str, dict[str, dict[str, dict[Any, float]]]] = {}
    for knob in knobs:
        cells: dict[str, dict[str, dict[Any, float]]] = defaultdict(lambda: defaultdict(dict))
        for run in runs:
            pairs = _pairs(run)
            value = student_value(run, metric)
            if value is None:
                continue
            series = " ".join(f"{k}={pairs.get(k, '-')}" for k in knobs if k != knob)
            cell = cells[series][pairs.get(knob, "-")]
            cell[run.get("seed", len(cell))] = value
        out[knob] = {}
        for series, by_value in cells.items():
            order = sorted(by_value, key=lambda v: (_number(v) is None, _number(v) or 0.0, list(by_value).index(v)))
            out[knob][series] = {v: by_value[v] for v in order}
    return out


def metric_points(runs: Sequence[dict], metric: str) -> dict[str, dict[str, list[tuple[str, float, float, int]]]]:
    """``{knob: {series: [(value, mean, std, seeds), ...]}}``: per knob, one series per
    combination of the other swept knobs (``""`` when there is none), its points ordered by
    value (numbers by size); std is 0 for a single seed."""
    return {knob: {series: [(v, statistics.fmean(s.values()), statistics.stdev(s.values()) if len(s) > 1 else 0.0,
                             len(s)) for v, s in cells.items()]
                   for series, cells in by_series.items()}
            for knob, by_series in _by_value(runs, metric).items()}


def reference_values(runs: Sequence[dict], metric: str) -> dict[str, float]:
    """The reference rows' ``metric``, each the mean over the runs that report it:
    ``teacher`` and the baseline student (``student, from scratch`` or ``student, SFT
    (start point)``), under their row names."""
    out = {}
    for row in ("teacher", *BASELINE_ROWS):
        values = [r["results"][row][metric] for r in runs
                  if isinstance(r.get("results", {}).get(row), dict) and r["results"][row].get(metric) is not None
                  and math.isfinite(r["results"][row][metric])]
        if values:
            out[row] = statistics.fmean(values)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _references(ax, refs: Mapping[str, float]) -> None:
    for row, value in refs.items():
        ax.axhline(value, color=TEACHER_COLOR if row == "teacher" else BASELINE_COLOR, linestyle="--", linewidth=1.2,
                   label=f"{row} ({value:.4g})", zorder=1)


def draw_metric(runs: Sequence[dict], metric: str, baseline: str | None = None):
    """The figure of :func:`plot_metric` (a :class:`matplotlib.figure.Figure`), or None when
    no knob varies or no run has the metric."""
    scale = 100.0 if is_percent(metric) else 1.0  # fractions drawn as percentages, as the table prints them
    data = {k: {name: {v: {seed: x * scale for seed, x in s.items()} for v, s in cells.items()}
                for name, cells in series.items()}
            for k, series in _by_value(runs, metric).items() if series}
    if not data:
        return None
    refs = {row: value * scale for row, value in reference_values(runs, metric).items()}
    label = f"{metric} (%)" if scale != 1.0 else metric
    paired: dict[str, dict[Any, float]] = {}
    if baseline is not None:
        groups: dict[str, list[dict]] = defaultdict(list)
        for run in runs:
            groups[setting_of(run)].append(run)
        base = match_setting(list(groups), baseline)
        knobs = swept_knobs(runs)

        def short(key: str) -> str:  # a setting by its swept knobs only (the overrides all runs share dropped)
            pairs = _pairs(groups[key][0])
            return " ".join(f"{k}={pairs.get(k, '-')}" for k in knobs) or key

        paired = {short(key): {seed: x * scale for seed, x in d.items()} for key, members in groups.items()
                  if key != base for d in [paired_differences(members, groups[base], metric)] if d}
        base = short(base)
    plt = _pyplot()
    panels = len(data) + bool(paired)
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (knob, series) in zip(axes[0], data.items()):
        values = list(dict.fromkeys(v for cells in series.values() for v in cells))
        numeric = all(_number(v) is not None for v in values)
        width = 0.6 / max(1, len(series))
        for i, (name, cells) in enumerate(series.items()):
            color = colors[i % len(colors)]
            offset = 0.0 if numeric else (i - (len(series) - 1) / 2) * width
            xs = [_number(v) if numeric else values.index(v) + offset for v in cells]
            means = [statistics.fmean(s.values()) for s in cells.values()]
            stds = [statistics.stdev(s.values()) if len(s) > 1 else 0.0 for s in cells.values()]
            spread = 0.0 if numeric else min(0.06, width / 4)  # seeds side by side, so equal values stay visible
            dots_x = [x + (j - (len(s) - 1) / 2) * spread for x, s in zip(xs, cells.values()) for j in range(len(s))]
            dots_y = [y for s in cells.values() for y in s.values()]
            ax.scatter(dots_x, dots_y, s=18, color=color, alpha=0.75, zorder=3,
                       label=f"{name + ': ' if name else ''}each seed")
            ax.errorbar(xs, means, yerr=stds, color=color, capsize=4, marker="_", markersize=18,
                        markeredgewidth=2, linestyle="-" if numeric else "none", zorder=2,
                        label=f"{name + ': ' if name else ''}mean ± std")
        if not numeric:
            ax.set_xticks(range(len(values)), values, rotation=20, ha="right")
            ax.set_xlim(-0.6, len(values) - 0.4)
        _references(ax, refs)
        ax.set_xlabel(knob)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if paired:
        ax = axes[0][-1]
        names = list(paired)
        for x, name in enumerate(names):
            diffs = list(paired[name].values())
            ax.scatter([x + (j - (len(diffs) - 1) / 2) * 0.06 for j in range(len(diffs))], diffs, s=18,
                       color="black", alpha=0.75, zorder=3)
            ax.errorbar([x], [statistics.fmean(diffs)], yerr=[statistics.stdev(diffs) if len(diffs) > 1 else 0.0],
                        color="black", capsize=4, marker="_", markersize=18, markeredgewidth=2, linestyle="none")
        ax.axhline(0.0, color="tab:red", linewidth=1.2, label="no difference")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(f"{label}: difference, same seed")
        ax.set_title(f"paired differences vs {base}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{label}: every seed (dots), mean ± std (bars)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_metric(runs: Sequence[dict], metric: str, path: str | Path, baseline: str | None = None) -> Path | None:
    """Write :func:`draw_metric`'s figure as a PNG at ``path``; None (nothing written) when
    no knob varies or no run has the metric."""
    fig = draw_metric(runs, metric, baseline)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def read_curves(run_dir: str | Path) -> Curves:
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


def _constant(values: Sequence[float]) -> bool:
    """Logged more than once and never changed (one point is no evidence either way)."""
    return len(values) > 1 and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def draw_curves(per_run: Sequence[Curves], names: Sequence[str], baseline: Curves | None = None,
                baseline_label: str = "student, from scratch"):
    """The figure of :func:`plot_curves` from read curves (one dict per run, with its name),
    or None when there is nothing to draw."""
    baseline = {t: c for t, c in (baseline or {}).items() if c}
    teacher: dict[str, list[float]] = defaultdict(list)  # val/<m> -> the teacher's last value per run
    for curves in per_run:
        for tag, points in curves.items():
            if tag.startswith("val/teacher_"):
                teacher["val/" + tag[len("val/teacher_"):]].append(points[-1][1])
    tags = []
    for tag in sorted({t for c in (*per_run, baseline) for t in c}, key=lambda t: (not t.startswith("train/"), t)):
        if tag.endswith(("/lr", "targets_per_s")) or tag.startswith("val/teacher_"):
            continue
        values = [v for c in (*per_run, baseline) for _, v in c.get(tag, [])]
        if values and not _constant(values):
            tags.append(tag)
    if not tags:
        return None
    plt = _pyplot()
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    settings = list(dict.fromkeys(re.sub(r"\s*\bseed=\S+", "", n) for n in names))  # a run's seeds share a colour
    for ax, tag in zip(axes.flat, tags):
        for name, curves in zip(names, per_run):
            if tag in curves:
                steps, values = zip(*curves[tag])
                setting = re.sub(r"\s*\bseed=\S+", "", name)
                first = all(line.get_label() != (setting or name) for line in ax.get_lines())
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.0,
                        color=colors[settings.index(setting) % len(colors)],
                        label=(setting or name) if first else "_nolegend_")
        if tag in baseline:
            steps, values = zip(*baseline[tag])
            ax.plot(steps, values, color=BASELINE_COLOR, linestyle="--", marker="." if len(steps) < 30 else None,
                    label=baseline_label)
        if teacher.get(tag):
            ax.axhline(statistics.fmean(teacher[tag]), color=TEACHER_COLOR, linestyle="--", linewidth=1.2,
                       label="teacher")
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tag in baseline or tag in teacher or (ax is axes.flat[0] and len(settings) > 1):
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_curves(run_dirs: Iterable[str | Path], path: str | Path, labels: Sequence[str] | None = None,
                baseline: Curves | None = None, baseline_label: str = "student, from scratch") -> Path | None:
    """Write the runs' training curves as one PNG (:func:`draw_curves`: a panel per
    changing tag, a line per run, the teacher's validation value as a horizontal line and
    ``baseline``'s curves, e.g. the scratch student's validation curves, overlaid); None
    when no run logged any."""
    run_dirs = list(run_dirs)
    names = list(labels) if labels else [Path(d).name for d in run_dirs]
    fig = draw_curves([read_curves(d) for d in run_dirs], names, baseline, baseline_label)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def write_report(runs: Sequence[dict], metric: str, out_dir: str | Path, baseline: str | None = None) -> list[Path]:
    """The plots of :func:`plot_metric` (``report_<metric>.png``, with the paired panel
    against ``baseline`` when given) and :func:`plot_curves` (``curves.png``) for ``runs``
    (parsed ``metrics.json`` with their ``output_dir``) in ``out_dir``; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_metric(runs, metric, out_dir / f"report_{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png",
                           baseline)]
    dirs = [r["output_dir"] for r in runs if r.get("output_dir") and Path(r["output_dir"]).is_dir()]
    knobs = swept_knobs(runs)
    labels = [" ".join([*(f"{k}={_pairs(r).get(k, '-')}" for k in knobs), f"seed={r.get('seed')}"])
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
        for path in write_report(runs, metric, out, args.baseline):
            print(f"plot: {path}")


__all__ = ["swept_knobs", "metric_points", "reference_values", "draw_metric", "plot_metric", "read_curves",
           "draw_curves", "plot_curves", "write_report", "main"]

