"""The composition root: one composed config becomes one :class:`Run` (recipe, datamodule,
trainer, student, teacher). Every entry point (``kd``, ``kd-eval``), every cached sub-run
(a teacher's training, an SFT, a scratch baseline, a pipeline stage: :mod:`kd.subruns`) and
the tests build through :func:`build`.

:func:`build` only composes and validates: it reads the recipe's :class:`kd.recipe.Needs`
(never its name), refuses a combination that cannot work with one sentence
(:class:`kd.ConfigError`, the rules in :mod:`kd.checks`), instantiates every part (Hydra
plumbing in :mod:`kd.config`), sets up token data and checks tokenizers and vocabularies,
all before anything trains. :func:`kd.subruns.prepare` then fills the weights that come from
elsewhere (the teacher's, the student's SFT start, the student's teacher-layer
initialisation); :meth:`Run.fit` trains and tests.
"""

from __future__ import annotations

import gc
import inspect

from dataclasses import dataclass, field
from typing import Any

import lightning as L
from hydra.utils import get_class
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd import ConfigError
from kd.cache import Cache
from kd.checks import check_config, check_recipe
from kd.config import (INIT_FROM_TEACHER, choice, instantiate, instantiate_all, student_factory, student_tokenizer, teacher_configs,
                       teacher_tokenizer)
from kd.models import check_same_tokenizer
from kd.recipe import DistillationRecipe
from kd.resume import AtomicCheckpointIO
from kd.served import served


def recipe_class(cfg: DictConfig) -> type[DistillationRecipe]:
    """The recipe class ``cfg.recipe._target_`` names."""
    try:
        cls = get_class(cfg.recipe._target_)
    except Exception as e:
        raise ConfigError(f"recipe._target_ {cfg.recipe._target_} cannot be imported ({e}); check the recipe yaml") from e
    if not (isinstance(cls, type) and issubclass(cls, DistillationRecipe)):
        raise ConfigError(f"recipe._target_ {cfg.recipe._target_} is not a kd.recipe.DistillationRecipe subclass")
    return cls


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

    def fit(self) -> dict[str, float]:
        """Train with the run's trainer, then test the checkpoint with the best validation
        score (the last weights when none was kept); the test metrics as floats."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)  # same batch order for every recipe
        plain = {k: v for k, v in self.cfg.items() if k != "hydra"}
        for logger in self.trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(OmegaConf.create(plain), resolve=True))
        # the setup's objects (configs, models, tokenizers, data) leave the collector's generations:
        # the training steps' collections no longer rescan them (one full collection of them took
        # 0.37 s of the first step of a CPU GKD run, benchmarks/step_times.py)
        gc.collect()
        gc.freeze()
        try:
            self.trainer.fit(self.recipe, datamodule=self.datamodule, ckpt_path=self.cfg.get("ckpt_path"))
        finally:
            gc.unfreeze()
        # the last validation's metrics (what a sweeper optimises: never the test split)
        self.validation = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        results = self.trainer.test(self.recipe, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}


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


def _check_served(cfg: DictConfig, cls: type[DistillationRecipe], name: str, teachers: Any, regime: Any,
                  datamodule: Any, setup: bool) -> None:
    """Refuse what a served teacher (:mod:`kd.served`) cannot give, in one sentence, then
    (with ``setup``) start or reach its server and check its tokenizer and ``max_logprobs``."""
    models = list(teachers.values()) if isinstance(teachers, dict) else [teachers]
    models = [m for m in models if served(m)]
    if not models:
        return
    needs = cls.needs
    # kd-eval tests the student against a teacher that its recipe's loss never reads (supervised):
    # the test reads the top-k (kd.evaluation), so only the loss's needs below are refused
    loss_reads_it = needs.teacher is not False
    if loss_reads_it and "topk" not in needs.teacher_signals:
        raise ConfigError(f"recipe {name}'s loss reads the teacher's logits, which a served teacher does not give "
                          "(it gives top-k log-probabilities); use an in-process teacher (teacher=hf)")
    if loss_reads_it and (needs.hidden_states or needs.teacher_tokenizer == "own"):
        raise ConfigError(f"recipe {name} needs the teacher's hidden states or its own tokenizer, which a served "
                          "teacher does not give; use an in-process teacher (teacher=hf)")
    temperature = loss_temperature(cls, cfg.recipe)
    if temperature is not None and temperature != 1.0:
        raise ConfigError(f"a served teacher's log-probabilities are untempered (T = 1), so recipe {name}'s loss "
                          f"temperature {temperature:g} cannot be applied exactly to its top-k; set "
                          "recipe.temperature=1 or use an in-process teacher (teacher=hf)")
    if cfg.get(INIT_FROM_TEACHER) is not None:
        raise ConfigError("a served teacher's layers cannot initialise the student (kd holds no weights of it); "
                          "drop student_init_from_teacher or use teacher=hf")
    if not setup or getattr(datamodule, "tokenizer", None) is None:
        return
    k = getattr(regime, "top_k", None) if getattr(regime, "teacher_signal", None) == "topk" else None
    for model in models:
        model.check(datamodule.tokenizer, k)


def _privileged_context(cfg: DictConfig, name: str, needs: Any, with_teacher: bool, regime: Any,
                        datamodule: Any) -> None:
    """Give the datamodule the privileged context the teacher reads (``teacher.context``,
    :mod:`kd.privileged`), or refuse, in one sentence, a run where the teacher could not read it."""
    from kd.privileged import PrivilegedContext

    for label, t in teacher_configs(cfg).items():
        if label is not None and t.get("context") is not None:
            raise ConfigError(f"teachers.{label}.context: a privileged context is read by a single teacher; use "
                              "teacher=<config> with teacher.context, or drop the context")
    t = cfg.get("teacher")
    kind = t.get("context") if with_teacher and t is not None and not cfg.get("teachers") else None
    if kind is None:
        return
    context = PrivilegedContext(str(kind), t.get("rules"), t.get("context_template") or "{context}\n{prompt}")
    if not hasattr(datamodule, "privileged"):
        raise ConfigError(f"teacher.context={kind} prepends a privileged context to the teacher's prompts, which "
                          "needs prompt/response data (data=task, data=jsonl, ...); drop it or change data")
    if needs.teacher_tokenizer == "own":
        raise ConfigError(f"recipe {name} gives its teacher its own tokenizer, but a privileged context is read in "
                          "the data's tokens; drop teacher.context or use a same-tokenizer recipe (recipe=gkd)")
    if regime is not None and regime.uses_teacher:
        raise ConfigError(f"regime={regime.name} runs the teacher on the plain prompts before training, so it would "
                          f"never read teacher.context={kind}; use regime=on_policy, regime=mixed or regime=offline")
    datamodule.privileged = context


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
    if teacher is None:
        with_teacher = needs.teacher is True or (needs.teacher == "optional" and bool(teacher_configs(cfg)))
    else:
        with_teacher = teacher and bool(teacher_configs(cfg))
    check_config(cfg, needs, name, with_teacher)
    regime = instantiate(cfg.regime) if cfg.get("regime") else None
    if regime is not None:
        regime.check_recipe(name, needs, teacher=with_teacher, routed=bool(cfg.get("teachers")),
                            temperature=loss_temperature(cls, cfg.recipe))
    check_recipe(name, needs, teacher=with_teacher and bool(teacher_configs(cfg)), routed=bool(cfg.get("teachers")),
                 divergence=choice("divergence", "given") if cfg.get("divergence") else None, regime=regime)

    # The student is created right after seeding, as in the scratch baseline: same init.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    if regime is not None:
        regime.validate(datamodule)
    if needs.teacher_tokenizer == "own" and with_teacher:
        if not hasattr(datamodule, "teacher_tokenizer"):
            raise ConfigError(f"recipe {name} distils language models across tokenizers; use language-model data "
                              "(data=task, data=jsonl, data=hf, data=chatterbot)")
        datamodule.teacher_tokenizer = datamodule.teacher_tokenizer or teacher_tokenizer(cfg)
    _privileged_context(cfg, name, needs, with_teacher, regime, datamodule)
    factory, scheme = student_factory(cfg)
    student = instantiate(factory)
    routed = {name: t for name, t in teacher_configs(cfg).items() if name is not None}
    if routed and with_teacher:
        routes = getattr(datamodule, "routes", None)
        if not routes:
            raise ConfigError(f"teachers: names {sorted(routed)} but nothing routes examples to them; add "
                              f"data.routes={{<skill>: <teacher name>, ...}}")
        unknown = sorted(set(routes.values()) - set(routed))
        if unknown:
            raise ConfigError(f"data.routes sends examples to {unknown}, which teachers: does not name; use "
                              f"{sorted(routed)}")
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
    _check_served(cfg, cls, name, teacher_model, regime, datamodule, setup)
    io = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}  # never a half-written checkpoint
    try:
        trainer = instantiate(cfg.trainer, logger=instantiate_all(cfg.get("logger")) or False,
                              callbacks=instantiate_all(cfg.get("callbacks")), **io)
    except (MisconfigurationException, ValueError) as e:  # what kd.checks does not foresee, still one sentence
        if isinstance(e, ConfigError):
            raise
        inner = e.__cause__ or e
        raise ConfigError(f"Lightning refuses the trainer settings ({str(inner).splitlines()[0]}); change the "
                          "trainer.<key> override it names") from None
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


__all__ = ["Run", "build", "recipe_class"]
