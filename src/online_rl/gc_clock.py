"""Python's garbage collector in a training run: its seconds, logged per step as `time/gc_s` (of them the full
collections', `time/gc_full_s`, their count, `gc/full_collections`, and the objects they freed,
`gc/full_collected`). Logged with logger.lab_metrics=true (the speed lab's diagnostics).

Generation with vLLM is bound by the CPU: its scheduler's Python runs for every sequence at every decoding
step, and one full collection over a heap of a million objects (torch, vLLM, the compiled model's graphs)
takes a few tenths of a second. A step that is slower than the one before for no reason of its own shows it
here. Collections in every thread count (an off-policy rollout's thread, too). Full collections that free
next to nothing were set off by the heap's growth alone; ones that free many objects, by garbage in reference
cycles that something makes every step.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

OLDEST_GENERATION = 2  # CPython's: a collection of it walks every object not frozen


@dataclass
class CollectorLap:
    seconds: float  # in every collection
    full_seconds: float  # of them in full collections (the oldest generation, walking the whole heap)
    full_collections: int
    full_collected: int  # the objects they freed (garbage in reference cycles)


class CollectorClock:
    """`with CollectorClock() as clock:` ... `clock.lap()`: what the collector spent since the last lap."""

    def __init__(self):
        self.running = CollectorLap(0.0, 0.0, 0, 0)  # since the last lap
        self._started: float | None = None

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            seconds = time.perf_counter() - self._started
            self.running.seconds += seconds
            if info["generation"] == OLDEST_GENERATION:
                self.running.full_seconds += seconds
                self.running.full_collections += 1
                self.running.full_collected += info["collected"]
            self._started = None

    def lap(self) -> CollectorLap:
        lapped, self.running = self.running, CollectorLap(0.0, 0.0, 0, 0)
        return lapped
