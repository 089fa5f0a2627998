"""Everything a run needs before its first step, built in one place: `build_run(cfg) -> Run`.

The loop (loop.py) and the bench (bench/) both build through it. Each builder receives its own config group.
Order matters in two places: the seed is set before anything random is drawn, and a resume restores the RNG
states last, after setup's own draws.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler, set_seed

from online_rl import distributed
from online_rl.algorithms import make_algorithm
from online_rl.algorithms.sampler_correction import ImportanceSampling
from online_rl.checkpoint import (
    prepare_output_dir,
    prune_checkpoints,
    rng_states,
    save_checkpoint,
    save_sharded_checkpoint,
)
from online_rl.config import hardware_auto_reason
from online_rl.data import (
    PromptSampler,
    check_prompt_budget,
    load_prompts,
    tokenizer_corpus,
    training_and_eval_prompts,
)
from online_rl.engines import SaveWhenUnavailable, make_engine, resolve_mode, share_gpu_with_engines
from online_rl.evaluation import Evaluator
from online_rl.gc_clock import CollectorClock
from online_rl.generation import RolloutSource, engine_samples
from online_rl.guards import NonFiniteGuard
from online_rl.interrupts import StopOnSignal
from online_rl.models import (
    compiled_for_training,
    frozen_copy,
    is_lora,
    load_policy,
    load_tokenizer,
    load_trained_model,
    resolve_model_path,
    torch_dtype,
)
from online_rl.multiturn import Episodes, environment_reward
from online_rl.redaction import redact_hydra_outputs, redact_override, redacted_container, save_config
from online_rl.resume import (
    check_checkpoint_fits_sharding,
    find_checkpoint,
    is_sharded_checkpoint,
    load_sharded_state,
    load_weights,
    resume_training,
)
from online_rl.reward_model import RewardModel
from online_rl.rewarding import RewardFunction, UnscoredRewards, load_reward_functions
from online_rl.tracking import ConsoleOnlyTracker, make_tracker
from online_rl.watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run ready for its first step. `step` counts optimizer steps (a resumed run starts at its checkpoint's)."""

    output_dir: Path
    metrics_path: Path  # metrics.jsonl (rank 0; os.devnull on other ranks)
    is_main: bool
    device: torch.device
    autocast_dtype: torch.dtype | None
    algorithm: Any  # the algorithm table's entry (algorithms/__init__.py)
    tokenizer: Any
    model: torch.nn.Module  # the trained weights
    reference: torch.nn.Module | None  # frozen copy; None when beta = 0 or under LoRA (adapters off)
    policy: torch.nn.Module  # what the training passes call: model wrapped (DDP, FSDP2) and compiled
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rollouts: RolloutSource  # prompts -> weights pushed -> samples
    reward_functions: list
    reward_model: RewardModel | None
    tracker: Any
    evaluator: Evaluator | None
    watchdog: Watchdog
    stop: StopOnSignal
    nonfinite: NonFiniteGuard
    collector: CollectorClock | None  # logger.lab_metrics: Python's garbage collector per step
    unscored: UnscoredRewards  # rewards that score no completion of a step: warned, counted, stopped
    config: dict  # the resolved config, secrets redacted: what the tracker and the model card record
    step: int = 0
    first_step: int = 1  # this process's first step (a resumed run: the one after its checkpoint)
    keep_last: int | None = None  # checkpoint.keep_last: checkpoints kept (null: all)
    resumed_from: Path | None = None  # the checkpoint this run started from: never deleted
    micro_batch_rows: int = (
        0  # build_run: micro_batch_size; halved whenever a step's passes run out of GPU memory
    )

    def checkpoint(self) -> Path:
        """Save the run at its current step (output_dir/checkpoints/step_NNNNNN, written atomically), then
        delete the checkpoints past checkpoint.keep_last. Every rank calls it: each saves its RNG states, and
        under FSDP2 its own shards of the model and optimizer (torch.distributed.checkpoint)."""
        root = self.output_dir / "checkpoints"
        with self.watchdog.phase("checkpoint"):
            state = {
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.rollouts.sampler_state(),
                "rng_ranks": distributed.from_every_rank(rng_states()),  # each rank samples with its own
            }
            if distributed.is_sharded(self.model):
                written = save_sharded_checkpoint(
                    root, self.step, self.model, self.optimizer, self.tokenizer, state
                )
            else:
                state["optimizer"] = self.optimizer.state_dict()
                written = distributed.on_main(
                    lambda: save_checkpoint(root, self.step, self.model, self.tokenizer, state)
                )
            distributed.on_main(lambda: prune_checkpoints(root, self.keep_last, written, self.resumed_from))
            return written


def run_directory(cfg: DictConfig) -> tuple[Path, str, Path]:
    """(output dir, run name, tracking dir: where the tracker's files go). A Hydra sweep's jobs share the sweep's
    directory, so their runs sit side by side in one dashboard."""
    output_dir = Path(cfg.output_dir)
    run_name, tracking_dir = output_dir.name, output_dir
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        run_name = redact_override(hydra_cfg.job.override_dirname) or run_name
        if hydra_cfg.mode == RunMode.MULTIRUN:
            tracking_dir = Path(hydra_cfg.sweep.dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        pass
    return output_dir, run_name, tracking_dir


def prepare_outputs(cfg: DictConfig, is_main: bool = True) -> tuple[Path, str, Path]:
    """Rank 0's output directory, with the resolved config (secrets redacted); (dir, run name, tracking dir)."""
    output_dir, run_name, tracking_dir = distributed.from_main(run_directory(cfg))
    if is_main:
        prepare_output_dir(output_dir)
        redact_hydra_outputs(output_dir)
        save_config(cfg, output_dir / "config_resolved.yaml")
        if OmegaConf.is_interpolation(cfg.hardware, "device"):  # hardware=auto: say what it picked and why
            log.info(hardware_auto_reason())
    distributed.barrier()
    return output_dir, run_name, tracking_dir


def importance_sampling(vllm: DictConfig) -> ImportanceSampling | None:
    """The sampler correction the vllm group asks for; None without one (vllm=off, or the correction off)."""
    if not vllm.get("importance_sampling_correction"):
        return None
    bounds = vllm.importance_sampling
    return ImportanceSampling(bounds.level.value, bounds.mode.value, bounds.min, bounds.max)


def open_tracker(
    logger_cfg: Any, run_name: str, tracking_dir: Path, config: dict, closing: ExitStack, is_main: bool = True
):
    """Rank 0's tracker (the others log to the console only), closed with `closing`; logs its dashboard."""
    tracker = make_tracker(logger_cfg, run_name, tracking_dir, config) if is_main else ConsoleOnlyTracker()
    closing.callback(tracker.close)
    dashboard = tracker.dashboard_command()
    if dashboard:
        log.info("Dashboard: %s", dashboard)
    return tracker


def build_run(cfg: DictConfig, closing: ExitStack) -> Run:
    """Data, model, reference, optimizer, engine, rewards, tracker, evaluator: the run at its first step.
    What must be undone whatever happens (engine, tracker, signal handlers, watchdog) goes on `closing`."""
    share_gpu_with_engines(cfg.vllm)  # (vllm.trainer_sm_percent) before the first CUDA call
    ranks = distributed.setup(cfg.hardware)  # one process: rank 0 of 1, and every distributed.* is a no-op
    closing.callback(distributed.teardown)
    output_dir, run_name, tracking_dir = prepare_outputs(cfg, ranks.is_main)
    # SIGINT/SIGTERM: finish the step, checkpoint, exit; a phase past its limit fails with every stack
    stop = closing.enter_context(StopOnSignal(output_dir))
    watchdog = closing.enter_context(Watchdog(cfg.watchdog_seconds))
    collector = closing.enter_context(CollectorClock()) if cfg.logger.lab_metrics else None
    checkpoint = find_checkpoint(cfg.resume, output_dir)  # resume=auto|<path>|null
    set_seed(cfg.seed)  # python, numpy, torch and CUDA
    device = ranks.device
    autocast_dtype = torch_dtype(cfg.hardware.autocast_dtype)
    algorithm = make_algorithm(cfg.algo, cfg.sampling.max_completion_length, importance_sampling(cfg.vllm))

    dataset = load_prompts(cfg.data)
    # before any model loads: a reward that wants a column the data lacks stops the run here
    reward_functions = rewards_and_environment(cfg, dataset.column_names)
    training_rows, eval_prompts = dataset, None
    if cfg.eval_every:  # data without eval.split: the eval rows are held out of data.split, not trained on
        training_rows, eval_prompts = training_and_eval_prompts(
            dataset, cfg.data, cfg.eval, cfg.prompts_per_step
        )
    # all of data.split, eval rows too: a random model's tokenizer is the same with evaluation and without
    corpus = tokenizer_corpus(dataset, cfg.data.system_prompt)
    model_path = distributed.on_main(lambda: resolve_model_path(cfg.model, corpus, output_dir))
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    check_prompt_budget(tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length)
    sampler = PromptSampler(training_rows, cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle)
    model = load_policy(model_path, cfg.model, torch_dtype(cfg.hardware.param_dtype), device, autocast_dtype)
    model.train()
    # beta = 0 needs no reference; under LoRA the reference is the same model with its adapters off.
    reference = frozen_copy(model) if algorithm.needs_ref_logp and not is_lora(model) else None
    if checkpoint is not None:  # resume: the checkpoint's weights; a reference model stays the initial one
        check_checkpoint_fits_sharding(
            checkpoint, cfg.hardware.strategy.value == "fsdp2" and ranks.world_size > 1
        )
        if not is_sharded_checkpoint(checkpoint):  # FSDP2's: into the sharded model, with its optimizer
            load_weights(model, checkpoint)
    # DDP: a wrapper of model; FSDP2: model itself, sharded; compiled with model.compile
    policy = compiled_for_training(
        distributed.wrap_policy(model, cfg.hardware.strategy.value, ranks),
        cfg.model,
        device,
        ranks.world_size,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, cfg.optim, cfg.max_steps, device)
    if checkpoint is not None and is_sharded_checkpoint(checkpoint):
        load_sharded_state(checkpoint, model, optimizer)  # each rank reads its own shards

    engine = make_engine(
        resolve_mode(cfg.vllm.mode.value, device),
        cfg.vllm,
        model,
        model_path,
        tokenizer,
        device=device,
        autocast_dtype=autocast_dtype,
        seed=cfg.seed + ranks.rank,
        max_model_len=cfg.data.max_prompt_length + completion_budget(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        sequences_per_call=sequences_per_call(cfg, algorithm, ranks.world_size),
    )
    # an engine lost mid-run (a server down) stops the run with a checkpoint
    engine = SaveWhenUnavailable(engine, lambda: run.checkpoint())
    closing.callback(engine.close)
    episodes = (
        None
        if cfg.env.name == "none"
        else Episodes(cfg.env, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length)
    )
    rollouts = RolloutSource(
        engine, sampler, tokenizer, model, reference, watchdog, algorithm, cfg.data, cfg.sampling,
        off_policy_steps=cfg.off_policy_steps, lab_metrics=cfg.logger.lab_metrics,
        device=device, autocast_dtype=autocast_dtype, episodes=episodes,
    )  # fmt: skip
    closing.callback(rollouts.close)  # before the engine closes (callbacks run last-in, first-out)
    reward_model = None
    if cfg.algo.get("reward_model"):  # the preference family may rank its pairs with a model
        reward_model = RewardModel(
            cfg.algo.reward_model,
            device,
            autocast_dtype,
            cfg.model.trust_remote_code,
            cfg.algo.reward_model_batch_size,
        )
        closing.callback(reward_model.close)
    config = redacted_container(cfg)
    tracker = open_tracker(cfg.logger, run_name, tracking_dir, config, closing, ranks.is_main)
    metrics_path = output_dir / "metrics.jsonl" if ranks.is_main else Path(os.devnull)
    evaluator = (
        Evaluator(
            cfg.eval,
            cfg.data,
            eval_prompts,
            cfg.sampling,
            engine,
            tokenizer,
            reward_functions,
            tracker,
            metrics_path,
            device,
            episodes,
        )
        if cfg.eval_every
        else None
    )
    log.info(
        "%s on %s: %d trainable parameters, %d prompts x %d samples per rollout, %d steps; outputs in %s",
        cfg.algo.name,
        model_path,
        sum(p.numel() for p in trainable),
        cfg.prompts_per_step,
        algorithm.samples_per_prompt,
        cfg.max_steps,
        output_dir,
    )
    run = Run(
        output_dir, metrics_path, ranks.is_main, device, autocast_dtype, algorithm,
        tokenizer, model, reference, policy, trainable, optimizer, scheduler,
        rollouts, reward_functions, reward_model, tracker, evaluator,
        watchdog, stop, NonFiniteGuard(cfg.max_consecutive_nonfinite), collector,
        UnscoredRewards(reward_functions, cfg.max_unscored_steps), config,
    )  # fmt: skip
    # Last before the first step: a resume restores the RNG states here, after setup's random draws.
    run.keep_last, run.resumed_from = cfg.checkpoint.keep_last, checkpoint
    run.micro_batch_rows = cfg.micro_batch_size
    if checkpoint is not None:  # each rank's RNG states as they were (or, from an older checkpoint, reseeded)
        run.step = resume_training(
            checkpoint, optimizer, scheduler, sampler, cfg.max_steps, output_dir, cfg.seed
        )
        run.first_step = run.step + 1
    else:
        distributed.seed_ranks(cfg.seed, 0)  # several ranks: each samples with a seed of its own
    return run


@dataclass
class EvalOnly:
    """`eval_only=true`: a model scored on eval.split with the configured engine; no optimizer, no reference."""

    output_dir: Path
    model_path: str
    model: torch.nn.Module
    evaluator: Evaluator

    def run(self) -> dict[str, float]:
        """Score the model, write eval.json beside the run's metrics, and return the metrics."""
        log.info("Scoring %s on the evaluation set (eval_only)", self.model_path)
        metrics = self.evaluator.run(self.model, step=0)
        path = self.output_dir / "eval.json"
        path.write_text(json.dumps({"model": str(self.model_path), **metrics}, indent=2) + "\n")
        log.info("Scores in %s", path)
        return metrics


def build_eval_only(cfg: DictConfig, closing: ExitStack) -> EvalOnly:
    """eval.model (or the model group's), its tokenizer, an engine, the rewards and a tracker; the engine and
    tracker close with `closing`."""
    output_dir, run_name, tracking_dir = prepare_outputs(cfg)
    set_seed(cfg.seed)
    device = torch.device(cfg.hardware.device)
    dataset = load_prompts(cfg.data)
    reward_functions = rewards_and_environment(cfg, dataset.column_names)
    # the rows a training run on this config evaluates on (held out of data.split when it has no eval.split)
    _, eval_prompts = training_and_eval_prompts(dataset, cfg.data, cfg.eval, cfg.prompts_per_step)
    model_path = cfg.eval.model
    if not model_path:
        model_path = resolve_model_path(
            cfg.model, tokenizer_corpus(dataset, cfg.data.system_prompt), output_dir
        )
    model, base_path = load_trained_model(
        model_path, cfg.model, torch_dtype(cfg.hardware.param_dtype), device
    )
    # a LoRA checkpoint holds the tokenizer beside its adapter; a bare adapter uses its base model's
    has_tokenizer = Path(model_path, "tokenizer_config.json").exists() or not Path(model_path).exists()
    tokenizer = load_tokenizer(model_path if has_tokenizer else base_path, cfg.model.trust_remote_code)
    engine = make_engine(
        resolve_mode(cfg.vllm.mode.value, device),
        cfg.vllm,
        model,
        base_path,  # vLLM loads the base of a LoRA model; sync_weights then pushes the adapted weights
        tokenizer,
        device=device,
        autocast_dtype=torch_dtype(cfg.hardware.autocast_dtype),
        seed=cfg.seed,
        max_model_len=cfg.data.max_prompt_length + completion_budget(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        sequences_per_call=cfg.eval.batch_size * cfg.eval.num_generations,
    )
    closing.callback(engine.close)
    tracker = open_tracker(cfg.logger, run_name, tracking_dir, redacted_container(cfg), closing)
    evaluator = Evaluator(
        cfg.eval,
        cfg.data,
        eval_prompts,
        cfg.sampling,
        engine,
        tokenizer,
        reward_functions,
        tracker,
        output_dir / "metrics.jsonl",
        device,
        None
        if cfg.env.name == "none"
        else Episodes(cfg.env, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length),
    )
    return EvalOnly(output_dir, model_path, model, evaluator)


def sequences_per_call(cfg: DictConfig, algorithm, world_size: int) -> int:
    """The most sequences one generate call on this rank holds: its share of a rollout (G samples of each
    prompt; Nash-MD and XPO draw one, the mixture the other), or an evaluation batch's samples."""
    rollout = math.ceil(cfg.prompts_per_step / world_size) * engine_samples(algorithm)
    return max(rollout, cfg.eval.batch_size * cfg.eval.num_generations if cfg.eval_every else 0)


def completion_budget(cfg: DictConfig) -> int:
    """Tokens after the prompt: one completion's, or (env != none) a whole conversation's."""
    return cfg.sampling.max_completion_length if cfg.env.name == "none" else cfg.env.max_tokens


def rewards_and_environment(cfg: DictConfig, dataset_columns: list[str]) -> list[RewardFunction]:
    """The reward functions, checked against the dataset's columns, and (env != none) the environment's
    reward as one more, named env.name."""
    if cfg.env.name == "none":
        return load_reward_functions(cfg.rewards, cfg.on_reward_error.value, dataset_columns)
    functions = (
        load_reward_functions(cfg.rewards, cfg.on_reward_error.value, dataset_columns) if cfg.rewards else []
    )
    return [
        *functions,
        RewardFunction(cfg.env.name, environment_reward, cfg.env.weight, cfg.on_reward_error.value),
    ]


def make_optimizer(trainable: list[torch.nn.Parameter], optim: Any, max_steps: int, device: torch.device):
    """AdamW over the trainable parameters and its learning-rate schedule."""
    optimizer = torch.optim.AdamW(
        trainable,
        lr=optim.lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.weight_decay,
        fused=device.type == "cuda",  # one kernel over all parameters instead of a loop of them
    )
    scheduler = get_scheduler(
        # transformers' "constant" ignores num_warmup_steps; its warmup twin honours them
        "constant_with_warmup" if optim.lr_scheduler.value == "constant" else optim.lr_scheduler.value,
        optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=max_steps,
    )
    return optimizer, scheduler
