"""Privileged-context self-distillation: the student is its own teacher, and only the
teacher sees a privileged context in front of its prompt (OPSD and SDFT, in the framing of
"The Many Faces of On-Policy Distillation", 2026).

Algorithm (``teacher=self`` with ``recipe=gkd`` and ``regime=on_policy``;
``experiment=task_self_distill``). For each training batch of prompts ``x``, each with its
privileged context ``c``:

1. the student samples a response ``y ~ p_S(. | x)`` (no gradient through sampling);
2. the teacher reads ``c`` then ``x`` then the same ``y`` (:func:`kd.batches.privileged_view`),
   and its next-token distributions are moved back onto the student's response positions
   (:func:`kd.batches.realign`);
3. the loss is the divergence group's ``D(p_T(. | c, x, y_<t) || p_S(. | x, y_<t))``, summed
   over the vocabulary and averaged over the response tokens (or per sequence).

The teacher ``p_T`` is the student's own network (:class:`SelfTeacher`, ``teacher.mode``):

* ``frozen``: a copy of the student's weights when training starts (after its SFT), never
  updated;
* ``ema``: the same copy, then after every optimizer step
  ``theta_T <- d * theta_T + (1 - d) * theta_S`` with ``d = teacher.ema_decay``;
* ``live``: the student's current weights, run in eval mode under ``torch.no_grad`` (a
  stop-gradient: the loss's gradient flows through the student's side only).

The privileged context (``teacher.context``, :class:`PrivilegedContext`), prepended to the
teacher's prompt only (inside the chat template's user turn when the tokenizer has one):

* ``rule``: the skill's rule in words (:data:`kd.data.tasks.RULES`, e.g. ``spell it
  backwards`` for ``reverse``; ``teacher.rules`` gives others): a latent rule shared by
  every example of the skill;
* ``reference``: the example's reference answer (``answer <response>``): instance-specific.

The paper's test: self-distillation helps when the privileged information is a shared
latent rule, and collapses towards an average policy when it is instance-specific.

Deviations and choices:

* the papers' students are pretrained instruction-following LLMs, which can read a context
  they were never trained with; the embedded task's SFT student has seen only the task's
  prompts, so whether it can use a context at all is part of what is measured (the teacher's
  own greedy answers with the context are scored at test time, ``test/teacher_exact_match``);
* the task's prompts already name their skill in one of three phrasings, so the ``rule``
  context restates what the prompt says in other (mostly in-vocabulary) words rather than
  revealing a hidden rule;
* rule words are the task's instruction words where possible (the task tokenizer is a
  byte-level BPE trained on the task: these words are few tokens, any other text still
  encodes, byte by byte);
* the EMA is updated once per training batch that stepped the optimizer (once per
  optimizer step in automatic optimisation; recipes with their own loop of several steps
  per batch update it once per batch);
* the frozen and EMA copies live in the run's checkpoints (they cannot be rebuilt from
  elsewhere), so a resumed run continues with the same teacher; a live teacher has no state.

Run: ``kd experiment=task_self_distill teacher.mode=ema teacher.context=rule``
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kd import ConfigError

MODES = ("frozen", "ema", "live")
CONTEXTS = ("rule", "reference")


class SelfTeacher(nn.Module):
    """The student as its own teacher: a frozen copy, an EMA of it, or its live weights.

    Built without the student (``teacher.model`` in conf/teacher/self.yaml); the recipe binds
    it to its student (:meth:`kd.teachers.Teachers.bind_student`). Calling it runs :attr:`network`
    (the copy, or the student in eval mode) under ``torch.no_grad``.

    Args:
        mode: ``frozen`` | ``ema`` | ``live`` (see :mod:`kd.privileged`).
        ema_decay: ``d`` of the EMA update, in [0, 1) (read with ``mode=ema`` only).
    """

    def __init__(self, mode: str = "frozen", ema_decay: float = 0.99) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"teacher.mode must be one of {', '.join(MODES)} (got {mode!r})")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ConfigError(f"teacher.ema_decay must be in [0, 1) (got {ema_decay}); 0.99 keeps 1% of the student "
                              "per step")
        self.mode = mode
        self.ema_decay = float(ema_decay)
        #: whether the copy holds the student's starting weights (saved with it in checkpoints)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.copy: nn.Module | None = None
        self._bound: tuple[nn.Module, ...] = ()  # the student, not registered (its weights are not the teacher's)

    @property
    def checkpointed(self) -> bool:
        """A frozen or EMA copy is kept in checkpoints; a live teacher has nothing to keep."""
        return self.mode != "live"

    def bind_student(self, student: nn.Module) -> None:
        """Follow ``student``; a frozen or EMA teacher makes its copy (its weights are taken
        at :meth:`start_from_student`)."""
        self._bound = (student,)
        if self.mode != "live" and self.copy is None:
            self.copy = copy.deepcopy(student)

    @property
    def student(self) -> nn.Module:
        if not self._bound:
            raise ConfigError("teacher=self is the student itself; build it through a recipe, which binds it to "
                              "its student")
        return self._bound[0]

    @property
    def network(self) -> nn.Module:
        """The network the teacher runs: the student (``live``) or its copy."""
        if self.mode == "live":
            return self.student
        self.start_from_student()  # a teacher used before training starts (kd-eval) is the student's copy too
        assert self.copy is not None
        return self.copy

    @torch.no_grad()
    def start_from_student(self) -> None:
        """Copy the student's weights into the frozen/EMA copy, once (a resumed run's copy
        comes from its checkpoint and is kept)."""
        if self.mode == "live" or bool(self.started):
            return
        self.student  # noqa: B018 (refuses an unbound teacher)
        assert self.copy is not None
        self.copy.load_state_dict(self.student.state_dict())
        self.started.fill_(True)

    @torch.no_grad()
    def follow_student(self) -> None:
        """After an optimizer step: ``theta_T <- d * theta_T + (1 - d) * theta_S`` (``ema``;
        buffers are copied); nothing for ``frozen`` and ``live``."""
        if self.mode != "ema":
            return
        self.start_from_student()
        assert self.copy is not None
        student = dict(self.student.named_parameters())  # shared (tied) weights once each
        for name, p in self.copy.named_parameters():
            p.lerp_(student[name].detach().to(p.dtype), 1.0 - self.ema_decay)
        buffers = dict(self.student.named_buffers())
        for name, b in self.copy.named_buffers():
            b.copy_(buffers[name])

    @property
    def forward(self) -> Callable[..., Any]:  # type: ignore[override]
        """The network's own ``forward`` (its signature, which kd's sampler reads), run in
        eval mode without gradient."""
        net = self.network

        @functools.wraps(net.forward)
        def call(*args: Any, **kwargs: Any) -> Any:
            was = net.training
            net.eval()
            try:
                with torch.no_grad():
                    return net(*args, **kwargs)
            finally:
                net.train(was)

        return call

    def extra_repr(self) -> str:
        return f"mode={self.mode}" + (f", ema_decay={self.ema_decay}" if self.mode == "ema" else "")


class PrivilegedContext:
    """What the teacher reads in front of each prompt: ``template`` filled with the example's
    ``context`` and ``prompt`` (see :mod:`kd.privileged`).

    Args:
        kind: ``rule`` (the example's skill's rule in words) or ``reference`` (its answer).
        rules: ``{skill: words}`` for ``rule`` (None: :data:`kd.data.tasks.RULES`).
        template: the teacher's prompt text, from ``{context}`` and ``{prompt}``.
    """

    def __init__(self, kind: str, rules: Mapping[str, str] | None = None,
                 template: str = "{context}\n{prompt}") -> None:
        from kd.data.tasks import RULES

        if kind not in CONTEXTS:
            raise ConfigError(f"teacher.context must be one of {', '.join(CONTEXTS)} or null (got {kind!r})")
        if "{prompt}" not in template or "{context}" not in template:
            raise ConfigError(f"teacher.context_template must hold {{context}} and {{prompt}} (got {template!r})")
        self.kind = kind
        self.rules = dict(RULES if rules is None else rules)
        self.template = template

    def context(self, example: Any) -> str:
        if self.kind == "reference":
            return f"answer {example.response}"
        skill = getattr(example, "skill", None)
        if skill not in self.rules:
            raise ConfigError(f"teacher.context=rule has no rule for skill {skill!r}; give one with "
                              f"teacher.rules={{{skill}: <words>}} or use teacher.context=reference")
        return self.rules[skill]

    def __call__(self, example: Any) -> str:
        """The teacher's prompt text for ``example``."""
        return self.template.format(context=self.context(example), prompt=example.prompt)

    def __repr__(self) -> str:
        return f"PrivilegedContext({self.kind!r})"


__all__ = ["SelfTeacher", "PrivilegedContext", "MODES", "CONTEXTS"]
