"""Every rule that spans several config fields, checked before anything loads (single fields are typed by the
schemas in config.py when Hydra composes the config). Each error names the key and a value that works."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from online_rl.algorithms import POLICY_GRADIENT, PREFERENCE
from online_rl.models import DTYPES, check_model_available
from online_rl.rewarding import reward_spec
from online_rl.tracking import PACKAGES, import_tracker_package

FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders of local files


# Counts that must be at least 1, each with a value that works (0 or less ends in an IndexError or a library's
# message that names no key, long after the run started).
AT_LEAST_ONE = {
    "max_steps": 80,
    "prompts_per_step": 8,
    "micro_batch_size": 8,
    "sampling.max_completion_length": 256,
    "data.max_prompt_length": 512,
    "eval.num_generations": 4,
}


def check_config(cfg: DictConfig) -> None:
    """All of the checks below; the run calls this first."""
    check_sizes(cfg)
    check_kv_cache_setting(cfg.vllm.get("kv_cache_memory_gib"))
    for (
        name,
        entry,
    ) in cfg.rewards.items():  # each over RewardConfig (imported later, with the data's columns)
        reward_spec(name, entry)
    check_algorithm(cfg)
    check_env(cfg)
    check_model_and_sampling(cfg)
    check_checkpoint_schedule(cfg.checkpoint_every, cfg.algo.get("num_iterations", 1))
    check_checkpoint_retention(cfg.checkpoint.keep_last)
    check_off_policy(cfg)
    check_importance_sampling(cfg.vllm)
    check_processes(cfg)
    check_data(cfg.data)
    check_eval_config(cfg)
    check_export_config(cfg)
    check_models_available(cfg)
    check_tracker_installed(cfg.logger)


def check_tracker_installed(logger: DictConfig) -> None:
    """logger=wandb or tensorboard without its package: say so before the model loads, not at the first log."""
    backend = getattr(logger.backend, "value", logger.backend)
    if backend in PACKAGES:
        import_tracker_package(backend)


def check_sizes(cfg: DictConfig) -> None:
    """Counts of at least 1, and an optimizer that can step."""
    for key, example in AT_LEAST_ONE.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"{key}={value} must be at least 1, e.g. {key}={example}")
    optim = cfg.optim
    if not optim.lr > 0:  # also NaN
        raise ValueError(
            f"optim.lr={optim.lr} must be > 0, e.g. optim.lr=1e-6 (full fine-tune) or 1e-5 (LoRA)"
        )
    for key in ("warmup_steps", "weight_decay", "max_grad_norm"):
        if optim[key] < 0:
            raise ValueError(f"optim.{key}={optim[key]} must be >= 0 (max_grad_norm=0: no clipping)")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= optim[key] < 1:
            raise ValueError(f"optim.{key}={optim[key]} must be in [0, 1), e.g. optim.{key}=0.9")


def check_kv_cache_setting(value: Any) -> None:
    """vllm.kv_cache_memory_gib: auto, null, or a positive number of GiB."""
    if value is None or value == "auto":
        return
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if isinstance(value, bool) or not size > 0:
        raise ValueError(
            f"vllm.kv_cache_memory_gib={value!r}: use auto (sized for one rollout), a number of GiB such as "
            "vllm.kv_cache_memory_gib=4, or null (vLLM sizes it from vllm.gpu_memory_utilization)"
        )


def check_algorithm(cfg: DictConfig) -> None:
    """algo=: the samples it compares, the micro-batches it trains on, its reference weight."""
    algo = cfg.algo
    if algo.name in POLICY_GRADIENT:
        if algo.num_generations < 2:
            raise ValueError(
                f"algo.num_generations={algo.num_generations}: {algo.name.upper()} compares samples of one prompt, use >= 2"
            )
        rollout_size = cfg.prompts_per_step * algo.num_generations // cfg.hardware.num_processes  # per rank
        if cfg.micro_batch_size < 1 or rollout_size % cfg.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={cfg.micro_batch_size} must divide each rank's rollout of prompts_per_step x "
                f"num_generations / hardware.num_processes = {rollout_size} completions, "
                f"e.g. micro_batch_size={math.gcd(rollout_size, max(cfg.micro_batch_size, 1))}"
            )
        if algo.name == "gspo" and algo.loss_type.value != "grpo":
            raise ValueError(
                f"algo.loss_type={algo.loss_type.value} with algo=gspo: GSPO clips one ratio per completion and "
                "averages over completions; a token-sum loss would weight each completion by its length. Use "
                "algo.loss_type=grpo (or algo=grpo for token-level ratios)"
            )
        if algo.name == "cispo" and (algo.epsilon_high <= 0 or (algo.epsilon or 0) < 0):
            raise ValueError(
                f"algo.epsilon={algo.epsilon}, algo.epsilon_high={algo.epsilon_high}: CISPO's weight is clipped "
                "into [1 - epsilon, 1 + epsilon_high], around 1; use e.g. algo.epsilon=null algo.epsilon_high=4.0"
            )
    elif algo.name in PREFERENCE:
        if cfg.micro_batch_size < 2:
            raise ValueError(
                f"micro_batch_size={cfg.micro_batch_size}: {algo.name} trains on pairs, use micro_batch_size >= 2"
            )
        if algo.beta <= 0 or (algo.beta_final is not None and algo.beta_final <= 0):
            raise ValueError(
                f"algo.beta must be > 0 for {algo.name}: it weighs the reference model in the loss"
            )
        if algo.name == "nash_md" and not 0 <= algo.mixture_coef <= 1:
            raise ValueError(f"algo.mixture_coef={algo.mixture_coef} must be in [0, 1]")
    else:
        raise ValueError(
            f"algo.name={algo.name!r} is not an algorithm of this loop: use one of {POLICY_GRADIENT + PREFERENCE}"
        )


def check_env(cfg: DictConfig) -> None:
    """env != none: a class to load, limits of at least one turn and token, a policy-gradient algorithm
    (the preference family compares two single completions), an on-policy rollout, one rank."""
    env = cfg.env
    if env.name == "none":
        return
    if not env.cls:
        raise ValueError(
            f"env.cls is empty for env.name={env.name}: name the class, e.g. env.cls=online_rl.envs.calculator.Calculator"
        )
    if cfg.algo.name not in POLICY_GRADIENT:
        raise ValueError(
            f"env={env.name} with algo={cfg.algo.name}: the preference algorithms (dpo, nash_md, xpo) do not "
            "support multi-turn environments. Use algo=grpo or algo=rloo, or env=none"
        )
    for key, example in (("max_turns", 4), ("max_tokens", 256)):
        if env[key] < 1:
            raise ValueError(f"env.{key}={env[key]} must be at least 1, e.g. env.{key}={example}")
    if cfg.off_policy_steps:
        raise ValueError(
            f"off_policy_steps={cfg.off_policy_steps} with env={env.name}: multi-turn rollouts are on-policy "
            "only; use off_policy_steps=0"
        )
    if cfg.hardware.num_processes > 1:
        raise ValueError(
            f"env={env.name} with hardware.num_processes={cfg.hardware.num_processes}: multi-turn rollouts run "
            "on one rank for now (ranks would take different numbers of turns); use hardware=1gpu or cpu"
        )
    max_model_len = cfg.vllm.get("max_model_len")
    needed = cfg.data.max_prompt_length + env.max_tokens
    if max_model_len is not None and max_model_len < needed:
        raise ValueError(
            f"vllm.max_model_len={max_model_len} is shorter than a conversation: data.max_prompt_length + "
            f"env.max_tokens = {needed}; use vllm.max_model_len={needed} (or null), or lower env.max_tokens"
        )


def check_model_and_sampling(cfg: DictConfig) -> None:
    """model.compile, sampling.temperature, LoRA's base dtype, and a CUDA device that exists."""
    if cfg.model.compile not in ("auto", True, False):
        raise ValueError(
            f"model.compile={cfg.model.compile!r}: use auto (compile on one CUDA GPU), true or false"
        )
    if cfg.sampling.temperature <= 0:
        raise ValueError(
            "sampling.temperature must be > 0: RL needs samples, and log-probs are taken at this temperature"
        )
    if cfg.model.lora.base_dtype is not None:
        if not cfg.model.lora.enabled:
            raise ValueError(
                f"model.lora.base_dtype={cfg.model.lora.base_dtype} is the frozen base's dtype under LoRA: set "
                "model.lora.enabled=true, or leave it null (the weights are then in hardware.param_dtype)"
            )
        if cfg.model.lora.base_dtype not in DTYPES:
            *others, last = DTYPES
            raise ValueError(
                f"model.lora.base_dtype={cfg.model.lora.base_dtype}: use {', '.join(others)} or {last}"
            )
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "hardware.device=cuda but torch sees no CUDA GPU: use hardware=cpu, or install the CUDA build"
        )


def check_off_policy(cfg: DictConfig) -> None:
    """off_policy_steps=k >= 1 needs an engine that generates apart from the trainer's model, and the
    correction; a policy-gradient algorithm and one training rank."""
    k = cfg.off_policy_steps
    if k < 0:
        raise ValueError(
            f"off_policy_steps={k}: use 0 (on-policy) or k >= 1 (the engine generates while the trainer trains, "
            "with weights at most k updates old), e.g. off_policy_steps=1"
        )
    if not k:
        return
    if cfg.algo.name not in POLICY_GRADIENT:
        raise ValueError(
            f"off_policy_steps={k} is for {', '.join(POLICY_GRADIENT)}: algo={cfg.algo.name} samples with the "
            "policy itself; use off_policy_steps=0"
        )
    if cfg.vllm.mode.value not in ("colocate", "server"):
        raise ValueError(
            f"off_policy_steps={k} needs vllm=colocate or vllm=server (vllm={cfg.vllm.mode.value} generates with "
            "the model being trained, so the two cannot overlap)"
        )
    if cfg.vllm.mode.value == "colocate" and cfg.vllm.sleep_level:
        # The engine generates while the trainer trains, so sleeping frees nothing for training. On the H200
        # (2026-11-30) the second rollout generated beside training with sleep mode on never finished.
        raise ValueError(
            f"off_policy_steps={k} with vllm=colocate needs vllm.sleep_level=0 (not {cfg.vllm.sleep_level}): the "
            "engine generates while the trainer trains, so it stays awake; size its memory with "
            "vllm.kv_cache_memory_gib"
        )
    if not cfg.vllm.importance_sampling_correction:
        raise ValueError(
            f"off_policy_steps={k} trains on samples up to {k} update(s) old: set "
            "vllm.importance_sampling_correction=true to correct for it"
        )
    if cfg.hardware.num_processes > 1:
        raise ValueError(
            f"off_policy_steps={k} runs on one process for now: use hardware with num_processes: 1 "
            "(e.g. hardware=1gpu), or off_policy_steps=0"
        )


def check_importance_sampling(vllm: DictConfig) -> None:
    """vllm.importance_sampling: bounds that keep a weight finite (truncate) or drop something (mask), in order."""
    if not vllm.get("importance_sampling_correction"):
        return
    bounds = vllm.importance_sampling
    low, high = bounds.min, bounds.max
    too_low, too_high = low is not None and low < 0, high is not None and high <= 0
    if too_low or too_high or (None not in (low, high) and low > high):
        raise ValueError(
            f"vllm.importance_sampling.min={low}, max={high}: the weight is a ratio of probabilities, so the bounds "
            "need 0 <= min <= max and max > 0, e.g. vllm.importance_sampling.min=null vllm.importance_sampling.max=2.0"
        )
    if bounds.mode.value == "truncate" and high is None:
        raise ValueError(
            "vllm.importance_sampling.max=null with mode=truncate leaves the weight unbounded (one token can carry "
            "the batch): set vllm.importance_sampling.max=2.0, or mode=mask to drop what exceeds a bound"
        )
    if bounds.mode.value == "mask" and low is None and high is None:
        raise ValueError(
            "vllm.importance_sampling.mode=mask with min and max null masks nothing: set "
            "vllm.importance_sampling.max=3.0 (TRL's, vllm/importance_sampling=trl)"
        )


def check_data(data: DictConfig) -> None:
    """Synthetic data or a dataset, not both (data.path would go unread, silently); a file builder needs files."""
    if data.synthetic_rows and data.path:
        raise ValueError(
            f"data.synthetic_rows={data.synthetic_rows} makes arithmetic problems in code, so data.path would "
            "not be read: for your own JSONL file use data=jsonl data.data_files=<file>, else set "
            "data.synthetic_rows=null"
        )
    if data.path in FILE_BUILDERS and not data.data_files:
        raise ValueError(
            f"data.path={data.path} reads local files, and data.data_files is empty: set it, "
            "e.g. data.data_files=my.jsonl"
        )


def check_eval_config(cfg: DictConfig) -> None:
    """eval_every and the eval group."""
    if cfg.eval_every < 0:
        raise ValueError(f"eval_every={cfg.eval_every}: use 0 (no evaluation) or a number of steps")
    num_iterations = cfg.algo.get("num_iterations", 1)
    if cfg.eval_every % num_iterations:
        raise ValueError(
            f"eval_every={cfg.eval_every} is not a multiple of algo.num_iterations={num_iterations}: evaluations "
            f"run between rollouts (a rollout spans that many steps). Use e.g. eval_every={cfg.eval_every * num_iterations}"
        )
    if cfg.eval.num_generations < 1:
        raise ValueError(f"eval.num_generations={cfg.eval.num_generations}: sample at least 1 per prompt")
    if cfg.eval.holdout_size < 1:
        raise ValueError(
            f"eval.holdout_size={cfg.eval.holdout_size}: data without eval.split evaluates on this many rows "
            "held out of data.split; use >= 1, e.g. eval.holdout_size=64"
        )
    if cfg.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size={cfg.eval.batch_size}: use >= 1 prompts per engine call")
    if cfg.eval.temperature is not None and cfg.eval.temperature <= 0:
        raise ValueError(
            f"eval.temperature={cfg.eval.temperature}: the sampled pass@k needs a temperature > 0 "
            "(greedy decoding is eval.greedy=true)"
        )
    if cfg.eval.pass_reward is not None and cfg.eval.pass_reward not in cfg.rewards:
        raise ValueError(
            f"eval.pass_reward={cfg.eval.pass_reward} is not one of the configured rewards {list(cfg.rewards)}: "
            f"add it (weight 0 logs it without training on it) or pick one of those"
        )


def check_export_config(cfg: DictConfig) -> None:
    """save_merged needs LoRA."""
    if cfg.save_merged and not cfg.model.lora.enabled:
        raise ValueError(
            "save_merged=true merges a LoRA adapter, but model.lora.enabled=false: a full fine-tune's "
            "model/ is already full weights; drop save_merged"
        )


def check_models_available(cfg: DictConfig) -> None:
    """Offline, a hub model must already be in the local cache (the config and the environment tell)."""
    if cfg.eval_only and cfg.eval.model:
        check_model_available("eval.model", cfg.eval.model)
    elif cfg.model.random_init is None:
        check_model_available("model.name_or_path", cfg.model.name_or_path)


def check_checkpoint_schedule(checkpoint_every: int, num_iterations: int) -> None:
    """A resume is exact between rollouts; with num_iterations passes per rollout, a rollout spans that many steps."""
    if checkpoint_every and checkpoint_every % num_iterations:
        raise ValueError(
            f"checkpoint_every={checkpoint_every} is not a multiple of algo.num_iterations={num_iterations}: "
            "checkpoints would fall inside a rollout, where a resume cannot continue it. "
            f"Use e.g. checkpoint_every={checkpoint_every * num_iterations}"
        )


def check_checkpoint_retention(keep_last: int | None) -> None:
    """keep_last below 1 would delete the checkpoint just written."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(
            f"checkpoint.keep_last={keep_last} would keep no checkpoint: use checkpoint.keep_last=3 (any number "
            "from 1), or checkpoint.keep_last=null to keep every checkpoint"
        )


def check_processes(cfg: DictConfig) -> None:
    """What several training processes need; nothing to check for one."""
    hardware = cfg.hardware
    if hardware.num_processes == 1:
        return
    if cfg.prompts_per_step % hardware.num_processes:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} must divide over hardware.num_processes={hardware.num_processes} "
            "ranks: each rank takes an equal share of the prompts (with all of their samples)"
        )
    if cfg.eval_only:
        raise ValueError("eval_only=true runs in one process: use hardware=cpu or hardware=1gpu")
    if hardware.strategy == "fsdp2" and cfg.model.lora.enabled:
        raise ValueError(
            "hardware.strategy=fsdp2 does not support LoRA (model.lora.enabled) yet: use a ddp hardware= "
            "option (e.g. 2gpu_ddp)"
        )
