"""Where a run's weights come from when they are not the model factory's: the teacher's (a
checkpoint, or a supervised run trained once and cached), the student's SFT start, the
student's teacher-layer initialisation (:func:`prepare`), and the scratch baseline reported
next to the distilled student.

A cached sub-run is a run of its own: :func:`kd.build.build` on a derived config
(:func:`kd.config.sub_config`), prepared, fitted and saved into a :mod:`kd.cache` entry
(:func:`cached_run`). Teachers, SFTs and baselines (:func:`cached_supervised`) train the
no-teacher recipe named by ``supervised_recipe``, with no teacher, no divergence, the offline
regime and no loggers; a pipeline's stages (:mod:`kd.pipeline`) are cached runs too. Every
entry is named by one key, :func:`run_key`: a hash of exactly what shapes what the run
produces.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd import ConfigError
from kd.build import Run, build
from kd.cache import Cache, files_fingerprint
from kd.cache import key as cache_key
from kd.checks import writable
from kd.config import (INIT_FROM_TEACHER, choice, instantiate, student_factory, sub_config, teacher_configs,
                       world_size)
from kd.data import TrainOrder
from kd.models import (CALIBRATED, calibrated_layer_map, count_parameters, init_from_teacher, layer_distances,
                       layer_list, load_weights, read_state_dict, save_model)

log = logging.getLogger("kd")

#: data settings that change what a run reports but not the weights it trains
EVAL_ONLY = ("generation_eval_size", "eval_batch_size", "max_new_tokens", "eval_seed")

#: trainer settings that change neither the weights nor the metrics
COSMETIC = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps")
#: trainer settings of a multi-process run that its cached sub-runs (teacher fits, SFTs,
#: scratch baselines) drop: they train once, in the process that asks for them, before
#: the run launches its other ranks (which then read them from the cache)
ONE_PROCESS_ONLY = ("strategy", "num_nodes", "use_distributed_sampler", "sync_batchnorm")

#: the run's validation cadence, which a fit section (a teacher's, an SFT's) does not take:
#: they validate once per epoch, Lightning's default, so a cadence chosen for the distilled
#: run (e.g. ``trainer.val_check_interval=0.1`` for ``regime=adaptive``, which follows the
#: validation loss) neither retrains its teacher and SFT nor changes which checkpoint of
#: theirs is kept. A scratch baseline keeps the run's cadence, as it is trained like the run.
FIT_CADENCE = {"val_check_interval": None, "check_val_every_n_epoch": 1}

#: settings only some cached runs have (a pipeline stage: routed teachers, the previous
#: stage's weights; any run: adapters); each enters the key when set
SOMETIMES = ("teachers", "student_init", "divergence", "regime", "peft")


# ----------------------------------------------------------------------------- the key


def _in_cache(value: Any, root: Path) -> Any:
    """``value`` with every path to a cache entry (``<root>/<kind>/<name>``) replaced by the
    entry's name, so a key does not depend on where the cache lives."""
    if isinstance(value, dict):
        return {k: _in_cache(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_in_cache(v, root) for v in value]
    if isinstance(value, str) and value and Path(value).parent.parent == root:
        return Path(value).name
    return value


def data_files(data: DictConfig | None) -> list[str]:
    """The local files the data config's source reads (its ``files()``; none for a source
    without that method), found without loading anything."""
    source = data.get("source") if isinstance(data, DictConfig) else None
    if not isinstance(source, DictConfig) or "_target_" not in source:
        return []
    from hydra.utils import get_class

    if not callable(getattr(get_class(source._target_), "files", None)):
        return []
    return list(instantiate(source).files())


def run_key(cfg: DictConfig, weights_only: bool = False) -> str:
    """Hash of everything that shapes what training ``cfg`` produces (a teacher's fit, an
    SFT, a scratch baseline, a pipeline stage: every cached run): its recipe, student,
    optimizer, scheduler, seed, trainer and data settings, the contents of the data files
    its source reads (:func:`data_files`, :func:`kd.cache.files_fingerprint`: an edited
    file gives a new key, even with its old size and time), the teacher whose layers the
    student starts from, and whichever of :data:`SOMETIMES` it sets. Loggers, callbacks,
    paths, cosmetic trainer settings and where data is cached are left out; with
    ``weights_only``, also the evaluation-only data settings (a teacher's metrics are not
    reused, so they do not retrain it)."""
    root = Path(str(cfg.paths.cache_dir))
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    skip = ("num_workers", "cache_dir") + (EVAL_ONLY if weights_only else ())
    teacher = []  # a student that starts from the teacher's layers: which teacher (a cache entry by its name)
    student = OmegaConf.to_container(cfg.student, resolve=True)
    if cfg.get(INIT_FROM_TEACHER) is not None and cfg.get("teacher"):
        student["init_from_teacher"] = cfg[INIT_FROM_TEACHER]  # hashed where it lived before: the same cache keys
        teacher = [OmegaConf.to_container(cfg.teacher, resolve=True)]
        weights = Path(str(teacher[0].get("checkpoint") or ""))
        if weights.parent.parent == root:
            teacher[0]["checkpoint"] = weights.name
    sometimes = {k: _in_cache(OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig)
                              else cfg[k], root)
                 for k in SOMETIMES if cfg.get(k)}
    files = data_files(cfg.data)  # none for sources without files: their keys are as before
    return cache_key(
        *teacher,
        cfg.recipe,  # a supervised sub-run's recipe is its supervised_recipe
        student,
        cfg.optimizer,
        cfg.get("scheduler"),
        cfg.seed,
        {k: v for k, v in trainer.items() if k not in COSMETIC},
        {k: v for k, v in data.items() if k not in skip},
        *([sometimes] if sometimes else []),
        *([{"data_files": files_fingerprint(files)}] if files else []),
    )


# ----------------------------------------------------------------------------- a run's weights


def prepare(run: Run) -> None:
    """Load the weights of ``run`` that come from elsewhere: the teacher's (training it once
    when its config has a ``fit`` section), the student's SFT start (``student_sft``) or
    starting weights (``student_init``), the teacher-layer initialisation of the student,
    then the adapters (``peft``) on whatever the student starts from."""
    cfg = run.cfg
    if isinstance(run.teacher, dict):
        run.teacher_info = {name: load_teacher(cfg, model, run.cache, cfg.teachers[name], name)
                            for name, model in run.teacher.items()}
    elif run.teacher is not None:
        run.teacher_info = load_teacher(cfg, run.teacher, run.cache)
    start = student_sft(cfg, run.cache) if cfg.get("student_sft") else cfg.get("student_init")
    if start:  # whole starting weights (an SFT began from the teacher's layers itself: see student_sft)
        load_weights(run.student, start)
    elif run.init_scheme is not None:
        source = run.teacher
        if source is None:  # a recipe without a teacher: the "teacher init, no KD" ablation
            source = instantiate(cfg.teacher.model)
            load_teacher(cfg, source, run.cache)
        scheme = run.init_scheme
        if isinstance(scheme, str) and scheme in CALIBRATED:
            scheme = _calibrated_map(run, source, scheme)
        mapping = init_from_teacher(run.student, source, scheme)
        log.info("student initialised from the teacher: student layer i <- teacher layer %s[i]", mapping)
    if cfg.get("peft"):  # adapters go on the student's starting weights, whatever they are
        instantiate(cfg.peft).apply(run.student)
        trainable = sum(p.numel() for p in run.student.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in run.student.parameters()))


def _calibrated_map(run: Run, teacher: nn.Module, scheme: str, num_batches: int = 8) -> list[int]:
    """A ``block``/``importance`` layer map measured on the first ``num_batches``
    training batches of a fixed shuffle (the same for every seed and recipe)."""
    loader = run.datamodule.train_dataloader()
    if isinstance(loader.sampler, TrainOrder):
        loader.sampler.seed = 0  # kd's training order: its permutation for seed 0, whatever the run's
    with torch.random.fork_rng():  # another datamodule's shuffle: the global generator at seed 0
        torch.manual_seed(0)
        batches = [b for _, b in zip(range(num_batches), loader)]
    device = next(teacher.parameters()).device
    batches = [{k: b[k].to(device) for k in ("input_ids", "attention_mask")} for b in batches]
    mapping = calibrated_layer_map(layer_distances(teacher, batches), len(layer_list(run.student)), scheme)
    log.info("layer_map=%s measured on %d training batches: keeps teacher layers %s", scheme, len(batches), mapping)
    return mapping


# ----------------------------------------------------------------------------- cached sub-runs


class _ValidationHistory(Callback):
    """Every validation's ``val/*`` metrics by step, ``{tag: [[step, value], ...]}``:
    the curves a cached sub-run (which has no logger) keeps in its facts, so that a run's
    ``curves.png`` overlays its scratch baseline's (:func:`kd.report.plot_curves`)."""

    def __init__(self) -> None:
        self.curves: dict[str, list[list[float]]] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        for tag, value in trainer.callback_metrics.items():
            if tag.startswith("val/"):
                # the step Lightning's loggers put it at: the index of the last batch trained
                self.curves.setdefault(tag, []).append([max(int(trainer.global_step) - 1, 0), float(value)])


def cached_run(cache: Cache, kind: str, name: str, sub: DictConfig, what: str | None = None) -> Path:
    """The cache entry ``<kind>/<name>`` holding the student weights (``model.safetensors`` or
    ``save_pretrained`` files, at its top level) that training ``sub`` ends with, and its
    facts (test metrics, the last validation's metrics, parameters) in
    :meth:`kd.cache.Cache.meta`; trained when missing
    or unusable, its checkpoints in a scratch folder, the shared caches reused."""

    def train_into(directory: Path) -> dict[str, Any]:
        with open_dict(sub):
            sub.paths.cache_dir = str(cache.root)
            sub.paths.output_dir = str(directory / "run")
        run = build(sub)
        prepare(run)
        history = _ValidationHistory()
        run.trainer.callbacks.append(history)
        metrics = run.fit()
        shutil.rmtree(directory / "run", ignore_errors=True)
        save_model(run.student, directory)
        return {"metrics": metrics, "validation": run.validation, "params": count_parameters(run.student),
                "curves": history.curves}

    return cache.get_or_build(kind, name, train_into, validate=read_state_dict, what=what or kind.rstrip("s"))


def cached_supervised(cache: Cache, kind: str, prefix: str, cfg: DictConfig, **changes: Any) -> Path:
    """The :func:`cached_run` ``<kind>/<prefix>-<hash>`` of the no-teacher recipe trained on
    ``cfg`` with ``changes`` (:func:`sub_config`), the hash covering what shapes it. A
    ``teacher`` among the changes is what a ``student_init_from_teacher`` scheme among them
    starts from (else the scheme belongs to the distilled run and is dropped here)."""
    sub = sub_config(cfg, **{"recipe": cfg.supervised_recipe, "teacher": None, "teachers": None, "divergence": None,
                             "regime": None, "logger": {}, "ckpt_path": None, "student_sft": None, **changes})
    with open_dict(sub):
        if sub.get("teacher") is None and sub.get(INIT_FROM_TEACHER) is not None:
            sub[INIT_FROM_TEACHER] = None
        world = world_size(sub.trainer)
        for key in ONE_PROCESS_ONLY:  # cached sub-runs train in the calling process (DDP launches none) ...
            sub.trainer.pop(key, None)
        sub.trainer.devices = 1
        if world > 1 and "batch_size" in sub.data:  # ... on the global batch of the run's W processes
            sub.data.batch_size = int(sub.data.batch_size) * world
    return cached_run(cache, kind, f"{prefix}-{run_key(sub, weights_only=kind == 'teachers')}", sub)


def _fitted(cache: Cache, kind: str, prefix: str, cfg: DictConfig, model: DictConfig, fit: DictConfig,
            **changes: Any) -> Path:
    """The cached supervised run of ``model`` described by a ``fit`` section (epochs, seed,
    optimizer, scheduler, one validation per epoch (:data:`FIT_CADENCE`), ``limit_train_batches`` when given (null: every batch, whatever the
    run's trainer limits its own training to; absent: the run's limit, except a limit of 0,
    which evaluates the run's start point and so trains what it starts from in full) and,
    under ``fit.data``, changes to the data config); ``changes``: further :func:`sub_config`
    changes."""
    if "limit_train_batches" in fit:
        limit = {"trainer.limit_train_batches": fit.limit_train_batches}
    elif cfg.trainer.get("limit_train_batches") == 0:
        limit = {"trainer.limit_train_batches": None}
    else:
        limit = {}
    return cached_supervised(
        cache, kind, prefix, cfg,
        student=OmegaConf.to_container(model, resolve=True),
        optimizer=fit.optimizer,
        scheduler=fit.get("scheduler"),
        seed=fit.get("seed", cfg.seed),
        merge={"data": fit.get("data") or {}},
        student_init=None,
        **({"peft": None} if kind == "teachers" else {}),  # a teacher trains all its weights
        **{"trainer.max_epochs": fit.max_epochs},
        **{f"trainer.{k}": v for k, v in FIT_CADENCE.items()},
        **limit,
        **changes,
    )


def load_teacher(cfg: DictConfig, model: nn.Module, cache: Cache, t: DictConfig | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Fill the teacher ``model`` (built from ``t.model``, default ``cfg.teacher``) with its
    weights and say where they came from: ``checkpoint``; else, when the config has a
    ``fit`` section, a supervised run trained once and cached (named ``name``); else the
    model factory (pretrained)."""
    t = cfg.teacher if t is None else t
    if t.get("checkpoint"):
        load_weights(model, t.checkpoint)
        return {"source": str(t.checkpoint)}
    if not t.get("fit"):
        return {"source": "model factory"}
    entry = _fitted(cache, "teachers", name or choice("teacher", "teacher"), cfg, t.model, t.fit)
    load_weights(model, entry)
    return {"source": str(entry), **cache.meta("teachers", entry.name)}


def student_sft(cfg: DictConfig, cache: Cache) -> Path:
    """The cache entry (weights) of the supervised fine-tune of ``cfg.student`` that
    ``student_sft`` describes (cached; one per run seed, or one for every seed when the
    section fixes its own ``seed``). A student with ``student_init_from_teacher`` (a pruned
    teacher) starts its SFT from the teacher's layers, and the run then starts from the SFT."""
    factory, scheme = student_factory(cfg)
    seed = cfg.student_sft.get("seed", cfg.seed)
    prefix, changes = f"{choice('student', 'student')}-seed{seed}", {}
    if scheme is not None:  # the SFT starts from the teacher's layers: the teacher's weights, trained once, are its input
        teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
        if teacher.get("fit") and not teacher.get("checkpoint"):
            teacher["checkpoint"] = str(_fitted(cache, "teachers", choice("teacher", "teacher"), cfg, cfg.teacher.model,
                                                cfg.teacher.fit))
        teacher.pop("fit", None)
        changes = {"teacher": teacher, INIT_FROM_TEACHER: scheme}
    return _fitted(cache, "sft", prefix, cfg, factory, cfg.student_sft, **changes)


def scratch_baseline(cfg: DictConfig, cache: Cache) -> tuple[Path, dict[str, Any]]:
    """Cache entry (weights) and facts (test metrics, parameters) of ``cfg.student`` trained
    without a teacher, everything else equal; with ``student_sft`` set, that SFT."""
    if cfg.get("student_sft"):
        entry = student_sft(cfg, cache)
        return entry, cache.meta("sft", entry.name)
    entry = cached_supervised(cache, "baselines", f"{choice('student', 'student')}-seed{cfg.seed}", cfg)
    return entry, cache.meta("baselines", entry.name)


class _Missing(Exception):
    """An entry a :class:`_Probe` looked up and did not find."""


def _missing_entry(cfg: DictConfig, root: Path) -> tuple[str, Path] | None:
    """The first cached teacher, SFT or scratch baseline the run would train that the cache
    under ``root`` lacks, as (what, entry path): the keys computed as :mod:`kd.subruns` does,
    nothing built, removed or locked. None: every one is there."""
    class _Probe(Cache):
        def get_or_build(self, kind: str, name: str, build: Any, validate: Any = None, what: str | None = None) -> Path:
            path = self.path(kind, name)
            if path.is_dir() and self._problem(path, name, None) is None:
                return path
            raise _Missing(what or kind.rstrip("s"), path)

    probe = _Probe(root)
    try:
        for label, t in teacher_configs(cfg).items():
            if t.get("fit") and not t.get("checkpoint"):
                _fitted(probe, "teachers", label or choice("teacher", "teacher"), cfg, t.model, t.fit)
        if cfg.get("student_sft"):
            student_sft(cfg, probe)
        elif teacher_configs(cfg) and cfg.get("scratch_baseline"):
            scratch_baseline(cfg, probe)
    except _Missing as e:
        return e.args[0], e.args[1]
    return None


def check_cache(cfg: DictConfig) -> None:
    """Before anything trains: a cache directory this run cannot write to must hold every
    cached teacher, SFT and baseline the run would otherwise build; refuse, naming the first
    it lacks (:func:`_missing_entry`). A writable cache, or a complete read-only one, passes."""
    cache = cfg.get("paths", {}).get("cache_dir") if isinstance(cfg.get("paths"), DictConfig) else None
    if not isinstance(cache, str) or not Path(cache).expanduser().is_dir() or writable(Path(cache)) is None:
        return
    missing = _missing_entry(cfg, Path(cache))
    if missing is not None:
        raise ConfigError(f"the cache directory {cache} is not writable and lacks the {missing[0]} {missing[1]} this "
                          "run would have to build; make it writable or set paths.cache_dir=<a writable directory> "
                          "(or KD_CACHE_DIR)")


__all__ = ["run_key", "data_files", "check_cache", "prepare", "cached_run", "cached_supervised", "load_teacher", "student_sft",
           "scratch_baseline"]
