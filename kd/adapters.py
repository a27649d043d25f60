"""LoRA students through the ``peft`` library (``kd peft=lora``).

Hu et al. 2021, "LoRA": a frozen weight ``W`` plus a trainable low-rank update,
``W x + (alpha / r) B A x`` with ``A`` (r, in) and ``B`` (out, r), ``B`` starting at zero so
the adapted student starts as the student. kd injects the adapters into the student in
place (``peft.inject_adapter_in_model``): the student stays the same transformers model
object, so recipes, generation, the chunked head and checkpoints see no wrapper. After
the student's starting weights are loaded (teacher-layer init, SFT, ``student_init``),
:meth:`LoRA.apply` injects the adapters and freezes everything else, so only the adapters
train.

* Checkpoints hold only the adapters (:func:`frozen_keys` names what the recipe drops on
  save and restores from the live student on load).
* The exported ``student/`` is, as configured (``export``), either the merged model
  (``W + (alpha / r) B A`` in each adapted layer: plain transformers loads it) or the
  adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``: peft's
  ``PeftModel.from_pretrained(base, dir)`` loads it on the base student).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd import ConfigError

#: the attribute an adapted student carries (its :class:`LoRA` settings)
MARK = "_kd_lora"
EXPORTS = ("merged", "adapter")


@dataclass
class LoRA:
    """LoRA settings (``conf/peft/lora.yaml``).

    Args:
        r: rank of the update.
        alpha: scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input during training.
        target_modules: module names to adapt (peft's matching), or ``all-linear``: every
            linear layer but the output head.
        export: ``merged`` (a plain transformers model) or ``adapter`` (peft files only).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str = "all-linear"
    export: str = "merged"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"peft.r must be >= 1 (got {self.r})")
        if self.export not in EXPORTS:
            raise ConfigError(f"peft.export must be one of {EXPORTS} (got {self.export!r})")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    def config(self) -> Any:
        try:
            from peft import LoraConfig
        except ImportError as e:
            raise ConfigError("peft=lora needs the peft package; pip install peft (or kd[peft])") from e
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none")

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the adapters into ``model`` in place, freeze every other weight; return it."""
        from peft import inject_adapter_in_model

        if getattr(model, MARK, None) is not None:
            raise ConfigError("the student already carries LoRA adapters; apply peft once")
        if not hasattr(model, "config"):
            raise ConfigError(f"peft=lora adapts transformers models; the student is a {type(model).__name__}")
        try:
            inject_adapter_in_model(self.config(), model)
        except ValueError as e:
            raise ConfigError(f"peft.target_modules={self.target_modules!r} matches no layer of the student "
                              f"({str(e).splitlines()[0]}); name its linear layers or use all-linear") from None
        for name, param in model.named_parameters():
            param.requires_grad = "lora_" in name
        setattr(model, MARK, self)
        return model


def adapted(model: nn.Module) -> LoRA | None:
    """The :class:`LoRA` settings ``model`` was adapted with, or None."""
    return getattr(model, MARK, None)


def frozen_keys(model: nn.Module) -> list[str]:
    """State-dict keys of an adapted model that never train (everything but the adapters):
    what its checkpoints leave out. Empty for a model without adapters."""
    if adapted(model) is None:
        return []
    return [k for k in model.state_dict() if "lora_" not in k]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted model's weights with every update folded in (``W + scale * B A``), under
    the names of the model without adapters."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).detach()
                deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = value.detach().clone() + deltas[plain] if plain in deltas else value.detach().clone()
    return out


def merged(model: nn.Module) -> nn.Module:
    """A new model of ``model``'s class and config holding :func:`merged_state_dict` (no peft)."""
    plain = type(model)(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return plain.to(next(model.parameters()).dtype)


def save_adapter(model: nn.Module, directory: str | Path, base: str | None = None) -> Path:
    """The adapters alone as peft writes them (``adapter_config.json``,
    ``adapter_model.safetensors``); ``base`` names the base model in the config."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    settings = adapted(model)
    if settings is None:
        raise ConfigError("the student carries no adapters to save; train it with peft=lora")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = settings.config()
    config.base_model_name_or_path = base
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(str(out))
    # named as PeftModel.save_pretrained names them (the model sits at base_model.model)
    state = {f"base_model.model.{k}": v.detach().cpu().contiguous()
             for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    return out


__all__ = ["LoRA", "adapted", "frozen_keys", "merged_state_dict", "merged", "save_adapter"]
