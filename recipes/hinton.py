"""Hinton soft targets (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", arXiv:1503.02531).

    L = (1 - lam) * CE(y, softmax(z_s)) + lam * T^2 * D(softmax(z_t / T) || softmax(z_s / T))

with D the forward KL of the paper (``recipe=hinton`` selects ``divergence=forward_kl``);
any divergence of the ``divergence/`` group replaces it (``divergence=jsd``). The hard term uses the student's logits at T=1
and only positions with a gold label; the soft term covers every position in the mask,
so unlabelled examples of a transfer set are distilled too (as in the paper). T^2 keeps
the soft term's gradient scale independent of T (its gradients scale as 1/T^2).

Reductions follow the project convention: sum over classes (or vocabulary), mean over
valid positions of the whole batch. For language models this is word-level KD (Kim &
Rush 2016) on every target token.

Deviations: the paper gives no universal lam or T (it reports that a much lower weight on
the hard term worked best); our defaults (lam 0.5, T 4) are the digits quickstart's.

Run: ``kd recipe=hinton recipe.lam=0.7 recipe.temperature=2``
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kd import ConfigError
from kd.divergences import Divergence
from kd.evaluation import cross_entropy
from kd.recipe import IGNORE_INDEX, DistillationRecipe, Needs
from kd.signals import SIGNAL_FORMS


class Hinton(DistillationRecipe):
    """Hinton's distillation loss.

    Args:
        lam: weight of the soft (distillation) term in [0, 1]; the hard term gets 1 - lam.
        temperature: softmax temperature T > 0 of the soft term.
        divergence: D, the forward KL in the paper (``kd.divergences.ForwardKL()``).
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(divergence=True, teacher_signals=SIGNAL_FORMS, loss_temperature="temperature")

    def __init__(
        self, *, lam: float = 0.5, temperature: float = 4.0, divergence: Divergence | None = None, **kwargs: Any
    ) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"recipe.lam must be in [0, 1] (got {lam}); it weights the soft term, 1 - lam the hard one")
        if not temperature > 0:
            raise ConfigError(f"recipe.temperature must be > 0 (got {temperature}); T=1 is the plain softmax")
        super().__init__(divergence=divergence, **kwargs)
        self.lam = lam
        self.temperature = temperature

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch, fused=self.fused)
        teacher = self.teacher_outputs(batch)  # its mask leaves out rows without a teacher
        hard = cross_entropy(out.logits, out.labels)
        soft = self.temperature**2 * self.divergence(out.logits, teacher, out.mask, temperature=self.temperature)
        loss = (1 - self.lam) * hard + self.lam * soft
        # the items of the main term (the soft one, unless lam = 0); see kd.recipe on mixed counts
        items = (out.labels != IGNORE_INDEX).sum() if self.lam == 0 else self.divergence.kept.sum()
        return {"loss": loss, "hard_ce": hard, "soft_kd": soft, "num_items": items}
