"""The algorithm table: what each `algo=` name samples, what it learns from, and what it minimises.

    name      samples per prompt        learning signal                   loss (a pure function in this package)
    grpo      G from the engine         group-normalised advantages       grpo.policy_gradient_loss
    rloo      G from the engine         leave-one-out, KL in the reward   rloo.sequence_policy_loss
    gspo      G from the engine         group-normalised advantages       gspo.gspo_loss (a ratio per completion)
    cispo     G from the engine         group-normalised advantages       cispo.cispo_loss (clipped IS weight)
    dpo       2 from the engine         the pair ranked by its scores     preference.pair_loss
    nash_md   1 + 1 from pi^(1-c) ref^c P(y > y') (Bradley-Terry)         preference.nash_md_micro_batch_loss
    xpo       1 + 1 from the reference  the pair ranked by its scores     preference.pair_loss + exploration

Each entry is a small class built from its config group. The loop asks it how many samples to draw
(`samples_per_prompt`, `second_sample_coef`), turns the rollout's rewards into a per-row signal
(`learning_signal`), and hands each micro-batch's log-probs to `loss`, which returns (loss, token sums).
Adding an algorithm is one class here with its config schema (a dataclass: the `algo.*` keys, typed), its
maths beside it in this package, and one YAML in conf/algo/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from online_rl import distributed
from online_rl.algorithms import cispo, grpo, gspo, preference, rloo
from online_rl.algorithms.sampler_correction import ImportanceSampling


class ScaleRewards(str, Enum):
    group = "group"  # divide by the std of the prompt's G rewards (GRPO paper)
    batch = "batch"  # divide by the std of the whole generation batch (more robust, Dr. GRPO discussion)
    none = "none"  # centre only (Dr. GRPO: no std scaling)


class LossType(str, Enum):
    grpo = "grpo"  # mean over each sequence's tokens, then over sequences (GRPO paper)
    bnpo = "bnpo"  # token mean over each micro-batch
    dr_grpo = "dr_grpo"  # token sum / (sequences x max_completion_length) (Dr. GRPO)
    dapo = "dapo"  # token mean over the whole generation batch (DAPO)


class PreferenceLossType(str, Enum):
    sigmoid = "sigmoid"  # DPO: -log sigmoid(beta * margin)
    ipo = "ipo"  # IPO: (margin - 1 / (2 beta))^2, does not push the margin to infinity


@dataclass
class Signal:
    """What one rollout teaches: per-row tensors the micro-batches carry, step-level numbers, metrics."""

    per_row: dict[str, torch.Tensor]  # each (N,): a value per rollout row (advantage, the pair's ranking)
    scalars: dict[str, float] = field(default_factory=dict)  # beta, pairs, rollout_tokens, ...
    metrics: dict[str, float] = field(default_factory=dict)  # logged as they are (adv/*, pairs/*)


@dataclass
class PolicyGradientConfig:
    """What GRPO and RLOO share: G samples per prompt, an advantage each, and the clipped update."""

    num_generations: int = 8  # G: completions sampled per prompt, the group each is compared with
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = (
        None  # upper clip: ratio <= 1 + epsilon_high; null = epsilon (DAPO uses 0.28)
    )
    num_iterations: int = 1  # mu: optimizer passes over one rollout, each against the rollout's old log-probs
    loss_type: LossType = LossType.dapo  # grpo | bnpo | dr_grpo | dapo (how token losses are averaged)
    beta: float = 0.0  # KL weight to the reference model (k3 estimator); 0 loads no reference model
    # the KL term weighted by pi/pi_old so its gradient is KL(pi||pi_ref)'s; false: the GRPO paper's plain k3
    kl_ratio_weighted: bool = True
    mask_truncated_completions: bool = False  # drop completions that hit max_completion_length from the loss


class PolicyGradient:
    """G samples per prompt from the engine, an advantage each, the clipped ratio over num_iterations passes."""

    rows_per_unit = 1  # rows that must share a micro-batch
    second_sample_coef = None  # every sample comes from the engine

    def __init__(self, cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
        self.cfg, self.max_completion_length = cfg, max_completion_length
        self.importance_sampling = importance_sampling  # None: no correction for the sampler's gap
        self.samples_per_prompt = cfg.num_generations
        self.passes = cfg.num_iterations  # mu: optimizer steps per rollout
        self.needs_old_logp = cfg.num_iterations > 1  # later passes measure how far the policy moved
        self.needs_ref_logp = cfg.beta > 0
        self.masks_truncated = cfg.mask_truncated_completions

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(N x ranks,) advantages from every rank's rewards (whole groups per rank)."""
        raise NotImplementedError

    def trains_on(self, from_engine: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(from_engine)  # every sample

    def learning_signal(self, samples, step: int, max_steps: int) -> Signal:
        # batch statistics (scale_rewards=batch, normalize_advantages) see every rank's rewards
        advantages = distributed.my_rows(self.advantages(distributed.gather_rows(samples.rewards)))  # (N,)
        G = self.samples_per_prompt
        return Signal(
            {"advantages": advantages},
            metrics={
                "adv/mean": float(advantages.mean()),
                "adv/std": float(advantages.std()),
                "adv/abs_max": float(advantages.abs().max()),
                "rollout/zero_std_group_frac": float(
                    (samples.rewards.view(-1, G).std(dim=1) == 0).float().mean()
                ),
            },
        )

    # the pure loss of this entry: GRPO's clipped token ratio; GSPO and CISPO bring their own, same arguments
    loss_function = staticmethod(grpo.policy_gradient_loss)

    def loss(self, micro_batch, logp: torch.Tensor, signal: Signal):
        old = micro_batch.old_logp if micro_batch.old_logp is not None else logp.detach()
        return self.loss_function(
            logp,
            old,
            micro_batch.signal["advantages"],
            micro_batch.packed.completion_mask,
            epsilon_low=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon_high if self.cfg.epsilon_high is not None else self.cfg.epsilon,
            loss_type=self.cfg.loss_type.value,
            num_micro_batches=int(signal.scalars["micro_batches"]),
            rollout_token_count=signal.scalars["rollout_tokens"],
            max_completion_length=self.max_completion_length,
            ref_logp=micro_batch.ref_logp,
            beta=self.cfg.beta,
            kl_ratio_weighted=self.cfg.kl_ratio_weighted,
            sampler_logp=micro_batch.packed.sampler_logp,
            importance_sampling=self.importance_sampling,
        )

    def metrics(self, totals: dict[str, float], signal: Signal, tokens: int) -> dict[str, float]:
        metrics = {
            f"train/{key}_frac": totals[key] / tokens for key in ("clip_low", "clip_high", "clip_region")
        }
        if "is_weight" in totals:  # corrected for the sampler (its log-probs came with the rollout)
            metrics["sync/is_weight_mean"] = totals["is_weight"] / tokens
            # how much the correction reweights: the mean weight stays near 1 whatever the gap (its
            # expectation under the sampler is 1), this does not
            metrics["sync/is_weight_deviation_mean"] = totals["is_weight_deviation"] / tokens
            metrics["sync/is_masked_frac"] = totals["is_masked"] / tokens  # weight 0 (mode=mask drops them)
        return metrics


@dataclass
class GRPOConfig(PolicyGradientConfig):
    name: str = "grpo"
    scale_rewards: ScaleRewards = ScaleRewards.group  # group | batch | none: what divides the centred rewards


class GRPO(PolicyGradient):
    schema = GRPOConfig

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return grpo.group_advantages(rewards, self.samples_per_prompt, self.cfg.scale_rewards.value)


@dataclass
class RLOOConfig:
    """RLOO's keys: the KL lives in the reward and each completion is one action, so GRPO's loss_type (how
    token losses average) and kl_ratio_weighted (the KL term of the loss) have no meaning here."""

    name: str = "rloo"
    num_generations: int = 8  # k: completions sampled per prompt; each is judged against the other k - 1
    beta: float = 0.0  # KL weight in the reward: r - beta * log(pi_old / pi_ref) summed over the completion;
    # 0 loads no reference model
    normalize_advantages: bool = False  # divide the leave-one-out advantages by their std over the rollout
    num_iterations: int = 1  # mu: optimizer passes over one rollout; > 1 clips the sequence ratio pi / pi_old
    epsilon: float = 0.2  # lower clip of the sequence ratio: rho >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: rho <= 1 + epsilon_high; null = epsilon
    mask_truncated_completions: bool = False  # drop completions that hit max_completion_length from the loss


class RLOO(PolicyGradient):
    """REINFORCE Leave-One-Out as published (Ahmadian et al. 2024): each completion is one action.

        R_i   = r_i - beta * sum_t log(pi_old / pi_ref)(y_i,t)          the KL folded into the reward
        A_i   = R_i - 1/(k-1) sum_{j != i} R_j                           the leave-one-out baseline
        rho_i = exp(sum_t log(pi_theta / pi_old)(y_i,t))                 the sequence's ratio
        L     = 1/N sum_i -min(rho_i A_i, clip(rho_i, 1-eps, 1+eps_high) A_i)   a mean over completions

    The reference (and rollout) log-probs are measured before the advantages: the loop runs the no-grad
    passes first. At num_iterations=1 rho_i = 1 and this is the paper's REINFORCE estimator.
    """

    schema = RLOOConfig

    def __init__(self, cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
        super().__init__(cfg, max_completion_length, importance_sampling)
        self.needs_old_logp = cfg.num_iterations > 1 or cfg.beta > 0  # the KL of the reward is pi_old's

    def learning_signal(self, samples, step: int, max_steps: int) -> Signal:
        rewards = samples.rewards  # (N,)
        if self.cfg.beta > 0:
            rewards = rloo.kl_penalised_rewards(rewards, samples.ref_log_ratio, self.cfg.beta)
        # normalize_advantages sees every rank's rewards (whole groups per rank)
        everyone = rloo.leave_one_out_advantages(
            distributed.gather_rows(rewards), self.samples_per_prompt, self.cfg.normalize_advantages
        )
        advantages = distributed.my_rows(everyone)  # (N,)
        G = self.samples_per_prompt
        metrics = {
            "adv/mean": float(advantages.mean()),
            "adv/std": float(advantages.std()),
            "adv/abs_max": float(advantages.abs().max()),
            "rollout/zero_std_group_frac": float(
                (samples.rewards.view(-1, G).std(dim=1) == 0).float().mean()
            ),
        }
        if self.cfg.beta > 0:  # nats per completion, and the reward the baseline saw
            metrics["train/sequence_kl_mean"] = float(samples.ref_log_ratio.mean())
            metrics["reward/kl_penalised_mean"] = float(rewards.mean())
        return Signal({"advantages": advantages}, scalars={"sequences": len(samples)}, metrics=metrics)

    def loss(self, micro_batch, logp: torch.Tensor, signal: Signal):
        old = micro_batch.old_logp if micro_batch.old_logp is not None else logp.detach()
        mask = micro_batch.packed.completion_mask
        loss, stats = rloo.sequence_policy_loss(
            logp,
            old,
            micro_batch.signal["advantages"],
            mask,
            epsilon_low=self.cfg.epsilon,
            epsilon_high=self.cfg.epsilon_high if self.cfg.epsilon_high is not None else self.cfg.epsilon,
            rollout_sequences=int(signal.scalars["sequences"]),
            sampler_logp=micro_batch.packed.sampler_logp,
            importance_sampling=self.importance_sampling,
        )
        # train/kl: the per-token log(pi_old / pi_ref) the reward paid for
        if micro_batch.ref_logp is not None:
            stats["kl"] = grpo.masked_sum(old - micro_batch.ref_logp, mask)
        return loss, stats


@dataclass
class GSPOConfig(GRPOConfig):
    name: str = "gspo"
    epsilon: float = 3e-4  # lower clip of the sequence ratio: s >= 1 - epsilon (the paper's 3e-4)
    epsilon_high: float | None = 4e-4  # upper clip: s <= 1 + epsilon_high; null = epsilon (the paper's 4e-4)
    loss_type: LossType = LossType.grpo  # the mean over completions, the paper's (checks.py refuses others)


class GSPO(GRPO):
    """GRPO's advantages; one clipped ratio per completion, its length-normalised likelihood ratio (gspo.py)."""

    schema = GSPOConfig
    loss_function = staticmethod(gspo.gspo_loss)


@dataclass
class CISPOConfig(GRPOConfig):
    name: str = "cispo"
    epsilon: float | None = None  # lower bound of the weight: r_hat >= 1 - epsilon; null = none (MiniMax-M1)
    epsilon_high: float = 4.0  # upper bound: r_hat <= 1 + epsilon_high (5: ScaleRL's; TRL's epsilon_high=5.0)


class CISPO(GRPO):
    """GRPO's advantages; every token's gradient kept, scaled by its clipped IS weight as a constant (cispo.py)."""

    schema = CISPOConfig
    loss_function = staticmethod(cispo.cispo_loss)


@dataclass
class PreferenceConfig:
    """What online DPO, Nash-MD and XPO share: a pair of samples per prompt, judged against a reference model."""

    beta: float = 0.1  # strength of the pull towards the reference model (DPO's beta; Nash-MD's KL weight)
    beta_final: float | None = None  # beta moves linearly from `beta` to this over max_steps; null = constant
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion that never emits EOS
    reward_model: str | None = None  # hub id or path of a sequence-classification model that ranks the pair;
    # null = the configured reward functions rank it
    reward_model_batch_size: int = 16  # completions per reward-model forward


@dataclass
class OnlineDPOConfig(PreferenceConfig):
    name: str = "dpo"
    loss_type: PreferenceLossType = PreferenceLossType.sigmoid  # sigmoid (DPO) | ipo (IPO)


class OnlineDPO:
    """Two samples per prompt, ranked by their scores; the DPO (or IPO) loss against the frozen reference."""

    schema = OnlineDPOConfig

    samples_per_prompt = 2  # rows 2p and 2p + 1: the pair of prompt p
    rows_per_unit = 2  # both rows of a pair share a micro-batch
    passes = 1
    needs_old_logp, needs_ref_logp, masks_truncated = False, True, False
    second_sample_coef: float | None = None  # both samples from the engine
    exploration_alpha: float | None = None  # XPO's

    def __init__(self, cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
        self.cfg = cfg

    def trains_on(self, from_engine: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(from_engine)  # both samples of each pair

    def learning_signal(self, samples, step: int, max_steps: int) -> Signal:
        pair_scores = preference.penalize_missing_eos(
            samples.ranking_scores, samples.finished, self.cfg.missing_eos_penalty
        ).view(-1, 2)  # (P, 2): [first, second] of each prompt
        first_is_chosen, tie = preference.rank_pairs(pair_scores[:, 0], pair_scores[:, 1])
        preferred = preference.bradley_terry_preference(pair_scores[:, 0], pair_scores[:, 1])
        beta = preference.scheduled_beta(self.cfg.beta, self.cfg.beta_final, step, max_steps)
        decisive = int((~tie).sum())
        return Signal(
            {  # the pair's values on both of its rows
                "first_is_chosen": first_is_chosen.repeat_interleave(2),
                "decisive": (~tie).repeat_interleave(2),
                "preferred": preferred.repeat_interleave(2),
            },
            scalars={"beta": beta, "pairs": len(tie), "decisive_pairs": decisive},
            metrics={
                "pairs/tie_frac": float(tie.float().mean()),
                "pairs/score_gap_mean": float((pair_scores[:, 0] - pair_scores[:, 1]).abs().mean()),
                "pairs/second_reward_mean": float(samples.rewards.view(-1, 2)[:, 1].mean()),
                "train/beta": beta,
                **self.signal_metrics(preferred),
            },
        )

    def signal_metrics(self, preferred: torch.Tensor) -> dict[str, float]:
        return {}

    def loss(self, micro_batch, logp: torch.Tensor, signal: Signal):
        return preference.pair_loss(
            logp,
            micro_batch.ref_logp,
            micro_batch.packed.completion_mask,
            micro_batch.signal["first_is_chosen"][0::2],
            micro_batch.signal["decisive"][0::2],
            beta=signal.scalars["beta"],
            loss_type=self.cfg.loss_type.value,
            decisive_pairs=max(int(signal.scalars["decisive_pairs"]), 1),
            pairs=int(signal.scalars["pairs"]),
            exploration_alpha=self.exploration_alpha,
        )

    def metrics(self, totals: dict[str, float], signal: Signal, tokens: int) -> dict[str, float]:
        decisive = max(int(signal.scalars["decisive_pairs"]), 1)
        return {
            "train/margin_mean": totals["margin"] / decisive,
            "train/accuracy": totals["accuracy"] / decisive,
        }


@dataclass
class XPOConfig(OnlineDPOConfig):
    name: str = "xpo"
    alpha: float = (
        1e-5  # weight of the exploration term alpha * log pi(y_ref) (sums over tokens, hence small)
    )


class XPO(OnlineDPO):
    """Online DPO on the policy's sample against the reference's, plus alpha * log pi(y_ref) (exploration)."""

    schema = XPOConfig

    second_sample_coef = 1.0  # the mixture at c = 1: the reference alone

    def __init__(self, cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
        super().__init__(cfg, max_completion_length, importance_sampling)
        self.exploration_alpha = cfg.alpha

    def metrics(self, totals: dict[str, float], signal: Signal, tokens: int) -> dict[str, float]:
        return {**super().metrics(totals, signal, tokens), "train/exploration_loss": totals["exploration"]}


@dataclass
class NashMDConfig(PreferenceConfig):
    name: str = "nash_md"
    mixture_coef: float = (
        0.5  # c: the comparison sample comes from pi^(1-c) * pi_ref^c (0 = the policy itself)
    )


class NashMD(OnlineDPO):
    """The policy's sample against one of the mixture pi^(1-c) pi_ref^c; the policy's rows alone are trained."""

    schema = NashMDConfig

    rows_per_unit = 1

    def __init__(self, cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
        super().__init__(cfg, max_completion_length, importance_sampling)
        self.second_sample_coef = cfg.mixture_coef

    def trains_on(self, from_engine: torch.Tensor) -> torch.Tensor:
        return from_engine  # its own samples only

    def signal_metrics(self, preferred: torch.Tensor) -> dict[str, float]:
        return {"pairs/preference_mean": float(preferred.mean())}

    def loss(self, micro_batch, logp: torch.Tensor, signal: Signal):
        return preference.nash_md_micro_batch_loss(
            logp,
            micro_batch.ref_logp,
            micro_batch.packed.completion_mask,
            micro_batch.signal["preferred"],
            beta=signal.scalars["beta"],
            pairs=int(signal.scalars["pairs"]),
        )

    def metrics(self, totals: dict[str, float], signal: Signal, tokens: int) -> dict[str, float]:
        return {}


ALGORITHMS = {
    "grpo": GRPO,
    "rloo": RLOO,
    "gspo": GSPO,
    "cispo": CISPO,
    "dpo": OnlineDPO,
    "nash_md": NashMD,
    "xpo": XPO,
}
POLICY_GRADIENT = tuple(name for name, entry in ALGORITHMS.items() if issubclass(entry, PolicyGradient))
PREFERENCE = tuple(name for name in ALGORITHMS if name not in POLICY_GRADIENT)


def make_algorithm(cfg: Any, max_completion_length: int, importance_sampling: ImportanceSampling | None):
    """The table's entry for cfg.name, built from its config group (checks.py has vetted the name)."""
    return ALGORITHMS[cfg.name](cfg, max_completion_length, importance_sampling)
