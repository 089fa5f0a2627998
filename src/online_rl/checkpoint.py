"""Checkpoints written atomically: everything goes to a temporary directory that is renamed into place,
so a crash or a full disk mid-write leaves the previous checkpoints as they were.

Each checkpoint carries `manifest.json` (every file's size and sha256), written last, so damage done after the
rename (a truncated copy, a deleted file, flipped bytes) is found before a resume trusts the files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
SHARDED = "sharded"  # an FSDP2 checkpoint's torch.distributed.checkpoint directory (model and optimizer)


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
) -> Path:
    """Write `checkpoint_root/step_<step>/` (weights or LoRA adapter, tokenizer, trainer_state.pt) atomically."""
    final, staging = checkpoint_paths(checkpoint_root, step)
    start_staging(staging)
    with removing_staging_on_error(staging, final):
        model.save_pretrained(staging)  # a peft model saves only its adapter
        tokenizer.save_pretrained(staging)
        torch.save({**trainer_state, "step": step, "rng": rng_states()}, staging / TRAINER_STATE)
        commit_checkpoint(staging, final)
    return final


def save_sharded_checkpoint(
    checkpoint_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """An FSDP2 run's checkpoint, written by every rank (call it on all of them), atomically like the others:
    `sharded/` holds the model's and the optimizer's state as torch.distributed.checkpoint writes it (each rank
    its own shards, no gather), beside config.json, the tokenizer and trainer_state.pt (no optimizer: it is
    in sharded/). One manifest covers the shard files too; rank 0 writes it and renames, after every rank's
    shards are on disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from online_rl import distributed

    final, staging = checkpoint_paths(checkpoint_root, step)
    distributed.on_main(lambda: start_staging(staging))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with removing_staging_on_error(staging, final, distributed.rank() == 0):
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDED)

    def finish() -> Path:
        with removing_staging_on_error(staging, final):
            model.config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            torch.save({**trainer_state, "step": step, "rng": rng_states()}, staging / TRAINER_STATE)
            commit_checkpoint(staging, final)
        return final

    return distributed.on_main(finish)  # dcp.save returns on every rank once all the shards are written


def checkpoint_paths(checkpoint_root: Path, step: int) -> tuple[Path, Path]:
    """(the checkpoint's directory, the staging directory it is written in before the rename)."""
    return checkpoint_root / f"step_{step:06d}", checkpoint_root / f".tmp-step_{step:06d}"


def start_staging(staging: Path) -> None:
    """An empty staging directory (a crashed run's half-written one is removed)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def commit_checkpoint(staging: Path, final: Path) -> None:
    """Manifest last, flush, then rename into place: the checkpoint appears whole or not at all."""
    write_manifest(staging)  # last: inside the atomic rename, and its presence means the rest was written
    _fsync_tree(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


@contextmanager
def removing_staging_on_error(staging: Path, final: Path, owner: bool = True) -> Iterator[None]:
    """On any error, remove the staging directory (when this process owns it), leaving the checkpoints
    before it intact; a full disk is reported as such, with what to do."""
    try:
        yield
    except BaseException as error:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ..." from its zip writer): look at
        # the free space before the staging files are removed and give it back
        root = final.parent
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        full = full or (isinstance(error, RuntimeError) and shutil.disk_usage(root).free < 1 << 26)
        if owner:
            shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing {final}; it was not written and the checkpoints "
                f"before it are intact. Free space under {root}, then resume with resume=auto",
            ) from error
        raise


def step_directories(checkpoint_root: Path) -> list[Path]:
    """The `step_NNNNNN` directories, newest first (the half-written `.tmp-step_*` ones do not match)."""
    found = [
        path
        for path in checkpoint_root.glob("step_*")
        if path.is_dir() and path.name.removeprefix("step_").isdigit()
    ]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step_")), reverse=True)


def prune_checkpoints(
    checkpoint_root: Path, keep_last: int | None, written: Path, resumed_from: Path | None
) -> list[Path]:
    """Delete all but the `keep_last` newest checkpoints (null: keep every one); the deleted ones, oldest last.

    Call it only once `written` is renamed into place. Never deleted, whatever keep_last says: the checkpoint
    the run resumed from (the one a user chose to go back to), and the newest intact one (so that resume=auto
    always has one to go to). `written` counts as intact without being read again: its manifest was made
    from these very bytes a moment ago, and hashing them again would double a checkpoint's cost. A newer
    one (left by a run that went on from a later step before this one resumed from an earlier one) is
    verified against its manifest."""
    if keep_last is None:
        return []
    checkpoints = [path.resolve() for path in step_directories(checkpoint_root)]
    written = written.resolve()
    kept = {*checkpoints[:keep_last], written}
    if resumed_from is not None:
        kept.add(resumed_from.resolve())
    newest_intact = next(
        (path for path in checkpoints if path == written or not manifest_problems(path)), None
    )
    kept.add(newest_intact)
    deleted = [path for path in checkpoints if path not in kept]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 16 MiB chunks (hashlib lets go of the GIL, so files hash in parallel threads).

    Why sha256 and not a faster checksum: it is in the standard library and `sha256sum` checks it by hand. It
    runs at about 1.4 GB/s per core (measured on a 2-core machine), reading back from the page cache the
    files were just written to: a 1.5B model's checkpoint (weights and AdamW state, 9-18 GB) costs 6-13 s on one
    core, less where free cores let the files hash side by side. A resume pays the same once, to verify."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def directory_files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest, as sorted relative paths."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST
    )


def write_manifest(directory: Path) -> None:
    """`directory/manifest.json`: {"files": {relative path: {"size": bytes, "sha256": hex}}}."""
    names = directory_files(directory)
    with ThreadPoolExecutor() as pool:
        digests = list(pool.map(sha256_of, [directory / name for name in names]))
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": digest}
        for name, digest in zip(names, digests)
    }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def manifest_problems(checkpoint: Path) -> list[str]:
    """What differs between `checkpoint` and its manifest, one line per file ([] = intact).

    Sizes first (free); the checksums only when every size matches, since that reads every byte once (see
    sha256_of for the cost). Files the manifest does not list are ignored: they cannot break a resume."""
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{MANIFEST} cannot be read ({type(error).__name__}: {error})"]
    problems = []
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != expected["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {expected['size']}")
    if problems:
        return problems
    with ThreadPoolExecutor() as pool:
        digests = list(pool.map(sha256_of, [checkpoint / name for name in files]))
    return [
        f"{name} has the right size but other bytes: its sha256 differs from the manifest's"
        for (name, expected), digest in zip(files.items(), digests)
        if digest != expected["sha256"]
    ]


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
