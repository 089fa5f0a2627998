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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"


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
        write_manifest(staging)  # last: inside the atomic rename, and its presence means the rest was written
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException as error:
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ..." from its zip writer): look at
        # the free space before the staging files are removed and give it back
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        full = full or (isinstance(error, RuntimeError) and shutil.disk_usage(checkpoint_root).free < 1 << 26)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing {final}; it was not written and the checkpoints "
                f"before it are intact. Free space under {checkpoint_root}, then resume with resume=auto",
            ) from error
        raise
    return final


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
