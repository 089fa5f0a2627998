"""`vllm=off`: transformers `generate` on the trainer's own model."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationConfig

from online_rl.engines.protocol import Rollout


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(rows), longest row), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first EOS, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1], True
    return tokens, False


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    ids.add(tokenizer.eos_token_id)
    return ids


def decoding_options(sampling: Any) -> dict[str, Any]:
    """generate's decoding arguments: greedy at temperature 0 (evaluation), else sampling as configured."""
    if sampling.temperature == 0:
        return {"do_sample": False}
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
    }


class TransformersEngine:
    """`vllm=off`: transformers `generate` on the trainer's own model object.

    It is the baseline without vLLM and the engine for CPU-only machines. Because it samples from
    the very module the optimizer updates, it always generates with the latest weights.
    It reports no sampler log-probs: the trainer's own forward pass computes them.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, device: torch.device, autocast_dtype: torch.dtype | None
    ):
        self.model, self.tokenizer, self.device, self.autocast_dtype = (
            model,
            tokenizer,
            device,
            autocast_dtype,
        )
        self.eos_ids = eos_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        greedy = sampling.temperature == 0  # evaluation's greedy decoding; training always samples
        config = GenerationConfig(
            **decoding_options(sampling),
            repetition_penalty=1.0,  # explicit: a hub generation_config must not change what the trainer scores
            max_new_tokens=sampling.max_completion_length,
            num_return_sequences=1 if greedy else n,  # the n greedy completions are one, copied
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with autocast:
                sequences = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                    # FSDP2: every forward gathers weights with the other ranks, so all decode until the last is done
                    synced_gpus=isinstance(self.model, FSDPModule),
                )
        finally:
            self.model.train(was_training)
        if greedy:
            sequences = sequences.repeat_interleave(n, dim=0)
        new_tokens = sequences[:, ids.shape[1] :].tolist()  # (P * n, <= max_completion_length)
        cut = [cut_at_eos(row, self.eos_ids) for row in new_tokens]
        return Rollout(
            completion_ids=[tokens for tokens, _ in cut],
            finished=[ended for _, ended in cut],
            sampler_logprobs=None,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: this engine generates with the trainer's module itself."""
        if model is not self.model:
            raise ValueError(
                "TransformersEngine generates with the trainer's own model; it cannot sync another one"
            )

    def close(self) -> None:
        self.model = None
