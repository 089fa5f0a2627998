"""GSPO: Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071), as pure tensor functions.

GRPO's advantages, but one importance ratio per completion instead of one per token: the length-normalised
likelihood ratio, clipped as a whole. A token's ratio is noisy and its clip acts token by token; the sequence's
ratio matches the unit the reward scores (one reward per completion).

Shapes as in grpo.py: B completions in a micro-batch, T completion tokens (padded), mask 1 on real tokens.
"""

from __future__ import annotations

import torch

from online_rl.algorithms.grpo import clip_fractions, corrected_loss, real_tokens_only
from online_rl.algorithms.sampler_correction import ImportanceSampling


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|) = exp(mean over y_i's tokens of (log pi - log pi_old)), (B,).

    logp (with gradient), old_logp, mask: (B, T), padding already zeroed. The 1/|y_i| keeps s_i near 1 whatever
    the length, so one clip range suits every completion; its gradient is s_i times the mean of the tokens'
    grad log pi.
    """
    tokens = mask.sum(dim=1).clamp(min=1)
    return torch.exp(torch.where(mask.bool(), logp - old_logp, 0.0).sum(dim=1) / tokens)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    num_micro_batches: int,
    rollout_token_count: int,
    max_completion_length: int,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_ratio_weighted: bool = True,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling: ImportanceSampling | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's share of the step's GSPO loss, and its token sums.

        J(theta) = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)      (the paper's eq. 5)
        s_i      = exp(1/|y_i| sum_t log(pi(y_i,t) / pi_old(y_i,t)))                       (eq. 6, sequence_ratio)

    Each completion's -min(...) is broadcast over its tokens, then goes through grpo.corrected_loss: the sampler
    correction, beta times the KL term per token (its weight the token's ratio pi/pi_old, the one under which its
    gradient is the KL's; TRL weights it by s_i), and `aggregate_loss`. loss_type=grpo (a mean per completion,
    then over completions) gives -J exactly; the token-sum types weight each completion by its length.
    The paper's clip range is small (eps_low 3e-4, eps_high 4e-4): s_i is a per-token geometric mean.

    logp: (B, T) with gradient; old_logp: (B, T) (logp.detach() when this is the only pass); advantages: (B,);
    mask: (B, T). Returns (loss, token sums as grpo.policy_gradient_loss's: a clipped completion counts all of its
    tokens in clip_low/high/region).
    """
    logp, old_logp, ref_logp, sampler_logp = real_tokens_only(mask, logp, old_logp, ref_logp, sampler_logp)
    ratio = sequence_ratio(logp, old_logp, mask)  # (B,)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    sequence_loss = -torch.min(ratio * advantages, clipped * advantages)  # (B,)
    loss, stats = corrected_loss(
        sequence_loss.unsqueeze(1), logp, old_logp, mask,
        loss_type=loss_type, num_micro_batches=num_micro_batches, rollout_token_count=rollout_token_count,
        max_completion_length=max_completion_length, ref_logp=ref_logp, beta=beta,
        kl_ratio_weighted=kl_ratio_weighted, sampler_logp=sampler_logp, importance_sampling=importance_sampling,
    )  # fmt: skip
    token_ratio = ratio.detach().unsqueeze(1).expand_as(logp)  # (B, T): each token carries its completion's
    tokens = mask.sum()
    for key, fraction in clip_fractions(token_ratio, advantages, mask, epsilon_low, epsilon_high).items():
        stats[key] = fraction * tokens
    return loss, stats
