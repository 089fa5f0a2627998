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
