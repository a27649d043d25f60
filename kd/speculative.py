"""Speculative knowledge distillation's interleaved sampling (SKD; Xu et al., ICLR 2025,
"Speculative Knowledge Distillation: Bridging the Teacher-Student Gap Through Interleaved
Sampling").

Algorithm (the paper's Algorithm 1, sampling part)
--------------------------------------------------
For a prompt ``x`` and each response position ``i = 1, 2, ...``, with the prefix
``y_<i`` built so far (student and teacher tokens alike):

1. the student proposes ``y_i ~ q(. | y_<i, x)``;
2. the teacher verifies it: if ``y_i`` is not among the ``K`` tokens the teacher ranks
   highest, ``topK(p(. | y_<i, x))``, it is rejected and replaced by a sample of the
   teacher, ``y_i ~ p(. | y_<i, x)``;
3. the kept token joins the prefix of both models and decoding goes on until EOS or the
   budget.

The training step then minimises the recipe's divergence between teacher and student on
the interleaved sequences (SKD's loss is GKD's token-level divergence). ``K = V`` (or any
``K`` at least the vocabulary) accepts every proposal: pure on-policy sampling, token for
token the student's own samples for the same random stream. ``K = 1`` with greedy decoding
keeps a proposal only when it is the teacher's argmax, so the sequence is the teacher's
greedy answer: the supervised-KD end of the range. The paper's default is ``K = 25``.

How it runs here
----------------
:class:`Interleave` is a :class:`kd.generation.Mixer`: :func:`kd.generation.generate`
steps the student with its KV cache and calls the mixer, which steps each teacher with its
own KV cache on the same tokens, positions and mask (MiniLLM's :class:`TeacherMix` does the
same), and :meth:`Interleave.verify` accepts or replaces the token ``generate`` drew from the
student. ``Generation.replaced`` marks the teacher's tokens. Routed teachers
(:class:`kd.teachers.Teachers`): each row is verified by its own teacher, which runs on its
own rows only; a row without a teacher (route -1) keeps the student's proposals.

Conventions
-----------
* Both draws use the same sampling settings (:class:`kd.generation.Sampling`): temperature,
  then the sampler's own top-k / top-p filter, on the student's proposal and on the
  teacher's replacement alike; ``temperature: 0`` takes the argmax of each.
* The top-K test reads the teacher's unfiltered distribution; ties with the ``K``-th
  token are accepted (the temperature does not change the ranking).
* A replacement draws its uniform from the same generator as the proposals, and only for
  the rejected rows, so a step where nothing is rejected consumes exactly what plain
  sampling consumes.
* ``Generation.logprobs`` holds the log-prob of each kept token under the distribution it
  was finally drawn from: the student's proposal for accepted tokens, the teacher's for
  replaced ones (not the marginal of the whole propose-verify step).
* Vocabularies that differ only by padding rows are cut to the shared size.

Deviations from the paper's code
--------------------------------
* The official implementation proposes a block of student tokens, verifies the block in one
  teacher pass and discards the proposals after the first rejection (transformers' assisted
  generation). The distribution of the resulting sequences is the same as the per-token
  loop above, which is what we run (one teacher step per token, with its KV cache); the
  random numbers consumed differ, so a seed does not give the official code's tokens.
* The paper trains on these sequences from the start; its remark that SKD behaves like
  supervised KD early and like on-policy KD later is a consequence of the acceptance rate,
  not a schedule, and there is none here either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.generation import (DecodeState, GenerationConfig, Mixed, Mixer, _log_probs, _Stepper, filter_log_probs,
                           sample_from_log_probs)

__all__ = ["Interleave", "teachers_and_route"]


class _RowStepper:
    """A model stepped on a fixed subset of the batch's rows (a routed teacher's)."""

    def __init__(self, model: nn.Module, rows: Tensor | None, use_cache: bool) -> None:
        self.stepper = _Stepper(model, use_cache)
        self.rows = rows

    def next_logits(self, state: DecodeState) -> Tensor:
        if self.rows is None:
            return self.stepper.next_logits(state)
        r = self.rows
        sub = DecodeState(state.step, state.sequences[r], state.attention_mask[r], state.position_ids[r],
                          state.finished[r], state.prompt_length, state.temperature)
        return self.stepper.next_logits(sub)


class Interleave(Mixer):
    """SKD's interleaved sampling: the student proposes, the teacher keeps a proposal only
    when it is among its ``top_k`` tokens and otherwise replaces it with its own sample.

    Args:
        teachers: one teacher, or a sequence of teachers that ``route`` indexes.
        top_k: K of the verification (``>= 1``; at least the vocabulary accepts every
            proposal).
        route: ``(B,)`` long, each row's teacher among ``teachers`` (-1: none, the
            student's proposals stand); None: every row has the first (only) teacher.
    """

    def __init__(self, teachers: nn.Module | Sequence[nn.Module], top_k: int, route: Tensor | None = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"the speculative top_k must be a positive number of tokens (got {top_k!r}); "
                              "the paper uses 25")
        self.teachers = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        if not self.teachers:
            raise ConfigError("speculative sampling needs at least one teacher")
        self.top_k = top_k
        self.route = route
        self._steppers: list[_RowStepper] = []
        self._modes: list[bool] = []
        self._config: GenerationConfig | None = None
        self._log_p: Tensor | None = None
        self._covered: Tensor | None = None

    def begin(self, config: GenerationConfig) -> None:
        self._config = config
        self._modes = [t.training for t in self.teachers]
        self._steppers = []
        for k, teacher in enumerate(self.teachers):
            teacher.eval()
            if self.route is None:
                rows = None
            else:
                rows = (self.route == k).nonzero().squeeze(-1)
                if len(rows) == 0:
                    self._steppers.append(None)  # type: ignore[arg-type]
                    continue
            self._steppers.append(_RowStepper(teacher, rows, config.use_cache))

    def __call__(self, student_logits: Tensor, state: DecodeState) -> Mixed:
        if self._config is None:
            raise RuntimeError("Interleave used outside generate (begin() was not called)")
        vocab = student_logits.shape[-1]
        parts: list[tuple[Tensor | None, Tensor]] = []
        for stepper in self._steppers:
            if stepper is not None:
                logits = stepper.next_logits(state)
                vocab = min(vocab, logits.shape[-1])
                parts.append((stepper.rows, logits))
        log_q = _log_probs(student_logits[..., :vocab], state.temperature)
        log_p = log_q.clone()  # rows without a teacher: their own distribution, never rejected
        covered = torch.zeros(len(log_q), dtype=torch.bool, device=log_q.device)
        for rows, logits in parts:
            lp = _log_probs(logits[..., :vocab], state.temperature)
            if rows is None:
                log_p, covered[:] = lp, True
            else:
                log_p[rows], covered[rows] = lp, True
        self._log_p, self._covered = log_p, covered
        return Mixed(logprobs=log_q, student_logprobs=log_q, teacher_logprobs=log_p)

    def verify(self, token: Tensor, dist: Tensor, state: DecodeState,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor | None]:
        assert self._log_p is not None and self._covered is not None and self._config is not None
        log_p = self._log_p
        kth = log_p.topk(min(self.top_k, log_p.shape[-1]), dim=-1).values[:, -1]
        proposed = log_p.gather(-1, token[:, None]).squeeze(-1)
        rejected = (proposed < kth) & self._covered & ~state.finished
        if not bool(rejected.any()):
            return token, dist, rejected
        teacher = log_p[rejected]
        config = self._config
        if config.greedy:
            drawn = teacher.argmax(-1)
        else:
            if config.top_k > 0 or config.top_p < 1.0:
                teacher = filter_log_probs(teacher, config.top_k, config.top_p)
            drawn = sample_from_log_probs(teacher, generator)
        token, dist = token.clone(), dist.clone()
        token[rejected] = drawn
        dist[rejected] = teacher
        return token, dist, rejected

    def end(self) -> None:
        self._steppers, self._log_p, self._covered, self._config = [], None, None, None
        for teacher, mode in zip(self.teachers, self._modes):
            teacher.train(mode)


def teachers_and_route(teachers: Any, batch: dict[str, Tensor]) -> tuple[list[nn.Module], Tensor | None]:
    """The models and each row's teacher for ``batch``: a :class:`kd.teachers.Teachers`
    (one, or routed by ``teacher_index``), or one plain model (every row)."""
    from kd.teachers import Teachers

    if isinstance(teachers, Teachers):
        models = [m for _, m in teachers.items()]
        return models, (teachers.route(batch) if teachers.routed else None)
    return [teachers], None
