"""make bench: this repo's GRPO loop against TRL's GRPOTrainer on the same run, side by side in one command.

    python scripts/bench.py                       # the anchor, on one CUDA GPU (the H200 numbers of issue 6)
    python scripts/bench.py --arms ours_full,trl_full --set measured_steps=5
    python scripts/bench.py --smoke               # the harness on a CPU: tiny model, no vLLM; checks, measures nothing

The anchor: a Qwen2-0.5B-shaped random model, 16 prompts x 8 samples = 128 completions of 512 tokens per
step, prompts of 128 tokens, fp32 master weights with bf16 autocast, lr 1e-5, TRL's GRPO defaults (beta 0,
one iteration, DAPO token-level loss, group-scaled rewards), vLLM colocate at gpu_memory_utilization 0.3.
Random weights never emit EOS, so every completion runs to 512 tokens: the same work for both.

Every arm runs in its own process (vLLM allows one sleep-mode engine per process, and a fresh CUDA context
makes peak memory comparable), after the same setup: one model directory and one prompt file that both
frameworks load. Each arm writes <workdir>/<arm>.json; the driver then writes
bench/results/<date>-<commit>.{json,md,png}.

What is measured, per arm, over the steps after the warm-up:
- s/step: wall time between the ends of consecutive optimizer steps (median, min, max);
- completion tokens/s: completion tokens of the step / its seconds;
- peak GPU memory: the device's used memory over the arm's whole process, polled every 50 ms by nvidia-smi
  from outside it, so vLLM's pool counts for both frameworks;
- ours_offpolicy: our loop with off_policy_steps=1 (the next rollout generates while this one trains),
  reported as its own row and compared with TRL's on-policy run, never as our on-policy result;
- ours only: the phases (generate, reward, train, sync, sleep/wake) from the loop's own metrics, the train
  phase's MFU, and the floor (`floor`, and `floor_lora` for LoRA): vLLM generation alone plus training
  alone, each timed by itself with our code and settings. The floor is what an on-policy step cannot go
  below without overlapping generation and training; our distance to it is everything else (sync,
  sleep/wake, rewards, packing, Python), and TRL's step over it is the most a step that generates, then
  trains, can gain.
Each command also records its machine: the CPU (generation is bound by it) and its load at the start, and
the GPU with its driver. Machines of one kind have differed by 20-40% from one lease to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H200_BF16_DENSE_FLOPS = 989e12  # the H200's dense bf16 tensor-core peak (NVIDIA's data sheet)


@dataclass(frozen=True)
class Settings:
    """One GRPO step, the same for every arm."""

    prompts_per_step: int = 16
    num_generations: int = 8
    prompt_tokens: int = 128
    completion_tokens: int = 512
    # TRL's per_device_train_batch_size (the anchor's); gradient accumulation covers the rest
    micro_batch_size: int = 8
    # ours: completions per forward/backward. The step's gradient is the same sum whatever the split (DAPO's
    # token mean over the rollout); 16 runs fewer, larger kernels than 8 (1.55 vs 1.86 s on an H200, eager)
    our_micro_batch_size: int = 16
    lr: float = 1e-5
    # not measured: compilation, CUDA graphs, allocator growth. With 2, our first measured step was the slowest
    # of its arm in 4 of 5 on-policy arms on the H200 (e.g. 4.47 s, then 3.97 and 3.01 s); TRL's was not.
    warmup_steps: int = 3
    # a median of 5: one step's hiccup (generation varies by up to 50% from step to step) does not move it
    measured_steps: int = 5
    gpu_memory_utilization: float = 0.3  # TRL's vLLM (the anchor's), and ours when kv_cache_gib is 0
    # ours: vLLM's KV cache in GiB, sized to the step (128 x 640 tokens need 1 GiB on this shape) instead of
    # the 40 GiB that 0.3 of an H200 leaves: sleep and wake then take 45 ms instead of 0.3 s
    kv_cache_gib: float = 4.0
    sleep_level: int = (
        2  # ours, as conf/vllm/colocate.yaml: vLLM sleeps while the trainer trains (TRL keeps it awake)
    )
    # ours: model.compile, the decoder layers torch.compile'd for training (floors too): on the H200 the
    # training step took 0.79 s instead of 1.07 s, after a 30 s compile (bench/results/train-speed-*)
    compile_model: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_base_dtype: str = ""  # ours: model.lora.base_dtype, e.g. bfloat16 as peft and TRL keep it; "": fp32
    # ours, on-policy: vllm.separate_process, vLLM's engine in a process of its own (ours_offpolicy always
    # runs it so: in the trainer's, generating beside training took 2x as long as alone)
    separate_process: bool = False
    # ours: vllm.engine_processes, engines on the GPU each generating a share of the prompts (in processes of
    # their own); generation is bound by vLLM's Python per sequence, the GPU running kernels 28% of the time
    engine_processes: int = 1
    # every arm of the command with CUDA's Multi-Process Service running (MultiProcessService): the kernels of
    # the off-policy arm's two processes (trainer, vLLM engine) then run side by side instead of in turns
    mps: bool = False
    # ours_offpolicy, with mps: vllm.trainer_sm_percent, the trainer's kernels take at most this share of the
    # GPU's multiprocessors while the engine process generates beside them with all of them; 0: no cap
    trainer_sm_percent: int = 0
    # ours_offpolicy, with mps: vllm.trainer_below_normal_priority, the GPU runs the engine's waiting work first
    trainer_below_normal_priority: bool = False
    model: str = "qwen2_0.5b_random"  # a conf/model entry with random_init: the shape to build
    device: str = "cuda"
    use_vllm: bool = True
    seed: int = 0
    # floor arms: torch.profiler over one more training step (not timed) -> <out>/<stem>-<arm>-train-profile.txt
    profile: bool = False

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.measured_steps


SMOKE = Settings(
    prompts_per_step=2,
    num_generations=2,
    prompt_tokens=16,
    completion_tokens=8,
    micro_batch_size=2,
    our_micro_batch_size=2,
    warmup_steps=1,
    measured_steps=2,
    model="tiny",
    device="cpu",
    use_vllm=False,
    sleep_level=0,
    compile_model=False,  # a compile takes longer than the whole smoke run (tests/test_train.py covers it)
)

# arm -> (framework, LoRA, one step off-policy); floor: our generation alone and our training alone
ARMS = {
    "trl_full": ("trl", False, False),
    "ours_full": ("ours", False, False),
    "floor": ("floor", False, False),
    "ours_offpolicy": ("ours", False, True),  # compared with trl_full: TRL's GRPO generates on-policy
    "trl_lora": ("trl", True, False),
    "ours_lora": ("ours", True, False),
    "floor_lora": ("floor", True, False),
}
# each floor and the on-policy arms it bounds (TRL's twin: the most a step that generates, then trains, can
# gain on it)
FLOOR_OF = {"floor": ("ours_full", "trl_full"), "floor_lora": ("ours_lora", "trl_lora")}


# ---------------------------------------------------------------- setup: one model and one prompt file


def compose_config(overrides: list[str]):
    """The run's config as train.py composes it."""
    from hydra import compose, initialize_config_dir

    from online_rl.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def prepare(settings: Settings, workdir: Path) -> tuple[Path, Path]:
    """Build the random model (with a tokenizer trained in code) and prompts of exactly prompt_tokens tokens."""
    import random

    from online_rl.models import build_random_model, load_tokenizer

    model_cfg = compose_config([f"model={settings.model}"]).model
    words = [f"{random.Random(i).randint(0, 10**6)} plus {i} is" for i in range(2000)]
    model_dir = build_random_model(model_cfg.random_init, words, workdir / "model")
    # Plain-text prompts for both frameworks: no chat template that they could apply differently.
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=False)
    assert not tokenizer.chat_template, "the bench's prompts are plain text"

    rows, rng, needed = [], random.Random(settings.seed), settings.prompts_per_step * settings.steps
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
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, prompts


# ---------------------------------------------------------------- measuring inside an arm's process


class PeakDeviceMemory:
    """The GPU's used memory (vLLM's pool as well as torch's), polled every `every_ms` by nvidia-smi in a
    process of its own while an arm runs. Not a thread in the arm's process: one there, calling into CUDA 20
    times a second, shared the interpreter and the driver with the generation it measured."""

    def __init__(self, device: str, every_ms: int = 50):
        self.device, self.every_ms, self.peak_mib = device, every_ms, None
        self.poller: subprocess.Popen | None = None

    def __enter__(self) -> PeakDeviceMemory:
        if self.device == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            try:
                self.poller = subprocess.Popen(
                    [
                        "nvidia-smi",
                        f"--id={visible or 0}",
                        "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits",
                        f"--loop-ms={self.every_ms}",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            except OSError as error:  # the arm still runs; its peak memory is reported as unknown
                print(f"bench: no peak GPU memory ({error}): nvidia-smi did not start", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.poller is None:
            return
        self.poller.terminate()
        output, _ = self.poller.communicate()
        readings = [int(line) for line in output.split() if line.isdigit()]  # MiB
        self.peak_mib = max(readings) if readings else None

    @property
    def gib(self) -> float | None:
        return self.peak_mib / 1024 if self.peak_mib is not None else None


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
    """The environment of the processes a command starts (arms, variants): this checkout's code on the path,
    and the MPS daemon's pipes when it runs."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **mps.env,
    }


def our_overrides(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> list[str]:
    """Our config for the bench's run: GRPO with TRL's defaults on the shared model and prompts."""
    _, lora, off_policy = ARMS[arm]
    overrides = [
        "algo=grpo",
        "model=qwen2_0.5b",
        f"model.name_or_path={model_dir}",
        f"hardware={'1gpu' if settings.device == 'cuda' else 'cpu'}",
        f"vllm={'colocate' if settings.use_vllm else 'off'}",
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
        f"micro_batch_size={settings.our_micro_batch_size}",
        f"sampling.max_completion_length={settings.completion_tokens}",
        f"max_steps={settings.steps}",
        f"optim.lr={settings.lr}",
        "optim.warmup_steps=0",
        "optim.lr_scheduler=constant",
        "eval_every=0",
        f"seed={settings.seed}",
        f"model.compile={settings.compile_model}",
        f"off_policy_steps={int(off_policy)}",
        f"output_dir={workdir / arm}",
    ]
    separate_process = settings.separate_process or off_policy or settings.engine_processes > 1
    # the trainer's MPS cap and priority only pay where training runs beside generation; on-policy, they would
    # only slow the training pass
    if settings.use_vllm and off_policy:
        if settings.trainer_sm_percent:
            overrides.append(f"vllm.trainer_sm_percent={settings.trainer_sm_percent}")
        if settings.trainer_below_normal_priority:
            overrides.append("vllm.trainer_below_normal_priority=true")
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
    if lora:
        targets = ",".join(settings.lora_targets)
        overrides += [
            "model.lora.enabled=true",
            f"model.lora.r={settings.lora_r}",
            f"model.lora.alpha={settings.lora_alpha}",
            f"model.lora.target_modules=[{targets}]",
        ]
        if settings.lora_base_dtype:
            overrides.append(f"model.lora.base_dtype={settings.lora_base_dtype}")
    return overrides


def run_ours(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """Our loop through its config, as a user runs it."""
    from online_rl.loop import run

    cfg = compose_config(our_overrides(settings, arm, model_dir, prompts, workdir))
    summary = run(cfg)
    steps = summary.history[settings.warmup_steps :]
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
        # of it, full collections (walking every object not frozen): their seconds and count
        "gc_full_s": [m.get("time/gc_full_s") for m in steps],
        "gc_full_collections": [m.get("gc/full_collections") for m in steps],
        "gc_full_collected": [
            m.get("gc/full_collected") for m in steps
        ],  # objects freed: cycles made per step
        # the main thread's CPU seconds in each rollout, and the CPU seconds the host took meanwhile
        "generate_cpu_s": [m.get("time/generate_cpu_s") for m in steps],
        "generate_steal_s": [m.get("time/generate_steal_s") for m in steps],
        "reward_mean": [m["reward/total_mean"] for m in summary.history],
        "logp_gap_mean": [m.get("sync/logp_gap_mean") for m in steps],
    }


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
    """The floor of an on-policy step, each half alone in this process with our own code and settings:
    the engine generating the step's completions (its wake-up and sleep excluded), and one optimizer step
    over them (forward, backward, clipping, AdamW). Neither waits for the other or for anything else."""
    import torch

    from online_rl.models import load_tokenizer, torch_dtype

    cfg = compose_config(our_overrides(settings, arm, model_dir, prompts, workdir))
    device = torch.device(cfg.hardware.device)
    autocast_dtype = torch_dtype(cfg.hardware.autocast_dtype)
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=False)
    model, trained, trainable, optimizer = trainer(cfg, model_dir, settings.lr)
    engine, prompt_ids = engine_and_prompts(cfg, settings, model, model_dir, tokenizer)
    rollouts, train_s = [], []
    for step in range(settings.steps + settings.profile):  # profile: one more step, not timed
        rollout, timings = timed_rollout(engine, model, prompt_ids, settings.num_generations, cfg.sampling)
        rollouts.append(timings)
        prompts_per_row = [p for p in prompt_ids for _ in range(settings.num_generations)]
        micro_batches = consecutive_micro_batches(
            prompts_per_row,
            rollout.completion_ids,
            settings.our_micro_batch_size,
            tokenizer.pad_token_id,
            device,
            rollout.sampler_logprobs,
        )
        advantages = torch.randn(len(prompts_per_row))
        tokens = int(sum(batch.completion_mask.sum() for batch, _, _ in micro_batches))
        synchronize(device)

        step_once = functools.partial(
            train_step, trained, micro_batches, advantages, tokens, cfg, autocast_dtype, trainable, optimizer
        )
        if step == settings.steps:
            profile_step(step_once, device, workdir / f"{arm}-train-profile.txt")
            break
        started = time.perf_counter()
        step_once()
        train_s.append(time.perf_counter() - started)
    engine.close()
    measured = rollouts[settings.warmup_steps : settings.steps]
    return {
        "train_s": train_s[settings.warmup_steps :],
        **{key: [timings[key] for timings in measured] for key in measured[0]},
    }


def timed_rollout(engine, model, prompt_ids, num_generations: int, sampling) -> tuple:
    """A weight push, then one rollout, timed alone: (the rollout, {generate_s: its seconds without waking the KV
    cache and going back to sleep, and of them generate_gc_s in Python's garbage collector, generate_cpu_s of
    the main thread's CPU; generate_steal_s: the host's steal from all CPUs meanwhile})."""
    from online_rl.cpu_clock import CpuUse
    from online_rl.gc_clock import CollectorClock

    engine.sync_weights(model)
    started = time.perf_counter()  # (the wall time holds the CPU's and the collector's windows)
    with CollectorClock() as collector, CpuUse() as cpu:
        rollout = engine.generate(prompt_ids, num_generations, sampling)
    seconds = time.perf_counter() - started
    asleep_and_awake = rollout.stats.get("time/wake_kv_cache_s", 0.0) + rollout.stats.get("time/sleep_s", 0.0)
    return rollout, {
        "generate_s": seconds - asleep_and_awake,
        "generate_gc_s": collector.lap().seconds,
        "generate_cpu_s": cpu.thread_s,
        "generate_steal_s": cpu.steal_s,
    }


def consecutive_micro_batches(
    prompts, completions, size: int, pad_id: int, device, sampler_logprobs=None
) -> list:
    """Rows i, i + 1, ... as packed micro-batches of `size` rows on `device`, each with its row indices, as
    the loop's training passes take them."""
    from online_rl.logprobs import micro_batch_rows, pack

    micro_batches = []
    rows = list(range(len(prompts)))
    for index in micro_batch_rows(rows, [0] * len(rows), size, by_length=False):  # (lengths: unused)
        batch = pack(
            [prompts[i] for i in index],
            [completions[i] for i in index],
            pad_id,
            [sampler_logprobs[i] for i in index] if sampler_logprobs else None,
        )
        micro_batches.append((batch.to(device), index, None))
    return micro_batches


def engine_and_prompts(cfg, settings: Settings, model, model_dir: Path, tokenizer) -> tuple:
    """cfg's engine on the bench's model, holding `model`'s weights at the first sync; and the token ids of one
    step's prompts."""
    import torch

    from online_rl.data import load_prompts, tokenize_prompts
    from online_rl.engines import make_engine, resolve_mode
    from online_rl.models import torch_dtype

    device = torch.device(cfg.hardware.device)
    engine = make_engine(
        resolve_mode(cfg.vllm.mode.value, device),
        cfg.vllm,
        model,
        str(model_dir),
        tokenizer,
        device=device,
        autocast_dtype=torch_dtype(cfg.hardware.autocast_dtype),
        seed=settings.seed,
        max_model_len=settings.prompt_tokens + settings.completion_tokens,
        trust_remote_code=False,
    )
    rows = load_prompts(cfg.data).select(range(settings.prompts_per_step))
    return engine, tokenize_prompts(tokenizer, rows["prompt"], None, settings.prompt_tokens)


def train_step(model, micro_batches, advantages, tokens, cfg, autocast_dtype, trainable, optimizer) -> None:
    """One optimizer step as the loop makes it: the policy-gradient pass, clipping, AdamW; returns when the
    device has finished it."""
    import torch

    from online_rl.loop import policy_gradient_pass

    policy_gradient_pass(
        model,
        micro_batches,
        advantages,
        None,
        None,
        cfg.algo,
        cfg.vllm,
        check_gap=True,
        rollout_tokens=tokens,
        sampling=cfg.sampling,
        autocast_dtype=autocast_dtype,
    )
    torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(torch.device(cfg.hardware.device))


def trainer(cfg, model_dir: Path, lr: float):
    """The loop's trainer for cfg on the bench's model: (model in train mode, what the training passes call
    (compiled with model.compile), the trainable parameters, fused AdamW on a GPU)."""
    import torch

    from online_rl.models import compiled_for_training, load_policy, torch_dtype

    device = torch.device(cfg.hardware.device)
    model = load_policy(str(model_dir), cfg.model, torch_dtype(cfg.hardware.param_dtype), device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, fused=device.type == "cuda")
    return model, compiled_for_training(model, cfg.model), trainable, optimizer


def profile_step(step, device, path: Path) -> None:
    """step() once under torch.profiler (CPU ops, and CUDA kernels on a GPU): where its time goes, as a table
    of the top 40 ops by self time in path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_trl(settings: Settings, arm: str, model_dir: Path, prompts: Path, workdir: Path) -> dict:
    """TRL's GRPOTrainer with vLLM colocate, the anchor's arguments, everything else its defaults."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    lora = ARMS[arm][1]

    sys.path.insert(0, str(REPO))
    from rewards.digits import digit_fraction

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    gradient_accumulation = settings.prompts_per_step * settings.num_generations // settings.micro_batch_size
    args = GRPOConfig(
        output_dir=str(workdir / arm),
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation,
        num_generations=settings.num_generations,
        max_completion_length=settings.completion_tokens,
        max_steps=settings.steps,
        use_vllm=settings.use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=settings.gpu_memory_utilization,
        vllm_max_model_length=settings.prompt_tokens + settings.completion_tokens,
        bf16=settings.device == "cuda",
        use_cpu=settings.device == "cpu",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=settings.seed,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            target_modules=list(settings.lora_targets),
            task_type="CAUSAL_LM",
        )
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    # our loop appends "\n" to a question when there is no chat template; TRL gets the same text
    dataset = datasets.Dataset.from_list([{"prompt": row["prompt"] + "\n"} for row in rows])
    timer = StepEnds()
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[digit_fraction],
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[timer],
    )
    trainer.train()
    seconds = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    lengths = [
        entry["completions/mean_length"]
        for entry in trainer.state.log_history
        if "completions/mean_length" in entry
    ]
    completions = settings.prompts_per_step * settings.num_generations
    return {
        "step_s": seconds[settings.warmup_steps :],
        "completion_tokens": [length * completions for length in lengths[settings.warmup_steps :]],
        "reward_mean": [entry["reward"] for entry in trainer.state.log_history if "reward" in entry],
    }


def run_arm(arm: str, settings: Settings, workdir: Path) -> None:
    framework = ARMS[arm][0]
    model_dir, prompts = workdir / "model", workdir / "prompts.jsonl"
    runner = {"ours": run_ours, "floor": run_floor, "trl": run_trl}[framework]
    result = runner(settings, arm, model_dir, prompts, workdir)
    (workdir / f"{arm}.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- the driver: arms, then the report


def train_mfu(train_s: float, settings: Settings, flops_per_token: float) -> float | None:
    """The share of the H200's bf16 peak that an optimizer step over one rollout's tokens (prompts and
    completions) reaches in train_s seconds; None off a GPU."""
    if settings.device != "cuda":
        return None
    tokens_per_step = (
        settings.prompts_per_step
        * settings.num_generations
        * (settings.prompt_tokens + settings.completion_tokens)
    )
    return flops_per_token * tokens_per_step / train_s / H200_BF16_DENSE_FLOPS


def summarize(arm: str, raw: dict, settings: Settings, flops_per_token: float) -> dict:
    """One arm's row of the results: medians and spreads over the measured steps."""
    if arm in FLOOR_OF:
        generate, train = statistics.median(raw["generate_s"]), statistics.median(raw["train_s"])
        return {
            "arm": arm,
            "generate_alone_s": generate,
            "train_alone_s": train,
            "floor_s": generate + train,
            "train_mfu": train_mfu(train, settings, flops_per_token),
            "generate_alone_steps_s": raw["generate_s"],
            "train_alone_steps_s": raw["train_s"],
            "generate_alone_gc_s": raw["generate_gc_s"],  # of it, in Python's garbage collector
            "generate_alone_cpu_s": raw["generate_cpu_s"],  # the main thread's CPU seconds in it
            "generate_alone_steal_s": raw["generate_steal_s"],  # the host's, from all CPUs, meanwhile
        }
    seconds = raw["step_s"]
    row = {
        "arm": arm,
        "s_per_step_median": statistics.median(seconds),
        "s_per_step_min": min(seconds),
        "s_per_step_max": max(seconds),
        "completion_tokens_per_s": statistics.median(
            t / s for t, s in zip(raw["completion_tokens"], seconds)
        ),
        "peak_gpu_gib": raw["peak_gpu_gib"],
        "steps_s": seconds,
    }
    phases = raw.get("phases")
    if phases:
        row.update(
            {
                "phases_s": phases,
                "generate_steps_s": raw["generate_s"],
                "train_steps_s": raw["train_s"],
                "gc_steps_s": raw["gc_s"],
                "gc_full_steps_s": raw.get("gc_full_s"),
                "gc_full_collections_steps": raw.get("gc_full_collections"),
                "gc_full_collected_steps": raw.get("gc_full_collected"),
                "generate_cpu_steps_s": raw["generate_cpu_s"],
                "generate_steal_steps_s": raw["generate_steal_s"],
                "sync_sleep_share": (phases["sync"] + phases["sleep_wake"]) / row["s_per_step_median"],
                "train_mfu": train_mfu(phases["train"], settings, flops_per_token),
            }
        )
    return row


def targets(rows: list[dict]) -> list[dict]:
    """Issue 6's targets on the anchor, each with what this run measured (None: an arm it needs did not run)."""
    by_arm = {row["arm"]: row for row in rows}
    pairs = ratios(rows)
    ours, floor, trl = by_arm.get("ours_full"), by_arm.get("floor"), by_arm.get("trl_full")
    measured = [
        ("full fine-tune: ours / TRL completion tok/s", ">= 2.0", pairs.get("full"), lambda v: v >= 2.0),
        (
            "full fine-tune: step / floor (generation alone + training alone)",
            "<= 1.10",
            floor_bounds(rows).get("floor", {}).get("step_over_floor"),
            lambda v: v <= 1.10,
        ),
        ("LoRA r=8: ours / TRL completion tok/s", ">= 2.8", pairs.get("lora"), lambda v: v >= 2.8),
        (
            "one-step off-policy: ours / TRL (on-policy) completion tok/s",
            ">= 2.6",
            pairs.get("offpolicy"),
            lambda v: v >= 2.6,
        ),
        (
            "train phase MFU (training alone)",
            ">= 40%",
            floor["train_mfu"] if floor else None,
            lambda v: v >= 0.40,
        ),
        (
            "sync + sleep/wake share of our step",
            "<= 3%",
            ours["sync_sleep_share"] if ours else None,
            lambda v: v <= 0.03,
        ),
        (
            "peak GPU memory: ours / TRL",
            "<= 1.0",
            ours["peak_gpu_gib"] / trl["peak_gpu_gib"]
            if ours and trl and ours["peak_gpu_gib"] and trl["peak_gpu_gib"]
            else None,
            lambda v: v <= 1.0,
        ),
    ]
    return [
        {
            "target": name,
            "goal": goal,
            "measured": value,
            "met": None if value is None else bool(check(value)),
        }
        for name, goal, value, check in measured
    ]


def floor_bounds(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per floor arm, measured in the same command: our step / floor, and TRL's step / floor (the ratio to TRL
    that an on-policy step would reach at the floor; a target above it needs generation or training faster)."""
    by_arm = {row["arm"]: row for row in rows}
    bounds = {}
    for floor_arm, (ours_arm, trl_arm) in FLOOR_OF.items():
        floor = by_arm.get(floor_arm)
        if floor is None:
            continue
        bounds[floor_arm] = {
            key: by_arm[arm]["s_per_step_median"] / floor["floor_s"]
            for key, arm in (("step_over_floor", ours_arm), ("trl_over_floor", trl_arm))
            if arm in by_arm and by_arm[arm].get("command") == floor.get("command")
        }
    return bounds


def flops_per_token(model_dir: Path, lora: bool) -> float:
    """Forward + backward FLOPs per trained token: 6 N (full) or 4 N (LoRA: no weight gradients of the
    frozen base), N counting the tied embedding once as the output projection; attention scores left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    params = sum(p.numel() for p in model.parameters())
    return (4 if lora else 6) * params


def machines(commands: list[dict]) -> list[str]:
    """The report's line on the machine of each command (results from before it was recorded: none)."""
    described = [
        f"{(machine['gpus'] or ['no GPU'])[0]}; {machine['cpu']}, {machine['cpus']} CPUs, "
        f"load {machine['load_1min']:.1f} at the start"
        for machine in (command.get("machine") for command in commands)
        if machine
    ]
    if not described:
        return []
    if len(set(described)) == 1:
        return [f"Machine: {described[0]}.", ""]
    return ["Machines, command by command: " + " / ".join(described) + ".", ""]


def report(
    rows: list[dict], settings: Settings, commit: str, commands: list[dict], failures: dict[str, str]
) -> str:
    def fmt(row: dict, key: str, spec: str) -> str:
        return format(row[key], spec) if row.get(key) is not None else ""

    pairs = ratios(rows)
    lines = [
        f"# make bench, {commands[0]['started']}, commit {commit}",
        "",
        f"GRPO step: {settings.prompts_per_step} prompts x {settings.num_generations} samples x "
        f"{settings.completion_tokens} completion tokens, prompts of {settings.prompt_tokens} tokens, "
        f"{settings.model}; micro-batches of {settings.micro_batch_size} (TRL) and {settings.our_micro_batch_size} (ours); "
        + (
            f"vLLM at gpu_memory_utilization {settings.gpu_memory_utilization} (TRL) and "
            f"{f'a {settings.kv_cache_gib:g} GiB KV cache' if settings.kv_cache_gib else 'the same'}, sleep level {settings.sleep_level} (ours); "
            if settings.use_vllm
            else "no vLLM (transformers generate); "
        )
        + ("our training passes torch.compile'd (model.compile); " if settings.compile_model else "")
        + (
            "our vLLM engine in a process of its own (vllm.separate_process); "
            if settings.separate_process and settings.engine_processes == 1
            else ""
        )
        + (
            f"{settings.engine_processes} vLLM engines of ours, each in a process of its own (vllm.engine_processes); "
            if settings.engine_processes > 1
            else ""
        )
        + (
            "our off-policy arm's vLLM engine in a process of its own; "
            if any(row["arm"] == "ours_offpolicy" for row in rows)
            and not settings.separate_process
            and settings.engine_processes == 1
            else ""
        )
        + ("every arm with CUDA's Multi-Process Service running (mps); " if settings.mps else "")
        + (
            f"our trainer beside an engine process capped at {settings.trainer_sm_percent}% of the GPU's "
            "multiprocessors (vllm.trainer_sm_percent); "
            if settings.trainer_sm_percent
            else ""
        )
        + (
            "our off-policy trainer at MPS's below-normal client priority (vllm.trainer_below_normal_priority); "
            if settings.trainer_below_normal_priority
            else ""
        )
        + f"median of {settings.measured_steps} steps after {settings.warmup_steps} warm-up steps."
        + (
            " Measured in "
            + "; then ".join(
                f"one command at {command['started']} ({', '.join(command['arms'])})" for command in commands
            )
            + ", one after another on the same GPU; ratios and the floor distance only compare arms of one command."
            if len(commands) > 1
            else ""
        ),
        "",
        *machines(commands),
        "| arm | s/step (median, min-max) | completion tok/s | ours/TRL tok/s | peak GPU GiB | sync+sleep share | train MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    stepped = [row for row in rows if "s_per_step_median" in row]
    for row in stepped:
        pair = pairs.get(row["arm"].removeprefix("ours_")) if row["arm"].startswith("ours_") else None
        lines.append(
            f"| {row['arm']} | {row['s_per_step_median']:.2f} ({row['s_per_step_min']:.2f}-{row['s_per_step_max']:.2f}) "
            f"| {row['completion_tokens_per_s']:,.0f} | {f'{pair:.2f}x' if pair else ''} | {fmt(row, 'peak_gpu_gib', '.1f')} "
            f"| {fmt(row, 'sync_sleep_share', '.1%')} | {fmt(row, 'train_mfu', '.1%')} |"
        )
    phased = [row for row in stepped if "phases_s" in row]
    if phased:
        lines += [
            "",
            "Our phases inside a step, median seconds. log-probs: the passes for old log-probs (num_iterations > 1) "
            "and reference ones (beta > 0) before training; with TRL's defaults (1 and 0) there are none, the "
            "training pass's own log-probs being the old ones.",
            "",
        ]
        lines += [
            "| arm | generate | reward | log-probs | train | sync | sleep/wake | of it in Python's gc |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in phased:
            p = row["phases_s"]
            # (results from before these were measured have none)
            gc_s, logprobs_s = (f"{p[key]:.3f}" if key in p else "" for key in ("gc", "logprobs"))
            lines.append(
                f"| {row['arm']} | {p['generate']:.2f} | {p['reward']:.3f} | {logprobs_s} | {p['train']:.2f} | {p['sync']:.3f} | {p['sleep_wake']:.3f} | {gc_s} |"
            )
    rollouts = rollout_lines(rows)
    if rollouts:
        lines += [
            "",
            "Each measured rollout: seconds, then of them the main thread's CPU seconds and Python's gc, then the "
            "CPU seconds the host gave other tenants meanwhile (steal, all CPUs). CUDA spins while the thread "
            "waits for the GPU, so only waits for the interpreter (another thread's Python) or for a CPU leave "
            "its CPU seconds below the rollout's.",
            "",
            "| arm | rollouts: s (CPU s, gc s, steal s) |",
            "|---|---|",
            *rollouts,
        ]
    lines += host_cpu_lines(rows)
    bounds = floor_bounds(rows)
    for row in rows:
        if row["arm"] in FLOOR_OF:
            bound = bounds.get(row["arm"], {})
            sentences = [
                f"{'Floor' if row['arm'] == 'floor' else 'LoRA floor'}, each half alone: generation "
                f"{row['generate_alone_s']:.2f} s + training {row['train_alone_s']:.2f} s "
                f"(MFU {fmt(row, 'train_mfu', '.1%')}) = {row['floor_s']:.2f} s."
            ]
            if "step_over_floor" in bound:
                sentences.append(f"Our step / floor: {bound['step_over_floor']:.2f}.")
            if "trl_over_floor" in bound:
                sentences.append(
                    f"TRL's step / floor: {bound['trl_over_floor']:.2f}, the most a step that generates, "
                    "then trains, can gain on TRL."
                )
            lines += ["", " ".join(sentences)]
    lines += ["", "Issue 6's targets:", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for target in targets(rows):
        value = target["measured"]
        shown = "not run" if value is None else f"{value:.1%}" if "%" in target["goal"] else f"{value:.2f}"
        met = "" if target["met"] is None else "yes" if target["met"] else "no"
        lines.append(f"| {target['target']} | {target['goal']} | {shown} | {met} |")
    for arm, error in failures.items():
        lines += ["", f"**{arm} failed**: {error}"]
    return "\n".join(lines) + "\n"


def rollout_lines(rows: list[dict]) -> list[str]:
    """A table row per arm whose rollouts were measured one by one (results from before: none)."""
    lines = []
    for row in rows:
        if "generate_alone_cpu_s" in row:
            walls, cpus = row["generate_alone_steps_s"], row["generate_alone_cpu_s"]
            gcs, steals = row["generate_alone_gc_s"], row["generate_alone_steal_s"]
        elif row.get("generate_cpu_steps_s") and None not in row["generate_cpu_steps_s"]:
            walls, cpus = row["generate_steps_s"], row["generate_cpu_steps_s"]
            gcs, steals = row["gc_steps_s"], row["generate_steal_steps_s"]  # (gc: the whole step's)
        else:
            continue
        shown = [
            f"{wall:.2f} ({cpu:.2f}, {gc:.2f}, {'?' if steal is None else f'{steal:.2f}'})"
            for wall, cpu, gc, steal in zip(walls, cpus, gcs, steals)
        ]
        lines.append(f"| {row['arm']} | {'; '.join(shown)} |")
    return lines


def host_cpu_lines(rows: list[dict]) -> list[str]:
    """How fast the host's CPUs ran Python just before and just after each arm (results from before: none).
    Generation is bound by one CPU thread, and on a shared host the same Python has run twice as long on
    some CPUs as on others, so a slow arm beside a busy host is told from a slow arm."""

    def shown(probe: dict[str, float]) -> str:
        return "/".join(f"{probe[key]:.1f}" for key in ("fastest", "median", "slowest"))

    arms = [
        f"{row['arm']} {shown(row['host_cpus_ms']['before'])} -> {shown(row['host_cpus_ms']['after'])}"
        for row in rows
        if "host_cpus_ms" in row
    ]
    if not arms:
        return []
    return [
        "",
        "The host's CPUs before -> after each arm: ms for the same loop of Python on the fastest / median / "
        "slowest CPU (online_rl.cpu_clock.cpu_speeds; other tenants slow them): " + "; ".join(arms) + ".",
    ]


def chart(rows: list[dict], path: Path) -> None:
    rows = [row for row in rows if "s_per_step_median" in row]  # the floor has no steps of its own
    try:
        import matplotlib
    except ImportError:  # the GPU machine's bundle has no matplotlib: `--report FILE.json` draws it later
        print(f"bench: no matplotlib, so no {path.name}; draw it with --report {path.with_suffix('.json')}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [row["arm"] for row in rows]
    colors = ["tab:blue" if name.startswith("ours") else "tab:gray" for name in names]
    left.bar(names, [row["s_per_step_median"] for row in rows], color=colors)
    left.set_ylabel("s / step (median)")
    right.bar(names, [row["completion_tokens_per_s"] for row in rows], color=colors)
    right.set_ylabel("completion tokens / s")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine() -> dict:
    """What this command ran on. Generation is bound by the CPU, and the same GPU kind has given steps 20-40%
    apart from one lease to the next (TRL: 6.97 against 9.04 s), so each command records its CPU, the load on
    it when the command started (other work on the machine), and the GPU with its driver."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu_models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    try:  # nvidia-smi, not torch: this process must not open a CUDA context (it would count in peak memory)
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        gpus = answer.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        gpus = []
    return {
        "cpu": cpu_models[0] if cpu_models else None,
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "gpus": gpus,  # "name, driver, max SM clock" each
    }


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ratios(rows: list[dict]) -> dict[str, float]:
    """ours / TRL completion tokens per second, per pair of arms that both ran."""
    by_arm = {row["arm"]: row for row in rows if "completion_tokens_per_s" in row}
    twins = {
        arm: "trl_full" if ARMS[arm][2] else arm.replace("ours_", "trl_")
        for arm in by_arm
        if arm.startswith("ours_")
    }
    return {
        arm.removeprefix("ours_"): by_arm[arm]["completion_tokens_per_s"]
        / by_arm[twin]["completion_tokens_per_s"]
        for arm, twin in twins.items()
        if twin in by_arm and by_arm[arm].get("command") == by_arm[twin].get("command")  # one command only
    }


def run_arm_process(arm: str, settings: Settings, workdir: Path, timeout_s: float, env: dict) -> dict | str:
    """One arm in a process of its own: its raw measurements, or why it failed (with its log's tail)."""
    log_path = workdir / f"{arm}.log"
    command = [
        sys.executable,
        __file__,
        "--run-arm",
        arm,
        "--settings",
        json.dumps(asdict(settings)),
        "--workdir",
        str(workdir),
    ]
    with open(log_path, "w") as log_file, PeakDeviceMemory(settings.device) as memory:
        try:
            code = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout_s:.0f} s"
    if code != 0:
        tail = log_path.read_text()[-1500:]
        print(f"bench: {arm} FAILED ({code}); log: {log_path}\n{tail}", flush=True)
        return f"exit {code}; log tail:\n```\n{tail}\n```"
    # the whole process's peak, engine start included (both frameworks start theirs the same way)
    return {**json.loads((workdir / f"{arm}.json").read_text()), "peak_gpu_gib": memory.gib}


def settings_from_json(fields: dict) -> Settings:
    return Settings(**{**fields, "lora_targets": tuple(fields["lora_targets"])})


def parse_settings(base: Settings, assignments: list[str]) -> Settings:
    """--set key=value pairs over the defaults, typed like the field they replace."""
    changes = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(
                f"--set {assignment}: no setting {key!r}; settings: {', '.join(Settings.__dataclass_fields__)}"
            )
        current = getattr(base, key)
        if isinstance(current, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            changes[key] = tuple(value.split(","))
        else:
            changes[key] = type(current)(value)
    settings = replace(base, **changes)
    if settings.trainer_sm_percent and not settings.mps:
        raise SystemExit(
            f"--set trainer_sm_percent={settings.trainer_sm_percent} caps the trainer under CUDA's MPS daemon: "
            "add --set mps=true"
        )
    if settings.trainer_below_normal_priority and not settings.mps:
        raise SystemExit(
            "--set trainer_below_normal_priority=true is a priority among CUDA's MPS clients: add --set mps=true"
        )
    return settings


def main() -> None:
    from online_rl.cpu_clock import cpu_speeds, speeds_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arms", help=f"comma-separated, from {','.join(ARMS)} (default: all; --smoke: those without vLLM)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU, no vLLM: checks the harness"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="change a setting, e.g. sleep_level=0"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument(
        "--arm-timeout-s", type=float, default=900.0, help="an arm running longer is stopped and reported"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these arms to the results of an earlier command of the same commit and settings",
    )
    parser.add_argument("--report", type=Path, help="rewrite the .md and .png of a results .json, and stop")
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.run_arm:
        settings = settings_from_json(json.loads(options.settings))
        run_arm(options.run_arm, settings, options.workdir)
        return

    if options.report:
        results = json.loads(options.report.read_text())
        settings = settings_from_json(results["settings"])
        commands = results.get("commands") or [{"started": results["started"], "arms": None}]
        table = report(results["arms"], settings, results["commit"], commands, results["failures"])
        options.report.with_suffix(".md").write_text(table)
        chart(results["arms"], options.report.with_suffix(".png"))
        print(table)
        return

    settings = parse_settings(SMOKE if options.smoke else Settings(), options.set)
    default_arms = [arm for arm in ARMS if settings.use_vllm or not ARMS[arm][2]]  # off-policy needs vLLM
    arms = [arm for arm in (options.arms or ",".join(default_arms)).split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}: choose from {','.join(ARMS)}")
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = os.environ.get("BENCH_COMMIT") or git_commit()  # a copied tree without .git: say which commit
    run_name = commit + ("-smoke" if options.smoke else "")
    stem = f"{started[:10]}-{run_name}"
    options.out.mkdir(parents=True, exist_ok=True)
    options.workdir.mkdir(parents=True, exist_ok=True)
    # --append: this command's arms join those of an earlier command's results (same commit and settings),
    # found by the commit (that command may have started on another date)
    results_path = options.out / f"{stem}.json"
    if results_path.exists() and not options.append:  # a second command must not erase the first's results
        raise SystemExit(
            f"{results_path} exists: add these arms to it with --append, or write elsewhere with --out DIR"
        )
    earlier = None
    if options.append:
        found = sorted(options.out.glob(f"????-??-??-{run_name}.json"))  # <date>-<commit>.json
        if not found:  # else its arms would land in a file of their own, their ratios silently apart
            raise SystemExit(
                f"--append: no results of commit {commit} in {options.out}: point --out at the directory of "
                "the first command's results, or leave out --append"
            )
        results_path = found[-1]
        earlier = json.loads(results_path.read_text())
        if earlier["settings"] != json.loads(json.dumps(asdict(settings))) or earlier["commit"] != commit:
            raise SystemExit(
                f"--append: {results_path} has other settings or another commit; leave out --append"
            )
    if earlier and (options.workdir / "prompts.jsonl").exists():
        print(f"bench: the earlier command's model and prompts in {options.workdir}", flush=True)
    else:
        print(f"bench: setup in {options.workdir}", flush=True)
        prepare(settings, options.workdir)

    rows = [row for row in earlier["arms"] if row["arm"] not in arms] if earlier else []
    failures = {arm: why for arm, why in earlier["failures"].items() if arm not in arms} if earlier else {}
    commands = (earlier["commands"] if earlier else []) + [
        {"started": started, "arms": arms, "machine": machine()}
    ]
    with (
        sigterm_exits(),
        MultiProcessService(settings.mps, options.workdir / "mps") as mps,  # (--set mps=true only)
    ):
        env = child_env(mps)
        for arm in arms:
            print(f"bench: {arm}", flush=True)
            cpus_before = speeds_summary(cpu_speeds())  # (the host's other tenants: see host_cpu_lines)
            t = time.perf_counter()
            outcome = run_arm_process(arm, settings, options.workdir, options.arm_timeout_s, env)
            if isinstance(outcome, str):
                failures[arm] = outcome
            else:
                row = summarize(
                    arm, outcome, settings, flops_per_token(options.workdir / "model", ARMS[arm][1])
                )
                row["process_s"] = time.perf_counter() - t
                row["host_cpus_ms"] = {"before": cpus_before, "after": speeds_summary(cpu_speeds())}
                row["command"] = len(commands)  # which command of `commands` measured it
                rows.append(row)
                print(f"bench: {arm}: {json.dumps(row)}", flush=True)
                profile = options.workdir / f"{arm}-train-profile.txt"
                if arm in FLOOR_OF and settings.profile and profile.exists():
                    shutil.copy(profile, options.out / f"{stem}-{arm}-train-profile.txt")
            # after every arm, so that a run cut short still leaves what it measured
            rows.sort(key=lambda row: list(ARMS).index(row["arm"]))
            table = report(rows, settings, commit, commands, failures)
            results = {
                "started": commands[0]["started"],
                "commit": commit,
                "settings": asdict(settings),
                "commands": commands,
                "ours_over_trl": ratios(rows),
                "targets": targets(rows),
                "floor_bounds": floor_bounds(rows),
                "arms": rows,
                "failures": failures,
            }
            results_path.write_text(json.dumps(results, indent=1))
            results_path.with_suffix(".md").write_text(table)
            if rows:
                chart(rows, results_path.with_suffix(".png"))
    print(table)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
