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
