"""Sampling from a geometric mixture of two models, token by token, with transformers.

pi_mix(y_t | prefix) is proportional to pi(y_t | prefix)^(1 - c) * pi_ref(y_t | prefix)^c: at every
step the two models' log-probs (at the sampling temperature) are mixed with weight c, renormalised,
filtered by top-k / top-p and sampled. c = 0 samples the policy, c = 1 the reference.
Nash-MD draws its comparison sample this way (c = algo.mixture_coef) and XPO its reference sample
(c = 1). vLLM cannot mix two models' logits, so this runs on the trainer's own modules; it reports
no sampler log-probs (nothing is compared with an engine).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from online_rl.engines.protocol import Rollout
from online_rl.engines.transformers_engine import cut_at_eos, left_pad


def filter_logits(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top_k (0 = off) and outside the smallest nucleus of mass top_p. (B, V)"""
    if top_k > 0:
        kth = torch.topk(logprobs, min(top_k, logprobs.shape[-1]), dim=-1).values[:, -1:]
        logprobs = logprobs.masked_fill(logprobs < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logprobs, order = torch.sort(logprobs, descending=True, dim=-1)
        mass_before = torch.softmax(sorted_logprobs, dim=-1).cumsum(dim=-1) - torch.softmax(
            sorted_logprobs, dim=-1
        )
        drop_sorted = mass_before > top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = logprobs.masked_fill(drop, float("-inf"))
    return logprobs


def mix_logprobs(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, coef: float, temperature: float
):
    """log pi_mix (B, V), normalised: (1 - c) log_softmax(policy / T) + c log_softmax(reference / T), renormalised."""
    mixed = (1 - coef) * torch.log_softmax(
        policy_logits.float() / temperature, dim=-1
    ) + coef * torch.log_softmax(reference_logits.float() / temperature, dim=-1)
    return torch.log_softmax(mixed, dim=-1)


@torch.no_grad()
def sample_geometric_mixture(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    prompt_ids: list[list[int]],
    coef: float,
    sampling: Any,
    *,
    pad_id: int,
    eos_ids: set[int],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Rollout:
    """One sample per prompt from pi^(1-coef) * pi_ref^coef.

    reference: the frozen reference model, or None when the policy is a LoRA model whose reference is
    the same model with its adapters disabled. Each model keeps its own KV cache.
    """
    if not 0.0 <= coef <= 1.0:
        raise ValueError(f"the mixture coefficient must be in [0, 1], got {coef}")
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def reference_forward(**inputs):
        if reference is not None:
            return reference(**inputs)
        with policy.disable_adapter():
            return policy(**inputs)

    # A model whose weight in the mixture is 0 is not run at all.
    forwards = {"policy": policy if coef < 1 else None, "reference": reference_forward if coef > 0 else None}
    caches: dict[str, Any] = dict.fromkeys(forwards)
    was_training = policy.training
    policy.eval()
    batch = len(prompt_ids)
    tokens = torch.full((batch, sampling.max_completion_length), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    step_ids, step_positions = ids, positions
    try:
        with autocast:
            for t in range(sampling.max_completion_length):
                last_logits = {}
                for name, forward in forwards.items():
                    if forward is None:
                        continue
                    out = forward(
                        input_ids=step_ids,
                        attention_mask=mask,
                        position_ids=step_positions,
                        past_key_values=caches[name],
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    caches[name], last_logits[name] = out.past_key_values, out.logits[:, -1]
                policy_logits = last_logits.get("policy", last_logits.get("reference"))
                reference_logits = last_logits.get("reference", policy_logits)
                logprobs = mix_logprobs(policy_logits, reference_logits, coef, sampling.temperature)
                logprobs = filter_logits(logprobs, sampling.top_k, sampling.top_p)
                sampled = torch.multinomial(torch.softmax(logprobs, dim=-1), 1).squeeze(1)  # (B,)
                sampled = torch.where(done, torch.full_like(sampled, pad_id), sampled)
                tokens[:, t] = sampled
                done = done | torch.isin(sampled, eos)
                if bool(done.all()):
                    break
                step_ids = sampled.unsqueeze(1)
                step_positions = step_positions[:, -1:] + 1
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
    finally:
        policy.train(was_training)
    cut = [cut_at_eos(row, eos_ids) for row in tokens[:, : t + 1].tolist()]
    return Rollout(
        completion_ids=[row for row, _ in cut],
        finished=[ended for _, ended in cut],
        sampler_logprobs=None,
    )
