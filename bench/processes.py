"""What the processes of one command share: their environment (this checkout's code, CUDA's MPS daemon when it
runs), the daemon itself, and stopping them all on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from bench.settings import REPO


class MultiProcessService:
    """CUDA's Multi-Process Service for the arms of one command (`--set mps=true`), its daemon started before
    the first arm and stopped after the last, its pipes and logs under `directory`; `env` points the arms'
    processes at it.

    Without it the GPU gives the work of each process time slices in turn. Our off-policy arm runs two, the
    trainer and vLLM's engine, and on the H200 a rollout beside training took 3.07 s against 2.2-2.5 s alone
    (bench/results/2026-11-30-4167c1a.md): each decoding step's small kernels waited for the trainer's turn
    to end. With the daemon, both processes' kernels go to the GPU through one context and can run at once.
    One process (TRL, our on-policy arms) runs as before."""

    CONTROL = "nvidia-cuda-mps-control"

    def __init__(self, enabled: bool, directory: Path):
        self.env = (
            {
                "CUDA_MPS_PIPE_DIRECTORY": str(directory / "pipe"),
                "CUDA_MPS_LOG_DIRECTORY": str(directory / "log"),
            }
            if enabled
            else {}
        )

    def control(self, *args: str, text: str | None = None) -> None:
        try:
            subprocess.run(
                [self.CONTROL, *args],
                input=text,
                env={**os.environ, **self.env},
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise SystemExit(
                f"--set mps=true: {self.CONTROL} is not on this machine's PATH (it comes with NVIDIA's driver "
                "utilities); leave out mps"
            ) from None
        except subprocess.CalledProcessError as error:
            said = (error.stderr or error.stdout).strip()
            fix = (
                f"; a daemon left by an earlier command (one killed, say) stops with `echo quit | "
                f"CUDA_MPS_PIPE_DIRECTORY={self.env['CUDA_MPS_PIPE_DIRECTORY']} {self.CONTROL}`"
                if "already running" in said
                else ""
            )
            raise SystemExit(
                f"--set mps=true: `{self.CONTROL} {' '.join(args)}` failed ({error.returncode}): "
                f"{said[-500:]}; its log: {self.env['CUDA_MPS_LOG_DIRECTORY']}{fix}"
            ) from None

    def __enter__(self) -> MultiProcessService:
        if self.env:
            for directory in self.env.values():
                Path(directory).mkdir(parents=True, exist_ok=True)
            self.control("-d")  # returns once the daemon runs; it starts its server at the first client
        return self

    def __exit__(self, *exc) -> None:
        if self.env:
            self.control(text="quit\n")


@contextlib.contextmanager
def sigterm_exits():
    """A command stopped by SIGTERM (`timeout`, a job scheduler) unwinds as from an error: the signal becomes
    SystemExit, which subprocess.run answers by killing the running arm, and the contexts inside this one (the
    MPS daemon) are closed, where both used to outlive the command."""

    def stop(signum, frame) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def child_env(mps: MultiProcessService) -> dict[str, str]:
    """The environment of the processes a command starts (arms, variants, `python -m bench...` each): this
    checkout's code on the path (the library's and this package's), and the MPS daemon's pipes when it runs."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **mps.env,
    }


def stop_gently(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after grace_s: an arm given SIGTERM unwinds (sigterm_exits) and stops what it
    started (a server arm's vLLM server, which a SIGKILL of the arm alone would leave running)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
