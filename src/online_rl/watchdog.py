"""A watchdog over the phases of a step (sync, generate, reward, train, checkpoint).

A phase that runs past its limit (`watchdog_seconds.<phase>`) gets every thread's stack logged, then the
run fails with an error naming the phase and the knob, instead of hanging silently. A thread of ours
watches the clock and wakes the main thread with a signal (SIGUSR2: SIGALRM belongs to math-verify's
timeouts); the signal interrupts a sleep or a blocking wait. If the main thread is stuck in C code that
never returns to Python, faulthandler dumps the stacks and ends the process GRACE_S seconds later.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping

log = logging.getLogger(__name__)

WAKE_SIGNAL = signal.SIGUSR2
GRACE_S = 30.0  # after the limit, how long Python gets to raise before faulthandler ends the process


class WatchdogTimeout(BaseException):
    """A phase ran past its watchdog_seconds limit.

    Not an Exception, like KeyboardInterrupt: the `except Exception` of the code it interrupts (a reward
    function's, or the reward plumbing's retry) must not swallow it."""


def thread_stacks() -> str:
    """Every thread's current Python stack, innermost call last."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f'Thread "{names.get(ident, ident)}":\n{stack}')
    return "\n".join(parts)


class Watchdog:
    """`start(phase)` arms the limit of that phase (replacing the one before), `stop()` disarms."""

    def __init__(self, limits: Mapping[str, float]):
        self.limits = dict(limits)
        self.phase_name: str | None = None
        self._deadline: float | None = None
        self._expired: str | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._main = threading.main_thread().ident
        self._previous_handler = None
        self._handling = False  # whether our handler of WAKE_SIGNAL is installed (main thread only)
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(WAKE_SIGNAL, self._wake)
            self._handling = True
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()
        if self._handling:
            signal.signal(WAKE_SIGNAL, self._previous_handler)
            self._handling = False

    def start(self, phase: str) -> None:
        limit = self.limits[phase]
        with self._changed:
            self.phase_name = phase
            self._deadline = time.monotonic() + limit if limit > 0 else None
            self._changed.notify()
        faulthandler.cancel_dump_traceback_later()
        if limit > 0 and sys.__stderr__ is not None:
            faulthandler.dump_traceback_later(limit + GRACE_S, exit=True, file=sys.__stderr__)

    def stop(self) -> None:
        with self._changed:
            self.phase_name, self._deadline = None, None
            self._changed.notify()
        faulthandler.cancel_dump_traceback_later()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Watch `name` for the block, then go back to the phase that was running (its clock restarts)."""
        outer = self.phase_name
        self.start(name)
        try:
            yield
        finally:
            if outer is None:
                self.stop()
            else:
                self.start(outer)

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                if self._deadline is None:
                    self._changed.wait()
                elif time.monotonic() < self._deadline:
                    self._changed.wait(self._deadline - time.monotonic())
                else:
                    self._expired, self._deadline = self.phase_name, None
                    log.error(
                        "the %s phase has run longer than watchdog_seconds.%s=%s s; where every thread is:\n%s",
                        self._expired,
                        self._expired,
                        self.limits[self._expired],
                        thread_stacks(),
                    )
                    if self._handling:  # else faulthandler ends the process after GRACE_S
                        signal.pthread_kill(self._main, WAKE_SIGNAL)

    def _wake(self, signum: int, frame) -> None:
        """Runs in the main thread: fail the phase, or pass on a SIGUSR2 that did not come from us."""
        if self._expired is None:
            previous = self._previous_handler
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # the default action (end the process), as if we were not here
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        phase, self._expired = self._expired, None  # faulthandler stays armed in case this is swallowed
        raise WatchdogTimeout(
            f"the {phase} phase ran longer than watchdog_seconds.{phase}={self.limits[phase]} s "
            "(every thread's stack is logged above). If it is stuck, the stacks show where; if it is only "
            f"slow, raise watchdog_seconds.{phase}, or set it to 0 for no limit"
        )
