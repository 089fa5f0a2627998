"""vllm=server on ONE CUDA GPU (`make test-gpu`): the stock server started by scripts/serve.sh with
TRANSFER=ipc at MEM=0.3 on the trainer's own GPU, the weights pushed through vLLM's CUDA IPC engine.

The model is the Qwen2-0.5B shape with random weights (built here, nothing downloaded), float32 on both
sides, so that a full push takes several buckets (about 2 GB against 512 MiB buckets): the case in which
vLLM's packed sender, left to cut buckets itself, kept one buffer per push in the trainer.
"""

import importlib.util
import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import ROOT, ServeScript, compose_config, trainer_gap

pytestmark = pytest.mark.gpu

G = 4
TRAINER = torch.device("cuda:0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("ray") is None:
        pytest.fail("vLLM 0.26's IPC weight transfer imports ray: pip install -e '.[server]'")
    from online_rl.data import synthetic_arithmetic
    from online_rl.models import build_random_model

    spec = compose_config(["model=qwen2_0.5b_random"]).model.random_init
    rows = synthetic_arithmetic(500)
    return build_random_model(spec, [*rows["prompt"], *rows["solution"]], tmp_path_factory.mktemp("qwen05"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from online_rl.engines.server import gpu_guard

    # the server on the trainer's physical GPU, named in NVML's order as make serve's GPUS is
    mine = gpu_guard.cuda_device_uuid(TRAINER.index)
    gpu = [gpu_guard.normalize_uuid(u) for u in gpu_guard.physical_gpu_uuids()].index(mine)
    handle = ServeScript(
        tmp_path_factory.mktemp("serve") / "serve.log",
        MODEL=str(model_dir),
        GPUS=str(gpu),
        MEM="0.3",
        TRANSFER="ipc",
        MAX_LEN="512",
        EXTRA="--dtype float32 --enforce-eager",
    )
    try:
        handle.wait_healthy(600)  # 141-151 s on a fresh H200
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def prompts(tokenizer):
    return [tokenizer(q)["input_ids"] for q in ("What is 1 + 2?", "What is 40 - 3?", "What is 7 * 6?")]


def gap(model, tokenizer, prompt_ids, rollout):
    """Mean |trainer - server| log-prob over the tokens the server sampled (temperature 1)."""
    return trainer_gap(model, tokenizer, prompt_ids, rollout, 1.0)[0]


def test_one_optimizer_step_reaches_the_server_over_ipc_without_growing_the_trainer(
    server, model_dir, tokenizer
):
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    cfg = compose_config(["vllm=server", f"vllm.base_urls=[{server.url}]"]).vllm
    sampling = compose_config(["sampling.max_completion_length=16"]).sampling
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(TRAINER)
    engine = VLLMServerEngine(cfg, TRAINER, model_path=str(model_dir))
    try:
        assert engine.transfer == "ipc"
        served = engine.generate(prompts(tokenizer), G, sampling)
        start_gap = gap(trainer, tokenizer, prompts(tokenizer), served)
        assert start_gap < cfg.max_logp_gap, start_gap  # the server loaded the trainer's starting weights

        optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
        batch = torch.tensor([sum(prompts(tokenizer), [])], device=TRAINER)
        trainer(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stale = engine.generate(prompts(tokenizer), G, sampling)
        stale_gap = gap(trainer, tokenizer, prompts(tokenizer), stale)
        assert stale_gap > cfg.max_logp_gap, stale_gap  # far: the server still runs the old weights

        allocated = []
        for _ in range(3):
            engine.sync_weights(trainer)
            torch.cuda.synchronize(TRAINER)
            allocated.append(torch.cuda.memory_allocated(TRAINER))
            stats = dict(engine.stats)
            pushed = engine.generate(prompts(tokenizer), G, sampling)
            pushed_gap = gap(trainer, tokenizer, prompts(tokenizer), pushed)
            assert pushed_gap < cfg.max_logp_gap, pushed_gap  # the server runs the stepped weights
        assert stats["sync/ipc_buckets"] > 1 and stats["time/sync_broadcast_s"] > 0
        # a bucket is 512 MiB or more: one left behind per push would show at once
        assert allocated[-1] - allocated[0] < 64 * 2**20, [a / 2**20 for a in allocated]
    finally:
        engine.close()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_grpo_beside_the_server_on_one_gpu_on_policy_and_k_updates_behind(server, model_dir, tmp_path, k):
    """`python train.py vllm=server hardware=1gpu` beside the server on its GPU, float32 on both sides.
    off_policy_steps=0: every rollout pushed over IPC and checked. off_policy_steps=k: the engine's thread
    pushes between its rollouts while the trainer trains; each step's rollout at most k updates behind, the
    first (and any of staleness 0) under the gap threshold, the stale ones visibly apart; the final evaluation
    waits for the background thread and uses the server after it."""
    command = [
        sys.executable,
        "train.py",
        "hardware=1gpu",
        "hardware.autocast_dtype=null",
        "logger=none",
        "max_steps=5",
        "eval_every=5",
        "eval.holdout_size=8",
        "data.synthetic_rows=128",
        "prompts_per_step=8",
        "algo.num_generations=4",
        "micro_batch_size=16",
        "sampling.max_completion_length=64",
        "model.random_init=null",
        f"model.name_or_path={model_dir}",
        "vllm=server",
        f"vllm.base_urls=[{server.url}]",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
        f"off_policy_steps={k}",
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    history = [m for m in lines if "train/loss" in m]
    assert len(history) == 5 and any("eval/reward_mean" in m for m in lines)
    staleness = [m["rollout/staleness"] for m in history]
    assert staleness[0] == 0 and all(0 <= s <= k for s in staleness), staleness
    first_gap = history[0]["sync/logp_gap_mean"]
    for metrics in history:
        if metrics["rollout/staleness"] == 0:
            assert metrics["sync/logp_gap_mean"] < 0.1, metrics  # the threshold the run itself enforces
        else:
            assert metrics["sync/logp_gap_mean"] > first_gap, metrics
    if k:
        assert max(staleness) >= 1, staleness
        assert any(m["time/sync_s"] > 0 for m in history[1:]), history  # pushed by the engine's thread
    print(
        f"off_policy_steps={k}: staleness {staleness}, step s {[round(m['time/step_s'], 2) for m in history]}"
    )


def test_server_killed_mid_push_gives_a_clear_error_and_a_checkpoint(server, model_dir, tokenizer, tmp_path):
    """Runs last: it stops the module's server. The trainer pushes back to back when serve.sh gets SIGTERM."""
    from online_rl.checkpoint import save_checkpoint
    from online_rl.engines import EngineUnavailable, SaveWhenUnavailable
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    cfg = compose_config(["vllm=server", f"vllm.base_urls=[{server.url}]", "vllm.nccl_timeout_s=30"]).vllm
    trainer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(TRAINER)
    saved = []

    def save():
        saved.append(save_checkpoint(tmp_path / "checkpoints", 3, trainer, tokenizer, {}))
        return saved[-1]

    engine = SaveWhenUnavailable(VLLMServerEngine(cfg, TRAINER, model_path=str(model_dir)), save)
    errors = []

    def keep_pushing():
        try:
            while True:
                engine.sync_weights(trainer)
        except Exception as error:
            errors.append(error)

    pusher = threading.Thread(target=keep_pushing, daemon=True)
    pusher.start()
    time.sleep(3)
    assert pusher.is_alive() and not errors, errors  # it was pushing fine
    server.stop()
    stopped = time.monotonic()
    pusher.join(timeout=cfg.nccl_timeout_s + 30)
    try:
        assert not pusher.is_alive(), "the push hung on a dead server"
        assert time.monotonic() - stopped < cfg.nccl_timeout_s + 30
        (error,) = errors
        assert isinstance(error, EngineUnavailable), repr(error)
        assert str(saved[0]) in str(error) and (saved[0] / "trainer_state.pt").exists()
        assert "TRANSFER=ipc" in str(error) or "weight sync failed" in str(error), str(error)
    finally:
        engine.close()
