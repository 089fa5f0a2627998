"""Typed schemas for every Hydra config group (the algo group's live beside their algorithms, in algorithms/).

Each group's YAML files start from one of these dataclasses (registered in Hydra's ConfigStore), so a
misspelt key or a value of the wrong type fails when the config is composed, before any model loads,
with an error that names the key. Every field carries one line saying what it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from online_rl.algorithms import ALGORITHMS

# the Hydra config groups (train.yaml and a folder per group), shipped inside the package
CONF_DIR = Path(__file__).resolve().parent / "conf"


class EngineMode(str, Enum):
    off = "off"  # transformers `generate` on the trainer's own model
    auto = "auto"  # colocate when CUDA and vLLM are present, else off
    colocate = "colocate"  # vllm.LLM in the trainer process, asleep while the trainer trains
    server = "server"  # the stock vLLM OpenAI server (`make serve`); weights by NCCL or CUDA IPC


class ModelImpl(str, Enum):
    vllm = "vllm"  # vLLM's own model code
    transformers = "transformers"  # vLLM running the transformers modelling code


class LoggerBackend(str, Enum):
    trackio = "trackio"  # local and offline: `trackio show`
    wandb = "wandb"  # Weights & Biases (pip install 'online-rl[wandb]'); WANDB_MODE=offline: no account
    tensorboard = (
        "tensorboard"  # event files for `tensorboard --logdir` (pip install 'online-rl[tensorboard]')
    )
    none = "none"  # the console and metrics.jsonl only


# `raise` is a Python keyword, so this enum is built by name; OmegaConf checks values against the names.
OnRewardError = Enum("OnRewardError", {"raise": "raise", "skip": "skip"}, type=str)


class CompletionFormat(str, Enum):
    text = "text"
    messages = "messages"


class ParallelStrategy(str, Enum):
    ddp = "ddp"  # every rank holds the whole model; gradients are averaged (DistributedDataParallel)
    fsdp2 = "fsdp2"  # every rank holds 1/N of each weight, gathered layer by layer (torch fully_shard)


class LrScheduler(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class ImportanceSamplingLevel(str, Enum):
    token = "token"  # a weight per token: pi_trainer(y_t) / pi_vllm(y_t)
    sequence = "sequence"  # one per completion: pi_trainer(y) / pi_vllm(y), its tokens' weights multiplied


class ImportanceSamplingMode(str, Enum):
    truncate = "truncate"  # clamp the weight into [min, max] (truncated IS)
    mask = "mask"  # a weight outside [min, max] becomes 0: that token (or completion) is left out (masked IS)


@dataclass
class ImportanceSamplingConfig:
    """The correction for what differs between vLLM's sampling and the trainer (vllm/importance_sampling=trl: TRL's)."""

    level: ImportanceSamplingLevel = ImportanceSamplingLevel.token  # token | sequence
    mode: ImportanceSamplingMode = ImportanceSamplingMode.truncate  # truncate | mask
    min: float | None = None  # lower bound of the weight; null = none
    max: float | None = 2.0  # upper bound of the weight; null = none (mask mode only: truncate needs one)


@dataclass
class EngineConfig:
    mode: EngineMode = EngineMode.off  # which engine generates: off = transformers generate


@dataclass
class VLLMCheckConfig:
    """What every vLLM engine shares: checking that the weights arrived, and correcting what remains."""

    # Stop when vLLM's log-probs of its sampled tokens differ from the trainer's by more than this on
    # average (nats per token): the engine is not generating with the trainer's weights.
    max_logp_gap: float = 0.1
    # weight each token (or completion) by pi_trainer / pi_vllm, bounded as importance_sampling says
    importance_sampling_correction: bool = True
    importance_sampling: ImportanceSamplingConfig = field(default_factory=ImportanceSamplingConfig)


@dataclass
class VLLMColocateConfig(VLLMCheckConfig):
    mode: EngineMode = EngineMode.colocate  # colocate, or auto (colocate with CUDA and vLLM, else off)
    # share of the GPU vLLM takes for weights + KV cache while awake, when it sizes the cache itself
    # (kv_cache_memory_gib=null); otherwise only checked against the free memory at start
    gpu_memory_utilization: float = 0.3
    # KV cache per engine: `auto` (on a GPU) holds one call's sequences at max_model_len, N x L x layers x 2 x
    # kv_heads x head_dim x 2 bytes x 1.25 (128 x 768 on Qwen2-0.5B: 1.4 GiB; engines/vllm_colocate.py); a
    # number of GiB; null = what gpu_memory_utilization leaves (~20 GiB of an 80 GiB card at 0.5B). A small cache
    # leaves the trainer the memory and sleeps and wakes faster.
    kv_cache_memory_gib: Any = "auto"
    max_model_len: int | None = None  # null = data.max_prompt_length + sampling.max_completion_length
    enable_prefix_caching: bool = True  # the G samples of a prompt share its prefill
    enforce_eager: bool = False  # skip CUDA graphs: faster start, slower decoding
    dtype: str = "bfloat16"  # vLLM's weight dtype (float32 on CPU for exact comparisons)
    # 0 = never sleep, 1 = offload weights to CPU + free the KV cache, 2 = free both (CUDA only). Every sync
    # pushes all weights, so level 1's CPU copy is never read back: 2 sleeps faster for the same result.
    sleep_level: int = 2
    tensor_parallel_size: int = 1  # GPUs one engine spans (multi-GPU ranks)
    model_impl: ModelImpl = ModelImpl.vllm  # vllm | transformers
    seed: int | None = None  # vLLM's sampling seed; null = the run's seed
    max_num_seqs: int | None = None  # sequences decoded at once; null = vLLM's default
    max_num_batched_tokens: int | None = None  # tokens per scheduler step; null = vLLM's default
    # schedule the next decode step while the GPU runs this one; null = vLLM's choice (on when it can)
    async_scheduling: bool | None = None
    regex: str | None = None  # structured generation: every completion matches this regex
    cpu_kv_cache_gib: int = 1  # KV cache size when vLLM runs on a CPU (VLLM_CPU_KVCACHE_SPACE)
    # vLLM's whole engine in a process of its own on the trainer's device, one message per call
    # (engines/hosted/engine_host.py); each sync copies the weights into memory both processes map (CUDA IPC on a
    # GPU). Generating then takes none of the trainer's interpreter, which it otherwise shares with training
    # when the two overlap (off_policy_steps >= 1). One training rank, one GPU.
    separate_process: bool = False
    weight_bucket_mib: int = 1024  # separate_process: the shared block's size (a larger weight gets its own)
    # separate_process: engines on the device, each in a process of its own, each generating a share of every
    # rollout's prompts. vLLM spends most of a decoding step in Python, per sequence (on the H200 the GPU ran
    # kernels 28% of a rollout); N processes spread that over N CPU cores. Each engine holds a copy of the
    # weights and its own KV cache (kv_cache_memory_gib, or gpu_memory_utilization, each; sized by the latter
    # they start one after another). On one H200 under CUDA's MPS daemon a rollout of the bench took 1.93 s
    # with two engines and 2.00 s with four, against 2.52 and 2.80 s with one in the trainer's process
    # (commit 2e6bf11); without MPS the GPU time-slices between processes.
    engine_processes: int = 1
    # separate_process under CUDA's MPS daemon (`nvidia-cuda-mps-control -d`): the most of the GPU's
    # multiprocessors the trainer's kernels take, in percent; the engines keep all of them. Beside training
    # (off_policy_steps >= 1) a decoding step's small kernels then find room instead of waiting for the trainer's
    # (engines/hosted/mps.py). null: no cap.
    trainer_sm_percent: int | None = None


@dataclass
class VLLMServerConfig(VLLMCheckConfig):
    mode: EngineMode = EngineMode.server
    # one URL per server process (`make serve` prints them); each rollout's prompts are split across them
    base_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000"])
    connect_timeout_s: float = (
        300.0  # wait this long for every server's /health at start (cold start: 1-2 min)
    )
    request_timeout_s: float = 600.0  # one generation request: a server's whole share of a rollout
    retries: int = 3  # extra attempts of a request that failed to connect, timed out or got a 5xx answer
    retry_backoff_s: float = 1.0  # wait before the first retry; doubled before each further one
    # push the trainer's weights before every rollout, as the servers take them (make serve TRANSFER=): NCCL
    # to servers on other GPUs, CUDA IPC to one on the trainer's GPU; needs the trainer on a CUDA GPU. false =
    # the servers keep the weights they loaded (evaluation, generation only): the logp-gap check stops
    # training once the trainer has moved away from them
    sync_weights: bool = True
    nccl_host: str | None = None  # the servers reach the trainer here; null = 127.0.0.1 if they are all local
    nccl_port: int | None = None  # the trainer's NCCL rendezvous port; null = a free port
    nccl_timeout_s: float = 300.0  # bound on the NCCL rendezvous, each weight broadcast and each IPC bucket
    ipc_bucket_mib: int = 512  # IPC pushes: the bucket (one trainer buffer), raised to the largest tensor
    transfer_dtype: str | None = None  # weights travel in this dtype (bfloat16 halves fp32); null = as held
    regex: str | None = None  # structured generation: every completion matches this regex


@dataclass
class RandomInitConfig:
    """A Qwen2-architecture model with random weights and a byte-level BPE tokenizer trained on the data."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim = hidden_size / num_heads; vLLM's CPU attention needs >= 32
    num_kv_heads: int = 2
    intermediate_size: int = 256
    tokenizer_vocab_size: int = 512  # BPE merges are learnt until this size (or the data runs out)
    model_vocab_size: int | None = None  # null = the tokenizer's size rounded up to 64; 151936 = Qwen2 shape
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    seed: int = 0  # weights and tokenizer depend only on this and the data, not on the run's seed


@dataclass
class LoraSettings:
    enabled: bool = False  # train LoRA adapters instead of all weights
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # dtype of the frozen base; null = hardware.autocast_dtype if set (bf16 on a GPU: half the memory, and no
    # cast of each frozen weight at every forward; models.frozen_base_dtype), else hardware.param_dtype. The
    # adapters stay in hardware.param_dtype either way.
    base_dtype: str | None = None


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id or local directory; with random_init, the name of the built model
    random_init: RandomInitConfig | None = None  # build a random model instead of loading name_or_path
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust the repo
    gradient_checkpointing: bool = False  # trade compute for activation memory
    # torch.compile the decoder layers for the training passes: fewer, fused kernels after a one-off compile
    # at the first step (30 s for a 0.5B model on an H200); generation, the reference and checkpoints stay eager.
    # auto: on one CUDA GPU (models.compiles); true; false
    compile: Any = "auto"
    disable_dropout: bool = True  # dropout off in every forward, so log-probs match the engine's sampling
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class RewardConfig:
    fn: str = MISSING  # import path, e.g. online_rl.rewards.format.think_answer_format or trl.rewards.accuracy_reward
    weight: float = 1.0  # weight in the total reward; 0 = logged only
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments bound to the function
    # text: each completion a string; messages: TRL's conversational form, [{"role": "assistant", "content": ...}]
    # (what TRL's own text rewards read, e.g. trl.rewards.think_format_reward)
    completions: CompletionFormat = CompletionFormat.text


@dataclass
class EnvConfig:
    """A multi-turn environment (envs/): the model acts, the environment replies, up to max_turns turns."""

    name: str = (
        "none"  # none = single-turn: one completion per sample; else its reward's name (reward/<name>_mean)
    )
    cls: str | None = (
        None  # import path of the environment's class, e.g. online_rl.envs.calculator.Calculator
    )
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its constructor
    weight: float = 1.0  # weight of the environment's reward in the total (beside any reward functions)
    max_turns: int = 4  # model turns per sample; an episode still going then ends (env/max_turns_reached)
    # tokens of a whole conversation after the prompt (the model's turns and the environment's replies); one that
    # would pass it ends there (env/truncated). Each model turn has at most sampling.max_completion_length tokens
    max_tokens: int = 256


@dataclass
class HardwareConfig:
    device: str = "cpu"  # cpu | cuda (hardware=auto: cuda when torch sees a GPU)
    param_dtype: str = "float32"  # dtype of the trained weights (float32 | bfloat16)
    autocast_dtype: str | None = None  # mixed precision for forward passes (bfloat16 on GPU), null = off
    num_processes: int = 1  # training processes (ranks): > 1 needs `accelerate launch --num_processes N`
    strategy: ParallelStrategy = ParallelStrategy.ddp  # ddp | fsdp2: how ranks share the model (N > 1)


@dataclass
class DataConfig:
    path: str | None = None  # datasets.load_dataset path: hub id, or a builder such as json
    subset: str | None = None  # dataset config name (gsm8k: main)
    data_files: str | None = None  # local files for builders such as json
    split: str = "train"
    synthetic_rows: int | None = None  # instead of loading: this many arithmetic problems made in code
    prompt_column: str = "prompt"  # the question shown to the model
    solution_column: str | None = "solution"  # reference answer, passed to rewards as `solution`
    synthetic_task: str = (
        "arithmetic"  # with synthetic_rows: arithmetic | guess_number (rows with a `secret`)
    )
    solution_regex: str | None = None  # keep only this regex's first group of the solution (gsm8k: '#### N')
    system_prompt: str | None = None  # null = no system message
    max_prompt_length: int = 512  # prompts longer than this (in tokens) keep their last tokens
    shuffle: bool = True


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.trackio  # trackio (local, offline) | wandb | tensorboard | none
    project: str = "online-rl"  # trackio or wandb project name
    log_every: int = 10  # steps between log lines on the console; the first and the last step always log
    sample_table_every: int = 10  # steps between tables of sample prompts / completions / rewards
    sample_table_rows: int = 8
    # the speed lab's per-step diagnostics: Python's garbage collector (time/gc_s, time/gc_full_s,
    # gc/full_collections, gc/full_collected) and the rollout's CPU (time/generate_cpu_s, time/generate_steal_s)
    lab_metrics: bool = False


@dataclass
class SamplingConfig:
    max_completion_length: int = 256  # new tokens per completion; longer ones are truncated
    temperature: float = 1.0  # the trainer scores tokens at this temperature too
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    lr_scheduler: LrScheduler = LrScheduler.constant  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0


@dataclass
class EvalConfig:
    """Held-out evaluation (every `eval_every` steps, at the end, or alone with `eval_only=true`)."""

    # the held-out split, sliced as in datasets.load_dataset (`test`, `test[:200]`, `test[:10%]`); with
    # data=synthetic the slice applies to 500 problems made with another seed, none of them a training prompt;
    # data without that split (your own JSONL file) evaluates on holdout_size rows held out of data.split
    split: str = "test[:64]"
    # rows of data.split held out for evaluation when the data has no eval.split: drawn with a fixed seed
    # (the same every run), logged by index, never trained on; eval_every=0 (no evaluation) holds none out
    holdout_size: int = 64
    num_generations: int = 4  # n samples per prompt; pass@k is estimated for k = 1, 2, 4, ..., n
    temperature: float | None = None  # temperature of those n samples; null = sampling.temperature
    greedy: bool = True  # also one greedy (temperature 0) completion per prompt: eval/pass@1_greedy
    pass_reward: str | None = (
        None  # the reward that decides "pass" (e.g. math_accuracy); null = weighted total
    )
    pass_threshold: float = 1.0  # a completion passes when that score is >= this; a None score fails
    batch_size: int = 64  # prompts per engine call
    # eval_only: what to score: a checkpoint, an exported model/ (a LoRA adapter too) or a hub id;
    # null = the model group's model (a random one is built as for training)
    model: str | None = None


@dataclass
class WatchdogConfig:
    """Seconds each phase of a step may run; past it, every thread's stack is logged and the run fails. 0 = no limit."""

    sync: float = 900  # pushing the trainer's weights to the engine
    generate: float = 3600  # sampling one rollout
    reward: float = 1800  # scoring one rollout with every reward function
    train: float = 3600  # the optimizer steps over one rollout, and their logging
    checkpoint: float = 1800  # writing one checkpoint


@dataclass
class CheckpointConfig:
    # checkpoints kept under output_dir/checkpoints, the newest; older ones are deleted once a new one is
    # written. Never deleted: the one the run resumed from and the newest intact one. null = keep every one
    keep_last: int | None = 3


@dataclass
class TrainConfig:
    algo: Any = MISSING  # one of the algo group's schemas (algorithms/: each entry's `schema`)
    vllm: Any = (
        MISSING  # one of the vllm group's schemas (EngineConfig, VLLMColocateConfig, VLLMServerConfig)
    )
    model: ModelConfig = MISSING
    # name -> a RewardConfig, read over its defaults when the run starts (rewarding.reward_spec: a misspelt key
    # is an error naming it). Untyped here so that the command line can add one, `+rewards.mine.fn=pkg.fn`:
    # OmegaConf cannot build a typed entry from an override.
    rewards: dict[str, Any] = field(default_factory=dict)
    env: EnvConfig = MISSING
    hardware: HardwareConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 42  # seeds python, numpy, torch (CPU and CUDA), the data order and sampling
    max_steps: int = 100  # optimizer steps
    prompts_per_step: int = (
        8  # prompts per rollout; the rollout has prompts_per_step x num_generations samples
    )
    micro_batch_size: int = 8  # completions per forward/backward; gradients accumulate over the rollout
    # rows of similar length share a micro-batch (the rollout sorted, longest first), so less of it is padding;
    # false: the rollout's order. Changes no loss but bnpo's (a token mean per micro-batch)
    micro_batch_by_length: bool = True
    # 0 = on-policy; k >= 1 = the engine (vllm=colocate or server) keeps generating while the trainer trains,
    # each rollout sampled with weights at most k updates older than the trainer's, corrected by
    # vllm.importance_sampling_correction (rollout_ahead.py)
    off_policy_steps: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only the final one
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # retention
    eval_every: int = 0  # steps between evaluations on eval.split, also run at the end; 0 = no evaluation
    eval_only: bool = False  # score eval.model (or the model group's) on eval.split and exit: no training
    eval: EvalConfig = field(default_factory=EvalConfig)
    save_merged: bool = False  # LoRA: also write the merged model to <output_dir>/model_merged/
    push_to_hub: str | None = (
        None  # hub repo id to upload <output_dir>/model/ to; skipped with a message offline
    )
    # where config, checkpoints and trackio data go; Hydra fills it in when the run starts (null in --cfg output)
    output_dir: str | None = "${hydra:runtime.output_dir}"
    # auto = the newest checkpoint under output_dir/checkpoints (a fresh start if there is none),
    # or a checkpoint directory (<run>/checkpoints/step_NNNNNN) or a run directory; null = start fresh
    resume: str | None = None
    on_reward_error: OnRewardError = OnRewardError[
        "raise"
    ]  # a reward fn raises: raise = stop, skip = score None
    max_consecutive_nonfinite: int = (
        3  # non-finite updates (skipped) in a row before the run stops; 0 = never
    )
    # steps in a row in which no trained reward scored any completion before the run stops; 0 = never
    max_unscored_steps: int = 10
    watchdog_seconds: WatchdogConfig = field(default_factory=WatchdogConfig)  # per-phase time limits


def hardware_auto(field: str) -> str | None:
    """hardware=auto's value of `field`: one CUDA GPU with bf16 autocast when torch sees one, else the CPU, fp32."""
    import torch

    cuda = torch.cuda.is_available()
    choice = {"device": "cuda" if cuda else "cpu", "autocast_dtype": "bfloat16" if cuda else None}
    if field not in choice:
        raise ValueError(f"hardware_auto:{field}: choose device or autocast_dtype")
    return choice[field]


def hardware_auto_reason() -> str:
    """The log line that says what hardware=auto picked and why (and, with several GPUs, how to use them all)."""
    import torch

    if not torch.cuda.is_available():
        return (
            "hardware=auto: torch sees no CUDA GPU, so this run trains on the CPU in float32 "
            "(on a GPU machine: the CUDA build of torch, `make install-gpu`)"
        )
    count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    picked = f"hardware=auto: {name}, float32 weights with bfloat16 autocast (as hardware=1gpu)"
    if count == 1:
        return picked
    return (
        f"{picked}; {count} GPUs are visible and this run uses one of them. For all {count}: accelerate launch "
        f"--multi_gpu --num_processes {count} train.py hardware=2gpu_ddp (or hardware=2gpu_fsdp2), or vllm=server beside `make serve` on one of them (README, 'Several GPUs')"
    )


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore.

    The top-level schema types every group but `algo` and `vllm`, whose options have different
    fields: each of their YAMLs names its own schema (`/schema/algo/grpo@_here_`) at the head of
    its defaults list.
    """
    if not OmegaConf.has_resolver("hardware_auto"):
        OmegaConf.register_new_resolver("hardware_auto", hardware_auto)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, algorithm in ALGORITHMS.items():  # each entry of the algorithm table brings its own schema
        store.store(group="schema/algo", name=name, node=algorithm.schema)
    store.store(group="schema/vllm", name="off", node=EngineConfig)
    store.store(group="schema/vllm", name="colocate", node=VLLMColocateConfig)
    store.store(group="schema/vllm", name="server", node=VLLMServerConfig)
    store.store(group="schema/vllm", name="importance_sampling", node=ImportanceSamplingConfig)
