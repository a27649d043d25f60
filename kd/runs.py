"""What one ``kd`` or ``kd-eval`` command does, end to end, on top of :mod:`kd.build`.

:func:`train` (``kd``), in the run's own output directory:

1. builds the run (:func:`kd.build.build`): every part instantiated and every setting
   checked before anything trains;
2. prepares it (:meth:`kd.build.Run.prepare`): the teacher's weights (trained once and
   cached when its config has a ``fit`` section), the student's SFT start
   (``student_sft``), the student's teacher-layer initialisation;
3. trains the recipe, tests the best validation checkpoint, saves the student in its
   native format under ``student/``;
4. with ``scratch_baseline: true`` and a teacher, reports the same student trained without
   a teacher on the same data, epochs and optimizer (cached per seed; with
   ``student_sft``, that SFT);
5. with ``downstream`` set, fine-tunes every model of the table on the downstream task;
6. writes ``metrics.json`` and prints the table.

:func:`evaluate` (``kd-eval``) tests a trained student, with the KL to a teacher when one
is configured, and writes ``eval.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kd.build import build, instantiate, scratch_baseline, student_factory, student_tokenizer
from kd.evaluation import headline_metric, summarize
from kd.models import count_parameters, load_weights

#: the scratch baseline's row in the result table
SCRATCH = "student, from scratch"


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe run as described in the module docstring; returns metrics.json's dict."""
    started = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    run.prepare()
    metrics = run.fit()
    run.recipe.save_student(out / "student", tokenizer=getattr(run.datamodule, "tokenizer", None))
    OmegaConf.save(cfg.student, out / "student" / "model_config.yaml")

    results: dict[str, dict[str, Any]] = {}
    baseline_weights = None
    if run.teacher is not None:
        teacher_metrics = {k.replace("test/teacher_", "test/"): v for k, v in metrics.items()
                           if k.startswith("test/teacher_")}
        results["teacher"] = {**teacher_metrics, "params": count_parameters(run.teacher)}
        if cfg.get("scratch_baseline"):
            baseline_weights, facts = scratch_baseline(cfg, run.cache)
            results[SCRATCH] = {**facts["metrics"], "params": facts["params"]}
    results[run.label] = {**metrics, "params": count_parameters(run.student)}
    if cfg.get("downstream"):  # fine-tune every model of the table on the downstream task
        task = instantiate(cfg.downstream)
        tokenizer = getattr(run.datamodule, "tokenizer", None)
        models = {run.label: run.student, "teacher": run.teacher}
        if baseline_weights is not None:
            models[SCRATCH] = load_weights(instantiate(student_factory(cfg)[0]), baseline_weights)
        for name, model in models.items():
            if model is not None:
                results[name]["downstream/acc"] = task(model, tokenizer)

    summary = {
        "recipe": run.name,
        "seed": int(cfg.seed),
        "overrides": _overrides(),
        "output_dir": str(out),
        "teacher": run.teacher_info.get("source"),
        "results": results,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print("\n" + summarize([summary], metric=headline_metric([summary])) + f"\n\noutputs: {out}\n", flush=True)
    return summary


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test ``cfg.student`` on ``cfg.data`` (exact match, perplexity, accuracy; the KL to
    the teacher when one is configured); writes ``eval.json`` in the output directory."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "tokenizer" in cfg.data and not cfg.data.tokenizer and student_tokenizer(cfg) is not None:
        with open_dict(cfg):
            cfg.data.tokenizer = str(cfg.student.name_or_path)  # evaluate with the student's own tokenizer
    with open_dict(cfg):
        cfg.callbacks = None
    run = build(cfg, teacher=True)
    run.prepare()
    results = run.trainer.test(run.recipe, datamodule=run.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    width = max(len(k) for k in metrics) if metrics else 0
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics


__all__ = ["train", "evaluate"]
