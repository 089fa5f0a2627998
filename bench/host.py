"""The machine a command runs on. Machines of one kind have differed by 20-40% from one lease to the next, and
generation is bound by one CPU thread, so every command records its CPU, GPU and load (machine), how fast the
host's CPUs run Python around each arm (cpu_speeds), and each arm's peak GPU memory (PeakDeviceMemory).

`cpu_speeds` times the same few ms of Python on each CPU: how busy the host's other tenants keep them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.settings import REPO

PROBE_ROUNDS = 2  # cpu_speeds: each CPU's best of this many probes


def python_probe() -> None:
    """A few ms of the interpreter's own work (dicts, lists, ints), as vLLM's scheduler does per decoding step."""
    counts: dict[int, int] = {}
    for i in range(20_000):
        counts[i % 512] = counts.get(i % 512, 0) + i


def cpu_speeds() -> dict[int, float]:
    """Seconds of python_probe on each CPU this thread may use (the best of PROBE_ROUNDS), its affinity put
    back after. On a virtual machine a CPU shares its physical core with other tenants' work, so the same
    Python can take up to twice as long on one CPU as on another, and which CPUs are slow changes from second
    to second (the lent H200's host: bench/results/host-cpus-2026-12-01.txt)."""
    allowed = os.sched_getaffinity(0)
    seconds: dict[int, float] = {}
    try:
        for _ in range(PROBE_ROUNDS):
            for cpu in sorted(allowed):
                os.sched_setaffinity(0, {cpu})  # (0: this thread only)
                started = time.perf_counter()
                python_probe()
                seconds[cpu] = min(seconds.get(cpu, float("inf")), time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, allowed)
    return seconds


def speeds_summary(seconds_by_cpu: dict[int, float]) -> dict[str, float]:
    """cpu_speeds in milliseconds: the fastest CPU's probe, the median CPU's and the slowest's."""
    ms = sorted(1000 * seconds for seconds in seconds_by_cpu.values())
    return {"fastest": round(ms[0], 2), "median": round(ms[len(ms) // 2], 2), "slowest": round(ms[-1], 2)}


def machine() -> dict:
    """What this command ran on. Generation is bound by the CPU, and the same GPU kind has given steps 20-40%
    apart from one lease to the next (TRL: 6.97 against 9.04 s), so each command records its CPU, the load on
    it when the command started (other work on the machine), and the GPU with its driver."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu_models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    try:  # nvidia-smi, not torch: this process must not open a CUDA context (it would count in peak memory)
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        gpus = answer.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {
        "cpu": cpu_models[0] if cpu_models else None,
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "gpus": gpus,  # "name, driver, max SM clock" each
    }


def git_commit() -> str:
    """The checkout's commit, which names a command's results (a copied tree without .git: BENCH_COMMIT)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class PeakDeviceMemory:
    """The GPU's used memory (vLLM's pool as well as torch's), polled every `every_ms` by nvidia-smi in a
    process of its own while an arm runs. Not a thread in the arm's process: one there, calling into CUDA 20
    times a second, shared the interpreter and the driver with the generation it measured."""

    def __init__(self, device: str, every_ms: int = 50):
        self.device, self.every_ms, self.peak_mib = device, every_ms, None
        self.poller: subprocess.Popen | None = None

    def __enter__(self) -> PeakDeviceMemory:
        if self.device == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            try:
                self.poller = subprocess.Popen(
                    [
                        "nvidia-smi",
                        f"--id={visible or 0}",
                        "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits",
                        f"--loop-ms={self.every_ms}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError as error:  # the arm still runs; its peak memory is reported as unknown
                print(f"bench: no peak GPU memory ({error}): nvidia-smi did not start", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.poller is None:
            return
        self.poller.terminate()
        output, _ = self.poller.communicate()
        readings = [int(line) for line in output.split() if line.isdigit()]  # MiB
        self.peak_mib = max(readings) if readings else None

    @property
    def gib(self) -> float | None:
        return self.peak_mib / 1024 if self.peak_mib is not None else None
