"""The composition root: one composed config becomes one :class:`Run` (recipe, datamodule,
trainer, student, teacher). Every entry point (``kd``, ``kd-eval``), every cached sub-run
(a teacher's training, an SFT, a scratch baseline) and the tests build through
:func:`build`.

:func:`build` only composes and validates: it reads the recipe's :class:`kd.recipe.Needs`
(never its name), instantiates every part, refuses a combination that cannot work with
one sentence (:class:`kd.ConfigError`), sets up token data and checks tokenizers and
vocabularies, all before anything trains. :meth:`Run.prepare` then fills the weights that
come from elsewhere: the teacher's (a checkpoint, or a supervised run trained once and
cached), the student's SFT start, the student's teacher-layer initialisation.
:meth:`Run.fit` trains and tests.

Cached sub-runs are the same machinery on a derived config (:func:`sub_config`): the
no-teacher recipe named by ``supervised_recipe``, no teacher, no divergence, the offline
regime, no loggers; keyed in :mod:`kd.cache` by a hash of exactly what shapes their weights
(:func:`run_key`).
"""

from __future__ import annotations

import inspect

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd import ConfigError, config_error
from kd.cache import Cache
from kd.data import TrainOrder
from kd.cache import key as cache_key
from kd.models import (CALIBRATED, calibrated_layer_map, check_same_tokenizer, init_from_teacher, kind_of, layer_distances,
                       layer_list, load_tokenizer, load_weights, save_model)
from kd.recipe import DistillationRecipe
from kd.resume import AtomicCheckpointIO

log = logging.getLogger("kd")

#: the config tree the console scripts compose (``conf/`` beside the package)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: what each kind of data holds, for messages
KIND_WORDS = {"classifier": "classification", "causal_lm": "prompt/response (causal LM)",
              "masked_lm": "masked-LM text"}
MODEL_WORDS = {"classifier": "classifier", "causal_lm": "causal LM", "masked_lm": "masked LM"}

#: a top-level key read here, next to student_init and student_sft: copy the trained teacher's
#: layers into the student (a :func:`kd.models.layer_map` scheme; student=from_teacher sets it)
INIT_FROM_TEACHER = "student_init_from_teacher"

#: data settings that change what a run reports but not the weights it trains
EVAL_ONLY = ("generation_eval_size", "eval_batch_size", "max_new_tokens", "eval_seed")

#: trainer settings that change neither the weights nor the metrics
COSMETIC = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps")
#: trainer settings of a multi-process run that its cached sub-runs (teacher fits, SFTs,
#: scratch baselines) drop: they train once, in the process that asks for them, before
#: the run launches its other ranks (which then read them from the cache)
ONE_PROCESS_ONLY = ("strategy", "num_nodes", "use_distributed_sampler", "sync_batchnorm")


# ----------------------------------------------------------------------------- config helpers


def compose_config(*overrides: str, output_dir: str | Path | None = None, config_name: str = "train") -> DictConfig:
    """The config ``kd <overrides>`` would run, composed from Python (notebooks, scripts):
    Hydra's compose API over ``conf/``, the Hydra node set so every interpolation resolves,
    and the run writing into ``output_dir`` (default ``outputs/runs/<date>/<time>`` as for
    ``kd``). ``kd.runs.train(cfg)`` then runs it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir is not None else cfg.hydra.run.dir
    return cfg


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Hydra's ``instantiate``, raising the :class:`ConfigError` a constructor raised
    instead of Hydra's wrapper around it; a setting the target does not take, or one that
    refers to a key this combination of groups lacks, also becomes one sentence."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
    try:
        return hydra_instantiate(node, *args, **kwargs)
    except Exception as e:
        cause = config_error(e)
        if cause is not None and cause is not e:
            raise cause from None
        if cause is not None:
            raise
        inner = e
        while inner.__cause__ is not None or inner.__context__ is not None:
            inner = inner.__cause__ or inner.__context__
        if isinstance(inner, TypeError) and "argument" in str(inner):
            raise ConfigError(f"{target} does not take the settings it was given ({inner}); remove them or choose "
                              "config groups that fit together") from None
        if "pip install" in str(inner):  # e.g. trainer=deepspeed without the deepspeed package
            raise ConfigError(f"{target} needs a package that is not installed: {str(inner).splitlines()[0]}") from None
        if isinstance(inner, (InterpolationResolutionError, MissingMandatoryValue)):
            raise ConfigError(f"{target} cannot be configured: {str(inner).splitlines()[0]}; set that key or choose "
                              "config groups that fit together") from None
        raise


def choice(group: str, default: str = "") -> str:
    """The option of config group ``group`` this run was composed with (Hydra's choices)."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group, default) or default)
    return default


def recipe_class(cfg: DictConfig) -> type[DistillationRecipe]:
    """The recipe class ``cfg.recipe._target_`` names."""
    try:
        cls = get_class(cfg.recipe._target_)
    except Exception as e:
        raise ConfigError(f"recipe._target_ {cfg.recipe._target_} cannot be imported ({e}); check the recipe yaml") from e
    if not (isinstance(cls, type) and issubclass(cls, DistillationRecipe)):
        raise ConfigError(f"recipe._target_ {cfg.recipe._target_} is not a kd.recipe.DistillationRecipe subclass")
    return cls


def instantiate_all(section: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a name -> config mapping (loggers, callbacks)."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def sub_config(cfg: DictConfig, **changes: Any) -> DictConfig:
    """A copy of ``cfg`` with keys (dotted paths) replaced; dict values under ``merge``
    are merged into the existing node instead (``merge={"data": {...}}``). The student and
    the data are resolved first (they may refer to nodes a change removes: student=from_teacher
    is built from the teacher's model, data=text_lm takes the teacher's tokenizer)."""
    merges = changes.pop("merge", {}) or {}
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):
        for node in ("student", "data"):
            if node not in changes and isinstance(cfg.get(node), DictConfig):
                sub[node] = OmegaConf.to_container(cfg[node], resolve=True)
        for dotted, value in changes.items():
            OmegaConf.update(sub, dotted, value, merge=False)
        for dotted, value in merges.items():
            OmegaConf.update(sub, dotted, value, merge=True)
    return sub


def student_factory(cfg: DictConfig) -> tuple[DictConfig, Any]:
    """The student's model factory config (resolved) and its teacher-init scheme (or None)."""
    plain = OmegaConf.to_container(cfg.student, resolve=True)
    if isinstance(plain, dict) and "init_from_teacher" in plain:
        raise ConfigError(f"student.init_from_teacher is now the top-level {INIT_FROM_TEACHER}; set "
                          f"{INIT_FROM_TEACHER}={plain['init_from_teacher']} instead")
    return OmegaConf.create(plain), cfg.get(INIT_FROM_TEACHER)


def run_key(cfg: DictConfig, weights_only: bool = False) -> str:
    """Hash of everything that shapes what a supervised run of ``cfg`` produces; with
    ``weights_only``, of what shapes its weights (a teacher's metrics are not reused, so
    evaluation-only settings do not retrain it)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    skip = ("num_workers", "cache_dir") + (EVAL_ONLY if weights_only else ())
    teacher = []  # a student that starts from the teacher's layers: which teacher (a cache entry by its name)
    student = OmegaConf.to_container(cfg.student, resolve=True)
    if cfg.get(INIT_FROM_TEACHER) is not None and cfg.get("teacher"):
        student["init_from_teacher"] = cfg[INIT_FROM_TEACHER]  # hashed where it lived before: the same cache keys
        teacher = [OmegaConf.to_container(cfg.teacher, resolve=True)]
        weights = Path(str(teacher[0].get("checkpoint") or ""))
        if weights.parent.parent == Path(str(cfg.paths.cache_dir)):
            teacher[0]["checkpoint"] = weights.name
    return cache_key(
        *teacher,
        cfg.get("supervised_recipe"),
        student,
        cfg.optimizer,
        cfg.get("scheduler"),
        cfg.seed,
        {k: v for k, v in trainer.items() if k not in COSMETIC},
        {k: v for k, v in data.items() if k not in skip},
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything one training run is made of (see :func:`build`)."""

    cfg: DictConfig
    recipe: DistillationRecipe
    datamodule: Any
    trainer: L.Trainer
    student: nn.Module
    #: the teacher, or the routed teachers by name (``teachers:``), or None
    teacher: nn.Module | dict[str, nn.Module] | None
    #: the recipe's config option (``recipe=``), or its class name
    name: str
    #: the distilled student's row in the result table
    label: str
    cache: Cache
    #: the teacher-layer scheme of the student (``student_init_from_teacher``), or None
    init_scheme: Any = None
    #: where the teacher's weights came from, plus the cache entry's facts
    teacher_info: dict[str, Any] = field(default_factory=dict)
    #: the last validation's metrics of :meth:`fit` (``val/...``)
    validation: dict[str, float] = field(default_factory=dict)

    def prepare(self) -> None:
        """Load the weights that come from elsewhere: the teacher's (training it once when
        its config has a ``fit`` section), the student's SFT start (``student_sft``) and
        the teacher-layer initialisation of the student."""
        cfg = self.cfg
        if isinstance(self.teacher, dict):
            self.teacher_info = {name: load_teacher(cfg, model, self.cache, cfg.teachers[name], name)
                                 for name, model in self.teacher.items()}
        elif self.teacher is not None:
            self.teacher_info = load_teacher(cfg, self.teacher, self.cache)
        start = student_sft(cfg, self.cache) if cfg.get("student_sft") else cfg.get("student_init")
        if start:  # whole starting weights (an SFT began from the teacher's layers itself: see student_sft)
            load_weights(self.student, start)
        elif self.init_scheme is not None:
            source = self.teacher
            if source is None:  # a recipe without a teacher: the "teacher init, no KD" ablation
                source = instantiate(cfg.teacher.model)
                load_teacher(cfg, source, self.cache)
            scheme = self.init_scheme
            if isinstance(scheme, str) and scheme in CALIBRATED:
                scheme = self._calibrated_map(source, scheme)
            mapping = init_from_teacher(self.student, source, scheme)
            log.info("student initialised from the teacher: student layer i <- teacher layer %s[i]", mapping)
        if cfg.get("peft"):  # adapters go on the student's starting weights, whatever they are
            instantiate(cfg.peft).apply(self.student)
            trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
            log.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in self.student.parameters()))

    def _calibrated_map(self, teacher: nn.Module, scheme: str, num_batches: int = 8) -> list[int]:
        """A ``block``/``importance`` layer map measured on the first ``num_batches``
        training batches of a fixed shuffle (the same for every seed and recipe)."""
        loader = self.datamodule.train_dataloader()
        if isinstance(loader.sampler, TrainOrder):
            loader.sampler.seed = 0  # kd's training order: its permutation for seed 0, whatever the run's
        with torch.random.fork_rng():  # another datamodule's shuffle: the global generator at seed 0
            torch.manual_seed(0)
            batches = [b for _, b in zip(range(num_batches), loader)]
        device = next(teacher.parameters()).device
        batches = [{k: b[k].to(device) for k in ("input_ids", "attention_mask")} for b in batches]
        mapping = calibrated_layer_map(layer_distances(teacher, batches), len(layer_list(self.student)), scheme)
        log.info("layer_map=%s measured on %d training batches: keeps teacher layers %s", scheme, len(batches), mapping)
        return mapping

    def fit(self) -> dict[str, float]:
        """Train with the run's trainer, then test the checkpoint with the best validation
        score (the last weights when none was kept); the test metrics as floats."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)  # same batch order for every recipe
        plain = {k: v for k, v in self.cfg.items() if k != "hydra"}
        for logger in self.trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
        self.trainer.fit(self.recipe, datamodule=self.datamodule, ckpt_path=self.cfg.get("ckpt_path"))
        # the last validation's metrics (what a sweeper optimises: never the test split)
        self.validation = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        results = self.trainer.test(self.recipe, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _group_file(group: str, option: str) -> Path:
    return CONF_DIR / group / f"{option}.yaml"


def option_kind(group: str, option: str) -> str | None:
    """What a shipped option of ``teacher``, ``student`` or ``data`` builds (None: unknown)."""
    path = _group_file(group, option)
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    if group == "teacher":
        if isinstance(node.get("model"), DictConfig) and "_target_" in node.model:
            return kind_of(node.model)
        for entry in node.get("defaults") or []:  # e.g. "/student@model: task_llama_teacher"
            if isinstance(entry, DictConfig):
                for key, value in entry.items():
                    if str(key).startswith("/student@model"):
                        return option_kind("student", str(value))
            elif isinstance(entry, str) and (CONF_DIR / "teacher" / f"{entry}.yaml").is_file() and entry != option:
                return option_kind("teacher", entry)
        return None
    return kind_of(node)


def options_of_kind(group: str, kind: str) -> list[str]:
    """The shipped options of ``group`` that build ``kind`` (for transformer kinds, also
    those that build whatever the teacher is, e.g. student=from_teacher)."""
    found = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        own = option_kind(group, path.stem)
        if own == kind or (own is None and kind != "classifier" and "${teacher.model}" in path.read_text()):
            found.append(path.stem)
    return found


def _either(group: str, options: list[str]) -> str:
    return " or ".join(f"{group}={o}" for o in options) if options else f"a {group} config of that kind"


def _check_kinds(cfg: DictConfig, cls: type[DistillationRecipe], name: str, with_teacher: bool) -> None:
    """Data, student, teacher, recipe and regime must be for the same kind of model."""
    data_kind = kind_of(cfg.data)
    if data_kind is None:
        return
    data = f"data={choice('data', 'given')}"
    needs = cls.needs
    if needs.data is not None and data_kind not in needs.data:
        fits = [o for k in needs.data for o in options_of_kind("data", k)]
        raise ConfigError(f"recipe {name} distils {' or '.join(KIND_WORDS[k] for k in needs.data)} models, but {data} "
                          f"holds {KIND_WORDS[data_kind]} data; choose {_either('data', fits)}")
    scheme = cfg.get(INIT_FROM_TEACHER)
    for label, teacher_cfg in teacher_configs(cfg).items():
        if not ((with_teacher or scheme is not None) and isinstance(teacher_cfg.get("model"), DictConfig)):
            continue
        teacher_kind = kind_of(teacher_cfg.model)
        named = f"teacher={choice('teacher', 'given')}" if label is None else f"teachers.{label}"
        if teacher_kind is not None and teacher_kind != data_kind:
            raise ConfigError(f"{named} is a {MODEL_WORDS.get(teacher_kind, teacher_kind)} but {data} holds "
                              f"{KIND_WORDS[data_kind]} data; choose "
                              f"{_either('teacher', options_of_kind('teacher', data_kind))}")
        if scheme is not None and teacher_kind == "classifier":
            raise ConfigError(f"student={choice('student', 'given')} copies a transformers teacher's layers, but "
                              f"teacher={choice('teacher', 'given')} is not a transformer; choose "
                              f"{_either('student', options_of_kind('student', data_kind))}")
    student_kind = kind_of(cfg.student) if isinstance(cfg.get("student"), DictConfig) else None
    if student_kind is not None and student_kind != data_kind:
        raise ConfigError(f"student={choice('student', 'given')} builds a {MODEL_WORDS.get(student_kind, student_kind)} but {data} holds "
                          f"{KIND_WORDS[data_kind]} data; choose {_either('student', options_of_kind('student', data_kind))}")
    regime = cfg.get("regime")
    if regime:
        regime_cls = get_class(regime._target_)
        if getattr(regime_cls, "generative", False) and data_kind != "causal_lm":
            raise ConfigError(f"regime={choice('regime', getattr(regime_cls, 'name', 'given'))} generates text and "
                              f"needs a language-model datamodule, but {data} holds {KIND_WORDS[data_kind]} data; "
                              "use regime=offline")
    divergence = cfg.get("divergence")
    if divergence and divergence.get("reduction") == "seq_mean" and data_kind == "classifier":
        raise ConfigError(f"divergence.reduction=seq_mean averages over each sequence's tokens, but {data} has one "
                          "position per example; use divergence.reduction=mean")


def _check_resolves(cfg: DictConfig) -> None:
    """Mandatory values (``???``) the command line must set, and interpolations that point
    at keys this combination of groups lacks, as one sentence each."""
    from omegaconf.errors import InterpolationResolutionError

    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    plain.pop("hydra", None)
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif node == "???":
            missing.append(path)

    walk(plain, "")
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set for this run: add {missing[0]}=<value> on the command line")
    for key in plain:
        try:
            OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) else cfg[key]
        except InterpolationResolutionError as e:
            where = getattr(e, "full_key", None) or key
            reason = str(e).splitlines()[0]
            raise ConfigError(f"{where} cannot be resolved ({reason}); the chosen config groups do not fit together: "
                              f"choose {key}=<an option made for this data>") from None


def _check_groups(cfg: DictConfig, cls: type[DistillationRecipe], name: str) -> None:
    """Refuse settings the recipe would silently ignore or cannot train with."""
    needs = cls.needs
    if _world_size(cfg.trainer) > 1 and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
        if "submitit" not in launcher:  # SLURM starts every rank itself; elsewhere Lightning relaunches the command
            raise ConfigError("a run on several processes cannot be a job of kd -m with this launcher (Lightning "
                              "relaunches the whole command line in each process); run each setting as its own kd "
                              "command, or sweep with hydra/launcher=submitit_slurm")
    if cfg.get("divergence") and not needs.divergence:
        raise ConfigError(f"recipe {name} uses no divergence, so divergence={choice('divergence', 'given')} would "
                          "change nothing; drop the divergence override or choose a recipe whose loss uses one")
    if cfg.get("teachers") and cfg.get("teacher"):
        raise ConfigError("teacher= and teachers: both name teachers; with examples routed to named teachers "
                          "set teacher=none")
    if needs.teacher is True and not cfg.get("teacher") and not cfg.get("teachers"):
        raise ConfigError(f"recipe {name} needs a teacher; choose one with teacher=<config> (see conf/teacher/)")
    if needs.own_loop:
        trainer = cfg.trainer
        if (trainer.get("accumulate_grad_batches") or 1) > 1 or trainer.get("gradient_clip_val"):
            raise ConfigError(f"recipe {name} runs its own optimisation loop, which Lightning cannot accumulate or "
                              "clip; set trainer.accumulate_grad_batches=1 and trainer.gradient_clip_val=null (the "
                              "recipe has its own clipping knob)")
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed must be an integer (got {cfg.get('seed')!r}); e.g. seed=0, or -m seed=0,1,2")
    if cfg.get("student_init") and cfg.get("student_sft"):
        raise ConfigError("student_init and student_sft both choose the student's starting weights; set one of them")
    if cfg.get("student_init") and not Path(str(cfg.student_init)).expanduser().exists():
        raise ConfigError(f"student_init '{cfg.student_init}' does not exist; pass a run's student/ directory, a "
                          "weights file or a checkpoint")
    resume = cfg.get("ckpt_path")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"ckpt_path '{resume}' does not exist; pass a run's checkpoints/last.ckpt or set ckpt_path=null")


def student_tokenizer(cfg: DictConfig) -> Any:
    """The tokenizer saved with a pretrained student (``student.name_or_path``), if any."""
    name = cfg.student.get("name_or_path") if isinstance(cfg.get("student"), DictConfig) else None
    if not name:
        return None
    try:
        return load_tokenizer(str(name))
    except Exception:  # a model without a tokenizer: nothing to compare
        return None


def teacher_configs(cfg: DictConfig) -> dict[str | None, DictConfig]:
    """The run's teacher configs: ``{None: teacher}`` for one teacher, ``{name: config}`` for
    routed teachers (``teachers:``), ``{}`` for none."""
    if cfg.get("teachers"):
        return {str(name): t for name, t in sorted(cfg.teachers.items())}
    return {None: cfg.teacher} if cfg.get("teacher") else {}


def teacher_tokenizer(cfg: DictConfig, t: DictConfig | None = None) -> Any:
    """A teacher's own tokenizer (``t``, default ``cfg.teacher``): ``tokenizer`` or the
    model's ``name_or_path`` when set; else, for a teacher trained by ``kd`` (a ``fit``
    section), the tokenizer of the data it is trained on (``fit.data`` applied)."""
    t = cfg.teacher if t is None else t
    name = t.get("tokenizer") or (t.model.get("name_or_path") if isinstance(t.get("model"), DictConfig) else None)
    if name:
        return load_tokenizer(str(name))
    if t.get("fit") and "tokenizer" in cfg.data:
        datamodule = instantiate(sub_config(cfg, merge={"data": t.fit.get("data") or {}}).data)
        return datamodule.load_tokenizer()
    raise ConfigError("this recipe needs the teacher's own tokenizer; name it with teacher.tokenizer=<hub name or "
                      "directory>")


def _check_tokenizers(cfg: DictConfig, datamodule: Any, recipe: DistillationRecipe) -> None:
    """Token data: set it up, check that the student's (and, for a shared-tokenizer recipe,
    the teacher's) tokenizer is the data's, and that every model's vocabulary holds it."""
    if not hasattr(datamodule, "tokenizer"):
        return
    datamodule.setup("fit")
    student_tok = student_tokenizer(cfg)
    if student_tok is not None:
        check_same_tokenizer(datamodule.tokenizer, student_tok, "the data's and the student's",
                             hint=f"tokenize the data with the student's: data.tokenizer={cfg.student.name_or_path}")
    shared = recipe.needs.teacher_tokenizer == "shared"
    if recipe.teachers is not None and shared:
        for label, t in teacher_configs(cfg).items():
            if t.get("tokenizer") or ((t.get("fit") or {}).get("data")):  # it may have its own
                whose = "the teacher's" if label is None else f"teacher {label}'s"
                check_same_tokenizer(datamodule.tokenizer, teacher_tokenizer(cfg, t), f"the data's and {whose}")
    if datamodule.tokenizer is not None:
        recipe.set_vocabulary(len(datamodule.tokenizer))


def loss_temperature(cls: type[DistillationRecipe], recipe: DictConfig) -> float | None:
    """The loss temperature recipe ``cls`` runs at under config ``recipe``: the argument its
    ``Needs.loss_temperature`` names, from the config or else the class's own default; None
    for a loss without one (T = 1)."""
    knob = cls.needs.loss_temperature
    if knob is None:
        return None
    if knob in recipe:
        return float(recipe[knob])
    default = inspect.signature(cls.__init__).parameters[knob].default
    return None if default is inspect.Parameter.empty else float(default)


def build(cfg: DictConfig, *, teacher: bool | None = None, setup: bool = True) -> Run:
    """Compose and validate one run of ``cfg`` without training anything.

    Args:
        cfg: a composed ``train`` config (``kd`` or Hydra's compose API).
        teacher: build the teacher model (default: when the recipe needs one; ``kd-eval``
            asks for it whenever one is configured, to report the KL to it).
        setup: set up token data and check tokenizers and vocabularies now (tests that only
            check composition turn it off).
    """
    cls = recipe_class(cfg)
    needs = cls.needs
    name = choice("recipe", cls.__name__.lower())
    _check_groups(cfg, cls, name)
    if teacher is None:
        with_teacher = needs.teacher is True or (needs.teacher == "optional" and bool(teacher_configs(cfg)))
    else:
        with_teacher = teacher and bool(teacher_configs(cfg))
    _check_kinds(cfg, cls, name, with_teacher)
    _check_resolves(cfg)

    # The student is created right after seeding, as in the scratch baseline: same init.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    regime = instantiate(cfg.regime) if cfg.get("regime") else None
    if regime is not None:
        regime.validate(datamodule)
        regime.check_recipe(name, needs, teacher=with_teacher, routed=bool(cfg.get("teachers")),
                            temperature=loss_temperature(cls, cfg.recipe))
    if needs.teacher_tokenizer == "own" and with_teacher:
        if not hasattr(datamodule, "teacher_tokenizer"):
            raise ConfigError(f"recipe {name} distils language models across tokenizers; use language-model data "
                              "(data=task, data=jsonl, data=hf, data=chatterbot)")
        datamodule.teacher_tokenizer = datamodule.teacher_tokenizer or teacher_tokenizer(cfg)
    factory, scheme = student_factory(cfg)
    if scheme is not None and not cfg.get("teacher"):
        raise ConfigError("this student is initialised from a teacher's layers; choose one with teacher=<config>")
    student = instantiate(factory)
    routed = {name: t for name, t in teacher_configs(cfg).items() if name is not None}
    if routed and with_teacher:
        if needs.teacher_tokenizer != "shared":
            raise ConfigError(f"recipe {name} gives its teacher its own tokenizer, which routed teachers (teachers:) "
                              "cannot have; route examples with a same-tokenizer recipe")
        routes = getattr(datamodule, "routes", None)
        if not routes:
            raise ConfigError(f"teachers: names {sorted(routed)} but nothing routes examples to them; add "
                              f"data.routes={{<skill>: <teacher name>, ...}}")
        unknown = sorted(set(routes.values()) - set(routed))
        if unknown:
            raise ConfigError(f"data.routes sends examples to {unknown}, which teachers: does not name; use "
                              f"{sorted(routed)}")
        if regime is not None and regime.uses_teacher:
            raise ConfigError(f"regime={regime.name} generates data with one teacher, not with routed teachers "
                              "(teachers:); use regime=offline or regime=on_policy")
        datamodule.teacher_names = sorted(routed)
        teacher_model = {name: instantiate(t.model) for name, t in routed.items()}
    else:
        teacher_model = instantiate(cfg.teacher.model) if with_teacher else None
    recipe = instantiate(
        cfg.recipe,
        student=student,
        teacher=teacher_model,
        **({"divergence": instantiate(cfg.divergence)} if cfg.get("divergence") else {}),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        regime=regime,
        _recursive_=False,
    )
    recipe.check_data(datamodule)
    if setup:
        _check_tokenizers(cfg, datamodule, recipe)
    io = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}  # never a half-written checkpoint
    trainer = instantiate(cfg.trainer, logger=instantiate_all(cfg.get("logger")) or False,
                          callbacks=instantiate_all(cfg.get("callbacks")), **io)
    if teacher_model is not None and needs.teacher:
        label = f"student, {name}"
    elif cfg.get("student_sft"):
        label = "student, SFT + more supervised"
    elif scheme is not None:
        label = "student, teacher init (no KD)"
    else:
        label = "student, from scratch"
    return Run(cfg=cfg, recipe=recipe, datamodule=datamodule, trainer=trainer, student=student, teacher=teacher_model,
               name=name, label=label, cache=Cache(cfg.paths.cache_dir), init_scheme=scheme)


# ----------------------------------------------------------------------------- cached sub-runs


def cached_run(cache: Cache, kind: str, name: str, sub: DictConfig, what: str | None = None) -> Path:
    """The cache entry ``<kind>/<name>`` holding the student weights (``model.safetensors`` or
    ``save_pretrained`` files, at its top level) that training ``sub`` ends with, and its
    facts (test metrics, the last validation's metrics, parameters) in
    :meth:`kd.cache.Cache.meta`; trained when missing
    or unusable, its checkpoints in a scratch folder, the shared caches reused."""
    from kd.models import count_parameters, read_state_dict

    def train_into(directory: Path) -> dict[str, Any]:
        with open_dict(sub):
            sub.paths.cache_dir = str(cache.root)
            sub.paths.output_dir = str(directory / "run")
        run = build(sub)
        run.prepare()
        metrics = run.fit()
        shutil.rmtree(directory / "run", ignore_errors=True)
        save_model(run.student, directory)
        return {"metrics": metrics, "validation": run.validation, "params": count_parameters(run.student)}

    return cache.get_or_build(kind, name, train_into, validate=read_state_dict, what=what or kind.rstrip("s"))


def _world_size(trainer: DictConfig) -> int:
    """The processes a trainer config trains on (devices x nodes; 1 when a device count is
    not given as a number or a list)."""
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    count = count if isinstance(count, int) and count > 0 else 1
    return count * int(trainer.get("num_nodes") or 1)


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
        world = _world_size(sub.trainer)
        for key in ONE_PROCESS_ONLY:  # cached sub-runs train in the calling process (DDP launches none) ...
            sub.trainer.pop(key, None)
        sub.trainer.devices = 1
        if world > 1 and "batch_size" in sub.data:  # ... on the global batch of the run's W processes
            sub.data.batch_size = int(sub.data.batch_size) * world
    return cached_run(cache, kind, f"{prefix}-{run_key(sub, weights_only=kind == 'teachers')}", sub)


def _fitted(cache: Cache, kind: str, prefix: str, cfg: DictConfig, model: DictConfig, fit: DictConfig,
            **changes: Any) -> Path:
    """The cached supervised run of ``model`` described by a ``fit`` section (epochs, seed,
    optimizer, scheduler, ``limit_train_batches`` when given (null: every batch, whatever the
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


__all__ = ["Run", "build", "compose_config", "choice", "recipe_class", "sub_config", "run_key", "load_teacher", "student_sft",
           "scratch_baseline", "teacher_tokenizer", "instantiate_all"]
