"""`vllm.trainer_sm_percent`: under CUDA's Multi-Process Service, a cap on the share of the GPU the trainer's
kernels take, so that a vLLM engine in a process of its own (`vllm.separate_process=true`) decodes beside
training without waiting for the trainer's large kernels to leave the GPU's multiprocessors.

Without MPS the GPU gives each process time slices in turn; with it, both processes' kernels run at once, but a
training step's matrix products still fill every multiprocessor, and each of a decoding step's small kernels
waits for some to free. On the H200, beside training, one step off-policy, a rollout took 1.5x its time alone
under MPS and 1.8x without it (docs/gpu-validation.md, seventh lease). MPS reads a context's cap from
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE when the process creates it, so the trainer sets it before its first CUDA
call, and the engine processes it starts are given none: they keep the whole GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ACTIVE_THREAD_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def mps_pipe_directory() -> Path:
    """Where CUDA looks for the MPS daemon's pipes (as the daemon and every client must agree)."""
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY)


def limit_trainer_sms(vllm_cfg: Any) -> None:
    """Cap this process's CUDA context at vllm.trainer_sm_percent of the GPU's multiprocessors (nothing when
    it is unset). Runs before this process first uses CUDA; every misuse stops the run with its fix."""
    percent = vllm_cfg.get("trainer_sm_percent")
    if percent is None:
        return
    option = f"vllm.trainer_sm_percent={percent}"
    if not 1 <= percent <= 100:
        raise ValueError(f"{option}: a percentage of the GPU's multiprocessors, from 1 to 100")
    if vllm_cfg.mode.value not in ("colocate", "auto") or not vllm_cfg.get("separate_process"):
        raise ValueError(
            f"{option} caps the trainer beside a vLLM engine in a process of its own: set "
            "vllm=colocate vllm.separate_process=true, or leave it out (an engine in the trainer's process "
            "shares its context and its cap)"
        )
    pipes = mps_pipe_directory()
    if not pipes.is_dir() or not any(pipes.iterdir()):
        raise RuntimeError(
            f"{option} needs CUDA's MPS daemon, and {pipes} holds none of its pipes: start it with "
            "`nvidia-cuda-mps-control -d` (with CUDA_MPS_PIPE_DIRECTORY set alike for it and for this run, if "
            "not the default), or leave out vllm.trainer_sm_percent"
        )
    if torch.cuda.is_initialized():
        raise RuntimeError(
            f"{option}: this process already uses CUDA, and MPS reads the cap only when a process starts "
            "using it; run training in a fresh process"
        )
    os.environ[ACTIVE_THREAD_PERCENTAGE] = str(percent)


@contextlib.contextmanager
def uncapped_children() -> Iterator[None]:
    """Processes started inside (vLLM's engine processes) get no cap from this one's environment: the cap
    was this process's own, read when it made its CUDA context."""
    cap = os.environ.pop(ACTIVE_THREAD_PERCENTAGE, None)
    try:
        yield
    finally:
        if cap is not None:
            os.environ[ACTIVE_THREAD_PERCENTAGE] = cap
