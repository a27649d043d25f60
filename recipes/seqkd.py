"""Sequence-level knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge
Distillation", EMNLP; arXiv:1606.07947): word-level KD, Seq-KD, Seq-Inter and Word+Seq.

One loss, two knobs: the mixing weight ``alpha`` and the data regime.

    L = (1 - alpha) * NLL(y) + alpha * sum_t sum_k q_T(k | y_<t) * (-log p_S(k | y_<t))

summed over the vocabulary, averaged over the target tokens of the whole batch, where
``y`` are the targets the regime provides:

* word-level KD: ``alpha`` = 0.5 on the dataset's responses (``regime=offline``);
* Seq-KD: ``alpha`` = 0 on the teacher's own outputs ``y_hat`` (``regime=teacher_generated``,
  generated once and cached): plain cross-entropy on ``y_hat``;
* Seq-Inter: ``alpha`` = 0 on the teacher output closest to the reference among K
  samples (``regime=teacher_generated regime.num_candidates=5
  regime.select=closest_to_reference``; smoothed sentence BLEU);
* Word+Seq: ``alpha`` = 0.5 on ``y_hat`` (word-level term along the teacher's prefixes).

The soft term is the paper's cross-entropy to the teacher distribution (it equals
KL(q_T || p_S) plus the teacher's entropy, which has no gradient); with a ``temperature``
other than 1 both distributions are softened and the term is scaled by T^2 (Hinton).

Deviations: the paper decodes Seq-KD targets with beam search (K = 5) and builds
Seq-Inter's K-best list from the beam; we sample (temperature 1 by default; ``temperature:
0`` is greedy, i.e. beam size 1) and draw K independent samples. The paper's alpha for
word-level KD was tuned per task [unsure]; 0.5 is our default.

Run: ``kd recipe=seqkd data=task teacher=task_llama student=task_llama``
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kd import ConfigError
from kd.divergences import SoftCrossEntropy
from kd.evaluation import cross_entropy
from kd.recipe import IGNORE_INDEX, DistillationRecipe, Needs
from kd.signals import SIGNAL_FORMS


class SeqKD(DistillationRecipe):
    """Kim & Rush's word- and sequence-level KD (the regime picks the targets).

    ``chunked``, ``select``, ``keep``, ``chunk_size`` and ``compile`` are the divergences' settings
    (:class:`kd.divergences.Divergence`) with their defaults; the recipe yamls take them from
    the fragment the divergence yamls share (``conf/token_loss/default.yaml``).

    Args:
        alpha: weight in [0, 1] of the word-level soft term; 0 skips the teacher forward.
        temperature: softens both distributions of the soft term (T^2 scaling).
        chunked: compute the loss from the language models' hidden states and output heads
            a block of positions at a time (:mod:`kd.chunked`), never building (B, L, V) logits.
        select, keep: token selection of the soft term (TIP, :mod:`kd.divergences`): ``all``
            or ``entropy`` / ``overconfident`` / ``both`` keeping the fraction ``keep``.
        chunk_size: positions per block of the soft term's chunked path (None: the default
            block size of :mod:`kd.chunked`).
        compile: the soft term's compiled block function (:mod:`kd.compiled`): auto (CUDA
            only), true or false.
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    needs = Needs(data=("causal_lm",), teacher_signals=SIGNAL_FORMS, loss_temperature="temperature")

    def __init__(self, *, alpha: float = 0.0, temperature: float = 1.0, chunked: bool = True, select: str = "all",
                 keep: float = 1.0, chunk_size: int | None = None, compile: str | bool = "auto", **kwargs: Any) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"recipe.alpha must be in [0, 1] (got {alpha}); it weights the word-level soft term")
        if not temperature > 0:
            raise ConfigError(f"recipe.temperature must be > 0 (got {temperature})")
        super().__init__(**kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self.chunked = chunked
        self.soft = SoftCrossEntropy(select=select, keep=keep, chunked=chunked, chunk_size=chunk_size, compile=compile)

    @property
    def fused(self) -> bool:
        return self.chunked

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.outputs(self.student, batch, fused=self.fused)
        logits, mask = out.logits, out.mask
        nll = cross_entropy(logits, out.labels)
        terms = {"nll": nll}
        loss = (1 - self.alpha) * nll
        if self.alpha > 0:
            teacher = self.teacher_outputs(batch)  # its mask leaves out rows without a teacher
            word = self.temperature**2 * self.soft(logits, teacher, mask, self.temperature)
            terms["word_kd"] = word
            loss = loss + self.alpha * word
        return {"loss": loss, **terms, "num_items": (out.labels != IGNORE_INDEX).sum()}
