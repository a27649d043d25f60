"""What one ``kd`` or ``kd-eval`` command does, end to end, on top of :mod:`kd.build` and
:mod:`kd.subruns`.

:func:`train` (``kd``), in the run's own output directory:

1. builds the run (:func:`kd.build.build`): every part instantiated and every setting
   checked before anything trains;
2. prepares it (:func:`kd.subruns.prepare`): the teacher's weights (trained once and
   cached when its config has a ``fit`` section), the student's SFT start
   (``student_sft``), the student's teacher-layer initialisation;
3. trains the recipe, tests the best validation checkpoint, saves the student in its
   native format under ``student/``;
4. with ``scratch_baseline: true`` and a teacher, reports the same student trained without
   a teacher on the same data, epochs and optimizer (cached per seed; with
   ``student_sft``, that SFT);
5. with ``downstream`` set, fine-tunes every model of the table on the downstream task;
6. writes ``metrics.json`` and prints the table.

With ``pipeline`` set it runs the pipeline's stages instead (:mod:`kd.pipeline`).

:func:`evaluate` (``kd-eval``) tests a trained student, with the KL to a teacher when one
is configured, and writes ``eval.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd import ConfigError
from kd.cache import atomic_directory, atomic_write_text
from kd.build import build
from kd.checks import check_threads
from kd.config import instantiate, student_factory, student_tokenizer
from kd.evaluation import SCRATCH_ROW, SFT_ROW, headline_metric, summarize
from kd.export import save_student
from kd.models import count_parameters, load_weights
from kd.subruns import prepare, scratch_baseline

log = logging.getLogger("kd")


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe run as described in the module docstring; returns metrics.json's dict."""
    if cfg.get("pipeline"):  # kd pipeline=<name>: the stages in turn (kd/pipeline.py)
        from kd.pipeline import run_pipeline

        return run_pipeline(cfg)
    started = time.perf_counter()
    if check_threads(cfg):  # e.g. 1 per job when a launcher runs several jobs on a small machine
        import torch

        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.paths.output_dir)
    run = build(cfg)  # checks first: an output directory that cannot be written is refused in one sentence
    out.mkdir(parents=True, exist_ok=True)
    prepare(run)
    try:
        metrics = run.fit()
    except FloatingPointError as e:  # a non-finite loss: keep the work done so far, then one sentence
        raise ConfigError(_keep_work(run, out, str(e), started)) from None
    if run.trainer.global_rank != 0:  # DDP: the other ranks trained and tested; rank 0 writes the outputs
        return {}
    params = count_parameters(run.student)  # as trained (the export cuts padding rows past the tokenizer)
    _export(run, out)

    results: dict[str, dict[str, Any]] = {}
    baseline_weights = None
    if isinstance(run.teacher, dict):  # routed teachers: each in its own row
        for name, model in run.teacher.items():
            results[f"teacher {name}"] = {"params": count_parameters(model)}
    elif run.teacher is not None:
        teacher_metrics = {k.replace("test/teacher_", "test/"): v for k, v in metrics.items()
                           if k.startswith("test/teacher_")}
        results["teacher"] = {**teacher_metrics, "params": count_parameters(run.teacher)}
    if run.teacher is not None:
        if cfg.get("scratch_baseline"):
            baseline_weights, facts = scratch_baseline(cfg, run.cache)
            baseline_row = SFT_ROW if cfg.get("student_sft") else SCRATCH_ROW
            results[baseline_row] = {**facts["metrics"], "params": facts["params"]}
    results[run.label] = {**metrics, "params": params}
    if cfg.get("downstream"):  # fine-tune every model of the table on the downstream task
        task = instantiate(cfg.downstream)
        tokenizer = getattr(run.datamodule, "tokenizer", None)
        models = {run.label: run.student, **({"teacher": run.teacher} if isinstance(run.teacher, nn.Module) else {})}
        if baseline_weights is not None:
            models[baseline_row] = load_weights(instantiate(student_factory(cfg)[0]), baseline_weights)
        for name, model in models.items():
            if model is not None:
                results[name]["downstream/acc"] = task(model, tokenizer)

    summary = {
        "recipe": run.name,
        "seed": int(cfg.seed),
        "overrides": _overrides(),
        "output_dir": str(out),
        "teacher": run.teacher_info.get("source") if not isinstance(run.teacher, dict) else {
            name: info.get("source") for name, info in run.teacher_info.items()},
        "results": results,
        "validation": run.validation,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    curves = _curves(out)
    print("\n" + summarize([summary], metric=headline_metric([summary])) + f"\n\noutputs: {out}"
          + (f"\ntraining curves: {curves}" if curves else "") + "\n", flush=True)
    return summary


def _curves(out: Path) -> Path | None:
    """The run's training curves as ``curves.png`` (:func:`kd.report.plot_curves`) when its
    loggers left any; a plotting failure is a warning, never a lost run."""
    try:
        from kd.report import plot_curves

        return plot_curves([out], out / "curves.png")
    except Exception as e:  # noqa: BLE001 - the run's results are already on disk
        log.warning("could not plot the training curves (%s: %s)", type(e).__name__, e)
        return None


def _export(run: Any, out: Path) -> Path:
    """Write the student to ``out/student``, whole or not at all (:func:`kd.cache.atomic_directory`)."""
    with atomic_directory(out / "student") as partial:
        save_student(run.recipe.student, partial, tokenizer=getattr(run.datamodule, "tokenizer", None))
        OmegaConf.save(run.cfg.student, partial / "model_config.yaml")
    return out / "student"


def _keep_work(run: Any, out: Path, reason: str, started: float) -> str:
    """After training stopped on a non-finite loss: export the student of the best (else
    the last) checkpoint written so far, or the live weights when they are still finite,
    write ``metrics.json`` saying what happened, and return the sentence to print."""
    import torch

    checkpoints = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    callback = run.trainer.checkpoint_callback
    best = Path(getattr(callback, "best_model_path", "") or "") if callback is not None else None
    source = best if best is not None and best.is_file() else (checkpoints[-1] if checkpoints else None)
    if source is not None:
        state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
        run.recipe.load_state_dict(state, strict=False)
    finite = all(torch.isfinite(p).all() for p in run.student.parameters())
    exported = _export(run, out) if finite else None
    summary = {"recipe": run.name, "seed": int(run.cfg.seed), "overrides": _overrides(), "output_dir": str(out),
               "error": reason, "student_from": str(source) if source is not None else "last weights",
               "results": {}, "wall_time_s": round(time.perf_counter() - started, 2)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    kept = f"the student of {source.name} is exported to {exported}" if exported and source else (
        f"the last weights are exported to {exported}" if exported else "no finite weights to export")
    return f"{reason.rstrip('.')}; {kept}"


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
    prepare(run)
    results = run.trainer.test(run.recipe, datamodule=run.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    atomic_write_text(out / "eval.json", json.dumps(metrics, indent=2))
    width = max(len(k) for k in metrics) if metrics else 0
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics


__all__ = ["train", "evaluate"]
