"""Metrics and sample tables: trackio, local and offline, with its data under the run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TrackioTracker:
    """Logs to a trackio project stored in `<output_dir>/trackio` (no hub, no network)."""

    def __init__(self, project: str, run_name: str, directory: Path, config: dict, group: str | None = None):
        self.project = project
        # trackio reads TRACKIO_DIR once, when it is first imported; a later run in the same process
        # (a notebook, Hydra's in-process sweep) keeps writing where the first one did.
        if "trackio" not in sys.modules:
            os.environ["TRACKIO_DIR"] = str(directory)
        import trackio

        self.directory = Path(trackio.utils.TRACKIO_DIR)
        if self.directory != directory:
            log.warning(
                "trackio already writes to %s in this process; this run's metrics go there too",
                self.directory,
            )

        self.trackio = trackio
        trackio.init(
            project=project,
            name=run_name,
            group=group,
            config=config,
            embed=False,
            auto_log_gpu=False,
            auto_log_cpu=False,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        import pandas as pd

        self.trackio.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def close(self) -> None:
        self.trackio.finish()

    def dashboard_command(self) -> str:
        return f'TRACKIO_DIR={self.directory} trackio show --project "{self.project}"'


class ConsoleOnlyTracker:
    """`logger=none`: metrics reach only the console log lines the loop prints."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def dashboard_command(self) -> None:
        return None


def append_metrics(path: Path, step: int, metrics: dict[str, float]) -> None:
    """One JSON line per step in the run directory: the run's record, whatever the logger."""
    with open(path, "a") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")


def sweep_group() -> str | None:
    """A Hydra sweep's directory (e.g. multirun/2026-11-23/10-00-00) while one of its jobs runs, else None:
    the trackio group that keeps a sweep's runs together."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return None
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def make_tracker(logger_cfg: Any, run_name: str, directory: Path, config: dict):
    if logger_cfg.backend == "trackio":
        return TrackioTracker(logger_cfg.project, run_name, directory, config, group=sweep_group())
    return ConsoleOnlyTracker()
