"""Hydra entry points: ``kd`` (train one recipe run, or a sweep with ``-m``) and
``kd-report`` (summarize finished runs). The only module of kd that imports Hydra.

One ``kd`` run, in its own output directory (``outputs/runs/<date>/<time>``):

1. seeds everything with ``seed``; builds the datamodule (``data``), the student and the
   teacher model;
2. builds the recipe (so bad settings fail before any training), then loads the
   teacher's weights (``teacher``): from ``teacher.checkpoint``, or, when that is
   null and the teacher config has a ``fit`` section, trains it once with the supervised
   recipe and caches it under ``paths.cache_dir`` keyed by a hash of everything that
   shapes it (model, data, fit settings, trainer, kd version); later runs and sweep jobs
   reuse it;
3. trains the recipe, tests the best validation checkpoint, saves the student in its
   native format under ``student/``;
4. with ``student_sft`` set, starts the student from its supervised fine-tune (trained once
   per seed and cached, like the teacher), as MiniLLM and GKD do;
5. with ``scratch_baseline: true`` (and a recipe that uses a teacher) also trains the same
   student without a teacher on the same data, epochs and optimizer (cached the same way,
   per seed), so every run reports a fair comparison;
   (with ``student_sft``, the baseline is that SFT);
6. writes ``metrics.json`` and prints a table: teacher / student from scratch / distilled.

Errors of configuration (:class:`kd.ConfigError`) are printed as one sentence, exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import kd
from kd import ConfigError
from kd.evaluation import headline_metric, load_runs, summarize
from kd.models import (
    check_same_tokenizer,
    init_from_teacher,
    count_parameters,
    load_tokenizer,
    load_weights,
    read_state_dict,
    save_model,
)
from kd.recipe import DistillationRecipe

log = logging.getLogger("kd")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# ----------------------------------------------------------------------------- helpers


def config_hash(*parts: Any) -> str:
    """A stable hash of config fragments (resolved) plus the kd version."""
    plain = [OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts]
    blob = json.dumps([kd.__version__, plain], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _has_teacher(cfg: DictConfig) -> bool:
    return bool(cfg.get("teacher"))


def _recipe_class(cfg: DictConfig) -> type[DistillationRecipe]:
    cls = get_class(cfg.recipe._target_)
    if not (isinstance(cls, type) and issubclass(cls, DistillationRecipe)):
        raise ConfigError(f"recipe._target_ {cfg.recipe._target_} is not a kd.recipe.DistillationRecipe subclass")
    return cls


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a name -> config mapping (loggers, callbacks)."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def _choice(group: str, default: str = "") -> str:
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group, default))
    return default


def _student_tokenizer(cfg: DictConfig) -> Any:
    """The tokenizer saved with a pretrained student (``student.name_or_path``), if any."""
    name = cfg.student.get("name_or_path") if isinstance(cfg.get("student"), DictConfig) else None
    if not name:
        return None
    try:
        return load_tokenizer(str(name))
    except Exception:  # a model without a tokenizer: nothing to compare
        return None


def _check_tokenizers(cfg: DictConfig, datamodule: Any, teacher: Any) -> None:
    """Same-tokenizer recipes: the data's tokenizer must be the student's and the teacher's
    (same ids for the same strings), checked before any training."""
    if not hasattr(datamodule, "tokenizer"):
        return
    datamodule.setup("fit")
    student_tok = _student_tokenizer(cfg)
    if student_tok is not None:
        check_same_tokenizer(datamodule.tokenizer, student_tok, "the data's and the student's")
    if teacher is None:
        return
    if cfg.teacher.get("tokenizer") or ((cfg.teacher.get("fit") or {}).get("data")):  # it may have its own
        check_same_tokenizer(datamodule.tokenizer, teacher_tokenizer(cfg), "the data's and the teacher's")


def teacher_tokenizer(cfg: DictConfig) -> Any:
    """The teacher's own tokenizer, for cross-tokenizer recipes: ``teacher.tokenizer`` or
    the teacher model's ``name_or_path`` when set; else, for a teacher trained by ``kd``
    (a ``fit`` section), the tokenizer of the data it is trained on (``fit.data`` applied)."""
    t = cfg.teacher
    name = t.get("tokenizer") or (t.model.get("name_or_path") if isinstance(t.get("model"), DictConfig) else None)
    if name:
        return load_tokenizer(str(name))
    if t.get("fit") and "tokenizer" in cfg.data:
        datamodule = instantiate(_sub_run(cfg, merge={"data": t.fit.get("data") or {}}).data)
        if hasattr(datamodule, "load_tokenizer"):
            return datamodule.load_tokenizer()
        datamodule.setup("fit")
        return datamodule.tokenizer
    raise ConfigError("this recipe needs the teacher's own tokenizer; name it with teacher.tokenizer=<hub name or "
                      "directory>")


def fit_and_test(cfg: DictConfig, recipe: DistillationRecipe, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Train ``recipe`` with the trainer, loggers and callbacks of ``cfg``, then test the
    checkpoint with the best validation score (the last weights when none was kept).
    Returns the test metrics as floats."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # same batch order for every recipe
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    plain = {k: v for k, v in cfg.items() if k != "hydra"}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
    trainer.fit(recipe, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    results = trainer.test(recipe, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _sub_run(cfg: DictConfig, **changes: Any) -> DictConfig:
    """A copy of ``cfg`` with keys (dotted paths) replaced; dict values under ``merge``
    are merged into the existing node instead (``merge={"data": {...}}``)."""
    merges = changes.pop("merge", {}) or {}
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):
        if "student" not in changes:  # it may refer to nodes a change removes (student=from_teacher)
            sub.student = OmegaConf.to_container(cfg.student, resolve=True)
        for key, value in changes.items():
            OmegaConf.update(sub, key, value, merge=False)
        for key, value in merges.items():
            OmegaConf.update(sub, key, value, merge=True)
    return sub


def _train_supervised(cfg: DictConfig) -> tuple[DistillationRecipe, dict[str, float]]:
    """Train ``cfg.student`` without a teacher (recipes.supervised) under ``cfg``."""
    from recipes.supervised import Supervised

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    recipe = Supervised(
        student=instantiate(cfg.student),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    return recipe, fit_and_test(cfg, recipe, datamodule)


#: data settings that change what a run reports but not the weights it trains
EVAL_ONLY = ("generation_eval_size", "eval_batch_size", "max_new_tokens", "eval_seed")

#: trainer settings that change neither the weights nor the metrics
COSMETIC = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def _run_key(cfg: DictConfig, weights_only: bool = False) -> str:
    """Hash of everything that shapes what a supervised run of ``cfg`` produces; with
    ``weights_only``, of what shapes its weights (a teacher's metrics are not reused, so
    evaluation-only settings do not retrain it)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    skip = ("num_workers", "cache_dir") + (EVAL_ONLY if weights_only else ())
    return config_hash(
        cfg.student,
        cfg.optimizer,
        cfg.get("scheduler"),
        cfg.seed,
        {k: v for k, v in trainer.items() if k not in COSMETIC},
        {k: v for k, v in data.items() if k not in skip},
    )


def _cached_supervised(kind: str, prefix: str, cfg: DictConfig, **changes: Any) -> Path:
    """Directory ``<paths.cache_dir>/<kind>/<prefix>-<hash>`` holding ``model.safetensors``
    and ``meta.json`` of a supervised run of ``cfg`` with ``changes`` (see :func:`_sub_run`),
    the hash covering everything that shapes the result. Trained when missing or
    unreadable, in a temporary directory renamed into place, so a crash never leaves a
    half-written entry."""
    # no loggers, no teacher; a resumed run's checkpoint belongs to its own recipe
    sub = _sub_run(cfg, logger={}, teacher=None, ckpt_path=None, **changes)
    name = f"{prefix}-{_run_key(sub, weights_only=kind == 'teachers')}"
    root = Path(cfg.paths.cache_dir).expanduser() / kind
    final = root / name
    meta_file = final / "meta.json"
    if meta_file.is_file():
        try:
            if json.loads(meta_file.read_text()).get("name") == name:
                read_state_dict(final)
                log.info("reusing cached %s %s", kind.rstrip("s"), final)
                return final
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("cached %s at %s is unreadable (%s); rebuilding it", kind.rstrip("s"), final, e)
        shutil.rmtree(final, ignore_errors=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("training the %s once (cached afterwards in %s)", kind.rstrip("s"), final)
    with open_dict(sub):
        sub.paths.output_dir = str(tmp)
    started = time.perf_counter()
    recipe, metrics = _train_supervised(sub)
    save_model(recipe.student, tmp)
    meta = {"name": name, "kd_version": kd.__version__, "metrics": metrics, "params": count_parameters(recipe.student),
            "wall_time_s": round(time.perf_counter() - started, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same entry first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_teacher(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """Fill the teacher ``model`` (built from ``cfg.teacher.model``) with its weights and
    say where they came from: ``teacher.checkpoint``; else, when the config has a ``fit``
    section, a supervised run trained once and cached (``fit`` sets its epochs, seed,
    optimizer and, under ``fit.data``, changes to the data config); else the model
    factory (pretrained models)."""
    t = cfg.teacher
    if t.get("checkpoint"):
        load_weights(model, t.checkpoint)
        return {"source": str(t.checkpoint)}
    if not t.get("fit"):
        return {"source": "model factory"}
    path = _fitted("teachers", _choice("teacher", "teacher"), cfg, t.model, t.fit)
    load_weights(model, path)
    return {"source": str(path), **json.loads((path / "meta.json").read_text())}


def _fitted(kind: str, prefix: str, cfg: DictConfig, model: DictConfig, fit: DictConfig) -> Path:
    """The cached supervised run of ``model`` described by a ``fit`` section (epochs, seed,
    optimizer, scheduler and, under ``fit.data``, changes to the data config)."""
    return _cached_supervised(
        kind,
        prefix,
        cfg,
        student=model,
        optimizer=fit.optimizer,
        scheduler=fit.get("scheduler"),
        seed=fit.get("seed", cfg.seed),
        merge={"data": fit.get("data") or {}},
        **{"trainer.max_epochs": fit.max_epochs},
    )


def student_sft(cfg: DictConfig) -> Path:
    """The supervised fine-tune of ``cfg.student`` that ``student_sft`` describes (one per
    seed, cached): the starting point of recipes that distil from an SFT student."""
    return _fitted("sft", f"{_choice('student', 'student')}-seed{cfg.seed}", cfg, cfg.student, cfg.student_sft)


def scratch_baseline(cfg: DictConfig) -> Path:
    """Cache directory (weights and ``meta.json``) of ``cfg.student`` trained without a
    teacher, everything else equal; with ``student_sft`` set, the SFT the distilled student
    started from."""
    if cfg.get("student_sft"):
        return student_sft(cfg)
    return _cached_supervised("baselines", f"{_choice('student', 'student')}-seed{cfg.seed}", cfg)


# ----------------------------------------------------------------------------- the run


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one recipe run as described in the module docstring; returns metrics.json's dict."""
    started = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_cls = _recipe_class(cfg)
    recipe_name = _choice("recipe", recipe_cls.__name__.lower())

    teacher = None
    resume = cfg.get("ckpt_path")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"ckpt_path '{resume}' does not exist; pass a run's checkpoints/last.ckpt or set ckpt_path=null")
    if recipe_cls.needs_teacher and not _has_teacher(cfg):
        raise ConfigError(f"recipe {recipe_name} needs a teacher; choose one with teacher=<config> (see conf/teacher/)")

    # Build everything cheap first, so a bad setting fails before any training. The
    # student is created right after seeding, as in the scratch baseline: same init.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    if recipe_cls.cross_tokenizer and _has_teacher(cfg):
        if not hasattr(datamodule, "teacher_tokenizer"):
            raise ConfigError(f"recipe {recipe_name} distils language models across tokenizers; use language-model "
                              "data (data=task, data=jsonl, data=hf, data=chatterbot)")
        datamodule.teacher_tokenizer = datamodule.teacher_tokenizer or teacher_tokenizer(cfg)
    regime = instantiate(cfg.regime) if cfg.get("regime") else None
    if regime is not None:
        regime.validate(datamodule)
    student = instantiate(cfg.student)
    if cfg.get("student_sft"):
        load_weights(student, student_sft(cfg))
    if recipe_cls.needs_teacher:
        teacher = instantiate(cfg.teacher.model)
    recipe = instantiate(
        cfg.recipe,
        student=student,
        teacher=teacher,
        divergence=instantiate(cfg.divergence) if cfg.get("divergence") else None,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        regime=regime,
        _recursive_=False,
    )
    _check_tokenizers(cfg, datamodule, teacher if not recipe_cls.cross_tokenizer else None)
    teacher_meta = load_teacher(cfg, teacher) if teacher is not None else {}
    label = f"student, {recipe_name}" if teacher is not None else (
        "student, SFT + more supervised" if cfg.get("student_sft") else "student, from scratch")
    scheme = getattr(student, "kd_init_from_teacher", None)
    if scheme is not None:  # student=from_teacher: copy the trained teacher's layers into it
        source = teacher
        if source is None:  # a recipe without a teacher: the "teacher init, no KD" ablation
            if not _has_teacher(cfg):
                raise ConfigError("this student is initialised from a teacher's layers; choose one with teacher=<config>")
            source = instantiate(cfg.teacher.model)
            load_teacher(cfg, source)
            label = "student, teacher init (no KD)"
        mapping = init_from_teacher(student, source, scheme)
        log.info("student initialised from the teacher: student layer i <- teacher layer %s[i]", mapping)
    metrics = fit_and_test(cfg, recipe, datamodule)
    recipe.save_student(out / "student", tokenizer=getattr(datamodule, "tokenizer", None))
    OmegaConf.save(cfg.student, out / "student" / "model_config.yaml")

    results: dict[str, dict[str, Any]] = {}
    if teacher is not None:
        teacher_metrics = {k.replace("test/teacher_", "test/"): v for k, v in metrics.items() if k.startswith("test/teacher_")}
        results["teacher"] = {**teacher_metrics, "params": count_parameters(teacher)}
        if cfg.get("scratch_baseline"):
            base_dir = scratch_baseline(cfg)
            base = json.loads((base_dir / "meta.json").read_text())
            results["student, from scratch"] = {**base["metrics"], "params": base["params"]}
    results[label] = {**metrics, "params": count_parameters(student)}
    if cfg.get("downstream"):  # fine-tune every model of the table on the downstream task
        task = instantiate(cfg.downstream)
        tok = getattr(datamodule, "tokenizer", None)
        models = {label: student, "teacher": teacher}
        if "student, from scratch" in results:
            models["student, from scratch"] = load_weights(instantiate(cfg.student), base_dir)
        for name, model in models.items():
            if model is not None:
                results[name]["downstream/acc"] = task(model, tok)

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    summary = {
        "recipe": recipe_name,
        "seed": int(cfg.seed),
        "overrides": overrides,
        "output_dir": str(out),
        "teacher": teacher_meta.get("source"),
        "results": results,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print("\n" + summarize([summary], metric=headline_metric([summary])) + f"\n\noutputs: {out}\n", flush=True)
    return summary


def _one_sentence_errors(prog: str, fn: Any, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)``; a configuration error exits with its sentence (code 2), no traceback."""
    try:
        return fn(cfg)
    except Exception as e:
        cause = _config_error(e)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return _one_sentence_errors("kd", run, cfg)


def _config_error(e: BaseException | None) -> ConfigError | None:
    """The ConfigError behind ``e`` (Hydra's instantiate wraps what constructors raise)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ConfigError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def main() -> None:
    """Console script ``kd``."""
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(f"kd: error: config directory {CONF_DIR} not found; install kd from its repository with pip install -e .")
    _hydra_main()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.student`` on ``cfg.data`` (exact match, perplexity, accuracy; the KL to
    the teacher when one is configured); writes ``eval.json`` in the output directory."""
    from recipes.supervised import Supervised

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if "tokenizer" in cfg.data and not cfg.data.tokenizer and _student_tokenizer(cfg) is not None:
        with open_dict(cfg):
            cfg.data.tokenizer = str(cfg.student.name_or_path)  # evaluate with the student's own tokenizer
    datamodule = instantiate(cfg.data)
    student = instantiate(cfg.student)
    teacher = instantiate(cfg.teacher.model) if _has_teacher(cfg) else None
    _check_tokenizers(cfg, datamodule, teacher)
    recipe = Supervised(student=student, teacher=teacher)
    if teacher is not None:
        load_teacher(cfg, teacher)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=_instantiate_all(cfg.get("logger")) or False, callbacks=[])
    results = trainer.test(recipe, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    width = max(len(k) for k in metrics) if metrics else 0
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_eval(cfg: DictConfig) -> dict[str, Any]:
    return _one_sentence_errors("kd-eval", evaluate, cfg)


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
