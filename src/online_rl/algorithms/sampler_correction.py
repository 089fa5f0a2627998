"""The gap between the engine that sampled and the trainer that learns, as pure tensor functions.

vLLM samples with its own kernels (and usually bf16 weights), so its log-probs of the tokens it sampled
differ slightly from the trainer's. A small gap is numerical; a large one means the engine is not
running the trainer's weights. What remains is corrected by truncated importance sampling
(Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training").
"""

from __future__ import annotations

import torch


def logp_gap(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, max) of |trainer - sampler| over the real tokens, as device scalars; (B, T) inputs, T >= 1."""
    gap = (trainer_logp.detach() - sampler_logp).abs() * mask
    return gap.sum(), gap.max()


def truncated_importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_trainer / pi_sampler, cap) per token, (B, T): reweights tokens the sampler over-sampled.

    trainer_logp is the rollout policy as the trainer computes it (no gradient flows through it).
    """
    return torch.exp(trainer_logp.detach() - sampler_logp).clamp(max=cap)
