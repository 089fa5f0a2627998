"""RLOO advantages as a pure function of tensors. Imports torch only.

REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!";
Ahmadian et al. 2024, arXiv:2402.14740): each of a prompt's G samples is judged against the mean
reward of the other G-1 samples, an unbiased baseline because it does not depend on the sample itself.
The policy update (clipped ratio, num_iterations, KL to the reference) is GRPO's, in grpo.py.
"""

from __future__ import annotations

import torch


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(group)).

    rewards: (N,), prompt-major so each run of `group_size` entries shares a prompt; group_size >= 2.
    normalize: divide by the std of all N advantages (+1e-4), a batch-level rescaling that keeps the
    sign and the within-group order.
    Returns (N,). A group whose rewards are all equal gets 0 everywhere.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt for a baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (N/G, G)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - others_mean).reshape(-1)
    if normalize:
        advantages = advantages / (advantages.std() + 1e-4)
    return advantages
