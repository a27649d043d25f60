"""Token-level divergences between a student and a teacher distribution.

This module holds the distribution-matching losses that the distillation recipes share:
forward KL, reverse KL, generalized Jensen-Shannon (GKD), the two skew KLs of DistiLLM
and total variation. Each exists in three forms:

* a **per-position function** ``*_per_position(student_logprobs, teacher_logprobs)`` that
  maps log-probabilities of shape ``(..., V)`` to one value per position, shape ``(...)``;
  it works on any leading shape, so a chunked variant (logits computed from hidden states
  and the output head chunk by chunk) can call it on each chunk;
* a **loss function** with one uniform signature::

      fn(student_logits, teacher_logits, mask=None, *, temperature=1.0,
         reduction="mean", **shape_params) -> Tensor

  that validates its inputs, turns logits into log-probabilities (:func:`to_log_probs`),
  calls the per-position function and reduces with the shared :func:`reduce`;
* an :class:`torch.nn.Module` wrapper (:class:`ForwardKL`, :class:`ReverseKL`,
  :class:`JSD`, :class:`SkewForwardKL`, :class:`SkewReverseKL`, :class:`TVD`) meant as a
  Hydra ``_target_``; shape parameters (``beta``, ``alpha``) and the reduction are
  constructor arguments validated at setup, the temperature is an argument of ``forward``
  (the recipe owns it).

Conventions
-----------
* ``KL(P||Q) = sum_v P(v) log(P(v) / Q(v))``, summed over the vocabulary. ``P = p_T`` is
  the teacher, ``Q = p_S`` the student. Forward KL is ``KL(p_T||p_S)`` (mode covering),
  reverse KL is ``KL(p_S||p_T)`` (mode seeking).
* Generalized JSD: ``JSD_beta = beta*KL(P||M) + (1-beta)*KL(Q||M)`` with mixture
  ``M = beta*P + (1-beta)*Q``. Unnormalized it vanishes at both ends, so, following TRL,
  ``beta = 0`` is defined as forward KL and ``beta = 1`` as reverse KL explicitly. ``log M``
  is computed in log space (``logsumexp`` of ``log beta + log P`` and
  ``log(1-beta) + log Q``), never by taking the log of a sum of probabilities.
* Skew KLs (DistiLLM): ``SKL_alpha = KL(P || alpha*P + (1-alpha)*Q)`` and
  ``SRKL_alpha = KL(Q || alpha*Q + (1-alpha)*P)``; ``alpha = 0`` gives forward / reverse
  KL, ``alpha`` must lie in ``[0, 1)`` (``alpha = 1`` makes the loss identically 0).
* Total variation: ``TVD = 0.5 * sum_v |P(v) - Q(v)|``.
* ULD (Boizard et al. 2024, "Towards cross-tokenizer distillation"):
  ``sum_i |sort_desc(P)_i - sort_desc(Q)_i|``, the shorter vocabulary zero-padded. It
  compares only the sorted probability values, so the two models may have different
  vocabularies (the one divergence here that accepts logits of different ``V``); which
  positions to compare is the caller's business (``recipes/byte_kd.py`` aligns them by
  byte offsets).
* Precision: softmax / log-softmax and everything after it run in float32 whatever the
  input dtype (bf16 / fp16 logits are upcast); float64 inputs stay float64 (never
  downcast). The returned loss has that compute dtype.
* Temperature ``T > 0`` divides the logits of **both** models before the softmax. No
  ``T**2`` factor is applied here: Hinton's ``T^2`` scaling belongs to the recipe.
* Terms with ``P(v) = 0`` contribute exactly 0 (``0 log 0 = 0``): logits of ``-inf`` (for
  example vocabulary padding rows set to ``-inf`` in both models) give finite values and
  finite gradients; the log-ratio is replaced by 0 with ``torch.where`` *before* the
  multiplication, so the backward pass does not produce NaN either.
* The teacher logits are not detached: run the teacher under ``torch.no_grad()`` (or
  detach) when only the student should receive gradients.
* ``mask`` has the leading shape ``(...)`` of the logits, bool (or 0/1), ``True`` = the
  position counts. Masked positions are replaced by ``torch.where`` (never multiplied by
  0), both in the logits and in the per-position values, so NaN / inf at a masked
  position leaks neither into the loss nor into any gradient.
* Reductions (:data:`REDUCTIONS`):

  - ``"mean"``: sum over valid positions / number of valid positions, i.e. the mean over
    valid tokens of the whole batch (correct under gradient accumulation when the
    caller rescales by token counts); 0, not NaN, when no position is valid;
  - ``"sum"``: sum over valid positions;
  - ``"none"``: per-position values of shape ``(...)``, exactly 0 at masked positions;
  - ``"seq_mean"``: values of shape ``(B, L)`` (at least 2 dims; the last one is the
    position inside a sequence, all earlier ones index sequences): mean over the valid
    positions of each sequence, then mean over the sequences that have at least one
    valid position (the per-sequence average GKD uses); 0 when none has.

Vocabularies that differ only by padding rows must be sliced to the shared true
vocabulary by the caller (``logits[..., :V]``); logits of different shapes are refused.
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch
from torch import Tensor, nn

from kd import ConfigError

__all__ = [
    "REDUCTIONS",
    "compute_dtype",
    "to_log_probs",
    "reduce",
    "forward_kl_per_position",
    "reverse_kl_per_position",
    "jsd_per_position",
    "skew_forward_kl_per_position",
    "skew_reverse_kl_per_position",
    "tvd_per_position",
    "uld_per_position",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "Divergence",
    "ForwardKL",
    "ReverseKL",
    "JSD",
    "SkewForwardKL",
    "SkewReverseKL",
    "TVD",
    "ULD",
]

#: Valid values of the ``reduction`` argument.
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none", "seq_mean")

PerPosition = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- validation


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(
            f"unknown reduction {reduction!r}; valid reductions are "
            + ", ".join(repr(r) for r in REDUCTIONS)
        )


def _as_float(x: object) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _check_temperature(temperature: float) -> None:
    t = _as_float(temperature)
    if t is None or not (t > 0 and math.isfinite(t)):
        raise ConfigError(f"temperature must be > 0 (got {temperature!r})")


def _check_beta(beta: float) -> None:
    b = _as_float(beta)
    if b is None or not (0.0 <= b <= 1.0):
        raise ConfigError(
            f"JSD beta must be in [0, 1] (got {beta!r}); beta=0 is forward KL, beta=1 reverse KL"
        )


def _check_alpha(alpha: float, which: str) -> None:
    a = _as_float(alpha)
    if a is None or not (0.0 <= a < 1.0):
        raise ConfigError(
            f"{which} alpha must be in [0, 1) (got {alpha!r}); alpha=0 is the plain KL, "
            "alpha=1 would make the loss identically 0"
        )


def _check_inputs(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None, reduction: str, same_vocab: bool = True
) -> None:
    if not same_vocab and student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} and teacher_logits shape "
            f"{tuple(teacher_logits.shape)} must agree on every dimension but the vocabulary"
        )
    if same_vocab and student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}; logits must have the same shape (..., V). "
            "Vocabularies padded differently must be sliced to the shared vocabulary "
            "first (logits[..., :V]); different tokenizers need a cross-tokenizer method."
        )
    if student_logits.dim() < 1:
        raise ValueError("logits need at least one dimension (the vocabulary), got a scalar")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits shape {tuple(student_logits.shape)})"
        )
    if reduction == "seq_mean" and student_logits.dim() < 3:
        raise ValueError(
            "reduction='seq_mean' needs logits with at least 3 dims (B, L, V), got shape "
            f"{tuple(student_logits.shape)}"
        )


# --------------------------------------------------------------------------- helpers


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the divergences compute in: float64 if any input is float64, else float32.

    Low-precision inputs (bf16, fp16) are upcast to float32; float64 is never downcast.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype if dtype == torch.float64 else torch.float32


def to_log_probs(
    logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Log-softmax of ``logits / temperature`` in ``dtype`` (default :func:`compute_dtype`).

    Args:
        logits: ``(..., V)``.
        temperature: ``> 0``; divides the logits before the softmax.
        mask: optional ``(...)`` bool (or 0/1); logits at masked positions are replaced
            by zeros (with ``torch.where``) before anything else, so NaN / inf there give
            finite values and exactly zero gradients.
        dtype: compute dtype; float32 unless the logits are float64.

    Returns:
        ``(..., V)`` log-probabilities in ``dtype``.
    """
    if dtype is None:
        dtype = compute_dtype(logits)
    x = logits.to(dtype)
    if mask is not None:
        x = torch.where(_as_bool(mask).unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _xlogratio_sum(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum_v a(v) * (log a(v) - log b(v))`` with the term set to 0 where ``a(v) == 0``.

    The log-ratio is replaced by 0 before the multiplication, so ``-inf - -inf`` (NaN)
    never reaches the value or the gradient.
    """
    ratio = torch.where(log_a > -math.inf, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (log_a.exp() * ratio).sum(dim=-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` in log space, for ``0 < weight_a < 1``.

    Where both ``a`` and ``b`` are 0 the result is ``-inf`` with a zero (not NaN) gradient.
    """
    x = log_a + math.log(weight_a)
    y = log_b + math.log1p(-weight_a)
    both_zero = (log_a == -math.inf) & (log_b == -math.inf)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.logaddexp(torch.where(both_zero, zero, x), torch.where(both_zero, zero, y))
    return torch.where(both_zero, torch.full((), -math.inf, dtype=x.dtype, device=x.device), out)


# --------------------------------------------------------------------------- per position


def forward_kl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Forward KL ``KL(p_T || p_S)`` per position.

    Args:
        student_logprobs: ``(..., V)`` log p_S.
        teacher_logprobs: ``(..., V)`` log p_T.

    Returns:
        ``(...)``.
    """
    return _xlogratio_sum(teacher_logprobs, student_logprobs)


def reverse_kl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Reverse KL ``KL(p_S || p_T)`` per position. Shapes ``(..., V), (..., V) -> (...)``."""
    return _xlogratio_sum(student_logprobs, teacher_logprobs)


def jsd_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD ``beta*KL(P||M) + (1-beta)*KL(Q||M)``, ``M = beta*P + (1-beta)*Q``.

    ``P = p_T``, ``Q = p_S``; ``beta = 0`` returns forward KL, ``beta = 1`` reverse KL
    (exactly the values of those functions). Shapes ``(..., V), (..., V) -> (...)``.
    """
    _check_beta(beta)
    beta = float(beta)
    if beta == 0.0:
        return forward_kl_per_position(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl_per_position(student_logprobs, teacher_logprobs)
    log_m = _log_mix(teacher_logprobs, student_logprobs, beta)
    return beta * _xlogratio_sum(teacher_logprobs, log_m) + (1.0 - beta) * _xlogratio_sum(
        student_logprobs, log_m
    )


def skew_forward_kl_per_position(
    student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew KL ``KL(P || alpha*P + (1-alpha)*Q)``; ``alpha = 0`` is forward KL.

    Shapes ``(..., V), (..., V) -> (...)``.
    """
    _check_alpha(alpha, "skew forward KL")
    alpha = float(alpha)
    if alpha == 0.0:
        return forward_kl_per_position(student_logprobs, teacher_logprobs)
    log_mix = _log_mix(teacher_logprobs, student_logprobs, alpha)
    return _xlogratio_sum(teacher_logprobs, log_mix)


def skew_reverse_kl_per_position(
    student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew reverse KL ``KL(Q || alpha*Q + (1-alpha)*P)``; ``alpha = 0`` is reverse KL.

    Shapes ``(..., V), (..., V) -> (...)``.
    """
    _check_alpha(alpha, "skew reverse KL")
    alpha = float(alpha)
    if alpha == 0.0:
        return reverse_kl_per_position(student_logprobs, teacher_logprobs)
    log_mix = _log_mix(student_logprobs, teacher_logprobs, alpha)
    return _xlogratio_sum(student_logprobs, log_mix)


def tvd_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation ``0.5 * sum_v |p_T(v) - p_S(v)|``. Shapes ``(..., V), (..., V) -> (...)``."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(dim=-1)


# --------------------------------------------------------------------------- reduction


def uld_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """ULD: L1 distance of the sorted probabilities, ``(..., V_S), (..., V_T) -> (...)``."""
    p_s = student_logprobs.exp().sort(-1, descending=True).values
    p_t = teacher_logprobs.exp().sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def reduce(values: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mask and reduce per-position values.

    Args:
        values: ``(...)`` per-position values (``(B, L)`` or more dims for ``"seq_mean"``).
        mask: ``None`` (every position counts) or bool (or 0/1) of the same shape,
            ``True`` = the position counts. Masked entries are dropped with
            ``torch.where``, so NaN / inf there reach neither the result nor the gradient.
        reduction: one of :data:`REDUCTIONS` (see the module docstring).

    Returns:
        A scalar for ``"mean"``, ``"sum"`` and ``"seq_mean"``; ``values``' shape for
        ``"none"`` (exactly 0 at masked positions).
    """
    _check_reduction(reduction)
    if mask is not None:
        if tuple(mask.shape) != tuple(values.shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the values' shape {tuple(values.shape)}"
            )
        valid = _as_bool(mask)
        values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    else:
        valid = None

    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        if valid is None:
            return values.sum() / max(values.numel(), 1)
        return values.sum() / valid.sum().clamp(min=1)

    # seq_mean: last dim = position inside a sequence, all earlier dims index sequences.
    if values.dim() < 2:
        raise ValueError(
            "reduction='seq_mean' needs per-position values with at least 2 dims (B, L); "
            f"got shape {tuple(values.shape)}"
        )
    per_seq_sum = values.sum(dim=-1)
    if valid is None:
        if values.shape[-1] == 0 or per_seq_sum.numel() == 0:
            return values.sum() * 0.0
        return (per_seq_sum / values.shape[-1]).mean()
    per_seq_count = valid.sum(dim=-1)
    has_any = per_seq_count > 0
    per_seq_mean = per_seq_sum / per_seq_count.clamp(min=1)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(has_any, per_seq_mean, zero).sum() / has_any.sum().clamp(min=1)


# --------------------------------------------------------------------------- loss functions


def _divergence(
    per_position: PerPosition,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
    same_vocab: bool = True,
) -> Tensor:
    _check_reduction(reduction)
    _check_temperature(temperature)
    _check_inputs(student_logits, teacher_logits, mask, reduction, same_vocab)
    dtype = compute_dtype(student_logits, teacher_logits)
    log_q = to_log_probs(student_logits, temperature, mask, dtype)
    log_p = to_log_probs(teacher_logits, temperature, mask, dtype)
    return reduce(per_position(log_q, log_p), mask, reduction)


_SIGNATURE_DOC = """
    Args:
        student_logits: ``(..., V)``, e.g. ``(N, V)`` or ``(B, L, V)``; any float dtype.
        teacher_logits: ``(..., V)``, same shape as ``student_logits``.
        mask: optional ``(...)`` bool (or 0/1), ``True`` = position counts.
        temperature: ``> 0``; divides the logits of both models (no ``T**2`` factor).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` | ``"seq_mean"``.

    Returns:
        Scalar, or ``(...)`` for ``reduction="none"``; float32 (float64 for float64 input).
"""


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    return _divergence(forward_kl_per_position, student_logits, teacher_logits, mask, temperature, reduction)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    return _divergence(reverse_kl_per_position, student_logits, teacher_logits, mask, temperature, reduction)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    beta: float = 0.5,
) -> Tensor:
    _check_beta(beta)
    return _divergence(
        lambda q, p: jsd_per_position(q, p, beta), student_logits, teacher_logits, mask, temperature, reduction
    )


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> Tensor:
    _check_alpha(alpha, "skew forward KL")
    return _divergence(
        lambda q, p: skew_forward_kl_per_position(q, p, alpha),
        student_logits,
        teacher_logits,
        mask,
        temperature,
        reduction,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> Tensor:
    _check_alpha(alpha, "skew reverse KL")
    return _divergence(
        lambda q, p: skew_reverse_kl_per_position(q, p, alpha),
        student_logits,
        teacher_logits,
        mask,
        temperature,
        reduction,
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    return _divergence(tvd_per_position, student_logits, teacher_logits, mask, temperature, reduction)


forward_kl.__doc__ = "Forward KL ``KL(p_T || p_S)`` (mode covering), summed over the vocabulary.\n" + _SIGNATURE_DOC
reverse_kl.__doc__ = "Reverse KL ``KL(p_S || p_T)`` (mode seeking), summed over the vocabulary.\n" + _SIGNATURE_DOC
jsd.__doc__ = (
    "Generalized JSD ``beta*KL(P||M) + (1-beta)*KL(Q||M)``, ``M = beta*P + (1-beta)*Q``\n"
    "(``P = p_T``, ``Q = p_S``); ``beta`` in ``[0, 1]``, ``0`` = forward KL, ``1`` = reverse KL.\n"
    + _SIGNATURE_DOC
)
skew_forward_kl.__doc__ = (
    "DistiLLM skew KL ``KL(P || alpha*P + (1-alpha)*Q)``; ``alpha`` in ``[0, 1)``, ``0`` = forward KL.\n"
    + _SIGNATURE_DOC
)
skew_reverse_kl.__doc__ = (
    "DistiLLM skew reverse KL ``KL(Q || alpha*Q + (1-alpha)*P)``; ``alpha`` in ``[0, 1)``,\n"
    "``0`` = reverse KL.\n" + _SIGNATURE_DOC
)
tvd.__doc__ = "Total variation ``0.5 * sum_v |p_T(v) - p_S(v)|``.\n" + _SIGNATURE_DOC


# --------------------------------------------------------------------------- modules


class Divergence(nn.Module, abc.ABC):
    """Base class of the divergence modules (Hydra ``_target_`` objects).

    Subclasses implement :meth:`per_position`; ``forward`` validates, converts logits to
    log-probabilities in fp32 (fp64 for fp64 input) and reduces with :func:`reduce`.
    """

    #: Short identifier, e.g. for logging (``"forward_kl"``, ``"jsd"``, ...).
    name: str = "divergence"
    #: True for divergences that compare distributions over different vocabularies (ULD)
    cross_vocabulary: bool = False

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    @abc.abstractmethod
    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        """``(..., V), (..., V)`` log-probabilities -> ``(...)`` per-position values."""

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Loss between ``(..., V)`` logits; ``mask`` ``(...)``; scalar or ``(...)`` for ``"none"``."""
        return _divergence(self.per_position, student_logits, teacher_logits, mask, temperature, self.reduction,
                           same_vocab=not self.cross_vocabulary)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class ForwardKL(Divergence):
    """Forward KL ``KL(p_T || p_S)``."""

    name = "forward_kl"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return forward_kl_per_position(student_logprobs, teacher_logprobs)


class ReverseKL(Divergence):
    """Reverse KL ``KL(p_S || p_T)``."""

    name = "reverse_kl"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return reverse_kl_per_position(student_logprobs, teacher_logprobs)


class JSD(Divergence):
    """Generalized JSD(beta); ``beta=0`` forward KL, ``beta=1`` reverse KL."""

    name = "jsd"

    def __init__(self, beta: float = 0.5, reduction: str = "mean") -> None:
        _check_beta(beta)
        super().__init__(reduction)
        self.beta = float(beta)

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return jsd_per_position(student_logprobs, teacher_logprobs, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


class SkewForwardKL(Divergence):
    """DistiLLM skew KL ``KL(P || alpha*P + (1-alpha)*Q)``."""

    name = "skew_forward_kl"

    def __init__(self, alpha: float = 0.1, reduction: str = "mean") -> None:
        _check_alpha(alpha, "skew forward KL")
        super().__init__(reduction)
        self.alpha = float(alpha)

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return skew_forward_kl_per_position(student_logprobs, teacher_logprobs, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


class SkewReverseKL(Divergence):
    """DistiLLM skew reverse KL ``KL(Q || alpha*Q + (1-alpha)*P)``."""

    name = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1, reduction: str = "mean") -> None:
        _check_alpha(alpha, "skew reverse KL")
        super().__init__(reduction)
        self.alpha = float(alpha)

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return skew_reverse_kl_per_position(student_logprobs, teacher_logprobs, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


class TVD(Divergence):
    """Total variation distance ``0.5 * sum |p_T - p_S|``."""

    name = "tvd"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return tvd_per_position(student_logprobs, teacher_logprobs)


class ULD(Divergence):
    """ULD (Boizard et al. 2024): ``sum_i |sort_desc(p_S)_i - sort_desc(p_T)_i|``; the
    vocabularies may differ (the shorter one is zero-padded)."""

    name = "uld"
    cross_vocabulary = True

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return uld_per_position(student_logprobs, teacher_logprobs)
