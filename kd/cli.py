"""Console scripts: ``kd`` (train a recipe, or a sweep with ``-m``), ``kd-eval`` (test a
trained student) and ``kd-report`` (summarize finished runs).

A thin shell: Hydra parses the command line and composes the config, :mod:`kd.runs` does
the work (through the composition root, :mod:`kd.build`), and a configuration error
(:class:`kd.ConfigError`, wherever it is raised) is printed as its one sentence with exit
code 2 instead of a traceback. A run stopped by SIGTERM or Ctrl-C prints the sentence that
resumes it and exits with 143 or 130 (:mod:`kd.resume`), a sweep included.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kd import config_error
from kd.resume import (EXIT_CODES, Stopped, in_worker, outside_run_stop_message, received, stop_handlers, stop_message,
                       worker_stop_handlers, worker_stopped)
from kd.sweeps import FAILED_FILE, FAILED_JOBS, failed_trial_value, job_failure, note_failure, sweep_job

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # also kd.config.CONF_DIR


def _stopped(prog: str, name: str, cfg: DictConfig) -> None:
    """Exit after a stop signal: the sentence that resumes the run, and the signal's code
    (:data:`kd.resume.EXIT_CODES`); in a sweep this stops the sweep too."""
    from hydra.core.hydra_config import HydraConfig

    if prog == "kd":
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        message = stop_message(name, cfg, overrides, job=sweep_job())
    else:
        message = f"stopped by {name}; run the same command again"
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    if in_worker():  # a joblib worker: it takes no further job (its sweep's process waits, then ends it)
        worker_stopped(EXIT_CODES[name])
    sys.exit(EXIT_CODES[name])


def one_sentence_errors(prog: str, fn: Any, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; a configuration error exits with its sentence (code 2), no traceback.
    In a sweep any failed job (a configuration error or any other exception) is reported in
    one sentence and the sweep goes on; it exits with code 2 at its end (:class:`SweepSummary`).
    A stop signal (SIGTERM, Ctrl-C), whatever it raised on its way out, exits with its
    sentence and code."""
    job = sweep_job()
    if job is not None:  # a sweep re-run into the same directory: its earlier failure is not this one's
        from hydra.core.hydra_config import HydraConfig

        (Path(HydraConfig.get().runtime.output_dir) / FAILED_FILE).unlink(missing_ok=True)
    with worker_stop_handlers():  # a job in a worker process (joblib) handles its own stop signals
        try:
            return fn(cfg)
        except BaseException as e:
            name = received()
            if name is not None:
                _stopped(prog, name, cfg)
            if not isinstance(e, Exception):
                raise
            cause = config_error(e)
            if job is not None:
                reason = str(cause) if cause is not None else job_failure(e)
                print(f"{prog}: error in sweep job {job}: {reason}", file=sys.stderr, flush=True)
                FAILED_JOBS.append(f"job {job}: {reason}")
                note_failure(f"job {job}: {reason}")
                return {"error": reason}
            if cause is None:
                raise
            print(f"{prog}: error: {cause}", file=sys.stderr)
            sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_train(cfg: DictConfig) -> Any:
    from kd.runs import train

    summary = one_sentence_errors("kd", train, cfg)
    metric = cfg.get("optimized_metric")
    if metric and isinstance(summary, dict) and "error" in summary:
        return failed_trial_value()  # a failed trial, to the sweeper: its worst value
    if metric and isinstance(summary, dict) and "validation" in summary:  # a sweeper (Optuna) optimises it
        validation = summary["validation"]
        if metric not in validation:  # every job would fail alike: the sweep stops at its first
            print(f"kd: error: optimized_metric={metric} is not a validation metric of this run"
                  f"{'' if sweep_job() is None else ' (sweep job ' + sweep_job() + '; the sweep stops)'}; choose one "
                  f"of {sorted(validation)}", file=sys.stderr)
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

    from kd.checks import composition_sentence, output_dir_error

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
            hydra_overrides = [a for a in argv if not a.startswith("-") and a.lstrip("+~").startswith("hydra")]
            return output_dir_error(compose(config_name, overrides=first + hydra_overrides, return_hydra_config=True),
                                     multirun=any(a in ("-m", "--multirun") for a in argv))
    except Exception as e:
        return composition_sentence(e)
    finally:
        GlobalHydra.instance().clear()



def _checked(prog: str, config_name: str, entry: Any) -> None:
    with stop_handlers():
        try:
            problem = composition_error(config_name, sys.argv[1:])
            if problem is not None:
                print(f"{prog}: error: {problem}", file=sys.stderr)
                sys.exit(2)
            entry()
        except (Stopped, KeyboardInterrupt):  # a stop signal outside any run (a run's own ends in _stopped)
            name = received()
            if name is None:
                raise
            print(f"{prog}: {outside_run_stop_message(name)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODES[name])


def main() -> None:
    """Console script ``kd`` (``kd cache ...``: :mod:`kd.cache_command`)."""
    if sys.argv[1:2] == ["cache"]:
        from kd.cache_command import main as cache_main

        sys.exit(cache_main(sys.argv[2:]))
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(f"kd: error: config directory {CONF_DIR} not found; install kd from its repository with pip install -e .")
    _checked("kd", "train", _hydra_train)


def eval_main() -> None:
    """Console script ``kd-eval``."""
    _checked("kd-eval", "eval", _hydra_eval)


def report_main(argv: list[str] | None = None) -> None:
    """Console script ``kd-report DIR...`` (:func:`kd.report.main`)."""
    __import__("kd.report").report.main(argv)


if __name__ == "__main__":  # python -m kd.cli (how DDP relaunches it); kd.cli, not __main__, holds the state
    from kd.cli import main as kd_main

    kd_main()
