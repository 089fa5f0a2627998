"""Generation engines behind one protocol (`sync_weights`, `generate`, `close`: protocol.py), in three modes:

    in-process   vllm=off: transformers `generate` on the trainer's model (transformers_engine.py)
                 vllm=colocate: `vllm.LLM` in the trainer's process, asleep while it trains (vllm_colocate.py)
    hosted       vllm=colocate vllm.separate_process=true: the same engine in a process of its own on the
                 trainer's GPU, weights through shared GPU memory, optionally under MPS (hosted/)
    server       vllm=server: the stock vLLM server, weights pushed over NCCL or CUDA IPC (server/)

The rest of the library reaches them through this module's names alone (__all__).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch

from online_rl.engines.hosted.mps import share_gpu_with_engines
from online_rl.engines.mixture import sample_geometric_mixture
from online_rl.engines.protocol import Engine, EngineUnavailable, Rollout
from online_rl.engines.transformers_engine import eos_token_ids

log = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineUnavailable",
    "Rollout",
    "SaveWhenUnavailable",
    "eos_token_ids",
    "make_engine",
    "resolve_mode",
    "sample_geometric_mixture",  # Nash-MD's and XPO's second sample: the policy/reference mixture
    "share_gpu_with_engines",
]


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` becomes colocate when CUDA and vLLM are both there, else off; says which and why.
    (Never server: that needs servers started on purpose, so it is chosen explicitly.)"""
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
    sequences_per_call: int | None = None,
) -> Engine:
    """The engine for `mode` (already resolved from auto). sequences_per_call: the most sequences one
    generate call holds (colocate sizes its KV cache for them)."""
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
            sequences_per_call=sequences_per_call,
        )
    if mode == "server":
        from online_rl import distributed
        from online_rl.engines.server.vllm_server import VLLMServerEngine

        if distributed.world_size() == 1:
            return VLLMServerEngine(engine_cfg, device=device, model_path=model_path)
        from online_rl.engines.server.main_rank import (
            MainRankEngine,  # several ranks: rank 0 talks to the servers
        )

        on_main = distributed.rank() == 0
        return MainRankEngine(
            VLLMServerEngine(engine_cfg, device=device, model_path=model_path) if on_main else None
        )
    raise ValueError(
        f"vllm.mode={mode!r} is not an engine this version has: use vllm=off, vllm=colocate or vllm=server"
    )


class SaveWhenUnavailable:
    """An engine whose EngineUnavailable first runs `save` (the loop's checkpoint), then ends the run as before."""

    def __init__(self, engine: Engine, save: Callable[[], Any]):
        self.engine, self.save = engine, save

    def guarded(self, call: Callable[[], Any]) -> Any:
        """call(), saving first if it raises EngineUnavailable (also for a call that waits on the engine)."""
        try:
            return call()
        except EngineUnavailable as error:
            path = self.save()
            raise EngineUnavailable(
                f"{error}\nThe trainer's state was saved to {path} before stopping."
            ) from error

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.guarded(lambda: self.engine.sync_weights(model))

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        return self.guarded(lambda: self.engine.generate(prompt_ids, n, sampling))

    def close(self) -> None:
        self.engine.close()
