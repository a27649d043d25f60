"""Sweeps (``kd -m``): what a failed job leaves behind and the summary at the sweep's end.

A job that fails in any way is reported in one sentence (:func:`job_failure`; a
configuration error by its own sentence) and the sweep goes on with its other jobs. Each
failure is kept in this process (:data:`FAILED_JOBS`) and in the job's directory
(:data:`FAILED_FILE`, for launchers that run jobs in other processes), and
:class:`SweepSummary` prints the table of every finished job, then exits with code 2
naming the failed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd.evaluation import headline_metric, load_runs, summarize

#: the sentences of the sweep jobs that failed in this process: a sweep (``kd -m``) goes on
#: with its other jobs and exits with code 2 at its end (:class:`SweepSummary`)
FAILED_JOBS: list[str] = []


def sweep_job() -> str | None:
    """``"<job number> (<overrides>)"`` inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = HydraConfig.get().job
    return f"{job.num} ({' '.join(HydraConfig.get().overrides.task)})"


def job_failure(e: Exception) -> str:
    """A sweep job's failure that is not a configuration error, as one sentence: the
    exception's type and first line, and where the job's traceback was written."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    lines = str(e).strip().splitlines()
    sentence = f"{type(e).__name__}: {lines[0].rstrip('.')}" if lines else type(e).__name__
    try:
        path = Path(HydraConfig.get().runtime.output_dir) / "traceback.txt"
        path.write_text("".join(traceback.format_exception(e)), encoding="utf-8")
    except Exception:  # noqa: BLE001 - the sentence is what matters
        return sentence
    return f"{sentence} (traceback in {path})"


def failed_trial_value() -> float:
    """What a failed job returns to a sweeper that optimises ``optimized_metric``: the worst
    value for the sweeper's direction (Optuna's sweeper cannot take a NaN: it records the
    trial as failed and then raises), so the search goes on and never picks it."""
    from hydra.core.hydra_config import HydraConfig

    direction = HydraConfig.get().sweeper.get("direction", "minimize") if HydraConfig.initialized() else "minimize"
    return float("-inf") if str(direction).lower().endswith("maximize") else float("inf")


#: a failed sweep job's sentence, in its output directory: a launcher that runs jobs in other
#: processes (joblib) reports them at the sweep's end from these files
FAILED_FILE = "failed.json"


def note_failure(sentence: str) -> None:
    import json

    from hydra.core.hydra_config import HydraConfig

    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / FAILED_FILE).write_text(json.dumps({"error": sentence}), encoding="utf-8")
    except Exception:  # noqa: BLE001 - in this process FAILED_JOBS has it already
        pass


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print the table of every job (mean ± std over seeds)."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict) and ("results" in value or "table" in value):
            self.runs.append(value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # jobs of a launcher that runs them in other processes (joblib, SLURM) report here
        # only through their metrics.json files
        runs = [r for r in self.runs if "results" in r] or load_runs([config.hydra.sweep.dir])
        if runs:
            print("\nSweep summary (mean ± std over seeds)\n" + summarize(runs, metric=headline_metric(runs)), flush=True)
        pipelines = [r for r in self.runs if "table" in r]
        if pipelines:
            from kd.pipeline import summarize_pipelines

            print("\n" + summarize_pipelines(pipelines), flush=True)
        failed = FAILED_JOBS or failures_in(Path(config.hydra.sweep.dir)) or [
            f"{r.get('output_dir')}: {r['error']}" for r in runs if r.get("error")]
        if failed:
            print(f"kd: error: {len(failed)} sweep job(s) failed, the others finished: " + "; ".join(failed),
                  file=sys.stderr, flush=True)
            sys.exit(2)


def failures_in(sweep_dir: Path) -> list[str]:
    """The sentences of the failed jobs a sweep's jobs left in their :data:`FAILED_FILE`."""
    import json

    found = []
    for f in sorted(sweep_dir.rglob(FAILED_FILE)) if sweep_dir.is_dir() else []:
        try:
            found.append(str(json.loads(f.read_text(encoding="utf-8"))["error"]))
        except (OSError, ValueError, KeyError, TypeError):
            found.append(f"{f.parent}: failed")
    return found
