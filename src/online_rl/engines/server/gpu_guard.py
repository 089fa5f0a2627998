"""Which weight transfer a trainer and its vLLM servers can use, from the GPUs they run on.

vLLM 0.26 offers two, and a server runs with one (`--weight-transfer-config`, `make serve TRANSFER=`):
NCCL, a broadcast from the trainer's GPU to the server's, which needs two devices (NCCL refuses two ranks
on one), and CUDA IPC, where the server opens the trainer's own buffers, which needs one: the server's GPU
must be the trainer's. So the trainer on a server's GPU is refused unless that server takes IPC (a missing
CUDA_VISIBLE_DEVICES is enough to land there by mistake), and a server that takes IPC is refused unless it
runs on the trainer's GPU. GPUs are compared by UUID, which names one physical device whatever a process's
CUDA_VISIBLE_DEVICES renumbering.

How the server's GPUs are found, with the stock server only: its dev-mode `/server_info` route reports
the server's CUDA_VISIBLE_DEVICES (in `system_env.env_vars`; `make serve` always sets it) and
`/get_world_size` how many of those devices it uses. The entries are mapped to UUIDs through NVML on
this machine, which is only meaningful for a server on this host; a server elsewhere cannot share the
trainer's GPU. Indices are NVML's (PCI bus) order, as vLLM itself reads them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


class SameDeviceError(ValueError):
    """The trainer's GPU is one a vLLM server uses, and that server cannot take weights there."""


class TransferMismatchError(ValueError):
    """A server's weight transfer cannot reach it from where the trainer is (IPC from another GPU)."""


def normalize_uuid(uuid: object) -> str:
    """NVML says 'GPU-8f3c...', torch '8f3c...': compare them without the prefix, in lower case."""
    text = str(uuid).strip().lower()
    return text.removeprefix("gpu-")


def reported_env_var(env_vars: str, wanted: str) -> str | None:
    """A variable from the 'NAME=value' lines of vLLM's collect_env (None when it is unset or not reported)."""
    for line in env_vars.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == wanted:
            return value.strip()
    return None


def visible_devices_in(env_vars: str) -> str | None:
    """The server's CUDA_VISIBLE_DEVICES, from its collect_env lines (None when it is unset)."""
    return reported_env_var(env_vars, "CUDA_VISIBLE_DEVICES")


def server_gpu_uuids(visible: str | None, physical_uuids: list[str], world_size: int) -> list[str]:
    """The UUIDs of the GPUs a server on this host runs on.

    visible: the server's CUDA_VISIBLE_DEVICES (indices, or UUIDs / unique UUID prefixes); None = all GPUs.
    physical_uuids: this host's GPUs in NVML order. world_size: devices the server uses (TP x PP x DP),
    the first ones it sees.
    """
    entries = (
        [entry.strip() for entry in visible.split(",") if entry.strip()]
        if visible is not None
        else [str(i) for i in range(len(physical_uuids))]
    )
    known = [normalize_uuid(u) for u in physical_uuids]
    uuids = []
    for entry in entries[:world_size]:
        if entry.isdigit():
            index = int(entry)
            if index >= len(known):
                raise ValueError(
                    f"the server's CUDA_VISIBLE_DEVICES names GPU {index}, but this host has {len(known)}"
                )
            uuids.append(known[index])
        else:
            prefix = normalize_uuid(entry)
            matches = [u for u in known if u.startswith(prefix)]
            if len(matches) != 1:
                raise ValueError(
                    f"the server's CUDA_VISIBLE_DEVICES entry {entry!r} names no single GPU here"
                )
            uuids.append(matches[0])
    return uuids


@dataclass(frozen=True)
class ServerPlacement:
    """What the transfer choice needs to know of one server."""

    url: str
    backend: str | None  # its --weight-transfer-config backend, from /server_info ('nccl', 'ipc'; None: none)
    gpu_uuids: list[str] | None  # the GPUs it runs on; None: a server on another host


def make_serve_command(model: str, url: str, **settings: str) -> str:
    """The `make serve` line that restarts the server at `url` with `settings` (GPUS, MEM, TRANSFER, ...)."""
    port = urlsplit(url).port or 8000
    flags = " ".join(f"{name}={value}" for name, value in settings.items())
    return f"make serve MODEL={model} {flags} PORT={port}"


def pick_transfer(
    trainer_uuid: str, servers: list[ServerPlacement], physical_uuids: list[str], model: str
) -> str:
    """'ipc' when every server runs on the trainer's GPU alone and takes IPC; 'nccl' when none runs there
    and all take NCCL. Anything else raises, naming the `make serve` flag or the CUDA_VISIBLE_DEVICES that
    fixes it: SameDeviceError for a server on the trainer's GPU that cannot take weights there,
    TransferMismatchError for an IPC server the trainer's buffers cannot reach, or servers of both kinds
    (one push goes one way).
    """
    mine = normalize_uuid(trainer_uuid)
    known = [normalize_uuid(u) for u in physical_uuids]
    where = f"GPU {known.index(mine)}" if mine in known else "a GPU"
    trainer_gpu = str(known.index(mine)) if mine in known else "<the trainer's GPU>"
    taken = {normalize_uuid(u) for server in servers for u in server.gpu_uuids or []}
    free = [str(i) for i, uuid in enumerate(known) if uuid not in taken]
    own_gpu = (
        f"train on a GPU of its own, e.g. CUDA_VISIBLE_DEVICES={','.join(free)} python train.py ..."
        if free
        else "serve on fewer GPUs (make serve GPUS=...) to leave the trainer one"
    )
    backends = set()
    for server in servers:
        uuids = {normalize_uuid(u) for u in server.gpu_uuids or []}
        if mine in uuids and uuids != {mine}:
            raise SameDeviceError(
                f"the trainer is on {where} (GPU-{mine}), one of the {len(uuids)} GPUs of the vLLM server at "
                f"{server.url}: CUDA IPC reaches only a server on the trainer's GPU alone, and NCCL needs GPUs of "
                f"its own. Serve on the trainer's GPU alone "
                f"(`{make_serve_command(model, server.url, GPUS=trainer_gpu, MEM='0.3', TRANSFER='ipc')}`), or {own_gpu}"
            )
        if mine in uuids and server.backend != "ipc":
            raise SameDeviceError(
                f"the trainer is on {where} (GPU-{mine}), which the vLLM server at {server.url} uses with "
                f"{server.backend or 'no'} weight transfer, and NCCL needs two devices. To share the GPU, restart "
                f"the server with CUDA IPC: "
                f"`{make_serve_command(model, server.url, GPUS=trainer_gpu, MEM='0.3', TRANSFER='ipc')}`; or {own_gpu}"
            )
        if mine not in uuids and server.backend == "ipc":
            server_gpus = [str(known.index(u)) for u in uuids if u in known]
            elsewhere = (
                f"on GPU {','.join(server_gpus)} of this host"
                if server.gpu_uuids is not None
                else "on another host"
            )
            on_its_gpu = (
                f", or train on its GPU: CUDA_VISIBLE_DEVICES={server_gpus[0]} python train.py ..."
                if len(server_gpus) == 1
                else ""
            )
            raise TransferMismatchError(
                f"the vLLM server at {server.url} takes weights over CUDA IPC, which reaches only a trainer on the "
                f"server's own GPU, but it runs {elsewhere} and the trainer on {where}. Restart it with NCCL "
                f"(`{make_serve_command(model, server.url, TRANSFER='nccl')}`){on_its_gpu}"
            )
        backends.add("ipc" if mine in uuids else "nccl")
    if len(backends) > 1:
        raise TransferMismatchError(
            f"some of the vLLM servers ({', '.join(s.url for s in servers)}) share the trainer's GPU over CUDA "
            "IPC and others take NCCL; one push goes one way: serve them all on other GPUs (TRANSFER=nccl) or "
            "one on the trainer's GPU (TRANSFER=ipc)"
        )
    return backends.pop()


def is_local_host(url: str) -> bool:
    """Whether the URL's host is an address of this machine (one a socket here can bind to)."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        return False
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def physical_gpu_uuids() -> list[str]:
    """This host's GPUs in NVML order (what CUDA_VISIBLE_DEVICES indices mean to vLLM)."""
    from vllm.utils.import_utils import import_pynvml

    pynvml = import_pynvml()
    pynvml.nvmlInit()
    try:
        return [
            str(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


def cuda_device_uuid(index: int) -> str:
    """The UUID of this process's CUDA device `index` (after its own CUDA_VISIBLE_DEVICES)."""
    import torch

    return normalize_uuid(torch.cuda.get_device_properties(index).uuid)
