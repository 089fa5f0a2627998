"""The gap between the engine that sampled and the trainer that learns, as pure tensor functions.

vLLM samples with its own kernels (and usually bf16 weights), so its log-probs of the tokens it sampled
differ slightly from the trainer's. A small gap is numerical; a large one means the engine is not
running the trainer's weights. What remains is corrected by importance sampling, truncated
(Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL training") or masked, per token
or per completion (masked sequence-level IS at 3.0 is TRL's default; truncated token-level at 2.0 is ours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImportanceSampling:
    """How the gap between sampler and trainer is corrected (vllm.importance_sampling in the config)."""

    level: str = "token"  # token: a weight per token; sequence: one per completion, its tokens' product
    mode: str = "truncate"  # truncate: clamp the weight into [min, max]; mask: a weight outside it becomes 0
    min: float | None = None  # lower bound of the weight; None = none
    max: float | None = 2.0  # upper bound of the weight; None = none


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


def importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, correction: ImportanceSampling
) -> torch.Tensor:
    """The weight that corrects each token (or completion) for having been sampled by the engine, not the trainer.

        token:    rho_t = pi_trainer(y_t) / pi_sampler(y_t)                                   -> (B, T)
        sequence: rho   = pi_trainer(y) / pi_sampler(y) = exp(sum_t log rho_t), real tokens  -> (B, 1)
        truncate: w = clamp(rho, min, max)       (truncated IS, Yao et al. 2025)
        mask:     w = rho if min <= rho <= max, else 0   (masked IS: the token or completion is dropped)

    trainer_logp, sampler_logp, mask: (B, T); trainer_logp is the rollout policy as the trainer computes it (no
    gradient flows through the weight). A non-finite log-prob (either side) or padding counts as log rho = 0:
    weight 1 for that token, nothing added to its completion's sum; the sync check reports such tokens.
    """
    log_ratio = trainer_logp.detach() - sampler_logp
    log_ratio = torch.where(torch.isfinite(log_ratio) & mask.bool(), log_ratio, 0.0)
    if correction.level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True)  # (B, 1): the product of the token ratios
    elif correction.level != "token":
        raise ValueError(f"importance sampling level must be token or sequence, not {correction.level!r}")
    ratio = torch.exp(log_ratio)
    if correction.mode == "truncate":
        if correction.min is None and correction.max is None:
            return ratio
        return ratio.clamp(min=correction.min, max=correction.max)
    if correction.mode == "mask":
        inside = torch.ones_like(ratio, dtype=torch.bool)
        if correction.min is not None:
            inside &= ratio >= correction.min
        if correction.max is not None:
            inside &= ratio <= correction.max
        return torch.where(inside, ratio, 0.0)
    raise ValueError(f"importance sampling mode must be truncate or mask, not {correction.mode!r}")
