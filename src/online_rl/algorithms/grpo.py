"""GRPO maths as small pure functions of tensors. Imports torch (and the sampler-correction maths) only.

Shapes: N = completions in the rollout (prompts x G), B = completions in a micro-batch, T = completion
tokens (padded). `mask` is 1 on real completion tokens (the EOS included), 0 on padding.

Departures from the GRPO paper (arXiv:2402.03300), all selectable:
- `epsilon_high` clips the ratio asymmetrically (DAPO, arXiv:2503.14476 "clip-higher");
- `loss_type` picks how token losses are averaged (the paper's per-sequence mean is `grpo`);
- `scale_rewards` may skip the std division (Dr. GRPO, arXiv:2503.20783) or use the batch std.
"""

from __future__ import annotations

import torch

from online_rl.algorithms.sampler_correction import ImportanceSampling, importance_weights


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std + 1e-4), the paper's outcome-supervised advantage.

    rewards: (N,), ordered prompt-major so each run of `group_size` entries shares a prompt.
    scale_rewards: "group" divides by the group's std, "batch" by the std of all N rewards, "none" not at all.
    Returns (N,). A group whose rewards are all equal gets advantage 0 everywhere: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (N/G, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman, 2020).

    logp, ref_logp: (B, T) log-probs of the sampled tokens. Returns (B, T).
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def kl_penalty(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, ratio_weighted: bool
) -> torch.Tensor:
    """The KL term of the per-token loss, (B, T): k3, or r * k3 with r = pi / pi_old (gradient through r).

    The tokens were sampled from pi_old, and k3's value estimates KL(pi || pi_ref), but its gradient does not
    follow that KL's: grad k3 = (1 - pi_ref/pi) grad log pi, whose expectation is sum_y (pi - pi_ref) grad log pi.
    Weighted by r it does, at any pi_old: grad (r k3) = r (k3 + 1 - pi_ref/pi) grad log pi = r log(pi/pi_ref)
    grad log pi, and E_pi_old[r log(pi/pi_ref) grad log pi] = grad KL(pi || pi_ref) (DeepSeek-V3.2's unbiased
    KL; "On the design of KL-regularized policy gradient algorithms", 2025). ratio_weighted=False is the
    GRPO paper's literal form.
    """
    kl = k3_kl(logp, ref_logp)
    return torch.exp(logp - old_logp) * kl if ratio_weighted else kl


def clipped_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-style clipped surrogate per token: -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A).

    logp, old_logp: (B, T); advantages: (B,), one per completion, broadcast over its tokens.
    Returns (loss (B, T), ratio (B, T)). With old_logp = logp.detach() the ratio is 1 and the
    gradient is the plain policy gradient, as in one-pass GRPO.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    return -torch.min(unclipped, clipped), ratio


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    num_micro_batches: int,
    rollout_token_count: int,
    max_completion_length: int,
) -> torch.Tensor:
    """Reduce a micro-batch's token losses (B, T) to its share of the step's loss (a scalar).

    Summing the returned value over the rollout's micro-batches gives the step loss:
    - grpo:    mean over sequences of each sequence's token mean, averaged over micro-batches;
    - bnpo:    token mean over the micro-batch, averaged over micro-batches;
    - dr_grpo: token sum / (B x max_completion_length), averaged over micro-batches;
    - dapo:    token sum / rollout_token_count, the token mean over the whole rollout.
    """
    masked = torch.where(mask.bool(), token_loss, 0.0)  # a NaN on a padded position stays out (NaN * 0 = NaN)
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.mean() / num_micro_batches
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) / num_micro_batches
    if loss_type == "dr_grpo":
        return masked.sum() / (mask.shape[0] * max_completion_length) / num_micro_batches
    if loss_type == "dapo":
        return masked.sum() / max(rollout_token_count, 1)
    raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, not {loss_type!r}")


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, torch.Tensor]:
    """Share of tokens whose gradient the clip removed: below 1-eps with A<0 (low), above 1+eps with A>0 (high)."""
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (adv < 0) & mask.bool()
    high = (ratio > 1 + epsilon_high) & (adv > 0) & mask.bool()
    tokens = mask.sum().clamp(min=1)
    return {
        "clip_low": low.sum() / tokens,
        "clip_high": high.sum() / tokens,
        "clip_region": (low | high).sum() / tokens,
    }


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over the real tokens; what sits on padding (even NaN or inf) is left out."""
    return torch.where(mask.bool(), values, 0.0).sum()


def real_tokens_only(mask: torch.Tensor, *log_probs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each (B, T) log-prob tensor with its padding replaced by 0 (None stays None).

    Padding is selected out before any arithmetic: a NaN there (NaN * 0 = NaN) would reach the loss or, through a
    later `where`, the gradient (0 * d exp(NaN) = NaN).
    """
    real = mask.bool()
    return tuple(torch.where(real, values, 0.0) if values is not None else None for values in log_probs)


def corrected_loss(
    token_loss: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    num_micro_batches: int,
    rollout_token_count: int,
    max_completion_length: int,
    ref_logp: torch.Tensor | None,
    beta: float,
    kl_ratio_weighted: bool,
    sampler_logp: torch.Tensor | None,
    importance_sampling: ImportanceSampling | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What every policy-gradient surrogate goes through: the sampler's correction, the KL term, the reduction.

        loss_t = w_t * surrogate_t + beta * KL_t        (w_t: importance_weights; KL_t: kl_penalty)
    then reduced by `aggregate_loss` (loss_type).

    token_loss: the surrogate, (B, T) or (B, 1) (one value per completion, broadcast over its tokens); logp,
    old_logp, mask: (B, T), padding already zeroed (real_tokens_only); ref_logp, sampler_logp: (B, T) or None.
    Returns (loss, sums over the real tokens of kl, is_weight, is_weight_deviation, is_masked), each 0-dim.
    """
    token_loss = token_loss.expand_as(logp)
    stats = {}
    if sampler_logp is not None and importance_sampling is not None:
        weights = importance_weights(old_logp, sampler_logp, mask, importance_sampling).expand_as(logp)
        token_loss = token_loss * weights
        stats["is_weight"] = masked_sum(weights, mask)
        stats["is_weight_deviation"] = masked_sum((weights - 1).abs(), mask)
        stats["is_masked"] = masked_sum((weights == 0).to(logp.dtype), mask)  # dropped by mode=mask
    if ref_logp is not None:
        token_loss = token_loss + beta * kl_penalty(logp, old_logp, ref_logp, kl_ratio_weighted)
        stats["kl"] = masked_sum(k3_kl(logp, ref_logp).detach(), mask)  # the KL's estimate, logged
    loss = aggregate_loss(
        token_loss, mask, loss_type, num_micro_batches, rollout_token_count, max_completion_length
    )
    return loss, stats


def policy_gradient_loss(
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
    """A micro-batch's share of the step's clipped policy-gradient loss (GRPO, RLOO), and its token sums.

        loss_t = w_t * -min(r_t A, clip(r_t, 1-eps_low, 1+eps_high) A) + beta * r_t * k3_t,   r_t = pi / pi_old
        (kl_ratio_weighted=False: beta * k3_t, the GRPO paper's form; see kl_penalty)
        w_t    = the sampler correction (importance_weights: truncated or masked, per token or per completion,
                 when the engine's log-probs and a correction are given; else 1)
    then reduced by `aggregate_loss` (loss_type).

    logp: (B, T) with gradient; old_logp: (B, T) of the rollout policy (logp.detach() when this is the only
    pass); advantages: (B,); mask: (B, T) 1 on completion tokens; ref_logp, sampler_logp: (B, T) or None.
    Returns (loss, sums over the real tokens of kl, clip_low/high/region, is_weight, is_weight_deviation,
    is_masked), each a 0-dim tensor: the caller divides by the rollout's tokens.
    """
    logp, old_logp, ref_logp, sampler_logp = real_tokens_only(mask, logp, old_logp, ref_logp, sampler_logp)
    token_loss, ratio = clipped_token_loss(logp, old_logp, advantages, epsilon_low, epsilon_high)
    loss, stats = corrected_loss(
        token_loss, logp, old_logp, mask,
        loss_type=loss_type, num_micro_batches=num_micro_batches, rollout_token_count=rollout_token_count,
        max_completion_length=max_completion_length, ref_logp=ref_logp, beta=beta,
        kl_ratio_weighted=kl_ratio_weighted, sampler_logp=sampler_logp, importance_sampling=importance_sampling,
    )  # fmt: skip
    tokens = mask.sum()
    for key, fraction in clip_fractions(ratio, advantages, mask, epsilon_low, epsilon_high).items():
        stats[key] = fraction * tokens
    return loss, stats
