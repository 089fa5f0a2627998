"""Numerical guard: an update whose loss or gradient norm is not finite is skipped (its gradients are
dropped, the weights and the optimizer's moments stay as they were); too many in a row stop the run."""

from __future__ import annotations

import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Several updates in a row had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive  # 0 = skip forever, never stop
        self.consecutive = 0
        self.skipped_this_step = 0

    def allows_update(self, loss: float, grad_norm: float, step: int) -> bool:
        """True when the update may be applied; counts and logs the ones that may not."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive, self.skipped_this_step = 0, 0
            return True
        self.consecutive, self.skipped_this_step = self.consecutive + 1, 1
        log.warning(
            "step %d: loss %s, gradient norm %s: update skipped (%d in a row; the run stops at "
            "max_consecutive_nonfinite=%d)",
            step,
            loss,
            grad_norm,
            self.consecutive,
            self.max_consecutive,
        )
        return False

    @property
    def must_stop(self) -> bool:
        return 0 < self.max_consecutive <= self.consecutive

    def metrics(self) -> dict[str, float]:
        return {"train/skipped_updates": float(self.skipped_this_step)}

    def error(self, checkpoint: Path) -> NonFiniteError:
        return NonFiniteError(
            f"{self.consecutive} updates in a row had a non-finite loss or gradient norm "
            f"(max_consecutive_nonfinite={self.max_consecutive}); none of them was applied, and the weights "
            f"are saved in {checkpoint}. Look for inf/nan in reward/* and adv/* of metrics.jsonl (a reward's "
            "scale), lower optim.lr, or turn off mixed precision (hardware.autocast_dtype=null); then resume "
            f"with resume={checkpoint}"
        )
