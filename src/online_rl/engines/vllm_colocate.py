"""`vllm=colocate`: a vllm.LLM inside the trainer process, sharing its GPU, asleep while the trainer trains.

The order of one rollout, as the loop drives it:

    sync_weights(model):  wake the weights -> load the trainer's current weights -> reset the prefix cache
    generate(...):        wake the KV cache -> generate -> sleep (level 1: weights to CPU, KV cache freed;
                          level 2: both freed)

The weights that generate are always the ones just pushed from the trainer, never the checkpoint on
disk: at level 2 the woken weights are uninitialised memory, and `generate` refuses to run on them
until `sync_weights` has filled them.

With `vllm.separate_process=true` the whole engine runs in a process of its own on the same device
(`engine_host`: one message per call, not per decoding step), and `sync_weights` copies the weights into
memory that both processes map (`shared_weights`). Its scheduling and output handling then never wait for the
trainer's interpreter. With `vllm.engine_processes=N` as well, N such engines share the device, each generating
a contiguous share of every rollout's prompts; every call goes to all of them at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from online_rl.engines.hosted.engine_host import HostedLLM, generate_lists
from online_rl.engines.hosted.mps import engines_without_trainer_settings
from online_rl.engines.hosted.shared_weights import SharedWeightBuffer
from online_rl.engines.protocol import Rollout
from online_rl.engines.weights import inference_weights
from online_rl.models import torch_dtype

log = logging.getLogger(__name__)

WORKER_EXTENSION = "online_rl.engines.hosted.shared_weights.SharedWeightsWorker"
KV_BLOCK_TOKENS = 16  # vLLM's default block size: a sequence's cache is whole blocks
# Over one call's own need: vLLM keeps a few blocks aside (the null block, blocks freed lazily) and a cache that
# is short by one sequence makes the scheduler preempt and recompute it, a much dearer miss than 25% of ~1 GiB
KV_CACHE_HEADROOM = 1.25


def rollout_kv_cache_bytes(
    sequences: int, tokens_per_sequence: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """A KV cache that holds every sequence of one engine call at its longest, at once:

        bytes = 1.25 x sequences x ceil(tokens / 16) x 16 x layers x 2 (K and V) x kv_heads x head_dim x dtype_bytes

    (Qwen2-0.5B, 128 sequences of 768 tokens in bf16: 1.41 GiB, where vLLM's default share of the GPU,
    gpu_memory_utilization=0.3, leaves it ~20 GiB on an 80 GiB card.) Prefix sharing between a prompt's G
    samples is not counted: the bound holds without it.
    """
    blocks = sequences * math.ceil(tokens_per_sequence / KV_BLOCK_TOKENS)
    per_token = layers * 2 * kv_heads * head_dim * dtype_bytes
    return math.ceil(KV_CACHE_HEADROOM * blocks * KV_BLOCK_TOKENS * per_token)


def kv_cache_bytes_for(
    model_config: Any, dtype: torch.dtype, sequences: int, tokens_per_sequence: int, tensor_parallel_size: int
) -> int | None:
    """`rollout_kv_cache_bytes` for a transformers config, per GPU of a tensor-parallel engine; None for a
    model whose cache the formula does not describe (no key/value heads: multi-latent attention, state-space
    layers), which vLLM then sizes from gpu_memory_utilization."""
    config = getattr(model_config, "text_config", model_config)  # a multimodal model's language half
    kv_heads = getattr(config, "num_key_value_heads", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    layers = getattr(config, "num_hidden_layers", None)
    if not (kv_heads and head_dim and layers) or getattr(config, "kv_lora_rank", None):
        return None
    kv_heads_per_gpu = max(1, kv_heads // tensor_parallel_size)  # (fewer heads than GPUs: each GPU keeps one)
    return rollout_kv_cache_bytes(
        sequences, tokens_per_sequence, layers, kv_heads_per_gpu, head_dim, dtype.itemsize
    )


def external_launcher() -> dict[str, str]:
    """Several training ranks (torch.distributed already up): vLLM joins that process group instead of
    starting its own ("external_launcher"). With tensor_parallel_size=1, vLLM splits the world into one
    engine per rank, each on its rank's GPU, generating that rank's prompts with that rank's seed."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return {"distributed_executor_backend": "external_launcher"}
    return {}


@contextlib.contextmanager
def without_vllm_cleanup():
    """vLLM's sleep ends with gc.collect() and torch.cuda.empty_cache(), written for a process that only serves.
    Beside a trainer neither frees any of vLLM's memory (unmapping it already did), and both cost every step:
    the full collection walks every object of the trainer, the compiler and the engine (70 ms in a CPU run of
    a 24-layer model), and emptying the cache hands the trainer's cached blocks back to the driver, only for
    the next training pass to allocate them again (returning 30 GiB takes 0.1 s on an H200). So both are
    skipped while vLLM sleeps; `sync_weights` empties the cache itself when waking needs the room."""
    collect, empty_cache = gc.collect, torch.cuda.empty_cache
    gc.collect = lambda generation=2: 0
    torch.cuda.empty_cache = lambda: None
    try:
        yield
    finally:
        gc.collect, torch.cuda.empty_cache = collect, empty_cache


class VLLMColocateEngine:
    def __init__(
        self,
        model_path: str,
        cfg: Any,
        device: torch.device,
        seed: int,
        max_model_len: int,
        trust_remote_code: bool = False,
        sequences_per_call: int | None = None,
    ):
        """sequences_per_call: the most sequences one generate call holds (a rollout's, an evaluation
        batch's), which `vllm.kv_cache_memory_gib=auto` sizes the KV cache for."""
        if cfg.tensor_parallel_size > 1 and external_launcher():
            raise ValueError(
                "vllm.tensor_parallel_size > 1 with several training ranks is not supported yet: the ranks of a "
                "tensor-parallel group would have to generate the same prompts; use tensor_parallel_size=1"
            )
        if cfg.sleep_level and device.type != "cuda":
            raise ValueError(
                f"vllm.sleep_level={cfg.sleep_level} needs CUDA (vLLM's sleep mode frees GPU memory); "
                "on a CPU use vllm.sleep_level=0"
            )
        if cfg.separate_process and (external_launcher() or cfg.tensor_parallel_size > 1):
            raise ValueError(
                "vllm.separate_process=true needs one training rank and vllm.tensor_parallel_size=1: "
                "set vllm.separate_process=false"
            )
        if cfg.separate_process and cfg.weight_bucket_mib < 1:
            raise ValueError(
                f"vllm.weight_bucket_mib={cfg.weight_bucket_mib}: the shared block needs at least 1 MiB"
            )
        if cfg.engine_processes < 1 or (cfg.engine_processes > 1 and not cfg.separate_process):
            raise ValueError(
                f"vllm.engine_processes={cfg.engine_processes}: set it to 1, or to more with "
                "vllm.separate_process=true (each engine runs in a process of its own)"
            )
        if device.type == "cpu":  # (read where the engine runs: this process or its own, which inherits it)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        self.cfg, self.sleep_level = cfg, cfg.sleep_level
        max_model_len = cfg.max_model_len or max_model_len
        kv_cache_bytes = self.kv_cache_size(
            model_path, device, sequences_per_call, max_model_len, trust_remote_code
        )
        optional = {
            key: value
            for key, value in (
                ("max_num_seqs", cfg.max_num_seqs),
                ("max_num_batched_tokens", cfg.max_num_batched_tokens),
                ("async_scheduling", cfg.async_scheduling),
                ("kv_cache_memory_bytes", kv_cache_bytes),
            )
            if value is not None
        }
        settings = dict(
            model=model_path,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=cfg.sleep_level > 0,
            tensor_parallel_size=cfg.tensor_parallel_size,
            model_impl=cfg.model_impl.value,
            trust_remote_code=trust_remote_code,
            # log-probs after temperature (and top-k/top-p), i.e. of the distribution that sampled
            logprobs_mode="processed_logprobs",
            **optional,
            **external_launcher(),
            **({"worker_extension_cls": WORKER_EXTENSION} if cfg.separate_process else {}),
        )
        first_seed = cfg.seed if cfg.seed is not None else seed
        # a seed each: with one, every engine's k-th sequence would draw the same random numbers
        if cfg.separate_process:
            # vLLM sizes a KV cache from gpu_memory_utilization by how much the device's memory grew while it
            # profiled, so engines that start together count each other's weights and caches as their own and
            # find no room left ("No available memory for the cache blocks"): then they start one by one
            together = kv_cache_bytes is not None or device.type != "cuda"
            self.llms = []
            with engines_without_trainer_settings():  # (the trainer's MPS cap and priority are its own)
                for index in range(cfg.engine_processes):
                    self.llms.append(HostedLLM({**settings, "seed": first_seed + index}))
                    if not together:
                        self.llms[-1].wait_until_ready()
            for index, llm in enumerate(self.llms):
                if together:
                    llm.wait_until_ready()
                log.info("vLLM engine %d of %d: process %d", index + 1, len(self.llms), llm.pid)
        else:
            # vLLM's in-process mode, whose model takes the trainer's tensors by reference. (An engine in a
            # process of its own imports vLLM there, and maps a block the weights are copied into.)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            self.llms = [LLM(seed=first_seed, **settings)]
        # several engines: one thread each per call, every one waiting on its engine's process
        self.pool = ThreadPoolExecutor(len(self.llms), "vllm-engine") if len(self.llms) > 1 else None
        self.device = device
        self.weights_asleep = self.kv_cache_asleep = False
        self.weights_loaded = True  # the checkpoint on disk is the trainer's starting point
        self.stats: dict[str, float] = {}
        self.shared_weights = (
            SharedWeightBuffer(self.each, device, torch_dtype(cfg.dtype), cfg.weight_bucket_mib * 2**20)
            if cfg.separate_process
            else None
        )
        self.engine_model = self.in_process_model()  # None: weights go through reload_weights
        used_awake = self.device_used_bytes()
        self.sleep()  # give the GPU to the trainer until the first rollout
        self.wake_bytes = used_awake - self.device_used_bytes()  # what waking takes back from the device

    def kv_cache_size(
        self,
        model_path: str,
        device: torch.device,
        sequences: int | None,
        max_model_len: int,
        trust_remote_code,
    ) -> int | None:
        """Bytes of KV cache per engine (vllm.kv_cache_memory_gib): a number of GiB as given; `auto` on a GPU,
        one call's sequences at max_model_len (`rollout_kv_cache_bytes`); None: vLLM sizes it, from
        gpu_memory_utilization (on a CPU: cpu_kv_cache_gib)."""
        setting = self.cfg.kv_cache_memory_gib
        if setting != "auto":
            return None if setting is None else int(float(setting) * 2**30)
        if device.type != "cuda" or not sequences:
            return None
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        per_engine = math.ceil(sequences / self.cfg.engine_processes)  # each engine generates its share
        size = kv_cache_bytes_for(
            model_config,
            torch_dtype(self.cfg.dtype),
            per_engine,
            max_model_len,
            self.cfg.tensor_parallel_size,
        )
        if size is None:
            log.info("vllm.kv_cache_memory_gib=auto: %s's cache is not plain K/V heads; vLLM sizes it from "
                     "gpu_memory_utilization=%s", type(model_config).__name__, self.cfg.gpu_memory_utilization)  # fmt: skip
        else:
            log.info("vllm.kv_cache_memory_gib=auto: %.2f GiB per engine (%d sequences of up to %d tokens)",
                     size / 2**30, per_engine, max_model_len)  # fmt: skip
        return size

    def sleep(self) -> None:
        if self.sleep_level == 0:
            return
        started = time.perf_counter()
        with without_vllm_cleanup():
            self.each(lambda llm: llm.sleep(level=self.sleep_level))
        self.stats["time/sleep_s"] = time.perf_counter() - started
        self.weights_asleep = self.kv_cache_asleep = True
        # Level 1 keeps a CPU copy of the weights; level 2 drops them, so they must be pushed again.
        self.weights_loaded = self.sleep_level == 1

    def each(self, call: Callable[..., Any], *per_engine: list) -> list:
        """[call(engine, *its share of per_engine)] for every engine, all at once when there are several."""
        if self.pool is None:
            return [call(self.llms[0], *(shares[0] for shares in per_engine))]
        return list(self.pool.map(call, self.llms, *per_engine))

    def sync_weights(self, model: torch.nn.Module) -> None:
        started = time.perf_counter()
        if self.weights_asleep:
            if self.device.type == "cuda" and torch.cuda.mem_get_info(self.device)[0] < 1.1 * self.wake_bytes:
                # torch keeps the blocks it freed after training; hand them back only when vLLM's pool needs the
                # room (returning 30 GiB of blocks takes 0.1 s, a step's whole sleep-and-wake budget)
                torch.cuda.empty_cache()
            self.each(lambda llm: llm.wake_up(tags=["weights"]))
            self.weights_asleep = False
        woken = time.perf_counter()
        if self.shared_weights is not None:
            self.shared_weights.push(model)
        elif self.engine_model is not None:
            self.engine_model.load_weights(inference_weights(model))
        else:
            self.llms[0].collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": inference_weights(model), "is_checkpoint_format": True},
            )
        self.weights_loaded = True
        self.each(lambda llm: llm.reset_prefix_cache())  # cached prefixes were computed with the old weights
        self.stats["time/wake_weights_s"] = woken - started
        self.stats["time/load_weights_s"] = time.perf_counter() - woken

    def device_used_bytes(self) -> int:
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def in_process_model(self) -> torch.nn.Module | None:
        """vLLM's own torch model, when it is a GPU model in this process. Loading into it directly takes
        16 ms for a 0.5B model on an H200, where `reload_weights` (the same call inside a layer-by-layer
        reload) takes 73 ms. On a CPU, vLLM repacks linear weights for oneDNN after loading, which only
        `reload_weights` redoes; with tensor parallelism the model lives in worker processes."""
        if self.device.type != "cuda" or self.shared_weights is not None:
            return None
        worker = getattr(self.llms[0].llm_engine.model_executor, "driver_worker", None)
        return worker.model_runner.model if worker is not None else None

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        if not self.weights_loaded or self.weights_asleep:
            raise RuntimeError(
                "the vLLM engine has no current weights: call sync_weights(model) before generate"
            )
        if self.kv_cache_asleep:
            started = time.perf_counter()
            self.each(lambda llm: llm.wake_up(tags=["kv_cache"]))
            self.stats["time/wake_kv_cache_s"] = time.perf_counter() - started
            self.kv_cache_asleep = False
        params = dict(  # vLLM's SamplingParams, built where the engine runs
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_completion_length,
            logprobs=0,  # the sampled token's own log-prob
            flat_logprobs=True,  # as flat lists: no dict and Logprob object per token
            detokenize=False,  # the loop decodes once, with the trainer's tokenizer
        )

        def generate_share(llm, share: list[list[int]]) -> tuple:
            if isinstance(llm, HostedLLM):
                return llm.generate_lists(share, params, self.cfg.regex)
            return generate_lists(llm, share, params, self.cfg.regex)

        parts = self.each(generate_share, contiguous_shares(prompt_ids, len(self.llms)))
        completion_ids, finished, logprobs = ([row for part in parts for row in part[i]] for i in range(3))
        if self.device.type == "cuda":
            self.stats["memory/device_used_awake_gib"] = self.device_used_bytes() / 2**30
        self.sleep()
        stats, self.stats = self.stats, {}
        return Rollout(
            completion_ids=completion_ids, finished=finished, sampler_logprobs=logprobs, stats=stats
        )

    def close(self) -> None:
        if not self.llms:
            return
        if self.shared_weights is not None:
            self.shared_weights.close()
        if self.pool is not None:
            self.pool.shutdown()
        for llm in self.llms:
            if isinstance(llm, HostedLLM):
                llm.close()
        self.llms = []  # drops the engines and their memory pools
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def contiguous_shares(items: list, count: int) -> list[list]:
    """items cut into `count` contiguous shares, in order, whose sizes differ by at most one (the first ones
    larger); a share is empty when there are fewer items than shares."""
    size, larger = divmod(len(items), count)
    bounds = [0]
    for index in range(count):
        bounds.append(bounds[-1] + size + (index < larger))
    return [items[start:end] for start, end in zip(bounds, bounds[1:])]
