"""The arms of the bench, each run inside a process of its own (`python -m bench --run-arm ARM`), after the same
setup (prepare: one model directory and one prompt file that both frameworks load):

- ours_full, ours_lora, ours_offpolicy: our loop through its config, as a user runs it (run_ours);
- ours_server, ours_server_k1, ours_server_k2: the same against a stock vLLM server on the trainer's GPU, which
  the arm starts and stops (run_ours_server, bench.server);
- trl_full, trl_lora: TRL's GRPOTrainer with vLLM colocate, the anchor's arguments (run_trl);
- floor, floor_lora: our generation alone plus our training alone, each timed by itself (run_floor).
"""

from __future__ import annotations

import functools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.halves import (
    profile_step,
    rollout_micro_batches,
    step_prompts,
    synchronize,
    timed_rollout,
    train_step,
)
from bench.server import check_server_arm, stock_server
from bench.settings import ARMS, REPO, SERVER_ARMS, Settings
from bench.trl_sweep import anchor_candidate, measured_part, run_trl_tuned, train_trl


def compose_config(overrides: list[str]):
    """The run's config as train.py composes it."""
    from hydra import compose, initialize_config_dir

    from online_rl.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def prepare(settings: Settings, workdir: Path) -> tuple[Path, Path]:
    """Build the random model (with a tokenizer trained in code) and prompts of exactly prompt_tokens tokens;
    where an earlier command left them for the same settings (workdir/prepared.json), use those (a 7B model
    takes minutes to build and write)."""
    import random

    import torch

    from online_rl.models import build_random_model, load_tokenizer

    needed = settings.prompts_per_step * settings.steps
    recipe = {
        key: getattr(settings, key)
        for key in ("model", "model_dtype", "prompt_tokens", "seed", "prompts_per_step")
    }
    recipe["prompts"] = needed
    marker, prompts = workdir / "prepared.json", workdir / "prompts.jsonl"
    if marker.exists() and json.loads(marker.read_text()) == recipe and prompts.exists():
        print(f"bench: the model and prompts of an earlier command in {workdir}", flush=True)
        return workdir / "model", prompts
    marker.unlink(missing_ok=True)
    model_cfg = compose_config([f"model={settings.model}"]).model
    words = [f"{random.Random(i).randint(0, 10**6)} plus {i} is" for i in range(2000)]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, settings.model_dtype))  # the weights as built, and as written
    try:
        # on the GPU where the arms run: a CPU takes minutes to draw 7.6B random numbers (bf16 normal_: one thread)
        with torch.device(settings.device):
            model_dir = build_random_model(model_cfg.random_init, words, workdir / "model")
    finally:
        torch.set_default_dtype(default_dtype)
    # Plain-text prompts for both frameworks: no chat template that they could apply differently.
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=False)
    assert not tokenizer.chat_template, "the bench's prompts are plain text"

    rows, rng = [], random.Random(settings.seed)
    for _ in range(100 * needed):
        if len(rows) == needed:
            break
        text = " ".join(rng.choice(words) for _ in range(settings.prompt_tokens))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: settings.prompt_tokens - 1]
        question = tokenizer.decode(ids).strip()
        # our loop and TRL both tokenize question + "\n"; keep the rows where that is exactly prompt_tokens
        if len(tokenizer(question + "\n", add_special_tokens=False)["input_ids"]) == settings.prompt_tokens:
            rows.append({"prompt": question})
    if len(rows) < needed:
        raise RuntimeError(
            f"found {len(rows)} of {needed} prompts of exactly {settings.prompt_tokens} tokens: change prompt_tokens"
        )
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    marker.write_text(json.dumps(recipe))
    return model_dir, prompts


def the_run(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> list[str]:
    """What any user's command names to run the bench's step: the model (the real model's config, loading the
    built one), LoRA, the data, the step's sizes and length, TRL's learning rate, no evaluation."""
    lora = ARMS[arm][1]
    engine = "server" if arm in SERVER_ARMS else "colocate" if settings.use_vllm else "off"
    overrides = [
        "algo=grpo",
        f"vllm={engine}",
        f"model={settings.user_model}",
        f"model.name_or_path={model_dir}",
    ]
    if lora:
        overrides += [
            "model.lora.enabled=true",
            f"model.lora.r={settings.lora_r}",
            f"model.lora.alpha={settings.lora_alpha}",
            f"model.lora.target_modules=[{','.join(settings.lora_targets)}]",
        ]
    return overrides + [
        "logger=none",
        "rewards=[digits]",
        "data.path=json",
        f"data.data_files={prompts}",
        "data.synthetic_rows=null",
        "data.solution_column=null",
        "data.system_prompt=null",
        f"data.max_prompt_length={settings.prompt_tokens}",
        f"algo.num_generations={settings.num_generations}",
        f"prompts_per_step={settings.prompts_per_step}",
        f"sampling.max_completion_length={settings.completion_tokens}",
        f"max_steps={settings.steps}",
        f"optim.lr={settings.lr}",
        "optim.warmup_steps=0",
        "optim.lr_scheduler=constant",
        "eval_every=0",
        f"seed={settings.seed}",
        f"output_dir={workdir / arm}",
    ]


def our_overrides(
    settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path, server_url: str | None = None
) -> list[str]:
    """Our config for the bench's run: GRPO with TRL's defaults on the shared model and prompts; ours_default*
    as a user types it (the_run alone: hardware=auto, every speed setting our default), the other arms with the
    bench's speed settings; the server arms with the training ones, against the server at server_url (the
    engine's settings are the server's: bench.server.serve_env)."""
    overrides = the_run(settings, arm, model_dir, prompts, workdir)
    if arm in SERVER_ARMS:
        if server_url is None:
            raise ValueError(f"{arm} runs against a server: pass its URL")
        return overrides + [
            "hardware=1gpu",
            f"micro_batch_size={settings.our_micro_batch_size}",
            f"model.compile={settings.compile_model}",
            f"off_policy_steps={SERVER_ARMS[arm]}",
            f"vllm.base_urls=[{server_url}]",
            # the server holds bf16 weights: cast on the trainer's side, half the bytes through the buffers
            "vllm.transfer_dtype=bfloat16",
        ]
    if arm.startswith("ours_default"):
        # (the smoke's step of 4 completions: our default micro-batch of 32 does not divide it)
        if settings.prompts_per_step * settings.num_generations % compose_config(overrides).micro_batch_size:
            overrides.append(f"micro_batch_size={settings.our_micro_batch_size}")
        return overrides
    _, lora, off_policy = ARMS[arm]
    overrides += [
        f"hardware={'1gpu' if settings.device == 'cuda' else 'cpu'}",
        f"micro_batch_size={settings.our_micro_batch_size}",
        f"model.compile={settings.compile_model}",
        f"off_policy_steps={int(off_policy)}",
    ]
    separate_process = settings.separate_process or off_policy or settings.engine_processes > 1
    # the trainer's MPS cap only pays where training runs beside generation; on-policy, it would only slow the
    # training pass
    if settings.use_vllm and off_policy and settings.trainer_sm_percent:
        overrides.append(f"vllm.trainer_sm_percent={settings.trainer_sm_percent}")
    if settings.use_vllm:
        overrides += [
            f"vllm.gpu_memory_utilization={settings.gpu_memory_utilization}",
            # off-policy: the engine generates beside training, awake (loop.check_off_policy)
            f"vllm.sleep_level={0 if off_policy else settings.sleep_level}",
            f"vllm.kv_cache_memory_gib={settings.kv_cache_gib or 'null'}",
            "vllm.async_scheduling=true",
            # off-policy: generation runs beside training, so the engine gets a process (and interpreter) of its
            # own; in the trainer's it waits for training's Python (4.3-4.6 s against 2.1 s alone, e80fade)
            f"vllm.separate_process={separate_process}",
            f"vllm.engine_processes={settings.engine_processes}",
            # the step's sequences decode at once; vLLM captures CUDA graphs only up to this batch size
            f"vllm.max_num_seqs={settings.prompts_per_step * settings.num_generations}",
        ]
    if lora and settings.lora_base_dtype:
        overrides.append(f"model.lora.base_dtype={settings.lora_base_dtype}")
    return overrides


def run_ours(
    settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path, server_url: str | None = None
) -> dict:
    """Our loop as a user runs it: `python train.py <overrides>` (with the lab's per-step diagnostics on), its
    steps read back from the run's metrics.jsonl."""
    run_dir = workdir / arm
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier command's run there: its metrics.jsonl would grow
    overrides = our_overrides(settings, arm, model_dir, prompts, workdir, server_url)
    overrides.append("logger.lab_metrics=true")
    overrides.append(f"hydra.run.dir={run_dir}")
    log_path = workdir / f"{arm}-train.log"
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *overrides],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{arm}: train.py exited with {done.returncode}; the end of {log_path}:\n{tail}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    history = [metrics for metrics in map(json.loads, lines) if "reward/total_mean" in metrics]
    steps = history[settings.warmup_steps :]
    return {
        "step_s": [m["time/step_s"] for m in steps],
        "completion_tokens": [
            m["rollout/len_mean"] * settings.prompts_per_step * settings.num_generations for m in steps
        ],
        "phases": phase_breakdown(steps),
        # per step, to tell a slow step's phase (generation has varied by 50% from one arm to the next)
        "generate_s": [m["time/generate_s"] for m in steps],
        "train_s": [m["time/train_s"] for m in steps],
        "gc_s": [m["time/gc_s"] for m in steps],  # Python's garbage collector, inside the phases
        # of it, full collections (walking every object not frozen): their seconds, count and objects freed
        "gc_full_s": [m.get("time/gc_full_s") for m in steps],
        "gc_full_collections": [m.get("gc/full_collections") for m in steps],
        "gc_full_collected": [m.get("gc/full_collected") for m in steps],
        # the main thread's CPU seconds in each rollout, and the CPU seconds the host took meanwhile
        "generate_cpu_s": [m.get("time/generate_cpu_s") for m in steps],
        "generate_steal_s": [m.get("time/generate_steal_s") for m in steps],
        "reward_mean": [m["reward/total_mean"] for m in history],
        "logp_gap_mean": [m.get("sync/logp_gap_mean") for m in steps],
        "staleness": [m.get("rollout/staleness") for m in steps],  # updates behind the trainer (off-policy)
        # torch's peaks in the trainer's process, read after each rollout (so up to the last step's training)
        **{
            f"peak_{kind}_gib": max(
                (m.get(f"memory/torch_peak_{kind}_gib") or 0.0 for m in history), default=None
            )
            or None
            for kind in ("allocated", "reserved")
        },
        # the whole device after each rollout: vLLM awake (before it sleeps), then asleep (the trainer's share)
        **{
            f"device_used_{state}_gib": max(
                (m.get(f"memory/device_used_{state}_gib") or 0.0 for m in steps), default=0.0
            )
            or None
            for state in ("awake", "asleep")
        },
        "arm_command": shlex.join(["python", "train.py", *overrides]),
    }


def run_ours_server(
    settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path, python: str = sys.executable
) -> dict:
    """run_ours against a stock vLLM server that this arm starts on its GPU first (bench.server) and stops
    after, whatever happened; `python` runs the server (serve.sh's PYTHON)."""
    check_server_arm(settings, arm)
    with stock_server(settings, model_dir, workdir / f"{arm}-serve.log", python) as url:
        return run_ours(settings, arm, model_dir, prompts, workdir, server_url=url)


def phase_breakdown(steps: list[dict]) -> dict[str, float]:
    """Median seconds per phase. The engine's generate phase includes waking the KV cache and going back to
    sleep; those are split out so that generate is vLLM's generation alone."""

    def median(key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in steps)

    sleep_wake = median("time/wake_kv_cache_s") + median("time/sleep_s") + median("time/wake_weights_s")
    return {
        "generate": median("time/generate_s") - median("time/wake_kv_cache_s") - median("time/sleep_s"),
        "reward": median("time/reward_s"),
        "logprobs": median("time/logprobs_s"),  # (its own passes: none with TRL's defaults, mu=1 and beta=0)
        "train": median("time/train_s") - median("time/logprobs_s"),
        "sync": median("time/sync_s") - median("time/wake_weights_s"),
        "sleep_wake": sleep_wake,
        # its parts, for the JSON: which of vLLM's calls a slow sleep/wake is
        "sleep": median("time/sleep_s"),
        "wake_weights": median("time/wake_weights_s"),
        "wake_kv_cache": median("time/wake_kv_cache_s"),
        "gc": median("time/gc_s"),  # (inside the phases above)
    }


def run_floor(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """The floor of an on-policy step, each half alone in this process with our own code and settings (the run
    built by the library's setup): the engine generating the step's completions (its wake-up and sleep
    excluded), and one optimizer step over them (forward, backward, clipping, AdamW). Neither waits for the
    other or for anything else."""
    from contextlib import ExitStack

    from online_rl.setup import build_run

    cfg = compose_config(our_overrides(settings, arm, model_dir, prompts, workdir))
    rollouts, train_s = [], []
    with ExitStack() as closing:
        run = build_run(cfg, closing)
        rows, prompt_ids = step_prompts(run)
        for step in range(settings.steps + settings.profile):  # profile: one more step, not timed
            rollout, timings = timed_rollout(
                run.rollouts.engine, run.model, prompt_ids, settings.num_generations, cfg.sampling
            )
            rollouts.append(timings)
            micro_batches = rollout_micro_batches(
                run, rows, prompt_ids, rollout, settings.our_micro_batch_size
            )
            synchronize(run.device)
            step_once = functools.partial(
                train_step, run, micro_batches, cfg.sampling.temperature, cfg.optim.max_grad_norm
            )
            if step == settings.steps:
                profile_step(step_once, run.device, workdir / f"{arm}-train-profile.txt")
                break
            started = time.perf_counter()
            step_once()
            train_s.append(time.perf_counter() - started)
    measured = rollouts[settings.warmup_steps : settings.steps]
    return {
        "train_s": train_s[settings.warmup_steps :],
        **{key: [timings[key] for timings in measured] for key in measured[0]},
    }


def run_trl(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """TRL's GRPOTrainer with vLLM colocate, the anchor's arguments, everything else its defaults (trl_full,
    trl_lora); or TRL at its best (trl_tuned, trl_tuned_lora): its anchor and its candidates in this process."""
    lora = ARMS[arm][1]
    if arm.startswith("trl_tuned"):
        return run_trl_tuned(settings, lora, model_dir, prompts, workdir / arm)
    run = train_trl(
        settings, lora, model_dir, prompts, workdir / arm, anchor_candidate(settings), settings.steps
    )
    return measured_part(run, settings.warmup_steps)


def run_arm(arm: str, settings: Settings, workdir: Path) -> None:
    """One arm in this process, on the model and prompts that prepare left in workdir: its raw measurements
    in <workdir>/<arm>.json."""
    framework = ARMS[arm][0]
    model_dir, prompts = workdir / "model", workdir / "prompts.jsonl"
    runner = (
        run_ours_server
        if arm in SERVER_ARMS
        else {"ours": run_ours, "floor": run_floor, "trl": run_trl}[framework]
    )
    result = runner(settings, arm, model_dir, prompts, workdir)
    (workdir / f"{arm}.json").write_text(json.dumps(result, indent=1))
