"""Two training ranks on two CUDA GPUs (`make test-gpu` on a 2-GPU machine): `accelerate launch` of
train.py with a colocated vLLM engine per rank (vLLM's external_launcher), under DDP and under FSDP2.

What CPUs cannot show: NCCL between the ranks, one vLLM engine per rank inside the training process
group, and the FSDP2 weights gathered into each engine (the logp-gap check stops a run whose engines do
not generate with the trainer's weights). The maths of several ranks is tested on CPUs in
tests/test_distributed.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

RUN = [
    "vllm=colocate",
    "logger=trackio",
    "max_steps=3",
    "eval_every=0",
    "data.synthetic_rows=128",
    "prompts_per_step=8",
    "algo.num_generations=4",
    "micro_batch_size=16",
    "vllm.gpu_memory_utilization=0.3",
]


def launch(tmp_path, hardware: str, *overrides: str) -> list[dict]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", str(free_port())]
    command += ["train.py", f"hardware={hardware}", *RUN, *overrides, f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert output.count("step 3/3 | reward") == 1  # rank 0 prints
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("hardware", ["2gpu_ddp", "2gpu_fsdp2"], ids=["ddp", "fsdp2"])
def test_two_ranks_with_a_colocated_engine_each_train(tmp_path, hardware):
    metrics = launch(tmp_path, hardware)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # one metrics.jsonl, each step once
    for m in metrics:
        # each rank's engine generated with that rank's current weights (FSDP2: gathered in full)
        assert m["sync/logp_gap_mean"] < 0.05, m
    assert (tmp_path / "model" / "model.safetensors").exists()
    # FSDP2 checkpoints hold each rank's shards (torch.distributed.checkpoint); the export above is whole
    weights = "sharded/.metadata" if hardware == "2gpu_fsdp2" else "model.safetensors"
    assert (tmp_path / "checkpoints" / "step_000003" / weights).exists()


def test_accelerate_fsdp_settings_are_refused_before_any_work(tmp_path):
    """accelerate's own FSDP (--use_fsdp, or a config file) is not what shards here: hardware= is."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2"]
    command += ["--main_process_port", str(free_port())]
    command += ["train.py", "hardware=2gpu_fsdp2", *RUN, f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "accelerate launch passed FSDP, which this trainer does not read" in result.stderr
