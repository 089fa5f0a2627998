"""GSPO, CISPO and the sampler correction's modes on small tensors whose answers are worked out by hand."""

import math

import pytest
import torch

from online_rl.algorithms import grpo
from online_rl.algorithms.cispo import cispo_loss
from online_rl.algorithms.gspo import gspo_loss, sequence_ratio
from online_rl.algorithms.sampler_correction import ImportanceSampling, importance_weights

NAN = float("nan")
# trainer - sampler log-probs: row 1 ratios 4, 1, 1/2 (product 2); row 2 ratios 3, 2 and a padded NaN (product 6)
LOG_RATIO = torch.tensor([[math.log(4), 0.0, math.log(0.5)], [math.log(3), math.log(2), NAN]])
SAMPLER = torch.full((2, 3), -1.0)
TRAINER = SAMPLER + LOG_RATIO
MASK_2x3 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "correction, expected",
    [
        (ImportanceSampling("token", "truncate", None, 2.0), [[2, 1, 0.5], [2, 2, 1]]),  # ours, the default
        (ImportanceSampling("token", "truncate", 0.6, 2.0), [[2, 1, 0.6], [2, 2, 1]]),  # 1/2 raised to 0.6
        (ImportanceSampling("token", "mask", None, 2.0), [[0, 1, 0.5], [0, 2, 1]]),  # 4 and 3 dropped, 2 kept
        (ImportanceSampling("sequence", "truncate", None, 3.0), [[2], [3]]),  # products 2 and 6 (capped)
        (ImportanceSampling("sequence", "mask", None, 3.0), [[2], [0]]),  # TRL's default: 6 > 3 drops row 2
        (ImportanceSampling("sequence", "mask", 2.5, None), [[0], [6]]),  # a lower bound alone
    ],
    ids=[
        "token-truncate",
        "token-truncate-min",
        "token-mask",
        "sequence-truncate",
        "sequence-mask",
        "mask-min",
    ],
)
def test_importance_weights_each_level_and_mode(correction, expected):
    weights = importance_weights(TRAINER, SAMPLER, MASK_2x3, correction)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))  # padding: weight 1


def test_a_non_finite_log_prob_is_left_out_of_the_sequence_weight():
    sampler = SAMPLER.clone()
    sampler[0, 1] = NAN  # row 1's middle token: log ratio 0, so the product is 4 x 1/2 = 2 still
    weights = importance_weights(
        TRAINER, sampler, MASK_2x3, ImportanceSampling("sequence", "truncate", None, 9.0)
    )
    torch.testing.assert_close(weights, torch.tensor([[2.0], [6.0]]))


def test_masked_tokens_leave_the_loss_and_are_counted():
    # on-policy, A = 1: each token's loss is -w; token mask at 2 drops the tokens of ratio 4 and 3
    logp = TRAINER.clone().requires_grad_()
    loss, stats = grpo.policy_gradient_loss(
        logp, logp.detach(), torch.ones(2), MASK_2x3,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", num_micro_batches=1, rollout_token_count=5,
        max_completion_length=3, sampler_logp=SAMPLER, importance_sampling=ImportanceSampling("token", "mask"),
    )  # fmt: skip
    assert loss.item() == pytest.approx(-(0 + 1 + 0.5 + 0 + 2) / 5)
    assert stats["is_masked"].item() == 2 and stats["is_weight"].item() == pytest.approx(3.5)


def test_gspo_clips_the_length_normalised_sequence_ratio():
    """Three completions of 2, 1 and 3 tokens, loss_type=grpo (the paper's mean over completions), eps 0.2:
    row 1: log ratios 0.2, 0.4 -> s = e^0.3 = 1.35 > 1.2 with A = +1: clipped to -1.2, no gradient;
    row 2: log ratio -0.1 -> s = e^-0.1 = 0.905 (inside) with A = -1: loss +s, d/dlogp = s / 1 token;
    row 3: log ratios 0.05, -0.05, 0 -> s = 1 with A = +2: loss -2, d/dlogp_t = -2 s / 3 tokens."""
    old = torch.tensor([[-1.0, -2.0, -0.7], [-0.5, -9.0, -9.0], [-1.0, -1.0, -1.0]])
    step = torch.tensor([[0.2, 0.4, 0.0], [-0.1, 0.0, 0.0], [0.05, -0.05, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp = (old + step).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 2.0])
    s1, s2 = math.exp(0.3), math.exp(-0.1)
    torch.testing.assert_close(sequence_ratio(logp, old, mask), torch.tensor([s1, s2, 1.0]))
    loss, stats = gspo_loss(
        logp, old, advantages, mask,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", num_micro_batches=1, rollout_token_count=6,
        max_completion_length=3,
    )  # fmt: skip
    assert loss.item() == pytest.approx((-1.2 + s2 - 2.0) / 3)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, 0.0], [s2 / 3, 0.0, 0.0], [-2 / 9, -2 / 9, -2 / 9]])
    torch.testing.assert_close(logp.grad, expected)
    # row 1 is clipped high, and all of its 2 tokens count
    assert (stats["clip_high"].item(), stats["clip_low"].item(), stats["clip_region"].item()) == (2, 0, 2)


def test_gspo_on_policy_has_grpo_s_sequence_mean_gradient():
    """At ratio 1 both are A_i / |y_i| grad log pi per token, averaged over completions (loss_type=grpo)."""
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64
    )
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    options = dict(
        epsilon_low=3e-4, epsilon_high=4e-4, loss_type="grpo", num_micro_batches=1, rollout_token_count=11,
        max_completion_length=5,
    )  # fmt: skip
    (gspo_grad,) = torch.autograd.grad(gspo_loss(logp, logp.detach(), advantages, mask, **options)[0], logp)
    grpo_loss = grpo.policy_gradient_loss(logp, logp.detach(), advantages, mask, **options)[0]
    (grpo_grad,) = torch.autograd.grad(grpo_loss, logp)
    torch.testing.assert_close(gspo_grad, grpo_grad)


def test_cispo_keeps_the_gradient_of_tokens_past_the_bound_and_caps_their_weight():
    """Ratios 6 and 1/2 (A = +1), 2 and 1 (A = -1); the weight capped at 1 + 4 = 5, no lower bound:
    token loss -w A log pi = [5, 1] and [-1, -3]; dapo: their sum over 4 tokens = 0.5;
    gradient -w A / 4: the ratio-6 token, which PPO's clip would silence (r > 1 + eps with A > 0), still learns."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(6), math.log(0.5)], [math.log(2), 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    options = dict(
        loss_type="dapo",
        num_micro_batches=1,
        rollout_token_count=4,
        max_completion_length=2,
        epsilon_high=4.0,
    )
    loss, stats = cispo_loss(logp, old, advantages, torch.ones(2, 2), epsilon_low=None, **options)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-5 / 4, -0.5 / 4], [2 / 4, 1 / 4]]))
    assert (stats["clip_high"].item(), stats["clip_low"].item()) == (1, 0)
    # a lower bound of 1 - 0.2 lifts the ratio-1/2 weight to 0.8
    low_loss, low_stats = cispo_loss(logp, old, advantages, torch.ones(2, 2), epsilon_low=0.2, **options)
    assert low_loss.item() == pytest.approx((5 + 0.8 * 2 - 1 - 3) / 4)
    assert (low_stats["clip_low"].item(), low_stats["clip_region"].item()) == (1, 2)


def test_cispo_and_gspo_keep_nan_on_padding_out_of_the_loss_and_gradient():
    logp = torch.tensor([[-1.0, NAN], [-0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    sampler = torch.tensor([[NAN, NAN], [-0.5, -1.0]])
    for loss_fn, eps_low in ((cispo_loss, None), (gspo_loss, 0.2)):
        loss, stats = loss_fn(
            logp, logp.detach(), torch.tensor([1.0, -1.0]), mask,
            epsilon_low=eps_low, epsilon_high=0.2, loss_type="dapo", num_micro_batches=1, rollout_token_count=3,
            max_completion_length=2, ref_logp=torch.full((2, 2), -1.0), beta=0.1, sampler_logp=sampler,
            importance_sampling=ImportanceSampling("sequence", "mask", None, 3.0),
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and all(torch.isfinite(value) for value in stats.values()), loss_fn
        assert torch.isfinite(grad).all() and grad[0, 1] == 0, loss_fn
