"""Checkpoints written atomically: everything goes to a temporary directory that is renamed into place,
so a crash or a full disk mid-write leaves the previous checkpoints as they were."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoint_root/step_<step>/` (weights or LoRA adapter, tokenizer, trainer_state.pt) atomically.

    state_dict: the weights to write when the model cannot give them itself (FSDP2 shards, gathered)."""
    final = checkpoint_root / f"step_{step:06d}"
    staging = checkpoint_root / f".tmp-step_{step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, state_dict=state_dict)  # a peft model saves only its adapter
        tokenizer.save_pretrained(staging)
        torch.save({**trainer_state, "step": step, "rng": rng_states()}, staging / "trainer_state.pt")
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing {final}; it was not written and the checkpoints "
                f"before it are intact. Free space under {checkpoint_root}, then resume with resume=auto",
            ) from error
        raise
    return final


def prepare_output_dir(output_dir: Path) -> None:
    """Create the run directory and check that it takes files, before anything loads."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"the output directory {output_dir} is not writable ({error.strerror or error}): run with a "
            "writable one, hydra.run.dir=<dir> (or output_dir=<dir>)"
        ) from error


def _fsync_tree(directory: Path) -> None:
    """Flush the files to disk before the rename makes them visible."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
