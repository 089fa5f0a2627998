"""Online preference losses (online DPO, Nash-MD, XPO) as small pure functions. Imports torch only.

Shapes: P = prompts (pairs) in a micro-batch. Sequence log-probs are sums over a completion's
tokens (the EOS included), of the policy (`logp`) or of the frozen reference (`ref_logp`).

- Online DPO (Guo et al. 2024, arXiv:2402.04792): two samples of the current policy, ranked by the
  reward, trained with the DPO (arXiv:2305.18290) or IPO (arXiv:2310.12036) loss.
- Nash-MD (Munos et al. 2023, arXiv:2312.00886): the policy's sample y is compared with a sample y'
  of the geometric mixture pi^(1-c) * pi_ref^c; the policy follows the preference of y over y'
  and is pulled towards the reference by a KL term. Here the preference is Bradley-Terry on the
  scores, sigma(s(y) - s(y')), and the gradient is the score-function (REINFORCE) estimate.
- XPO (Xie et al. 2024, arXiv:2405.21046): online DPO on a policy sample vs a reference sample, plus
  alpha * log pi(y_ref), which lowers the probability of what the reference already says and so
  pushes the policy to explore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_pairs(first_scores: torch.Tensor, second_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which sample of each pair is chosen. first_scores, second_scores: (P,).

    Returns (first_is_chosen (P,) bool, tie (P,) bool). A tie carries no preference: the DPO loss skips it.
    """
    return first_scores > second_scores, first_scores == second_scores


def penalize_missing_eos(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores - penalty where the completion never emitted EOS (was cut at max_completion_length)."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished).to(scores.dtype)


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss (P,) and the pair's log-ratio margin h (P,), detached.

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    sigmoid (DPO): -log sigma(beta * h);   ipo (IPO): (h - 1 / (2 beta))^2.
    """
    margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * margin)
    elif loss_type == "ipo":
        loss = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid or ipo, not {loss_type!r}")
    return loss, margin.detach()


def bradley_terry_preference(scores: torch.Tensor, other_scores: torch.Tensor) -> torch.Tensor:
    """P(y > y') = sigma(s(y) - s(y')): 0.5 on a tie, towards 1 when y scores higher. (P,)"""
    return torch.sigmoid(scores - other_scores)


def nash_md_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, preference: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-pair loss (P,) whose gradient is the REINFORCE estimate of -grad E_y[ P(y > y') - beta * log(pi/pi_ref)(y) ].

    logp: (P,) policy log-prob of its own sample y (with gradient); ref_logp: (P,) the reference's;
    preference: (P,) P(y > y'), y' from the mixture. 0.5 is the baseline: a coin-flip preference
    teaches nothing. The return (preference - 0.5 - beta * KL sample) is detached; only log pi(y) carries gradient.
    """
    kl_sample = (logp - ref_logp).detach()
    signal = preference - 0.5 - beta * kl_sample
    return -signal * logp


def xpo_exploration_loss(reference_sample_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * log pi(y_ref) per pair (P,): minimising it lowers the policy's probability of reference samples."""
    return alpha * reference_sample_logp


def scheduled_beta(beta: float, beta_final: float | None, step: int, max_steps: int) -> float:
    """beta moved linearly from `beta` at step 0 to `beta_final` at the last step; constant when beta_final is None."""
    if beta_final is None or max_steps <= 1:
        return beta
    progress = min(step, max_steps - 1) / (max_steps - 1)
    return beta + (beta_final - beta) * progress


def sequence_logps(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy sequence log-probs (B,), reference's (B,), k3 KL summed over the real tokens, detached).

    logp, ref_logp, mask: (B, T). KL(pi || pi_ref) per token is Schulman's k3 estimate, as GRPO logs it.
    """
    delta = ref_logp - logp.detach()
    kl_sum = ((torch.exp(delta) - delta - 1) * mask).sum()
    return (logp * mask).sum(dim=1), (ref_logp * mask).sum(dim=1), kl_sum


def pair_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    first_is_chosen: torch.Tensor,
    decisive: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    decisive_pairs: int,
    pairs: int,
    exploration_alpha: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's share of the online DPO / XPO loss over the step's pairs, and its sums.

        loss = sum_pairs decisive * dpo_loss(chosen, rejected) / decisive_pairs
               (+ sum_pairs alpha * log pi(second) / pairs, XPO's exploration term)

    logp, ref_logp, mask: (B, T) token log-probs of B = 2 x pairs rows, [first, second] of each pair in turn;
    first_is_chosen, decisive: (B/2,) bool, one per pair (a tie is not decisive and teaches nothing).
    Returns (loss, sums of margin, accuracy (pairs with margin > 0), exploration, kl).
    """
    sequence_logp, ref_sequence_logp, kl_sum = sequence_logps(logp, ref_logp, mask)
    policy_pair, ref_pair = sequence_logp.view(-1, 2), ref_sequence_logp.view(-1, 2)  # (B/2, 2)
    first = first_is_chosen
    losses, margin = dpo_loss(
        torch.where(first, policy_pair[:, 0], policy_pair[:, 1]),
        torch.where(first, policy_pair[:, 1], policy_pair[:, 0]),
        torch.where(first, ref_pair[:, 0], ref_pair[:, 1]),
        torch.where(first, ref_pair[:, 1], ref_pair[:, 0]),
        beta,
        loss_type,
    )
    loss = (losses * decisive).sum() / decisive_pairs
    stats = {"margin": (margin * decisive).sum(), "accuracy": ((margin > 0) & decisive).sum(), "kl": kl_sum}
    if exploration_alpha is not None:  # the second row of each pair is the reference's sample
        exploration = xpo_exploration_loss(policy_pair[:, 1], exploration_alpha).sum() / pairs
        loss = loss + exploration
        stats["exploration"] = exploration
    return loss, stats


def nash_md_micro_batch_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    preferred: torch.Tensor,
    *,
    beta: float,
    pairs: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's share of the Nash-MD loss: sum of `nash_md_loss` over its rows / pairs in the step.

    logp, ref_logp, mask: (B, T), one row per pair, the policy's own sample; preferred: (B,) P(y > y').
    Returns (loss, {kl: the k3 KL summed over the real tokens}).
    """
    sequence_logp, ref_sequence_logp, kl_sum = sequence_logps(logp, ref_logp, mask)
    loss = nash_md_loss(sequence_logp, ref_sequence_logp, preferred, beta).sum() / pairs
    return loss, {"kl": kl_sum}
