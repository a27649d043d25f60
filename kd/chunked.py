"""Chunked (fused-linear) losses: divergences computed from hidden states and the output
head a block of positions at a time, so no ``(N, V)`` logits tensor of either model exists.

A language model's logits are ``z = head(h) = h @ W.T + b`` (then, for some models, a
scale and a softcap ``c * tanh(z / c)``, Gemma). Every token-level divergence of
:mod:`kd.divergences` is a sum over positions of a value that depends only on that
position's two rows of logits. So the loss can be computed ``C`` positions at a time:

1. gather the positions that count (the mask's ``True`` entries; the others are never
   computed) and split them into blocks of ``C`` rows (default: as many rows as fit
   ``2**21`` logits on CPU, e.g. 42 rows at V = 49,152, and ``2**27`` on GPUs, 512 rows
   at V = 262,144, at least 32: :data:`TARGET_BLOCK`);
2. for each block, ``z_S = head_S(h_S[block])`` and the teacher's rows (its own head over its
   hidden states, a slice of given logits, its cached top-k, or gold labels), the
   per-position values exactly as the plain functions compute them;
3. scalar reductions (``mean``, ``sum``, ``seq_mean``) are a weighted sum of the values
   with weights known in advance (``1/n``, ``1``, ``1/(n_seq * count_seq)``). The block's
   gradient with respect to its logits is therefore computed right away (autograd on the
   block's own small graph), turned into the gradients of the hidden rows
   (``dz @ W``), of the head (``dz.T @ h``, accumulated) and of the bias, and the block's
   logits are freed. The backward pass only scales these stored gradients by the incoming
   gradient: the same three matrix products per block as the plain forward and backward,
   no recomputation. Without gradients (evaluation) step 3 is skipped.
4. ``reduction="none"`` returns per-position values, whose gradient weights are only
   known in the backward pass: each block runs under activation checkpointing and is
   recomputed there.

Peak working memory is a few ``(C, V)`` blocks plus the head's gradient, whatever ``N``.
The values and gradients equal the plain functions' (tests: float64 to 1e-10, float32 to
1e-5 relative, every divergence, temperature, mask, reduction, softcap).

Token selection (:mod:`kd.divergences`, ``select=``) runs a first pass without gradients
that computes each position's student entropy (and divergence), then the loss pass over
the kept positions only: the dropped positions' logits are built once, without a graph.

Where it deviates from the plain path: positions whose mask is False are skipped, so
NaN / inf hidden states there cannot reach anything (the plain path replaces them with
``torch.where``; both give the same values and gradients). Only position blocks are
chunked, not the vocabulary: one row of logits per position must fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from kd.signals import HeadLogits, Labels, TopK, compute_dtype, topk_bins

__all__ = ["fused_loss", "map_rows", "default_chunk_size", "scalar_weights",
           "seq_mean_weights", "TARGET_BLOCK"]

#: logits per block by device type (rows = TARGET_BLOCK[device] // V, at least 32): small on
#: CPU, where small blocks cost no speed (2 cores, V = 49,152: 42 rows take 0.5-1.0x the plain
#: time at 1/8-1/12 of its memory); on GPUs larger blocks keep the kernels busy (an H200 at
#: V = 262,144: 512 rows cost 1.1-1.2x the plain time at 1/8-1/12 of its memory, 32 rows 4.7x)
TARGET_BLOCK = {"cpu": 2**21, "cuda": 2**27}


def default_chunk_size(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per block so that one block of logits holds about :data:`TARGET_BLOCK` values."""
    kind = torch.device(device).type
    return max(32, TARGET_BLOCK.get(kind, TARGET_BLOCK["cuda"]) // max(vocab, 1))


# ----------------------------------------------------------------------------- teachers


def _teacher_tensors(teacher: Any) -> tuple[str, list[Tensor | None]]:
    """The kind of teacher signal and its tensors (flattened to rows where per position)."""
    if isinstance(teacher, HeadLogits):
        return "head", [teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, teacher.bias]
    if isinstance(teacher, TopK):
        k = teacher.ids.shape[-1]
        return "topk", [teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k), None]
    if isinstance(teacher, Labels):
        return "labels", [teacher.ids.reshape(-1), None, None]
    if torch.is_tensor(teacher):
        return "logits", [teacher.reshape(-1, teacher.shape[-1]), None, None]
    raise TypeError(f"unsupported teacher signal {type(teacher).__name__}")


@dataclass
class _Spec:
    """Everything about one fused computation that is not a tensor."""

    student: HeadLogits
    teacher: Any
    kind: str
    per_position: Callable[[Tensor, Tensor], Tensor] | None  # None: cross-entropy against labels
    temperature: float
    dtype: torch.dtype
    chunk: int
    grad_enabled: bool = True  # grad mode where the loss was called (a Function's forward runs without)

    def values(self, rows: Tensor, s_h: Tensor, s_w: Tensor, s_b: Tensor | None, t0: Tensor | None,
               t1: Tensor | None, t2: Tensor | None, graph: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-position values ``(C,)`` of ``rows``, and the logits leaves they came from
        (student, teacher or None) so the caller can differentiate with respect to them."""
        z_s = F.linear(s_h[rows], s_w, s_b)
        if graph:
            z_s = z_s.detach().requires_grad_(True)
        log_q = torch.log_softmax(_tempered(self.student.transform(z_s), self.dtype, self.temperature), dim=-1)
        z_t = None
        if self.kind == "labels":
            return -log_q.gather(-1, t0[rows, None]).squeeze(-1), z_s, None
        if self.kind == "topk":
            bins_q, bins_p = topk_bins(log_q, TopK(t0[rows], t1[rows], self.teacher.tail))
            return self.per_position(bins_q, bins_p), z_s, None
        if self.kind == "head":
            z_t = F.linear(t0[rows], t1, t2)
            transform = self.teacher.transform
        else:  # given logits
            z_t = t0[rows]
            transform = None
        if graph and (t0.requires_grad or (t1 is not None and t1.requires_grad)
                      or (t2 is not None and t2.requires_grad)):
            z_t = z_t.detach().requires_grad_(True)
        else:
            z_t = z_t.detach() if graph else z_t
        t_logits = transform(z_t) if transform is not None else z_t
        log_p = torch.log_softmax(_tempered(t_logits, self.dtype, self.temperature), dim=-1)
        return self.per_position(log_q, log_p), z_s, z_t if (z_t is not None and z_t.requires_grad) else None


def _tempered(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    logits = logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature


def _blocks(rows: Tensor, chunk: int) -> list[Tensor]:
    return list(rows.split(chunk)) if rows.numel() else []


class _EagerFused(torch.autograd.Function):
    """``sum_i w_i * value_i`` over ``rows``, gradients computed block by block in forward."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, rows: Tensor, weights: Tensor, s_h: Tensor, s_w: Tensor,
                s_b: Tensor | None, t0: Tensor | None, t1: Tensor | None, t2: Tensor | None) -> Tensor:
        total = torch.zeros((), dtype=spec.dtype, device=s_h.device)
        want = [spec.grad_enabled and x is not None and x.requires_grad for x in (s_h, s_w, s_b, t0, t1, t2)]
        want_t_logits = spec.kind in ("head", "logits") and any(want[3:])
        grads: list[Tensor | None] = [None] * 6
        if any(want):
            grads = [torch.zeros_like(x, dtype=torch.promote_types(torch.float32, x.dtype) if i in (1, 2, 4, 5)
                                      else x.dtype) if w else None
                     for i, (x, w) in enumerate(zip((s_h, s_w, s_b, t0, t1, t2), want))]
        for start in range(0, rows.numel(), spec.chunk):
            block = rows[start:start + spec.chunk]
            w = weights[start:start + spec.chunk] if weights.dim() else weights
            if not any(want):
                with torch.no_grad():
                    vals, _, _ = spec.values(block, s_h, s_w, s_b, t0, t1, t2)
                    total += (vals * w).sum()
                continue
            with torch.enable_grad():
                vals, z_s, z_t = spec.values(block, s_h, s_w, s_b, t0, t1, t2, graph=True)
                weighted = (vals * w).sum()
                leaves = [z_s] + ([z_t] if z_t is not None and want_t_logits else [])
                d = torch.autograd.grad(weighted, leaves)
            total += weighted.detach()
            _accumulate(grads, 0, d[0], block, s_h, s_w)
            if len(d) > 1:
                if spec.kind == "head":
                    _accumulate(grads, 3, d[1], block, t0, t1)
                else:
                    grads[3][block] += d[1].to(grads[3].dtype)
        ctx.grads = grads
        ctx.dtypes = [None if x is None else x.dtype for x in (s_h, s_w, s_b, t0, t1, t2)]
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out = []
        for g, like, dtype in zip(ctx.grads, ctx.needs_input_grad[3:], ctx.dtypes):
            out.append(None if g is None or not like else (g * grad).to(dtype))
        return (None, None, None, *out)


def _accumulate(grads: list[Tensor | None], first: int, dz: Tensor, block: Tensor, hidden: Tensor,
                weight: Tensor) -> None:
    """Add the block's logits gradient ``dz (C, V)`` to the hidden rows, head and bias grads."""
    g_h, g_w, g_b = grads[first], grads[first + 1], grads[first + 2]
    if g_h is not None:
        g_h[block] = (dz.to(weight.dtype) @ weight).to(g_h.dtype)
    if g_w is not None:
        rows = hidden[block]
        if rows.dtype == g_w.dtype == dz.dtype:
            g_w.addmm_(dz.t(), rows)  # in place: no (V, H) temporary per block
        else:
            g_w.add_((dz.t().to(rows.dtype) @ rows).to(g_w.dtype))
    if g_b is not None:
        g_b.add_(dz.sum(0).to(g_b.dtype))


def map_rows(student: HeadLogits, teacher: Any, fn: Callable[[Tensor, Any], Tensor], rows: Tensor,
             temperature: float = 1.0, chunk_size: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Evaluate ``fn(log_q, teacher_block) -> (C, ...)`` block by block without gradients
    over the flattened positions ``rows`` and concatenate (token-selection scores,
    evaluation metrics). ``log_q`` is the student's ``(C, V)`` log-softmax at
    ``temperature``; ``teacher_block`` is the teacher's log-softmax ``(C, V)`` (head or
    logits teacher), its :class:`kd.signals.TopK` rows, its :class:`kd.signals.Labels` ids
    ``(C,)``, or None without a teacher."""
    kind, (t0, t1, _) = _teacher_tensors(teacher) if teacher is not None else ("none", [None, None, None])
    dtype = dtype or compute_dtype(student.hidden, student.weight)
    chunk = chunk_size or default_chunk_size(student.weight.shape[0], student.weight.device)
    s_h = student.hidden.reshape(-1, student.hidden.shape[-1])
    out = []
    with torch.no_grad():
        for block in _blocks(rows, chunk):
            log_q = torch.log_softmax(student.rows_logits(s_h[block]).to(dtype) / temperature, dim=-1)
            t_block: Any = None
            if kind == "head":
                t_block = torch.log_softmax(teacher.rows_logits(t0[block]).to(dtype) / temperature, dim=-1)
            elif kind == "logits":
                t_block = torch.log_softmax(t0[block].to(dtype) / temperature, dim=-1)
            elif kind == "topk":
                t_block = TopK(t0[block], t1[block], teacher.tail)
            elif kind == "labels":
                t_block = t0[block]
            out.append(fn(log_q, t_block))
    if not out:
        return torch.zeros(0, dtype=dtype, device=student.hidden.device)
    return torch.cat(out)


def fused_loss(student: HeadLogits, teacher: Any, per_position: Callable[[Tensor, Tensor], Tensor] | None,
               rows: Tensor, weights: Tensor | None, *, temperature: float = 1.0, chunk_size: int | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
    """The fused loss over the flattened positions ``rows`` (1-D long).

    Args:
        student: the student's hidden states and head.
        teacher: a :class:`kd.signals.HeadLogits`, teacher logits ``(..., V)``, a
            :class:`kd.signals.TopK` or :class:`kd.signals.Labels` (cross-entropy; then
            ``per_position`` is ignored).
        per_position: ``(C, V), (C, V) -> (C,)`` log-probabilities to values.
        rows: positions (into the flattened leading shape) that are computed.
        weights: ``(len(rows),)`` or a scalar: returns ``sum_i w_i value_i`` (scalar
            reductions, gradients computed in the forward pass); None: returns the values
            ``(len(rows),)`` (recomputed per block in the backward pass).
        temperature: divides both models' logits (a top-k teacher is stored at it).
        chunk_size: rows per block (default :func:`default_chunk_size`).
        dtype: compute dtype (default: float32, float64 for float64 inputs).
    """
    kind, (t0, t1, t2) = _teacher_tensors(teacher)
    if dtype is None:
        floats = [student.hidden, student.weight] + [t for t in (t0, t1) if t is not None and t.is_floating_point()]
        dtype = compute_dtype(*floats)
    chunk = int(chunk_size or default_chunk_size(student.weight.shape[0], student.weight.device))
    spec = _Spec(student, teacher, kind, per_position, float(temperature), dtype, chunk, torch.is_grad_enabled())
    s_h = student.hidden.reshape(-1, student.hidden.shape[-1])
    rows = rows.to(s_h.device)
    if weights is not None:
        return _EagerFused.apply(spec, rows, weights, s_h, student.weight, student.bias, t0, t1, t2)
    parts = []
    for block in _blocks(rows, chunk):
        def run(s_h: Tensor, s_w: Tensor, s_b: Tensor | None, t0: Tensor | None, t1: Tensor | None,
                t2: Tensor | None, block: Tensor = block) -> Tensor:
            return spec.values(block, s_h, s_w, s_b, t0, t1, t2)[0]

        if torch.is_grad_enabled():
            parts.append(checkpoint(run, s_h, student.weight, student.bias, t0, t1, t2, use_reentrant=False))
        else:
            parts.append(run(s_h, student.weight, student.bias, t0, t1, t2))
    if not parts:
        return torch.zeros(0, dtype=dtype, device=s_h.device)
    return torch.cat(parts)


def seq_mean_weights(rows: Tensor, length: int) -> Tensor:
    """Weights of ``reduction="seq_mean"`` for flattened ``rows`` of sequences of ``length``
    positions: ``1 / (count of the row's sequence * number of sequences with a row)``."""
    seq = torch.div(rows, length, rounding_mode="floor")
    _, inverse, counts = torch.unique(seq, return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse].double() * counts.numel())


def scalar_weights(rows: Tensor, reduction: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Weights that turn the values at ``rows`` into ``reduction`` (mean, sum, seq_mean)."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=rows.device)
    if reduction == "mean":
        return torch.full((), 1.0 / max(rows.numel(), 1), dtype=dtype, device=rows.device)
    if reduction == "seq_mean":
        if rows.numel() == 0:
            return torch.zeros((), dtype=dtype, device=rows.device)
        return seq_mean_weights(rows, shape[-1]).to(dtype)
    raise ValueError(f"no weights for reduction {reduction!r}")


