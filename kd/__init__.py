"""kd: knowledge-distillation recipes on PyTorch Lightning, configured with Hydra.

The building blocks (divergences, models, data, recipes, regimes, evaluation, ...) import
without Hydra. The config-driven layer needs it: ``kd.cli``, ``kd.build`` and ``kd.runs``
import Hydra, and ``kd.pipeline`` does through ``kd.build``. Recipes live in the sibling
package ``recipes``.
"""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """A configuration that cannot work. The message is one sentence that names the fix.

    The command line prints it without a traceback (``kd.cli``); library users catch it
    as a ``ValueError``.
    """


def disk_full(path: object) -> str:
    """The sentence for a write to ``path`` that found its disk (or quota) full."""
    return (f"no space left on the device while writing {path} (nothing half-written is kept); free space there, "
            "or point paths.output_dir / paths.cache_dir at another disk")


def config_error(e: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` behind ``e``, if any (Hydra's ``instantiate`` wraps what
    constructors raise; so may other libraries); a write that found the disk full is one too."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ConfigError):
            return e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: one sentence too
            return ConfigError(disk_full(e.filename or "the run's outputs or the cache"))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def settings_of(cls: type, value: object, what: str) -> object:
    """A frozen settings dataclass ``cls`` from itself, a mapping of its fields (a Hydra
    node) or None (its defaults); an unknown field is one sentence naming ``what`` and the
    known fields."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    fields = dict(value)  # type: ignore[call-overload]
    known = cls.__dataclass_fields__  # type: ignore[attr-defined]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{what} settings {unknown} are unknown; use {', '.join(known)}")
    return cls(**fields)
