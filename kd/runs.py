"""What one ``kd`` or ``kd-eval`` command does, end to end, on top of :mod:`kd.build` and
:mod:`kd.subruns`.

:func:`train` (``kd``), in the run's own output directory:

1. builds the run (:func:`kd.build.build`): every part instantiated and every setting
   checked before anything trains, ``ckpt_path`` included (:func:`kd.resume.check_resume`);
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
from kd.console import quiet
from kd.evaluation import SCRATCH_ROW, SFT_ROW, headline_metric, summarize
from kd.export import save_student
from kd.models import count_parameters, load_weights
from kd.resume import RecordSettings, check_resume
from kd.subruns import check_cache, prepare, scratch_baseline

log = logging.getLogger("kd")


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe run as described in the module docstring; returns metrics.json's dict.
    A teacher's server that the run launched (:mod:`kd.served`) is stopped however it ends."""
    from kd.served import live_servers, stop_servers

    running = live_servers()
    try:
        quiet()  # kd's lines, progress bars and the table; not the libraries' banners (kd.console)
        return _train(cfg)
    finally:
        stop_servers(keep=running)


def _train(cfg: DictConfig) -> dict[str, Any]:
    if cfg.get("pipeline"):  # kd pipeline=<name>: the stages in turn (kd/pipeline.py)
        from kd.pipeline import run_pipeline

        return run_pipeline(cfg)
    started = time.perf_counter()
    if check_threads(cfg):  # e.g. 1 per job when a launcher runs several jobs on a small machine
        import torch

        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.paths.output_dir)
    overwrite = _refuse_finished(out, cfg)
    run = build(cfg)  # checks first: an output directory that cannot be written is refused in one sentence
    out.mkdir(parents=True, exist_ok=True)
    check_resume(cfg, run.recipe)  # a ckpt_path this run cannot continue is refused before any teacher trains
    run.trainer.callbacks.append(RecordSettings(cfg))  # its checkpoints say what a resume may not change
    check_cache(cfg)  # a read-only cache lacking a teacher, SFT or baseline is refused before any trains
    if overwrite:
        _clear_finished(out)
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
    write_json(out / "metrics.json", summary)
    curves = _curves(out, run.label, facts.get("curves") if baseline_weights is not None else None,
                     baseline_row if baseline_weights is not None else SCRATCH_ROW)
    print("\n" + summarize([summary], metric=headline_metric([summary])) + f"\n\noutputs: {out}"
          + (f"\ntraining curves: {curves}" if curves else "") + "\n", flush=True)
    return summary


#: what a finished run leaves in its output directory and ``overwrite=true`` removes before
#: the new run trains (logs and Hydra's ``.hydra/`` are left to accumulate or be rewritten)
FINISHED_OUTPUTS = ("metrics.json", "checkpoints", "student", "curves.png")


def _refuse_finished(out: Path, cfg: DictConfig) -> bool:
    """Refuse an output directory that already holds a finished run (its ``metrics.json``),
    e.g. an explicit ``hydra.run.dir`` given twice, unless ``overwrite=true``: its
    checkpoints would mix with the new run's. Resuming from a checkpoint of that directory
    (``ckpt_path``) continues the same run and is not refused. Returns whether the old run
    is to be replaced."""
    if not (out / "metrics.json").is_file():
        return False
    resume = cfg.get("ckpt_path")
    if resume and (out / "checkpoints").resolve() in Path(str(resume)).expanduser().resolve().parents:
        return False  # the same run, resumed from its own checkpoint (e.g. to train more epochs)
    if not cfg.get("overwrite"):
        raise ConfigError(f"the output directory {out} already holds a finished run (its metrics.json); choose "
                          "another hydra.run.dir, or pass overwrite=true to replace that run's checkpoints, "
                          "student and metrics.json")
    return True


def _clear_finished(out: Path) -> None:
    """Remove the outputs of the finished run ``out`` held (``overwrite=true``)."""
    import shutil

    for name in FINISHED_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    log.warning("overwrite=true: removed the earlier run's %s in %s", ", ".join(FINISHED_OUTPUTS), out)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON at ``path`` whole or not at all (:func:`kd.cache.atomic_write_text`:
    a run killed mid-write leaves the old file or none; a full disk is one sentence)."""
    atomic_write_text(path, json.dumps(value, indent=2))


def _curves(out: Path, label: str, baseline: dict[str, list] | None = None,
            baseline_label: str = SCRATCH_ROW) -> Path | None:
    """The run's training curves as ``curves.png`` (:func:`kd.report.plot_curves`: the
    teacher's validation values as lines, ``baseline``'s validation curves, the scratch
    student's or the SFT's as its cached sub-run recorded them, overlaid) when its loggers
    left any; a plotting failure is a warning, never a lost run."""
    try:
        from kd.report import plot_curves

        overlay = {tag: [(int(step), float(v)) for step, v in points] for tag, points in (baseline or {}).items()}
        return plot_curves([out], out / "curves.png", [label], overlay, baseline_label)
    except Exception as e:  # noqa: BLE001 - the run's results are already on disk
        log.warning("could not plot the training curves (%s: %s)", type(e).__name__, e)
        return None


def _export(run: Any, out: Path) -> Path:
    """Write the student to ``out/student``, whole or not at all (:func:`kd.cache.atomic_directory`)."""
    with atomic_directory(out / "student") as partial:
        save_student(run.recipe.student, partial, tokenizer=getattr(run.datamodule, "tokenizer", None))
        OmegaConf.save(run.cfg.student, partial / "model_config.yaml")
    return out / "student"


def _finite_checkpoint(path: Path) -> dict | None:
    """The state dict of checkpoint ``path`` when it is finite: every student weight finite,
    and the validation loss it records (a checkpoint callback's ``current_score``), if any,
    finite too (huge weights that still fit a float validate to NaN); else None."""
    import math

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not a candidate
        return None
    if not all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("student.") and v.is_floating_point()):
        return None
    for callback in (ckpt.get("callbacks") or {}).values():
        score = callback.get("current_score") if isinstance(callback, dict) else None
        if score is not None and not math.isfinite(float(score)):
            return None
    return state


def _keep_work(run: Any, out: Path, reason: str, started: float) -> str:
    """After training stopped on a non-finite loss: export the student of the best
    checkpoint when it is finite (:func:`_finite_checkpoint`), else of the most recent
    finite one, write ``metrics.json`` saying what happened, and return the sentence to
    print. The live weights are never exported: the loss diverged on them."""
    folder = out / "checkpoints"
    checkpoints = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    callback = run.trainer.checkpoint_callback
    best = Path(getattr(callback, "best_model_path", "") or "") if callback is not None else None
    if best is not None and best in checkpoints:
        checkpoints.remove(best)
        checkpoints.insert(0, best)
    source = None
    for path in checkpoints:
        state = _finite_checkpoint(path)
        if state is not None:
            run.recipe.load_state_dict(state, strict=False)
            source = path
            break
    exported = _export(run, out) if source is not None else None
    summary = {"recipe": run.name, "seed": int(run.cfg.seed), "overrides": _overrides(), "output_dir": str(out),
               "error": reason, "student_from": str(source) if source is not None else None,
               "results": {}, "wall_time_s": round(time.perf_counter() - started, 2)}
    write_json(out / "metrics.json", summary)
    kept = (f"the student of {source.name} is exported to {exported}" if exported is not None else
            "no checkpoint with finite weights and validation loss was written before, so no student is exported")
    return f"{reason.rstrip('.')}; {kept}"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test ``cfg.student`` on ``cfg.data`` (exact match, perplexity, accuracy; the KL to
    the teacher when one is configured); writes ``eval.json`` in the output directory.
    A teacher's server that it launched (:mod:`kd.served`) is stopped as soon as the test
    ends, however it ends (an error, SIGTERM), not at the process's exit."""
    from kd.served import live_servers, stop_servers

    running = live_servers()
    try:
        quiet()
        return _evaluate(cfg)
    finally:
        stop_servers(keep=running)


def _evaluate(cfg: DictConfig) -> dict[str, float]:
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
    write_json(out / "eval.json", metrics)
    width = max(len(k) for k in metrics) if metrics else 0
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics


__all__ = ["train", "evaluate"]
