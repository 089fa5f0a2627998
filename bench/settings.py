"""The bench's GRPO step (Settings, the same for every arm), its arms, and the command line's `--set key=value`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"  # where every command of the bench writes its results by default


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
    # ours (not ours_default*): model.lora.base_dtype; float32 as TRL's anchor loads it, and as every anchor LoRA
    # row since 2026-11-23 ran (the default on a GPU became bf16 at issue 27); "": the default
    lora_base_dtype: str = "float32"
    # ours, on-policy: vllm.separate_process, vLLM's engine in a process of its own (ours_offpolicy always
    # runs it so: in the trainer's, generating beside training took 2x as long as alone)
    separate_process: bool = False
    # ours: vllm.engine_processes, engines on the GPU each generating a share of the prompts (in processes of
    # their own); generation is bound by vLLM's Python per sequence, the GPU running kernels 28% of the time
    engine_processes: int = 1
    # every arm of the command with CUDA's Multi-Process Service running (processes.MultiProcessService): the
    # kernels of the off-policy arm's two processes (trainer, vLLM engine) then run side by side, not in turns
    mps: bool = False
    # ours_offpolicy, with mps: vllm.trainer_sm_percent, the trainer's kernels take at most this share of the
    # GPU's multiprocessors while the engine process generates beside them with all of them; 0: no cap
    trainer_sm_percent: int = 0
    model: str = "qwen2_0.5b_random"  # a conf/model entry with random_init: the shape to build
    # the conf/model entry a user of the real model names (our runs load the built model through it: its
    # gradient_checkpointing and the like are the user's defaults)
    user_model: str = "qwen2_0.5b"
    # the built model's weights on disk: bfloat16 halves what every arm reads at 7B (random weights either way;
    # both frameworks still train fp32 master weights)
    model_dtype: str = "float32"
    # --shape: the row of the shapes file (bench/results/<date>-shapes.json) these arms fill; "": none
    shape: str = ""
    device: str = "cuda"
    use_vllm: bool = True
    seed: int = 0
    # floor arms: torch.profiler over one more training step (not timed) -> <out>/<stem>-<arm>-train-profile.txt
    profile: bool = False
    # trl_tuned: TRL's candidates after its anchor, each `BATCH[:FLAG...]` (bench.trl_sweep): the per-device batch
    # (accumulation keeps the step's completions) or `best` (the fastest so far); flags gc (gradient
    # checkpointing on; without it, off, and on again after running out of memory), compile (torch_compile),
    # liger (use_liger_kernel), bf16base (LoRA: the frozen base loaded in bfloat16)
    # (issue 27: 32 x 4 and 64 x 2, with TRL's default gradient checkpointing, beat the anchor's 8 x 16 by 1.5x)
    trl_sweep: tuple[str, ...] = ("16", "32", "32:gc", "64:gc")
    sweep_warmup_steps: int = (
        2  # each candidate's steps after the anchor (which runs warmup + measured steps)
    )
    sweep_measured_steps: int = 2
    # ours_server*: how long the arm waits for its server's /health before it fails (a fresh machine's first
    # vLLM start took 141-151 s on the H200: compile and CUDA graphs; a warm one's ~55 s)
    server_start_s: float = 300.0

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
    trl_sweep=("1", "best:gc"),
    sweep_warmup_steps=1,
    sweep_measured_steps=1,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LONG_STEP = {"prompt_tokens": 256, "completion_tokens": 1024}  # issue 27's step beyond the anchor
# --shape NAME: the settings it changes (the rest are the anchor's), and whether its arms train LoRA adapters.
# Steps: at 1.5B and 7B a step takes 10-30 s, so fewer of them keep one command under 9 minutes (bench/shapes.sh).
SHAPES = {
    # the anchor: the seed notebook's step (TRL's batch 16 left out: issue 27 measured 32 and 64 fastest)
    "0.5b": ({"trl_sweep": ("32", "32:gc", "64:gc")}, False),
    # r 8 on q_proj, v_proj, as the anchor's LoRA arms; the fastest also with torch_compile (its first steps compile)
    "0.5b_lora": ({"trl_sweep": ("16", "32", "32:gc", "64:gc", "best:compile")}, True),
    "1.5b": (
        {
            **LONG_STEP,
            "model": "qwen2.5_1.5b_random",
            "user_model": "qwen2.5_1.5b",
            "model_dtype": "bfloat16",
            "warmup_steps": 2,
            "measured_steps": 3,
            # without gradient checkpointing only a small batch's activations fit beside vLLM at 1280 tokens
            "trl_sweep": ("4", "16:gc", "32:gc"),
            "sweep_warmup_steps": 1,
        },
        False,
    ),
    "7b_lora": (
        {
            **LONG_STEP,
            "model": "qwen2.5_7b_random",
            "user_model": "qwen2.5_7b",
            "model_dtype": "bfloat16",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_targets": ALL_LINEAR,
            "warmup_steps": 1,
            "measured_steps": 2,
            # its activations need gradient checkpointing (TRL's default) beside vLLM; a bf16 base halves TRL's
            # 30 GiB of frozen fp32 weights (our default on a GPU is a bf16 base: models.frozen_base_dtype)
            "trl_sweep": ("16:gc:bf16base",),
            "sweep_warmup_steps": 1,
            "sweep_measured_steps": 1,
        },
        True,
    ),
}

# arm -> (framework, LoRA, off-policy); floor: our generation alone and our training alone
ARMS = {
    "trl_full": ("trl", False, False),
    "ours_full": ("ours", False, False),
    "floor": ("floor", False, False),
    "ours_offpolicy": ("ours", False, True),  # compared with trl_full: TRL's GRPO generates on-policy
    "trl_lora": ("trl", True, False),
    "ours_lora": ("ours", True, False),
    "floor_lora": ("floor", True, False),
    # issue 27: our train.py as a user types it (only the shape's model, data and lengths), and TRL at its best
    # (its anchor, then the candidates of trl_sweep, in one process)
    "ours_default": ("ours", False, False),
    "trl_tuned": ("trl", False, False),
    "ours_default_lora": ("ours", True, False),
    "trl_tuned_lora": ("trl", True, False),
    # issue 28: our loop against a stock vLLM server on the trainer's GPU, weights over CUDA IPC (bench.server),
    # on-policy and k = 1, 2 updates behind (the off-policy ones compared with trl_full, as ours_offpolicy)
    "ours_server": ("ours", False, False),
    "ours_server_k1": ("ours", False, True),
    "ours_server_k2": ("ours", False, True),
}
# the server arms -> their off_policy_steps
SERVER_ARMS = {"ours_server": 0, "ours_server_k1": 1, "ours_server_k2": 2}
# what a command runs without --arms: the anchor's arms, or a shape's (their ratios need them in one command)
ANCHOR_ARMS = ("trl_full", "ours_full", "floor", "ours_offpolicy", "trl_lora", "ours_lora", "floor_lora")
SHAPE_ARMS = {False: ("ours_default", "trl_tuned"), True: ("ours_default_lora", "trl_tuned_lora")}
# each floor and the on-policy arms it bounds (TRL's twin: the most a step that generates, then trains, can
# gain on it)
FLOOR_OF = {"floor": ("ours_full", "trl_full"), "floor_lora": ("ours_lora", "trl_lora")}


def settings_from_json(fields: dict) -> Settings:
    """Settings as a results file (or an arm's command line) holds them. A setting the bench no longer has
    (results from before it was removed) is left out."""
    known = {key: value for key, value in fields.items() if key in Settings.__dataclass_fields__}
    tuples = {key: tuple(known[key]) for key in ("lora_targets", "trl_sweep") if key in known}
    return Settings(**{**known, **tuples})


def shape_settings(base: Settings, shape: str | None, resize: bool = True) -> Settings:
    """The settings of --shape NAME over base (its LoRA flag picks the arms: SHAPE_ARMS); resize=False (the
    smoke's tiny step on a CPU) keeps base's sizes, steps and TRL candidates and takes only the shape's name."""
    if shape is None:
        return base
    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape}: choose from {', '.join(SHAPES)}")
    return replace(base, **(SHAPES[shape][0] if resize else {}), shape=shape)


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
    return settings
