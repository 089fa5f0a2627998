"""RLOO as published (Ahmadian et al. 2024): its maths on hand-computed tensors, the table's entry, and parity
with TRL 1.16's RLOOTrainer, whose own methods run on the same tensors (a minimal `self` stands in for the
trainer: generation, reward functions and forward passes are what we hand it, the maths is TRL's)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from online_rl.algorithms import RLOO, RLOOConfig
from online_rl.algorithms.rloo import (
    kl_penalised_rewards,
    leave_one_out_advantages,
    sequence_clipped_loss,
    sequence_log_ratio,
    sequence_policy_loss,
)
from online_rl.algorithms.sampler_correction import ImportanceSampling

# ---- the pure functions, by hand


def test_sequence_log_ratio_sums_the_real_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    other = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: 0.5 - 1.0 (the NaN sits on padding); row 1: 3 x 0.5
    assert sequence_log_ratio(logp, other, mask).tolist() == pytest.approx([-0.5, 1.5])


def test_kl_is_folded_into_the_reward_before_the_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    ref_log_ratio = torch.tensor([2.0, -1.0, 0.0, 5.0])  # log pi_old/pi_ref summed over each completion
    penalised = kl_penalised_rewards(rewards, ref_log_ratio, beta=0.1)
    assert penalised.tolist() == pytest.approx([0.8, 0.1, 1.0, 0.5])
    # groups of 2: A = R_i - R_other
    assert leave_one_out_advantages(penalised, 2, normalize=False).tolist() == pytest.approx(
        [0.7, -0.7, 0.5, -0.5]
    )
    # without the KL the second group carried no signal at all
    assert leave_one_out_advantages(rewards, 2, normalize=False).tolist() == pytest.approx(
        [1.0, -1.0, 0.0, 0.0]
    )


def test_sequence_clipped_loss_by_hand():
    rho = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, ratio = sequence_clipped_loss(rho.log(), advantages, epsilon_low=0.2, epsilon_high=0.3)
    # -min(rho A, clip(rho, 0.8, 1.3) A): 1.3 clips the gain; rho's loss stays when A < 0; 0.5 A < 0.8 A;
    # 0.8 clips the loss when A < 0; 1.1 is inside
    assert loss.tolist() == pytest.approx([-1.3, 1.5, -0.5, 0.8, -2.2])
    assert ratio.tolist() == pytest.approx(rho.tolist())


def test_the_loss_is_a_mean_over_completions_whatever_their_lengths():
    """One pass (old = logp): rho = 1 and d loss / d logp_t = -A_i / N on every real token of completion i."""
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, stats = sequence_policy_loss(
        logp, logp.detach(), advantages, mask, epsilon_low=0.2, epsilon_high=0.2, rollout_sequences=4
    )
    assert loss.item() == pytest.approx(-(2.0 - 1.0) / 4)  # two of the rollout's four completions
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]]))
    assert stats["clip_region"].item() == 0


def test_later_passes_clip_the_sequence_ratio_and_count_its_tokens():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    logp = torch.tensor([[-0.8, -0.8], [-1.0, -1.2]], requires_grad=True)  # rho = e^0.4 and e^-0.2
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([1.0, 1.0])
    loss, stats = sequence_policy_loss(
        logp, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, rollout_sequences=2
    )
    # row 0: e^0.4 = 1.49 > 1.2, clipped (no gradient); row 1: only its real token counts, rho = 1
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-0.5, 0.0]]))
    assert stats["clip_high"].item() == 2 and stats["clip_low"].item() == 0  # row 0's two tokens


def test_the_sampler_correction_weighs_whole_completions():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.5], [-2.0, float("nan")]])
    mask = torch.ones(2, 2)
    loss, stats = sequence_policy_loss(
        logp, logp.detach(), torch.tensor([1.0, 1.0]), mask, epsilon_low=0.2, epsilon_high=0.2,
        rollout_sequences=2, sampler_logp=sampler, importance_sampling=ImportanceSampling(max=2.0),
    )  # fmt: skip
    # row 0: min(e^(0.5 + 0.5), 2) = 2; row 1: a NaN sampler log-prob, weight 1
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)
    assert stats["is_weight"].item() == pytest.approx(2 * 2.0 + 2 * 1.0)


# ---- the table's entry


def rloo_entry(**overrides) -> RLOO:
    cfg = OmegaConf.merge(OmegaConf.structured(RLOOConfig), overrides)
    return RLOO(cfg, max_completion_length=8, importance_sampling=None)


def test_the_entry_asks_for_the_rollout_policy_when_the_reward_has_a_kl():
    assert not rloo_entry().needs_old_logp and not rloo_entry().needs_ref_logp
    with_kl = rloo_entry(beta=0.05)
    assert with_kl.needs_old_logp and with_kl.needs_ref_logp
    assert rloo_entry(num_iterations=2).needs_old_logp


def test_the_entry_s_signal_is_the_leave_one_out_of_the_penalised_reward():
    entry = rloo_entry(beta=0.5, num_generations=2)
    samples = SimpleNamespace(
        rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]), ref_log_ratio=torch.tensor([0.2, -0.2, 1.0, 0.0])
    )
    signal = entry.learning_signal(Rows(samples), step=0, max_steps=1)
    # R = [0.9, 1.1, -0.5, 1.0] -> A = [-0.2, 0.2, -1.5, 1.5]
    assert signal.per_row["advantages"].tolist() == pytest.approx([-0.2, 0.2, -1.5, 1.5])
    assert signal.scalars["sequences"] == 4
    assert signal.metrics["train/sequence_kl_mean"] == pytest.approx(0.25)
    assert signal.metrics["rollout/zero_std_group_frac"] == 0.5  # of the task's rewards


class Rows(SimpleNamespace):
    """Just enough of a rollout's record for learning_signal: rewards, the reference's log-ratio, its rows."""

    def __init__(self, fields):
        super().__init__(**vars(fields))

    def __len__(self):
        return len(self.rewards)


# ---- parity with TRL 1.16's RLOOTrainer


def trl_trainer_self(num_generations: int, beta: float, normalize: bool, old_logp, ref_logp, rewards, **more):
    """The least of an RLOOTrainer that its _generate_and_score_completions and _compute_loss need: one process,
    prompts of two tokens, completions of each row's length, and, in place of the forward passes and the
    reward functions, the tensors we hand it (old_logp for the policy, ref_logp for the reference)."""
    rows, width = old_logp.shape
    lengths = more.pop("lengths")
    policy, reference = SimpleNamespace(training=True, is_gradient_checkpointing=False), object()

    def per_token_logps(self, model, *args, **kwargs):
        assert args[0].shape[1] == 2 + width  # [prompt | completion], padded to the longest completion
        return (old_logp if model is policy else ref_logp), None, None

    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        gather=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )
    return SimpleNamespace(
        accelerator=accelerator,
        model=policy,
        ref_model=reference,
        beta=beta,
        num_generations=num_generations,
        normalize_advantages=normalize,
        mask_truncated_completions=False,
        reward_clip_range=None,
        reward_weights=torch.ones(1, dtype=rewards.dtype),
        reward_func_names=["task"],
        pad_to_multiple_of=None,
        eos_token_ids=[0],
        _tokenizer=SimpleNamespace(pad_token_id=0),
        args=SimpleNamespace(per_device_train_batch_size=rows, gradient_checkpointing_kwargs=None),
        _generate=lambda prompts: ([[1, 2]] * rows, [[3] * n for n in lengths], ["y"] * rows),
        _calculate_rewards=lambda *args: rewards.unsqueeze(1),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: per_token_logps(None, *args, **kwargs),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        aux_loss_enabled=False,
        **more,
    )


def rollout_tensors(seed: int, prompts: int = 4, k: int = 4, width: int = 12):
    """Float64 log-probs of realistic size (about -1.5 nats a token) for prompts x k completions of 3..width tokens:
    the rollout policy's, the reference's (a drift of 0.3 nats a token) and, one update later, the policy's (0.1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = prompts * k
    lengths = torch.randint(3, width + 1, (rows,), generator=generator)
    lengths[0] = width
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    old = -torch.rand(rows, width, generator=generator, dtype=torch.float64) * 3
    ref = old + 0.3 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    new = old + 0.1 * torch.randn(rows, width, generator=generator, dtype=torch.float64)
    rewards = torch.randint(0, 2, (rows,), generator=generator).to(torch.float64)
    rewards += 0.1 * torch.rand(rows, generator=generator, dtype=torch.float64)  # a length-style bonus
    # what sits on padding is for the mask to hide
    old, ref, new = (torch.where(mask.bool(), t, 0.0) for t in (old, ref, new))
    return SimpleNamespace(
        mask=mask, old=old, ref=ref, new=new, rewards=rewards, lengths=lengths.tolist(), k=k
    )


def trl_advantages(data, beta: float, normalize: bool) -> torch.Tensor:
    from trl.trainer.rloo_trainer import RLOOTrainer

    trainer = trl_trainer_self(
        data.k, beta, normalize, data.old, data.ref, data.rewards, lengths=data.lengths
    )
    inputs = [{"prompt": "p"} for _ in data.lengths]
    return RLOOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]


def our_advantages(data, beta: float, normalize: bool) -> torch.Tensor:
    entry = rloo_entry(beta=beta, normalize_advantages=normalize, num_generations=data.k)
    samples = SimpleNamespace(
        rewards=data.rewards, ref_log_ratio=sequence_log_ratio(data.old, data.ref, data.mask)
    )
    return entry.learning_signal(Rows(samples), step=0, max_steps=1).per_row["advantages"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "beta, normalize",
    [(0.0, False), (0.04, False), (0.04, True), (0.5, False)],
    ids=["no-kl", "kl", "kl-norm", "kl-big"],
)
def test_advantages_match_trl_rloo_trainer(seed, beta, normalize):
    data = rollout_tensors(seed)
    ours, theirs = our_advantages(data, beta, normalize), trl_advantages(data, beta, normalize)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def trl_loss(data, logp, advantages, epsilon_low, epsilon_high):
    from trl.trainer.rloo_trainer import RLOOTrainer

    trainer = trl_trainer_self(
        data.k, 0.0, False, logp, None, data.rewards, lengths=data.lengths,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high,
    )  # fmt: skip
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.ones(len(logp), 2, dtype=torch.long),
        "prompt_mask": torch.ones(len(logp), 2, dtype=torch.long),
        "completion_ids": torch.full(logp.shape, 3, dtype=torch.long),
        "completion_mask": data.mask.long(),
        "old_logps": (data.old * data.mask).sum(1),
        "advantages": advantages,
    }
    return RLOOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilons", [(0.2, 0.2), (0.2, 0.28)], ids=["symmetric", "clip-higher"])
def test_loss_and_gradient_match_trl_rloo_trainer_at_a_later_pass(seed, epsilons):
    """mu = 2: the policy moved since the rollout, so sequence ratios leave the clip range on both sides.
    One micro-batch holds the whole rollout (TRL's mean over a micro-batch is then our sum / N)."""
    data = rollout_tensors(seed)
    advantages = our_advantages(data, beta=0.04, normalize=False)
    ours_logp = data.new.clone().requires_grad_(True)
    ours, stats = sequence_policy_loss(
        ours_logp, data.old, advantages, data.mask, epsilon_low=epsilons[0], epsilon_high=epsilons[1],
        rollout_sequences=len(data.lengths),
    )  # fmt: skip
    theirs_logp = data.new.clone().requires_grad_(True)
    theirs = trl_loss(data, theirs_logp, advantages, *epsilons)
    assert stats["clip_region"].item() > 0  # the clip is exercised
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(ours_logp.grad * data.mask, theirs_logp.grad * data.mask, rtol=0, atol=1e-6)


def test_an_unscored_completion_differs_from_trl_on_purpose():
    """A completion every reward function declined (None) counts as reward 0 here: its siblings' baseline
    includes it. TRL drops it from its siblings' baseline and zeroes its advantage. We keep 0 because a
    reward that returns None for a whole completion is one the run warns about and counts (max_unscored_steps),
    and `total_reward` has one meaning for every algorithm: None adds nothing."""
    data = rollout_tensors(0)
    unscored = data.rewards.clone()
    unscored[1] = float("nan")  # how TRL sees an all-None row
    data_trl = SimpleNamespace(**{**vars(data), "rewards": unscored})
    theirs = trl_advantages(data_trl, beta=0.0, normalize=False)
    data.rewards[1] = 0.0  # how total_reward sees it
    ours = our_advantages(data, beta=0.0, normalize=False)
    assert theirs[1] == 0 and ours[1] != 0
    torch.testing.assert_close(ours[4:], theirs[4:], rtol=0, atol=1e-6)  # the other prompts agree
    assert not torch.allclose(ours[:4], theirs[:4])
