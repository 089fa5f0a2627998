"""vllm=server on two CUDA GPUs (`make test-gpu`): the server on GPU 0 (started by scripts/serve.sh), the
trainer on GPU 1, the weights pushed through vLLM's NCCL weight-transfer handshake.

Both sides run the tiny model in float32, so vLLM's log-probs must follow the trainer's weights closely.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.engines.server.gpu_guard import SameDeviceError

from .conftest import ROOT, ServeScript, compose_config, trainer_gap

pytestmark = pytest.mark.gpu

G = 4
TRAINER = torch.device("cuda:1")  # this process sees both GPUs; the server was given GPU 0


@pytest.fixture(scope="module", autouse=True)
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs: the server on one, the trainer on the other")


@pytest.fixture(scope="module")
def server(two_gpus, tiny_model_dir, tmp_path_factory):
    handle = ServeScript(
        tmp_path_factory.mktemp("serve") / "serve.log",
        MODEL=str(tiny_model_dir),
        GPUS="0",
        MEM="0.3",
        MAX_LEN="512",
        EXTRA="--dtype float32 --enforce-eager",
    )
    try:
        handle.wait_healthy(600)
        yield handle
    finally:
        handle.stop()


def engine_for(server, device=TRAINER, **overrides):
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    settings = [f"vllm.{k}={v}" for k, v in overrides.items()]
    cfg = compose_config(["vllm=server", f"vllm.base_urls=[{server.url}]", *settings]).vllm
    return VLLMServerEngine(cfg, device, model_path="tiny")


@pytest.fixture
def trainer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(TRAINER)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sampling(**overrides):
    return compose_config(
        [f"sampling.{k}={v}" for k, v in {"max_completion_length": 16, **overrides}.items()]
    ).sampling


def prompts(tokenizer):
    return [tokenizer(q)["input_ids"] for q in ("What is 1 + 2?", "What is 40 - 3?", "What is 7 * 6?")]


def gap(model, tokenizer, prompt_ids, rollout):
    """Mean |trainer - server| log-prob over the tokens the server sampled (temperature 1)."""
    return trainer_gap(model, tokenizer, prompt_ids, rollout, 1.0)[0]


def test_pushed_weights_drive_the_servers_samples_and_logprobs(server, trainer, tokenizer):
    engine = engine_for(server)
    try:
        original = copy.deepcopy(trainer.state_dict())
        engine.sync_weights(trainer)
        stats = dict(engine.stats)
        before = engine.generate(prompts(tokenizer), G, sampling())
        assert gap(trainer, tokenizer, prompts(tokenizer), before) < 5e-3

        with torch.no_grad():
            for param in trainer.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        engine.sync_weights(trainer)
        after = engine.generate(prompts(tokenizer), G, sampling())
        assert gap(trainer, tokenizer, prompts(tokenizer), after) < 5e-3  # the server runs the new weights
        trainer.load_state_dict(original)
        assert gap(trainer, tokenizer, prompts(tokenizer), after) > 1e-2  # and they are not the old ones

        engine.sync_weights(trainer)  # back to the original: the server follows again
        restored = engine.generate(prompts(tokenizer), G, sampling())
        assert gap(trainer, tokenizer, prompts(tokenizer), restored) < 5e-3
    finally:
        engine.close()
    assert stats["time/sync_init_s"] > 0 and stats["time/sync_broadcast_s"] > 0
    assert stats["sync/weight_gib"] == pytest.approx(sum(p.numel() * 4 for p in trainer.parameters()) / 2**30)


def test_bfloat16_on_the_wire_halves_the_bytes(server, trainer, tokenizer):
    engine = engine_for(server, transfer_dtype="bfloat16")
    try:
        engine.sync_weights(trainer)
        stats = dict(engine.stats)
        rollout = engine.generate(prompts(tokenizer), G, sampling())
    finally:
        engine.close()
    assert stats["sync/weight_gib"] == pytest.approx(sum(p.numel() * 2 for p in trainer.parameters()) / 2**30)
    assert (
        gap(trainer, tokenizer, prompts(tokenizer), rollout) < 0.05
    )  # bf16-rounded weights: close, not exact


def test_trainer_on_the_servers_gpu_is_refused(server):
    with pytest.raises(SameDeviceError, match="CUDA_VISIBLE_DEVICES=1"):
        engine_for(server, device=torch.device("cuda:0"))


def train(tmp_path, server, tiny_model_dir, *overrides):
    command = [
        sys.executable,
        "train.py",
        "hardware=1gpu",
        "logger=none",
        "max_steps=3",
        "data.synthetic_rows=128",
        "prompts_per_step=8",
        "algo.num_generations=4",
        "micro_batch_size=16",
        "model.random_init=null",
        f"model.name_or_path={tiny_model_dir}",
        "vllm=server",
        f"vllm.base_urls=[{server.url}]",
        *overrides,
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}  # the trainer's own GPU, as a user would run it
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_run_with_the_server(tmp_path, server, tiny_model_dir, lora):
    extra = ["model.lora.enabled=true", "optim.lr=1e-2"] if lora else ["optim.lr=1e-3"]
    history = train(tmp_path, server, tiny_model_dir, *extra)
    assert len(history) == 3
    for metrics in history:
        assert metrics["sync/logp_gap_mean"] < 0.1, metrics  # the threshold the run itself enforces
        assert metrics["time/sync_broadcast_s"] > 0
    assert history[-1]["train/grad_norm"] > 0
