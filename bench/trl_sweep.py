"""TRL's GRPOTrainer in the bench: one trainer's run (train_trl), and TRL at its best (run_trl_tuned): its anchor,
then the candidates of `--set trl_sweep=...`, all in one process, the fastest kept.

Every candidate trains the same step: the same 128 completions per optimizer step (per-device batch x
gradient accumulation), TRL's defaults otherwise (beta 0, one iteration, DAPO's loss, steps_per_generation =
accumulation, so one generation of all completions per step). What a candidate may change, read from TRL 1.16's
GRPOConfig, each leaving the algorithm alone:
- per_device_train_batch_size (8 in the anchor, the notebook's) with gradient_accumulation_steps = 128 / it;
- gradient_checkpointing (on by default in TRL's GRPOConfig): recomputes activations, saving memory;
- torch_compile: the model compiled for training (the first steps compile);
- use_liger_kernel: Liger's layer kernels (only where liger_kernel is installed: it is not in our bundle);
- LoRA: model_init_kwargs dtype bfloat16 for the frozen base (TRL loads fp32 by default; under bf16 autocast
  its matmuls run in bf16 either way, while the adapters stay fp32).
Left out, with why: vllm_gpu_memory_utilization and vllm_enable_sleep_mode (each asks for another vLLM engine,
and a process holds one; sleep mode saves memory, not time), steps_per_generation, num_iterations, beta,
loss_type (the algorithm), cast_lm_head_to_fp32 (precision, off by default), ds3_gather_for_generation and
vllm_tensor_parallel_size (DeepSpeed ZeRO-3 and several GPUs).

The candidates share TRL's one vLLM engine (one_vllm_engine): each would ask for the same one (its max_num_seqs
is batch x accumulation, the step's completions), and building a second in one process fails.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from bench.settings import Settings

FLAGS = ("gc", "compile", "liger", "bf16base")


@dataclass(frozen=True)
class Candidate:
    """One TRL configuration of the step: the per-device batch (accumulation covers the rest) and its flags."""

    batch: int
    gradient_checkpointing: bool
    compile: bool = False
    liger: bool = False
    bf16_base: bool = False

    @property
    def name(self) -> str:
        flags = [("gc", self.gradient_checkpointing), ("compile", self.compile), ("liger", self.liger)]
        flags.append(("bf16base", self.bf16_base))
        return ":".join([str(self.batch), *(flag for flag, on in flags if on)])


def anchor_candidate(settings: Settings) -> Candidate:
    """TRL's anchor: the notebook's per-device batch, TRL's defaults (gradient checkpointing on in 1.16)."""
    return Candidate(settings.micro_batch_size, gradient_checkpointing=True)


def parse_candidate(spec: str, measured: list[dict]) -> Candidate:
    """`BATCH[:FLAG...]` as a Candidate; `best` as BATCH is the fastest of `measured` so far (records with
    `candidate` and `median_step_s`), its flags joined by the spec's."""
    batch, *flags = spec.split(":")
    unknown = [flag for flag in flags if flag not in FLAGS]
    if unknown:
        raise ValueError(f"trl_sweep candidate {spec!r}: unknown flags {unknown}; flags: {', '.join(FLAGS)}")
    chosen = {
        "gradient_checkpointing": "gc" in flags,
        "compile": "compile" in flags,
        "liger": "liger" in flags,
        "bf16_base": "bf16base" in flags,
    }
    if batch != "best":
        return Candidate(int(batch), **chosen)
    best = fastest(measured)
    if best is None:
        raise ValueError(f"trl_sweep candidate {spec!r}: no candidate before it ran")
    base = best["candidate"]
    return replace(base, **{key: value or getattr(base, key) for key, value in chosen.items()})


def fastest(measured: list[dict]) -> dict | None:
    """The record with the lowest median step among those that ran (None: none did)."""
    ran = [record for record in measured if record.get("median_step_s") is not None]
    return min(ran, key=lambda record: record["median_step_s"], default=None)


def accumulation(settings: Settings, batch: int) -> int:
    """Gradient accumulation steps that keep the step's completions at `batch` per micro-batch."""
    completions = settings.prompts_per_step * settings.num_generations
    if batch <= 0 or completions % batch:
        raise ValueError(
            f"a per-device batch of {batch} does not divide the step's {completions} completions"
        )
    return completions // batch


def grpo_arguments(settings: Settings, candidate: Candidate, steps: int, output_dir: Path) -> dict:
    """GRPOConfig's keyword arguments for `steps` steps of the bench's run with this candidate (everything
    else TRL's defaults)."""
    arguments = {
        "output_dir": str(output_dir),
        "learning_rate": settings.lr,
        "per_device_train_batch_size": candidate.batch,
        "gradient_accumulation_steps": accumulation(settings, candidate.batch),
        "gradient_checkpointing": candidate.gradient_checkpointing,
        "num_generations": settings.num_generations,
        "max_completion_length": settings.completion_tokens,
        "max_steps": steps,
        "use_vllm": settings.use_vllm,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": settings.gpu_memory_utilization,
        "vllm_max_model_length": settings.prompt_tokens + settings.completion_tokens,
        "bf16": settings.device == "cuda",
        "use_cpu": settings.device == "cpu",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": settings.seed,
    }
    if candidate.compile:
        arguments["torch_compile"] = True
    if candidate.liger:
        arguments["use_liger_kernel"] = True
    if candidate.bf16_base:
        arguments["model_init_kwargs"] = {"dtype": "bfloat16"}
    return arguments


def trl_command(arguments: dict, settings: Settings, lora: bool) -> str:
    """The TRL call a run makes, as one line of Python (the model and prompts: the bench's)."""
    shown = {key: value for key, value in arguments.items() if key != "output_dir"}
    peft = ""
    if lora:
        peft = (
            f", peft_config=LoraConfig(r={settings.lora_r}, lora_alpha={settings.lora_alpha}, "
            f"target_modules={list(settings.lora_targets)}, task_type='CAUSAL_LM')"
        )
    return (
        "GRPOTrainer(model=MODEL_DIR, reward_funcs=[digit_fraction], "
        f"args=GRPOConfig(**{json.dumps(shown)}), train_dataset=PROMPTS{peft})"
    )


class PhaseClock:
    """Seconds spent inside wrapped calls, per phase, read per step as differences of running totals."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def timed(self, phase: str, function):
        self.totals.setdefault(phase, 0.0)

        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[phase] += time.perf_counter() - started

        return wrapped


def train_trl(
    settings: Settings,
    lora: bool,
    model_dir: Path,
    prompts: Path,
    output_dir: Path,
    candidate: Candidate,
    steps: int,
) -> dict:
    """One GRPOTrainer run of `steps` steps: per step its seconds, of them generation and weight sync
    (TRL's `_generate_single_turn` and `sync_weights`, sync inside generation), completion tokens; the
    trainer process's torch peak memory (vLLM's engine included: without sleep mode it allocates through
    torch); the GRPOConfig arguments."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from online_rl.rewards.digits import digit_fraction  # TRL calls it by keyword, as our loop does

    if candidate.liger:
        import liger_kernel  # noqa: F401  (an ImportError says this machine cannot run the candidate)

    clock = PhaseClock()

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.ends = [(time.perf_counter(), dict(clock.totals))]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), dict(clock.totals)))

    arguments = grpo_arguments(settings, candidate, steps, output_dir)
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
    cuda = settings.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepEnds()
    grpo = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[digit_fraction],
        args=GRPOConfig(**arguments),
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[timer],
    )
    try:
        grpo._generate_single_turn = clock.timed("generate", grpo._generate_single_turn)
        if grpo.use_vllm:
            grpo.vllm_generation.sync_weights = clock.timed("sync", grpo.vllm_generation.sync_weights)
        grpo.train()
        lengths = [
            entry["completions/mean_length"]
            for entry in grpo.state.log_history
            if "completions/mean_length" in entry
        ]
        rewards = [entry["reward"] for entry in grpo.state.log_history if "reward" in entry]
    finally:  # the next candidate needs this one's memory
        grpo.accelerator.free_memory()
        del grpo
    spans = [
        (end - start, {key: totals[key] - before.get(key, 0.0) for key in totals})
        for (start, before), (end, totals) in zip(timer.ends, timer.ends[1:])
    ]
    completions = settings.prompts_per_step * settings.num_generations
    return {
        "step_s": [seconds for seconds, _ in spans],
        "generate_s": [phases.get("generate", 0.0) - phases.get("sync", 0.0) for _, phases in spans],
        "sync_s": [phases.get("sync", 0.0) for _, phases in spans],
        "completion_tokens": [length * completions for length in lengths],
        "reward_mean": rewards,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        # vLLM's share: TRL's engine takes this fraction of the device at its start and keeps it (no sleep mode)
        "vllm_gib": settings.gpu_memory_utilization * torch.cuda.mem_get_info()[1] / 2**30
        if cuda and settings.use_vllm
        else None,
        "arguments": arguments,
    }


def measured_part(run: dict, warmup: int) -> dict:
    """A run's per-step lists after its warm-up, the rest as it was."""
    per_step = ("step_s", "generate_s", "sync_s", "completion_tokens")
    return {**run, **{key: run[key][warmup:] for key in per_step}}


@contextmanager
def one_vllm_engine():
    """TRL's GRPOTrainers built in here share the first one's vLLM engine (each asks for the same one)."""
    try:
        import trl.generation.vllm_generation as generation
    except ImportError:  # no vLLM here: no engine to share
        yield
        return
    build = getattr(generation, "LLM", None)
    if build is None:
        yield
        return
    engines: dict[str, object] = {}

    def shared(**kwargs):
        key = json.dumps(kwargs, sort_keys=True, default=str)
        if key not in engines:
            if engines:
                raise RuntimeError(
                    f"a TRL candidate asks for another vLLM engine ({kwargs}); a process holds one"
                )
            engines[key] = build(**kwargs)
        return engines[key]

    generation.LLM = shared
    try:
        yield
    finally:
        generation.LLM = build


@contextmanager
def rank_environment_restored():
    """The rank variables as they were before: TRL's engine sets RANK, LOCAL_RANK and WORLD_SIZE (and
    MASTER_ADDR, MASTER_PORT), and a later trainer's arguments that find LOCAL_RANK set train in
    DistributedDataParallel, one rank or not (seen on the CPU: an extra autograd traversal every step)."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_candidate(
    settings: Settings, lora: bool, paths: tuple, candidate: Candidate, warmup: int, measured: int
):
    """One candidate, measured: its record (name, arguments, measured steps, median, peaks), or why it did not
    run (out of GPU memory, a kernel library missing, a failed compile): the sweep goes on without it."""
    import torch

    model_dir, prompts, output_dir = paths
    record: dict = {"candidate": candidate, "name": candidate.name, "warmup_steps": warmup}
    try:
        with rank_environment_restored():
            run = train_trl(settings, lora, model_dir, prompts, output_dir, candidate, warmup + measured)
    # one candidate that fails (memory, a compile, a kernel library) ends only itself; cuBLAS and NCCL say
    # "out of memory" in a RuntimeError, torch's allocator raises OutOfMemoryError
    except Exception as error:
        memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        record["error"] = f"{'OutOfMemoryError' if memory else type(error).__name__}: {str(error)[:300]}"
        traceback.print_exc()
        return record
    finally:
        gc.collect()
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    part = measured_part(run, warmup)
    record.update(part)
    record["warmup_s"] = run["step_s"][:warmup]
    record["median_step_s"] = statistics.median(part["step_s"])
    return record


def sweep(settings: Settings, lora: bool, paths: tuple, progress: Path | None = None) -> list[dict]:
    """TRL's anchor (the notebook's batch of 8, TRL's defaults) over the bench's warm-up and measured steps, then
    each candidate of settings.trl_sweep over the sweep's steps; a candidate without gradient checkpointing that
    runs out of memory runs again with it. Every record is written to `progress` as it comes."""
    anchor = anchor_candidate(settings)
    records = []

    def keep(record: dict) -> None:
        record["anchor"] = not records
        records.append(record)
        print(f"trl sweep: {record['name']}: {record.get('median_step_s', record.get('error'))}", flush=True)
        if progress is not None:
            progress.write_text(json.dumps(sweep_records(records), indent=1))

    with one_vllm_engine():
        keep(run_candidate(settings, lora, paths, anchor, settings.warmup_steps, settings.measured_steps))
        steps = (settings.sweep_warmup_steps, settings.sweep_measured_steps)
        for spec in settings.trl_sweep:
            candidate = parse_candidate(spec, records)
            if any(record["candidate"] == candidate for record in records):
                continue  # (`best` with flags it already has: measured)
            record = run_candidate(settings, lora, paths, candidate, *steps)
            keep(record)
            if "OutOfMemoryError" in record.get("error", "") and not candidate.gradient_checkpointing:
                keep(
                    run_candidate(
                        settings, lora, paths, replace(candidate, gradient_checkpointing=True), *steps
                    )
                )
    return records


def sweep_records(records: list[dict]) -> list[dict]:
    """The records as JSON: the candidate by its name."""
    return [{key: value for key, value in record.items() if key != "candidate"} for record in records]


def run_trl_tuned(settings: Settings, lora: bool, model_dir: Path, prompts: Path, output_dir: Path) -> dict:
    """TRL at its best: the fastest record of the sweep as the arm's steps, every record beside it (the
    anchor's first)."""
    records = sweep(settings, lora, (model_dir, prompts, output_dir), sweep_path(output_dir))
    tuned = tuned_result(sweep_records(records))
    if tuned is None:
        raise RuntimeError(f"no TRL candidate ran: {[record.get('error') for record in records]}")
    return tuned


def sweep_path(output_dir: Path) -> Path:
    """Where a sweep writes its records as they come (<workdir>/<arm>.sweep.json)."""
    return output_dir.with_suffix(".sweep.json")


def tuned_result(records: list[dict]) -> dict | None:
    """The arm's raw result from the sweep's records (as JSON): the fastest's steps, its name, every record;
    None where none ran."""
    best = fastest(records)
    if best is None:
        return None
    return {**best, "tuned": best["name"], "sweep": records}
