"""The record of one rollout: a row per completion, and the micro-batches the training passes run on.

N = prompts x samples per prompt (G), prompt-major: row p * G + k is sample k of prompt p. Every per-row
fact of a step lives here, in one place, so nothing else keeps parallel lists or re-slices them by index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from online_rl.engines import Rollout
from online_rl.logprobs import PackedBatch, micro_batch_rows, pack


@dataclass
class MicroBatch:
    """Rows of the rollout packed for one forward and backward, with what the loss needs of each row."""

    packed: PackedBatch  # on the device: [pad.. prompt | completion ..pad] (B, P + C), masks, sampler logp
    rows: list[int]  # their rows in the rollout
    signal: dict[str, torch.Tensor]  # each (B,) on the device: the rows' advantages, their pair's ranking
    from_engine: torch.Tensor  # (B,) bool: sampled by the engine (its log-probs are in packed.sampler_logp)
    tokens: int  # real prompt and completion tokens
    positions: int  # token positions after padding (B x (P + C))
    old_logp: torch.Tensor | None = None  # (B, C) of the rollout policy, when several passes need it fixed
    ref_logp: torch.Tensor | None = None  # (B, C) of the reference policy, when the loss has a KL term


@dataclass
class Samples:
    """One rollout, a row per completion (N rows)."""

    group_size: int  # G: consecutive rows that share a prompt
    prompts: list[str]  # (N) the question each row answers
    prompt_ids: list[list[int]]  # (N) its token ids, as the engine saw them
    columns: dict[str, list]  # the dataset's other columns (`solution`, ...) and completion_lengths, per row
    completion_ids: list[list[int]]  # (N) sampled tokens, EOS included when the model emitted it
    completions: list[str]  # (N) decoded
    finished: torch.Tensor  # (N,) bool: ended with EOS (not cut at max_completion_length)
    from_engine: torch.Tensor  # (N,) bool: sampled by the engine, not by Nash-MD's / XPO's mixture
    sampler_logprobs: list[list[float]] | None  # (N) the engine's log-probs of its tokens ([] for others)
    # (N) per completion token, 1 where the model wrote it and 0 for an environment's reply (multi-turn); None:
    # all the model's. Only the model's tokens enter the loss and the sync check.
    model_mask: list[list[int]] | None = None
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # per reward function, (N) each
    rewards: torch.Tensor | None = None  # (N,) their weighted total
    ranking_scores: torch.Tensor | None = None  # (N,) what ranks a preference pair: a reward model or rewards
    # (N,) log pi_old(y|x) - log pi_ref(y|x) of each completion, once the no-grad passes measured both (RLOO's
    # KL in the reward)
    ref_log_ratio: torch.Tensor | None = None
    # the algorithm's learning signal, (N,) each: the advantage of every row, or the ranking of its pair
    signal: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_rollout(
        cls,
        rows: list[dict[str, Any]],
        prompt_ids: list[list[int]],
        rollout: Rollout,
        from_engine: list[bool],
        tokenizer: Any,
    ) -> Samples:
        """The record of `rollout`'s completions of the dataset `rows` (prompt-major, G = rollout rows / rows).
        from_engine: which rows the engine sampled (all but the mixture's samples of Nash-MD and XPO)."""
        completion_ids = rollout.completion_ids
        group_size = len(completion_ids) // len(rows)

        def expand(values: list) -> list:  # a prompt's value on each of its G rows
            return [value for value in values for _ in range(group_size)]

        columns = {key: expand([row[key] for row in rows]) for key in rows[0] if key != "prompt"}
        columns.update(rollout.columns)  # multi-turn: the environment's reward of each sample
        columns["completion_lengths"] = [len(c) for c in completion_ids]
        return cls(
            group_size=group_size,
            prompts=expand([row["prompt"] for row in rows]),
            prompt_ids=expand(prompt_ids),
            columns=columns,
            completion_ids=completion_ids,
            completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            finished=torch.tensor(rollout.finished),
            from_engine=torch.tensor(from_engine),
            sampler_logprobs=rollout.sampler_logprobs,
            model_mask=rollout.model_mask,
        )

    def row_lengths(self) -> list[int]:
        """(N) tokens of each row, prompt and completion."""
        return [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids)]

    def longest_row(self) -> int:
        return max(self.row_lengths(), default=0)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def micro_batches(
        self,
        trained: torch.Tensor,
        rows_per_micro_batch: int,
        by_length: bool,
        rows_per_unit: int,
        *,
        pad_id: int,
        device: torch.device,
        mask_truncated: bool = False,
    ) -> list[MicroBatch]:
        """The `trained` rows ((N,) bool) packed into micro-batches on `device`, longest first when `by_length`.

        rows_per_unit: consecutive rows that share a micro-batch (2: a preference pair). Each micro-batch carries
        its rows' share of `signal` as it stands (see share_signal). mask_truncated: completions cut at
        max_completion_length leave the loss.
        """
        lengths = self.row_lengths()
        rows = [i for i in range(len(self)) if trained[i]]
        groups = micro_batch_rows(rows, lengths, rows_per_micro_batch, by_length, rows_per_unit)
        micro_batches = []
        for index in groups:
            packed = pack(
                [self.prompt_ids[row] for row in index],
                [self.completion_ids[row] for row in index],
                pad_id,
                [self.sampler_logprobs[row] for row in index] if self.sampler_logprobs is not None else None,
                [self.model_mask[row] for row in index] if self.model_mask is not None else None,
            )
            positions = packed.attention_mask.numel()
            packed = packed.to(device)
            if mask_truncated:
                packed.completion_mask = packed.completion_mask * self.finished[index].to(device).unsqueeze(1)
            micro_batches.append(
                MicroBatch(
                    packed,
                    index,
                    {},
                    self.from_engine[index].to(device),
                    tokens=sum(lengths[row] for row in index),
                    positions=positions,
                )
            )
        self.share_signal(self.signal, micro_batches)
        return micro_batches

    def share_signal(self, signal: dict[str, torch.Tensor], micro_batches: list[MicroBatch]) -> None:
        """Keep `signal` ((N,) per key) as the rollout's and give each micro-batch its rows' values on its
        device, in one copy per key: a copy from pageable memory waits for the GPU's queued work."""
        self.signal = signal
        if not micro_batches:
            return
        device, sizes = micro_batches[0].from_engine.device, [len(mb.rows) for mb in micro_batches]
        for key, values in signal.items():
            parts = torch.cat([values[mb.rows] for mb in micro_batches]).to(device).split(sizes)
            for micro_batch, part in zip(micro_batches, parts):
                micro_batch.signal[key] = part
