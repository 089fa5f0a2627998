"""What every engine returns and answers. Engines know prompts, token ids, weights and sampling
settings, never the algorithm."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Rollout:
    """n completions per prompt, prompt-major: completion k of prompt p is at index p * n + k."""

    completion_ids: list[list[int]]  # sampled tokens, EOS included when the model emitted it
    finished: list[bool]  # True when the completion ended with EOS, False when max_completion_length cut it
    # the engine's log-prob of each sampled token, if it reports them
    sampler_logprobs: list[list[float]] | None
    stats: dict[str, float] = field(default_factory=dict)  # the engine's own timings and memory, logged as is
    # multi-turn (multiturn.py): per completion token, 1 where the model wrote it, 0 for an environment's reply;
    # None: every token is the model's (what an engine returns)
    model_mask: list[list[int]] | None = None
    columns: dict[str, list] = field(default_factory=dict)  # per completion, for the rewards (env_reward)


class EngineUnavailable(RuntimeError):
    """The engine stopped answering (a server down or unreachable past its timeouts and retries).

    The loop saves a checkpoint before letting it end the run: the trainer's state is intact, only
    generation is gone.
    """


class Engine(Protocol):
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine generate with `model`'s current weights (called before every rollout)."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        """n samples per prompt, prompt-major."""

    def close(self) -> None:
        """Free what the engine holds."""


class Background:
    """fn() on a daemon thread, its wait bounded by the caller: a call that hangs (an NCCL collective, an engine
    process that died mid-call) can neither block the run nor keep the process alive."""

    def __init__(self, fn: Callable[[], Any], what: str):
        self.what, self.value, self.error = what, None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=what)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as error:  # handed to the waiting thread
            self.error = error

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()
