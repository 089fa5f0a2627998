"""Generation engines behind one protocol (`sync_weights`, `generate`, `close`): see protocol.py."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from online_rl.engines.protocol import Engine, Rollout

log = logging.getLogger(__name__)

__all__ = ["Engine", "Rollout", "make_engine", "resolve_mode"]


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` becomes colocate when CUDA and vLLM are both there, else off; says which and why."""
    if mode != "auto":
        return mode
    has_vllm = importlib.util.find_spec("vllm") is not None
    if device.type == "cuda" and has_vllm:
        log.info("vllm=auto: using colocate (a CUDA device and vLLM are present)")
        return "colocate"
    reason = "the trainer is not on a CUDA device" if device.type != "cuda" else "vLLM is not installed"
    log.info("vllm=auto: using off (transformers generate) because %s", reason)
    return "off"


def make_engine(
    mode: str,
    engine_cfg: Any,
    model: torch.nn.Module,
    model_path: str,
    tokenizer: Any,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    seed: int,
    max_model_len: int,
    trust_remote_code: bool,
) -> Engine:
    """The engine for `mode` (already resolved from auto)."""
    if mode == "off":
        from online_rl.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model, tokenizer, device, autocast_dtype)
    if mode == "colocate":
        from online_rl.engines.vllm_colocate import VLLMColocateEngine

        return VLLMColocateEngine(
            model_path,
            engine_cfg,
            device=device,
            seed=seed,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
        )
    raise ValueError(f"vllm.mode={mode!r} is not an engine this version has: use vllm=off or vllm=colocate")
