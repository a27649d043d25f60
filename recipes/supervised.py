"""Supervised training without a teacher: trains teachers and from-scratch baselines.

Loss: cross-entropy of the student on gold labels, mean over labelled positions of the
whole batch (positions labelled IGNORE_INDEX, e.g. the unlabelled part of a transfer
set, contribute nothing). No deviation to report: this is the baseline every
distillation recipe is compared with, trained on the same data, epochs and optimizer.

Run: ``kd recipe=supervised``  (the digits student from scratch)
"""

from __future__ import annotations

from torch import Tensor

from kd.evaluation import cross_entropy
from kd.recipe import IGNORE_INDEX, DistillationRecipe, Needs


class Supervised(DistillationRecipe):
    """Plain cross-entropy on gold labels; no teacher."""

    needs = Needs(teacher=False)

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch)
        ce = cross_entropy(out.logits, out.labels)
        return {"loss": ce, "ce": ce, "num_items": (out.labels != IGNORE_INDEX).sum()}
