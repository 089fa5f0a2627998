"""Bounded-staleness rollouts (off_policy_steps=k >= 1): one background thread keeps the engine generating
while the trainer trains, and never samples with weights more than k optimizer updates older than the ones
the trainer has when it starts training on the rollout.

    trainer:    take r1 -> train -> w2 ------------> take r2 -> train -> w3 -> take r3 ...
    generator:  r2 (w1) -> r3 (w1) -> waits for w2 -> push w2 -> r4 (w2) -> ...        (k = 2, one pass each)

    (r_u: the rollout the trainer starts on after u updates; w_v: the weights after v updates. r3, sampled
    with w1, trains w3: staleness 2. r4 may not start before w2 exists: with w1 it would be 3 behind.)

Versions count the trainer's optimizer updates. The rollout whose first update is u (the trainer has made u
updates when it starts on it) may start generating once the trainer has made u - k (`may_start`); it samples
with the newest weights then, v >= u - k, so its staleness u - v is at most k (logged as `rollout/staleness`;
with num_iterations > 1 the later passes reuse the rollout as on-policy ones do). The loop's truncated
importance weights (vllm.importance_sampling_correction) correct for it token by token.

Where weights are pushed: on the generating thread, between two rollouts (each rollout is sampled entirely
with one version), and only when the trainer has moved since the last push. The trainer holds a lock around
optimizer.step, the only place its weights change, and the push holds the same lock: a push never reads
weights an update is writing, and an update waits at most for one push. A server needs no /pause for it:
the only requests it serves are this thread's, and none is in flight during a push.

The prompts are drawn on the trainer's thread (the sampler is its alone), up to ceil(k / num_iterations)
rollouts ahead of the one it trains (`first_updates_to_draw`); each remembers the sampler as it was before
its rows, and a checkpoint saves that of the oldest rollout not trained yet, so a resumed run draws those
prompts again: none lost, none trained twice. The first rollout of a run (or of a resume) has nothing in
flight: the trainer generates it itself, on-policy, and the sync check applies to it as to every rollout of
staleness 0.

The engine is only ever used by one thread at a time: the trainer uses it only with nothing queued (the first
rollout) or after `pause` (evaluation, the end of the run), which waits for the rollout being generated and
starts no other until the next `take`. An error while pushing or generating is kept with that rollout and
raised by `take` on the trainer's thread (where an EngineUnavailable checkpoints before the run stops); the
thread then stops. `close` waits a bounded time for a rollout being generated, never longer.

On a GPU the generating thread gets its own CUDA stream, of high priority, so the engine's kernels can run
beside the trainer's instead of queueing behind them on the default stream. Both threads need the
interpreter: the trainer to launch its kernels, the engine to schedule every decoding step (a few ms of
Python each). While a rollout is being generated the interpreter switches threads every 0.5 ms instead of
Python's 5 ms, so a decoding step does not wait out the trainer's turn. With `vllm.separate_process=true`
the engine schedules in a process of its own, and this thread mostly waits for its results.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from online_rl.engines import Rollout

log = logging.getLogger(__name__)

# How often the interpreter hands the lock to the other thread while both run (Python's default: 5 ms)
SWITCH_INTERVAL_S = 0.0005
# close(): how long to wait for a rollout being generated (engine calls have timeouts of their own)
CLOSE_WAIT_S = 120.0


def may_start(first_update: int, trainer_version: int, max_staleness: int) -> bool:
    """Whether the rollout first trained at update `first_update` may be sampled now, with the weights of
    `trainer_version` updates: only if they are at most k = max_staleness updates older,

        trainer_version >= first_update - k

    (the trainer's version only grows, so a rollout that may start stays so)."""
    return trainer_version >= first_update - max_staleness


def rollouts_ahead(max_staleness: int, updates_per_rollout: int) -> int:
    """How many rollouts beyond the one in training may be drawn, ceil(k / mu): the rollout j places ahead
    starts at update u + j * mu and may start once the trainer is at u + j * mu - k, which it reaches while
    training this rollout (updates u .. u + mu - 1) only for j <= ceil(k / mu)."""
    return math.ceil(max_staleness / updates_per_rollout)


def first_updates_to_draw(
    step: int, queued: int, max_staleness: int, updates_per_rollout: int, max_steps: int
) -> list[int]:
    """The first updates of the rollouts to draw now, as the trainer starts on the rollout at update `step`
    with `queued` rollouts drawn after it: those up to `rollouts_ahead` places ahead that the run will train
    (first update < max_steps), the j-th place at step + j * mu."""
    ahead = rollouts_ahead(max_staleness, updates_per_rollout)
    places = range(queued + 1, ahead + 1)
    return [step + j * updates_per_rollout for j in places if step + j * updates_per_rollout < max_steps]


@dataclass
class Sampled:
    rollout: Rollout
    weights_version: int  # the trainer's updates in the weights that sampled it
    push_s: float  # pushing those weights first (0 when the engine held them already)
    generate_s: float


@dataclass
class PendingRollout:
    rows: list[dict[str, Any]]  # the dataset rows of the prompts
    prompt_ids: list[list[int]]
    sampler_state: dict[str, Any]  # the prompt sampler before it drew these rows: what a checkpoint saves
    first_update: int  # the trainer's update count when it starts training on this rollout
    started: bool = False
    result: Future = field(default_factory=Future)  # -> Sampled


class RolloutsAhead:
    """One background thread that generates the queued rollouts in order, each as soon as `may_start` allows.

    The trainer's side: `add` (a rollout to generate), `take` (the oldest, once generated), `updating_weights`
    (around optimizer.step), `engine_holds` (after it pushed and generated itself), `pause`, `close`."""

    def __init__(
        self, engine, model: torch.nn.Module, device: torch.device, max_staleness: int, n: int, sampling
    ):
        self.engine, self.model, self.device = engine, model, device
        self.max_staleness, self.n, self.sampling = max_staleness, n, sampling
        self.queue: deque[PendingRollout] = deque()  # drawn and not trained yet, oldest first
        self.trainer_version = 0  # the trainer's optimizer updates so far
        self.engine_version: int | None = None  # the version the engine holds (None: unknown, push first)
        self.paused = self.closing = self.stopped = self.generating = False
        self.changed = threading.Condition()  # guards the fields above; notified whenever one changes
        # held by optimizer.step (trainer) and by a push (this thread); taken before `changed` when both are
        self.weights = threading.Lock()
        self.stream = None  # the generating thread's CUDA stream (GPU only), made by that thread
        self.updated = None  # a CUDA event after the last optimizer step's kernels (GPU only)
        self.default_switch_interval = sys.getswitchinterval()
        self.thread = threading.Thread(target=self._run, name="rollouts-ahead", daemon=True)
        self.thread.start()

    # --- the trainer's thread ---

    def add(self, pending: PendingRollout) -> None:
        with self.changed:
            self.queue.append(pending)
            self.changed.notify_all()

    @property
    def queued(self) -> int:
        with self.changed:
            return len(self.queue)

    def take(self) -> tuple[PendingRollout, Sampled]:
        """The oldest rollout, once generated (waiting for it if need be). An error raised while pushing or
        generating it is raised here, and the rollout stays queued, so that a checkpoint keeps its prompts."""
        with self.changed:
            self.paused = False
            pending = self.queue[0]
            self.changed.notify_all()
        sampled = pending.result.result()
        with self.changed:
            self.queue.popleft()
        return pending, sampled

    @contextlib.contextmanager
    def updating_weights(self, version: int):
        """Around optimizer.step: no push reads the weights meanwhile; afterwards the trainer is at `version`."""
        with self.weights:
            yield
            if self.device.type == "cuda":  # a push reads the weights on its own stream: after these kernels
                self.updated = torch.cuda.Event()
                self.updated.record(torch.cuda.current_stream(self.device))
            with (
                self.changed
            ):  # (still holding the weights: a push never reads new weights as the old version)
                self.trainer_version = version
                self.changed.notify_all()

    def engine_holds(self, version: int) -> None:
        """The trainer pushed its weights at `version` updates itself (nothing was queued)."""
        with self.changed:
            self.trainer_version = self.engine_version = version

    def sampler_state(self) -> dict[str, Any] | None:
        """The sampler before the oldest rollout not trained yet; None when nothing is queued."""
        with self.changed:
            return self.queue[0].sampler_state if self.queue else None

    def pause(self) -> None:
        """Let the rollout being generated finish and start no other until the next `take`: the engine is
        free for the trainer's thread. Whoever uses it meanwhile may push other weights: push again after."""
        with self.changed:
            self.paused = True
            while self.generating:
                self.changed.wait()
            self.engine_version = None

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.thread.join(timeout)
        if self.thread.is_alive():  # a daemon: it cannot keep the process alive
            log.warning("a background rollout was still generating after %.0f s; not waiting for it", timeout)
        sys.setswitchinterval(self.default_switch_interval)

    # --- the generating thread ---

    def next_to_start(self) -> PendingRollout | None:
        """The oldest rollout not started, if it may start now (call holding `changed`)."""
        if self.paused or self.stopped:
            return None
        pending = next((p for p in self.queue if not p.started), None)
        if pending is None or not may_start(pending.first_update, self.trainer_version, self.max_staleness):
            return None
        return pending

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.closing and (pending := self.next_to_start()) is None:
                    self.changed.wait()
                if self.closing:
                    return
                pending.started, self.generating = True, True
            try:
                sampled = self.sample(pending)
            except BaseException as error:  # the trainer raises it when it takes this rollout
                with self.changed:
                    self.generating, self.stopped = False, True  # the engine failed: generate nothing more
                    pending.result.set_exception(error)
                    self.changed.notify_all()
                return
            with self.changed:  # the engine is free before the trainer sees the result
                self.generating = False
                pending.result.set_result(sampled)
                self.changed.notify_all()

    def sample(self, pending: PendingRollout) -> Sampled:
        """Push the trainer's newest weights (if the engine lacks them), then generate with them."""
        if self.device.type == "cuda" and self.stream is None:
            # A high-priority stream: the GPU schedules a waiting decoding kernel before the trainer's next one.
            # Generation is the longer half of an overlapped step (2.3 s against 1.1 s of training alone on the
            # H200), so its kernels are the ones not to keep waiting.
            self.stream = torch.cuda.Stream(self.device, priority=-1)
        stream = self.stream

        def on_stream():
            return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

        with self.weights:  # no optimizer.step while the push reads the weights
            with self.changed:
                version, held = self.trainer_version, self.engine_version
            push_s = 0.0
            if version != held:
                started = time.perf_counter()
                with on_stream():
                    if stream is not None and self.updated is not None:
                        stream.wait_event(self.updated)
                    self.engine.sync_weights(self.model)
                    if stream is not None:  # read in full before the next update may write
                        stream.synchronize()
                with self.changed:
                    self.engine_version = version
                push_s = time.perf_counter() - started
        generating = time.perf_counter()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            with on_stream():
                rollout = self.engine.generate(pending.prompt_ids, self.n, self.sampling)
                if stream is not None:
                    stream.synchronize()
        finally:  # the trainer alone again: back to the interpreter's default
            sys.setswitchinterval(self.default_switch_interval)
        return Sampled(rollout, version, push_s, time.perf_counter() - generating)
