"""Datasets and LightningDataModules.

Batch conventions (what a recipe receives):

* classification: ``{"inputs": float (B, ...), "labels": long (B,)}``; a label of
  :data:`IGNORE_INDEX` marks an example without a gold label (it still feeds the
  teacher's soft targets, as in Hinton's transfer set).
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def batch_targets(batch: dict[str, Any]) -> tuple[Any, Any]:
    """``(labels, mask)`` of a batch, aligned with a model's logits as recipes compare them:

    * token batches (``input_ids``): shifted, logits of position i predict token i+1, so
      labels drop the first position; the mask keeps response tokens (prompt and padding
      are IGNORE_INDEX), including those of a transfer set's unlabelled examples when the
      batch has a ``target_mask`` (their labels are IGNORE_INDEX: no hard loss there);
    * masked-LM batches (they also carry ``original_ids``, :mod:`kd.data.mlm`): no shift,
      labels at the masked positions, the mask holds every non-pad token;
    * classification (``inputs``): one position per example, every example in the mask.
    """
    import torch

    from kd import ConfigError

    if "input_ids" in batch:
        if "original_ids" in batch:
            return batch["labels"], batch["attention_mask"].bool()
        labels = batch["labels"][:, 1:]
        if "target_mask" in batch:
            return labels, batch["target_mask"][:, 1:]
        return labels, labels != IGNORE_INDEX
    if "inputs" in batch:
        return batch["labels"], torch.ones_like(batch["labels"], dtype=torch.bool)
    raise ConfigError(
        f"batches with keys {sorted(batch)} are not a format recipes understand; use a datamodule "
        "from kd.data (classification: 'inputs'/'labels'; language models: 'input_ids'/'labels')"
    )
