"""`vllm=server` with several training ranks: rank 0 alone talks to the servers.

The servers form one NCCL group with one trainer, so one rank pushes the weights and asks for every
rank's completions:

    sync_weights(model):  rank 0 pushes as with one rank; under FSDP2 the others join the gathers of the
                          full weights (one tensor at a time) and drop them
    generate(...):        every rank's prompts gathered on rank 0 -> one request per server share ->
                          each rank's completions (and rank 0's engine stats) scattered back
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from online_rl import distributed
from online_rl.engines.protocol import Engine, Rollout
from online_rl.engines.weights import inference_weights


class MainRankEngine:
    """An engine that lives on rank 0 (`engine`), None on the other ranks; the same protocol on all."""

    def __init__(self, engine: Engine | None):
        if (engine is not None) != (distributed.rank() == 0):
            raise ValueError("MainRankEngine: rank 0 holds the engine, the other ranks None")
        self.engine = engine

    def sync_weights(self, model: torch.nn.Module) -> None:
        if self.engine is not None:
            self.engine.sync_weights(model)
        else:
            distributed.follow_weights(model, inference_weights)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        size = distributed.world_size()
        shares = [None] * size if self.engine is not None else None
        dist.gather_object(prompt_ids, shares, dst=0)
        parts = [None] * size
        if self.engine is not None:
            rollout = self.engine.generate([ids for share in shares for ids in share], n, sampling)
            start = 0
            for i, share in enumerate(shares):  # prompt-major rows: a rank's prompts x n, in order
                rows = slice(start, start + len(share) * n)
                parts[i] = Rollout(
                    completion_ids=rollout.completion_ids[rows],
                    finished=rollout.finished[rows],
                    sampler_logprobs=rollout.sampler_logprobs[rows]
                    if rollout.sampler_logprobs is not None
                    else None,
                    stats=dict(rollout.stats),
                )
                start = rows.stop
        mine = [None]
        dist.scatter_object_list(mine, parts if self.engine is not None else None, src=0)
        return mine[0]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
