"""One step off-policy: the next rollout generates in a background thread while the trainer trains on this one.

    step t:  [sync w_t] -> start generating rollout t+1 with w_t  ->  train on rollout t (from w_t-1) -> w_t+1
                                   (background thread)                  (this thread, at the same time)

Rollout t+1 then trains weights one update newer than the ones that sampled it; the loop's truncated
importance weights (vllm.importance_sampling_correction) correct for that, token by token. The engine is
only ever used by one thread at a time: the weights are pushed before the thread starts, and anything
else that uses the engine (evaluation, the end of the run) waits for the thread first.

On a GPU the generating thread gets its own CUDA stream, of high priority, so the engine's kernels can run
beside the trainer's instead of queueing behind them on the default stream. Both threads need the
interpreter: the trainer to launch its kernels, the engine to schedule every decoding step (a few ms of
Python each). While a rollout is in flight the interpreter switches threads every 0.5 ms instead of
Python's 5 ms, so a decoding step does not wait out the trainer's turn. With `vllm.separate_process=true`
the engine schedules in a process of its own, and this thread mostly waits for its results.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from online_rl.engines import Rollout

# How often the interpreter hands the lock to the other thread while both run (Python's default: 5 ms)
SWITCH_INTERVAL_S = 0.0005


@dataclass
class PendingRollout:
    rows: list[dict[str, Any]]  # the dataset rows of the prompts
    prompt_ids: list[list[int]]
    sampler_state: dict[str, Any]  # the prompt sampler before it drew these rows: what a checkpoint saves
    future: Future  # -> (Rollout, seconds the engine took)


class RolloutAhead:
    """Runs engine.generate in one background thread; at most one rollout in flight."""

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self.pending: PendingRollout | None = None
        self.default_switch_interval = sys.getswitchinterval()

    def start(self, rows, prompt_ids, n: int, sampling, sampler_state: dict[str, Any]) -> None:
        """Generate n samples per prompt in the background, with the weights the engine holds now."""
        if self.pending is not None:
            raise RuntimeError("a rollout is already in flight: take it before starting the next")
        # The weights were just pushed by kernels queued on this thread's stream; the generating stream must
        # not start before they have run, or it would sample with a mix of the old and the new weights.
        weights_pushed = None
        if self.device.type == "cuda":
            weights_pushed = torch.cuda.Event()
            weights_pushed.record(torch.cuda.current_stream(self.device))
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        future = self.executor.submit(self._generate, prompt_ids, n, sampling, weights_pushed)
        self.pending = PendingRollout(rows, prompt_ids, sampler_state, future)

    def take(self) -> tuple[PendingRollout, Rollout, float]:
        """Wait for the rollout in flight: (what was started, the rollout, the engine's seconds on it).
        An exception raised while generating is raised here."""
        pending = self.pending
        # on an error it stays pending, so that a checkpoint keeps its prompts
        rollout, seconds = pending.future.result()
        self.pending = None
        return pending, rollout, seconds

    def wait(self) -> None:
        """Let the rollout in flight finish (its result stays for `take`), so the engine is free."""
        if self.pending is not None:
            self.pending.future.exception()  # blocks until done; the exception, if any, comes with take()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        sys.setswitchinterval(self.default_switch_interval)

    def _generate(self, prompt_ids, n, sampling, weights_pushed) -> tuple[Rollout, float]:
        started = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        # A high-priority stream: the GPU schedules a waiting decoding kernel before the trainer's next one.
        # Generation is the longer half of an overlapped step (2.3 s against 1.1 s of training alone on the
        # H200), so its kernels are the ones not to keep waiting.
        stream = torch.cuda.Stream(self.device, priority=-1) if on_gpu else None
        if weights_pushed is not None:
            stream.wait_event(weights_pushed)
        with torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext():
            try:
                rollout = self.engine.generate(prompt_ids, n, sampling)
                if on_gpu:
                    torch.cuda.current_stream(self.device).synchronize()
            finally:  # the trainer alone again: back to the interpreter's default
                sys.setswitchinterval(self.default_switch_interval)
        return rollout, time.perf_counter() - started
