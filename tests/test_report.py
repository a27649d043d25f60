"""kd-report's plots: the metric against each swept knob with seed error bars, and the
training curves read back from TensorBoard event files or the CSV logger."""

from __future__ import annotations

import json
import statistics

import pytest

from kd.report import metric_points, plot_metric, read_curves, swept_knobs, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _run(seed, ppl, **knobs):
    return {"seed": seed, "recipe": "hinton", "overrides": [*(f"{k}={v}" for k, v in knobs.items()), f"seed={seed}"],
            "results": {"teacher": {"test/ppl": 2.0}, "student, hinton": {"test/ppl": ppl}}}


def test_points_per_knob_are_seed_means_and_stds_ordered_by_value():
    runs = [_run(0, 10.0, **{"recipe.lam": "0.5", "divergence": "jsd"}),
            _run(1, 14.0, **{"recipe.lam": "0.5", "divergence": "jsd"}),
            _run(0, 20.0, **{"recipe.lam": "0.25", "divergence": "jsd"}),
            _run(0, 30.0, **{"recipe.lam": "0.5", "divergence": "tvd"}),
            _run(0, 40.0, **{"recipe.lam": "0.25", "divergence": "tvd", "data.x": "1"})]
    assert swept_knobs(runs) == ["recipe.lam", "divergence", "data.x"]
    points = metric_points(runs, "test/ppl")
    lam = points["recipe.lam"]
    # numeric values by size (0.25 before 0.5); seeds 0 and 1 of (0.5, jsd): mean 12, std 2.83
    assert lam["divergence=jsd data.x=-"] == [("0.25", 20.0, 0.0, 1), ("0.5", 12.0, statistics.stdev([10, 14]), 2)]
    assert lam["divergence=tvd data.x=-"] == [("0.5", 30.0, 0.0, 1)]
    assert points["divergence"]["recipe.lam=0.5 data.x=-"] == [("jsd", 12.0, pytest.approx(2.828, abs=1e-3), 2),
                                                                ("tvd", 30.0, 0.0, 1)]


def test_plots_are_written_as_png_and_nothing_when_no_knob_varies(tmp_path):
    runs = [_run(s, 10.0 + s + 5 * (d == "tvd"), divergence=d) for s in range(3) for d in ("jsd", "tvd")]
    path = plot_metric(runs, "test/ppl", tmp_path / "m.png")
    assert path.read_bytes().startswith(PNG)
    assert plot_metric([_run(0, 1.0, divergence="jsd")], "test/ppl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_curves_come_from_tensorboard_events_or_the_csv_logger(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb_run"
    writer = SummaryWriter(str(tb / "tensorboard" / "version_0"))
    for step, (loss, kl) in enumerate([(3.0, 1.5), (2.5, 1.0), (2.0, 0.75)]):
        writer.add_scalar("train/loss", loss, step * 10)
        writer.add_scalar("val/kl_to_teacher", kl, step * 10)
        writer.add_scalar("hp_metric", 0.0, step)
    writer.close()
    assert read_curves(tb) == {"train/loss": [(0, 3.0), (10, 2.5), (20, 2.0)],
                               "val/kl_to_teacher": [(0, 1.5), (10, 1.0), (20, 0.75)]}
    plain = tmp_path / "csv_run"
    (plain / "csv" / "version_0").mkdir(parents=True)
    (plain / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,9,4.0,\n0,19,3.5,\n0,19,,3.9\n")
    assert read_curves(plain) == {"train/loss": [(9, 4.0), (19, 3.5)], "val/loss": [(19, 3.9)]}
    runs = []
    for i, d in enumerate((tb, plain)):
        run = _run(0, 5.0 + i, divergence=("jsd", "tvd")[i])
        run["output_dir"] = str(d)
        (d / "metrics.json").write_text(json.dumps(run))
        runs.append(run)
    written = write_report(runs, "test/ppl", tmp_path / "report")
    assert [p.name for p in written] == ["report_test_ppl.png", "curves.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)


def test_kd_report_prints_where_the_plots_are(tmp_path, capsys):
    from kd.cli import report_main

    for i, d in enumerate(("jsd", "tvd")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "metrics.json").write_text(json.dumps(_run(0, 5.0 + i, divergence=d)))
    report_main([str(tmp_path), "--metric", "test/ppl"])
    out = capsys.readouterr().out
    assert f"plot: {tmp_path / 'report_test_ppl.png'}" in out
    report_main([str(tmp_path), "--metric", "test/ppl", "--no-plots"])
    assert "plot:" not in capsys.readouterr().out


def test_kd_report_skips_an_unreadable_run_names_it_and_reports_the_rest(tmp_path, capsys):
    from kd.cli import report_main

    for i, d in enumerate(("jsd", "tvd")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "metrics.json").write_text(json.dumps(_run(0, 5.0 + i, divergence=d)))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.json").write_text('{"seed": 0, "results": {"stud')  # killed mid-write
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text(json.dumps({"seed": 0, "overrides": []}))  # no results
    report_main([str(tmp_path), "--metric", "test/ppl", "--no-plots"])
    out, err = capsys.readouterr()
    assert "divergence=jsd" in out and "divergence=tvd" in out
    assert f"kd-report: skipped the unreadable run {tmp_path / 'cut' / 'metrics.json'} (JSONDecodeError" in err
    assert f"kd-report: skipped the unreadable run {tmp_path / 'odd' / 'metrics.json'} (no 'results' object)" in err


def test_kd_report_on_a_missing_path_exits_2_with_one_sentence(tmp_path, capsys):
    from kd.cli import report_main

    with pytest.raises(SystemExit) as exit_:
        report_main([str(tmp_path / "nope")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kd-report: error: {tmp_path / 'nope'} does not exist; pass run or sweep directories "
                   "(or metrics.json files)")


# --- what the pictures show (artists, not pixels) ---------------------------------------------

def _full(seed, acc, scratch, **knobs):
    """A run with teacher and scratch rows, as ``kd`` writes them."""
    run = _run(seed, 0.0, **knobs)
    run["results"] = {"teacher": {"test/acc": 0.99}, "student, from scratch": {"test/acc": scratch},
                      "student, hinton": {"test/acc": acc}}
    return run


def _dots(ax):
    """Every scatter point of a panel, as (x, y) pairs."""
    from matplotlib.collections import PathCollection

    return [tuple(map(float, xy)) for c in ax.collections if isinstance(c, PathCollection) for xy in c.get_offsets()]


def _hlines(ax):
    """The y of every horizontal line spanning the panel (axhline: x in axes coordinates 0..1)."""
    return sorted(float(line.get_ydata()[0]) for line in ax.get_lines()
                  if list(line.get_xdata()) == [0, 1] and line.get_ydata()[0] == line.get_ydata()[1])


SCRATCH = {0: 0.90, 1: 0.92, 2: 0.91}
ACC = {"forward_kl": {0: 0.95, 1: 0.96, 2: 0.94}, "jsd": {0: 0.93, 1: 0.97, 2: 0.92},
       "tvd": {0: 0.91, 1: 0.95, 2: 0.90}}


def test_a_categorical_sweep_shows_every_seed_no_line_between_settings_and_both_references():
    import matplotlib.pyplot as plt

    from kd.report import draw_metric

    runs = [_full(s, ACC[d][s], SCRATCH[s], divergence=d) for d in ACC for s in range(3)]
    fig = draw_metric(runs, "test/acc")
    ax = fig.axes[0]
    dots = _dots(ax)
    assert len(dots) == 3 * 3  # settings x seeds, one dot each
    # accuracies drawn as percentages, as the table prints them
    assert sorted(y for _, y in dots) == pytest.approx(sorted(100 * v for d in ACC.values() for v in d.values()))
    by_x = {x: sorted(y for xx, y in dots if round(xx) == x) for x in {round(x) for x, _ in dots}}
    for x, d in zip(sorted(by_x), ACC):  # in order of appearance
        assert by_x[x] == pytest.approx(sorted(100 * v for v in ACC[d].values()))
    # the means are marks without a joining line: no plotted line has more than one x but the references
    assert all(line.get_linestyle() == "None" for line in ax.get_lines() if list(line.get_xdata()) != [0, 1])
    # the teacher's value and the scratch students' mean as horizontal lines
    assert _hlines(ax) == pytest.approx(sorted([99.0, 100 * statistics.fmean(SCRATCH.values())]))
    assert ax.get_ylabel() == "test/acc (%)"
    assert len(fig.axes) == 1  # no paired panel without a baseline
    plt.close(fig)


def test_the_paired_panel_holds_each_seeds_difference_against_the_baseline_and_a_zero_line():
    import matplotlib.pyplot as plt

    from kd.report import draw_metric

    runs = [_full(s, ACC[d][s], SCRATCH[s], divergence=d, logger="none") for d in ACC for s in range(3)]
    fig = draw_metric(runs, "test/acc", baseline="divergence=forward_kl")
    paired = fig.axes[-1]
    assert len(fig.axes) == 2
    assert [t.get_text() for t in paired.get_xticklabels()] == ["divergence=jsd", "divergence=tvd"]
    dots = _dots(paired)
    expected = {x: sorted(100 * (ACC[d][s] - ACC["forward_kl"][s]) for s in range(3))
                for x, d in enumerate(("jsd", "tvd"))}
    assert len(dots) == 2 * 3
    for x, diffs in expected.items():
        assert sorted(y for xx, y in dots if round(xx) == x) == pytest.approx(diffs)
    assert _hlines(paired) == [0.0]
    plt.close(fig)


def test_a_numeric_knob_joins_its_means_and_still_shows_each_seed():
    import matplotlib.pyplot as plt

    from kd.report import draw_metric

    runs = [_full(s, 0.9 + lam / 10 + s / 100, 0.9, **{"recipe.lam": str(lam)}) for lam in (0.9, 0.1, 0.5)
            for s in range(2)]
    fig = draw_metric(runs, "test/acc")
    ax = fig.axes[0]
    assert sorted(x for x, _ in _dots(ax)) == pytest.approx([0.1, 0.1, 0.5, 0.5, 0.9, 0.9])
    joined = [line for line in ax.get_lines() if line.get_linestyle() == "-" and list(line.get_xdata()) != [0, 1]]
    assert len(joined) == 1 and list(joined[0].get_xdata()) == pytest.approx([0.1, 0.5, 0.9])
    assert list(joined[0].get_ydata()) == pytest.approx([100 * (0.9 + lam / 10 + 0.005) for lam in (0.1, 0.5, 0.9)])
    plt.close(fig)


def test_curves_overlay_the_baseline_draw_the_teacher_as_a_line_and_leave_out_constant_metrics():
    import matplotlib.pyplot as plt

    from kd.report import draw_curves

    run = {"train/loss": [(0, 3.0), (10, 2.0), (20, 1.5)],
           "val/acc": [(10, 0.5), (20, 0.7)],
           "val/teacher_acc": [(10, 0.95), (20, 0.95)],   # a frozen teacher: constant
           "val/kl_to_teacher": [(10, 0.0), (20, 0.0)],   # constant: left out
           "val/ppl": [(20, 3.0)]}                         # logged once: no evidence it is constant, kept
    scratch = {"val/acc": [(10, 0.4), (20, 0.55)], "val/loss": [(10, 2.2), (20, 2.0)]}
    fig = draw_curves([run], ["student, hinton"], baseline=scratch)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["train/loss", "val/acc", "val/loss", "val/ppl"]
    acc = next(ax for ax in fig.axes if ax.get_title() == "val/acc")
    lines = {line.get_label(): line for line in acc.get_lines()}
    assert list(lines["student, hinton"].get_ydata()) == [0.5, 0.7]
    assert list(lines["student, from scratch"].get_ydata()) == [0.4, 0.55]
    assert list(lines["student, from scratch"].get_xdata()) == [10, 20]
    assert list(lines["teacher"].get_ydata()) == [0.95, 0.95] and list(lines["teacher"].get_xdata()) == [0, 1]
    loss = next(ax for ax in fig.axes if ax.get_title() == "train/loss")
    assert "teacher" not in {line.get_label() for line in loss.get_lines()}
    plt.close(fig)
