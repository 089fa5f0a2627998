"""`vllm=server`: generation on the stock vLLM OpenAI server (`make serve`), on GPUs of its own or on the
trainer's own GPU.

One rollout, as the loop drives it (every step on every server):

    sync_weights(model):  /start_weight_update -> the weights, packed, by the server's weight transfer ->
                          /finish_weight_update -> /reset_prefix_cache, where the transfer is
                          NCCL (servers on other GPUs): one /update_weights per server while this process
                                broadcasts the weights
                          IPC (a server on the trainer's GPU): one /update_weights per bucket, each naming a
                                buffer of this process that the server reads in place (CUDA IPC)
    generate(...):        the prompts split into one contiguous share per server, each share one
                          /v1/completions request (token-id prompts, n samples, the sampled tokens'
                          log-probs), sent concurrently and joined back in prompt order

Which transfer: the one each server was started with (`--weight-transfer-config`, `make serve TRANSFER=`,
one per server in vLLM 0.26), which must fit where it runs (gpu_guard.pick_transfer). The NCCL group is
made once, at start: this process is rank 0 (vLLM's `trainer_init`), joined by every server's workers
through `/init_weight_transfer_engine`, each server at its own rank offset, so that one broadcast reaches
them all. IPC needs no set-up.

The servers run vLLM's own RL routes (VLLM_SERVER_DEV_MODE=1), a weight-transfer engine and
`--logprobs-mode processed_logprobs`: `make serve` starts them so, and this engine checks it before the
first rollout. Every HTTP call has a timeout and every NCCL wait a deadline; a request that fails to
connect, times out or gets a 5xx answer is retried with exponential backoff (weight-update calls are not:
a half-received push is not repeatable), then EngineUnavailable ends the run (the loop checkpoints first).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import itertools
import logging
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch

from online_rl.engines.protocol import Background, EngineUnavailable, Rollout
from online_rl.engines.server import gpu_guard
from online_rl.engines.weights import inference_weight_specs, inference_weights

log = logging.getLogger(__name__)

HEALTH_POLL_S = 1.0
CONNECT_TIMEOUT_S = 10.0  # opening a TCP connection; the read timeouts are the config's


def serve_hint(model_path: str, urls: list[str], transfer: str | None = None) -> str:
    """The command that starts servers the trainer can use (once known, with the transfer they take)."""
    port = httpx.URL(urls[0]).port or 8000
    extra = f" DP={len(urls)}" if len(urls) > 1 else ""
    if transfer == "ipc":
        extra += " MEM=0.3 TRANSFER=ipc"
    return f"make serve MODEL={model_path} GPUS=0 PORT={port}{extra}"


def shard(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` in `parts` contiguous runs whose lengths differ by at most one (the first ones longer)."""
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        shares.append(items[start:end])
        start = end
    return shares


def rank_offsets(world_sizes: list[int]) -> list[int]:
    """Each server's first rank in the trainer's NCCL group: the trainer is rank 0, servers follow in order."""
    offsets, next_rank = [], 1
    for size in world_sizes:
        offsets.append(next_rank)
        next_rank += size
    return offsets


def completion_request(prompt_ids: list[list[int]], n: int, sampling: Any, regex: str | None) -> dict:
    """A /v1/completions body that samples exactly as the trainer scores: every knob that a model's
    generation_config could otherwise change on the server (penalties, min_p) is set explicitly."""
    body = {
        "prompt": prompt_ids,
        "n": n,
        "max_tokens": sampling.max_completion_length,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logprobs": 0,  # the sampled token's own log-prob
        "return_token_ids": True,
    }
    if regex:
        body["structured_outputs"] = {"regex": regex}
    return body


def parse_completions(
    response: dict, prompts: int, n: int
) -> tuple[list[list[int]], list[bool], list[list[float]]]:
    """(completion ids, finished, sampled-token log-probs), prompt-major, from a /v1/completions answer.

    vLLM numbers the choices prompt-major (choice p * n + k is sample k of prompt p); they are sorted by
    that index rather than trusted to arrive in order.
    """
    choices = sorted(response["choices"], key=lambda choice: choice["index"])
    if len(choices) != prompts * n:
        raise RuntimeError(f"the server returned {len(choices)} completions for {prompts} prompts x n={n}")
    ids, finished, logprobs = [], [], []
    for choice in choices:
        tokens = choice.get("token_ids")
        token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if tokens is None or token_logprobs is None or len(tokens) != len(token_logprobs):
            raise RuntimeError(
                "the server's answer lacks token ids or their log-probs (return_token_ids, logprobs=0): "
                "is it vLLM 0.26's OpenAI server?"
            )
        ids.append(list(tokens))
        finished.append(choice["finish_reason"] == "stop")  # "length" = cut at max_tokens
        logprobs.append([float(lp) for lp in token_logprobs])
    return ids, finished, logprobs


def weight_transfer_backend(info: dict) -> str | None:
    """The server's weight-transfer engine ('nccl', 'ipc', ...) from its /server_info; None without one."""
    return (info["vllm_config"].get("weight_transfer_config") or {}).get("backend")


def check_server_config(url: str, info: dict, needs_weight_transfer: bool) -> None:
    """The server flags this engine relies on, read from the server's /server_info."""
    config = info["vllm_config"]
    mode = config["model_config"].get("logprobs_mode")
    if mode != "processed_logprobs":
        raise ValueError(
            f"the vLLM server at {url} reports log-probs as {mode!r}; the trainer compares them with its own "
            "log-probs after temperature and top-k/top-p: restart it with --logprobs-mode processed_logprobs "
            "(make serve does)"
        )
    if not needs_weight_transfer:
        return
    backend = weight_transfer_backend(info)
    if backend not in ("nccl", "ipc"):
        raise ValueError(
            f"the vLLM server at {url} has {'no' if backend is None else repr(backend)} weight-transfer engine, so "
            "the trainer cannot push weights: restart it with make serve, which sets --weight-transfer-config "
            "(TRANSFER=nccl on GPUs of its own, TRANSFER=ipc on the trainer's GPU), or set "
            "vllm.sync_weights=false for generation only"
        )
    env_vars = info.get("system_env", {}).get("env_vars") or ""
    if backend == "ipc" and gpu_guard.reported_env_var(env_vars, "VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
        raise ValueError(
            f"the vLLM server at {url} takes weights over CUDA IPC but was started without "
            "VLLM_ALLOW_INSECURE_SERIALIZATION=1, without which it refuses the buffer handles the trainer sends "
            "(pickled, as vLLM's HTTP route takes them): restart it with make serve TRANSFER=ipc, which sets it"
        )


def bucket_counts(sizes: list[int], capacity: int) -> list[int]:
    """How many of the tensors (`sizes` in bytes, in push order) go in each bucket of at most `capacity` bytes.

    A tensor larger than `capacity` gets a bucket of its own; the caller sizes the buffer for it.
    """
    counts, filled = [], 0
    for size in sizes:
        if counts and filled + size <= capacity:
            counts[-1] += 1
            filled += size
        else:
            counts.append(1)
            filled = size
    return counts


def ipc_update_body(update: Any) -> dict:
    """The /update_weights body for one packed IPC bucket (vLLM's IPCWeightTransferUpdateInfo): the buffer's
    handles pickled and base64-encoded, the form vLLM's HTTP route decodes (VLLM_ALLOW_INSECURE_SERIALIZATION=1
    on the server)."""
    return {
        "update_info": {
            "names": list(update.names),
            "dtype_names": list(update.dtype_names),
            "shapes": [list(shape) for shape in update.shapes],
            "packed": True,
            "tensor_sizes": list(update.tensor_sizes),
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(update.ipc_handles)).decode("ascii"),
        }
    }


def import_ipc_engine() -> Any:
    """vLLM's IPC weight-transfer module, whose `import ray` at the top (vLLM 0.26) needs ray installed."""
    try:
        return importlib.import_module("vllm.distributed.weight_transfer.ipc_engine")
    except ModuleNotFoundError as error:
        if error.name != "ray":
            raise
        raise ValueError(
            "vLLM 0.26's CUDA IPC weight transfer imports ray, which vLLM does not install: "
            "pip install -e '.[server]' (or pip install ray) where the trainer runs, as where the server runs"
        ) from error


def wait_all(tasks: list[Background], timeout: float) -> list[Any]:
    """The tasks' results; the first error is raised as soon as it happens, not after the others time out."""
    deadline = time.monotonic() + timeout
    while True:
        for task in tasks:
            if task.done and task.error is not None:
                raise task.error
        if all(task.done for task in tasks):
            return [task.value for task in tasks]
        if time.monotonic() > deadline:
            pending = ", ".join(task.what for task in tasks if not task.done)
            raise EngineUnavailable(f"{pending} did not finish within {timeout:.0f} s (vllm.nccl_timeout_s)")
        time.sleep(0.005)


class ServerClient:
    """One vLLM server's HTTP API, every call with a timeout; failed connections, timeouts and 5xx retried."""

    def __init__(self, url: str, cfg: Any, hint: str):
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.hint = cfg.retries, cfg.retry_backoff_s, hint
        self.http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(cfg.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        )
        self.retried = 0  # retries spent since the last rollout, for the metrics
        self.info: dict = {}  # the server's /server_info (its vLLM config and environment)

    def call(
        self, method: str, path: str, *, timeout: float | None = None, retry: bool = True, **kwargs
    ) -> Any:
        """The JSON answer (None for an empty body); 4xx raises at once with the server's message."""
        attempts = 1 + (self.retries if retry else 0)
        wait, started, failure = self.backoff_s, time.monotonic(), ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait)
                wait *= 2
                self.retried += 1
            try:
                extra = {"timeout": httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)} if timeout else {}
                response = self.http.request(method, path, **extra, **kwargs)
            except httpx.TransportError as error:  # refused, reset, timed out
                failure = f"{type(error).__name__}: {error}"
                continue
            if response.status_code >= 500:
                failure = f"HTTP {response.status_code}: {response.text[:500]}"
                continue
            if response.status_code >= 400:
                raise RuntimeError(
                    f"the vLLM server at {self.url} refused {method} {path}: HTTP {response.status_code}: "
                    f"{response.text[:1000]}"
                )
            return response.json() if response.content else None
        raise EngineUnavailable(
            f"the vLLM server at {self.url} did not answer {method} {path} after {attempts} attempt(s) over "
            f"{time.monotonic() - started:.1f} s ({failure}). Is it still running? Start it again with "
            f"`{self.hint}` (raise vllm.request_timeout_s if generation is just slow)"
        )

    def wait_healthy(self, deadline: float) -> None:
        failure = "no answer yet"
        while True:
            try:
                response = self.http.get("/health", timeout=httpx.Timeout(5.0, connect=5.0))
                if response.status_code == 200:
                    return
                failure = f"HTTP {response.status_code}"
            except httpx.TransportError as error:
                failure = f"{type(error).__name__}: {error}"
            if time.monotonic() + HEALTH_POLL_S > deadline:
                raise EngineUnavailable(
                    f"no vLLM server answered at {self.url}/health ({failure}) within vllm.connect_timeout_s. "
                    f"Start one with `{self.hint}` (on GPUs the trainer does not use), or point "
                    "vllm.base_urls at a running one"
                )
            time.sleep(HEALTH_POLL_S)

    def close(self) -> None:
        self.http.close()


class VLLMServerEngine:
    def __init__(self, cfg: Any, device: torch.device, model_path: str):
        urls = list(cfg.base_urls)
        if not urls:
            raise ValueError(
                "vllm.base_urls is empty: list the URL of every server, e.g. '[http://127.0.0.1:8000]'"
            )
        if cfg.sync_weights:
            if device.type != "cuda":
                raise ValueError(
                    "vllm=server pushes the trainer's weights to the servers over NCCL or CUDA IPC, which needs "
                    "the trainer on a CUDA GPU (hardware=1gpu). On a CPU it can only generate: set "
                    "vllm.sync_weights=false (the logp-gap check then stops training once the trainer has moved "
                    "off the served weights)"
                )
            if importlib.util.find_spec("vllm") is None:
                raise ValueError(
                    "vllm=server needs vLLM in the trainer's environment for the weight transfer: make install-gpu"
                )
            if len(set(urls)) != len(urls):
                raise ValueError(
                    f"vllm.base_urls lists a server twice ({urls}): each must join the NCCL group once"
                )
        else:
            log.warning(
                "vllm.sync_weights=false: the servers keep the weights they loaded and never see the trainer's "
                "updates; the logp-gap check (vllm.max_logp_gap) stops training once the trainer has moved away"
            )
        self.cfg, self.device, self.model_path = cfg, device, model_path
        self.hint = serve_hint(model_path, urls)
        self.servers = [ServerClient(url, cfg, self.hint) for url in urls]
        self.pool = ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="vllm-server")
        self.transfer = None  # "nccl" or "ipc", as the servers take weights (None: generation only)
        self.group = None  # the trainer's NCCL communicator, once made
        self.stats: dict[str, float] = {}
        try:
            deadline = time.monotonic() + cfg.connect_timeout_s
            for server in self.servers:
                server.wait_healthy(deadline)
            self.world_sizes = [self.check_server(server) for server in self.servers]
            if cfg.sync_weights:
                self.transfer = self.pick_transfer()
                self.hint = serve_hint(model_path, urls, self.transfer)
                for server in self.servers:  # a dead server's error names the command that restarts it
                    server.hint = self.hint
            if self.transfer == "nccl":
                self.init_weight_transfer()
            elif self.transfer == "ipc":
                import_ipc_engine()  # a missing ray fails here, at start, not at the first push
        except BaseException:
            self.close()
            raise

    def check_server(self, server: ServerClient) -> int:
        """Check the server's flags; its GPU count (TP x PP x DP) = its ranks in the NCCL group."""
        try:
            server.info = server.call("GET", "/server_info", params={"config_format": "json"})
        except RuntimeError as error:
            if "HTTP 404" not in str(error):
                raise
            raise ValueError(
                f"the vLLM server at {server.url} has no dev routes (/server_info, the weight-transfer routes): "
                f"start it with VLLM_SERVER_DEV_MODE=1, as `{self.hint}` does"
            ) from error
        check_server_config(server.url, server.info, self.cfg.sync_weights)
        return int(server.call("GET", "/get_world_size")["world_size"])

    def pick_transfer(self) -> str:
        """NCCL or IPC, as the servers' transfer and GPUs allow (gpu_guard.pick_transfer refuses the rest).

        Only servers on this host can share the trainer's GPU; for them the GPUs come from their reported
        CUDA_VISIBLE_DEVICES and world size.
        """
        local = [gpu_guard.is_local_host(server.url) for server in self.servers]
        physical = gpu_guard.physical_gpu_uuids() if any(local) else []
        placements = [
            gpu_guard.ServerPlacement(
                url=server.url,
                backend=weight_transfer_backend(server.info),
                gpu_uuids=gpu_guard.server_gpu_uuids(
                    gpu_guard.visible_devices_in(server.info["system_env"].get("env_vars") or ""),
                    physical,
                    size,
                )
                if is_local
                else None,
            )
            for server, size, is_local in zip(self.servers, self.world_sizes, local)
        ]
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        transfer = gpu_guard.pick_transfer(
            gpu_guard.cuda_device_uuid(index), placements, physical, self.model_path
        )
        if (
            transfer == "ipc"
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # vLLM's IPC sender gathers every training rank's handles, but only rank 0 pushes here
            raise ValueError(
                "a vLLM server on the trainer's GPU (CUDA IPC) serves one training process; with several, "
                "serve on GPUs of their own (make serve TRANSFER=nccl)"
            )
        log.info("weights go to the vLLM server(s) over %s", "CUDA IPC" if transfer == "ipc" else "NCCL")
        return transfer

    def init_weight_transfer(self) -> None:
        """The NCCL group: trainer_init here while every server's workers join through their route."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        from vllm.utils.network_utils import get_ip, get_open_port

        started = time.perf_counter()
        all_local = all(gpu_guard.is_local_host(server.url) for server in self.servers)
        host = self.cfg.nccl_host or ("127.0.0.1" if all_local else get_ip())
        port = self.cfg.nccl_port or get_open_port()
        world_size = 1 + sum(self.world_sizes)
        timeout = self.cfg.nccl_timeout_s

        def join(server: ServerClient, offset: int) -> None:
            init_info = {
                "master_address": host,
                "master_port": port,
                "rank_offset": offset,
                "world_size": world_size,
            }
            server.call(
                "POST",
                "/init_weight_transfer_engine",
                json={"init_info": init_info},
                timeout=timeout,
                retry=False,
            )

        def trainer_side():
            with torch.cuda.device(self.device):
                group = NCCLWeightTransferEngine.trainer_init(
                    {"master_address": host, "master_port": port, "world_size": world_size}
                )
            if group.disabled:  # vLLM falls back to a no-op communicator; the servers would wait forever
                raise RuntimeError(
                    "vLLM's NCCL communicator is disabled in the trainer (no NCCL library found, or "
                    "VLLM_DISABLE_PYNCCL is set): the weights cannot be pushed"
                )
            return group

        joins = [
            Background(lambda s=server, o=offset: join(s, o), f"{server.url}/init_weight_transfer_engine")
            for server, offset in zip(self.servers, rank_offsets(self.world_sizes))
        ]
        rendezvous = Background(trainer_side, f"the NCCL rendezvous on {host}:{port}")
        self.group = wait_all([rendezvous, *joins], timeout)[0]
        self.stats["time/sync_init_s"] = time.perf_counter() - started
        log.info(
            "NCCL weight transfer to %d server(s) (%d ranks) ready in %.1f s",
            len(self.servers),
            world_size - 1,
            self.stats["time/sync_init_s"],
        )

    def wire_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """inference_weights in the dtype they travel in, converted one tensor at a time."""
        dtype = getattr(torch, self.cfg.transfer_dtype) if self.cfg.transfer_dtype else None
        for name, tensor in inference_weights(model):
            yield name, tensor.to(dtype) if dtype is not None else tensor

    def on_every_server(self, method: str, path: str, **kwargs) -> list[Any]:
        return list(self.pool.map(lambda server: server.call(method, path, **kwargs), self.servers))

    def sync_weights(self, model: torch.nn.Module) -> None:
        if not self.cfg.sync_weights:
            return
        if self.transfer == "nccl" and self.group is None:
            raise EngineUnavailable("the NCCL weight transfer was torn down after an earlier failure")

        # The metadata comes from the parameters' shapes: the weights themselves are computed (LoRA merges,
        # FSDP2 gathers) once, while they are sent.
        wire_dtype = getattr(torch, self.cfg.transfer_dtype) if self.cfg.transfer_dtype else None
        names, dtypes, shapes, sizes = [], [], [], []
        for name, held_dtype, shape in inference_weight_specs(model):
            dtype = wire_dtype or held_dtype
            names.append(name)
            dtypes.append(str(dtype).removeprefix("torch."))
            shapes.append(list(shape))
            sizes.append(shape.numel() * dtype.itemsize)

        try:
            started = time.perf_counter()
            self.on_every_server("POST", "/start_weight_update", retry=False)
            sending = time.perf_counter()
            if self.transfer == "ipc":
                self.stats["sync/ipc_buckets"] = float(self.send_over_ipc(model, sizes))
            else:
                update_info = {"names": names, "dtype_names": dtypes, "shapes": shapes, "packed": True}
                self.broadcast_over_nccl(model, update_info)
            finishing = time.perf_counter()
            self.on_every_server("POST", "/finish_weight_update", retry=False)
            # Cached prefixes were computed with the old weights.
            for server, answer in zip(self.servers, self.on_every_server("POST", "/reset_prefix_cache")):
                if not (answer or {}).get("success", False):
                    raise EngineUnavailable(
                        f"the vLLM server at {server.url} could not reset its prefix cache"
                    )
        except BaseException as error:
            self.abort_weight_transfer()
            if isinstance(error, EngineUnavailable):
                raise
            raise EngineUnavailable(f"the weight sync failed ({type(error).__name__}: {error})") from error
        done = time.perf_counter()
        self.stats["time/sync_start_s"] = sending - started
        self.stats["time/sync_broadcast_s"] = finishing - sending  # the push itself, NCCL or IPC
        self.stats["time/sync_finish_s"] = done - finishing
        self.stats["sync/weight_gib"] = sum(sizes) / 2**30

    def broadcast_over_nccl(self, model: torch.nn.Module, update_info: dict) -> None:
        """Every server's /update_weights (the names, dtypes and shapes) while this process broadcasts."""
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerSendWeightsArgs,
            NCCLWeightTransferEngine,
        )

        def broadcast() -> None:
            with torch.cuda.device(self.device):
                NCCLWeightTransferEngine.trainer_send_weights(
                    self.wire_weights(model), NCCLTrainerSendWeightsArgs(group=self.group, packed=True)
                )
                torch.cuda.synchronize()  # the last packed buffers are still in flight when it returns

        timeout = self.cfg.nccl_timeout_s
        receivers = [
            Background(
                lambda s=server: s.call(
                    "POST", "/update_weights", json={"update_info": update_info}, timeout=timeout, retry=False
                ),
                f"{server.url}/update_weights",
            )
            for server in self.servers
        ]
        wait_all([Background(broadcast, "the NCCL weight broadcast"), *receivers], timeout)

    def send_over_ipc(self, model: torch.nn.Module, sizes: list[int]) -> int:
        """The weights in buckets of vllm.ipc_bucket_mib through vLLM's IPC engine; the number of buckets.

        One trainer_send_weights call per bucket, although vLLM's packed sender can cut buckets itself: it
        shares its one buffer with the server once, and the server opens it once per bucket, so torch's count
        of the buffer's users (read as unsigned, torch/csrc/CudaIPCTypes.cpp) goes below zero, wraps, and the
        trainer never frees that buffer: a bucket of GPU memory lost per push. Shared once per call, each
        buffer is freed when the call ends and comes back from torch's cache for the next (all one size).

        Every push carries the whole model, never a part: vLLM's layerwise reload rebuilds fused modules
        (qkv_proj, gate_up_proj) from their parts between /start_weight_update and /finish_weight_update, and
        a push with part of a fused group (q and v without k) corrupts it. Buckets may split a group: within
        one start/finish the reload gathers all of its parts.
        """
        ipc = import_ipc_engine()
        capacity = max(self.cfg.ipc_bucket_mib * 2**20, *sizes)
        counts = bucket_counts(sizes, capacity)
        weights = self.wire_weights(model)
        args = ipc.IPCTrainerSendWeightsArgs(
            send_mode=self.post_ipc_bucket, packed=True, packed_buffer_size_bytes=capacity
        )
        with torch.cuda.device(self.device):
            for count in counts:
                ipc.IPCWeightTransferEngine.trainer_send_weights(itertools.islice(weights, count), args)
        return len(counts)

    def post_ipc_bucket(self, update: Any) -> None:
        """One bucket to every server (vLLM's send_mode hook): through this engine's HTTP client rather than
        vLLM's own (a fixed 300 s), so the call has vllm.nccl_timeout_s and a dead server ends in
        EngineUnavailable like every other call. Returns once the servers have copied the bucket out."""
        self.on_every_server(
            "POST",
            "/update_weights",
            json=ipc_update_body(update),
            timeout=self.cfg.nccl_timeout_s,
            retry=False,
        )

    def abort_weight_transfer(self) -> None:
        """Drop the NCCL communicator (vLLM aborts it off-thread, so a broadcast stuck on a dead peer ends)."""
        group, self.group = self.group, None
        if group is not None:
            group.destroy()

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Any) -> Rollout:
        shares = shard(prompt_ids, len(self.servers))

        def ask(server: ServerClient, share: list[list[int]]):
            if not share:
                return [], [], []
            answer = server.call(
                "POST", "/v1/completions", json=completion_request(share, n, sampling, self.cfg.regex)
            )
            return parse_completions(answer, len(share), n)

        # map keeps the servers' order, which is the prompts' order
        parts = list(self.pool.map(ask, self.servers, shares))
        completion_ids = [ids for part in parts for ids in part[0]]
        finished = [flag for part in parts for flag in part[1]]
        logprobs = [row for part in parts for row in part[2]]
        self.stats["rollout/server_retries"] = float(sum(server.retried for server in self.servers))
        for server in self.servers:
            server.retried = 0
        stats, self.stats = self.stats, {}
        return Rollout(
            completion_ids=completion_ids, finished=finished, sampler_logprobs=logprobs, stats=stats
        )

    def close(self) -> None:
        self.abort_weight_transfer()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            server.close()
