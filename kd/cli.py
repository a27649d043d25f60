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

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def one_sentence_errors(prog: str, fn: Any, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; a configuration error exits with its sentence (code 2), no traceback."""
    try:
        return fn(cfg)
    except Exception as e:
        cause = config_error(e)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_train(cfg: DictConfig) -> dict[str, Any]:
    from kd.runs import train

    return one_sentence_errors("kd", train, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_eval(cfg: DictConfig) -> dict[str, Any]:
    from kd.runs import evaluate

    return one_sentence_errors("kd-eval", evaluate, cfg)


def main() -> None:
    """Console script ``kd``."""
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(f"kd: error: config directory {CONF_DIR} not found; install kd from its repository with pip install -e .")
    _hydra_train()


def eval_main() -> None:
    """Console script ``kd-eval``."""
    _hydra_eval()


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print the table of every job (mean ± std over seeds)."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict) and "results" in value:
            self.runs.append(value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        runs = self.runs or load_runs([config.hydra.sweep.dir])
        if runs:
            print("\nSweep summary (mean ± std over seeds)\n" + summarize(runs, metric=headline_metric(runs)), flush=True)


def report_main(argv: list[str] | None = None) -> None:
    """Console script ``kd-report DIR...``: the summary table of finished runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="kd-report", description=report_main.__doc__)
    parser.add_argument("paths", nargs="+", help="run or sweep directories (searched for metrics.json)")
    parser.add_argument("--metric", default=None, help="metric to tabulate (default: test/exact_match if present, else test/acc)")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    print(summarize(runs, metric=args.metric or headline_metric(runs)))
