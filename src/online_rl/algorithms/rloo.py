"""RLOO maths as small pure functions of tensors. Imports torch (and GRPO's clipped surrogate) only.

REINFORCE Leave-One-Out as published (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740): the whole completion is one action. Its reward
carries the KL penalty, summed over the completion, and each of a prompt's k samples is judged against the
mean penalised reward of the other k - 1:

    R_i   = r_i - beta * sum_t [log pi_old(y_i,t | .) - log pi_ref(y_i,t | .)]      (kl_penalised_rewards)
    A_i   = R_i - 1/(k-1) sum_{j != i} R_j                                          (leave_one_out_advantages)
    rho_i = pi_theta(y_i | x) / pi_old(y_i | x) = exp(sum_t [log pi_theta - log pi_old])  (sequence_log_ratio)
    L     = 1/N sum_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)   (sequence_policy_loss)

With one pass per rollout (num_iterations = 1) rho_i = 1 and the gradient is the paper's estimator,
-1/N sum_i A_i grad log pi_theta(y_i | x). The paper updates once per batch; the clipped sequence ratio is
PPO's guard for further passes (num_iterations > 1), as TRL's RLOOTrainer does it.

Shapes: N = completions in the rollout (prompts x k), B = completions in a micro-batch, T = completion tokens
(padded); `mask` is 1 on real completion tokens, 0 on padding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from online_rl.algorithms.grpo import clip_fractions, clipped_token_loss, masked_sum
from online_rl.algorithms.sampler_correction import ImportanceSampling, importance_weights


def sequence_log_ratio(logp: torch.Tensor, other_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y|x) - log q(y|x) = sum_t mask_t (logp_t - other_logp_t), per completion.

    logp, other_logp: (B, T) log-probs of the sampled tokens under two policies; mask: (B, T).
    Returns (B,). With other = pi_old it is the log of RLOO's sequence ratio; with pi_old against pi_ref it is
    the one-sample estimate of KL(pi_old || pi_ref) for that completion (the paper's k1, can be negative).
    Summed per token, not as a difference of sums: two sums of a long completion's log-probs are large and
    close, and their float32 difference would lose the digits that matter.
    """
    return torch.where(mask.bool(), logp - other_logp, 0.0).sum(dim=1)  # padding (even NaN) left out


def kl_penalised_rewards(rewards: torch.Tensor, ref_log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """R_i = r_i - beta * log(pi_old(y_i|x) / pi_ref(y_i|x)): the KL penalty folded into the reward.

    rewards: (N,) the reward functions' weighted total; ref_log_ratio: (N,) sequence_log_ratio(old, ref).
    Returns (N,). The penalty is a fact of the rollout (pi_old, not pi_theta): it has no gradient.
    """
    return rewards - beta * ref_log_ratio.to(rewards.dtype)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool) -> torch.Tensor:
    """A_i = R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean(group)).

    rewards: (N,), prompt-major so each run of `group_size` (k) entries shares a prompt; k >= 2.
    normalize: divide by the std of all N advantages (+1e-4), a batch-level rescaling that keeps the
    sign and the within-group order (TRL also subtracts the batch mean, which is 0 here: each group's
    advantages sum to 0).
    Returns (N,). A group whose rewards are all equal gets 0 everywhere.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt for a baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (N/k, k)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - others_mean).reshape(-1)
    if normalize:
        advantages = advantages / (advantages.std() + 1e-4)
    return advantages


def sequence_clipped_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i), rho_i = exp(log_ratio_i), per completion.

    log_ratio, advantages: (B,). Returns (loss (B,), rho (B,)). PPO's surrogate with the completion as its one
    action: GRPO's per-token surrogate applied to a single "token" per row.
    """
    loss, ratio = clipped_token_loss(
        log_ratio.unsqueeze(1),
        torch.zeros_like(log_ratio).unsqueeze(1),
        advantages,
        epsilon_low,
        epsilon_high,
    )  # (B, 1) each
    return loss.squeeze(1), ratio.squeeze(1)


def sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    rollout_sequences: int,
    sampler_logp: torch.Tensor | None = None,
    importance_sampling: ImportanceSampling | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's share of the step's RLOO loss, and its token sums.

        loss_i = w_i * -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
        rho_i  = exp(sum_t mask_t (log pi_theta - log pi_old))
        w_i    = the completion's importance weight pi_old(y_i) / pi_sampler(y_i), truncated or masked as
                 `importance_sampling` says (sampler_correction.importance_weights), always per completion:
                 the completion is the action; 1 without the engine's log-probs or a correction
        loss   = sum_{i in micro-batch} loss_i / rollout_sequences

    Summed over the rollout's micro-batches this is the paper's mean over all N completions (on each rank;
    DDP averages ranks of equal N), whatever their lengths: a completion is one action, not |y| of them.

    logp: (B, T) with gradient; old_logp: (B, T) of the rollout policy (logp.detach() when this is the only
    pass); advantages: (B,); mask: (B, T); sampler_logp: (B, T) or None. rollout_sequences: N on this rank.
    Returns (loss, sums over the real tokens of clip_low/high/region (tokens of clipped completions),
    is_weight, is_weight_deviation), each a 0-dim tensor: the caller divides by the rollout's tokens.
    """
    log_ratio = sequence_log_ratio(logp, old_logp, mask)  # (B,)
    sequence_loss, ratio = sequence_clipped_loss(log_ratio, advantages, epsilon_low, epsilon_high)
    stats = {}
    if sampler_logp is not None and importance_sampling is not None:
        # a NaN or inf sampler log-prob counts as log-ratio 0 in its completion's sum (the sync check reports it)
        per_action = replace(importance_sampling, level="sequence")
        weights = importance_weights(old_logp, sampler_logp, mask, per_action).squeeze(1)  # (B,)
        sequence_loss = sequence_loss * weights
        per_token = weights.unsqueeze(1).expand_as(mask)
        stats["is_weight"] = masked_sum(per_token, mask)
        stats["is_weight_deviation"] = masked_sum((per_token - 1).abs(), mask)
        stats["is_masked"] = masked_sum((per_token == 0).to(logp.dtype), mask)  # dropped by mode=mask
    loss = sequence_loss.sum() / max(rollout_sequences, 1)
    tokens = mask.sum()
    fractions = clip_fractions(
        ratio.detach().unsqueeze(1).expand_as(mask), advantages, mask, epsilon_low, epsilon_high
    )
    for key, fraction in fractions.items():
        stats[key] = fraction * tokens
    return loss, stats
