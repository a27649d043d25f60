"""The shared skeleton of every recipe: :class:`DistillationRecipe` (a LightningModule).

A recipe subclass adds only what is specific to its paper, usually :meth:`compute_loss`.
A recipe declares what it needs in one small typed spec, :class:`Needs` (a teacher, a
divergence, hidden states, the teacher's own tokenizer, its own optimisation loop, the
regimes it accepts); the composition root (:mod:`kd.build`) reads that spec and nothing
else about the recipe. The base class owns everything recipes share:

* the data regime (:mod:`kd.regimes`): prepared when training starts (given the
  :class:`kd.teachers.Teachers` when it ``routes_teachers``, else the single teacher),
  applied to every training batch (offline, teacher-generated, on-policy, mixed,
  speculative, adaptive), told the training progress before each batch and the validation
  values after each validation, its ``metrics()`` logged as ``train/regime/<name>`` (the
  step's value) and ``train/regime/<name>_epoch`` (the epoch's mean over every batch),
  its state (a mixed regime's coin, an adaptive one's buffer) saved in checkpoints;
* the teachers (:class:`kd.teachers.Teachers`: one, or several named ones that batches
  route their rows to with ``teacher_index``): frozen (``requires_grad=False``), kept in
  eval mode even while the student trains, run under ``torch.no_grad``, absent from the
  optimizer and from saved checkpoints (their entries are dropped on save and restored
  from the live teachers on load, so checkpoints stay small and loading stays strict;
  a frozen or EMA copy of the student, ``teacher=self``, is kept: :mod:`kd.privileged`).
  A teacher made of the student is bound to it here, takes its weights when training
  starts and follows its optimizer steps (:class:`kd.teachers.Teachers`).
  :meth:`teacher_outputs` gives their outputs with the mask already restricted to rows
  that have a teacher, in the forms the recipe's loss declares it takes
  (``Needs.teacher_signals``); ``train/<teacher>/examples`` is logged for routed runs;
* model calls (:meth:`outputs`): one place that knows the batch format and returns an
  :class:`kd.signals.Outputs`: logits ``(..., V)``, gold labels ``(...)``, the mask of positions that
  count and, when asked, the last hidden states ``(..., H)``;
* logging: every loss term under ``train/<name>``, targets per second, and per-epoch
  validation/test metrics from :class:`kd.evaluation.StageMetrics`, computed from the
  student's hidden states and head a block of positions at a time when its head is linear
  and the recipe's fused path is on (:attr:`DistillationRecipe.fused_student`);
* exact means under gradient accumulation and data parallelism: a recipe whose loss is a
  mean over items (tokens, sequences) returns their count as ``num_items``; with
  ``accumulate_grad_batches > 1`` or several processes (DDP) the micro-batch losses are
  then summed, the items of the whole accumulation window are summed over the ranks
  (one all-reduce of a scalar), and before the optimizer step (and before gradient
  clipping) the synchronised gradient is rescaled to the mean over those global items. So
  2 x half a batch, or 2 ranks x half a batch, give the full batch's gradient even when
  the halves hold different numbers of tokens (Lightning's averaging of micro-batch means
  and DDP's averaging of rank means do not). A loss made of terms that average over
  different items (Hinton's hard term counts labelled tokens, the soft term every token
  in the mask) reports the items of its main term; the other term is then weighted by
  each part's share of those items, exact when the parts label the same share;
* several processes (``trainer=ddp``): caches a regime builds before training (teacher
  responses, teacher logits) are built by each machine's first rank while the others
  wait at a barrier and then read them; held-out metrics and generated answers are
  merged over the ranks, so every rank reports the metrics of the whole split;
* a guard that stops training with a clear message on a NaN/inf loss (checkpoints
  already written are kept);
* randomness per batch: torch is reseeded before every training batch from the run's
  seed, the epoch, the batch and the rank, so a resumed run repeats what the uninterrupted
  one did (:mod:`kd.resume`);
* optimizer and scheduler built from config factories (Hydra ``_partial_``);

Adding a recipe: subclass, set ``needs`` when it differs from the default (a teacher,
nothing else), implement ``compute_loss(batch) -> {"loss": ..., <terms>}``, add one yaml
under ``conf/recipe/``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from kd import ConfigError, batches
from kd.checks import check_recipe
from kd.data import IGNORE_INDEX
from kd.divergences import Divergence
from kd.evaluation import GeneratedAnswers, StageMetrics
from kd.regimes import Offline, Regime
from kd.resume import run_seed, step_seed
from kd.signals import SIGNAL_FORMS, Outputs
from kd.teachers import Teachers

# the frozen teacher is in eval mode on purpose
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
def non_finite_advice(precision: str | None) -> str:
    """What to try after a non-finite training loss, for the run's ``trainer.precision``:
    fp16 overflows past 65504, bf16 keeps float32's range (so float32 rarely helps it)."""
    p = str(precision or "")
    if p.startswith("16"):
        return ("lower optimizer.lr, set trainer.gradient_clip_val, or train in precision=bf16-mixed (fp16 overflows "
                "past 65504) or 32-true")
    if p == "bf16-true":
        return ("lower optimizer.lr, set trainer.gradient_clip_val, or train in precision=bf16-mixed (float32 weights "
                "and optimizer state)")
    if p.startswith("bf16"):
        return ("lower optimizer.lr or set trainer.gradient_clip_val (bf16 has float32's range, so precision=32-true "
                "rarely helps)")
    return "lower optimizer.lr or set trainer.gradient_clip_val"


SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio * total_steps`` steps, then cosine decay to
    ``min_lr_ratio`` times the base learning rate at ``total_steps``."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Needs:
    """What a recipe needs from the run, declared once per recipe class (``needs = Needs(...)``)
    and read generically by :mod:`kd.build` and this base class.

    Args:
        teacher: ``True``: the recipe distils from a teacher (``teacher=`` must name one);
            ``False``: it has none (the no-teacher baseline); ``"optional"``: it uses one when
            the run names one (a pipeline's first stage has nothing to distil from).
        divergence: the recipe's loss uses the ``divergence/`` group; a divergence given to a
            recipe that does not is refused (it would change nothing).
        hidden_states: :meth:`DistillationRecipe.outputs` also returns the last hidden states.
        teacher_tokenizer: ``"shared"`` (teacher, student and data use one tokenizer,
            checked before training) or ``"own"`` (the teacher keeps its own: the datamodule
            is given it and batches carry the prompts in its tokens).
        own_loop: the recipe runs its own optimisation loop (manual optimisation, e.g. PPO
            epochs over a rollout buffer; :func:`kd.policy.buffer_updates`).
        student_dropout: whether the student trains with its dropout on (train mode). False:
            the student runs in eval mode during training steps, so its on-policy samples and
            the loss see the same network. Set on every training batch (Lightning never
            calls ``train()`` during ``fit``).
        regimes: names of the data regimes the recipe accepts (None: any).
        data: the kinds of models and data it distils (:data:`kd.models.KINDS`, e.g.
            ``("causal_lm",)``; None: any).
        teacher_signals: the forms of the teacher's signal its loss takes
            (:data:`kd.signals.SIGNAL_FORMS`): ``logits`` (a dense tensor, always given when
            nothing else is), ``head`` (hidden states and head: the fused path of a chunked
            divergence), ``topk`` (a cached or served top-k with its tail bin). A loss that
            only hands the teacher to the divergence takes all three; the default, dense
            logits only, is safe for a loss that reads the tensor itself. A run whose regime
            gives a form the loss does not take (``regime=teacher_logits`` gives ``topk``)
            is refused before training.
        loss_temperature: the name of the recipe's argument that holds its loss
            temperature (None: the loss runs at T = 1). A teacher cache is stored at that
            temperature, so it must be known before the recipe is built.
    """

    teacher: bool | str = True
    divergence: bool = False
    hidden_states: bool = False
    teacher_tokenizer: str = "shared"
    own_loop: bool = False
    student_dropout: bool = True
    regimes: tuple[str, ...] | None = None
    data: tuple[str, ...] | None = None
    teacher_signals: tuple[str, ...] = ("logits",)
    loss_temperature: str | None = None

    def __post_init__(self) -> None:
        if self.teacher not in (True, False, "optional"):
            raise ValueError(f"Needs.teacher must be True, False or 'optional' (got {self.teacher!r})")
        if self.teacher_tokenizer not in ("shared", "own"):
            raise ValueError(f"Needs.teacher_tokenizer must be 'shared' or 'own' (got {self.teacher_tokenizer!r})")
        unknown = set(self.teacher_signals) - set(SIGNAL_FORMS)
        if unknown or "logits" not in self.teacher_signals:
            raise ValueError(f"Needs.teacher_signals must hold 'logits' and only forms among {SIGNAL_FORMS} "
                             f"(got {self.teacher_signals!r})")


def check_finite(terms: Mapping[str, Tensor], step: int, precision: str | None = None,
                 clipping: str = "trainer.gradient_clip_val") -> None:
    """Stop training with one sentence when ``terms["loss"]`` is NaN or infinite; every term
    is named in it, and the advice fits the run's ``precision`` (:func:`non_finite_advice`).
    ``clipping`` is the setting that clips this loop's gradients."""
    if not torch.isfinite(terms["loss"]):
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        advice = non_finite_advice(precision).replace("trainer.gradient_clip_val", clipping)
        raise FloatingPointError(f"the training loss is not finite at step {step} ({detail}); {advice} "
                                 "(checkpoints so far are kept)")


class DistillationRecipe(L.LightningModule):
    """Base class of every recipe.

    Args:
        student: the model being trained.
        teacher: the frozen teacher, or a mapping of names to teachers that batches route
            their rows to (``teacher_index``, the position of the row's teacher among the
            sorted names; -1: none), or ``None`` for recipes whose ``needs.teacher`` is False.
        divergence: the distribution distance from the ``divergence/`` group (recipes whose
            ``needs.divergence`` is set; others refuse one).
        optimizer: factory ``params -> Optimizer`` (default: conf/train.yaml's, AdamW lr 3e-3 without weight decay).
        scheduler: optional factory ``(optimizer, total_steps) -> LRScheduler``, stepped
            every optimizer step.
        regime: whose sequences a step trains on (:mod:`kd.regimes`; default offline).
    """

    #: what the recipe needs from the run (see :class:`Needs`)
    needs: ClassVar[Needs] = Needs()

    @property
    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps per training batch (1; recipes with inner loops, e.g. PPO
        epochs, override it so the scheduler spans the real number of steps)."""
        return 1

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Mapping[str, nn.Module] | None = None,
        divergence: Divergence | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        regime: Regime | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        regime = regime or Offline()
        check_recipe(name, self.needs, teacher=teacher is not None, routed=isinstance(teacher, Mapping),
                     divergence=type(divergence).__name__ if divergence is not None else None, regime=regime)
        self.student = student
        #: the run's teachers (one, or routed; frozen, always in eval mode); None without one
        self.teachers: Teachers | None = Teachers(teacher) if teacher is not None else None
        if self.teachers is not None:
            self.teachers.bind_student(student)  # a teacher made of the student itself (kd.privileged.SelfTeacher)
        self.divergence = divergence
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)
        self.scheduler_factory = scheduler
        self.regime = regime
        self.automatic_optimization = not self.needs.own_loop
        routes = self.teachers.names if self.teachers is not None and self.teachers.routed else None
        self.metrics = nn.ModuleDict({"val": StageMetrics(routes), "test": StageMetrics(routes)})
        self._step_started: float | None = None
        self._num_targets = torch.zeros(())
        #: the tokenizer's true vocabulary size; logits are cut to it (see set_vocabulary)
        self.vocab_size: int | None = None
        self._answers = GeneratedAnswers()  # greedy answers to held-out prompts
        self._window_items: float | None = None  # items (num_items) of this rank's accumulation window
        self._planned_steps: int | None = None  # optimizer steps the trainer plans (the regime's progress)
        self._steps_before_batch: int | None = None  # global_step when the current training batch started

    # ------------------------------------------------------------------ model calls

    #: the fused path's switch of a recipe without a divergence (one with a divergence follows
    #: ``divergence.chunked``); recipes that take it as an argument set it (``recipe.chunked``)
    chunked: bool = True

    @property
    def fused_student(self) -> bool:
        """Whether the student's logits come as hidden states and head
        (:class:`kd.signals.HeadLogits`, when its head is linear) in the recipe's loss and
        the evaluation metrics: ``divergence.chunked`` for a recipe with a divergence, else
        :attr:`chunked`. The teacher's signal follows :attr:`fused`."""
        if self.divergence is not None:
            return bool(getattr(self.divergence, "chunked", False))
        return bool(self.chunked)

    @property
    def fused(self) -> bool:
        """Whether language models' logits come as hidden states and output head
        (:class:`kd.signals.HeadLogits`): the divergence is chunked (``divergence.chunked``)
        and the recipe's loss takes that form (``head`` in ``needs.teacher_signals``)."""
        return (self.divergence is not None and getattr(self.divergence, "chunked", False)
                and "head" in self.needs.teacher_signals)

    def outputs(self, model: nn.Module, batch: dict[str, Tensor], hidden: bool | None = None,
                fused: bool = False) -> Outputs:
        """Run ``model`` on ``batch``; return its :class:`Outputs`.

        ``labels`` holds gold targets (IGNORE_INDEX where there is none) and ``mask`` the
        positions where a distribution is predicted and compared with the teacher, as
        :func:`kd.batches.batch_targets` aligns them: token batches are shifted (logits and
        hidden states drop the last position, labels the first), masked-LM batches are not,
        classification batches have one position per example. The call itself is
        :func:`kd.batches.outputs`, which the logit cache's teacher pass shares.

        ``hidden`` (default: ``needs.hidden_states``) also returns the last hidden states of
        a transformers model. Logits are cut to ``self.vocab_size`` (the tokenizer's true
        vocabulary) when set, so a model whose output layer is padded past it compares with
        one that is not.

        ``fused``: a causal LM whose logits are a linear head over its last hidden states
        (:func:`kd.models.split_head`, checked once per model) returns ``logits`` as a
        :class:`kd.signals.HeadLogits`: the ``(B, L, V)`` logits are never built, and the
        divergences, :func:`kd.evaluation.cross_entropy` and the evaluation metrics compute
        from the hidden states a block of positions at a time. Other models return logits.
        """
        hidden = self.needs.hidden_states if hidden is None else hidden
        out = batches.outputs(model, batch, hidden=hidden, fused=fused, vocab_size=self.vocab_size)
        if model is self.student and self.training:
            self._num_targets = out.mask.sum()  # for train/targets_per_s
        return out

    @property
    def datamodule(self) -> Any:
        """The datamodule of the trainer this recipe is attached to (None when detached)."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    @property
    def teacher(self) -> nn.Module | None:
        """The teacher of a run with one (None with routed teachers or without any)."""
        return self.teachers.single if self.teachers is not None else None

    def teacher_outputs(self, batch: dict[str, Tensor], hidden: bool | None = None,
                        fused: bool | None = None) -> Outputs:
        """The teachers' :class:`Outputs` for ``batch`` (no grad, eval mode), their ``mask``
        restricted to the rows that have a teacher (:class:`kd.teachers.Teachers`).

        ``logits`` takes only the forms this recipe declares in ``needs.teacher_signals``:
        hidden states and head (``head``) when the divergence is chunked (``fused``,
        default :attr:`fused`), a cached top-k (``topk``) when the batch carries one;
        otherwise dense logits."""
        if self.teachers is None:
            raise ConfigError(f"recipe {type(self).__name__} asked for a teacher's outputs but the run has no "
                              "teacher; choose one with teacher=<config>")
        if batches.TEACHER_TOPK in batch and "topk" not in self.needs.teacher_signals:
            raise ConfigError(f"recipe {type(self).__name__}'s loss does not take a cached top-k teacher; use "
                              "regime=offline (or declare 'topk' in its Needs.teacher_signals)")
        fused = self.fused if fused is None else fused
        hidden = self.needs.hidden_states if hidden is None else hidden
        return self.teachers.outputs(batch, self.outputs, hidden, fused and "head" in self.needs.teacher_signals)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.outputs(self.student, batch, hidden=False).logits

    def setup(self, stage: str) -> None:
        """Take the true vocabulary size from the datamodule's tokenizer, if it has one."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and self.vocab_size is None:
            self.set_vocabulary(len(tokenizer))

    def set_vocabulary(self, vocab_size: int) -> None:
        """Cut logits to the tokenizer's ``vocab_size`` tokens; refuse models whose
        embedding table is smaller (their lookups of high ids would fail). A
        cross-tokenizer recipe's teacher is checked against its own tokenizer instead."""
        shared = self.needs.teacher_tokenizer == "shared"
        teachers = self.teachers.items() if self.teachers is not None and shared else []
        models = [("student", self.student), *teachers]
        for role, model in models:
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            rows = getattr(embeddings, "num_embeddings", None)
            if model is not None and rows is not None and rows < vocab_size:
                raise ConfigError(
                    f"the {role} has {rows} embedding rows but the tokenizer {vocab_size} tokens; "
                    f"give the {role} a vocabulary at least as large as the tokenizer's"
                )
        self.vocab_size = vocab_size

    def check_data(self, datamodule: Any) -> None:
        """Refuse, with one sentence, data this recipe's settings cannot train on (called by
        :func:`kd.build.build` before anything trains; the datamodule is not set up yet)."""

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Return ``{"loss": total, <term>: value, ...}``; every entry is logged. A loss
        that is a mean over items may add ``"num_items"`` (their count, not logged) to be
        exact under gradient accumulation (see the module docstring)."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        """Prepare the regime (its caches); under several processes each machine's first
        rank builds them while the other ranks wait, then read what it built."""
        if self.teachers is not None:  # teachers that follow the student take its weights (once)
            self.teachers.start_from_student()
        # a regime that routes rows to their teachers gets them all (kd.teachers.Teachers)
        teacher = self.teachers if getattr(self.regime, "routes_teachers", False) else self.teacher
        if self.trainer.world_size == 1:
            self.regime.prepare(teacher, self.datamodule)
            return
        first = self.trainer.local_rank == 0
        if first:
            self.regime.prepare(teacher, self.datamodule)
        self.trainer.strategy.barrier("kd-regime-caches")
        if not first:
            self.regime.prepare(teacher, self.datamodule)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._trainer is not None and hasattr(self.regime, "set_progress"):
            if self._planned_steps is None:
                planned = float(self.trainer.estimated_stepping_batches)
                self._planned_steps = int(planned) if math.isfinite(planned) else 0  # 0: open-ended
            self.regime.set_progress(self.global_step, self._planned_steps)
        batch = self.regime.batch(self.student, batch, self.datamodule)
        terms = self.compute_loss(batch)
        num_items = terms.pop("num_items", None)
        loss = terms["loss"]
        check_finite(terms, self.global_step, getattr(self._trainer, "precision", None))
        n = self._batch_size(batch)
        for key, value in self.regime.metrics().items():  # e.g. the rollout engine's staleness
            self.log(f"train/regime/{key}", float(value), batch_size=n)  # every log_every_n_steps
            self.log(f"train/regime/{key}_epoch", float(value), on_step=False, on_epoch=True, batch_size=n)
        for key, value in terms.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key == "loss", batch_size=n)
        if self.teachers is not None and self.teachers.routed and batches.TEACHER_INDEX in batch:
            for name, rows in self.teachers.examples(batch).items():
                self.log(f"train/{name}/examples", rows.float(), batch_size=n, reduce_fx="sum")
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        if num_items is not None and self._rescaled():
            self._window_items = (self._window_items or 0.0) + float(num_items)
            return loss * num_items  # a sum; divided by the global items in on_before_optimizer_step
        return loss

    def _rescaled(self) -> bool:
        """Whether losses with ``num_items`` are summed and rescaled at the optimizer step
        (gradient accumulation or several processes; automatic optimisation only)."""
        return (self._trainer is not None and self.automatic_optimization
                and (self.trainer.accumulate_grad_batches > 1 or self.trainer.world_size > 1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the summed micro-batch losses into the mean over the items of the global
        accumulation window: Lightning divided each by ``accumulate_grad_batches`` and DDP
        averaged the ranks, so scale by N * W / (items summed over the ranks)."""
        if self._window_items is not None and self._rescaled():
            world, items = self.trainer.world_size, self._window_items
            if world > 1:
                total = torch.tensor(items, dtype=torch.float64, device=self.device)
                items = float(self.trainer.strategy.reduce(total, reduce_op="sum"))
            if items > 0:
                scale = self.trainer.accumulate_grad_batches * world / items
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.mul_(scale)
        self._window_items = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed torch from the run's seed, the epoch, the batch and the rank
        (:func:`kd.resume.step_seed`): a batch's dropout and samples are the same whether
        or not the run was stopped and resumed before it. Put the student in the mode its
        recipe trains in (``needs.student_dropout``): Lightning never calls ``train()`` during
        ``fit``, and a student loaded with ``from_pretrained`` starts in eval mode."""
        torch.manual_seed(step_seed(run_seed(), self.current_epoch, batch_idx, self.global_rank))
        self.student.train(self.needs.student_dropout)
        self._steps_before_batch = self.global_step
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = self._steps_before_batch is not None and self.global_step > self._steps_before_batch
        if stepped and self.teachers is not None:  # an EMA teacher follows the student's optimizer steps
            self.teachers.follow_student()
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            rate = self._num_targets.float() / max(elapsed, 1e-9)
            self.log("train/targets_per_s", rate, batch_size=self._batch_size(batch))

    @staticmethod
    def _batch_size(batch: dict[str, Tensor]) -> int:
        return len(next(iter(batch.values())))

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        if batches.is_prompts_only(batch):  # prompts only: score generated answers
            self._generation_eval_step(stage, batch)
            return
        out = self.outputs(self.student, batch, hidden=False, fused=self.fused_student)
        same_tokens = self.teacher is not None and self.needs.teacher_tokenizer == "shared"  # one teacher
        teacher = self.teacher_outputs(batch, hidden=False).logits if same_tokens else None
        self.metrics[stage].update(out.logits, out.labels, out.mask, teacher)
        if (self.teachers is not None and self.teachers.routed and self.needs.teacher_tokenizer == "shared"
                and batches.TEACHER_INDEX in batch):  # each routed teacher's KL on its own rows
            routed = self.teacher_outputs(batch, hidden=False)
            self.metrics[stage].update_routes(out.logits, routed.logits, out.mask & routed.mask,
                                              self.teachers.route(batch))

    def _generation_eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        """Greedy answers to held-out prompts (the teacher's too at test time)."""
        dm = self.trainer.datamodule
        self._answers.answer(stage, self.student, batch["prompt_ids"], batch["prompt_mask"], dm.tokenizer,
                             batch["index"], dm.max_new_tokens)
        if stage == "test" and self.teacher is not None:
            prompt_ids, prompt_mask, tok = self.teacher_prompts(batch, dm.tokenizer)
            self._answers.answer("teacher", self.teacher, prompt_ids, prompt_mask, tok, batch["index"],
                                 dm.max_new_tokens)

    def teacher_prompts(self, batch: dict[str, Tensor], tokenizer: Any) -> tuple[Tensor, Tensor, Any]:
        """``(prompt_ids, prompt_mask, tokenizer)`` the teacher answers test prompts with:
        the data's, or the privileged prompts the batch carries for the teacher (a recipe
        whose teacher keeps its own tokenizer overrides this)."""
        if batches.PRIVILEGED_PROMPT_IDS in batch:
            return batch[batches.PRIVILEGED_PROMPT_IDS], batch[batches.PRIVILEGED_PROMPT_MASK], tokenizer
        return batch["prompt_ids"], batch["prompt_mask"], tokenizer

    def _eval_epoch_end(self, stage: str) -> None:
        values = self.metrics[stage].compute()  # torchmetrics: merged over the ranks
        world = self.trainer.world_size
        values.update(self._answers.scores(stage, getattr(self.trainer, "datamodule", None), world))
        for key, value in values.items():
            self.log(f"{stage}/{key}", value, prog_bar=key in ("acc", "loss", "exact_match"), add_dataloader_idx=False,
                     sync_dist=world > 1)  # the same value on every rank
        self.metrics[stage].reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")
        if self._trainer is not None and not self.trainer.sanity_checking and hasattr(self.regime, "on_validation"):
            logged = self.trainer.callback_metrics
            self.regime.on_validation({k: float(v) for k, v in logged.items() if k.startswith("val/")})

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ modes and checkpoints

    def train(self, mode: bool = True) -> DistillationRecipe:
        """Switch the student's mode (in training, the one ``needs.student_dropout`` says); the
        teachers always stay in eval mode (:class:`kd.teachers.Teachers`)."""
        super().train(mode)
        if mode and not self.needs.student_dropout:
            self.student.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold what trains: the teacher's entries are dropped (but for a teacher
        that follows the student, a frozen or EMA copy of it, :meth:`kd.teachers.Teachers.checkpointed`),
        and so are an adapted student's frozen weights (only its adapters stay, :mod:`kd.adapters`)."""
        from kd.adapters import frozen_keys

        state = checkpoint.get("state_dict", {})
        frozen = {f"student.{k}" for k in frozen_keys(self.student)}
        kept = tuple(f"teachers.models.{name}." for name in (self.teachers.checkpointed() if self.teachers else []))
        for key in [k for k in state if (k.startswith("teachers.") and not k.startswith(kept)) or k in frozen]:
            del state[key]
        checkpoint["kd_regime"] = self.regime.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from kd.adapters import frozen_keys

        self.regime.load_state_dict(checkpoint.get("kd_regime") or {})
        state = checkpoint.setdefault("state_dict", {})
        if self.teachers is not None:
            for key, value in self.teachers.state_dict().items():
                state.setdefault(f"teachers.{key}", value)
        live = self.student.state_dict()
        for key in frozen_keys(self.student):  # an adapted student's frozen weights: the live ones
            state.setdefault(f"student.{key}", live[key])

    # ------------------------------------------------------------------ optimisation

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: everything with ``requires_grad`` (the frozen
        teacher never is). Recipes with extra trainable heads get them for free."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches) * self.optimizer_steps_per_batch
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["DistillationRecipe", "Needs", "IGNORE_INDEX", "check_finite", "warmup_cosine"]
