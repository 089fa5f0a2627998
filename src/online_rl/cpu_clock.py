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

(How fast each of the host's CPUs runs Python, which the bench records around its arms, is the bench's own
probe: bench/host.py.)
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
