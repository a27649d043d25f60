"""On-policy cross-stage self-distillation (GLM-5; docs/spec.md section 6).

Sequential post-training (SFT -> reasoning RL -> agentic RL -> general RL) erodes what
earlier stages built. GLM-5's remedy, as secondary sources describe it: the final
checkpoint of each earlier stage becomes a teacher in later stages, and prompts from that
stage's data are replayed, each routed to its own stage's teacher (never an average of
teachers), with a per-token distillation signal on the student's own samples. The loss of
a training batch is

    L = stage_weight * L_stage + lam * L_replay

* ``L_stage``: the current stage's objective on the batch's rows that have no teacher
  (``teacher_index`` -1), ``stage_objective``:

  - ``sft``: cross-entropy on their dataset responses;
  - ``self_distill``: GLM-4.5's iterative self-distillation, per batch: sample
    ``group_size`` responses per prompt from the current model, keep the one with the
    highest reward (exact match; the first of equals) when it earns any, and train
    cross-entropy on the kept responses only (prompts whose samples all fail are skipped;
    GLM-4.5 does this between RL rounds over its whole dataset, we do it online per batch);
  - ``grpo``: RL with a verifiable reward (GRPO, Shao et al. 2024): ``group_size`` samples
    per prompt, each rewarded against the dataset response (``reward``: ``exact``, 1 when
    the sample's text equals it after stripping whitespace, the embedded task's metric,
    else 0; or ``similarity``, the dense ``1 - Levenshtein(sample, reference) / max(len)``
    over characters, 1 for an exact match, so a student that is not yet right still earns
    a reward that grows as its answers come closer), advantage
    ``(r - mean_group) / (std_group + 1e-4)`` shared by the sample's tokens, the same
    clipped surrogate, averaged over the sampled tokens of the batch (token mean, as in
    DAPO and TRL's default; the GRPO paper averages per sequence first). No KL penalty to a
    reference model.

  Rows of skills routed to a teacher (``data.routes``) are replayed prompts of earlier
  stages. With one teacher and no routing, every row is a replayed prompt (plain
  on-policy distillation).
* ``L_replay`` on the replayed prompts, ``replay``:

  - ``distill`` (the method): ``L_distill`` below;
  - ``sft`` (the control): cross-entropy on their dataset responses, no sampling, no
    teacher called. It trains the same extra rows with the same weight ``lam``, so the
    difference between the two separates distillation from the earlier stages' teachers
    from the extra steps on the replayed prompts.
* ``L_distill`` on the replayed prompts: the student samples a response ``y`` (no gradient
  through sampling; ``sampling``), each token gets the advantage

      A_t = stopgrad(log pi_teacher(y_t | y_<t) - log pi_theta(y_t | y_<t))

  inside a clipped surrogate, group size 1, no group normalisation (it would zero A):

      l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),
      rho_t = pi_theta(y_t) / pi_sample(y_t)

  (``estimator: sampled``, the default: it is GLM-5's and Thinking Machines' on-policy
  distillation estimator, and its expectation over y is the gradient of the reverse KL, so
  it needs only the sampled tokens' log-probabilities of the teacher). ``estimator: dense``
  uses the full-vocabulary reverse KL(pi_theta || pi_teacher) per token instead (exact in
  the vocabulary, lower variance, a (N, V) teacher distribution per token). Both average
  over the replayed response tokens of the batch.

The stage objectives that sample (``grpo``, ``self_distill``) log ``train/stage_reward``
per batch and, at every validation, ``val/stage_reward``: the mean reward of the stage's
samples over the last ``reward_window`` training batches, and ``val/stage_reward_start``:
over the first ``reward_window`` batches of the run (its value at the start, for
comparison). Both are training samples' rewards, logged with validation so that a cached
stage (:mod:`kd.pipeline`) keeps them. Validation of a routed run logs, per teacher,
``val/teacher_kl/<teacher>`` (forward KL(teacher || student) on the dataset responses of
the rows routed to it; :class:`kd.evaluation.StageMetrics`).

Per-teacher signals are logged: ``train/<teacher>/advantage`` (mean A_t on its tokens),
``train/<teacher>/reverse_kl`` (the sampled estimate, mean of -A_t) and
``train/<teacher>/tokens``.

Deviations and what is unsure: the GLM-5 report itself was not read (docs/spec.md section 6 marks the
section as secondary sources); the clipping range (0.2), the absence of a KL penalty to a
reference model and the one update per batch (so rho_t is 1 up to the sampling
temperature and filters: ``pi_sample`` is the distribution the token was drawn from) are
ours; so is the dense ``similarity`` reward. The reward windows are not kept in
checkpoints (a resumed run starts them anew). The student runs without dropout, so
samples and updates see one network. The staged pipeline that trains stages in turn is
:mod:`kd.pipeline` (``kd pipeline=task_stages``, ``task_stages_rl``).

Fused path (``chunked``, default on): when the student's (and the teacher's) logits are a
linear head over the last hidden states, no ``(N, V)`` logits are built: the sampled tokens'
log-probabilities of both models (the surrogate's ``pi_theta``, the advantage's two terms,
GRPO's ratio) come from :func:`kd.chunked.token_log_probs`, the ``dense`` estimator's
reverse KL from the fused divergence (closed-form gradient), the SFT and self-distillation
cross-entropies from the fused cross-entropy. Routed teachers' rows are merged into dense
logits (:class:`kd.teachers.Teachers`); the student side stays fused against them. Values
and gradients equal the dense path's (tests/test_fused_recipes.py).

Run: ``kd recipe=cross_stage data=task teacher=task_llama student=task_llama sft=task``
(one teacher), or with ``teachers:`` and ``data.routes`` for several (docs/language-models.md);
``kd experiment=task_cross_stage recipe.replay=sft`` is the control; ``kd
pipeline=task_stages_rl`` trains SFT then an RL stage that earns reward, with, without and
against the control.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from kd import ConfigError, batches, policy
from kd.batches import join_prompts_and_responses
from kd.data import IGNORE_INDEX
from kd.divergences import ReverseKL, reduce
from kd.evaluation import cross_entropy
from kd.generation import Sampling
from kd.policy import token_logprobs
from kd.recipe import DistillationRecipe, Needs
from kd.rollouts import Rollouts

ESTIMATORS = ("sampled", "dense")
STAGE_OBJECTIVES = ("sft", "grpo", "self_distill")
REPLAYS = ("distill", "sft")
REWARDS = ("exact", "similarity")


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantage ``(r - mean) / (std + eps)`` per group of samples
    of one prompt, ``(N, G) -> (N, G)`` (unbiased std; a group of equal rewards gives 0).
    Rewards [[1, 0, 0, 1]] give [[0.866, -0.866, -0.866, 0.866]] (std 0.57735)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def exact_match_rewards(tokenizer: Any, samples: list[list[int]], references: list[list[int]]) -> Tensor:
    """1.0 where a sample decodes (special tokens skipped, whitespace stripped) to the same
    text as its reference token ids, else 0.0."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    return torch.tensor([float(text(s) == text(r)) for s, r in zip(samples, references)])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1) between two strings."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def similarity_rewards(tokenizer: Any, samples: list[list[int]], references: list[list[int]]) -> Tensor:
    """``1 - edit_distance / max(len)`` between each sample's and its reference's decoded
    text (special tokens skipped, whitespace stripped); 1.0 for equal texts (two empty ones
    included), 0.0 for texts that share nothing. "abcd" against "abxd" gives 0.75."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    values = []
    for s, r in zip(samples, references):
        a, b = text(s), text(r)
        values.append(1.0 - edit_distance(a, b) / max(len(a), len(b), 1))
    return torch.tensor(values)


def token_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """``A_t = log pi_teacher(y_t) - log pi_theta(y_t)`` of sampled tokens, without gradient;
    any shape. pi_theta = [.5, .5], pi_T = [.9, .1] gives [0.587787, -1.609438]."""
    return (teacher_logprobs - student_logprobs).detach()


def clipped_surrogate(logprobs: Tensor, sample_logprobs: Tensor, advantages: Tensor, eps: float = 0.2) -> Tensor:
    """Per-token ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` with ``rho = exp(logprobs -
    sample_logprobs)`` (:func:`kd.policy.clipped_surrogate`); the gradient flows through
    ``logprobs`` only."""
    return policy.clipped_surrogate(torch.exp(logprobs - sample_logprobs.detach()), advantages, eps)


class CrossStage(DistillationRecipe):
    """On-policy distillation from (routed) earlier-stage teachers plus the stage's own SFT.

    Args:
        lam: weight of the distillation term (>= 0).
        stage_weight: weight of the current stage's SFT term on rows without a teacher (>= 0).
        estimator: ``sampled`` (clipped surrogate on the sampled tokens' advantages) or
            ``dense`` (full-vocabulary reverse KL per token).
        stage_objective: ``sft``, ``grpo`` or ``self_distill`` (module docstring).
        replay: what the replayed prompts train with: ``distill`` (the earlier stages'
            teachers on the student's samples) or ``sft`` (cross-entropy on the dataset
            answers, no teacher: the control).
        reward: the ``grpo`` / ``self_distill`` reward: ``exact`` (exact match, 0 or 1) or
            ``similarity`` (1 - normalised character edit distance, dense).
        reward_window: training batches that ``val/stage_reward`` and
            ``val/stage_reward_start`` average over (>= 1).
        group_size: samples per prompt of the ``grpo`` and ``self_distill`` objectives.
        clip_eps: clipping range of the surrogate (> 0).
        sampling: how the student samples the replayed prompts (:class:`kd.generation.Sampling`).
        seed: seed of the sampler.
        engine: what samples: ``kd`` (kd's sampler) or ``vllm`` (an in-process vLLM engine,
            :mod:`kd.rollouts`).
        vllm: the vLLM engine's settings (:class:`kd.rollouts.VLLMSettings`).
        chunked: the fused path (module docstring) for models whose head is linear; False
            builds the logits.
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    # it samples the replayed prompts itself; without a teacher only the stage objective trains;
    # no dropout: samples and updates see one network
    needs = Needs(teacher="optional", regimes=("offline",), data=("causal_lm",), student_dropout=False,
                  teacher_signals=("logits", "head"))

    def __init__(self, *, lam: float = 1.0, stage_weight: float = 1.0, estimator: str = "sampled",
                 stage_objective: str = "sft", replay: str = "distill", reward: str = "exact",
                 reward_window: int = 20, group_size: int = 4, clip_eps: float = 0.2,
                 sampling: Sampling | Any = None, seed: int = 0, engine: str = "kd", vllm: Any = None,
                 chunked: bool = True, **kwargs: Any) -> None:
        if estimator not in ESTIMATORS:
            raise ConfigError(f"recipe.estimator must be one of {list(ESTIMATORS)} (got {estimator!r})")
        if stage_objective not in STAGE_OBJECTIVES:
            raise ConfigError(f"recipe.stage_objective must be one of {list(STAGE_OBJECTIVES)} (got {stage_objective!r})")
        if replay not in REPLAYS:
            raise ConfigError(f"recipe.replay must be one of {list(REPLAYS)} (got {replay!r})")
        if reward not in REWARDS:
            raise ConfigError(f"recipe.reward must be one of {list(REWARDS)} (got {reward!r})")
        if reward_window < 1:
            raise ConfigError(f"recipe.reward_window must be >= 1 (got {reward_window})")
        minimum = {"sft": 0, "grpo": 2, "self_distill": 1}[stage_objective]
        if group_size < minimum:
            raise ConfigError(f"recipe.group_size must be >= {minimum} for stage_objective={stage_objective} "
                              f"(got {group_size}); GRPO normalises rewards within a group")
        if lam < 0 or stage_weight < 0 or lam + stage_weight == 0:
            raise ConfigError(f"recipe.lam and recipe.stage_weight must be >= 0 and not both 0 (got {lam}, "
                              f"{stage_weight})")
        if not clip_eps > 0:
            raise ConfigError(f"recipe.clip_eps must be > 0 (got {clip_eps})")
        rollouts = Rollouts(engine, vllm, where="recipe")
        super().__init__(**kwargs)
        self.rollouts = rollouts
        self.lam, self.stage_weight, self.estimator, self.clip_eps = lam, stage_weight, estimator, clip_eps
        self.stage_objective, self.group_size = stage_objective, group_size
        self.replay, self.reward = replay, reward
        self._first_rewards: list[float] = []  # the stage rewards of the run's first reward_window batches
        self._last_rewards: deque[float] = deque(maxlen=reward_window)  # ... and of the last ones
        self.sampling = Sampling.of(sampling)
        self.seed = seed
        self.chunked = bool(chunked)
        self._rng: torch.Generator | None = None

    @property
    def fused(self) -> bool:
        return self.chunked

    def _replayed(self, batch: dict[str, Tensor]) -> Tensor:
        """``(B,)`` rows whose prompts are replayed to a teacher."""
        if self.teachers is None:
            return torch.zeros(len(batch["input_ids"]), dtype=torch.bool, device=batch["input_ids"].device)
        return self.teachers.covered(batch)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """The student's samples for the prompts of ``rows`` (indices, repeated for several
        samples of one prompt), joined into a token batch that keeps each row's
        ``teacher_index``, plus ``sample_logprobs`` ``(b, L)``: each sampled token's
        log-probability under the distribution it was drawn from, and ``responses``, the
        sampled token ids of each row."""
        dm = self.datamodule
        if dm is None or batches.PROMPT_IDS not in batch:
            raise ConfigError("recipe cross_stage samples replayed prompts; use a language-model datamodule")
        config = self.sampling.config(dm.tokenizer, dm.max_new_tokens)
        device = batch["prompt_ids"].device
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device).manual_seed(self.seed)
        prompts, prompt_mask = batch["prompt_ids"][rows], batch["prompt_mask"][rows]
        out = self.rollouts.generate(self.student, prompts, prompt_mask, config, self._rng)
        joined = join_prompts_and_responses(prompts, prompt_mask, out.responses, out.response_mask,
                                            config.pad_token_id)
        if batches.TEACHER_INDEX in batch:
            joined["teacher_index"] = batch["teacher_index"][rows]
        # sampled token logprobs on the joined layout: position p of labels[:, 1:] <- the p-th response token
        logprobs = torch.zeros_like(joined["labels"][:, 1:], dtype=torch.float32)
        for r in range(len(rows)):
            positions = (joined["labels"][r, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
            logprobs[r, positions] = out.logprobs[r][out.response_mask[r]].float()
        joined["sample_logprobs"] = logprobs
        joined["responses"] = [out.responses[r][out.response_mask[r]].tolist() for r in range(len(rows))]
        return joined

    @torch.no_grad()
    def grpo_rollout(self, batch: dict[str, Tensor], rows: Tensor) -> dict[str, Any]:
        """``group_size`` samples for each prompt of ``rows``, their exact-match ``rewards``
        and group-normalised ``advantages`` (one per sample)."""
        repeated = rows.repeat_interleave(self.group_size)
        sampled = self.rollout(batch, repeated)
        labels = batch["labels"]
        references = [labels[r][labels[r] != IGNORE_INDEX].tolist() for r in repeated.tolist()]
        rewards = self.rewards(sampled.pop("responses"), references).to(labels.device)
        sampled["rewards"] = rewards
        sampled["advantages"] = group_advantages(rewards.view(-1, self.group_size)).flatten()
        return sampled

    def rewards(self, samples: list[list[int]], references: list[list[int]]) -> Tensor:
        """The verifiable reward of each sample against its dataset response (``reward``)."""
        score = similarity_rewards if self.reward == "similarity" else exact_match_rewards
        return score(self.datamodule.tokenizer, samples, references)

    def self_distill_loss(self, sampled: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Cross-entropy on the best rewarded sample of each prompt of a :meth:`grpo_rollout`
        (prompts without any reward are skipped); and the share of prompts kept."""
        rewards = sampled["rewards"].view(-1, self.group_size)
        best = rewards.argmax(-1)  # the first of equals
        keep = rewards.max(-1).values > 0
        rows = (torch.arange(len(rewards), device=rewards.device) * self.group_size + best)[keep]
        if len(rows) == 0:
            return sampled["sample_logprobs"].new_zeros(()), keep.float().mean()
        part = {k: sampled[k][rows] for k in ("input_ids", "attention_mask", "labels")}
        out = self.outputs(self.student, part, fused=self.chunked)
        return cross_entropy(out.logits, out.labels), keep.float().mean()

    def grpo_loss(self, sampled: dict[str, Any]) -> Tensor:
        """GRPO's clipped surrogate on a :meth:`grpo_rollout`, mean over its sampled tokens."""
        out = self.outputs(self.student, sampled, fused=self.chunked)
        new = token_logprobs(out.logits, out.labels, out.mask)
        advantage = sampled["advantages"].unsqueeze(-1).expand_as(new)
        return reduce(clipped_surrogate(new, sampled["sample_logprobs"], advantage, self.clip_eps), out.mask)

    def distill_loss(self, sampled: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_distill`` on a sampled batch (:meth:`rollout`) and per-teacher statistics."""
        student = self.outputs(self.student, sampled, fused=self.chunked)
        teacher = self.teacher_outputs(sampled, hidden=False)
        mask = student.mask & teacher.mask  # rows routed to no teacher do not count
        new = token_logprobs(student.logits, student.labels, mask)
        advantage = token_advantages(new, token_logprobs(teacher.logits, student.labels, mask))
        if self.estimator == "sampled":
            loss = reduce(clipped_surrogate(new, sampled["sample_logprobs"], advantage, self.clip_eps), mask)
        else:  # the full-vocabulary reverse KL, mean over the replayed tokens
            loss = ReverseKL()(student.logits, teacher.logits, mask)
        stats: dict[str, Tensor] = {}
        route = self.teachers.route(sampled)
        for k, name in enumerate(self.teachers.names):
            own = mask & (route == k).unsqueeze(-1)
            if own.any():
                stats[f"{name}/advantage"] = advantage[own].mean()
                stats[f"{name}/reverse_kl"] = -advantage[own].mean()
                stats[f"{name}/tokens"] = own.sum().float()
        return loss, stats

    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        replayed = self._replayed(batch)
        terms: dict[str, Tensor] = {}
        loss = batch["input_ids"].new_zeros((), dtype=torch.float32)
        full = None  # the student's outputs on the batch as it is (teacher-forced dataset answers)
        if self.stage_weight > 0 and (~replayed).any():
            if self.stage_objective == "grpo":
                sampled = self.grpo_rollout(batch, (~replayed).nonzero().squeeze(-1))
                terms["stage_grpo"] = self.grpo_loss(sampled)
                terms["stage_reward"] = sampled["rewards"].mean()
                loss = loss + self.stage_weight * terms["stage_grpo"]
            elif self.stage_objective == "self_distill":
                sampled = self.grpo_rollout(batch, (~replayed).nonzero().squeeze(-1))
                terms["stage_self_distill"], terms["stage_kept"] = self.self_distill_loss(sampled)
                terms["stage_reward"] = sampled["rewards"].mean()
                loss = loss + self.stage_weight * terms["stage_self_distill"]
            else:
                full = self.outputs(self.student, batch, fused=self.chunked)
                labels = torch.where(replayed.unsqueeze(-1), torch.full_like(full.labels, IGNORE_INDEX), full.labels)
                terms["stage_ce"] = cross_entropy(full.logits, labels)
                loss = loss + self.stage_weight * terms["stage_ce"]
        if "stage_reward" in terms:
            self._record_reward(float(terms["stage_reward"]))
        if self.lam > 0 and replayed.any() and self.replay == "sft":
            full = full if full is not None else self.outputs(self.student, batch, fused=self.chunked)
            labels = torch.where(replayed.unsqueeze(-1), full.labels, torch.full_like(full.labels, IGNORE_INDEX))
            terms["replay_ce"] = cross_entropy(full.logits, labels)
            loss = loss + self.lam * terms["replay_ce"]
        elif self.lam > 0 and replayed.any():
            sampled = self.rollout(batch, replayed.nonzero().squeeze(-1))
            sampled.pop("responses")
            distill, stats = self.distill_loss(sampled)
            terms["distill"] = distill
            terms.update(stats)
            loss = loss + self.lam * distill
        for key, value in self.rollouts.metrics().items():  # the vLLM engine's staleness
            terms[key] = torch.tensor(value)
        return {"loss": loss, **terms}

    def _record_reward(self, reward: float) -> None:
        if self.training:
            if len(self._first_rewards) < self._last_rewards.maxlen:
                self._first_rewards.append(reward)
            self._last_rewards.append(reward)

    def stage_rewards(self) -> dict[str, float]:
        """``stage_reward`` (mean over the last ``reward_window`` training batches) and
        ``stage_reward_start`` (over the first ones); empty before any sampled stage batch."""
        if not self._last_rewards:
            return {}
        return {"stage_reward": sum(self._last_rewards) / len(self._last_rewards),
                "stage_reward_start": sum(self._first_rewards) / len(self._first_rewards)}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for key, value in self.stage_rewards().items():
            self.log(f"val/{key}", value, add_dataloader_idx=False, sync_dist=self.trainer.world_size > 1)
