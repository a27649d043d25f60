"""Chunked (fused-linear) losses: divergences computed from hidden states and the output
head a block of positions (and a tile of the vocabulary) at a time, so no ``(N, V)``
logits tensor of either model exists, and no autograd graph is built per block.

A language model's logits are ``z = head(h) = h @ W.T + b`` (then, for some models, a
scale and a softcap ``c * tanh(z / c)``, Gemma). Every token-level divergence of
:mod:`kd.divergences` is a sum over positions of a value that depends only on that
position's two rows of logits. So the loss is computed ``C`` positions at a time:

1. gather the positions that count (the mask's ``True`` entries; the others are never
   computed) and split them into blocks of ``C`` rows (default: as many rows as fit
   ``2**22`` logits on CPU, e.g. 85 rows at V = 49,152, and ``2**27`` on GPUs, 512 rows
   at V = 262,144, at least 32: :data:`TARGET_BLOCK`);
2. for each block, ``z_S = head_S(h_S[block])`` and the teacher's rows (its own head over its
   hidden states, a slice of given logits, its cached top-k, or gold labels), the
   per-position values and **the gradient with respect to the block's logits, written out
   in closed form** (below): no autograd graph, a handful of ``(C, tile)`` temporaries;
3. scalar reductions (``mean``, ``sum``, ``seq_mean``) are a weighted sum of the values
   with weights known in advance (``1/n``, ``1``, ``1/(n_seq * count_seq)``), so the
   block's logits gradient ``dz`` is turned right away into the gradients of the hidden
   rows (``dz @ W``), of the head (``dz.T @ h``, accumulated in place) and of the bias, and
   the block is freed. The backward pass only scales these stored gradients by the
   incoming gradient: the same four matrix products per block as the plain forward and
   backward, no recomputation. Without gradients (evaluation) only the values are computed;
4. ``reduction="none"`` returns per-position values whose gradient weights are only known
   in the backward pass: the forward computes the values alone, the backward reruns the
   blocks with the incoming gradient as the weights.

**Vocabulary tiles** (:func:`default_tile_size`): when a block of ``C`` whole rows would
exceed :data:`MAX_BLOCK` logits, the vocabulary is cut into tiles and each block makes
passes over them: (1) the log-normalisers by an online log-sum-exp (``lse = logaddexp(lse,
logsumexp(tile))``), with the gathered label / top-k logits and, for a top-k teacher, the
student's log-sum-exp outside the ``k`` ids; (2) for reverse KL, JSD, the skew KLs and TVD
(and for a teacher that wants gradients), the row sums the gradient needs (``sum_v G`` below,
and the value); (3) the values and gradients, tile by tile. Forward KL, the soft and
gold-label cross-entropies and top-k teachers need two passes, the others three. Working
memory is then a few ``(C, tile)`` temporaries, not ``(C, V)``, and one position's row no
longer has to fit. Each extra pass recomputes the tile's logits (one more head product),
so tiles are only used when rows do not fit; block and tile sizes are arguments
(``chunk_size``, ``tile_size``) of :func:`fused_loss` and of the divergences.

Closed-form gradients
---------------------
Write ``a = softcap(scale * z) / T`` for the student (``b`` likewise for the teacher),
``l = log q = a - lse(a)``, ``log p = b - lse(b)``. For a value ``f`` of the two
distributions, let ``G_v = df/dl_v`` with the ``l_v`` taken as independent variables
(and ``H_v = df/dlog p_v``). The chain rule through the log-softmax gives

    df/da = G - q * sum_v G_v,        df/db = H - p * sum_v H_v,

so adding any multiple of ``q`` to ``G`` (of ``p`` to ``H``) changes nothing: the constant
``+q`` and ``+p`` of ``d(x log x) = log x + 1`` are dropped below. With ``m`` the mixture of
each divergence (``M = beta P + (1-beta) Q`` for JSD, ``alpha P + (1-alpha) Q`` for the skew
forward KL, ``alpha Q + (1-alpha) P`` for the skew reverse KL), ``[.]`` a term that is 0
where the distribution in front of the log is 0:

==================  ===================================================  ======================================
divergence          ``G`` (student)                                       ``H`` (teacher)
==================  ===================================================  ======================================
forward KL          ``-p``                  (so ``df/da = q - p``)       ``[p (log p - l)]``
reverse KL          ``[q (l - log p)]``                                  ``-q``
JSD(beta)           ``(1-beta) [q (l - log m)]``                         ``beta [p (log p - log m)]``
skew forward KL     ``-(1-alpha) p q / m``                               ``[p (log p - log m)] - alpha p^2 / m``
skew reverse KL     ``[q (l - log m)] - alpha q^2 / m``                  ``-(1-alpha) p q / m``
TVD                 ``-1/2 q sign(p - q)`` (``sign 0 = 0``: the           ``1/2 p sign(p - q)``
                    subgradient autograd takes for ``|x|`` at 0)
soft cross-entropy  ``-p``                                               ``-p [l]``
==================  ===================================================  ======================================

(JSD: ``f = beta sum p log p + (1-beta) sum q log q - sum m log m``, so ``df/dq = (1-beta)
log(q / m)`` plus a constant; skew forward KL: ``f = sum p log p - sum p log m`` gives
``df/dq = -(1-alpha) p / m`` and ``df/dp = log(p / m) + 1 - alpha p / m``; the skew reverse
KL is the same with ``p`` and ``q`` swapped; ``G = q df/dq``, ``H = p df/dp``.) Gold labels
``y``: ``f = -l_y``, ``df/da = q - onehot(y)``.

A top-k teacher (docs/spec.md section 8) compares ``k + 1`` bins: ``L_j = l_{id_j}`` and the
tail ``L_tail = lse(a outside the ids) - lse(a)``. With ``G^bin`` the table's ``G`` on the
bins, ``df/da_v = G^bin_j - q_v S`` at ``v = id_j`` and ``q_v (G^bin_tail / q_tail - S)``
elsewhere, ``S = sum G^bin``; without the tail bin (renormalised top-k) ``df/da_v =
G^bin_j - Q_j S`` at the ids (``Q`` the renormalised student bins) and 0 elsewhere.

Finally ``dz = w * df/da * scale / T * (1 - tanh^2(scale z / c))`` (the last factor only
with a softcap), ``w`` the position's weight. Everything after the head products runs in
the compute dtype (float32, float64 for float64 inputs): bf16 logits are upcast before the
scale, softcap and softmax (the plain path applies the scale and softcap in bf16, then
upcasts), and ``dz`` is cast back to the head's dtype for the two backward products, whose
head gradient is accumulated in float32.

Peak working memory is a few ``(C, tile)`` blocks plus the head's gradient, whatever
``N``. The values and gradients equal the plain functions' (tests: float64 to 1e-10,
float32 to 1e-5 relative, every divergence, temperature, mask, reduction, softcap, scale,
top-k with and without the tail, tiled and whole rows).

**Compiled path** (:mod:`kd.compiled`, setting ``compile``: ``auto`` = CUDA only, ``true``,
``false``): whole rows against a head or logits teacher go through :func:`_dense_rows`, the
same elementwise operations as the whole-row case of :func:`_dense_block` with every number
a 0-d tensor, under ``torch.compile`` (the head products stay eager around it; the block's
rows are a dynamic dimension, so the number of positions per step never recompiles). Tiles,
top-k and label teachers stay eager. A failed compile logs one line and runs eagerly.

A per-position function without a closed form (``form=None``: a divergence subclass of
one's own) still runs fused, through autograd on each block's small graph (computed in the
forward pass for scalar reductions, recomputed under activation checkpointing for
``"none"``); rows must fit whole there.

Token selection (:mod:`kd.divergences`, ``select=``) runs a first pass without gradients
that computes each position's student entropy (and divergence), then the loss pass over
the kept positions only (:func:`map_rows`, whole rows).

Where it deviates from the plain path: positions whose mask is False are skipped, so
NaN / inf hidden states there cannot reach anything (the plain path replaces them with
``torch.where``; both give the same values and gradients). The gradient with respect to
the logits is not differentiable again (no double backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from kd.compiled import Compiled, wanted
from kd.signals import TAIL_FLOOR, HeadLogits, Labels, TopK, compute_dtype, topk_bins

__all__ = ["fused_loss", "token_log_probs", "map_rows", "fused_loss_and_values", "map_rows_grad", "default_chunk_size", "default_tile_size", "scalar_weights",
           "seq_mean_weights", "TARGET_BLOCK", "MAX_BLOCK", "Form", "FORMS", "form_terms"]

#: logits per block by device type (rows = TARGET_BLOCK[device] // V, at least 32): small on
#: CPU (one thread, V = 49,152, closed-form JSD over 512 positions: 42 rows 2.6 s, 64 rows 2.2 s,
#: 128 rows 2.1 s, 256 rows 2.6 s, so 85 rows); on GPUs larger blocks keep the kernels busy
#: (an H200 at V = 262,144 with the autograd blocks: 512 rows cost 1.1-1.2x the plain time,
#: 32 rows 4.7x)
TARGET_BLOCK = {"cpu": 2**22, "cuda": 2**27}

#: the most logits one block holds before the vocabulary is cut into tiles (each extra pass
#: over the tiles recomputes the head product, so whole rows are kept while they fit)
MAX_BLOCK = {"cpu": 2**24, "cuda": 2**28}

_NEG_INF = -math.inf


def default_chunk_size(vocab: int, device: torch.device | str = "cpu") -> int:
    """Rows per block so that one block of logits holds about :data:`TARGET_BLOCK` values."""
    kind = torch.device(device).type
    return max(32, TARGET_BLOCK.get(kind, TARGET_BLOCK["cuda"]) // max(vocab, 1))


def default_tile_size(vocab: int, rows: int, device: torch.device | str = "cpu") -> int:
    """Vocabulary entries per tile: the whole vocabulary while ``rows * vocab`` logits fit
    :data:`MAX_BLOCK`, else as many as fit (at least 1,024)."""
    kind = torch.device(device).type
    limit = MAX_BLOCK.get(kind, MAX_BLOCK["cuda"])
    if rows * vocab <= limit:
        return max(vocab, 1)
    return max(1024, limit // max(rows, 1))


# ----------------------------------------------------------------------------- closed forms

#: the divergences with a closed-form gradient (:class:`Form` names)
FORMS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "soft_cross_entropy")


@dataclass(frozen=True)
class Form:
    """Which divergence a fused loss computes in closed form, and its shape parameter
    (``beta`` of JSD, ``alpha`` of the skew KLs)."""

    name: str
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in FORMS:
            raise ValueError(f"no closed form for {self.name!r}; one of " + ", ".join(FORMS))

    def canonical(self) -> Form:
        """JSD at ``beta = 0 / 1`` is forward / reverse KL, a skew KL at ``alpha = 0`` the plain KL
        (the plain functions define them so)."""
        if self.name == "jsd" and self.param in (0.0, 1.0):
            return Form("forward_kl" if self.param == 0.0 else "reverse_kl")
        if self.name.startswith("skew_") and self.param == 0.0:
            return Form(self.name[len("skew_"):])
        return self

    @property
    def sums_known(self) -> bool:
        """``sum_v G_v = -1`` whatever the rows (forward KL, soft cross-entropy): no pass for it."""
        return self.name in ("forward_kl", "soft_cross_entropy")


def _zero_where_not(cond: Tensor, x: Tensor) -> Tensor:
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float | Tensor) -> Tensor:
    """``log(weight_a a + (1 - weight_a) b)`` in log space; ``-inf`` where both are 0
    (``logaddexp(-inf, -inf) = -inf``; nothing here is differentiated by autograd). The
    weight may be a 0-d tensor (the compiled path)."""
    if torch.is_tensor(weight_a):
        return torch.logaddexp(log_a + weight_a.log(), log_b + torch.log1p(-weight_a))
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def form_terms(form: Form, lq: Tensor, lp: Tensor, need_g: bool = True, need_h: bool = False,
               param: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor]:
    """Per-row values and the partials of the module docstring's table.

    Args:
        form: the divergence (:meth:`Form.canonical` already applied).
        lq, lp: ``(C, X)`` student / teacher log-probabilities (whole rows, a tile of
            normalised rows, or top-k bins).
        param: the shape parameter as a 0-d tensor instead of ``form.param`` (the compiled
            path: a new value is not a new graph).

    Returns:
        ``(value (C,), G or None, H or None, q, p)`` with ``q = exp(lq)``, ``p = exp(lp)``.
    """
    name, c = form.name, (form.param if param is None else param)
    q, p = lq.exp(), lp.exp()
    p_in, q_in = lp > _NEG_INF, lq > _NEG_INF
    g = h = None
    if name == "forward_kl":
        t = _zero_where_not(p_in, p * (lp - lq))
        value, g, h = t.sum(-1), (-p if need_g else None), t
    elif name == "soft_cross_entropy":
        t = -p * _zero_where_not(p_in, lq)
        value, g, h = t.sum(-1), (-p if need_g else None), t
    elif name == "reverse_kl":
        t = _zero_where_not(q_in, q * (lq - lp))
        value, g, h = t.sum(-1), t, (-q if need_h else None)
    elif name == "jsd":
        lm = _log_mix(lp, lq, c)
        tp = _zero_where_not(p_in, p * (lp - lm))
        tq = _zero_where_not(q_in, q * (lq - lm))
        value = c * tp.sum(-1) + (1.0 - c) * tq.sum(-1)
        g = tq.mul_(1.0 - c) if need_g else None
        h = tp.mul_(c) if need_h else None
    elif name == "skew_forward_kl":
        lm = _log_mix(lp, lq, c)
        tp = _zero_where_not(p_in, p * (lp - lm))
        value = tp.sum(-1)
        if need_g:
            g = _zero_where_not(p_in & q_in, (lp + lq - lm).exp_()).mul_(-(1.0 - c))
        if need_h:
            h = tp - c * _zero_where_not(p_in, (2.0 * lp - lm).exp_())
    elif name == "skew_reverse_kl":
        lm = _log_mix(lq, lp, c)
        tq = _zero_where_not(q_in, q * (lq - lm))
        value = tq.sum(-1)
        if need_g:
            g = tq - c * _zero_where_not(q_in, (2.0 * lq - lm).exp_())
        if need_h:
            h = _zero_where_not(p_in & q_in, (lp + lq - lm).exp_()).mul_(-(1.0 - c))
    elif name == "tvd":
        d = p - q
        value = 0.5 * d.abs().sum(-1)
        if need_g or need_h:
            sign = d.sign_()
            g = (-0.5 * q) * sign if need_g else None
            h = (0.5 * p) * sign if need_h else None
    else:  # pragma: no cover - Form validates the name
        raise ValueError(name)
    return value, (g if need_g else None), (h if need_h else None), q, p


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
class _Side:
    """One model's logits transform: ``a = softcap(scale * z) / T`` in the compute dtype."""

    scale: float
    softcap: float | None
    temperature: float
    dtype: torch.dtype

    def act(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``a`` and, with a softcap, ``tanh(scale z / c)`` (for the chain rule). ``z`` is a
        fresh tensor (a head product or an indexed copy) and may be overwritten."""
        a = z.to(self.dtype)
        if self.softcap:
            th = a.mul_(self.scale / self.softcap).tanh_()
            return th * (self.softcap / self.temperature), th
        factor = self.scale / self.temperature
        return (a.mul_(factor) if factor != 1.0 else a), None

    def chain(self, ga: Tensor, th: Tensor | None) -> Tensor:
        """``dz`` from ``df/da`` (in place on ``ga``)."""
        if self.scale != self.temperature:
            ga.mul_(self.scale / self.temperature)
        if th is not None:
            ga.addcmul_(ga * th, th, value=-1.0)  # ga * (1 - th^2)
        return ga


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
    form: Form | None = None
    tile: int = 0
    compiled: bool = False  # whole dense rows through the compiled block function (kd.compiled)
    consts: dict = field(default_factory=dict)  # its 0-d tensor arguments, made once per call

    def sides(self) -> tuple[_Side, _Side]:
        s = _Side(self.student.scale, self.student.softcap, self.temperature, self.dtype)
        if self.kind == "head":
            return s, _Side(self.teacher.scale, self.teacher.softcap, self.temperature, self.dtype)
        return s, _Side(1.0, None, self.temperature, self.dtype)

    # the autograd fallback (a per-position function without a closed form)
    def values(self, rows: Tensor, s_h: Tensor, s_w: Tensor, s_b: Tensor | None, t0: Tensor | None,
               t1: Tensor | None, t2: Tensor | None, graph: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-position values ``(C,)`` of ``rows``, and the logits leaves they came from
        (student, teacher or None) so the caller can differentiate with respect to them."""
        z_s = F.linear(s_h[rows], s_w, s_b)
        if graph:
            z_s = z_s.detach().requires_grad_(True)
        log_q = torch.log_softmax(_tempered(self.student.transform(z_s), self.dtype, self.temperature), dim=-1)
        z_t = None
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


# ----------------------------------------------------------------------------- the closed-form sweep


def _grad_buffers(spec: _Spec, tensors: tuple, want: list[bool]) -> list[Tensor | None]:
    """Zeroed gradient buffers (head and bias grads in float32 at least)."""
    return [torch.zeros_like(x, dtype=torch.promote_types(torch.float32, x.dtype) if i in (1, 2, 4, 5) else x.dtype)
            if w else None for i, (x, w) in enumerate(zip(tensors, want))]


def _sweep(spec: _Spec, rows: Tensor, weights: Tensor | None, tensors: tuple,
           want: list[bool]) -> tuple[Tensor, list[Tensor | None]]:
    """Values ``(n,)`` at ``rows`` and, when ``weights`` is given and ``want`` has an entry,
    the gradients of ``sum_i w_i value_i`` with respect to the six input tensors."""
    grad = weights is not None and any(want)
    grads = _grad_buffers(spec, tensors, want) if grad else [None] * 6
    values = torch.empty(rows.numel(), dtype=spec.dtype, device=tensors[0].device)
    with torch.no_grad():
        for start in range(0, rows.numel(), spec.chunk):
            block = rows[start:start + spec.chunk]
            w = None
            if grad:
                w = weights[start:start + spec.chunk, None] if weights.dim() else weights
                w = w.to(spec.dtype)
            values[start:start + spec.chunk] = _block(spec, block, w, tensors, grads if grad else None, want)
    return values, grads


def _tiles(vocab: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + tile, vocab)) for lo in range(0, vocab, max(tile, 1))] or [(0, 0)]


def _lse_update(lse: Tensor | None, x: Tensor) -> Tensor:
    part = torch.logsumexp(x, dim=-1)
    return part if lse is None else torch.logaddexp(lse, part)


def _add_head_grads(grads: list[Tensor | None], first: int, dz: Tensor, block: Tensor, hidden: Tensor,
                    weight: Tensor, lo: int, hi: int, acc: list[Tensor | None], whole: bool) -> None:
    """Add a tile's logits gradient ``dz (C, hi - lo)`` to the hidden rows (``dz @ W``),
    the head (``dz.T @ h``, in place) and the bias."""
    g_h, g_w, g_b = grads[first], grads[first + 1], grads[first + 2]
    if g_h is not None:
        part = dz.to(weight.dtype) @ weight[lo:hi]
        if whole:
            g_h[block] = part.to(g_h.dtype)
        else:
            acc[0] = part.to(torch.promote_types(part.dtype, torch.float32)) if acc[0] is None else acc[0].add_(part)
    if g_w is not None:
        rows = hidden[block]
        if rows.dtype == g_w.dtype == dz.dtype:
            g_w[lo:hi].addmm_(dz.t(), rows)  # in place: no (V, H) temporary per block
        else:
            g_w[lo:hi].add_((dz.t().to(rows.dtype) @ rows).to(g_w.dtype))
    if g_b is not None:
        g_b[lo:hi].add_(dz.sum(0).to(g_b.dtype))


def _block(spec: _Spec, block: Tensor, w: Tensor | None, tensors: tuple, grads: list[Tensor | None] | None,
           want: list[bool]) -> Tensor:
    """One block's values ``(C,)``; with ``grads``, adds ``w``-weighted gradients to them."""
    s_h, s_w, s_b, t0, t1, t2 = tensors
    vocab = s_w.shape[0]
    tiles = _tiles(vocab, spec.tile)
    whole = len(tiles) == 1
    s_side, t_side = spec.sides()
    h = s_h[block]
    ht = t0[block] if spec.kind == "head" else None

    def student(lo: int, hi: int) -> tuple[Tensor, Tensor | None]:
        return s_side.act(F.linear(h, s_w[lo:hi], None if s_b is None else s_b[lo:hi]))

    def teacher(lo: int, hi: int) -> tuple[Tensor, Tensor | None]:
        if spec.kind == "head":
            return t_side.act(F.linear(ht, t1[lo:hi], None if t2 is None else t2[lo:hi]))
        return t_side.act(t0[block, lo:hi])

    s_acc: list[Tensor | None] = [None]
    if spec.compiled and whole and spec.kind in ("head", "logits"):
        value = _compiled_block(spec, block, w, tensors, grads, want)
    elif spec.kind in ("head", "logits"):
        value = _dense_block(spec, block, w, tensors, grads, want, tiles, student, teacher, s_acc)
    else:
        value = _sparse_block(spec, block, w, tensors, grads, want, tiles, student, s_acc)
    if grads is not None and grads[0] is not None and not whole:
        grads[0][block] = s_acc[0].to(grads[0].dtype)
    return value


def _dense_block(spec: _Spec, block: Tensor, w: Tensor | None, tensors: tuple, grads: list | None,
                 want: list[bool], tiles: list[tuple[int, int]], student: Callable, teacher: Callable,
                 s_acc: list) -> Tensor:
    """A block against a dense teacher (head or logits), whole rows or tiles."""
    s_h, s_w, s_b, t0, t1, t2 = tensors
    form = spec.form
    whole = len(tiles) == 1
    grad = grads is not None
    want_t = grad and any(want[3:])
    s_side, t_side = spec.sides()
    if whole:
        (a, th_s), (b, th_t) = student(*tiles[0]), teacher(*tiles[0])
        cached = {0: (a, th_s, b, th_t)}
        lse_a, lse_b = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
    else:
        cached = {}
        lse_a = lse_b = None
        for lo, hi in tiles:  # pass 1: log-normalisers by an online log-sum-exp
            lse_a = _lse_update(lse_a, student(lo, hi)[0])
            lse_b = _lse_update(lse_b, teacher(lo, hi)[0])

    def normalised(i: int, lo: int, hi: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        if i in cached:
            a, th_s, b, th_t = cached.pop(i)
        else:
            (a, th_s), (b, th_t) = student(lo, hi), teacher(lo, hi)
        return a.sub_(lse_a[:, None]), th_s, b.sub_(lse_b[:, None]), th_t

    value = sum_g = sum_h = None
    if grad and not whole and (not form.sums_known or want_t):  # pass 2: the row sums
        value = sum_g = sum_h = 0
        for i, (lo, hi) in enumerate(tiles):
            lq, _, lp, _ = normalised(i, lo, hi)
            v, g, hh, _, _ = form_terms(form, lq, lp, True, want_t)
            value, sum_g = value + v, sum_g + g.sum(-1)
            if want_t:
                sum_h = sum_h + hh.sum(-1)
    elif grad and not whole:
        sum_g = -torch.ones_like(lse_a)
    total = 0
    t_acc: list[Tensor | None] = [None]
    for i, (lo, hi) in enumerate(tiles):  # last pass: values and gradients
        lq, th_s, lp, th_t = normalised(i, lo, hi)
        v, g, hh, q, p = form_terms(form, lq, lp, grad, want_t)
        total = total + v
        if not grad:
            continue
        if whole:
            sum_g = g.sum(-1)
            sum_h = hh.sum(-1) if want_t else None
        del lq, lp
        if any(want[:3]):
            ga = g.addcmul_(q, sum_g[:, None], value=-1.0).mul_(w)
            _add_head_grads(grads, 0, s_side.chain(ga, th_s), block, s_h, s_w, lo, hi, s_acc, whole)
        if want_t:
            gb = hh.addcmul_(p, sum_h[:, None], value=-1.0).mul_(w)
            dzt = t_side.chain(gb, th_t)
            if spec.kind == "head":
                _add_head_grads(grads, 3, dzt, block, t0, t1, lo, hi, t_acc, whole)
            elif grads[3] is not None:
                grads[3][block, lo:hi] = dzt.to(grads[3].dtype)
    if want_t and spec.kind == "head" and grads[3] is not None and not whole:
        grads[3][block] = t_acc[0].to(grads[3].dtype)
    return total if value is None else value


def _dense_rows(name: str, softcaps: tuple[bool, bool], need: tuple[bool, bool], dtype: torch.dtype,
                out: tuple[torch.dtype, torch.dtype], zs: Tensor, zt: Tensor, w: Tensor, k_s: Tensor, k_t: Tensor,
                param: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Whole rows of a dense block from the raw logits ``zs``, ``zt`` ``(C, V)``: the values
    ``(C,)`` and the logits gradients ``dz_S``, ``dz_T`` (in the dtypes ``out``, None where not
    ``need``), weighted by ``w`` ``(C, 1)``. The same operations as :func:`_dense_block`'s
    whole-row case, with every number a tensor (``k = [scale / T or scale / c, c / T, scale / T]``
    per side, ``param`` the divergence's shape parameter): the function :mod:`kd.compiled`
    compiles, the head products staying outside."""
    sides = []
    for z, soft, k in ((zs, softcaps[0], k_s), (zt, softcaps[1], k_t)):
        a = z.to(dtype) * k[0]
        th = a.tanh() if soft else None
        sides.append((th * k[1] if soft else a, th))
    (a, th_s), (b, th_t) = sides
    lq = a - torch.logsumexp(a, -1, keepdim=True)
    lp = b - torch.logsumexp(b, -1, keepdim=True)
    value, g, hh, q, p = form_terms(Form(name), lq, lp, need[0], need[1], param=param)
    grads = []
    for keep, part, prob, th, k, dt in ((need[0], g, q, th_s, k_s, out[0]), (need[1], hh, p, th_t, k_t, out[1])):
        if not keep:
            grads.append(None)
            continue
        ga = (part - prob * part.sum(-1, keepdim=True)) * w * k[2]
        if th is not None:
            ga = ga - ga * th * th
        grads.append(ga.to(dt))
    return value, grads[0], grads[1]


_COMPILED_ROWS = Compiled(_dense_rows, dynamic_args=(5, 6, 7))


def _compiled_block(spec: _Spec, block: Tensor, w: Tensor | None, tensors: tuple, grads: list | None,
                    want: list[bool]) -> Tensor:
    """:func:`_dense_block` on whole rows through the compiled :func:`_dense_rows` (the
    head products and the gradient products eager, around it)."""
    s_h, s_w, s_b, t0, t1, t2 = tensors
    zs = F.linear(s_h[block], s_w, s_b)
    zt = F.linear(t0[block], t1, t2) if spec.kind == "head" else t0[block]
    need = (grads is not None and any(want[:3]), grads is not None and any(want[3:]))
    if not spec.consts:  # once per call: no host-to-device copy per block
        consts = []
        for side in spec.sides():
            pre = side.scale / side.softcap if side.softcap else side.scale / side.temperature
            post = side.softcap / side.temperature if side.softcap else 1.0
            consts.append(torch.tensor([pre, post, side.scale / side.temperature], dtype=spec.dtype,
                                       device=zs.device))
        consts.append(torch.tensor(spec.form.param, dtype=spec.dtype, device=zs.device))
        spec.consts["k"] = consts
    k_s, k_t, param = spec.consts["k"]
    rows = zs.shape[0]
    w = (torch.ones((), dtype=spec.dtype, device=zs.device) if w is None else w).expand(rows, 1).contiguous()
    softcaps = (bool(spec.student.softcap), spec.kind == "head" and bool(spec.teacher.softcap))
    out_t = t0.dtype if spec.kind == "logits" else (t1.dtype if t1 is not None else spec.dtype)
    value, dzs, dzt = _COMPILED_ROWS(spec.form.name, softcaps, need, spec.dtype, (s_w.dtype, out_t), zs, zt, w,
                                     k_s, k_t, param)
    if dzs is not None:
        _add_head_grads(grads, 0, dzs, block, s_h, s_w, 0, s_w.shape[0], [None], True)
    if dzt is not None:
        if spec.kind == "head":
            _add_head_grads(grads, 3, dzt, block, t0, t1, 0, s_w.shape[0], [None], True)
        elif grads[3] is not None:
            grads[3][block] = dzt.to(grads[3].dtype)
    return value


def _sparse_block(spec: _Spec, block: Tensor, w: Tensor | None, tensors: tuple, grads: list | None,
                  want: list[bool], tiles: list[tuple[int, int]], student: Callable, s_acc: list) -> Tensor:
    """A block against gold labels or a top-k teacher: pass 1 gathers the label / top-k
    logits and the log-normalisers, the bins' values and partials follow, pass 2 the gradients."""
    s_h, s_w, s_b, t0, t1, t2 = tensors
    whole = len(tiles) == 1
    s_side, _ = spec.sides()
    dtype = spec.dtype
    ids = t0[block].long()
    if ids.dim() == 1:
        ids = ids[:, None]
    k = ids.shape[1]
    tail = spec.kind == "topk" and spec.teacher.tail
    cached = {}
    lse_a = lse_out = None
    picked = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
    for i, (lo, hi) in enumerate(tiles):  # pass 1
        a, th = student(lo, hi)
        if whole:
            cached[i] = (a, th)
        lse_a = _lse_update(lse_a, a)
        inside = (ids >= lo) & (ids < hi)
        local = (ids - lo).clamp(0, max(hi - lo - 1, 0))
        picked = torch.where(inside, a.gather(1, local), picked)
        if tail:  # the tile with its top-k entries at -inf (amin: ids outside the tile change nothing)
            hide = torch.where(inside, _NEG_INF, math.inf).to(dtype)
            lse_out = _lse_update(lse_out, a.scatter_reduce(1, local, hide, reduce="amin"))
    if spec.kind == "labels":
        value = lse_a - picked[:, 0]
        bin_grad = None
    else:
        log_p = t1[block].to(dtype)
        if tail:
            empty = lse_out == _NEG_INF
            lq = torch.cat([picked - lse_a[:, None], (lse_out - lse_a)[:, None]], -1)
            p_tail = (1.0 - log_p.exp().sum(-1)).clamp(min=TAIL_FLOOR).log().masked_fill(empty, _NEG_INF)
            lp = torch.cat([log_p, p_tail[:, None]], -1)
        else:
            lq, lp = torch.log_softmax(picked, -1), torch.log_softmax(log_p, -1)
        value, bin_grad, _, q_bins, _ = form_terms(spec.form, lq, lp, grads is not None)
    if grads is None or not any(want[:3]):
        return value
    if bin_grad is not None:
        total_g = bin_grad.sum(-1)
        if tail:
            q_tail = q_bins[:, k]
            outside = torch.where(q_tail > 0, bin_grad[:, k] / q_tail, torch.zeros_like(q_tail)) - total_g
            at_ids = bin_grad[:, :k] - total_g[:, None] * picked.sub(lse_a[:, None]).exp()  # G_j - q_{id_j} S
        else:
            at_ids = bin_grad - q_bins * total_g[:, None]
    for i, (lo, hi) in enumerate(tiles):  # pass 2: gradients
        a, th = cached.pop(i) if i in cached else student(lo, hi)
        inside = (ids >= lo) & (ids < hi)  # ids outside the tile add 0 (no host sync, no index lists)
        local = (ids - lo).clamp(0, max(hi - lo - 1, 0))
        zero = torch.zeros((), dtype=dtype, device=a.device)
        if spec.kind == "labels":
            ga = a.sub_(lse_a[:, None]).exp_()
            ga.scatter_add_(1, local, torch.where(inside, -1.0, zero))
        elif tail:
            ga = a.sub_(lse_a[:, None]).exp_().mul_(outside[:, None])
            ga.scatter_add_(1, local, torch.where(inside, at_ids - ga.gather(1, local), zero))
        else:
            ga = torch.zeros_like(a)
            ga.scatter_add_(1, local, torch.where(inside, at_ids, zero))
        ga.mul_(w)
        _add_head_grads(grads, 0, s_side.chain(ga, th), block, s_h, s_w, lo, hi, s_acc, whole)
    return value


class _ClosedForm(torch.autograd.Function):
    """``sum_i w_i * value_i`` over ``rows``, the closed-form gradients computed in forward."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, rows: Tensor, weights: Tensor, *tensors: Tensor | None) -> Tensor:
        want = [spec.grad_enabled and x is not None and x.requires_grad for x in tensors]
        values, grads = _sweep(spec, rows, weights, tensors, want)
        ctx.grads = grads
        ctx.dtypes = [None if x is None else x.dtype for x in tensors]
        return (values * weights).sum() if weights.dim() else values.sum() * weights

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out = []
        for g, like, dtype in zip(ctx.grads, ctx.needs_input_grad[3:], ctx.dtypes):
            out.append(None if g is None or not like else (g * grad).to(dtype))
        return (None, None, None, *out)


class _ClosedFormValues(torch.autograd.Function):
    """Values ``(n,)`` over ``rows``; the backward reruns the blocks weighted by the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, rows: Tensor, *tensors: Tensor | None) -> Tensor:
        values, _ = _sweep(spec, rows, None, tensors, [False] * 6)
        ctx.spec, ctx.rows, ctx.tensors = spec, rows, tensors
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        want = list(ctx.needs_input_grad[2:])
        _, grads = _sweep(ctx.spec, ctx.rows, grad, ctx.tensors, want)
        return (None, None, *[None if g is None else g.to(x.dtype) for g, x in zip(grads, ctx.tensors)])


# ----------------------------------------------------------------------------- autograd fallback


class _EagerFused(torch.autograd.Function):
    """``sum_i w_i * value_i`` over ``rows``, gradients by autograd block by block in forward
    (a per-position function without a closed form)."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, rows: Tensor, weights: Tensor, s_h: Tensor, s_w: Tensor,
                s_b: Tensor | None, t0: Tensor | None, t1: Tensor | None, t2: Tensor | None) -> Tensor:
        total = torch.zeros((), dtype=spec.dtype, device=s_h.device)
        tensors = (s_h, s_w, s_b, t0, t1, t2)
        want = [spec.grad_enabled and x is not None and x.requires_grad for x in tensors]
        want_t_logits = spec.kind in ("head", "logits") and any(want[3:])
        grads = _grad_buffers(spec, tensors, want) if any(want) else [None] * 6
        vocab = s_w.shape[0]
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
            _add_head_grads(grads, 0, d[0], block, s_h, s_w, 0, vocab, [None], True)
            if len(d) > 1:
                if spec.kind == "head":
                    _add_head_grads(grads, 3, d[1], block, t0, t1, 0, vocab, [None], True)
                else:
                    grads[3][block] += d[1].to(grads[3].dtype)
        ctx.grads = grads
        ctx.dtypes = [None if x is None else x.dtype for x in tensors]
        return total

    backward = _ClosedForm.backward  # the gradients the forward stored, times the incoming one


# ----------------------------------------------------------------------------- entry points


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
               dtype: torch.dtype | None = None, form: Form | None = None, tile_size: int | None = None,
               compile: str | bool = "false") -> Tensor:
    """The fused loss over the flattened positions ``rows`` (1-D long).

    Args:
        student: the student's hidden states and head.
        teacher: a :class:`kd.signals.HeadLogits`, teacher logits ``(..., V)``, a
            :class:`kd.signals.TopK` or :class:`kd.signals.Labels` (cross-entropy; then
            ``per_position`` and ``form`` are ignored).
        per_position: ``(C, V), (C, V) -> (C,)`` log-probabilities to values (used only
            without ``form``, through autograd).
        rows: positions (into the flattened leading shape) that are computed.
        weights: ``(len(rows),)`` or a scalar: returns ``sum_i w_i value_i`` (scalar
            reductions, gradients computed in the forward pass); None: returns the values
            ``(len(rows),)`` (gradients computed block by block in the backward pass).
        temperature: divides both models' logits (a top-k teacher is stored at it).
        chunk_size: rows per block (default :func:`default_chunk_size`).
        dtype: compute dtype (default: float32, float64 for float64 inputs).
        form: the divergence in closed form (:class:`Form`): no autograd graph per block,
            vocabulary tiles possible. None: autograd on each block with ``per_position``.
        tile_size: vocabulary entries per tile (default :func:`default_tile_size`; the
            autograd fallback always takes whole rows).
        compile: ``auto`` (CUDA only), ``true`` or ``false``: whole rows of a head or logits
            teacher in closed form through the compiled block function (:mod:`kd.compiled`).
    """
    kind, (t0, t1, t2) = _teacher_tensors(teacher)
    if dtype is None:
        floats = [student.hidden, student.weight] + [t for t in (t0, t1) if t is not None and t.is_floating_point()]
        dtype = compute_dtype(*floats)
    vocab = student.weight.shape[0]
    chunk = int(chunk_size or default_chunk_size(vocab, student.weight.device))
    closed = kind == "labels" or form is not None
    tile = int(tile_size or default_tile_size(vocab, chunk, student.weight.device)) if closed else vocab
    spec = _Spec(student, teacher, kind, per_position, float(temperature), dtype, chunk, torch.is_grad_enabled(),
                 form.canonical() if form is not None else None, tile,
                 compiled=form is not None and wanted(compile, student.weight.device))
    s_h = student.hidden.reshape(-1, student.hidden.shape[-1])
    rows = rows.to(s_h.device)
    tensors = (s_h, student.weight, student.bias, t0, t1, t2)
    if closed:
        if weights is not None:
            return _ClosedForm.apply(spec, rows, weights, *tensors)
        return _ClosedFormValues.apply(spec, rows, *tensors)
    if weights is not None:
        return _EagerFused.apply(spec, rows, weights, *tensors)
    parts = []
    for block in _blocks(rows, chunk):
        def run(s_h: Tensor, s_w: Tensor, s_b: Tensor | None, t0: Tensor | None, t1: Tensor | None,
                t2: Tensor | None, block: Tensor = block) -> Tensor:
            return spec.values(block, s_h, s_w, s_b, t0, t1, t2)[0]

        if torch.is_grad_enabled():
            parts.append(checkpoint(run, *tensors, use_reentrant=False))
        else:
            parts.append(run(*tensors))
    if not parts:
        return torch.zeros(0, dtype=dtype, device=s_h.device)
    return torch.cat(parts)


def token_log_probs(student: HeadLogits, tokens: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0,
                    chunk_size: int | None = None, tile_size: int | None = None) -> Tensor:
    """``log q(token)`` at every position ``(...)`` from hidden states and head, never building
    ``(..., V)`` logits (the sampled-token log-probabilities of policy-gradient losses).

    The values are the gold-label cross-entropy's, negated; any function of them can be
    differentiated (a PPO ratio, a clipped surrogate): the backward pass reruns the blocks
    with the incoming gradient ``g`` as weights, ``dz = -g (q - onehot(token))``. Positions
    outside ``mask`` (bool ``(...)``, default all) are 0 and get no gradient; negative ids
    (IGNORE_INDEX) must be masked."""
    valid = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    rows = valid.reshape(-1).nonzero().squeeze(-1)
    values = fused_loss(student, Labels(tokens.clamp(min=0)), None, rows, None, temperature=temperature,
                        chunk_size=chunk_size, tile_size=tile_size)
    return (-values).new_zeros(valid.numel()).index_add(0, rows, -values).view(tokens.shape)


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


# ----------------------------------------------------------------------------- recipes' helpers


class _ClosedFormWithValues(torch.autograd.Function):
    """``(sum_i w_i value_i, values)`` over ``rows``: the sum with the gradients of
    :class:`_ClosedForm` (computed in the forward pass), the values without gradient."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, rows: Tensor, weights: Tensor, *tensors: Tensor | None) -> tuple[Tensor, Tensor]:
        want = [spec.grad_enabled and x is not None and x.requires_grad for x in tensors]
        values, grads = _sweep(spec, rows, weights, tensors, want)
        ctx.grads = grads
        ctx.dtypes = [None if x is None else x.dtype for x in tensors]
        ctx.mark_non_differentiable(values)
        total = (values * weights).sum() if weights.dim() else values.sum() * weights
        return total, values

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _values: Tensor) -> tuple[Tensor | None, ...]:
        return _ClosedForm.backward(ctx, grad)


def fused_loss_and_values(student: HeadLogits, teacher: Any, rows: Tensor, weights: Tensor, *, form: Form | None,
                          temperature: float = 1.0, chunk_size: int | None = None, dtype: torch.dtype | None = None,
                          tile_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``(sum_i w_i value_i, values)`` of a closed-form divergence (``form``; a
    :class:`kd.signals.Labels` teacher: the cross-entropy, ``form`` None) at the flattened
    positions ``rows``, in one sweep: the weighted sum carries the gradients (computed in the
    forward pass, as :func:`fused_loss` with weights), the per-row values ``(len(rows),)``
    carry none. For a recipe that trains on a weighted sum and logs the plain mean (MiniLLM's
    importance-weighted reverse KL). ``weights``: ``(len(rows),)`` or a scalar, no gradient."""
    kind, (t0, t1, t2) = _teacher_tensors(teacher)
    if kind != "labels" and form is None:
        raise ValueError("fused_loss_and_values needs a closed form (form=...) or a Labels teacher")
    if dtype is None:
        floats = [student.hidden, student.weight] + [t for t in (t0, t1) if t is not None and t.is_floating_point()]
        dtype = compute_dtype(*floats)
    vocab = student.weight.shape[0]
    chunk = int(chunk_size or default_chunk_size(vocab, student.weight.device))
    tile = int(tile_size or default_tile_size(vocab, chunk, student.weight.device))
    spec = _Spec(student, teacher, kind, None, float(temperature), dtype, chunk, torch.is_grad_enabled(),
                 form.canonical() if form is not None else None, tile)
    s_h = student.hidden.reshape(-1, student.hidden.shape[-1])
    tensors = (s_h, student.weight, student.bias, t0, t1, t2)
    weights = torch.as_tensor(weights, dtype=dtype, device=s_h.device).detach()
    return _ClosedFormWithValues.apply(spec, rows.to(s_h.device), weights, *tensors)


def map_rows_grad(student: HeadLogits, fn: Callable[[Tensor], Tensor], rows: Tensor,
                  chunk_size: int | None = None) -> Tensor:
    """``fn(logits) -> (C, ...)`` over the flattened positions ``rows``, ``C`` rows of the
    student's logits (after its scale and softcap, in the head's dtype) at a time,
    concatenated, **with gradients**: each block runs under activation checkpointing, so its
    ``(C, V)`` logits are freed after the forward pass and recomputed, one block at a time,
    in the backward pass. Only ``(C, V)`` logits live at once (not ``(N, V)``). For
    functions of whole rows that have no closed form here: ULD's sorted probabilities, the
    student's next-byte marginals of byte-level KD."""
    s_h = student.hidden.reshape(-1, student.hidden.shape[-1])
    chunk = int(chunk_size or default_chunk_size(student.weight.shape[0], student.weight.device))
    parts = []
    for block in _blocks(rows.to(s_h.device), chunk):
        def run(s_h: Tensor, s_w: Tensor, s_b: Tensor | None, block: Tensor = block) -> Tensor:
            return fn(student.transform(F.linear(s_h[block], s_w, s_b)))

        if torch.is_grad_enabled():
            parts.append(checkpoint(run, s_h, student.weight, student.bias, use_reentrant=False))
        else:
            parts.append(run(s_h, student.weight, student.bias))
    if not parts:
        with torch.no_grad():  # the shape and dtype of an empty result
            empty = fn(student.transform(F.linear(s_h[:0], student.weight, student.bias)))
        return empty
    return torch.cat(parts)
