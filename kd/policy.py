"""Policy-gradient pieces shared by the on-policy recipes (MiniLLM's PPO, cross-stage
distillation, GRPO): the log-probability of sampled tokens and the PPO clipped surrogate."""

from __future__ import annotations

import torch
from torch import Tensor


def sampled_log_probs(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """``log p(token)`` at every position: ``(..., V), (...) -> (...)``; negative token ids
    (IGNORE_INDEX) read id 0, mask them afterwards."""
    return log_probs.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def clipped_surrogate(ratio: Tensor, advantage: Tensor, eps: float = 0.2) -> Tensor:
    """Per-token PPO surrogate ``-min(r A, clip(r, 1-eps, 1+eps) A)``, ``r`` the probability
    ratio against the sampling policy (times an importance weight, for MiniLLM). A token
    whose clipped branch is active gets no gradient."""
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)


__all__ = ["sampled_log_probs", "clipped_surrogate"]
