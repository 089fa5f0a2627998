"""The update of one step: no-grad log-prob passes, then training passes over the micro-batches.

A training pass is the same for every algorithm: the policy's log-probs of each micro-batch's completions,
the algorithm's loss on them, backward; gradients accumulate over the rollout and the caller steps the
optimizer. Along the way it compares the rollout policy's log-probs with the engine's, which says whether
the engine generated with the trainer's weights (`check_sync`).
"""

from __future__ import annotations

import logging
import time

import torch

from online_rl.algorithms.rloo import sequence_log_ratio
from online_rl.algorithms.sampler_correction import logp_gap
from online_rl.logprobs import completion_logprobs
from online_rl.rollout import MicroBatch

log = logging.getLogger(__name__)


def logprob_passes(run, micro_batches: list[MicroBatch], temperature: float) -> float:
    """Fill each micro-batch's old_logp (B, C) (the rollout policy, fixed over several passes) and ref_logp
    (B, C) (the reference: the frozen copy, or under LoRA the model with its adapters off), as the algorithm
    needs them. No gradient. Returns their seconds (0 when the algorithm needs neither)."""
    old, ref = run.algorithm.needs_old_logp, run.algorithm.needs_ref_logp
    if not (old or ref):
        return 0.0
    started = time.perf_counter()
    with torch.no_grad():
        for micro_batch in micro_batches:
            if old:
                micro_batch.old_logp, _ = completion_logprobs(
                    run.model, micro_batch.packed, temperature, run.autocast_dtype
                )
            if ref:
                micro_batch.ref_logp = reference_logprobs(
                    run.model, run.reference, micro_batch.packed, temperature, run.autocast_dtype
                )
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # their kernels are this phase's (time/logprobs_s), not training's
    return time.perf_counter() - started


def reference_log_ratios(micro_batches: list[MicroBatch], rows: int) -> torch.Tensor | None:
    """(N,) on the CPU: log pi_old(y|x) - log pi_ref(y|x) of each trained row's completion (0 for rows not
    trained), when the no-grad passes filled both log-probs; else None. One copy to the host for the rollout."""
    if not micro_batches or micro_batches[0].old_logp is None or micro_batches[0].ref_logp is None:
        return None
    sums = torch.cat(
        [sequence_log_ratio(mb.old_logp, mb.ref_logp, mb.packed.completion_mask) for mb in micro_batches]
    )
    ratios = torch.zeros(rows)
    ratios[[row for mb in micro_batches for row in mb.rows]] = sums.float().cpu()
    return ratios


def reference_logprobs(model, reference, batch, temperature, autocast_dtype) -> torch.Tensor:
    """Log-probs under the reference policy: the frozen copy, or the LoRA model with its adapters off."""
    if reference is not None:
        return completion_logprobs(reference, batch, temperature, autocast_dtype)[0]
    with model.disable_adapter():
        return completion_logprobs(model, batch, temperature, autocast_dtype)[0]


def train_pass(policy, micro_batches: list[MicroBatch], algorithm, signal, temperature, autocast_dtype):
    """One pass of the algorithm's loss over the rollout; gradients accumulate. Returns sums over tokens
    (loss, entropy, the loss's own sums; gap, gap_max, engine_tokens where the engine's log-probs came)."""
    sums = DeviceSums()
    for micro_batch in micro_batches:
        logp, entropy = completion_logprobs(
            policy, micro_batch.packed, temperature, autocast_dtype, with_entropy=True
        )  # (B, C) each
        loss, stats = algorithm.loss(micro_batch, logp, signal)
        loss.backward()
        mask = micro_batch.packed.completion_mask
        sums.add("loss", loss)
        sums.add("entropy", (entropy * mask).sum())
        for key, value in stats.items():
            sums.add(key, value)
        if micro_batch.packed.sampler_logp is not None:  # the rollout policy vs the engine that sampled it
            rollout_logp = micro_batch.old_logp if micro_batch.old_logp is not None else logp
            engine_mask = mask * micro_batch.from_engine.unsqueeze(1)
            gap_sum, gap_peak, bad = logp_gap(rollout_logp, micro_batch.packed.sampler_logp, engine_mask)
            sums.add("gap", gap_sum)
            sums.peak("gap_max", gap_peak)
            sums.add("gap_nonfinite", bad)
            sums.add("engine_tokens", engine_mask.sum())
    return sums.read()


class DeviceSums:
    """A pass's running sums and maxima, kept on the device and read once at the end of the pass: a read per
    micro-batch would stall the GPU while the CPU queues the next forward."""

    def __init__(self):
        self.sums, self.peaks = {}, {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def peak(self, key: str, value: torch.Tensor) -> None:
        self.peaks.setdefault(key, []).append(value.detach().float())

    def read(self) -> dict[str, float]:
        totals = {key: float(value) for key, value in self.sums.items()}
        totals.update({key: float(torch.stack(values).max()) for key, values in self.peaks.items()})
        return totals


def fewer_rows_after_oom(
    rows: int, rollout_rows: int, rows_per_unit: int, world_size: int, longest_row: int, step: int
) -> int:
    """Rows per micro-batch after a pass of `rows` each ran out of GPU memory: at most half as many, whole
    units (a preference pair stays together) that divide the rollout's rows, kept for the rest of the run.
    The gradient is the same sum over the rollout in more, equal pieces (exact for every loss_type but bnpo,
    whose token mean is per micro-batch). Raises when no fewer rows can run, or with several ranks, which
    must all run as many micro-batches (the others would wait for this one in their gradient all-reduce)."""
    fewer = next((n for n in range(rows // 2, 0, -1) if n % rows_per_unit == 0 and rollout_rows % n == 0), 0)
    if world_size > 1:
        raise MemoryError(
            f"step {step}: out of GPU memory with micro-batches of {rows} rows of up to {longest_row} tokens; "
            f"with {world_size} ranks every rank must run as many micro-batches, so it is not halved on one: "
            f"set micro_batch_size={max(fewer, rows_per_unit)}"
        )
    if fewer < rows_per_unit:
        raise MemoryError(
            f"step {step}: out of GPU memory with micro-batches of {rows} row(s) of up to {longest_row} tokens, "
            "the fewest there can be: set model.gradient_checkpointing=true, train LoRA adapters "
            "(model.lora.enabled=true), or shorten sampling.max_completion_length"
        )
    log.warning(
        "step %d: out of GPU memory with micro-batches of %d rows of up to %d tokens; the step again with %d "
        "(and every later step: set micro_batch_size=%d to start there)", step, rows, longest_row, fewer, fewer,
    )  # fmt: skip
    return fewer


class SyncError(RuntimeError):
    """The engine's log-probs say it is not generating with the trainer's weights."""


def check_sync(gap_mean: float, gap_max: float, threshold: float, step: int, nonfinite: int = 0) -> None:
    """Stop when the engine's log-probs of its samples are far from the trainer's, or not numbers at all."""
    if nonfinite:
        raise SyncError(
            f"before step {step + 1}, {nonfinite} of the sampled tokens have a NaN or infinite log-prob (the "
            "engine's or the trainer's): the engine or the trainer is producing garbage. Look for inf/nan in the "
            "weights (a diverged update: lower optim.lr) or a broken weight sync; this step is not trained on."
        )
    if not gap_mean <= threshold:
        raise SyncError(
            f"before step {step + 1}, vLLM's log-probs of its own samples differ from the trainer's by "
            f"{gap_mean:.4f} nats per token on average (max {gap_max:.3f}; threshold vllm.max_logp_gap={threshold}): "
            "the engine is not generating with the trainer's current weights. Check the weight sync "
            "(names, dtype, LoRA merge); raise vllm.max_logp_gap only if the gap is numerical noise."
        )
