"""Policy-gradient pieces shared by the on-policy recipes (MiniLLM's PPO, cross-stage
distillation, GRPO): the log-probability of sampled tokens (from dense logits or, on the
fused path, from hidden states and head: :func:`token_logprobs`), the PPO clipped surrogate, and
:func:`buffer_updates`, the loop of a recipe with its own optimisation (``Needs.own_loop``)
that samples a rollout buffer and then trains on it for several epochs of mini-batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kd.chunked import token_log_probs
from kd.divergences import to_log_probs
from kd.recipe import check_finite
from kd.signals import HeadLogits

if TYPE_CHECKING:
    from kd.recipe import DistillationRecipe


def sampled_log_probs(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """``log p(token)`` at every position: ``(..., V), (...) -> (...)``; negative token ids
    (IGNORE_INDEX) read id 0, mask them afterwards."""
    return log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: Tensor | HeadLogits, tokens: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """``log q(token)`` at every position ``(...)`` of dense logits ``(..., V)``, or of hidden
    states and a linear head without building ``(..., V)`` logits (the fused path,
    :func:`kd.chunked.token_log_probs`: same values and gradients); 0 outside ``mask``."""
    mask = mask.bool()
    if isinstance(logits, HeadLogits):
        return token_log_probs(logits, tokens, mask, temperature=temperature)
    values = sampled_log_probs(to_log_probs(logits, temperature, mask=mask), tokens)
    return torch.where(mask, values, torch.zeros_like(values))


def clipped_surrogate(ratio: Tensor, advantage: Tensor, eps: float = 0.2) -> Tensor:
    """Per-token PPO surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)``, ``r`` the probability
    ratio against the sampling policy (times an importance weight, for MiniLLM). A token
    whose clipped branch is active gets no gradient."""
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)


def buffer_updates(recipe: DistillationRecipe, size: int, loss: Callable[[Tensor], dict[str, Tensor]], *,
                   epochs: int, minibatches: int, generator: torch.Generator,
                   max_grad_norm: float | None = None) -> dict[str, float]:
    """Train ``recipe`` (manual optimisation) on a buffer of ``size`` rollouts: ``epochs``
    passes, each over a fresh shuffle (``generator``) split into exactly ``minibatches``
    parts, one optimizer step per part; return each term's mean over the steps.

    ``loss(indices)`` gives the terms ``{"loss": ..., <term>: ...}`` of the buffer's rows
    ``indices`` (on the recipe's device). Every step: the non-finite loss guard
    (:func:`kd.recipe.check_finite`, naming ``recipe.max_grad_norm``), zero_grad,
    ``manual_backward``, gradient-norm clipping at ``max_grad_norm`` (None: none), the
    optimizer and scheduler steps. A part left empty (a buffer smaller than ``minibatches``)
    steps only the scheduler, so the schedule spans ``epochs x minibatches`` steps per
    buffer whatever its size (``optimizer_steps_per_batch``). Logs ``train/lr`` once, after
    the last step.
    """
    optimizer = recipe.optimizers()
    scheduler = recipe.lr_schedulers()
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        # tensor_split, not chunk: exactly `minibatches` parts (chunk(4) of 6 gives 3)
        for part in torch.randperm(size, generator=generator).tensor_split(minibatches):
            if len(part) == 0:
                if scheduler is not None:
                    scheduler.step()
                continue
            terms = loss(part.to(recipe.device))
            check_finite(terms, recipe.global_step, getattr(getattr(recipe, "_trainer", None), "precision", None),
                         clipping="recipe.max_grad_norm")
            optimizer.zero_grad()
            recipe.manual_backward(terms["loss"])
            if max_grad_norm is not None:
                recipe.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
    recipe.log("train/lr", optimizer.param_groups[0]["lr"], batch_size=size)
    return {key: value / steps for key, value in sums.items()}


__all__ = ["sampled_log_probs", "clipped_surrogate", "buffer_updates"]
