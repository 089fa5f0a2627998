"""Token log-probs of completions under a model: the trainer's side of every ratio, KL and sync check."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PackedBatch:
    """Prompts left-padded and completions right-padded, side by side: [pad.. prompt | completion ..pad]."""

    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    completion_mask: torch.Tensor  # (B, C), 1 on tokens the model sampled (not padding, not an environment's)
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
    model_masks: list[list[int]] | None = None,
) -> PackedBatch:
    """One batch of (prompt, completion) token rows, padded only as wide as its own longest rows.

    model_masks: per completion token, 1 where the model wrote it (multi-turn: 0 on an environment's reply,
    which stays in the input but leaves the completion mask)."""
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
        if model_masks is not None:
            completion_mask[i, : len(completion)] = torch.tensor(model_masks[i], dtype=torch.long)
    sampler_logp = None
    if sampler_logprobs is not None:
        sampler_logp = torch.zeros((batch, completion_width))
        for i, row in enumerate(sampler_logprobs):
            sampler_logp[i, : len(row)] = torch.tensor(row)
    return PackedBatch(input_ids, attention_mask, completion_mask, sampler_logp)


def micro_batch_rows(
    rows: list[int],
    row_lengths: list[int],
    rows_per_micro_batch: int,
    by_length: bool,
    rows_per_unit: int = 1,
) -> list[list[int]]:
    """`rows` grouped into micro-batches of `rows_per_micro_batch` rows (the last may hold fewer).

    rows_per_unit: consecutive rows that must share a micro-batch, in their order (2: a preference pair).
    row_lengths: tokens of each rollout row, prompt and completion. by_length: units longest first, so that
    rows of similar length share a micro-batch and little of it is padding (`pack` pads every row to the
    micro-batch's longest), and the most memory-hungry micro-batch runs first; otherwise the rollout's order.
    The count of micro-batches depends only on the count of rows: every rank runs as many backward passes,
    as DDP and FSDP2 require.
    """
    units = [rows[start : start + rows_per_unit] for start in range(0, len(rows), rows_per_unit)]
    if by_length:  # a stable sort: rows of equal length keep the rollout's order
        units.sort(key=lambda unit: -max(row_lengths[row] for row in unit))
    units_per_batch = max(1, rows_per_micro_batch // rows_per_unit)
    return [
        [row for unit in units[start : start + units_per_batch] for row in unit]
        for start in range(0, len(units), units_per_batch)
    ]


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
    width, length = batch.completion_width, batch.input_ids.shape[1]
    # Only the positions that predict completion tokens (P - 1 ... P + C - 2), as indices: the logits come out
    # contiguous (B, C, V), and their gradient is written once (a slice of C + 1 positions made backward zero
    # a (B, C + 1, V) tensor and copy into it; a 0.73 s training step on the H200 spent 34 ms in copies and
    # fills).
    predicting = torch.arange(length - width - 1, length - 1, device=batch.input_ids.device)
    with autocast:
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=predicting,
        ).logits
    # (B, C, V): position t predicts completion token t
    return token_logprobs(logits, batch.input_ids[:, -width:], temperature, with_entropy)


# Logit rows upcast to fp32 at a time: about 1 GiB of fp32, whatever the micro-batch (a 152k vocabulary
# makes the full (B, C, V) fp32 tensor 2.5 GiB per 8 x 512 completion tokens, several times over in backward).
CHUNK_ELEMENTS = 2**28


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) at the targets, (B, C), from logits (B, C, V) in any dtype, computed
    in fp32. The entropy (B, C) comes without gradient.

    On a GPU: `fused_token_logprobs`, torch.compile'd kernels that read the logits in their own dtype and
    upcast in registers. On a CPU, the eager ops run a chunk of rows at a time under activation
    checkpointing, so the backward pass recomputes each chunk's fp32 values instead of keeping them.
    """
    if logits.is_cuda:
        return fused_token_logprobs(logits, targets, temperature, with_entropy)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (logits.shape[1] * logits.shape[2]))
    logps, entropies = [], []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk, target = logits[start : start + rows_per_chunk], targets[start : start + rows_per_chunk]
        if chunk.requires_grad and torch.is_grad_enabled():
            logps.append(checkpoint(chunk_logprobs, chunk, target, temperature, use_reentrant=False))
        else:
            logps.append(chunk_logprobs(chunk, target, temperature))
        if with_entropy:
            with torch.no_grad():
                entropies.append(chunk_entropy(chunk, temperature))
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def fused_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` in two torch.compile'd kernels (inductor's C++ ones on a CPU, as the tests run it).

    Forward: one reduction over the vocabulary gives the log-probs, the log-normaliser and the entropy.
    Backward: one element-wise pass writes d logp / d logits = (onehot(target) - softmax) / temperature in
    the logits' dtype, from the logits and the saved log-normaliser. Before, autograd differentiated the
    compiled log-probs (its backward scattered into an fp32 zero tensor the size of the logits, then made
    another full pass) and the entropy was a kernel of its own: four kernels took 0.11 s of a 0.79 s
    training step of a 0.5B model on the H200 (2026-11-30 profile).
    """
    return TokenLogprobs.apply(logits, targets, temperature, with_entropy)


class TokenLogprobs(torch.autograd.Function):
    """The kernels see the logits as rows (B x C, V): the rows' count varies from one micro-batch to the next
    and is compiled as a symbol, the vocabulary is a constant. Compiled with every size a symbol, they took
    3.2 ms (forward) and 7.5 ms (backward) per 16 x 512 completion tokens on the H200, 6-7x what reading and
    writing the bf16 logits needs; a run-time division by the vocabulary for every element is the likely
    cause."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy):
        rows, row_targets = as_rows(logits, targets)
        logp, log_normalizer, entropy = compiled(logprob_forward)(
            rows, row_targets, temperature, with_entropy
        )
        ctx.save_for_backward(rows, row_targets, log_normalizer)
        ctx.temperature, ctx.shape = temperature, logits.shape
        if entropy is not None:
            entropy = entropy.view(targets.shape)
            ctx.mark_non_differentiable(entropy)
        return logp.view(targets.shape), entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None:  # only the entropy was used, which has no gradient
            return None, None, None, None
        rows, row_targets, log_normalizer, row_grad_logp = mark_rows(
            *ctx.saved_tensors, grad_logp.reshape(-1)
        )
        grad = compiled(logprob_backward)(rows, row_targets, log_normalizer, row_grad_logp, ctx.temperature)
        return grad.view(ctx.shape), None, None, None


def as_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, V) logits and (B, C) targets as (B x C, V) and (B x C,): views of contiguous ones."""
    return mark_rows(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mark_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The compiler is told that the first dimension (rows) varies between calls: one compile serves every
    micro-batch, the other dimensions stay constants."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return tensors


def logprob_forward(logits, targets, temperature: float, with_entropy: bool):
    """(log-probs of the targets, log-normaliser, entropy or None), each (N,) in fp32, from (N, V) logits."""
    scaled = scaled_fp32(logits, temperature)
    log_normalizer = torch.logsumexp(scaled, dim=-1)
    logp = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer
    if not with_entropy:
        return logp, log_normalizer, None
    all_logp = scaled - log_normalizer.unsqueeze(-1)
    return logp, log_normalizer, -(torch.exp(all_logp) * all_logp).sum(dim=-1)


def logprob_backward(logits, targets, log_normalizer, grad_logp, temperature: float):
    """d loss / d logits, (N, V) in the logits' dtype, from d loss / d logp (N,)."""
    probs = torch.exp(scaled_fp32(logits, temperature) - log_normalizer.unsqueeze(-1))
    vocabulary = torch.arange(logits.shape[-1], device=logits.device)
    is_target = (vocabulary == targets.unsqueeze(-1)).float()  # compared in the kernel, never stored
    return ((grad_logp / temperature).unsqueeze(-1) * (is_target - probs)).to(logits.dtype)


def chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = scaled_fp32(logits, temperature)
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def chunk_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = scaled_fp32(logits, temperature)
    return torch.logsumexp(scaled, dim=-1) - (torch.softmax(scaled, dim=-1) * scaled).sum(dim=-1)


def scaled_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits  # one full-size pass fewer at T = 1


@functools.cache
def compiled(function):
    """`function` torch.compile'd, on first use rather than at import (importing the compiler costs a run that
    never uses it ~1.7 s of start-up). Only the dimensions `mark_rows` names are compiled as symbols."""
    return torch.compile(function)
