"""Every refusal that needs only the config and a recipe's :class:`kd.recipe.Needs`, written
once: a combination that cannot work fails here with one sentence (:class:`kd.ConfigError`)
that names the options, before anything is built or trained.

* :func:`check_recipe`: what a recipe needs from the run (a teacher, a divergence, a regime
  it accepts, one teacher where its teachers cannot be routed). :func:`kd.build.build` calls
  it with the facts of the config; :class:`kd.recipe.DistillationRecipe` calls it with the
  objects it is given, so a recipe built from Python is refused by the same code and the
  same sentence.
* :func:`check_config`: settings that do not fit together (groups the recipe would ignore
  or cannot train with, data, models and regime of different kinds, keys left unset or
  pointing nowhere).

Rules only one regime knows stay with it (:meth:`kd.regimes.Regime.check_recipe`); rules that
need the data set up (tokenizers, routes) are checked by :func:`kd.build.build`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from kd import ConfigError
from kd.config import (INIT_FROM_TEACHER, KIND_WORDS, MODEL_WORDS, choice, options_of_kind, student_factory,
                       teacher_configs, world_size)
from kd.models import kind_of
from kd.regimes import Offline

if TYPE_CHECKING:  # annotations only: kd.recipe imports this module
    from kd.recipe import Needs
    from kd.regimes import Regime


#: each form of a teacher's signal a regime can give, for messages
SIGNAL_WORDS = {"logits": "the teacher's logits", "head": "the teacher's hidden states and head",
                "topk": "a cached top-k teacher (k ids and a tail bin)"}


def check_recipe(name: str, needs: Needs, *, teacher: bool, routed: bool = False, divergence: str | None = None,
                 regime: Regime | None = None) -> None:
    """Refuse a recipe that the run cannot give what it needs, or gives what it would ignore.

    Args:
        name: the recipe, as messages name it (its config option, or its class name).
        needs: what it declares it needs.
        teacher: whether it is given a teacher (one, or routed ones).
        routed: whether its teachers are routed (``teachers:``, a mapping of names to teachers).
        divergence: the divergence it is given, as messages name it (the ``divergence/``
            option, or the class name); None when none is.
        regime: its data regime (None: the default, offline).
    """
    if needs.teacher is True and not teacher:
        raise ConfigError(f"recipe {name} needs a teacher; choose one with teacher=<config> (see conf/teacher/)")
    if divergence is not None and not needs.divergence:
        raise ConfigError(f"recipe {name} uses no divergence, so divergence={divergence} would change nothing; drop "
                          "the divergence override or choose a recipe whose loss uses one")
    if needs.divergence and divergence is None:
        raise ConfigError(f"recipe {name} needs a divergence; choose one with divergence=<config> "
                          "(see conf/divergence/)")
    # teacher_generated, or mixed with seq_kd: sequences in the teacher's tokens
    if needs.teacher_tokenizer == "own" and regime is not None and regime.uses_teacher:
        raise ConfigError("cross-tokenizer recipes cannot train on teacher-generated tokens (they are the "
                          "teacher's); use regime=offline, regime=on_policy or regime=mixed with seq_kd=false")
    regime_name = regime.name if regime is not None else Offline.name
    if needs.regimes is not None and regime_name not in needs.regimes:
        raise ConfigError(f"recipe {name} cannot train with regime={regime_name}; use regime="
                          + " or regime=".join(needs.regimes))
    signal = getattr(regime, "teacher_signal", None)  # duck-typed regimes give none
    if teacher and signal is not None and signal not in needs.teacher_signals:
        raise ConfigError(f"regime={regime_name} gives the loss {SIGNAL_WORDS[signal]}, which recipe {name}'s loss "
                          f"does not take (it takes {', '.join(needs.teacher_signals)}); use regime=offline")
    if teacher and routed:
        if needs.teacher_tokenizer != "shared":
            raise ConfigError(f"recipe {name} gives its teacher its own tokenizer, which routed teachers (teachers:) "
                              "cannot have; route examples with a same-tokenizer recipe")
        if regime is not None and regime.uses_teacher:
            raise ConfigError(f"regime={regime.name} generates data with one teacher, not with routed teachers "
                              "(teachers:); use regime=offline or regime=on_policy")


def check_config(cfg: DictConfig, needs: Needs, name: str, with_teacher: bool) -> None:
    """Refuse a composed config whose settings do not fit together (before anything is
    instantiated): ``name`` is the recipe's option, ``with_teacher`` whether the run
    builds its teacher."""
    _check_groups(cfg, needs, name)
    _check_kinds(cfg, needs, name, with_teacher)
    _check_resolves(cfg)
    _check_values(cfg)
    if student_factory(cfg)[1] is not None and not cfg.get("teacher"):
        raise ConfigError("this student is initialised from a teacher's layers; choose one with teacher=<config>")


def _either(group: str, options: list[str]) -> str:
    return " or ".join(f"{group}={o}" for o in options) if options else f"a {group} config of that kind"


def _check_kinds(cfg: DictConfig, needs: Needs, name: str, with_teacher: bool) -> None:
    """Data, student, teacher, recipe and regime must be for the same kind of model."""
    data_kind = kind_of(cfg.data)
    if data_kind is None:
        return
    data = f"data={choice('data', 'given')}"
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


def _check_groups(cfg: DictConfig, needs: Needs, name: str) -> None:
    """Refuse settings the recipe would silently ignore or cannot train with."""
    if world_size(cfg.trainer) > 1 and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = str(HydraConfig.get().launcher.get("_target_", ""))
        if "submitit" not in launcher:  # SLURM starts every rank itself; elsewhere Lightning relaunches the command
            raise ConfigError("a run on several processes cannot be a job of kd -m with this launcher (Lightning "
                              "relaunches the whole command line in each process); run each setting as its own kd "
                              "command, or sweep with hydra/launcher=submitit_slurm")
    for node in ("regime", "recipe"):  # student rollouts on vLLM (kd.rollouts)
        if not (isinstance(cfg.get(node), DictConfig) and cfg[node].get("engine") == "vllm"):
            continue
        from kd.rollouts import INSTALL, vllm_available

        if not vllm_available():
            raise ConfigError(f"{node}.engine=vllm needs vLLM, which is not installed; {INSTALL}")
        if world_size(cfg.trainer) > 1:
            raise ConfigError(f"{node}.engine=vllm runs one vLLM engine in one process, which a run on "
                              f"{world_size(cfg.trainer)} processes does not share; set {node}.engine=kd or "
                              "train on one device")
    if cfg.get("teachers") and cfg.get("teacher"):
        raise ConfigError("teacher= and teachers: both name teachers; with examples routed to named teachers "
                          "set teacher=none")
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
    if cfg.get("student_init"):
        from kd.models import read_state_dict

        try:  # the reader the run would use: a file, or a directory holding the weights file
            read_state_dict(Path(str(cfg.student_init)).expanduser())
        except ConfigError as e:
            raise ConfigError(f"student_init: {e}") from None
    resume = cfg.get("ckpt_path")
    if resume and not Path(resume).is_file():
        raise ConfigError(f"ckpt_path '{resume}' does not exist; pass a run's checkpoints/last.ckpt or set ckpt_path=null")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_threads(cfg: DictConfig) -> int | None:
    """``threads`` as the integer torch takes (None: torch's default); refused when negative."""
    threads = cfg.get("threads")
    if threads is None or threads == 0:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ConfigError(f"threads must be a positive integer or null (got {threads!r}); e.g. threads=1, or "
                          "threads=null for torch's default")
    return threads


def _check_optimizer(node: Any, where: str) -> None:
    """An optimizer config's usual values: lr a number >= 0, weight_decay >= 0, betas in [0, 1)."""
    if not isinstance(node, DictConfig):
        return
    lr = node.get("lr")
    if "lr" in node and (not _number(lr) or lr < 0):
        raise ConfigError(f"{where}.lr must be a number >= 0 (got {lr!r}); e.g. {where}.lr=1e-3")
    decay = node.get("weight_decay")
    if decay is not None and (not _number(decay) or decay < 0):
        raise ConfigError(f"{where}.weight_decay must be a number >= 0 (got {decay!r}); e.g. {where}.weight_decay=0.01")
    betas = node.get("betas")
    if betas is not None and (OmegaConf.is_list(betas) or isinstance(betas, (list, tuple))):
        if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1) (got {list(betas)!r}); e.g. "
                              f"{where}.betas=[0.9,0.999]")


def _check_numbers(cls_path: str, node: DictConfig, where: str) -> None:
    """Arguments the constructor annotates as numbers, given as text (``recipe.lam=high``)."""
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(get_class(cls_path).__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the constructor checks for itself
        return
    for key, value in node.items():
        hint = hints.get(str(key))
        numeric = hint in (float, int) or set(typing.get_args(hint)) - {type(None)} in ({float}, {int}, {float, int})
        if numeric and isinstance(value, str):
            default = inspect.signature(get_class(cls_path).__init__).parameters.get(str(key))
            example = default.default if default is not None and _number(default.default) else 1
            raise ConfigError(f"{where}.{key} must be a number (got {value!r}); e.g. {where}.{key}={example}")


def writable(path: Path) -> Path | None:
    """The directory that would have to be written to create ``path`` (``path`` itself or
    its nearest existing parent) when it is not writable, else None."""
    here = path.expanduser()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return here
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=here, prefix=".kd-writable-"):
            pass
    except OSError:
        return here
    return None


def output_dir_error(cfg: DictConfig, multirun: bool) -> str | None:
    """Hydra creates the run's (or sweep's) directory before kd runs: one that cannot be
    created is said here, as the option to change, instead of Hydra's traceback."""
    key = "sweep.dir" if multirun else "run.dir"
    try:
        directory = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
    except Exception:  # an interpolation only Hydra's runtime resolves: Hydra's business
        return None
    blocked = writable(directory)
    if blocked is None:
        return None
    return (f"the {'sweep' if multirun else 'run'} directory {directory} cannot be created ({blocked} is not a writable "
            f"directory); set hydra.{key}=<a writable directory>")


#: settings that moved: the old key on the command line is answered with the new one
MOVED_KEYS = {"student.init_from_teacher": "student_init_from_teacher"}


def composition_sentence(e: Exception) -> str:
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


#: the precisions Lightning accepts (lightning.fabric.connector._PRECISION_INPUT)
def _precisions() -> tuple:
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(a for arg in typing.get_args(_PRECISION_INPUT) for a in typing.get_args(arg))


def _check_trainer(trainer: DictConfig) -> None:
    """Trainer values Lightning would refuse deep inside, said as the option to change."""
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < -1):
            raise ConfigError(f"trainer.{key} must be a whole number >= 0, or -1 for no limit (got {value!r}); e.g. "
                              f"trainer.{key}=10")
    precision = trainer.get("precision")
    if precision is not None:
        allowed = _precisions()
        if precision not in allowed and str(precision) not in allowed:
            raise ConfigError(f"trainer.precision={precision} is not a precision Lightning knows; use one of "
                              f"{', '.join(str(a) for a in allowed if isinstance(a, str) and '-' in a)}")
    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        cuda = torch.cuda.is_available()
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        if not (cuda if accelerator == "cuda" else mps if accelerator == "mps" else cuda or mps):
            raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no such device (torch sees "
                              "none); use trainer.accelerator=cpu, or trainer.accelerator=auto")


def _check_values(cfg: DictConfig) -> None:
    """Single values that are out of range, the wrong type or point at nothing usable."""
    check_threads(cfg)
    _check_optimizer(cfg.get("optimizer"), "optimizer")
    for label, t in teacher_configs(cfg).items():
        fit = t.get("fit")
        if isinstance(fit, DictConfig):
            _check_optimizer(fit.get("optimizer"), "teacher.fit.optimizer" if label is None else
                             f"teachers.{label}.fit.optimizer")
    if isinstance(cfg.get("student_sft"), DictConfig):
        _check_optimizer(cfg.student_sft.get("optimizer"), "student_sft.optimizer")
    data = cfg.get("data")
    if isinstance(data, DictConfig):
        for key in ("batch_size", "eval_batch_size"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"data.{key} must be a whole number >= 1 (got {value!r}); e.g. data.{key}=16")
    for group in ("recipe", "divergence"):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            _check_numbers(str(node._target_), node, group)
    if isinstance(cfg.get("trainer"), DictConfig):
        _check_trainer(cfg.trainer)
    student = cfg.get("student")
    name = student.get("name_or_path") if isinstance(student, DictConfig) else None
    if isinstance(name, str) and name != "???":
        path = Path(name).expanduser()
        if path.is_file():
            raise ConfigError(f"student.name_or_path '{name}' is a file; pass the directory that holds the model's "
                              "config.json and weights, or a hub name")
        if path.is_dir() and not any(path.iterdir()):
            raise ConfigError(f"student.name_or_path '{name}' is an empty directory; pass a directory holding a "
                              "saved model (config.json and weights), or a hub name")
    paths = cfg.get("paths")
    if isinstance(paths, DictConfig):
        output = paths.get("output_dir")
        if isinstance(output, str) and (blocked := writable(Path(output))) is not None:
            raise ConfigError(f"the output directory {output} cannot be written ({blocked} is not a writable "
                              "directory); choose another with hydra.run.dir=<a writable directory>")
        cache = paths.get("cache_dir")
        # a read-only cache holding every entry the run needs serves it (kd.subruns.check_cache says which it lacks)
        if isinstance(cache, str) and not Path(cache).expanduser().is_dir() and \
                (blocked := writable(Path(cache))) is not None:
            raise ConfigError(f"the cache directory {cache} is not writable and cannot be created ({blocked} is not a "
                              "writable directory); make it writable or set paths.cache_dir=<a writable directory> "
                              "(or KD_CACHE_DIR)")


__all__ = ["check_recipe", "check_config", "check_threads", "writable"]
