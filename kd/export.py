"""Export: the trained student in its native format, loadable without kd.

:func:`save_student` writes a transformers student with ``save_pretrained`` (and its
tokenizer), any other module as ``model.safetensors``. A student exported with its
tokenizer is self-contained:

* its vocabulary is cut to the tokenizer's (embedding rows past it were never trained,
  and plain ``generate()`` could sample them);
* its config and generation config carry the tokenizer's EOS, BOS and pad ids, so
  ``generate()`` stops where kd's sampler stops.

A LoRA student (:mod:`kd.adapters`) is written merged into a plain model (the live
student keeps its adapters) or as its adapter alone, as ``peft.export`` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kd.adapters import adapted, merged, save_adapter
from kd.models import save_model


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def save_student(student: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``student`` into ``directory`` (see the module docstring); return the directory."""
    settings = adapted(student)
    if settings is not None and settings.export == "adapter":
        out = save_adapter(student, directory, base=getattr(student.config, "_name_or_path", None) or None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out
    if settings is not None:
        student = merged(student)
    if tokenizer is not None and hasattr(student, "resize_token_embeddings"):
        size = len(tokenizer)
        rows = getattr(student.get_input_embeddings(), "num_embeddings", size)
        if rows > size:
            student.resize_token_embeddings(size)
        for config in (student.config, getattr(student, "generation_config", None)):
            if config is not None:
                for key, value in _special_ids(tokenizer).items():
                    setattr(config, key, value)
    out = save_model(student, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
