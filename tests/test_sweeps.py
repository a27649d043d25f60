"""Sweeps on Hydra's engines: the joblib launcher (jobs in parallel processes, the summary
read back from their metrics.json) and an Optuna search that kd feeds the validation metric."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.test_quickstart import TINY, _kd

QUIET = ["trainer.enable_progress_bar=false", "logger=none"]


def test_a_joblib_sweep_runs_jobs_in_parallel_processes_and_summarises_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    done = _kd("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1", "seed=0,1", *QUIET, *TINY,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib" in done.stdout + done.stderr  # the launcher, not the basic one, ran the jobs
    assert "Sweep summary (mean ± std over seeds)" in done.stdout and "[2 seeds: [0, 1]" in done.stdout
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    jobs = [json.loads((sweep / j / "metrics.json").read_text()) for j in ("0", "1")]
    assert {m["seed"] for m in jobs} == {0, 1}
    # both seeds distil the one cached teacher (same weights, same scores); the students differ by seed
    assert jobs[0]["teacher"] == jobs[1]["teacher"]
    assert jobs[0]["results"]["teacher"]["test/acc"] == jobs[1]["results"]["teacher"]["test/acc"]
    students = [m["results"]["student, hinton"] for m in jobs]
    assert all(0.0 < s["test/acc"] <= 1.0 for s in students)
    assert students[0] != students[1]


def test_an_optuna_search_optimises_the_validation_metric_kd_returns(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    done = _kd("-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.sampler.n_startup_trials=3", *QUIET, *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    trials = [json.loads((sweep / str(j) / "metrics.json").read_text()) for j in range(3)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["validation"]["val/acc"] for t in trials)  # validation, not test
    assert set(best["best_params"]) == {"recipe.lam", "recipe.temperature"}
    points = {next(o for o in t["overrides"] if o.startswith("recipe.lam=")) for t in trials}
    assert len(points) == 3  # three different points were tried


def test_a_sweep_job_failing_with_any_exception_is_one_sentence_and_the_sweep_still_summarises(tmp_path):
    # AdamW itself rejects a negative eps with a ValueError (not a kd.ConfigError) when training starts
    done = _kd("-m", "+optimizer.eps=-1.0,1e-8", "scratch_baseline=false", *QUIET, *TINY,
               cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("kd: error in sweep job 0 (+optimizer.eps=-1.0"))
    assert "): ValueError: Invalid epsilon value: -1.0 (traceback in " in line
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kd: error: 1 sweep job(s) failed, the others finished: job 0 (+optimizer.eps=-1.0")
    assert "Sweep summary" in done.stdout and "student, hinton" in done.stdout
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    assert "ValueError" in (sweep / "0" / "traceback.txt").read_text()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["results"]["student, hinton"]["test/acc"] > 0


def test_a_failed_job_of_a_joblib_sweep_is_named_at_its_end(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    done = _kd("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=1",
               "+optimizer.eps=-1.0,1e-8", "scratch_baseline=false", *QUIET, *TINY, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kd: error: 1 sweep job(s) failed, the others finished: job 0 (threads=1 "
                           "+optimizer.eps=-1.0")
    assert "ValueError: Invalid epsilon value: -1.0" in last
    assert "Sweep summary" in done.stdout


def test_a_failed_trial_of_an_optuna_search_is_its_worst_value_and_the_search_goes_on(tmp_path):
    """A failed job used to return NaN, which Optuna's sweeper records as a failed trial and
    then raises on (a traceback, exit 1). Now it is -inf for a maximising search: every
    trial runs, the results are written, and the sweep exits 2 naming the failed jobs."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    done = _kd("-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.sampler.n_startup_trials=2", "+optimizer.eps=-1.0", "scratch_baseline=false",
               *QUIET, *TINY, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("kd: error: 2 sweep job(s) failed")
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == float("-inf")


def test_an_optimized_metric_no_run_reports_stops_the_sweep_in_one_sentence(tmp_path):
    done = _kd("-m", "seed=0,1", "optimized_metric=val/nope", "scratch_baseline=false", *QUIET, *TINY, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("kd: error: optimized_metric=val/nope is not a validation metric of this run (sweep job 0 ")
    assert "the sweep stops); choose one of ['val/" in line
    sweep = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    assert not (sweep / "1").exists()  # the second job did not train
