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

Beyond logits, the modules accept (``Divergence.forward``):

* **hidden states and an output head** (:class:`kd.signals.HeadLogits`): the chunked
  path of :mod:`kd.chunked` computes the same values a block of positions at a time,
  never building ``(N, V)`` logits; :func:`chunked_divergence` is its functional entry point;
* **a top-k teacher** (:class:`kd.signals.TopK`, a teacher logit cache): ``k + 1`` bins, the cached
  ids plus a tail bin (:func:`kd.signals.topk_bins`, docs/spec.md section 8);
* **token selection** (``select``/``keep``, TIP, docs/spec.md section 9): the loss keeps
  the highest-entropy or the confidently wrong tokens (:func:`select_tokens`), chosen
  without gradient, and averages over them only.
"""

from __future__ import annotations

import abc
import math
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.chunked import Form, fused_loss, map_rows, scalar_weights
from kd.compiled import check_mode
from kd.signals import HeadLogits, Outputs, TopK, compute_dtype, topk_bins

__all__ = [
    "REDUCTIONS",
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
    "SoftCrossEntropy",
    "SELECTIONS",
    "select_tokens",
    "chunked_divergence",
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


def to_log_probs(
    logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Log-softmax of ``logits / temperature`` in ``dtype`` (default :func:`kd.signals.compute_dtype`).

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
    per_position = partial(skew_forward_kl_per_position, alpha=alpha)
    return _divergence(per_position, student_logits, teacher_logits, mask, temperature, reduction)


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
    per_position = partial(skew_reverse_kl_per_position, alpha=alpha)
    return _divergence(per_position, student_logits, teacher_logits, mask, temperature, reduction)


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


# --------------------------------------------------------------------------- token selection

#: valid values of ``select`` (token selection, TIP): every token, the highest student
#: entropy, the confidently wrong (low entropy, high divergence), or half of each
SELECTIONS: tuple[str, ...] = ("all", "entropy", "overconfident", "both")


def _check_selection(select: str, keep: float) -> None:
    if select not in SELECTIONS:
        raise ConfigError(f"unknown token selection {select!r}; choose one of " + ", ".join(SELECTIONS))
    k = _as_float(keep)
    if k is None or not 0.0 < k <= 1.0:
        raise ConfigError(f"the token-selection keep must be in (0, 1] (got {keep!r}): the fraction of tokens the "
                          "loss keeps")


def _top(scores: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` highest scores (ties: the earlier position first)."""
    return torch.sort(scores, descending=True, stable=True).indices[:n]


def select_tokens(entropy: Tensor, divergence: Tensor | None, select: str, keep: float) -> Tensor:
    """Which of ``n`` candidate tokens a loss keeps (TIP, docs/spec.md section 9).

    Args:
        entropy: ``(n,)`` the student's entropy at each valid token.
        divergence: ``(n,)`` the teacher-student divergence at each token (needed for
            ``overconfident`` and ``both``).
        select: ``entropy``: the ``ceil(keep * n)`` highest-entropy tokens;
            ``overconfident``: among the lowest-entropy half (``ceil(n / 2)`` tokens), the
            highest-divergence ones, up to ``ceil(keep * n)``; ``both``: half the budget
            (rounded up) by entropy, the rest from the overconfident region; ``all``: every token.
        keep: the kept fraction in ``(0, 1]``.

    Returns:
        ``(m,)`` sorted indices of the kept tokens.
    """
    n = entropy.numel()
    if select == "all" or n == 0:
        return torch.arange(n, device=entropy.device)
    budget = max(1, math.ceil(keep * n - 1e-9))
    by_entropy = _top(entropy, budget if select == "entropy" else math.ceil(budget / 2))
    if select == "entropy":
        return by_entropy.sort().values
    assert divergence is not None, "overconfident selection needs the divergence of each token"
    region = _top(-entropy, math.ceil(n / 2))  # the lowest-entropy half
    if select == "both":
        region = region[~torch.isin(region, by_entropy)]
    wanted = budget if select == "overconfident" else budget - by_entropy.numel()
    confident = region[_top(divergence[region], wanted)]
    kept = confident if select == "overconfident" else torch.cat([by_entropy, confident])
    return kept.sort().values


def entropy_of(log_q: Tensor) -> Tensor:
    """Entropy ``-sum_v q log q`` per row of log-probabilities ``(..., V) -> (...)``."""
    return -(log_q.exp() * torch.where(log_q > -math.inf, log_q, torch.zeros_like(log_q))).sum(-1)


# --------------------------------------------------------------------------- modules


class Divergence(nn.Module, abc.ABC):
    """Base class of the divergence modules (Hydra ``_target_`` objects).

    Subclasses implement :meth:`per_position`; ``forward`` validates, converts logits to
    log-probabilities in fp32 (fp64 for fp64 input) and reduces with :func:`reduce`.

    ``forward(student, teacher, mask=None, temperature=1.0)`` takes, for each side:

    * logits ``(..., V)`` (the plain functions of this module);
    * a :class:`kd.signals.HeadLogits` (hidden states and the output head): with
      ``chunked`` on, the fused path of :mod:`kd.chunked` computes the same values a
      block of positions at a time without ever building ``(N, V)`` logits; off, the
      logits are built and the plain path runs;
    * for the teacher, a :class:`kd.signals.TopK` (a teacher logit cache): ``k + 1`` bins
      (:func:`kd.signals.topk_bins`), the temperature applied to the student only (the cache
      stores the teacher at the loss temperature).

    Args:
        reduction: one of :data:`REDUCTIONS`.
        select: token selection (:data:`SELECTIONS`, TIP): ``all`` (default) or which
            tokens the loss keeps; the kept tokens are chosen without gradient over the
            valid tokens of the whole batch (:func:`select_tokens`) and the reduction
            averages over them only. :attr:`kept` holds the mask of the last call.
        keep: the kept fraction of the valid tokens, in ``(0, 1]``.
        chunked: use the fused path when the student comes as hidden states and a head.
        chunk_size: positions per block of the fused path (None: kd.chunked.default_chunk_size, about 2**22 logits on CPU, 2**27 on GPUs).
        tile_size: vocabulary entries per tile of the fused path (None: kd.chunked.default_tile_size:
            whole rows while a block fits 2**24 logits on CPU, 2**28 on GPUs).
        compile: the fused path's compiled block function (:mod:`kd.compiled`): ``auto``
            (on CUDA devices only), ``true`` or ``false``; eager wherever compiling fails.
    """

    #: Short identifier, e.g. for logging (``"forward_kl"``, ``"jsd"``, ...).
    name: str = "divergence"
    #: True for divergences that compare distributions over different vocabularies (ULD)
    cross_vocabulary: bool = False

    def __init__(self, reduction: str = "mean", select: str = "all", keep: float = 1.0, chunked: bool = True,
                 chunk_size: int | None = None, tile_size: int | None = None, compile: str | bool = "auto") -> None:
        super().__init__()
        _check_reduction(reduction)
        _check_selection(select, keep)
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ConfigError(f"divergence.chunk_size must be a positive number of positions or null (got {chunk_size!r})")
        if tile_size is not None and (isinstance(tile_size, bool) or int(tile_size) < 1):
            raise ConfigError(f"divergence.tile_size must be a positive number of vocabulary entries or null "
                              f"(got {tile_size!r})")
        if self.cross_vocabulary and select != "all":
            raise ConfigError(f"divergence {self.name} compares two vocabularies; token selection needs one, "
                              "so keep divergence.select=all")
        self.reduction = reduction
        self.select = select
        self.keep = float(keep)
        self.chunked = bool(chunked)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.tile_size = None if tile_size is None else int(tile_size)
        self.compile_mode = check_mode(compile)  # (nn.Module.compile is a method)
        #: ``(...)`` bool, the positions the last call counted (mask and selection)
        self.kept: Tensor | None = None

    @abc.abstractmethod
    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        """``(..., V), (..., V)`` log-probabilities -> ``(...)`` per-position values."""

    def closed_form(self) -> Form | None:
        """The fused path's closed-form gradient (:class:`kd.chunked.Form`) for this
        divergence, or None (autograd on each block) for one without; a subclass that
        overrides :meth:`per_position` of a class that has one must override this too."""
        return None

    def forward(
        self,
        student_logits: Any,
        teacher_logits: Any,
        mask: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Loss between ``(..., V)`` logits (or hidden states and head, or a top-k teacher);
        ``mask`` ``(...)``; scalar or ``(...)`` for ``"none"``.

        ``teacher_logits`` may be a teacher's :class:`kd.signals.Outputs`: its signal is
        compared on ``mask`` restricted to the teacher's own mask (rows that have a
        teacher), so rows routed to no teacher never count, whichever mask a recipe gives."""
        if isinstance(teacher_logits, Outputs):
            covered = teacher_logits.mask
            mask = covered if mask is None else _as_bool(mask) & _as_bool(covered)
            teacher_logits = teacher_logits.logits
        fused = isinstance(student_logits, HeadLogits) and self.chunked
        if not fused:
            if isinstance(student_logits, HeadLogits):
                student_logits = student_logits.materialize()
            if isinstance(teacher_logits, HeadLogits):
                teacher_logits = teacher_logits.materialize()
        if not fused and torch.is_tensor(teacher_logits) and self.select == "all":
            self.kept = (torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
                         if mask is None else _as_bool(mask))
            return _divergence(self.per_position, student_logits, teacher_logits, mask, temperature, self.reduction,
                               same_vocab=not self.cross_vocabulary)
        return self._by_rows(student_logits, teacher_logits, mask, temperature, fused)

    def _by_rows(self, student: Any, teacher: Any, mask: Tensor | None, temperature: float, fused: bool) -> Tensor:
        """The loss over the valid (and selected) positions only, gathered as rows."""
        _check_temperature(temperature)
        shape = tuple(student.shape[:-1])
        same_vocab = isinstance(teacher, TopK) or self.cross_vocabulary or teacher.shape[-1] == student.shape[-1]
        if tuple(teacher.shape[:-1]) != shape or not same_vocab:
            raise ValueError(f"student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} "
                             "must agree (a top-k teacher on every dimension but the last)")
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {shape}")
        if self.reduction == "seq_mean" and len(shape) < 2:
            raise ValueError("reduction='seq_mean' needs logits with at least 3 dims (B, L, V), got shape "
                             f"{tuple(student.shape)}")
        device = student.hidden.device if fused else student.device
        count = math.prod(shape)
        valid = torch.ones(count, dtype=torch.bool, device=device) if mask is None else _as_bool(mask).reshape(-1)
        rows = valid.nonzero().squeeze(-1)
        dtype = compute_dtype(student.hidden, student.weight) if fused else compute_dtype(student)
        if self.select != "all" and rows.numel():
            rows = rows[self._select(student, teacher, rows, temperature, fused, dtype)]
        kept = torch.zeros(count, dtype=torch.bool, device=device)
        kept[rows] = True
        self.kept = kept.view(shape)

        if fused:
            if self.reduction == "none":
                values = fused_loss(student, teacher, self.per_position, rows, None, temperature=temperature,
                                    chunk_size=self.chunk_size, dtype=dtype, form=self._form(),
                                    tile_size=self.tile_size, compile=self.compile_mode)
                return torch.zeros(count, dtype=dtype, device=device).index_add(0, rows, values).view(shape)
            weights = scalar_weights(rows, self.reduction, shape, dtype)
            return fused_loss(student, teacher, self.per_position, rows, weights, temperature=temperature,
                              chunk_size=self.chunk_size, dtype=dtype, form=self._form(), tile_size=self.tile_size,
                              compile=self.compile_mode)
        log_q = to_log_probs(student.reshape(-1, student.shape[-1])[rows], temperature, dtype=dtype)
        values = self._values(log_q, self._teacher_rows(teacher, rows, temperature, dtype))
        full = torch.zeros(count, dtype=dtype, device=device).index_add(0, rows, values).view(shape)
        return reduce(full, self.kept, self.reduction)

    def _form(self) -> Form | None:
        """:meth:`closed_form`, unless a subclass replaced the per-position function without it."""
        owner = next(c for c in type(self).__mro__ if "per_position" in vars(c))
        form_owner = next(c for c in type(self).__mro__ if "closed_form" in vars(c))
        return self.closed_form() if issubclass(form_owner, owner) else None

    def _select(self, student: Any, teacher: Any, rows: Tensor, temperature: float, fused: bool,
                dtype: torch.dtype) -> Tensor:
        """Indices into ``rows`` of the tokens :attr:`select` keeps (no gradient)."""
        def score(log_q: Tensor, t_block: Any) -> Tensor:
            entropy = entropy_of(log_q)
            if self.select in ("overconfident", "both"):
                return torch.stack([entropy, self._values(log_q, t_block)], -1)
            return entropy[:, None]

        if fused:
            scores = map_rows(student, teacher, score, rows, temperature, self.chunk_size, dtype)
        else:
            with torch.no_grad():
                log_q = to_log_probs(student.reshape(-1, student.shape[-1])[rows], temperature, dtype=dtype)
                scores = score(log_q, self._teacher_rows(teacher, rows, temperature, dtype))
        divergence = scores[:, 1] if scores.shape[1] > 1 else None
        return select_tokens(scores[:, 0], divergence, self.select, self.keep)

    @staticmethod
    def _teacher_rows(teacher: Any, rows: Tensor, temperature: float, dtype: torch.dtype) -> Any:
        if isinstance(teacher, TopK):
            k = teacher.ids.shape[-1]
            return TopK(teacher.ids.reshape(-1, k)[rows], teacher.logprobs.reshape(-1, k)[rows], teacher.tail)
        return to_log_probs(teacher.reshape(-1, teacher.shape[-1])[rows], temperature, dtype=dtype)

    def _values(self, log_q: Tensor, teacher: Any) -> Tensor:
        """Per-row values against teacher log-probabilities or a top-k block."""
        if isinstance(teacher, TopK):
            return self.per_position(*topk_bins(log_q, teacher))
        return self.per_position(log_q, teacher)

    def extra_repr(self) -> str:
        extra = f", select={self.select!r}, keep={self.keep}" if self.select != "all" else ""
        return f"reduction={self.reduction!r}{extra}"


class ForwardKL(Divergence):
    """Forward KL ``KL(p_T || p_S)``."""

    name = "forward_kl"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return forward_kl_per_position(student_logprobs, teacher_logprobs)

    def closed_form(self) -> Form:
        return Form("forward_kl")


class ReverseKL(Divergence):
    """Reverse KL ``KL(p_S || p_T)``."""

    name = "reverse_kl"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return reverse_kl_per_position(student_logprobs, teacher_logprobs)

    def closed_form(self) -> Form:
        return Form("reverse_kl")


class JSD(Divergence):
    """Generalized JSD(beta); ``beta=0`` forward KL, ``beta=1`` reverse KL."""

    name = "jsd"

    def __init__(self, beta: float = 0.5, reduction: str = "mean", **options: Any) -> None:
        _check_beta(beta)
        super().__init__(reduction, **options)
        self.beta = float(beta)

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return jsd_per_position(student_logprobs, teacher_logprobs, self.beta)

    def closed_form(self) -> Form:
        return Form("jsd", self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()


class _SkewKL(Divergence):
    """A DistiLLM skew KL: a KL against a mixture weighted by ``alpha`` (subclasses name
    which one through ``skewed``, the per-position function, and ``label``)."""

    label = "skew KL"
    skewed: Any = None

    def __init__(self, alpha: float = 0.1, reduction: str = "mean", **options: Any) -> None:
        _check_alpha(alpha, self.label)
        super().__init__(reduction, **options)
        self.alpha = float(alpha)

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return type(self).skewed(student_logprobs, teacher_logprobs, self.alpha)

    def closed_form(self) -> Form:
        return Form(self.name, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


class SkewForwardKL(_SkewKL):
    """DistiLLM skew KL ``KL(P || alpha*P + (1-alpha)*Q)``."""

    name = "skew_forward_kl"
    label = "skew forward KL"
    skewed = staticmethod(skew_forward_kl_per_position)


class SkewReverseKL(_SkewKL):
    """DistiLLM skew reverse KL ``KL(Q || alpha*Q + (1-alpha)*P)``."""

    name = "skew_reverse_kl"
    label = "skew reverse KL"
    skewed = staticmethod(skew_reverse_kl_per_position)


class TVD(Divergence):
    """Total variation distance ``0.5 * sum |p_T - p_S|``."""

    name = "tvd"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return tvd_per_position(student_logprobs, teacher_logprobs)

    def closed_form(self) -> Form:
        return Form("tvd")


class SoftCrossEntropy(Divergence):
    """Cross-entropy to the teacher's distribution, ``-sum_v p_T(v) log p_S(v)``: forward KL
    plus the teacher's entropy (which has no gradient). Kim & Rush's word-level KD term;
    not an option of the ``divergence/`` group (it is not a divergence: it is not 0 when the
    two distributions agree)."""

    name = "soft_cross_entropy"

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
        log_q = torch.where(teacher_logprobs > -math.inf, student_logprobs, zero)
        return -(teacher_logprobs.exp() * log_q).sum(-1)

    def closed_form(self) -> Form:
        return Form("soft_cross_entropy")


class ULD(Divergence):
    """ULD (Boizard et al. 2024): ``sum_i |sort_desc(p_S)_i - sort_desc(p_T)_i|``; the
    vocabularies may differ (the shorter one is zero-padded).

    Fused path (a student given as :class:`kd.signals.HeadLogits`, ``chunked`` on): sorting
    needs each position's whole row of probabilities, which vocabulary tiles cannot give, and
    the sort has no closed-form gradient here, so the loss is chunked over positions only:
    ``C`` positions' ``(C, V_S)`` and ``(C, V_T)`` rows at a time, differentiated by autograd
    on each block (:func:`kd.chunked.fused_loss` without a form). Working memory is then
    ``(C, V)`` rows and their sort, never ``(N, V)``; ``tile_size`` does not apply."""

    name = "uld"
    cross_vocabulary = True

    def per_position(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return uld_per_position(student_logprobs, teacher_logprobs)


# --------------------------------------------------------------------------- chunked entry point

#: the divergence modules by name (the ``divergence/`` group's options)
DIVERGENCES: dict[str, type[Divergence]] = {
    cls.name: cls for cls in (ForwardKL, ReverseKL, JSD, SkewForwardKL, SkewReverseKL, TVD)
}


def chunked_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    divergence: Divergence | str = "forward_kl",
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | TopK | None = None,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    scale: float = 1.0,
    teacher_scale: float = 1.0,
    tile_size: int | None = None,
    **options: Any,
) -> Tensor:
    """A divergence from hidden states and output heads, a block of positions at a time
    (:mod:`kd.chunked`): no ``(N, V)`` logits tensor of either model exists.

    Equal (values and gradients) to ``divergence(softcap(scale * (h_S @ W_S.T + b_S)),
    softcap(teacher_scale * (h_T @ W_T.T + b_T)), mask, temperature)``.

    Args:
        student_hidden: ``(..., H_S)`` the student's last hidden states (after its final norm).
        student_weight: ``(V, H_S)`` its output head.
        teacher_hidden: ``(..., H_T)``, or None when ``teacher_logits`` is given.
        teacher_weight: ``(V, H_T)``, or None with ``teacher_logits``.
        divergence: a :class:`Divergence` (its reduction, shape parameter and token
            selection apply) or a name of :data:`DIVERGENCES` (then ``options`` go to its
            constructor: ``beta``, ``alpha``, ``reduction``, ``select``, ``keep``).
        mask: ``(...)`` bool, the positions that count.
        temperature: divides both models' logits (not a cached top-k teacher's).
        chunk_size: positions per block (None: kd.chunked.default_chunk_size, about 2**22 logits on CPU, 2**27 on GPUs).
        student_bias, teacher_bias: ``(V,)`` head biases.
        teacher_logits: the teacher as logits ``(..., V)`` or a :class:`kd.signals.TopK` cache instead
            of hidden states and a head.
        softcap, teacher_softcap: Gemma's final logit softcapping ``c * tanh(z / c)``.
        scale, teacher_scale: multiply each model's logits before the softcap.
        tile_size: vocabulary entries per tile (None: kd.chunked.default_tile_size, whole rows
            while a block of them fits).

    Returns:
        The reduced loss like the plain functions (``(...)`` for ``reduction="none"``).
    """
    if isinstance(divergence, str):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"unknown divergence {divergence!r}; choose one of " + ", ".join(DIVERGENCES))
        divergence = DIVERGENCES[divergence](**options)
    elif options:
        raise TypeError(f"options {sorted(options)} only apply to a divergence given by name")
    if chunk_size is not None or tile_size is not None or not divergence.chunked:
        divergence = _with_chunking(divergence, chunk_size, tile_size)
    student = HeadLogits(student_hidden, student_weight, student_bias, softcap, scale)
    if teacher_logits is not None:
        teacher: Any = teacher_logits
    elif teacher_hidden is not None and teacher_weight is not None:
        teacher = HeadLogits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, teacher_scale)
    else:
        raise ValueError("give the teacher as teacher_hidden and teacher_weight, or as teacher_logits")
    return divergence(student, teacher, mask, temperature)


def _with_chunking(divergence: Divergence, chunk_size: int | None, tile_size: int | None = None) -> Divergence:
    """A shallow copy of ``divergence`` that runs chunked with ``chunk_size`` and ``tile_size``."""
    import copy

    clone = copy.copy(divergence)
    clone.chunked = True
    clone.chunk_size = chunk_size if chunk_size is not None else divergence.chunk_size
    clone.tile_size = tile_size if tile_size is not None else getattr(divergence, "tile_size", None)
    return clone

