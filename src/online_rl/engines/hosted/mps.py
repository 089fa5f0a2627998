"""The trainer's share of the GPU under CUDA's Multi-Process Service, beside a vLLM engine in a process of its own
(`vllm.separate_process=true`), so that the engine decodes beside training (`off_policy_steps=1`) without waiting
for the trainer's large kernels: with `vllm.trainer_sm_percent=N`, the trainer's kernels take at most N% of the
GPU's multiprocessors.

Without MPS the GPU gives each process time slices in turn; with it, both processes' kernels run at once, but a
training step's matrix products still fill every multiprocessor, and each of a decoding step's small kernels
waits for some to free. On the H200, beside a training process that trained without pause, a rollout took about
1.9x its time alone under MPS, and about 1.4x with the trainer capped at half the multiprocessors (eighth lease).
On another machine it took 1.13x uncapped and as long as alone with the cap at 50 or 25 (ninth lease,
docs/log.md). MPS reads the cap from the environment (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) when a process
makes its CUDA context, so the trainer sets it before its first CUDA call, and the engine processes it starts are
not given it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ACTIVE_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
TRAINER_ONLY = (ACTIVE_THREAD_PERCENTAGE,)  # what the engine processes must not inherit
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def mps_pipe_directory() -> Path:
    """Where CUDA looks for the MPS daemon's pipes (as the daemon and every client must agree)."""
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY)


def trainer_mps_settings(vllm_cfg: Any) -> dict[str, str]:
    """{environment variable: value} for this process's CUDA context under MPS, from vllm.trainer_sm_percent
    (empty when it is not set)."""
    settings = {}
    percent = vllm_cfg.get("trainer_sm_percent")
    if percent is not None:
        if not 1 <= percent <= 100:
            raise ValueError(
                f"vllm.trainer_sm_percent={percent}: a percentage of the GPU's multiprocessors, from 1 to 100"
            )
        settings[ACTIVE_THREAD_PERCENTAGE] = str(percent)
    return settings


def share_gpu_with_engines(vllm_cfg: Any) -> None:
    """Set this process's MPS settings (trainer_mps_settings) before it first uses CUDA; nothing when none is
    asked for. Every misuse stops the run with its fix."""
    settings = trainer_mps_settings(vllm_cfg)
    if not settings:
        return
    option = f"vllm.trainer_sm_percent={vllm_cfg.get('trainer_sm_percent')}"
    if vllm_cfg.mode.value not in ("colocate", "auto") or not vllm_cfg.get("separate_process"):
        raise ValueError(
            f"{option} shares the GPU between the trainer and a vLLM engine in a process of its own: set "
            "vllm=colocate vllm.separate_process=true, or leave it out (an engine in the trainer's process "
            "shares its CUDA context and its settings)"
        )
    pipes = mps_pipe_directory()
    if not pipes.is_dir() or not any(pipes.iterdir()):
        raise RuntimeError(
            f"{option} needs CUDA's MPS daemon, and {pipes} holds none of its pipes: start it with "
            "`nvidia-cuda-mps-control -d` (with CUDA_MPS_PIPE_DIRECTORY set alike for it and for this run, if "
            "not the default), or leave it out"
        )
    if torch.cuda.is_initialized():
        raise RuntimeError(
            f"{option}: this process already uses CUDA, and MPS reads its settings only when a process starts "
            "using it; run training in a fresh process"
        )
    os.environ.update(settings)


@contextlib.contextmanager
def engines_without_trainer_settings() -> Iterator[None]:
    """Processes started inside (vLLM's engine processes) get none of this one's MPS settings from its
    environment: they were this process's own, read when it made its CUDA context."""
    saved = {name: os.environ.pop(name) for name in TRAINER_ONLY if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
