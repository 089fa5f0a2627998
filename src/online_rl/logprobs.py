"""Token log-probs of completions under a model: the trainer's side of every ratio, KL and sync check."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """Prompts left-padded and completions right-padded, side by side: [pad.. prompt | completion ..pad]."""

    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, C), 1 on sampled tokens
    sampler_logp: torch.Tensor | None = None  # (B, C), the engine's log-probs of the sampled tokens

    @property
    def completion_width(self) -> int:
        return self.completion_mask.shape[1]

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.sampler_logp.to(device) if self.sampler_logp is not None else None,
        )


def pack(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    sampler_logprobs: list[list[float]] | None = None,
) -> PackedBatch:
    """One batch of (prompt, completion) token rows, padded only as wide as its own longest rows."""
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(1, max(len(c) for c in completions))
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((batch, completion_width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        start = prompt_width - len(prompt)
        input_ids[i, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, prompt_width : prompt_width + len(completion)] = torch.tensor(
            completion, dtype=torch.long
        )
        attention_mask[i, start : prompt_width + len(completion)] = 1
        completion_mask[i, : len(completion)] = 1
    sampler_logp = None
    if sampler_logprobs is not None:
        sampler_logp = torch.zeros((batch, completion_width))
        for i, row in enumerate(sampler_logprobs):
            sampler_logp[i, : len(row)] = torch.tensor(row)
    return PackedBatch(input_ids, attention_mask, completion_mask, sampler_logp)


def completion_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float,
    autocast_dtype: torch.dtype | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token | prefix) for each completion token, at the sampling temperature: (B, C).

    Position ids count only real tokens, as `generate` and vLLM do, so left padding does not shift
    positions. Also returns the per-token entropy (B, C) when asked (no gradient).
    """
    position_ids = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    autocast = (
        torch.autocast(batch.input_ids.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    width = batch.completion_width
    with autocast:
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=width + 1,  # only the positions that predict completion tokens
        ).logits
    logits = logits[:, :-1].float()  # (B, C, V): position t predicts completion token t
    if temperature != 1.0:  # a full-size pass and copy saved in the common case
        logits = logits / temperature
    targets = batch.input_ids[:, -width:]
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_normaliser - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy
