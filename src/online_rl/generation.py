"""Where each step's rollout comes from: prompts drawn, the trainer's weights pushed to the engine, samples.

On-policy (off_policy_steps=0) a step pushes the current weights, then generates. With off_policy_steps=k the
engine keeps generating in the background while the trainer trains (rollout_ahead.py): each step takes the
oldest rollout generated, sampled with weights at most k updates older than the trainer's, and draws the
prompts of the ones to come. Nash-MD and XPO draw the second sample of each pair from the policy/reference
mixture.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from online_rl import distributed
from online_rl.cpu_clock import CpuUse
from online_rl.data import tokenize_prompts
from online_rl.engines import Rollout, eos_token_ids, sample_geometric_mixture
from online_rl.multiturn import Episodes
from online_rl.rollout_ahead import PendingRollout, RolloutsAhead, first_updates_to_draw


@dataclass
class Generated:
    rows: list[dict[str, Any]]  # the dataset rows of this step's prompts (this rank's share)
    prompt_ids: list[list[int]]
    rollout: Rollout  # prompt-major; Nash-MD, XPO: [engine's, mixture's] sample of each prompt in turn
    from_engine: list[bool]  # rows the engine sampled (its log-probs are in the rollout)
    generate_s: float
    sync_s: float
    # the trainer's updates minus those of the weights that sampled it (0: on-policy, the sync check applies)
    staleness: int
    memory: dict[str, float]  # GPU memory after generating (a sleeping engine is asleep again)

    @property
    def on_policy(self) -> bool:
        return self.staleness == 0


def engine_samples(algorithm) -> int:
    """Samples of each prompt the engine draws: G; Nash-MD and XPO one (the second from the mixture)."""
    return 1 if algorithm.second_sample_coef is not None else algorithm.samples_per_prompt


class RolloutSource:
    """Each step's prompts and samples, on-policy or up to `off_policy_steps` updates behind the trainer."""

    def __init__(
        self, engine, sampler, tokenizer, model, reference, watchdog, algorithm, data_cfg, sampling,
        *, off_policy_steps: int, lab_metrics: bool, device: torch.device, autocast_dtype: torch.dtype | None,
        episodes: Episodes | None = None,
    ):  # fmt: skip
        self.engine, self.sampler, self.tokenizer = engine, sampler, tokenizer
        self.model, self.reference, self.watchdog = model, reference, watchdog
        self.data, self.sampling, self.lab_metrics = data_cfg, sampling, lab_metrics
        self.device, self.autocast_dtype = device, autocast_dtype
        self.episodes = episodes  # env != none: each sample a conversation with an environment (multiturn.py)
        self.second_sample_coef = algorithm.second_sample_coef
        self.engine_samples = engine_samples(algorithm)
        self.updates_per_rollout = algorithm.passes
        # the engine is only ever used by one thread at a time (see rollout_ahead.py)
        self.ahead = (
            RolloutsAhead(engine.engine, model, device, off_policy_steps, self.engine_samples, sampling)
            if off_policy_steps
            else None
        )

    def draw_prompts(self) -> tuple[list[dict], list[list[int]]]:
        """The next batch's rows (this rank's share of the same global batch on every rank) and token ids."""
        rows = distributed.my_share(self.sampler.next_batch())
        questions = [row["prompt"] for row in rows]
        return rows, tokenize_prompts(
            self.tokenizer, questions, self.data.system_prompt, self.data.max_prompt_length
        )

    def next(self, step: int, max_steps: int) -> Generated:
        """This step's rollout (the trainer has made `step` updates); off-policy, also the prompts of those
        to come, drawn now so that the generating thread can start on them."""
        if self.ahead is not None and self.ahead.queued:  # generated while the trainer trained
            self.watchdog.start("generate")
            started = time.perf_counter()
            pending, sampled = self.engine.guarded(self.ahead.take)
            rows, prompt_ids, rollout = pending.rows, pending.prompt_ids, sampled.rollout
            rollout.stats["time/wait_generate_s"] = time.perf_counter() - started
            generate_s, sync_s, sampled_with = sampled.generate_s, sampled.push_s, sampled.weights_version
        else:  # on-policy; off-policy, the first rollout (nothing in flight yet)
            rows, prompt_ids = self.draw_prompts()
            sync_s = self.push_weights()
            self.watchdog.start("generate")
            started = time.perf_counter()
            with CpuUse() if self.lab_metrics else contextlib.nullcontext() as cpu:
                rollout, prompt_ids = self.generate(rows, prompt_ids)
            generate_s, sampled_with = time.perf_counter() - started, step
            if (
                cpu is not None
            ):  # this thread's CPU seconds in it, and the host's steal from every CPU meanwhile
                rollout.stats["time/generate_cpu_s"] = cpu.thread_s
                if cpu.steal_s is not None:
                    rollout.stats["time/generate_steal_s"] = cpu.steal_s
            if self.ahead is not None:
                self.ahead.engine_holds(step)
        memory = gpu_memory_metrics(self.device)
        if self.ahead is not None:
            for first_update in first_updates_to_draw(
                step, self.ahead.queued, self.ahead.max_staleness, self.updates_per_rollout, max_steps
            ):
                sampler_state = self.sampler.state_dict()
                next_rows, next_prompt_ids = self.draw_prompts()
                self.ahead.add(PendingRollout(next_rows, next_prompt_ids, sampler_state, first_update))
        from_engine = [True] * len(rollout.completion_ids)
        if self.second_sample_coef is not None:
            rollout, from_engine = self.with_mixture_samples(rollout, prompt_ids)
        staleness = step - sampled_with
        return Generated(rows, prompt_ids, rollout, from_engine, generate_s, sync_s, staleness, memory)

    def generate(self, rows: list[dict], prompt_ids: list[list[int]]) -> tuple[Rollout, list[list[int]]]:
        """G samples per prompt: single completions, or (env != none) conversations, whose prompts are the
        environment's openings."""
        if self.episodes is None:
            return self.engine.generate(prompt_ids, self.engine_samples, self.sampling), prompt_ids
        # a colocated vLLM with sleep mode lets its weights go after each call: push them again for each turn
        sleeps = getattr(self.engine.engine, "sleep_level", 0) > 0
        refresh = (lambda: self.engine.sync_weights(self.model)) if sleeps else None  # (in time/generate_s)
        prompt_ids, rollout = self.episodes.play(
            self.engine, rows, self.engine_samples, self.sampling, refresh
        )
        return rollout, prompt_ids

    def push_weights(self) -> float:
        self.watchdog.start("sync")
        started = time.perf_counter()
        self.engine.sync_weights(self.model)
        return time.perf_counter() - started

    def with_mixture_samples(self, first: Rollout, prompt_ids: list[list[int]]) -> tuple[Rollout, list[bool]]:
        """Pairs, prompt-major: [engine's sample of prompt 0, the mixture's, engine's of prompt 1, ...]. The
        mixture's rows have no engine log-probs (empty lists): the sync check skips them."""
        started = time.perf_counter()
        second = sample_geometric_mixture(
            self.model,
            self.reference,
            prompt_ids,
            self.second_sample_coef,
            self.sampling,
            pad_id=self.tokenizer.pad_token_id,
            eos_ids=eos_token_ids(self.model, self.tokenizer),
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        pairs = Rollout(
            completion_ids=[c for pair in zip(first.completion_ids, second.completion_ids) for c in pair],
            finished=[f for pair in zip(first.finished, second.finished) for f in pair],
            sampler_logprobs=(
                [logp for row in first.sampler_logprobs for logp in (row, [])]
                if first.sampler_logprobs is not None
                else None
            ),
            stats={**second.stats, **first.stats, "time/second_sample_s": time.perf_counter() - started},
        )
        return pairs, [i % 2 == 0 for i in range(len(pairs.completion_ids))]

    def sampler_state(self) -> dict[str, Any]:
        """What a checkpoint saves of the prompt order: the rollouts drawn ahead have drawn their prompts, and a
        resume draws them again, from the oldest not trained yet."""
        drawn_ahead = self.ahead.sampler_state() if self.ahead is not None else None
        return drawn_ahead if drawn_ahead is not None else self.sampler.state_dict()

    def updating_weights(self, version: int):
        """Around optimizer.step: off-policy, no push to the engine reads the weights while it writes them;
        the trainer has made `version` updates after it."""
        return self.ahead.updating_weights(version) if self.ahead is not None else contextlib.nullcontext()

    def wait(self) -> None:
        """Let a rollout being generated finish and start no other before the next step, so that the engine is
        free (for an evaluation, or the end of the run)."""
        if self.ahead is not None:
            self.ahead.pause()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()


def gpu_memory_metrics(device: torch.device) -> dict[str, float]:
    """GPU memory in use on the whole device (vLLM's sleep-mode pool included) while the engine sleeps, in GiB."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "memory/device_used_asleep_gib": (total - free) / 2**30,
        "memory/torch_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
        # the highest since the process started: the trainer's peak over the steps so far
        "memory/torch_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "memory/torch_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
