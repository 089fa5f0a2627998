"""SIGINT / SIGTERM: the first one lets the current step finish, then the run writes a checkpoint, closes
its engine and tracker, and exits non-zero with the command that resumes it; a second one stops at once."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from online_rl.resume import latest_checkpoint, resume_command

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal. A SystemExit, so the command line exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopOnSignal:
    """While entered (in the main thread), SIGINT and SIGTERM set `requested` instead of killing the process."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python handles signals only there
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            checkpoint = latest_checkpoint(self.output_dir / "checkpoints")
            where = (
                f"resume from the last checkpoint:\n    {resume_command(self.output_dir, checkpoint)}"
                if checkpoint
                else "there is no checkpoint to resume from yet"
            )
            error = TrainingInterrupted(
                signum, f"a second {name}: stopped at once, the step in flight is lost; {where}"
            )
            log.error("%s", error)
            raise error
        self.signum = signum
        log.warning(
            "%s: finishing this step, then writing a checkpoint and exiting (send it again to stop at once)",
            name,
        )

    def interrupted(self, checkpoint: Path) -> TrainingInterrupted:
        """The error to raise once the step is done and `checkpoint` is written; it is logged too."""
        name = signal.Signals(self.signum).name
        error = TrainingInterrupted(
            self.signum,
            f"stopped by {name} with a checkpoint at {checkpoint}. Resume with:\n"
            f"    {resume_command(self.output_dir, checkpoint)}",
        )
        log.error("%s", error)
        return error
