"""The embedded quickstart end to end: teacher trained once and cached, scratch baseline,
distilled student, table, metrics.json; the console script, sweeps and error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd.runs import train as run

TINY = ["trainer.max_epochs=1", "teacher.fit.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]


def test_tiny_quickstart_caches_teacher_and_baseline(make_cfg, tmp_path, capsys):
    first = run(make_cfg(*TINY, root=tmp_path / "a"))
    table = capsys.readouterr().out
    for row in ("teacher", "student, from scratch", "student, hinton"):
        assert row in table and row in first["results"]
    assert first["results"]["teacher"]["params"] > 50 * first["results"]["student, hinton"]["params"]
    cache = tmp_path / "a" / "cache"
    teacher_dir = Path(first["teacher"])
    assert teacher_dir.parent == cache / "teachers"
    stamp = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    baselines = list((cache / "baselines").iterdir())
    assert len(baselines) == 1

    # same cache, another output dir: both cached models are reused, not retrained
    second = run(make_cfg(*TINY, root=tmp_path / "a"))
    assert second["teacher"] == first["teacher"]
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert second["results"]["student, from scratch"] == first["results"]["student, from scratch"]
    assert list((cache / "baselines").iterdir()) == baselines

    # another seed: same teacher, a new baseline
    run(make_cfg(*TINY, "seed=1", root=tmp_path / "a"))
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list((cache / "baselines").iterdir())) == 2


def test_a_runs_curves_overlay_the_scratch_students_validation_and_the_teachers_value(make_cfg, tmp_path,
                                                                                      monkeypatch):
    """The cached scratch baseline (which has no logger) keeps its validation curves in its
    facts, and the run's curves.png draws them under the distilled student's, with the
    teacher's validation value as a horizontal line."""
    import kd.report

    drawn = {}
    draw = kd.report.draw_curves

    def spy(per_run, names, baseline=None, baseline_label=""):
        drawn.update(per_run=per_run, names=names, baseline=baseline, label=baseline_label)
        drawn["fig"] = draw(per_run, names, baseline, baseline_label)
        return drawn["fig"]

    monkeypatch.setattr(kd.report, "draw_curves", spy)
    summary = run(make_cfg(*TINY, "trainer.max_epochs=2", "logger=tensorboard", "trainer.log_every_n_steps=1"))
    meta = json.loads(next((tmp_path / "cache" / "baselines").glob("*/entry.json")).read_text())["info"]
    scratch = meta["curves"]["val/acc"]
    # one point per validation (3 batches an epoch, 2 epochs), at the step Lightning's loggers use
    # for it (the index of the epoch's last batch), so the two students' curves share the x axis
    assert [step for step, _ in scratch] == [2, 5]
    assert drawn["label"] == "student, from scratch" and drawn["names"] == ["student, hinton"]
    acc = next(ax for ax in drawn["fig"].axes if ax.get_title() == "val/acc")
    lines = {line.get_label(): line for line in acc.get_lines()}
    assert list(lines["student, from scratch"].get_ydata()) == pytest.approx([v for _, v in scratch])
    assert list(lines["student, hinton"].get_xdata()) == [2, 5]
    teacher = drawn["per_run"][0]["val/teacher_acc"][-1][1]
    assert list(lines["teacher"].get_ydata()) == pytest.approx([teacher, teacher])
    titles = {ax.get_title() for ax in drawn["fig"].axes}
    assert "val/teacher_acc" not in titles and "val/teacher_loss" not in titles
    assert (Path(summary["output_dir"]) / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_with_a_logger_plots_its_training_curves_and_says_where(make_cfg, tmp_path, capsys):
    summary = run(make_cfg(*TINY, "logger=tensorboard", "scratch_baseline=false", "trainer.log_every_n_steps=1"))
    curves = Path(summary["output_dir"]) / "curves.png"
    assert curves.read_bytes().startswith(b"\x89PNG")
    assert f"training curves: {curves}" in capsys.readouterr().out


def test_corrupt_teacher_cache_is_rebuilt(make_cfg, tmp_path):
    first = run(make_cfg(*TINY, "scratch_baseline=false"))
    weights = Path(first["teacher"]) / "model.safetensors"
    weights.write_bytes(b"truncated")
    second = run(make_cfg(*TINY, "scratch_baseline=false"))
    assert second["teacher"] == first["teacher"]
    assert weights.stat().st_size > 1000  # rewritten with real weights
    # retrained from the same config and seed: the same teacher, so the same test metrics, and
    # the student distilled from it scores the same as the first run's
    assert second["results"]["teacher"] == first["results"]["teacher"]
    assert second["results"]["student, hinton"]["test/acc"] == first["results"]["student, hinton"]["test/acc"]
    assert 0.0 < first["results"]["student, hinton"]["test/acc"] <= 1.0


def _kd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_CACHE_DIR": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from kd.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_console_script_runs_sweeps_and_never_overwrites(tmp_path):
    quiet = ["trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1", *TINY]
    done = _kd("-m", "seed=0,1", *quiet, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Sweep summary (mean ± std over seeds)" in done.stdout
    assert "[2 seeds: [0, 1]" in done.stdout
    # a quiet console (kd.console): no trainer banners, no checkpoint-restoring lines of the
    # cached sub-runs, no third-party deprecation notices; one line for each sub-run built
    said = done.stdout + done.stderr
    chatter = ("GPU available", "TPU available", "litlogger", "Restoring states", "Loaded model weights",
               "is deprecated", "weights_only")
    assert not [c for c in chatter if c in said], said[-3000:]
    assert said.count("building the teacher once") == 1 and said.count("reusing cached teacher") == 1, said[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["seed"] == int(job)
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
        header = (sweep / job / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        for column in ("train/loss", "train/hard_ce", "train/soft_kd", "train/targets_per_s", "train/lr",
                       "val/loss", "val/acc", "val/kl_to_teacher", "test/acc", "test/teacher_acc"):
            assert column in header, column  # every loss term and metric logged separately
        assert "recipe" in (sweep / job / "csv" / "hparams.yaml").read_text()  # the resolved config
        assert (sweep / job / "student" / "model.safetensors").is_file()
    report = subprocess.run([sys.executable, "-c", "from kd.cli import report_main; report_main()", str(sweep)],
                            capture_output=True, text=True)
    assert "[2 seeds: [0, 1]" in report.stdout and "student, hinton" in report.stdout

    for _ in range(2):
        assert _kd(*quiet, "scratch_baseline=false", cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 2


def test_a_failed_sweep_job_is_one_sentence_and_the_sweep_goes_on(tmp_path):
    done = _kd("-m", "recipe.lam=2,0.5", "trainer.enable_progress_bar=false", "logger=none", *TINY, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "kd: error in sweep job 0 (recipe.lam=2" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("kd: error: 1 sweep job(s) failed, the others finished")
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    assert json.loads((sweep / "1" / "metrics.json").read_text())["results"]["student, hinton"]["test/acc"] > 0
    assert "Sweep summary" in done.stdout


@pytest.mark.parametrize("override,start", [
    ("teacher.checkpoint=/no/such/teacher.pt", "kd: error: checkpoint '/no/such/teacher.pt' does not exist"),
    ("recipe.lam=2", "kd: error: recipe.lam must be in [0, 1] (got 2)"),
])
def test_console_script_config_errors_are_one_sentence(override, start, tmp_path):
    done = _kd(override, "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(start)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists(), "nothing may be trained before a config error"


@pytest.mark.slow
def test_full_quickstart_distilled_beats_scratch(make_cfg):
    """The quickstart's claim on one seed (the README has the 3-seed figures)."""
    res = run(make_cfg())["results"]
    scratch, distilled = res["student, from scratch"]["test/acc"], res["student, hinton"]["test/acc"]
    assert res["teacher"]["test/acc"] > 0.98
    assert distilled > scratch + 0.02, (scratch, distilled)
