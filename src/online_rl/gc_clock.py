"""Python's garbage collector in a training run: its seconds, logged per step as `time/gc_s` (of them the full
collections', `time/gc_full_s`, their count, `gc/full_collections`, and the objects they freed,
`gc/full_collected`), and the heap frozen after the first step so that later collections leave the run's
long-lived objects alone.

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


class FrozenHeap:
    """`with FrozenHeap():` collects once, then moves every object still alive into the collector's permanent
    generation (`gc.freeze`) until the block ends, when they become collectable again.

    After a run's first step its heap holds what lives until the end: torch, the model and its compiled
    graphs, the engine, the data. A full collection walks all of it (0.65-0.8 s on the H200 in two of five
    off-policy steps, where nothing else had frozen it); frozen, it walks only what later steps made. An
    object frozen here that later becomes garbage in a reference cycle waits for the block's end.
    """

    def __enter__(self) -> FrozenHeap:
        gc.collect()  # the garbage first: frozen, it would stay
        gc.freeze()
        return self

    def __exit__(self, *exc_info) -> None:
        gc.unfreeze()
