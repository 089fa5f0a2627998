"""End-to-end runs of the loop on the tiny model: smoke, learning, every algorithm option, checkpoints."""

import errno
import math
import re
import shutil
import sqlite3

import pytest
import torch
from safetensors.torch import load_file

from online_rl.checkpoint import save_checkpoint
from online_rl.loop import run

from .conftest import run_train

SMALL = ["data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]


def test_two_step_smoke_run_writes_config_and_checkpoint(make_config, tmp_path):
    summary = run(make_config("max_steps=2", "logger.lab_metrics=true", *SMALL))
    assert len(summary.history) == 2
    checkpoint = tmp_path / "checkpoints" / "step_000002"
    assert summary.final_checkpoint == checkpoint
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"):
        assert (checkpoint / name).exists(), name
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["sampler"]["position"] == 8 and state["optimizer"]["state"]
    assert (tmp_path / "config_resolved.yaml").read_text().count("${") == 0  # resolved, no interpolations
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    metrics = summary.history[-1]
    for key in (
        "reward/total_mean",
        "reward/digits_mean",
        "reward/overlong_mean",
        "adv/std",
        "train/loss",
        "train/kl",
        "train/entropy",
        "train/clip_region_frac",
        "train/grad_norm",
        "train/lr",
        "rollout/len_mean",
        "rollout/len_max",
        "rollout/truncated_frac",
        "time/generate_s",
        "time/reward_s",
        "time/train_s",
        "perf/completion_tokens_per_s",
    ):
        assert key in metrics, key
    # logger.lab_metrics: the speed lab's diagnostics (off by default)
    assert 0 <= metrics["time/gc_s"] < metrics["time/step_s"]
    assert 0 <= metrics["time/generate_cpu_s"]
    assert 0 <= metrics["time/gc_full_s"] <= metrics["time/gc_s"] and metrics["gc/full_collections"] >= 0
    assert metrics["gc/full_collected"] >= 0


def test_collector_clock_counts_the_seconds_spent_collecting():
    """time/gc_s: the seconds of Python's garbage collections between two laps, and none outside the block;
    time/gc_full_s and gc/full_collections: those of full collections alone."""
    import gc

    from online_rl.gc_clock import CollectorClock

    with CollectorClock() as clock:
        for _ in range(100_000):  # reference cycles: only a collection frees them
            cycle = []
            cycle.append(cycle)
        gc.collect()
        full = clock.lap()
        assert full.seconds >= full.full_seconds > 0 and full.full_collections >= 1
        gc.collect(0)  # the youngest generation only
        young = clock.lap()
        assert young.seconds > 0 and young.full_seconds == 0.0 and young.full_collections == 0
        assert clock.lap().seconds == 0.0  # nothing collected since the last lap
    gc.collect()
    assert clock.lap().seconds == 0.0


def test_collector_clock_counts_what_full_collections_free():
    """gc/full_collected: the objects full collections freed. Garbage in reference cycles counts; young
    collections do not."""
    import gc

    from online_rl.gc_clock import CollectorClock

    gc.collect()
    gc.disable()  # no automatic collection frees the cycles first
    try:
        with CollectorClock() as clock:
            for _ in range(1000):
                cycle = []
                cycle.append(cycle)
            del cycle
            gc.collect()
            assert clock.lap().full_collected >= 1000
            gc.collect()
            assert clock.lap().full_collected < 1000  # nothing made since
            leftover = []
            leftover.append(leftover)
            del leftover
            gc.collect(0)
            assert clock.lap().full_collected == 0
    finally:
        gc.enable()


def test_quickstart_reward_rises(make_config):
    """The default config (`python train.py`): the tiny random model learns the quickstart's rewards."""
    summary = run(make_config())
    assert not any(key.startswith(("gc/", "time/gc")) for key in summary.history[-1])  # lab metrics are off
    rewards = summary.reward_means
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.4, (first, last)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo.loss_type=grpo", "algo.scale_rewards=batch"],
        ["algo.loss_type=bnpo", "algo.scale_rewards=none", "algo.mask_truncated_completions=true"],
        ["algo.loss_type=dr_grpo", "optim.lr_scheduler=cosine", "optim.warmup_steps=1"],
        ["algo.num_iterations=2", "algo.epsilon_high=0.28"],
        ["algo.beta=0.1"],
        ["model.lora.enabled=true", "algo.beta=0.1", "model.lora.target_modules=[q_proj,v_proj]"],
        ["model.gradient_checkpointing=true", "model.lora.enabled=true"],
    ],
    ids=["grpo", "bnpo-masked", "dr_grpo-cosine", "mu2-cliphigh", "kl-full", "kl-lora", "ckpt-lora"],
)
def test_algorithm_options_train(make_config, tmp_path, overrides):
    summary = run(make_config("max_steps=4", "optim.lr=1e-2", *SMALL, *overrides))
    history = summary.history
    assert len(history) == 4
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in history)
    # the no-grad log-prob passes: only for the reference (beta > 0) or the old log-probs (num_iterations > 1)
    extra_passes = "algo.beta=0.1" in overrides or "algo.num_iterations=2" in overrides
    for metrics in history:
        assert (metrics["time/logprobs_s"] > 0) == extra_passes, metrics
        assert metrics["time/logprobs_s"] < metrics["time/train_s"]  # (a part of it)
    if "algo.beta=0.1" in overrides:
        assert history[0]["train/kl"] == pytest.approx(0, abs=1e-6)  # policy == reference before any update
        assert history[-1]["train/kl"] > 0  # the reference stayed where it was while the policy moved
    if "algo.num_iterations=2" in overrides:
        assert history[0]["train/clip_region_frac"] == 0  # the first pass has ratio 1
    if "model.lora.enabled=true" in overrides:
        adapter = tmp_path / "checkpoints" / "step_000004" / "adapter_model.safetensors"
        assert adapter.exists() and all("lora_" in key for key in load_file(adapter))


def test_same_seed_same_run(make_config):
    first = run(make_config("max_steps=2", *SMALL)).history
    second = run(make_config("max_steps=2", *SMALL)).history
    assert [m["reward/total_mean"] for m in first] == [m["reward/total_mean"] for m in second]
    assert [m["train/loss"] for m in first] == [m["train/loss"] for m in second]


def test_compiled_training_passes_train_as_the_eager_ones(make_config):
    """model.compile: the training passes run through torch.compile (inductor's C++ kernels on a CPU) and
    give the eager run's losses and gradient norms, step by step; generation stays eager."""
    from torch._dynamo.utils import counters

    eager = run(make_config("max_steps=2", *SMALL)).history
    counters.clear()
    compiled = run(make_config("max_steps=2", *SMALL, "model.compile=true")).history
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the training forward
    assert [m["reward/total_mean"] for m in compiled] == [m["reward/total_mean"] for m in eager]
    for ours, reference in zip(compiled, eager):
        assert ours["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-4, abs=1e-6)
        assert ours["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-4)


def test_a_micro_batch_out_of_gpu_memory_is_split_and_the_run_trains_as_with_the_smaller_size(
    make_config, monkeypatch, caplog
):
    """torch's out-of-memory error in the second micro-batch of 8 rows (a GPU with room for 4 and a first
    micro-batch that just fit, raised where the real error would be: the policy's forward): the step runs
    again with micro-batches of 4, without the first one's gradients, and so does every later step; the run
    equals one started at micro_batch_size=4."""
    from online_rl import update

    straight = run(make_config("max_steps=3", *SMALL[:-1], "micro_batch_size=4")).history
    real_pass, passes_of_eight = update.completion_logprobs, []

    def room_for_four_rows(model, batch, *args, **kwargs):
        if batch.input_ids.shape[0] > 4:
            passes_of_eight.append(batch.input_ids.shape[0])
            if len(passes_of_eight) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_pass(model, batch, *args, **kwargs)

    monkeypatch.setattr(update, "completion_logprobs", room_for_four_rows)
    with caplog.at_level("WARNING", logger="online_rl.update"):
        backed_off = run(make_config("max_steps=3", *SMALL)).history  # micro_batch_size=8
    assert passes_of_eight == [
        8,
        8,
    ]  # the first micro-batch trained (its gradients accumulated), the second failed
    assert [m["train/micro_batch_rows"] for m in backed_off] == [4, 4, 4]
    warnings = [r.getMessage() for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert len(warnings) == 1 and "micro-batches of 8 rows" in warnings[0]
    assert "set micro_batch_size=4" in warnings[0]
    for ours, reference in zip(backed_off, straight):
        assert ours["reward/total_mean"] == reference["reward/total_mean"]
        assert ours["train/loss"] == pytest.approx(reference["train/loss"], rel=1e-5, abs=1e-7)
        assert ours["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-5)


@pytest.mark.parametrize(
    "rows, rollout_rows, unit, expected",
    [(32, 128, 1, 16), (16, 48, 1, 8), (12, 36, 1, 6), (6, 36, 1, 3), (20, 40, 1, 10), (10, 40, 1, 5),
     (5, 40, 1, 2), (8, 16, 2, 4), (4, 12, 2, 2), (2, 2, 1, 1)],
)  # fmt: skip
def test_after_running_out_of_memory_half_the_rows_or_fewer_that_divide_the_rollout(
    rows, rollout_rows, unit, expected
):
    from online_rl.update import fewer_rows_after_oom

    assert fewer_rows_after_oom(rows, rollout_rows, unit, 1, 1280, 1) == expected


def test_out_of_memory_with_nothing_left_to_halve_or_several_ranks_names_the_fixes():
    from online_rl.update import fewer_rows_after_oom

    with pytest.raises(MemoryError, match="1 row.*gradient_checkpointing=true.*max_completion_length"):
        fewer_rows_after_oom(1, 128, 1, 1, 1280, 3)
    with pytest.raises(MemoryError, match="2 row.*the fewest"):
        fewer_rows_after_oom(2, 128, 2, 1, 1280, 3)  # one preference pair
    with pytest.raises(MemoryError, match="2 ranks every rank must run as many.*set micro_batch_size=16"):
        fewer_rows_after_oom(32, 64, 1, 2, 1280, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.num_generations=1"], "num_generations=1"),
        (["micro_batch_size=5"], "micro_batch_size=5 must divide"),
        (["model.lora.enabled=true", "model.lora.target_modules=[c_attn]"], "does not have"),
        (["hardware=1gpu"], "torch sees no CUDA GPU"),
        (["model.lora.base_dtype=bfloat16"], "set model.lora.enabled=true"),
        (["model.lora.enabled=true", "model.lora.base_dtype=bf16"], "use float32, bfloat16 or float16"),
    ],
)
def test_bad_settings_fail_before_training(make_config, overrides, message):
    if "hardware=1gpu" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=message):
        run(make_config("max_steps=1", *SMALL, *overrides))


@pytest.mark.parametrize("raised", ["ENOSPC", "torch.save's RuntimeError"])
def test_checkpoint_is_atomic_when_the_disk_fills(tiny_model_dir, tmp_path, monkeypatch, raised):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path / "checkpoints"
    good = save_checkpoint(root, 1, model, tokenizer, {"note": "first"})
    before = (good / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        if raised == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        # what torch's zip writer raised on the GPU machine when its disk filled
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 2570367744 vs 2570367636"
        )

    monkeypatch.setattr(torch, "save", disk_full)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))  # the disk is full
    with pytest.raises(OSError, match=r"No space left .*the checkpoints before it are intact.*resume=auto"):
        save_checkpoint(root, 2, model, tokenizer, {"note": "second"})
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # no half-written step_000002
    assert (good / "model.safetensors").read_bytes() == before


def test_command_line_quickstart_logs_to_trackio(tmp_path):
    """`python train.py` as a user runs it (3 steps): progress bar, log lines, trackio data, dashboard hint."""
    output = run_train(tmp_path, "max_steps=3")
    assert "step 3/3 | reward" in output and "grpo: 100%" in output
    assert "step 2/3 | reward" not in output  # a line every logger.log_every=10 steps, and the first and last
    assert "hardware=auto: torch sees no CUDA GPU, so this run trains on the CPU" in output
    dashboard = f"Dashboard: TRACKIO_DIR={tmp_path}/trackio trackio show"
    assert output.count(dashboard) == 2 and output.index(dashboard) < output.index(
        "step 1/3"
    )  # start and end
    assert re.search(r"\| 2/3 \[\d\d:\d\d<\d\d:\d\d, .*reward=.*tok_s=\d+", output)  # step, ETA, tokens/s
    assert re.search(r"eval at step 3 on 64 prompts \| pass@1 greedy \d\.\d{3} \| pass@1 ", output)
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "train.log").exists() and (tmp_path / "checkpoints" / "step_000003").exists()
    with sqlite3.connect(tmp_path / "trackio" / "online-rl.db") as db:
        rows = db.execute("select step, metrics from metrics order by step").fetchall()
    logged = [
        step
        for step, text in rows
        if b"reward/total_mean" in (text if isinstance(text, bytes) else text.encode())
    ]
    assert logged == [1, 2, 3]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_ramps_the_learning_rate_for_every_schedule(make_config, schedule):
    """transformers' plain "constant" schedule ignores warmup_steps; every schedule here honours them."""
    history = run(
        make_config(
            "max_steps=4", *SMALL, "optim.lr=1e-2", "optim.warmup_steps=2", f"optim.lr_scheduler={schedule}"
        )
    ).history
    lrs = [m["train/lr"] for m in history]  # the rate the next step will use
    assert lrs[0] == pytest.approx(0.5e-2)  # half-way through the 2 warmup steps
    assert lrs[1] == pytest.approx(1e-2)
    if schedule == "constant":
        assert lrs[2:] == pytest.approx([1e-2, 1e-2])
    else:
        assert lrs[3] < lrs[2] < 1e-2


def test_lora_with_a_bf16_base_trains_its_adapters(make_config):
    """model.lora.base_dtype=bfloat16 composes with the loop: every step has a finite loss and a gradient,
    and the final checkpoint holds the adapters (in fp32, the trained dtype)."""
    from safetensors.torch import load_file

    summary = run(
        make_config("max_steps=3", *SMALL, "model.lora.enabled=true", "model.lora.base_dtype=bfloat16")
    )
    assert all(m["train/grad_norm"] > 0 and math.isfinite(m["train/loss"]) for m in summary.history)
    adapters = load_file(summary.final_checkpoint / "adapter_model.safetensors")
    assert adapters and all("lora_" in name and t.dtype == torch.float32 for name, t in adapters.items())
