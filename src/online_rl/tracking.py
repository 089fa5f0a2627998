"""Metrics and sample tables, to one of four trackers behind one interface (`Tracker`): trackio (local,
offline), Weights & Biases, TensorBoard, or none. Each gets the same metric names (`train/loss`, ...), the
same sample tables and the same redacted config; their files go under the run directory (a Hydra sweep's
directory for a sweep, so its runs sit side by side in one dashboard)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# logger=<backend> -> the package it needs (trackio is a core dependency: always installed)
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}


class Tracker(Protocol):
    """What the loop and the evaluator log through; rank 0 holds the real one."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an optimizer step (NaN values, e.g. a reward that scored nothing, are left out)."""

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A table of samples (prompt, completion, reward, each reward's score), one dict per row."""

    def close(self) -> None:
        """Flush and finish the run."""

    def dashboard_command(self) -> str | None:
        """Where the dashboard is: the command (or URL) that shows this run; None without one."""


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with a value: a NaN means "not measured this step" and would break a chart's line."""
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def import_tracker_package(backend: str) -> Any:
    """The package logger=<backend> logs through, or an error that names the override and the pip command."""
    package = PACKAGES[backend]
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"logger={backend} needs the {package} package, which is not installed: pip install "
            f"'online-rl[{backend}]' (or pip install {package}), or log with logger=trackio or logger=none"
        ) from error


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
        self.trackio.log(finite(metrics), step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        import pandas as pd

        self.trackio.log({name: self.trackio.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def close(self) -> None:
        self.trackio.finish()

    def dashboard_command(self) -> str:
        return f'TRACKIO_DIR={self.directory} trackio show --project "{self.project}"'


class WandbTracker:
    """Logs to a Weights & Biases run whose files go to `<directory>/wandb/`. Online it needs `wandb login`;
    WANDB_MODE=offline writes the run locally (no account, no network) for `wandb sync` to upload later."""

    def __init__(self, project: str, run_name: str, directory: Path, config: dict, group: str | None = None):
        wandb = import_tracker_package("wandb")
        directory.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, group=group, config=config, dir=str(directory))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(finite(metrics), step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        import pandas as pd

        self.run.log({name: self.wandb.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def close(self) -> None:
        self.run.finish()

    def dashboard_command(self) -> str:
        if self.run.offline:
            return f"wandb sync {Path(self.run.dir).parent}"  # the run's directory (files/ is inside it)
        return self.run.url


class TensorBoardTracker:
    """Writes TensorBoard event files to `<directory>/tensorboard/<run name>/`: scalars under the same names,
    each sample table as a markdown text summary, and the config as text at step 0."""

    def __init__(self, run_name: str, directory: Path, config: dict):
        import_tracker_package("tensorboard")  # torch's writer below needs it, with a less helpful error
        from torch.utils.tensorboard import SummaryWriter

        self.root = directory / "tensorboard"
        # a run name made of overrides (data.path=/a/b) would otherwise nest directories
        self.writer = SummaryWriter(log_dir=str(self.root / run_name.replace("/", "_")))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in finite(metrics).items():
            self.writer.add_scalar(name, value, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()

    def dashboard_command(self) -> str:
        return f"tensorboard --logdir {self.root}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """rows as a markdown table (TensorBoard's text tab renders it): a header of the first row's keys."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        # a completion of a random model holds any character; splitlines knows every line break
        return "<br>".join(str(value).replace("|", "\\|").splitlines())

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


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
    the trackio (or wandb) group that keeps a sweep's runs together."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return None
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def make_tracker(logger_cfg: Any, run_name: str, directory: Path, config: dict) -> Tracker:
    """logger.backend's tracker, its files under `directory` (the run's, or its sweep's, directory)."""
    backend = getattr(logger_cfg.backend, "value", logger_cfg.backend)
    if backend == "trackio":
        return TrackioTracker(
            logger_cfg.project, run_name, directory / "trackio", config, group=sweep_group()
        )
    if backend == "wandb":
        return WandbTracker(logger_cfg.project, run_name, directory, config, group=sweep_group())
    if backend == "tensorboard":
        return TensorBoardTracker(run_name, directory, config)
    return ConsoleOnlyTracker()
