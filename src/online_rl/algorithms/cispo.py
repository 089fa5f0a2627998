"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv:2506.13585), as pure tensor functions.

PPO's clip removes a token's gradient once its ratio leaves the trust region, so rare tokens whose probability
jumps (often the "forks" of a reasoning trace) stop learning after the first update. CISPO keeps every token's
gradient and clips only the importance weight that scales it, as a constant (stop-gradient): REINFORCE with a
bounded off-policy correction.

Shapes as in grpo.py: B completions in a micro-batch, T completion tokens (padded), mask 1 on real tokens.
"""

from __future__ import annotations

import torch

from online_rl.algorithms.grpo import corrected_loss, real_tokens_only
from online_rl.algorithms.sampler_correction import ImportanceSampling


def cispo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float | None,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi per token, r = pi / pi_old; eps_low None: no lower bound.

    logp (with gradient), old_logp: (B, T); advantages: (B,). Returns (loss (B, T), r (B, T), detached).
    The loss's value is not a surrogate objective's (it moves with log pi); its gradient, sg(r_hat) A grad log pi,
    is the paper's.
    """
    ratio = torch.exp(logp - old_logp).detach()
    weight = ratio.clamp(min=None if epsilon_low is None else 1 - epsilon_low, max=1 + epsilon_high)
    return -weight * advantages.unsqueeze(1) * logp, ratio


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float | None,
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
    """A micro-batch's share of the step's CISPO loss, and its token sums.

        J(theta) = 1 / sum_i |y_i| * sum_i sum_t sg(r_hat_i,t) A_i log pi(y_i,t)          (the paper's eq. 4)
        r_hat    = clip(r, 1 - eps_low, 1 + eps_high),  r = pi(y_i,t) / pi_old(y_i,t)          (eq. 5)

    MiniMax-M1 sets no lower bound (eps_low None) and tunes eps_high; ScaleRL (arXiv:2510.13786) caps the weight
    at 5 (eps_high 4), TRL's `epsilon_high=5.0` for loss_type="cispo" (TRL's epsilon_high is the cap itself). The
    paper's 1/sum|y_i| is loss_type=dapo; the others reduce as in GRPO. Then grpo.corrected_loss: the sampler
    correction and beta times the KL term per token.

    logp: (B, T) with gradient; old_logp: (B, T) (logp.detach() when this is the only pass); advantages: (B,);
    mask: (B, T). Returns (loss, token sums as grpo.policy_gradient_loss's, where clip_low/high count the tokens
    whose weight the lower/upper bound moved, whatever the advantage's sign: the bound scales their gradient).
    """
    logp, old_logp, ref_logp, sampler_logp = real_tokens_only(mask, logp, old_logp, ref_logp, sampler_logp)
    token_loss, ratio = cispo_token_loss(logp, old_logp, advantages, epsilon_low, epsilon_high)
    loss, stats = corrected_loss(
        token_loss, logp, old_logp, mask,
        loss_type=loss_type, num_micro_batches=num_micro_batches, rollout_token_count=rollout_token_count,
        max_completion_length=max_completion_length, ref_logp=ref_logp, beta=beta,
        kl_ratio_weighted=kl_ratio_weighted, sampler_logp=sampler_logp, importance_sampling=importance_sampling,
    )  # fmt: skip
    real = mask.bool()
    low = (ratio < 1 - epsilon_low) & real if epsilon_low is not None else torch.zeros_like(real)
    high = (ratio > 1 + epsilon_high) & real
    stats.update(clip_low=low.sum(), clip_high=high.sum(), clip_region=(low | high).sum())
    return loss, stats
