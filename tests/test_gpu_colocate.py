"""vLLM colocate with sleep mode on a CUDA GPU (`make test-gpu`). vLLM allows one sleep-mode engine per
process, so every case runs `train.py` (or a snippet) in its own process and reads what it recorded."""

import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, run_metrics, run_train

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
    run_train(tmp_path, *GPU_RUN, *overrides, timeout=900)
    return [record for record in run_metrics(tmp_path) if "eval/prompts" not in record]  # the training steps


def final_evaluation(tmp_path) -> dict:
    """The evaluation at the end of the run (eval_every: 40 > max_steps). At sleep level 2 it makes several
    engine calls (greedy, then sampled), each after the engine dropped its weights."""
    (evaluation,) = [record for record in run_metrics(tmp_path) if "eval/prompts" in record]
    assert evaluation["step"] == 3 and "eval/pass@1_greedy" in evaluation and "eval/pass@1" in evaluation
    return evaluation


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
    final_evaluation(tmp_path)


def test_lora_colocate(tmp_path):
    history = train(tmp_path, "model.lora.enabled=true", "optim.lr=1e-2")
    assert all(m["sync/logp_gap_mean"] < 0.1 for m in history), history
    assert (tmp_path / "checkpoints" / "step_000003" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["vllm.sleep_level=2"],
        ["vllm.sleep_level=0", "off_policy_steps=1"],
        ["vllm.sleep_level=0", "off_policy_steps=2"],
        ["vllm.sleep_level=2", "vllm.engine_processes=2"],  # each engine sampling its share with them
    ],
    ids=["asleep", "off_policy", "two_off_policy", "two_engines"],
)
def test_separate_process_engine_samples_with_the_pushed_weights(tmp_path, overrides):
    """vllm.separate_process=true on the GPU: the weights reach vLLM's engine process through CUDA IPC, in
    sleep mode and one or two steps off-policy. The first rollout samples with the weights just pushed, on-
    and off-policy; on-policy, so do all the others (the run itself stops above the threshold). Off-policy
    the later rollouts run up to k updates behind (at this lr a gap of ~0.3 for one), which
    test_off_policy_rollouts_sample_with_the_weights_pushed_before_they_start checks exactly."""
    history = train(tmp_path, "vllm.separate_process=true", "optim.warmup_steps=0", *overrides)
    assert [m["step"] for m in history] == [1, 2, 3]
    assert history[0]["rollout/staleness"] == 0
    k = next((int(o.split("=")[1]) for o in overrides if o.startswith("off_policy_steps=")), 0)
    assert all(m["rollout/staleness"] <= k for m in history), history
    for metrics in (m for m in history if m["rollout/staleness"] == 0):
        assert metrics["sync/logp_gap_mean"] < 0.1, metrics  # 0.1: the sync check's threshold
    assert history[-1]["train/grad_norm"] > 0
    final_evaluation(tmp_path)


def run_with_engine(tmp_path, overrides: list[str], body: str) -> subprocess.CompletedProcess:
    """`body` in a process of its own, after a prologue that builds the tiny model in tmp_path and names cfg
    (vllm=colocate at 0.2 of the GPU, then `overrides`), device, model (the trainer, fp32) and engine."""
    prologue = f"""
import pathlib, sys, torch
from tests.conftest import compose_config
from online_rl.data import synthetic_arithmetic
from online_rl.engines.vllm_colocate import VLLMColocateEngine
from online_rl.models import build_random_model, load_policy
cfg = compose_config(["vllm=colocate", "vllm.gpu_memory_utilization=0.2", *{overrides!r}])
device = torch.device("cuda")
path = build_random_model(cfg.model.random_init, synthetic_arithmetic(100)["prompt"], pathlib.Path({str(tmp_path)!r}))
model = load_policy(str(path), cfg.model, torch.float32, device)
engine = VLLMColocateEngine(str(path), cfg.vllm, device, seed=0, max_model_len=256)
"""
    return subprocess.run(
        [sys.executable, "-c", prologue + body], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_level_two_refuses_to_generate_before_a_sync(tmp_path):
    """At level 2 the woken weights are garbage until the trainer's are pushed: generate must refuse."""
    body = """
try:
    engine.generate([[1, 2, 3]], 2, cfg.sampling)
except RuntimeError as error:
    print("REFUSED:", error)
"""
    result = run_with_engine(tmp_path, ["vllm.sleep_level=2", "vllm.enforce_eager=true"], body)
    assert "REFUSED: the vLLM engine has no current weights" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("separate_process", [False, True], ids=["in_process", "separate_process"])
def test_off_policy_rollouts_sample_with_the_weights_pushed_before_they_start(tmp_path, separate_process):
    """Off-policy on the GPU: the trainer's update (on its stream, under the weights lock), then the
    generating thread pushes the new weights and samples on its own stream. Each rollout must sample with the
    pushed weights: its log-probs equal the trainer's under them, and differ from those under the weights the
    engine held before the push (a large perturbation each round, so that sampling with some of the old
    weights, or a push that read them before the update's kernels ran, would show). With
    vllm.separate_process the push goes through the block both processes map, to vLLM's engine process."""
    body = """
from online_rl.logprobs import completion_logprobs, pack
from online_rl.rollout_ahead import PendingRollout, RolloutsAhead
ahead = RolloutsAhead(engine, model, device, 1, 4, cfg.sampling)
engine.sync_weights(model)
ahead.engine_holds(0)
prompts = [[5, 6, 7, 8], [9, 10, 11]]
torch.manual_seed(0)
for r in range(3):
    held = {name: p.detach().clone() for name, p in model.named_parameters()}  # what the engine holds
    with ahead.updating_weights(r + 1), torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pushed = {name: p.detach().clone() for name, p in model.named_parameters()}
    ahead.add(PendingRollout([], prompts, {}, first_update=r + 2))  # may start at update r + 1: now
    _, sampled = ahead.take()
    assert sampled.weights_version == r + 1 and sampled.push_s > 0
    rollout = sampled.rollout
    batch = pack([p for p in prompts for _ in range(4)], rollout.completion_ids, 0, rollout.sampler_logprobs)
    batch = batch.to(device)
    mask = batch.completion_mask.float()
    gaps = {}
    for label, weights in (("held", held), ("pushed", pushed)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
            logp, _ = completion_logprobs(model, batch, cfg.sampling.temperature)
        gaps[label] = float(((logp - batch.sampler_logp).abs() * mask).sum() / mask.sum())
    print(f"ROUND {r} pushed {gaps['pushed']:.5f} held {gaps['held']:.5f}")
ahead.close()
"""
    overrides = ["vllm.sleep_level=0", "sampling.max_completion_length=64"]
    result = run_with_engine(tmp_path, overrides + [f"vllm.separate_process={separate_process}"], body)
    rounds = [line.split() for line in result.stdout.splitlines() if line.startswith("ROUND")]
    assert len(rounds) == 3, (result.stdout + result.stderr)[-3000:]
    for _, _, _, pushed, _, held in rounds:
        assert float(pushed) < 0.1 < float(held), rounds  # 0.1: the sync check's threshold


def test_sleep_keeps_the_trainers_cached_memory(tmp_path):
    """vLLM's own sleep empties torch's cache and runs a full garbage collection; beside a trainer it must do
    neither: the blocks the trainer freed stay cached for its next pass, while vLLM's memory is still freed."""
    body = """
import gc
collect = gc.collect
activations = torch.empty(2**31, dtype=torch.uint8, device=device)
del activations  # as after a training pass: freed, still cached by torch
cached = torch.cuda.memory_reserved(device)
engine.sync_weights(model)
rollout = engine.generate([[5, 6, 7, 8]], 4, cfg.sampling)  # wakes, generates, sleeps
print("CACHED", cached, torch.cuda.memory_reserved(device))
print("FREED", rollout.stats["memory/device_used_awake_gib"] - engine.device_used_bytes() / 2**30)
print("RESTORED", gc.collect is collect and torch.cuda.empty_cache.__module__ == "torch.cuda.memory")
"""
    result = run_with_engine(tmp_path, ["vllm.sleep_level=2", "sampling.max_completion_length=32"], body)
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line[:1].isupper()}
    assert {"CACHED", "FREED", "RESTORED"} <= lines.keys(), (result.stdout + result.stderr)[-3000:]
    before, after = map(int, lines["CACHED"])
    assert after >= before, lines  # the trainer's 2 GiB were not handed back to the driver
    assert float(lines["FREED"][0]) > 5, lines  # vLLM's weights and KV cache (0.2 of the GPU) were released
    assert lines["RESTORED"] == ["True"], lines
