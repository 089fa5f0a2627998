"""Refuse to train on a GPU that a vLLM server of this run already uses.

A trainer that lands on the server's GPU (a missing CUDA_VISIBLE_DEVICES is enough) would fight it for
memory, and NCCL refuses two ranks on one device. GPUs are compared by UUID, which names one physical
device whatever a process's CUDA_VISIBLE_DEVICES renumbering.

How the server's GPUs are found, with the stock server only: its dev-mode `/server_info` route reports
the server's CUDA_VISIBLE_DEVICES (in `system_env.env_vars`; `make serve` always sets it) and
`/get_world_size` how many of those devices it uses. The entries are mapped to UUIDs through NVML on
this machine, which is only meaningful for a server on this host; a server elsewhere cannot share the
trainer's GPU and is not checked. Indices are NVML's (PCI bus) order, as vLLM itself reads them.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


class SameDeviceError(ValueError):
    """The trainer's GPU is one a vLLM server uses."""


def normalize_uuid(uuid: object) -> str:
    """NVML says 'GPU-8f3c...', torch '8f3c...': compare them without the prefix, in lower case."""
    text = str(uuid).strip().lower()
    return text.removeprefix("gpu-")


def visible_devices_in(env_vars: str) -> str | None:
    """CUDA_VISIBLE_DEVICES from the 'NAME=value' lines of vLLM's collect_env (None when it is unset)."""
    for line in env_vars.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "CUDA_VISIBLE_DEVICES":
            return value.strip()
    return None


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


def check_trainer_gpu(
    trainer_uuid: str, server_uuids: dict[str, list[str]], physical_uuids: list[str]
) -> None:
    """Raise SameDeviceError when the trainer's GPU is one of a server's; name the CUDA_VISIBLE_DEVICES to use.

    server_uuids: each local server's URL -> the UUIDs of its GPUs.
    """
    mine = normalize_uuid(trainer_uuid)
    sharing = [url for url, uuids in server_uuids.items() if mine in {normalize_uuid(u) for u in uuids}]
    if not sharing:
        return
    known = [normalize_uuid(u) for u in physical_uuids]
    taken = {normalize_uuid(u) for uuids in server_uuids.values() for u in uuids}
    free = [str(i) for i, uuid in enumerate(known) if uuid not in taken]
    where = f"GPU {known.index(mine)}" if mine in known else "a GPU"
    fix = (
        f"start the trainer on another GPU, e.g. CUDA_VISIBLE_DEVICES={','.join(free)} python train.py ..."
        if free
        else "every GPU of this host is a server's: serve on fewer GPUs (make serve GPUS=...) to leave the trainer one"
    )
    raise SameDeviceError(
        f"the trainer is on {where} (GPU-{mine}), which the vLLM server at {', '.join(sharing)} uses; {fix}"
    )


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
