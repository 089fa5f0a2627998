"""What the CPU did while a step ran: the main thread's own CPU seconds, and the seconds the hypervisor gave the
machine's CPUs to someone else (steal), logged for each on-policy rollout as `time/generate_cpu_s` and
`time/generate_steal_s`.

Generation with vLLM is bound by one CPU thread (its scheduler's Python). A rollout that takes 3.2 s instead
of 2.2 s either kept that thread busy for longer, or made it wait: for another thread's Python (the
interpreter's lock) or for a CPU that the host lent elsewhere (steal rises; on a cloud VM, other tenants).
Only such waits leave the thread's CPU seconds below the rollout's: CUDA spins while it waits for the GPU, so
a rollout slowed on the device (or by another thread's calls into the driver) shows as busy. On the H200,
while a thread in the trainer's process read the GPU's free memory 20 times a second, the loop's rollouts
took 1.33x as long as the same rollouts without it, with CPU seconds equal to their wall time throughout
(bench/results/2026-11-30-ec0c693.md).

`cpu_speeds` times the same few ms of Python on each CPU: how busy the host's other tenants keep them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def stolen_cpu_s() -> float | None:
    """Seconds of CPU time stolen from this machine's CPUs since boot, summed over them (Linux's steal
    counter: time a virtual CPU was ready to run while the hypervisor ran something else); None where the
    kernel does not say (not Linux, or a kernel that does not count it)."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: the 8th value, in clock ticks
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


class CpuUse:
    """`with CpuUse() as use:` ... then `use.thread_s`, this thread's CPU seconds in the block, and
    `use.steal_s`, the host's steal from all CPUs over it (None where the kernel does not count it)."""

    def __enter__(self) -> CpuUse:
        self._thread_started, self._stolen_before = time.thread_time(), stolen_cpu_s()
        return self

    def __exit__(self, *exc_info) -> None:
        self.thread_s = time.thread_time() - self._thread_started
        stolen = stolen_cpu_s()
        self.steal_s = stolen - self._stolen_before if None not in (stolen, self._stolen_before) else None


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
