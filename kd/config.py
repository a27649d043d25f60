"""Hydra plumbing: composing the config ``kd`` would run, instantiating its nodes, and
reading what a composed config says (the options chosen, what a shipped option builds,
the run's teachers and tokenizers, derived configs of sub-runs).

It knows config files and nodes, never recipes: :mod:`kd.checks` reads it to refuse
combinations, :mod:`kd.build` to assemble a run, :mod:`kd.subruns` to derive the configs of
cached sub-runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd import ConfigError, config_error
from kd.models import kind_of, load_tokenizer

#: the config tree the console scripts compose (``conf/`` beside the package)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: what each kind of data holds, for messages
KIND_WORDS = {"classifier": "classification", "causal_lm": "prompt/response (causal LM)",
              "masked_lm": "masked-LM text"}
MODEL_WORDS = {"classifier": "classifier", "causal_lm": "causal LM", "masked_lm": "masked LM"}

#: a top-level key next to student_init and student_sft: copy the trained teacher's layers
#: into the student (a :func:`kd.models.layer_map` scheme; student=from_teacher sets it)
INIT_FROM_TEACHER = "student_init_from_teacher"


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


def world_size(trainer: DictConfig) -> int:
    """The processes a trainer config trains on (devices x nodes; 1 when a device count is
    not given as a number or a list)."""
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    count = count if isinstance(count, int) and count > 0 else 1
    return count * int(trainer.get("num_nodes") or 1)


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


__all__ = ["CONF_DIR", "INIT_FROM_TEACHER", "compose_config", "instantiate", "choice", "instantiate_all", "sub_config",
           "student_factory", "world_size", "option_kind", "options_of_kind", "student_tokenizer", "teacher_configs",
           "teacher_tokenizer"]
