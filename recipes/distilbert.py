"""DistilBERT's triple loss (Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled
version of BERT", arXiv:1910.01108; code: HF transformers research_projects/distillation).

    L = a_ce * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))      (named "ce" in the code)
      + a_mlm * CE(z_s, masked tokens)
      + a_cos * mean(1 - cos(h_s, h_t))

* the KL term covers every non-pad token (``restrict_ce_to_mask=true``: only the masked
  ones), summed over the vocabulary and averaged over those rows ("batchmean");
  ``recipe=distilbert`` selects ``divergence=forward_kl`` and the ``divergence/`` group can
  replace it;
* the MLM term is the student's cross-entropy at T = 1 on the masked positions;
* the cosine term compares the **last** hidden states of student and teacher at every
  non-pad position (equal hidden sizes, no projection).

Batches come from :class:`kd.data.mlm.MLMCollator`: 15% of tokens drawn without
replacement with smoothed frequency weights (exponent -0.7, special tokens never), 80%
``[MASK]`` / 10% kept / 10% random, re-drawn every batch. The student usually starts from
the teacher (:func:`kd.models.init_from_teacher`: embeddings, their LayerNorm, the MLM
head and every other layer, ``[0, 2, 4, 7, 9, 11]`` for 12 -> 6).

Defaults are the published run's (code README): a_ce 5.0, a_mlm 2.0, a_cos 1.0, T 2.

Fused path (``divergence.chunked``, default on): BERT's and DistilBERT's MLM head is a
transform (dense, activation, LayerNorm) followed by a linear decoder tied to the input
embeddings (:func:`kd.models.split_mlm_head`, checked against the model's logits once).
The transform is applied to the last hidden states (``(N, H)``, cheap), and the decoder
is the linear head of the fused loss: the KL term and the MLM cross-entropy are computed a
block of positions at a time (:mod:`kd.chunked`), no ``(N, V)`` logits of either model;
the cosine term uses the body's last hidden states, before the transform. Values and
gradients equal the dense path's (tests/test_fused_recipes.py).

Deviations: the code's optional causal-LM and hidden-state MSE terms (a_clm, a_mse, 0 in
the published run) are left out.

Run: ``kd recipe=distilbert data=<masked-LM data> teacher=<masked LM> student=<masked LM>``
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kd import ConfigError, batches
from kd.divergences import Divergence, reduce
from kd.evaluation import cross_entropy
from kd.recipe import DistillationRecipe, Needs
from kd.signals import HeadLogits


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """``mean(1 - cos(h_s, h_t))`` over the positions in ``mask``; ``(..., H) -> scalar``:
    0 for identical vectors, 1 for orthogonal, 2 for opposite."""
    cos = torch.nn.functional.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return reduce(1 - cos, mask)


class DistilBERT(DistillationRecipe):
    """DistilBERT's KL + MLM + cosine loss for masked-LM encoders.

    Args:
        alpha_ce, alpha_mlm, alpha_cos: weights of the three terms (>= 0).
        temperature: softens both distributions of the KL term (T^2 scaling).
        restrict_ce_to_mask: the KL term only on masked positions (default: all non-pad).
        divergence: the KL term's divergence (the paper's forward KL: ``kd.divergences.ForwardKL()``).
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(divergence=True, hidden_states=True, data=("masked_lm",), teacher_signals=("logits", "head"))

    def __init__(self, *, alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                 temperature: float = 2.0, restrict_ce_to_mask: bool = False, divergence: Divergence | None = None,
                 **kwargs: Any) -> None:
        if min(alpha_ce, alpha_mlm, alpha_cos) < 0 or alpha_ce + alpha_mlm + alpha_cos == 0:
            raise ConfigError("recipe.alpha_ce/alpha_mlm/alpha_cos must be >= 0 and not all 0")
        if not temperature > 0:
            raise ConfigError(f"recipe.temperature must be > 0 (got {temperature}); DistilBERT uses 2")
        super().__init__(divergence=divergence, **kwargs)
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos
        self.temperature = temperature
        self.restrict_ce_to_mask = restrict_ce_to_mask

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if not batches.is_masked_lm(batch):
            raise ConfigError("DistilBERT needs masked-LM batches; use a masked-LM datamodule such as data=text")
        student, teacher = self.outputs(self.student, batch, fused=self.fused), self.teacher_outputs(batch)
        logits, labels, mask = student.logits, student.labels, student.mask
        mask = mask & teacher.mask  # rows without a teacher do not count
        rows = mask & (labels != -100) if self.restrict_ce_to_mask else mask
        terms: dict[str, Tensor] = {}
        loss = (logits.hidden if isinstance(logits, HeadLogits) else logits).new_zeros((), dtype=torch.float32)
        if self.alpha_ce > 0:
            terms["kd"] = self.temperature**2 * self.divergence(logits, teacher.logits, rows,
                                                                temperature=self.temperature)
            loss = loss + self.alpha_ce * terms["kd"]
        if self.alpha_mlm > 0:
            terms["mlm"] = cross_entropy(logits, labels)
            loss = loss + self.alpha_mlm * terms["mlm"]
        if self.alpha_cos > 0:
            terms["cos"] = cosine_loss(student.hidden, teacher.hidden, mask)
            loss = loss + self.alpha_cos * terms["cos"]
        return {"loss": loss, **terms}
