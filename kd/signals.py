"""The forms a model's output takes on its way to a loss, as plain value types.

A divergence or cross-entropy in kd accepts the student's and the teacher's signal in one
of these forms:

* a dense logits tensor ``(..., V)``: the ordinary case, no type of its own;
* :class:`HeadLogits`: the last hidden states ``(..., H)`` and the linear output head
  (weight, bias, optional scale and softcap) that would turn them into logits. The
  logits are never built as a whole: the fused loss (:mod:`kd.chunked`) computes them a
  block of positions at a time, and :meth:`HeadLogits.materialize` builds them when a
  plain loss needs the full tensor;
* :class:`TopK`: a teacher known only by its ``k`` most likely tokens and their
  log-probabilities (what a teacher logit cache or a served teacher stores), plus a tail
  bin for the mass outside them; :func:`topk_bins` maps a student's log-probabilities
  and a :class:`TopK` onto the same ``k + 1`` bins;
* :class:`Labels`: gold token ids standing in for the teacher, so a cross-entropy runs
  through the same fused path.

:class:`Outputs` is one model call on a batch: its signal (:data:`Signal`, one of the
forms above), the gold labels, the mask of positions that count and, when asked, the last
hidden states. A teacher's outputs (:class:`kd.teachers.Teachers`) carry a mask that
already leaves out rows without a teacher; the divergences accept them as the teacher
and then compare only those positions.

:func:`compute_dtype` is the one rule for the dtype every loss computes in.

This module imports nothing of kd, so losses, regimes, caches and recipes can all share
these types without importing one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["HeadLogits", "Labels", "TopK", "topk_bins", "TAIL_FLOOR", "compute_dtype", "Signal", "Outputs",
           "SIGNAL_FORMS"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the divergences compute in: float64 if any input is float64, else float32.

    Low-precision inputs (bf16, fp16) are upcast to float32; float64 is never downcast.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype == torch.float64 else torch.float32


@dataclass
class HeadLogits:
    """Logits that exist only as hidden states and a linear head.

    ``logits = softcap(scale * (hidden @ weight.T + bias))`` with
    ``softcap(z) = c * tanh(z / c)`` when ``softcap = c`` is set (Gemma 2/3's
    ``final_logit_softcapping``). :meth:`materialize` builds them (the plain path).

    Attributes:
        hidden: ``(..., H)``.
        weight: ``(V, H)``, the output head (``lm_head.weight``, possibly cut to the
            tokenizer's vocabulary).
        bias: ``(V,)`` or None.
        softcap: ``c > 0`` or None.
        scale: multiplies the logits before the softcap (1: none).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.weight.shape[0])

    def transform(self, z: Tensor) -> Tensor:
        """Scale and softcap raw head outputs ``z`` (any shape)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def rows_logits(self, hidden_rows: Tensor) -> Tensor:
        """Logits ``(C, V)`` of hidden rows ``(C, H)``."""
        return self.transform(F.linear(hidden_rows, self.weight, self.bias))

    def materialize(self) -> Tensor:
        """The full logits ``(..., V)``."""
        return self.rows_logits(self.hidden)

    def with_vocab(self, vocab: int) -> HeadLogits:
        """The logits of the first ``vocab`` tokens only."""
        if vocab >= self.weight.shape[0]:
            return self
        bias = None if self.bias is None else self.bias[:vocab]
        return replace(self, weight=self.weight[:vocab], bias=bias)


@dataclass
class Labels:
    """Gold token ids ``(...)`` as the "teacher" of a fused cross-entropy (IGNORE rows
    must be excluded by the mask)."""

    ids: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)


@dataclass
class TopK:
    """A teacher distribution known by its top ``k`` tokens (a teacher logit cache).

    Attributes:
        ids: ``(..., k)`` token ids.
        logprobs: ``(..., k)`` the teacher's log-probabilities of those tokens, already at
            the loss temperature (any float dtype; upcast to the compute dtype).
        tail: compare ``k + 1`` bins, the ``k`` ids and one tail bin holding the remaining
            mass (teacher: ``1 - sum(top-k)``; student: its mass outside the ``k`` ids), the
            default; ``False``: renormalise both sides over the ``k`` ids (a weaker loss that
            ignores the student's mass elsewhere).
    """

    ids: Tensor
    logprobs: Tensor
    tail: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)


def topk_bins(student_logprobs: Tensor, teacher: TopK) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the top-k bins (docs/spec.md section 8).

    Args:
        student_logprobs: ``(..., V)`` student log-probabilities (at the loss temperature).
        teacher: the cached top-k, ``ids``/``logprobs`` ``(..., k)``.

    Returns:
        ``(student_bins, teacher_bins)``, each ``(..., k + 1)`` with the tail bin last
        (``(..., k)`` when ``teacher.tail`` is False), in the student's dtype. The
        student's tail is the log-sum-exp of its log-probabilities outside the ``k`` ids
        (no cancellation); where it has none (``k = V``) both tails are ``-inf`` (0 mass),
        so ``k = V`` gives the full-vocabulary divergence exactly.
    """
    dtype = student_logprobs.dtype
    ids = teacher.ids.long()
    log_p = teacher.logprobs.to(dtype)
    log_q = student_logprobs.gather(-1, ids)
    if not teacher.tail:
        return torch.log_softmax(log_q, dim=-1), torch.log_softmax(log_p, dim=-1)
    neg_inf = torch.full((), -math.inf, dtype=dtype, device=log_q.device)
    outside = student_logprobs.scatter(-1, ids, -math.inf)
    empty = (outside == -math.inf).all(-1, keepdim=True)
    safe = torch.where(empty, torch.zeros((), dtype=dtype, device=log_q.device), outside)
    q_tail = torch.where(empty, neg_inf, torch.logsumexp(safe, dim=-1, keepdim=True))
    # below k = V the teacher's tail is never 0 (a softmax); a sum of fp16 top-k probabilities
    # can still round to 1 or more, so the tail is floored at TAIL_FLOOR (else reverse KL is inf)
    p_mass = (1.0 - log_p.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)
    p_tail = torch.where(empty, neg_inf, p_mass.log())
    return torch.cat([log_q, q_tail], -1), torch.cat([log_p, p_tail], -1)


#: the least tail mass a cached top-k teacher is given below k = V (:func:`topk_bins`): its
#: top-k log-probabilities are stored in fp16, whose sums resolve about 1e-3, so any smaller
#: tail is unknown; 1e-6 keeps reverse KL finite without claiming a tail that was not seen
TAIL_FLOOR = 1e-6


#: a model's signal as a loss takes it: dense logits, hidden states and head, or top-k
Signal = Tensor | HeadLogits | TopK

#: the names a recipe uses to declare which forms of the teacher's signal its loss takes
#: (``Needs.teacher_signals``): ``logits`` a dense tensor, ``head`` a :class:`HeadLogits`
#: (the fused path), ``topk`` a :class:`TopK` (a logit cache or a served teacher)
SIGNAL_FORMS = ("logits", "head", "topk")


@dataclass
class Outputs:
    """One model call on a batch.

    Attributes:
        logits: ``(..., V)`` (:data:`Signal`); position i of a causal LM predicts token i+1,
            already shifted. A :class:`HeadLogits` on the fused path, a :class:`TopK` for a
            cached or served teacher.
        labels: ``(...)`` gold targets aligned with ``logits`` (-100 where none).
        mask: ``(...)`` bool, the positions where a distribution is compared (for a
            teacher: only positions of rows that have one).
        hidden: ``(..., H)`` last hidden states aligned with ``logits`` (None unless asked).
    """

    logits: Signal
    labels: Tensor
    mask: Tensor
    hidden: Tensor | None = None
