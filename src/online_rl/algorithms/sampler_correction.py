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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, max, non-finite count) of |trainer - sampler| over the real tokens, as device scalars; (B, T)
    inputs, T >= 1. A NaN or inf log-prob (either side) is counted, not summed: a NaN would make the sum NaN,
    and `NaN > threshold` is False, so the sync check would pass it."""
    real = mask.bool()
    gap = (trainer_logp.detach() - sampler_logp).abs()
    finite = torch.isfinite(gap)
    kept = torch.where(real & finite, gap, 0.0)
    return kept.sum(), kept.max(), (real & ~finite).sum()


def truncated_importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_trainer / pi_sampler, cap) per token, (B, T): reweights tokens the sampler over-sampled.

    trainer_logp is the rollout policy as the trainer computes it (no gradient flows through it). Where
    either log-prob is not finite the weight is 1 (no correction): the sync check reports such tokens.
    """
    log_ratio = trainer_logp.detach() - sampler_logp
    return torch.where(torch.isfinite(log_ratio), torch.exp(log_ratio).clamp(max=cap), 1.0)
