"""vLLM colocate with sleep mode on a CUDA GPU (`make test-gpu`). vLLM allows one sleep-mode engine per
process, so every case runs `train.py` (or a snippet) in its own process and reads what it recorded."""

import json
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

pytestmark = pytest.mark.gpu

GPU_RUN = [
    "hardware=1gpu",
    "vllm=colocate",
    "logger=none",
    "max_steps=3",
    "data.synthetic_rows=128",
    "prompts_per_step=8",
    "algo.num_generations=4",
    "micro_batch_size=16",
    "vllm.gpu_memory_utilization=0.3",
]


def train(tmp_path, *overrides):
    result = subprocess.run(
        [sys.executable, "train.py", *GPU_RUN, *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_memory_and_every_rollout_uses_the_latest_weights(tmp_path, level):
    history = train(tmp_path, f"vllm.sleep_level={level}", "optim.lr=1e-3")
    for metrics in history:
        assert metrics["sync/logp_gap_mean"] < 0.1, metrics  # the threshold the run itself enforces
        # vLLM's KV cache (and weights, at level 2) are released while the trainer trains
        assert metrics["memory/device_used_awake_gib"] - metrics["memory/device_used_asleep_gib"] > 10, (
            metrics
        )
    assert history[-1]["train/grad_norm"] > 0


def test_lora_colocate(tmp_path):
    history = train(tmp_path, "model.lora.enabled=true", "optim.lr=1e-2")
    assert all(m["sync/logp_gap_mean"] < 0.1 for m in history), history
    assert (tmp_path / "checkpoints" / "step_000003" / "adapter_model.safetensors").exists()


def test_level_two_refuses_to_generate_before_a_sync(tmp_path):
    """At level 2 the woken weights are garbage until the trainer's are pushed: generate must refuse."""
    snippet = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import compose_config
from online_rl.data import synthetic_arithmetic
from online_rl.models import build_random_model
from online_rl.engines.vllm_colocate import VLLMColocateEngine
cfg = compose_config(["vllm=colocate", "vllm.sleep_level=2", "vllm.gpu_memory_utilization=0.2", "vllm.enforce_eager=true"])
path = build_random_model(cfg.model.random_init, synthetic_arithmetic(100)["prompt"], __import__("pathlib").Path({str(tmp_path)!r}))
engine = VLLMColocateEngine(str(path), cfg.vllm, torch.device("cuda"), seed=0, max_model_len=256)
try:
    engine.generate([[1, 2, 3]], 2, cfg.sampling)
except RuntimeError as error:
    print("REFUSED:", error)
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert "REFUSED: the vLLM engine has no current weights" in result.stdout, result.stderr[-3000:]
