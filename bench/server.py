"""The server arms (ours_server, ours_server_k1, ours_server_k2; issue 28): our loop as a user runs it against a
stock vLLM server on the trainer's own GPU, the weights pushed over CUDA IPC.

Each arm starts its server with scripts/serve.sh (what `make serve` runs) on the bench's model directory, waits
for its /health, runs train.py against it (arms.run_ours) and stops it, whatever happened. The server's start
(1-2.5 min) is no part of any step: the arm measures train.py's steps from its metrics.jsonl, after the same
warm-up, as the other ours arms do.

The server gets what TRL's vLLM gets (gpu_memory_utilization of the GPU; the trainer the rest), the length
of the bench's sequences, bf16 weights (as our colocated engine), the step's completions decoded at once and
vLLM's asynchronous scheduling (as the ours arms' engine). vLLM 0.26's IPC transfer imports ray on both sides.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.settings import REPO, Settings

# serve.sh's trap gives its servers 30 s after SIGTERM, then kills them; this leaves it the time to
STOP_GRACE_S = 45.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_env(settings: Settings, model_dir: Path, port: int, python: str) -> dict[str, str]:
    """scripts/serve.sh's settings for the arm's server: on the trainer's GPU (the first of
    CUDA_VISIBLE_DEVICES, as the trainer's cuda:0), alone on it, bound to 127.0.0.1, IPC transfer."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    extra = [
        "--dtype bfloat16",
        f"--max-num-seqs {settings.prompts_per_step * settings.num_generations}",
        "--async-scheduling",
        f"--seed {settings.seed}",
    ]
    return {
        "MODEL": str(model_dir),
        "GPUS": gpu,
        "TP": "1",
        "DP": "1",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "MEM": str(settings.gpu_memory_utilization),
        "MAX_LEN": str(settings.prompt_tokens + settings.completion_tokens),
        "TRANSFER": "ipc",
        "EXTRA": " ".join(extra),
        "PYTHON": python,
    }


def process_groups_under(pid: int) -> set[int]:
    """The process groups of pid's children: serve.sh starts each server in a session of its own (setsid), so
    a server's API process, engine core and workers share its group."""
    groups = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # (gone meanwhile)
            continue
        if int(fields[1]) == pid:  # fields after the name: state, ppid, pgrp
            groups.add(int(fields[2]))
    return groups


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen, groups: set[int]) -> None:
    """SIGTERM to serve.sh, whose trap stops its servers; whatever is left after STOP_GRACE_S (serve.sh, a
    server's group) is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # (serve.sh runs in a session of its own)
            process.wait()
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def stock_server(settings: Settings, model_dir: Path, log_path: Path, python: str) -> Iterator[str]:
    """scripts/serve.sh with serve_env's settings on a free port, yielding its URL once /health answers; it
    fails (RuntimeError with the log's end) when serve.sh exits first or nothing answers within
    settings.server_start_s. The server is stopped on leaving, however the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    groups: set[int] = set()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "serve.sh")],
            cwd=REPO,
            env={**os.environ, **serve_env(settings, model_dir, port, python)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        while not healthy(url):
            groups |= process_groups_under(process.pid)
            if process.poll() is not None:
                raise RuntimeError(
                    f"serve.sh exited with {process.returncode} before {url}/health answered; the end of "
                    f"{log_path}:\n{tail(log_path)}"
                )
            if time.monotonic() - started > settings.server_start_s:
                raise RuntimeError(
                    f"the server did not answer {url}/health within {settings.server_start_s:.0f} s "
                    f"(--set server_start_s=...); the end of {log_path}:\n{tail(log_path)}"
                )
            time.sleep(1.0)
        groups |= process_groups_under(process.pid)
        print(f"bench: server up at {url} after {time.monotonic() - started:.0f} s", flush=True)
        yield url
    finally:
        stop(process, groups)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def check_server_arm(settings: Settings, arm: str) -> None:
    """What a server arm needs before its server starts (1-2.5 min): a CUDA GPU, and ray, which vLLM 0.26's IPC
    weight transfer imports (in the server and in the trainer) without installing it."""
    if settings.device != "cuda" or not settings.use_vllm:
        raise RuntimeError(f"{arm}: a stock vLLM server on the trainer's GPU needs a CUDA GPU and vLLM")
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError(
            f"{arm}: vLLM 0.26's CUDA IPC weight transfer imports ray, which is not installed here: "
            "pip install -e '.[server]' (or pip install ray)"
        )
