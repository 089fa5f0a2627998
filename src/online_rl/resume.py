"""Resume a run where a checkpoint left it: the weights (or the LoRA adapter), optimizer, scheduler, data
position, step counter and every RNG state, so the resumed run is the run that would have happened.

The RNG states are restored last, just before the first step, so whatever consumed random numbers while
the run was set up (building the model, the engine) cannot make the two paths differ.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from online_rl import distributed
from online_rl.checkpoint import MANIFEST, SHARDED, TRAINER_STATE, manifest_problems, step_directories
from online_rl.models import is_lora
from online_rl.redaction import redact_override

log = logging.getLogger(__name__)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest `step_NNNNNN` directory with a trainer state, unverified: cheap enough for a signal handler."""
    return next(
        (path for path in step_directories(checkpoint_root) if (path / TRAINER_STATE).is_file()), None
    )


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """Why `checkpoint` cannot be resumed from ([] = it can).

    One written before checkpoints carried a manifest cannot be verified: it passes if it has its trainer state
    (find_checkpoint warns that it is unverified), since refusing it would strand every older run."""
    if (checkpoint / MANIFEST).is_file():
        return manifest_problems(checkpoint)
    if (checkpoint / TRAINER_STATE).is_file():
        return []
    return [f"it has neither {MANIFEST} nor {TRAINER_STATE}"]


def newest_intact_checkpoint(checkpoint_root: Path, resume: str) -> Path | None:
    """The newest checkpoint that passes checkpoint_problems, with a warning for each broken one passed over;
    None when there is no checkpoint at all. All broken is an error: a fresh start would redo the whole run."""
    broken = []
    for checkpoint in step_directories(checkpoint_root):
        problems = "; ".join(checkpoint_problems(checkpoint))
        if not problems:
            return checkpoint
        log.warning(
            "resume=%s: skipping the broken checkpoint %s (%s); trying the one before it",
            resume,
            checkpoint,
            problems,
        )
        broken.append(f"{checkpoint.name}: {problems}")
    if broken:
        raise ValueError(
            f"resume={resume}: every checkpoint under {checkpoint_root} is broken ({' | '.join(broken)}), "
            "so there is none to resume from. Restore the files named from a copy, or start afresh in a new run "
            "directory (hydra.run.dir=<new dir>)"
        )
    return None


def find_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint `resume` names, verified against its manifest: null = none, auto = the newest intact one
    in this run (none yet: a fresh start), a run directory = its newest intact one, or a checkpoint directory
    (broken: an error, since the user asked for that one)."""
    if resume is None:
        return None
    if resume == "auto":
        found = newest_intact_checkpoint(output_dir / "checkpoints", resume)
        if found is None:
            log.info(
                "resume=auto: no checkpoint under %s yet, starting at step 0", output_dir / "checkpoints"
            )
    else:
        found = named_checkpoint(resume)
    if found is not None and not (found / MANIFEST).is_file():
        log.warning(
            "%s has no %s (it was written before checkpoints carried one): its files cannot be verified",
            found,
            MANIFEST,
        )
    return found


def named_checkpoint(resume: str) -> Path:
    """resume=<run dir or checkpoint dir>: the checkpoint to resume from, or an error that says which to use."""
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = newest_intact_checkpoint(path / "checkpoints", resume)
        if found is not None:
            return found
    elif (path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file():
        problems = checkpoint_problems(path)
        if problems:
            run_dir = path.absolute().parent.parent
            raise ValueError(
                f"resume={resume}: this checkpoint is broken ({'; '.join(problems)}). Resume from an intact one: "
                f"resume={run_dir} takes the newest intact checkpoint of its run (resume=auto does so in the "
                "run's own directory), or name an older step_NNNNNN directory beside it"
            )
        return path
    raise FileNotFoundError(
        f"resume={resume}: there is no checkpoint there (no {TRAINER_STATE}). Pass a checkpoint directory "
        "(<run dir>/checkpoints/step_NNNNNN), a run directory, or resume=auto"
    )


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, with an error that names the damaged file: a checkpoint without a manifest
    reaches this point unverified."""
    try:
        return load_file(file)
    except SafetensorError as error:
        raise ValueError(
            f"{file} cannot be read ({error}): the checkpoint is damaged. Resume from an older step_NNNNNN "
            "directory beside it"
        ) from error


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the checkpoint's weights (full model) or adapter (LoRA) into `model`, in place."""
    if is_lora(model):
        adapter = checkpoint / "adapter_model.safetensors"
        if not adapter.is_file():
            raise ValueError(
                f"{checkpoint} holds full model weights, not a LoRA adapter: resume it with model.lora.enabled=false"
            )
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, read_safetensors(adapter))
        if result.unexpected_keys:
            raise ValueError(
                f"{checkpoint}'s adapter has weights this model has no place for ({result.unexpected_keys[:3]}...): "
                "resume with the model.lora.* settings of the run that wrote it"
            )
        return
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise ValueError(
            f"{checkpoint} holds no model weights (model*.safetensors), only a LoRA adapter: resume it with "
            "model.lora.enabled=true and the model.lora.* settings of the run that wrote it"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied weights (lm_head = embeddings): missing, but loaded through their twin.
    storage = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    loaded = {storage[name] for name in state if name in storage}
    missing = [name for name in missing if storage[name] not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "resume with the model.* settings of the run that wrote it"
        )


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    """Written by an FSDP2 run: model and optimizer in `sharded/` (torch.distributed.checkpoint)."""
    return (checkpoint / SHARDED / ".metadata").is_file()


def check_checkpoint_fits_sharding(checkpoint: Path, sharded_run: bool) -> None:
    """An FSDP2 run resumes from an FSDP2 checkpoint and the others from theirs: the optimizer state is
    stored per shard in one and whole in the other."""
    sharded = is_sharded_checkpoint(checkpoint)
    if sharded != sharded_run:
        written_by, use = (
            ("an FSDP2 run", "hardware.strategy=fsdp2")
            if sharded
            else ("a run without FSDP2", "hardware.strategy=ddp (or hardware=cpu)")
        )
        raise ValueError(f"{checkpoint} was written by {written_by}: resume it with {use}, as that run was")


def load_sharded_state(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An FSDP2 checkpoint's model and optimizer state into the sharded `model` and its `optimizer`, each rank
    reading its own shards (torch.distributed.checkpoint: any number of ranks can read what any wrote)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to read into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def restore_trainer_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, sampler: Any
) -> tuple[int, dict[str, Any], bool]:
    """Load optimizer (an FSDP2 checkpoint's: already, with the weights), scheduler and data position; returns
    (step, the RNG states to restore before the first step, whether they are this rank's own). Its own: saved
    by a run with as many ranks; else rank 0's (a checkpoint from before every rank's were saved)."""
    state = torch.load(
        checkpoint / TRAINER_STATE, weights_only=False
    )  # our own file: numpy/python RNG states
    try:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except ValueError as error:
        raise ValueError(
            f"{checkpoint}'s optimizer state does not fit this run's trainable parameters ({error}): "
            "resume with the model.* settings of the run that wrote it"
        ) from error
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    ranks_rng = state.get("rng_ranks", [state["rng"]])
    if len(ranks_rng) == distributed.world_size():
        return state["step"], ranks_rng[distributed.rank()], True
    return state["step"], state["rng"], False


def resume_training(
    checkpoint: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler: Any,
    max_steps: int,
    output_dir: Path,
    seed: int,
) -> int:
    """Restore what the weights do not hold (those, and an FSDP2 checkpoint's optimizer state, are loaded
    already: see setup.build_run); the step to continue from.

    Call it last before the first step: it sets each rank's RNG states where the checkpoint left them. A
    checkpoint without every rank's (from before they were saved, or from another number of ranks): rank 0's
    states, then a sampling seed per rank for this resume point (not the straight run's draws).
    """
    step, rng, own = restore_trainer_state(checkpoint, optimizer, scheduler, sampler)
    check_resume_point(step, max_steps, checkpoint)
    trim_metrics(output_dir / "metrics.jsonl", step)
    restore_rng(rng)
    if not own:
        distributed.seed_ranks(seed, step)
    log.info("Resuming from %s at step %d of %d", checkpoint, step, max_steps)
    return step


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_resume_point(step: int, max_steps: int, checkpoint: Path) -> None:
    if step >= max_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, and max_steps={max_steps}: the run is done. "
            f"Raise max_steps to train further (the LR schedule then stretches to the new length)"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics log's lines up to `step`: the steps after the checkpoint are about to be redone."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def task_overrides() -> list[str]:
    """The command line's config overrides when launched through train.py, else none."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return []


def resume_command(output_dir: Path, checkpoint: Path) -> str:
    """`python train.py <the same overrides> hydra.run.dir=<this run> resume=<checkpoint>`, shell-quoted.

    The same run directory keeps one metrics.jsonl and train.log for the whole run.
    """
    kept = [o for o in task_overrides() if not o.lstrip("+~").startswith(("resume=", "output_dir="))]
    words = [*map(redact_override, kept), f"hydra.run.dir={output_dir}", f"resume={checkpoint}"]
    return "python train.py " + " ".join(shlex.quote(word) for word in words)
