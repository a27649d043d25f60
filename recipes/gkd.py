"""Generalized knowledge distillation, GKD (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", ICLR; arXiv:2306.13649).

    L_GKD = (1 - lmbda) * E_{(x, y) ~ data} [ D(p_T || p_S)(y | x) ]
            +    lmbda  * E_{x ~ data, y ~ p_S(. | x)} [ D(p_T || p_S)(y | x) ]

where ``D(y | x)`` is a token-level divergence between the teacher's and the student's
next-token distributions along the sequence ``y``, summed over the vocabulary. The
recipe's loss is only ``D``; the other parts come from the config groups:

* ``D``: the ``divergence/`` group, by default the generalized JSD(beta) of the paper,
  ``beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)`` with ``M = beta p_T + (1 - beta) p_S``
  (beta = 0 is forward KL, beta = 1 reverse KL, TRL's convention; :mod:`kd.divergences`).
  Any other divergence swaps in (``divergence=reverse_kl``).
* ``lmbda`` (student-data fraction): the ``mixed`` regime replaces a batch's responses by
  the student's own samples with probability ``lmbda`` (no gradient through sampling);
  ``regime.seq_kd=true`` makes the off-policy part the teacher's samples (cached).
  ``regime.sampling.temperature`` is the sampling temperature, separate from this recipe's
  loss ``temperature``.
* Reduction: ``divergence.reduction=mean`` averages over the response tokens of the batch
  (TRL), ``seq_mean`` over each sequence's tokens and then over sequences (the paper's
  per-sequence average). Both are exact under gradient accumulation (the recipe reports
  its item count, :mod:`kd.recipe`).
* Dropout: the student trains in eval mode, without dropout (``Needs.student_dropout``
  False), as in the paper and TRL (``disable_dropout``): on-policy samples and the loss
  then see the same network. ``recipe.student_dropout=true`` keeps its dropout on.

Named configs: ``recipe=gkd`` (JSD(0.5), mixed regime with lmbda 0.5, sampling at T = 1);
``experiment=gkd_trl`` TRL's defaults (lmbda 0.5, beta 0.5, sampling temperature 0.9,
loss temperature 1, token mean); ``experiment=gkd_paper`` the paper's (on-policy lmbda 1,
sampling at T = 1, per-sequence mean), whose ``-m`` sweeps the paper's grid beta in
{0.1, 0.5, 0.9} x lmbda in {0, 0.5, 1}.

Deviations: the loss temperature divides both models' logits but, unlike Hinton's loss,
is not compensated by T^2 (the paper uses T = 1, where both agree). The paper draws
whether a step is on-policy per step, as we do per batch.

Run: ``kd recipe=gkd data=task teacher=task_llama student=task_llama regime.lmbda=1 divergence.beta=0.9``
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from kd import ConfigError
from kd.divergences import Divergence
from kd.recipe import DistillationRecipe, Needs
from kd.signals import SIGNAL_FORMS


class GKD(DistillationRecipe):
    """GKD: a divergence between teacher and student on (partly) self-generated sequences.

    Args:
        temperature: divides both models' logits in the loss (> 0; 1 in the paper).
        student_dropout: replaces the class's ``needs.student_dropout`` (False: the student
            trains in eval mode); None keeps it. True keeps the student's dropout on.
        divergence: the token-level divergence (``recipe=gkd`` selects ``divergence=jsd``,
            beta 0.5); its ``reduction`` (``mean`` or ``seq_mean``) is the token/sequence
            averaging switch.
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(divergence=True, data=("causal_lm",), student_dropout=False, teacher_signals=SIGNAL_FORMS,
                  loss_temperature="temperature")

    def __init__(self, *, temperature: float = 1.0, student_dropout: bool | None = None,
                 divergence: Divergence | None = None, **kwargs: Any) -> None:
        if not temperature > 0:
            raise ConfigError(f"recipe.temperature must be > 0 (got {temperature}); GKD uses 1")
        if divergence is not None and divergence.reduction not in ("mean", "seq_mean"):
            raise ConfigError(f"GKD averages over tokens or sequences: set divergence.reduction to mean or "
                              f"seq_mean (got {divergence.reduction})")
        super().__init__(divergence=divergence, **kwargs)
        self.temperature = temperature
        if student_dropout is not None:
            self.needs = replace(self.needs, student_dropout=student_dropout)

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch, fused=self.fused)
        teacher = self.teacher_outputs(batch)  # its mask leaves out rows routed to no teacher
        loss = self.divergence(out.logits, teacher, out.mask, temperature=self.temperature)
        kept = self.divergence.kept  # the mask after token selection (divergence.select)
        if self.divergence.reduction == "seq_mean":
            items = kept.reshape(-1, kept.shape[-1]).any(-1).sum()
        else:
            items = kept.sum()
        return {"loss": loss, "num_items": items}
