"""MiniLLM (Gu, Dong, Wei & Huang 2024, "MiniLLM: Knowledge Distillation of Large Language
Models", ICLR; arXiv:2306.08543; official code microsoft/LMOps, folder minillm).

Objective: the reverse KL between the student q_theta and the teacher p over sequences,
min KL(q_theta || p), optimised by policy gradient on sequences sampled from the student.
With per-token reward ``r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)``, the paper's
gradient splits into

* the **single-step** term, exact over the vocabulary: the expected immediate reward at
  step t is ``-KL(q(. | y_<t) || p(. | y_<t))``, so its loss is the per-token reverse KL
  (differentiated through q, no sampling noise), weighted by ``w_t``;
* the **long-term** term, ``-E[sum_t R_{t+1} grad log q(y_t)]`` with the
  length-normalised return ``R_{t+1} = 1/(T-t-1) sum_{t'>t} r_t'``, optimised with PPO
  clipping on the ratio ``rho_t = q_theta(y_t) / q_old(y_t)`` times ``w_t``:
  ``-min(rho_t w_t A_t, clip(rho_t w_t, 1-eps, 1+eps) A_t)`` with ``A_t = R_{t+1}``;
* a **language-modelling** term on the training data's responses (the paper's L_PT on
  pretraining text), so the student keeps its SFT skills.

Rollouts come from **teacher-mixed sampling**: each token is drawn from
``p~ = alpha p + (1 - alpha) q_old`` (alpha 0.2), and ``w_t = q_old(y_t) / p~(y_t)`` is
the per-token importance weight (:class:`kd.generation.TeacherMix`). One training batch's
prompts make one rollout buffer; the recipe then runs ``ppo_epochs`` passes over it in
``num_minibatches`` shuffled mini-batches, one optimizer step each (manual optimisation,
:func:`kd.policy.buffer_updates`).
Rewards, old log-probs and advantages are computed once per buffer, without gradient;
no gradient flows through sampling. The student starts from an SFT checkpoint
(``student_sft``), as in the paper.

``variant`` switches every point where the official code differs from the paper:

=========================  ==============================  ===============================
                           ``paper`` (default)             ``code`` (LMOps)
=========================  ==============================  ===============================
reward r_t                 log p - log q                   (log p - log q) / 0.5, clip +-100
advantage A_t              R_{t+1}, excludes r_t,          sum_{t'>=t} 0.95^(t'-t) r_t'
                           undiscounted, / (T - t - 1)     / (T - t), whitened over the
                                                           batch's tokens (padding excluded)
single-step term           w_t * KL(q || p)                KL(q || p), no weight
LM term                    NLL                             0.5 NLL + 0.5 KL(p || q)
=========================  ==============================  ===============================

The default is ``paper``: the zoo reproduces papers, and the paper's estimator is the
one its derivation justifies; ``code`` exists to match the released checkpoints'
training. Either way each term is a mean over the mini-batch's response tokens (the paper
writes sums over t; with length-normalised returns the scale is the same up to the
average length), and the loss is ``ppo + single_step + pt_weight * lm``.

Deviations: the official code keeps a buffer of 256 rollouts and runs 4 PPO epochs at lr
5e-6; here the buffer is one training batch (``data.batch_size`` prompts) and the lr is the
run's. The student is run without dropout (rollouts, old log-probs and the update then
see the same network, so the first PPO ratio is exactly 1). The LM term uses the
training batch's dataset responses rather than a separate pretraining corpus.

Fused path (``chunked``, default on): when the student's and the teacher's logits are a
linear head over their last hidden states (:func:`kd.models.split_head`), no ``(N, V)``
logits are built. The sampled tokens' log-probabilities (old, new, the teacher's, the
vLLM importance weights) come from :func:`kd.chunked.token_log_probs` (:func:`kd.policy.token_logprobs`); the single-step
reverse KL and its weights ``w_t`` from :func:`kd.chunked.fused_loss_and_values` (closed-form
gradient, one sweep that also gives the logged unweighted KL); the LM term from the fused
cross-entropy and, in the code variant, the fused forward KL. The rollout buffer keeps the
teacher's last hidden states ``(B, L, H_T)`` instead of its log-probabilities ``(B, L, V)``.
Values and gradients equal the dense path's (tests/test_fused_recipes.py); a model whose
head is not linear gives dense logits and the dense path runs for it.

Run: ``kd experiment=task_minillm`` or ``kd recipe=minillm data=task teacher=task_llama student=task_llama``
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kd import ConfigError, batches, policy
from kd.batches import join_prompts_and_responses
from kd.chunked import Form, fused_loss_and_values
from kd.divergences import ForwardKL, reduce, reverse_kl_per_position, to_log_probs
from kd.evaluation import cross_entropy
from kd.generation import Sampling, TeacherMix, generate
from kd.models import split_head
from kd.policy import clipped_surrogate as ppo_clipped_loss  # -min(rw A, clip(rw) A), rw = ratio x weight
from kd.policy import token_logprobs
from kd.recipe import DistillationRecipe, Needs
from kd.rollouts import Rollouts
from kd.signals import HeadLogits

#: the rollout buffer's key of the teacher's last hidden states on the fused path
TEACHER_HIDDEN = "teacher_hidden"


def weighted_reverse_kl(student: Tensor | HeadLogits, teacher: Tensor | HeadLogits, mask: Tensor,
                        weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean over mask of w_t KL(q || p), mean over mask of KL(q || p))``, the second
    without gradient; either model as dense logits / log-probabilities or hidden states and
    a linear head (the fused path when the student is: closed-form gradient, one sweep)."""
    if isinstance(student, HeadLogits):
        rows = mask.reshape(-1).nonzero().squeeze(-1)
        w = weights.reshape(-1)[rows].detach() / max(rows.numel(), 1)
        loss, values = fused_loss_and_values(student, teacher, rows, w, form=Form("reverse_kl"))
        return loss, (values.mean() if values.numel() else values.new_zeros(()))
    teacher = teacher.materialize() if isinstance(teacher, HeadLogits) else teacher
    kl = reverse_kl_per_position(to_log_probs(student, mask=mask), to_log_probs(teacher, mask=mask))
    return reduce(kl * weights, mask), reduce(kl.detach(), mask)

VARIANTS = {
    "paper": {"reward_scale": 1.0, "reward_clip": None, "gamma": 1.0, "include_current": False, "whiten": False,
              "weighted_single_step": True, "lm_kd_share": 0.0},
    "code": {"reward_scale": 2.0, "reward_clip": 100.0, "gamma": 0.95, "include_current": True, "whiten": True,
             "weighted_single_step": False, "lm_kd_share": 0.5},
}


def normalized_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t' / n_t`` with ``n_t`` the number of valid
    positions from t to the end of the sequence; ``(B, L) -> (B, L)``, 0 where masked.

    ``mask`` marks each row's response positions (one contiguous run per row). Rewards
    ``[1, 2, 3]`` give ``[2, 2.5, 3]`` at gamma 1 and ``[1.869167, 2.425, 3]`` at 0.95.
    """
    mask = mask.bool()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    count = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        m = mask[..., t]
        running = torch.where(m, rewards[..., t] + gamma * running, torch.zeros_like(running))
        count = torch.where(m, count + 1, torch.zeros_like(count))
        out[..., t] = running / count.clamp(min=1)
    return out


def advantages(rewards: Tensor, mask: Tensor, gamma: float, include_current: bool, whiten: bool) -> Tensor:
    """MiniLLM's advantage per response token ``(B, L)``: the normalized return from t
    (``include_current``, code) or from t+1 (paper, 0 at the last token), optionally
    whitened over the valid tokens of the batch; 0 where masked."""
    mask = mask.bool()
    returns = normalized_returns(rewards, mask, gamma)
    if not include_current:
        returns = torch.cat([returns[..., 1:], torch.zeros_like(returns[..., :1])], dim=-1)
    if whiten:
        valid = returns[mask]
        if valid.numel() > 1:
            returns = (returns - valid.mean()) / (valid.std() + 1e-8)
    return torch.where(mask, returns, torch.zeros_like(returns))


class MiniLLM(DistillationRecipe):
    """MiniLLM: policy-gradient reverse-KL distillation with PPO (see the module docstring).

    Args:
        variant: ``paper`` or ``code`` (the official implementation's choices).
        mix_alpha: teacher share of the sampling mixture (0.2; 0 samples from the student).
        clip_eps: PPO clipping range on ratio x importance weight.
        ppo_epochs: passes over each rollout buffer.
        num_minibatches: optimizer steps per pass (the buffer is split in this many).
        pt_weight: weight of the language-modelling term (0 turns it off).
        max_grad_norm: gradient-norm clipping of each update (None: off).
        sampling: rollout sampling (:class:`kd.generation.Sampling`; paper: temperature 1,
            no filter; ``max_new_tokens`` None takes the datamodule's).
        seed: seed of the rollout sampler and the mini-batch shuffles.
        engine: what samples the rollouts: ``kd`` (kd's sampler) or ``vllm`` (an in-process
            vLLM engine, :mod:`kd.rollouts`; it has no teacher mixing, so it needs
            ``mix_alpha=0``, and the importance weights are then ``q_T(y) / q_filtered(y)``,
            1 without top-k/top-p).
        vllm: the vLLM engine's settings (:class:`kd.rollouts.VLLMSettings`).
        chunked: the fused path (module docstring) for models whose head is linear; False
            builds both models' logits.
        **kwargs: passed to :class:`kd.recipe.DistillationRecipe`.
    """

    # it samples its own rollouts; no dropout: rollouts, old log-probs and updates see one network
    needs = Needs(own_loop=True, regimes=("offline",), data=("causal_lm",), student_dropout=False,
                  teacher_signals=("logits", "head"))

    def __init__(self, *, variant: str = "paper", mix_alpha: float = 0.2, clip_eps: float = 0.2,
                 ppo_epochs: int = 4, num_minibatches: int = 4, pt_weight: float = 1.0,
                 max_grad_norm: float | None = 1.0, sampling: Sampling | Any = None, seed: int = 0,
                 engine: str = "kd", vllm: Any = None, chunked: bool = True, **kwargs: Any) -> None:
        if variant not in VARIANTS:
            raise ConfigError(f"recipe.variant must be one of {sorted(VARIANTS)} (got {variant!r})")
        if not 0.0 <= mix_alpha <= 1.0:
            raise ConfigError(f"recipe.mix_alpha must be in [0, 1] (got {mix_alpha}); the paper uses 0.2")
        if ppo_epochs < 1 or num_minibatches < 1:
            raise ConfigError("recipe.ppo_epochs and recipe.num_minibatches must be >= 1")
        if not clip_eps > 0:
            raise ConfigError(f"recipe.clip_eps must be > 0 (got {clip_eps}); the paper uses 0.2")
        if engine == "vllm" and mix_alpha > 0:
            raise ConfigError(f"recipe.engine=vllm samples from the student alone, not MiniLLM's teacher mixture "
                              f"(recipe.mix_alpha={mix_alpha}); set recipe.mix_alpha=0 or recipe.engine=kd")
        rollouts = Rollouts(engine, vllm, where="recipe")
        super().__init__(**kwargs)
        self.rollouts = rollouts
        self.variant = variant
        self.settings = VARIANTS[variant]
        self.mix_alpha, self.clip_eps = mix_alpha, clip_eps
        self.ppo_epochs, self.num_minibatches = ppo_epochs, num_minibatches
        self.pt_weight, self.max_grad_norm = pt_weight, max_grad_norm
        self.sampling = Sampling.of(sampling)
        self.seed = seed
        self.chunked = bool(chunked)
        self._rng: torch.Generator | None = None

    @property
    def fused(self) -> bool:
        return self.chunked

    @staticmethod
    def _teacher_entry(logits: Tensor | HeadLogits) -> dict[str, Tensor]:
        """What a buffer keeps of a fused teacher: its hidden states (the head is the teacher's own)."""
        return {TEACHER_HIDDEN: logits.hidden} if isinstance(logits, HeadLogits) else {}

    def _teacher_signal(self, part: dict[str, Tensor], dense_key: str) -> Tensor | HeadLogits:
        """The teacher of a buffer slice: its hidden states and head (:func:`kd.models.split_head`,
        cut to the vocabulary), or the dense ``dense_key``."""
        if TEACHER_HIDDEN not in part:
            return part[dense_key]
        _, head, softcap, scale = split_head(self.teacher)
        signal = HeadLogits(part[TEACHER_HIDDEN], head.weight, head.bias, softcap, scale)
        return signal.with_vocab(self.vocab_size) if self.vocab_size is not None else signal

    def check_data(self, datamodule: Any) -> None:
        size = getattr(datamodule, "batch_size", None)
        if size is not None and self.num_minibatches > size:
            raise ConfigError(f"recipe.num_minibatches={self.num_minibatches} splits each batch of {size} rollouts into "
                              f"more mini-batches than rollouts; set recipe.num_minibatches <= data.batch_size")

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    # ------------------------------------------------------------------ rollouts

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device).manual_seed(self.seed)
        return self._rng

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sample responses to the batch's prompts from ``p~`` and score them: the joined
        token batch plus, on its ``(B, L)`` target layout, ``mask``, ``old_logprobs``
        (log q_old of each sampled token), ``teacher_logprobs`` ``(B, L, V)``, ``weights``
        w_t, ``rewards`` r_t and ``advantages`` A_t. Nothing here carries a gradient."""
        if batches.PROMPT_IDS not in batch:
            raise ConfigError("MiniLLM needs prompts to sample from; use a language-model datamodule (data=task, ...)")
        dm = self.trainer.datamodule
        tok = dm.tokenizer
        config = self.sampling.config(tok, dm.max_new_tokens)
        generator = self._generator(batch["prompt_ids"].device)
        if self.rollouts.uses_vllm:  # mix_alpha is 0: the student's own samples
            out = self.rollouts.generate(self.student, batch["prompt_ids"], batch["prompt_mask"], config, generator)
        else:
            out = generate(self.student, batch["prompt_ids"], batch["prompt_mask"], config, generator=generator,
                           mix=TeacherMix(self.teacher, self.mix_alpha))
        joined = join_prompts_and_responses(batch["prompt_ids"], batch["prompt_mask"], out.responses,
                                            out.response_mask, tok.pad_token_id)
        student = self.outputs(self.student, joined, fused=self.chunked)
        teacher = self.teacher_outputs(joined)  # its mask leaves out rows without a teacher
        if out.student_logprobs is not None:
            weights = out.importance_weights[out.response_mask]
        else:  # w = q_T(y) / (the filtered q_T the engine drew from)(y); 1 without top-k / top-p
            t = 1.0 if config.greedy else float(config.temperature)
            log_q = token_logprobs(student.logits, student.labels, student.mask, t)
            weights = torch.exp(log_q[student.mask] - out.logprobs[out.response_mask])
        return {**joined, **self.score(student.logits, teacher.logits, student.labels, teacher.mask, weights)}

    def score(self, student_logits: Tensor | HeadLogits, teacher_logits: Tensor | HeadLogits, labels: Tensor,
              mask: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """Rewards and advantages of sampled tokens ``labels (B, L)`` at the ``mask``
        positions, from both models' logits ``(B, L, V)`` or hidden states and heads
        (temperature 1) and the sampling importance weights ``w`` of the valid tokens
        (row-major, as ``labels[mask]``). The buffer keeps the teacher's log-probabilities
        ``teacher_logprobs`` (dense) or its hidden states (fused)."""
        mask = mask.bool()
        old = token_logprobs(student_logits, labels, mask)
        reward = (token_logprobs(teacher_logits, labels, mask) - old) * self.settings["reward_scale"]
        if self.settings["reward_clip"] is not None:
            reward = reward.clamp(-self.settings["reward_clip"], self.settings["reward_clip"])
        reward = torch.where(mask, reward, torch.zeros_like(reward))
        w = torch.ones_like(reward)
        w[mask] = weights.to(w.dtype)
        adv = advantages(reward, mask, self.settings["gamma"], self.settings["include_current"],
                         self.settings["whiten"])
        teacher = self._teacher_entry(teacher_logits) or {"teacher_logprobs": to_log_probs(teacher_logits)}
        return {"mask": mask, "old_logprobs": old, **teacher, "weights": w, "rewards": reward, "advantages": adv}

    # ------------------------------------------------------------------ the loss

    def minibatch_loss(self, rollout: dict[str, Tensor], data: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """The loss of one PPO update on ``rollout`` (a slice of :meth:`rollout`'s output)
        plus the LM term on ``data`` (dataset token batch, or None; the code variant's KD
        part reads the teacher's logits from ``data["teacher_logits"]``, or its hidden
        states from ``data["teacher_hidden"]``, when present)."""
        out = self.outputs(self.student, rollout, fused=self.chunked)
        logits, labels = out.logits, out.labels
        mask = rollout["mask"].bool()
        new = token_logprobs(logits, labels, mask)
        ratio_w = torch.exp(torch.where(mask, new - rollout["old_logprobs"], torch.zeros_like(new))) * rollout["weights"]
        ppo_tokens = ppo_clipped_loss(ratio_w, rollout["advantages"], self.clip_eps)
        ppo = reduce(ppo_tokens, mask)
        weights = rollout["weights"] if self.settings["weighted_single_step"] else torch.ones_like(rollout["weights"])
        single, kl = weighted_reverse_kl(logits, self._teacher_signal(rollout, "teacher_logprobs"), mask, weights)
        clipped = ((ratio_w - 1).abs() > self.clip_eps) & mask
        terms = {"ppo": ppo, "single_step": single, "reverse_kl": kl,
                 "clip_fraction": clipped.sum() / mask.sum().clamp(min=1)}
        loss = ppo + single
        if data is not None and self.pt_weight > 0:
            d = self.outputs(self.student, data, fused=self.chunked)
            d_logits, d_mask = d.logits, d.mask
            lm = cross_entropy(d_logits, d.labels)
            share = self.settings["lm_kd_share"]
            if share > 0:
                if TEACHER_HIDDEN in data or batches.TEACHER_LOGITS in data:
                    teacher = self._teacher_signal(data, batches.TEACHER_LOGITS)
                else:
                    teacher = self.teacher_outputs(data).logits
                lm = (1 - share) * lm + share * ForwardKL()(d_logits, teacher, d_mask)
            terms["lm"] = lm
            loss = loss + self.pt_weight * lm
        return {"loss": loss, **terms}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        buffer = self.rollout(batch)
        n = len(buffer["input_ids"])
        lm_data = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if self.pt_weight > 0 and self.settings["lm_kd_share"] > 0:  # once per buffer, not per update
            teacher = self.teacher_outputs(lm_data).logits  # one teacher: its mask is d's
            lm_data.update(self._teacher_entry(teacher) or {batches.TEACHER_LOGITS: teacher})

        def loss(rows: Tensor) -> dict[str, Tensor]:
            return self.minibatch_loss({k: v[rows] for k, v in buffer.items()},
                                       {k: v[rows] for k, v in lm_data.items()})

        shuffles = torch.Generator().manual_seed(self.seed * 100003 + self.global_step)
        logged = policy.buffer_updates(self, n, loss, epochs=self.ppo_epochs, minibatches=self.num_minibatches,
                                       generator=shuffles, max_grad_norm=self.max_grad_norm)
        mask = buffer["mask"]
        logged["reward"] = float(reduce(buffer["rewards"], mask))
        logged["response_length"] = float(mask.sum(-1).float().mean())
        logged.update(self.rollouts.metrics())
        for key, value in logged.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=n)
        return torch.tensor(logged["loss"])
