"""The run's teachers: one model, or several that batches route their rows to.

:class:`Teachers` owns everything that makes a model a teacher:

* it is frozen: ``requires_grad=False`` on every parameter, and in eval mode whatever
  mode the recipe around it is switched to (no dropout, ever);
* routing: with several named teachers (``teachers:`` in the config) each row of a batch
  names its teacher in ``teacher_index`` (its position among the sorted names; -1: none).
  :meth:`Teachers.outputs` runs each teacher once, on its own rows, and never mixes two
  teachers' distributions;
* coverage: the :class:`kd.signals.Outputs` it returns carry a ``mask`` that already
  leaves out the rows without a teacher, and the divergences, given those outputs as the
  teacher, compare only the positions in that mask. A recipe therefore cannot pull rows
  without a teacher toward the placeholder logits they hold;
* where the signal comes from: a batch that carries the teacher already (the logit cache's
  top-k, ``teacher_topk``) is answered from the batch and runs no model; a served teacher
  (:class:`kd.served.ServedTeacher`, a vLLM server) answers with its top-k and tail
  (:class:`kd.signals.TopK`), and routed teachers may each be their own server (their rows'
  top-k are merged; a mix of served and in-process routes is refused, their signals differ);
* privileged prompts: a batch that carries ``privileged_prompt_ids`` (what the teacher sees
  instead of the prompt: a rule, the reference answer, :mod:`kd.privileged`) is run as its
  teacher view, the privileged prompt followed by the batch's responses
  (:func:`kd.batches.privileged_view`), and the teacher's outputs are moved back to the
  batch's response positions (:func:`kd.batches.realign`), so the divergences compare the
  two models' distributions at the same response tokens;
* teachers that follow the student (a self-teacher, :class:`kd.privileged.SelfTeacher`): a
  model with ``bind_student(student)`` is given the student when the recipe is built,
  ``start_from_student()`` when training starts (a frozen or EMA copy takes the student's
  weights, once), ``follow_student()`` after every optimizer step (the EMA), and when it
  sets ``checkpointed`` its state is kept in checkpoints (it cannot be rebuilt from
  elsewhere; :meth:`Teachers.checkpointed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from kd import ConfigError
from kd.batches import (IGNORE_INDEX, PRIVILEGED_PROMPT_IDS, TEACHER_INDEX, TEACHER_TOPK, batch_targets,
                        privileged_view, realign)
from kd.models import freeze
from kd.served import served
from kd.signals import Outputs, TopK

#: runs one model on a batch: ``call(model, batch, hidden, fused) -> Outputs``
ModelCall = Callable[[nn.Module, dict[str, Tensor], bool, bool], Outputs]

SINGLE = "teacher"


class Teachers(nn.Module):
    """One frozen teacher, or several routed ones (a mapping of names to models)."""

    def __init__(self, teachers: nn.Module | Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.routed = isinstance(teachers, Mapping)
        if self.routed and not teachers:
            raise ConfigError("the run names an empty mapping of teachers; name at least one under teachers:")
        models = {k: teachers[k] for k in sorted(teachers)} if self.routed else {SINGLE: teachers}
        self.models = nn.ModuleDict({name: freeze(model) for name, model in models.items()})

    @property
    def names(self) -> list[str]:
        """The teachers' names, in the order ``teacher_index`` counts (sorted)."""
        return list(self.models)

    @property
    def single(self) -> nn.Module | None:
        """The teacher of a run with one (None when routed)."""
        return None if self.routed else self.models[SINGLE]

    def items(self) -> list[tuple[str, nn.Module]]:
        return list(self.models.items())

    def bind_student(self, student: nn.Module) -> None:
        """Give the student to the teachers that follow it (``bind_student``); they stay frozen."""
        for model in self.models.values():
            if hasattr(model, "bind_student"):
                model.bind_student(student)
                freeze(model)

    def start_from_student(self) -> None:
        """Training starts: teachers that follow the student take its weights (``start_from_student``)."""
        for model in self.models.values():
            if hasattr(model, "start_from_student"):
                model.start_from_student()

    def follow_student(self) -> None:
        """After an optimizer step: teachers that follow the student update (``follow_student``)."""
        for model in self.models.values():
            if hasattr(model, "follow_student"):
                model.follow_student()

    def checkpointed(self) -> list[str]:
        """Names of the teachers whose state checkpoints keep (``checkpointed``: a frozen or
        EMA copy of the student); the others are dropped on save and restored on load."""
        return [name for name, model in self.models.items() if getattr(model, "checkpointed", False)]

    def train(self, mode: bool = True) -> Teachers:
        """Teachers stay in eval mode whatever the recipe is switched to."""
        return super().train(False)

    def route(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B,)`` each row's teacher (its position among :attr:`names`; -1: none)."""
        if not self.routed:
            first = next(v for v in batch.values() if torch.is_tensor(v))
            return torch.zeros(len(first), dtype=torch.long, device=first.device)
        if TEACHER_INDEX not in batch:
            raise ConfigError("this run has several teachers but its batches say nothing of which teacher each "
                              "example belongs to; route them with data.routes={<skill>: <teacher name>, ...}")
        return batch[TEACHER_INDEX]

    def covered(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B,)`` bool: the rows that have a teacher."""
        return self.route(batch) >= 0

    def examples(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows of ``batch`` per teacher name (for ``train/<teacher>/examples``)."""
        route = self.route(batch)
        return {name: (route == k).sum() for k, name in enumerate(self.names)}

    @torch.no_grad()
    def outputs(self, batch: dict[str, Tensor], call: ModelCall, hidden: bool = False,
                fused: bool = False) -> Outputs:
        """The teachers' :class:`Outputs` on ``batch``, its mask restricted to the rows that
        have a teacher. ``call`` runs one model (the recipe's model call, so the teacher's
        logits are aligned and cut exactly as the student's); ``fused`` is honoured for a
        single teacher (routed teachers' rows are merged into dense logits)."""
        if TEACHER_TOPK in batch and not hidden:
            return Outputs(batch[TEACHER_TOPK], *batch_targets(batch))
        def run(model: nn.Module, rows: dict[str, Tensor], fuse: bool) -> Outputs:
            if PRIVILEGED_PROMPT_IDS in rows:  # the teacher's view, then back to the rows' positions
                view, shift = privileged_view(rows)
                return realign(call_one(model, view, fuse), shift, rows)
            return call_one(model, rows, fuse)

        def call_one(model: nn.Module, rows: dict[str, Tensor], fuse: bool) -> Outputs:
            if served(model):
                if hidden:
                    raise ConfigError("a served teacher gives no hidden states; use an in-process teacher "
                                      "(teacher=hf) for a recipe that distils them")
                return model.outputs(rows)
            return call(model, rows, hidden, fuse)

        if not self.routed:
            return run(self.models[SINGLE], batch, fused)
        if len({served(m) for m in self.models.values()}) > 1:
            raise ConfigError("routed teachers must all be served (top-k) or all in-process (logits), not a mix; "
                              "serve every route's teacher, or none")
        route = self.route(batch)
        merged: Outputs | None = None
        for k, model in enumerate(self.models.values()):
            rows = (route == k).nonzero().squeeze(-1)
            if len(rows) == 0:
                continue
            part = run(model, {key: v[rows] for key, v in batch.items() if torch.is_tensor(v)}, False)
            if merged is None:
                merged = _placeholder(part, len(route))
            if isinstance(part.logits, TopK):
                if part.logits.shape[-1] != merged.logits.shape[-1]:
                    raise ConfigError("routed served teachers must give the same top_k; set teacher.top_k alike")
                merged.logits.ids[rows], merged.logits.logprobs[rows] = part.logits.ids, part.logits.logprobs
            else:
                merged.logits[rows] = part.logits
            merged.labels[rows], merged.mask[rows] = part.labels, part.mask
            if part.hidden is not None:
                merged.hidden[rows] = part.hidden
        if merged is None:  # no row has a teacher: placeholders of the right shape, an empty mask
            merged = _placeholder(run(next(iter(self.models.values())), batch, False), len(route))
            merged.labels = batch_targets(batch)[0]
        return merged


def _placeholder(like: Outputs, rows: int) -> Outputs:
    """Zero logits (and hidden states), an empty mask and no labels for ``rows`` rows shaped
    like ``like``: what rows without a teacher hold."""
    size = (rows, *like.logits.shape[1:])
    hidden = None if like.hidden is None else like.hidden.new_zeros((rows, *like.hidden.shape[1:]))
    if isinstance(like.logits, TopK):  # filler: uniform over k ids (the mask drops it)
        k = size[-1]
        ids = torch.arange(k, device=like.logits.ids.device).expand(size).clone()
        logits = TopK(ids, like.logits.logprobs.new_full(size, -math.log(k)), like.logits.tail)
    else:
        logits = like.logits.new_zeros(size)
    return Outputs(logits, like.labels.new_full(size[:-1], IGNORE_INDEX), like.mask.new_zeros(size[:-1]), hidden)


__all__ = ["Teachers", "ModelCall"]
