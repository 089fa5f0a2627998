"""Several training processes (ranks): who am I, what do I do alone, what do we agree on.

`accelerate launch --num_processes N train.py hardware=...` (or torchrun) starts N copies of the whole
run; each joins the process group the launcher describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in
the environment) and this module keeps them consistent:

- data: every rank draws the same global batch of `prompts_per_step` prompts (one seeded sampler) and
  keeps its contiguous share, `prompts_per_step / N` prompts. A prompt is never split: all G samples of
  a prompt are generated, scored and trained on by the rank that owns it. Rewards are then all-gathered,
  and advantages computed on the whole rollout (rank-major = the 1-process order), so every statistic
  that spans prompts (`scale_rewards=batch`, RLOO's `normalize_advantages`) is the 1-process one; each
  rank keeps its own rows. Gathering N x G floats costs nothing next to a forward pass.
- loss: DDP and FSDP2 average gradients over ranks, so a loss that is a mean over the rollout (DAPO's
  token mean) is divided by the rollout's tokens per rank; the update then equals the 1-process update
  on the same global batch (tests/test_distributed.py checks it).
- side effects: rank 0 alone writes the config, metrics.jsonl, trackio, checkpoints and the final model
  (FSDP2 checkpoints: every rank writes its own shards, rank 0 the rest),
  prints and shows the progress bar; the other ranks wait at a barrier where the files must exist.
- sampling: generation seeds differ per rank (seed + rank), so ranks do not draw the same completions;
  a checkpoint keeps every rank's RNG states, so a resumed run draws what the straight run would have.

With one process (no launcher, WORLD_SIZE unset or 1) every helper returns its input or does nothing,
so the 1-process run is exactly what it was before this module existed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int  # 0 .. world_size - 1, across all hosts
    world_size: int  # training processes in all
    local_rank: int  # index on this host: the GPU this process uses
    device: torch.device  # where this rank's policy lives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(hardware: Any) -> Ranks:
    """Join the launcher's process group (nccl on GPUs, gloo on CPUs) and pick this rank's device.

    Fails before any work when the launch does not match `hardware.num_processes`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != hardware.num_processes:
        raise ValueError(
            f"hardware.num_processes={hardware.num_processes} but {world_size} process(es) were launched: "
            + (
                f"start it with `accelerate launch --num_processes {hardware.num_processes} train.py ...`"
                if hardware.num_processes > 1
                else "pick a hardware= option made for several processes (cpu2, 2gpu_ddp, 2gpu_fsdp2)"
            )
        )
    if world_size == 1:
        return Ranks(0, 1, 0, torch.device(hardware.device))
    strategy = getattr(hardware.strategy, "value", hardware.strategy)  # the enum's name: ddp | fsdp2
    check_launch_settings(os.environ)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if hardware.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
        global _joined_group
        _joined_group = True
    if rank != 0:  # one console: the other ranks speak only to warn
        logging.getLogger().setLevel(logging.WARNING)
    log.info("%d training processes (%s); this is rank 0 on %s", world_size, strategy, device)
    return Ranks(rank, world_size, local_rank, device)


def check_launch_settings(environ: Mapping[str, str]) -> None:
    """accelerate launch hands its settings on as ACCELERATE_* variables, and this trainer reads none of them:
    hardware= decides the sharding and the precision. Settings that would change training (FSDP, DeepSpeed,
    mixed precision, from a config file or accelerate's default config) stop the run instead of being
    ignored; the launch itself (--multi_gpu, --num_processes, --num_machines, ...) is all it needs."""
    wanted = [
        name
        for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if environ.get(variable, "false").lower() == "true"
    ]
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        wanted.append(f"mixed_precision={precision}")
    if wanted:
        raise ValueError(
            f"accelerate launch passed {', '.join(wanted)}, which this trainer does not read: hardware= sets the "
            "sharding (hardware=2gpu_fsdp2) and the precision (hardware.autocast_dtype=bfloat16). Launch plain "
            "processes: accelerate launch --multi_gpu --num_processes N train.py hardware=..."
        )


_joined_group = False  # setup created the default process group (and teardown may destroy it)


def teardown() -> None:
    """Leave the process group setup joined. A one-process run joins none; the group vLLM makes for itself
    in such a run stays, as vLLM still holds it (a second engine in this process needs it)."""
    global _joined_group
    if _joined_group and dist.is_initialized():
        dist.destroy_process_group()
    _joined_group = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object: an output directory, a path)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(action: Callable[[], T]) -> T:
    """Run `action` on rank 0 alone (a file write); every rank waits for it and gets its result."""
    if world_size() == 1:
        return action()
    result = action() if rank() == 0 else None
    barrier()
    return from_main(result)


def from_every_rank(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (a stop request that reached one rank first)."""
    if world_size() == 1:
        return flag
    value = _on_backend(torch.tensor([float(flag)]))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL reduces CUDA tensors only; gloo, CPU tensors."""
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def my_share(items: list[T]) -> list[T]:
    """This rank's contiguous share of the global batch (the batch size divides by the world size)."""
    size = world_size()
    if size == 1:
        return items
    if len(items) % size:
        raise ValueError(f"{len(items)} items do not split evenly over {size} ranks")
    per_rank = len(items) // size
    return items[rank() * per_rank : (rank() + 1) * per_rank]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """(N_local, ...) from every rank -> (N_local x world_size, ...), rank-major: the global batch's order."""
    size = world_size()
    if size == 1:
        return local
    moved = _on_backend(local.contiguous())
    parts = [torch.empty_like(moved) for _ in range(size)]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(local.device)


def my_rows(global_rows: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor made from gather_rows."""
    size = world_size()
    if size == 1:
        return global_rows
    per_rank = len(global_rows) // size
    return global_rows[rank() * per_rank : (rank() + 1) * per_rank]


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank scalar (for the rollout's token count: DAPO's per-rank denominator)."""
    if world_size() == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    total = _on_backend(total)
    dist.all_reduce(total)
    return float(total.item()) / world_size()


# How each logged scalar combines over ranks. Every rank holds the same number of prompts and samples,
# so a per-sample mean or fraction is the mean of the ranks' values; what is not gets a rule here.
TOKEN_MEANS = (  # per-token means: weighted by the rank's completion tokens
    "train/kl",
    "train/entropy",
    "train/clip_low_frac",
    "train/clip_high_frac",
    "train/clip_region_frac",
    "sync/is_weight_mean",
    "sync/is_weight_deviation_mean",
)
MAXIMA = ("rollout/len_max", "adv/abs_max", "sync/logp_gap_max", "gc/full_collections", "gc/full_collected")
MAXIMUM_PREFIXES = ("time/", "memory/")  # the slowest rank sets the pace; the fullest GPU the limit
SUMS = ("perf/completion_tokens_per_s", "rollout/server_retries", "sync/logp_nonfinite_tokens")
STD_OF = {"reward/total_std": "reward/total_mean", "adv/std": "adv/mean"}  # pooled from the ranks' moments


def reduce_metrics(
    metrics: dict[str, float], *, samples: int, tokens: float, engine_tokens: float, decisive_pairs: int = 0
) -> dict[str, float]:
    """One dict of the step's metrics for the whole run, the same on every rank (rank 0 logs it).

    samples: completions on this rank; tokens: their completion tokens; engine_tokens: the tokens the sync
    check compared; decisive_pairs: preference pairs that were not ties. One all-reduce per step.
    """
    if world_size() == 1:
        return metrics
    keys = sorted(metrics)
    weights = {key: _weight(key, metrics, samples, tokens, engine_tokens, decisive_pairs) for key in keys}
    # (weighted value, weight, square moment, maximum) per key, reduced in one call
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    weight = torch.tensor([weights[k] for k in keys], dtype=torch.float64)
    finite = torch.isfinite(values)
    weight = torch.where(finite, weight, torch.zeros_like(weight))  # a rank with no score (NaN) has no say
    safe = torch.where(finite, values, torch.zeros_like(values))
    square = torch.tensor([_second_moment(k, metrics, samples) for k in keys], dtype=torch.float64)
    stacked = _on_backend(
        torch.stack([safe * weight, weight, square * samples, torch.full_like(safe, samples)])
    )
    peaks = _on_backend(torch.where(finite, values, torch.full_like(values, -math.inf)))
    dist.all_reduce(stacked)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    stacked, peaks = stacked.cpu(), peaks.cpu()
    reduced = {}
    for i, key in enumerate(keys):
        if key in MAXIMA or key.startswith(MAXIMUM_PREFIXES):
            reduced[key] = float(peaks[i]) if math.isfinite(peaks[i]) else float("nan")
        elif key in SUMS or key.endswith("_errors"):
            reduced[key] = float(stacked[0, i])  # weight 1 each: the sum over ranks
        elif stacked[1, i] > 0:
            reduced[key] = float(stacked[0, i] / stacked[1, i])
        else:
            reduced[key] = float("nan")
    for std_key, mean_key in STD_OF.items():
        if std_key in reduced:
            i, n = keys.index(std_key), float(stacked[3, keys.index(std_key)])
            mean_square = float(stacked[2, i]) / n  # E[x^2] over all samples
            variance = (
                max(mean_square - reduced[mean_key] ** 2, 0.0) * n / max(n - 1, 1)
            )  # unbiased, as torch
            reduced[std_key] = math.sqrt(variance)
    return reduced


def _weight(
    key: str, metrics: dict[str, float], samples: int, tokens: float, engine: float, pairs: int
) -> float:
    if key in TOKEN_MEANS:
        return tokens
    if key == "sync/logp_gap_mean":
        return engine
    if key in ("train/margin_mean", "train/accuracy"):
        return pairs
    if key.startswith("reward/") and key.endswith("_mean") and key != "reward/total_mean":
        scored = 1 - metrics.get(key.removesuffix("_mean") + "_none_frac", 0.0)
        return samples * scored  # a mean over the samples that got a score
    return 1.0  # equal shares: the mean over ranks


def _second_moment(key: str, metrics: dict[str, float], samples: int) -> float:
    """E[x^2] of this rank's samples for a pooled std: std^2 (n-1)/n + mean^2."""
    if key not in STD_OF:
        return 0.0
    std, mean = metrics[key], metrics[STD_OF[key]]
    return std**2 * (samples - 1) / max(samples, 1) + mean**2


def wrap_policy(model: torch.nn.Module, strategy: str, ranks: Ranks) -> torch.nn.Module:
    """The module the training forward passes run through, so that gradients are averaged over ranks.

    ddp: a DistributedDataParallel wrapper around `model` (which stays the plain model for generation,
    the reference under LoRA, checkpoints). fsdp2: `fully_shard` on every decoder layer, then on the
    whole model, in place: `model` itself is then sharded (each rank holds 1/N of every weight) and
    returned. One process: `model` as it is.
    """
    if ranks.world_size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None
        )
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"hardware.strategy={strategy!r}: use ddp or fsdp2")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the unit FSDP2 gathers at a time): transformers' _no_split_modules."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in no_split]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (_no_split_modules): FSDP2 needs one"
        )
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) with every FSDP2 shard (DTensor) gathered into the full tensor, one at a time.

    Peak memory is the largest single weight, not the model. Gathering is collective: every rank must
    walk the same names in the same order, also the ranks that drop the result (see follow_weights).
    """
    from torch.distributed.tensor import DTensor

    for name, tensor in named:
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """FSDP2: the whole model's weights on rank 0's CPU (other ranks: {}), gathered one tensor at a time,
    to hand to save_pretrained for the exported model/ (checkpoints keep the shards as they are: see
    checkpoint.save_sharded_checkpoint). None when the model is not sharded: it saves itself as usual."""
    if not is_sharded(model):
        return None
    gathered = {}
    for name, tensor in full_tensors(iter(model.state_dict().items())):
        if rank() == 0:
            gathered[name] = tensor.detach().cpu()
    return gathered


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over the whole model (FSDP2: over every rank's shards) as a float."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def seed_ranks(seed: int, step: int) -> None:
    """Several ranks: a sampling seed of its own for each rank (and each resume point), so that ranks
    do not draw the same completions. One process: nothing (the run's seed, or a resume's RNG states)."""
    if world_size() == 1:
        return
    from transformers import set_seed

    set_seed(seed + rank() + world_size() * step)


def follow_weights(model: torch.nn.Module, weights: Callable[[torch.nn.Module], Iterator[Any]]) -> None:
    """On a rank that does not sync an engine itself: take part in the sharded model's gathers that
    rank 0 runs while it walks `weights(model)`, and drop the results. Nothing to do for an unsharded model."""
    if is_sharded(model):
        for _ in weights(model):
            pass
