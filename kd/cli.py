"""Console scripts: ``kd`` (train a recipe, or a sweep with ``-m``), ``kd-eval`` (test a
trained student) and ``kd-report`` (summarize finished runs).

A thin shell: Hydra parses the command line and composes the config, :mod:`kd.runs` does
the work (through the composition root, :mod:`kd.build`), and a configuration error
(:class:`kd.ConfigError`, wherever it is raised) is printed as its one sentence with exit
code 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd import config_error
from kd.evaluation import headline_metric, load_runs, summarize

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # also kd.config.CONF_DIR


#: the sentences of the sweep jobs that failed in this process: a sweep (``kd -m``) goes on
#: with its other jobs and exits with code 2 at its end (:class:`SweepSummary`)
FAILED_JOBS: list[str] = []


def _sweep_job() -> str | None:
    """``"<job number> (<overrides>)"`` inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = HydraConfig.get().job
    return f"{job.num} ({' '.join(HydraConfig.get().overrides.task)})"


def one_sentence_errors(prog: str, fn: Any, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; a configuration error exits with its sentence (code 2), no traceback.
    In a sweep the failed job is reported the same way and the sweep goes on."""
    try:
        return fn(cfg)
    except Exception as e:
        cause = config_error(e)
        if cause is None:
            raise
        job = _sweep_job()
        if job is not None:
            print(f"{prog}: error in sweep job {job}: {cause}", file=sys.stderr, flush=True)
            FAILED_JOBS.append(f"job {job}: {cause}")
            return {"error": cause}
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_train(cfg: DictConfig) -> Any:
    from kd.runs import train

    summary = one_sentence_errors("kd", train, cfg)
    metric = cfg.get("optimized_metric")
    if metric and isinstance(summary, dict) and "error" in summary:
        return float("nan")  # a failed trial, to the sweeper
    if metric and isinstance(summary, dict) and "validation" in summary:  # a sweeper (Optuna) optimises it
        validation = summary["validation"]
        if metric not in validation:
            print(f"kd: error: optimized_metric={metric} is not a validation metric of this run; choose one of "
                  f"{sorted(validation)}", file=sys.stderr)
            sys.exit(2)
        return validation[metric]
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_eval(cfg: DictConfig) -> dict[str, Any]:
    from kd.runs import evaluate

    return one_sentence_errors("kd-eval", evaluate, cfg)


def composition_error(config_name: str, argv: list[str]) -> str | None:
    """Compose the command line once (each sweep at its first value) and return why it
    cannot be composed, as one sentence, or None. Skipped for Hydra's own flags."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None  # --help, --cfg, -c, ...: Hydra's business
    overrides = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        first = []
        for o in parsed:
            if o.is_sweep_override():
                prefix = "+" if o.input_line.startswith("+") else ""
                first.append(f"{prefix}{o.key_or_group.lstrip('+')}={next(iter(o.sweep_string_iterator()))}")
            else:
                first.append(o.input_line)
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            compose(config_name, overrides=first)
    except Exception as e:
        return _one_sentence(e)
    finally:
        GlobalHydra.instance().clear()
    return None


#: settings that moved: the old key on the command line is answered with the new one
MOVED_KEYS = {"student.init_from_teacher": "student_init_from_teacher"}


def _one_sentence(e: Exception) -> str:
    """Hydra's multi-line composition errors as one sentence that names the fix."""
    text = str(e).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0].rstrip(".") if lines else type(e).__name__
    if head.startswith("Could not override"):
        for old, new in MOVED_KEYS.items():
            if head.startswith(f"Could not override '{old}'"):
                return f"{old} is now the top-level {new}; set {new}=<value> instead"
        return (f"{head}: the chosen config groups have no such key; check its spelling (a group's keys are in "
                "its yaml under conf/) or drop the override")
    if len(lines) > 2 and lines[1].startswith("Available options"):
        return f"{head}; choose one of: {', '.join(lines[2:])}"
    if type(e).__name__ == "OverrideParseException":
        return f"cannot parse an override ({head}); quote values with special characters, e.g. 'key=[1,2]'"
    return f"{head}; check the command line's overrides"


def _checked(prog: str, config_name: str, entry: Any) -> None:
    problem = composition_error(config_name, sys.argv[1:])
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    entry()


def main() -> None:
    """Console script ``kd``."""
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(f"kd: error: config directory {CONF_DIR} not found; install kd from its repository with pip install -e .")
    _checked("kd", "train", _hydra_train)


def eval_main() -> None:
    """Console script ``kd-eval``."""
    _checked("kd-eval", "eval", _hydra_eval)


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
        failed = FAILED_JOBS or [f"{r.get('output_dir')}: {r['error']}" for r in runs if r.get("error")]
        if failed:
            print(f"kd: error: {len(failed)} sweep job(s) failed, the others finished: " + "; ".join(failed),
                  file=sys.stderr, flush=True)
            sys.exit(2)


def report_main(argv: list[str] | None = None) -> None:
    """Console script ``kd-report DIR...`` (:func:`kd.report.main`)."""
    from kd.report import main

    main(argv)


if __name__ == "__main__":  # python -m kd.cli (how DDP relaunches it); kd.cli, not __main__, holds the state
    from kd.cli import main as kd_main

    kd_main()
