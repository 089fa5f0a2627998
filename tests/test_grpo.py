"""GRPO maths on small tensors whose answers are worked out by hand in the comments."""

import math

import pytest
import torch

from online_rl.algorithms import grpo
from online_rl.algorithms.sampler_correction import ImportanceSampling, logp_gap
from online_rl.update import SyncError, check_sync


def test_group_advantages_group_scaling():
    # group 1: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt(1/3) = 0.57735
    # group 2: all equal -> advantages 0 (no signal)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo.group_advantages(rewards, group_size=4, scale_rewards="group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))


def test_group_advantages_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0])  # groups of 2: means 0.5 and 4
    centred = torch.tensor([0.5, -0.5, -1.0, 1.0])
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, "none"), centred)
    batch_std = rewards.std()  # std over all four rewards, not per group
    torch.testing.assert_close(grpo.group_advantages(rewards, 2, "batch"), centred / (batch_std + 1e-4))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(torch.zeros(4), 3, "group")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(torch.zeros(4), 2, "grop")


def test_k3_kl_is_zero_at_equality_and_matches_formula():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.5]])
    kl = grpo.k3_kl(logp, ref)
    d = 0.5  # ref - logp for the second token
    torch.testing.assert_close(kl, torch.tensor([[0.0, math.exp(d) - d - 1]]))


def test_clipped_loss_clips_each_side_only_where_it_should():
    # ratios e^0.5=1.65 and e^-0.5=0.61 with eps_low 0.2, eps_high 0.28
    logp = torch.tensor([[0.5, -0.5], [0.5, -0.5]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, ratio = grpo.clipped_token_loss(logp, old, adv, 0.2, 0.28)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A=+1: min(r, clip(r)) -> 1.28 for the high ratio, 0.61 (unclipped, it is smaller) for the low one
    # A=-1: min(-r, -clip(r)) -> -1.65 (unclipped) for the high ratio, -0.8 (clipped) for the low one
    expected = -torch.tensor([[1.28, r_lo], [-r_hi, -0.8]])
    torch.testing.assert_close(loss, expected)
    fractions = grpo.clip_fractions(ratio, adv, torch.ones(2, 2), 0.2, 0.28)
    assert fractions["clip_high"] == pytest.approx(0.25)  # token (0,0): r > 1.28 with A > 0
    assert fractions["clip_low"] == pytest.approx(0.25)  # token (1,1): r < 0.8 with A < 0
    assert fractions["clip_region"] == pytest.approx(0.5)


def test_ratio_one_gives_plain_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, ratio = grpo.clipped_token_loss(logp, logp.detach(), torch.tensor([2.0]), 0.2, 0.2)
    loss.sum().backward()
    torch.testing.assert_close(ratio, torch.ones(1, 2))
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0]]))  # d(-r*A)/dlogp = -A at r=1


# Two micro-batches of one rollout. Token losses (masked positions hold junk that must not count):
#   micro-batch 1: seq a = [1, 2, 3] (3 tokens), seq b = [4, x, x] (1 token)
#   micro-batch 2: seq c = [6, 6, x] (2 tokens), seq d = [0, x, x] (1 token)
LOSS_1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
MASK_1 = torch.tensor([[1, 1, 1], [1, 0, 0]])
LOSS_2 = torch.tensor([[6.0, 6.0, 99.0], [0.0, 99.0, 99.0]])
MASK_2 = torch.tensor([[1, 1, 0], [1, 0, 0]])
ROLLOUT_TOKENS = 7
MAX_LEN = 4


def step_loss(loss_type):
    return sum(
        float(grpo.aggregate_loss(loss, mask, loss_type, 2, ROLLOUT_TOKENS, MAX_LEN))
        for loss, mask in ((LOSS_1, MASK_1), (LOSS_2, MASK_2))
    )


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # per-sequence means: a 2, b 4 -> 3; c 6, d 0 -> 3; mean over micro-batches -> 3
        ("grpo", 3.0),
        # token mean per micro-batch: 10/4 = 2.5 and 12/3 = 4 -> 3.25
        ("bnpo", 3.25),
        # sum / (2 seqs x 4): 10/8 = 1.25 and 12/8 = 1.5 -> 1.375
        ("dr_grpo", 1.375),
        # all tokens of the rollout: (10 + 12) / 7
        ("dapo", 22 / 7),
    ],
)
def test_loss_aggregation(loss_type, expected):
    assert step_loss(loss_type) == pytest.approx(expected)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        grpo.aggregate_loss(LOSS_1, MASK_1, "ppo", 1, 4, 4)


def test_policy_gradient_loss_weights_tokens_adds_the_kl_and_sums_its_stats():
    # one sequence of two tokens, on-policy (ratio 1): the clipped term is -A per token
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])  # k3 per token: 0 and exp(1) - 1 - 1
    sampler = torch.tensor([[-1.0 - math.log(4.0), -2.0]])  # pi_old / pi_sampler = 4 (capped to 2), then 1
    mask = torch.ones(1, 2)
    loss, stats = grpo.policy_gradient_loss(
        logp, logp.detach(), torch.tensor([0.5]), mask,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", num_micro_batches=1, rollout_token_count=2,
        max_completion_length=2, ref_logp=ref, beta=0.1, sampler_logp=sampler, importance_sampling=ImportanceSampling(),
    )  # fmt: skip
    k3 = math.e - 2
    # token 1: 2 x -0.5 + 0.1 x 0 = -1; token 2: 1 x -0.5 + 0.1 x k3; DAPO: their sum / 2 tokens
    assert loss.item() == pytest.approx((-1.0 + -0.5 + 0.1 * k3) / 2)
    assert stats["is_weight"].item() == pytest.approx(3.0)  # 2 + 1
    assert stats["is_weight_deviation"].item() == pytest.approx(1.0)  # |2 - 1| + |1 - 1|
    assert stats["is_masked"].item() == 0.0  # truncated, not masked
    assert stats["kl"].item() == pytest.approx(k3)
    assert stats["clip_region"].item() == 0.0  # ratio 1: nothing clipped
    without = grpo.policy_gradient_loss(
        logp, logp.detach(), torch.tensor([0.5]), mask,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", num_micro_batches=1, rollout_token_count=2,
        max_completion_length=2,
    )  # fmt: skip
    assert without[0].item() == pytest.approx(-0.5) and set(without[1]) == {
        "clip_low",
        "clip_high",
        "clip_region",
    }


@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "pi_old != pi"])
def test_the_ratio_weighted_kl_term_has_the_gradient_of_the_kl_it_estimates(on_policy):
    """Over a 5-token vocabulary, exactly: E_{y ~ pi_old}[grad term(y)] against autograd of
    KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)). The weighted term matches; plain k3 does not."""
    torch.manual_seed(0)
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(logits, dim=0)
    old = logp.detach() if on_policy else torch.log_softmax(torch.randn(5, dtype=torch.float64), dim=0)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)

    def expected_gradient(weighted: bool) -> torch.Tensor:
        term = grpo.kl_penalty(logp[None], old[None], ref[None], weighted)[0]  # (V,): one token y each
        (gradient,) = torch.autograd.grad((old.exp() * term).sum(), logits, retain_graph=True)
        return gradient

    assert torch.allclose(expected_gradient(weighted=True), exact, atol=1e-12)
    assert not torch.allclose(expected_gradient(weighted=False), exact, atol=1e-3)


def test_non_finite_sampler_log_probs_never_reach_the_loss_and_fail_the_sync_check():
    """Two real tokens with NaN and inf sampler log-probs, and a NaN on padding: the loss stays finite (those
    weights are 1, padding is selected out, not multiplied), and the gap check counts them and stops."""
    logp = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -1.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2's last position is padding
    sampler = torch.tensor([[float("nan"), -2.0, -1.5], [-0.5, float("-inf"), float("nan")]])
    loss, stats = grpo.policy_gradient_loss(
        logp, logp.detach(), torch.tensor([1.0, -1.0]), mask,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", num_micro_batches=1, rollout_token_count=5,
        max_completion_length=3, ref_logp=torch.full((2, 3), -1.0), beta=0.1, sampler_logp=sampler,
        importance_sampling=ImportanceSampling(),
    )  # fmt: skip
    assert torch.isfinite(loss) and all(torch.isfinite(value) for value in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad[mask.bool()]).all() and (logp.grad[~mask.bool()] == 0).all()
    assert stats["is_weight"].item() == pytest.approx(5.0)  # every weight 1: equal log-probs, or not finite

    total, peak, bad = logp_gap(logp, sampler, mask)
    assert (total.item(), peak.item(), bad.item()) == (0.0, 0.0, 2)  # the padded NaN is not counted
    with pytest.raises(
        SyncError, match=r"before step 4, 2 of the sampled tokens have a NaN or infinite log-prob"
    ):
        check_sync(total.item() / 5, peak.item(), threshold=0.1, step=3, nonfinite=int(bad))
    with pytest.raises(SyncError, match="differ from the trainer's by nan"):
        check_sync(float("nan"), 0.0, threshold=0.1, step=3)  # a NaN mean no longer passes as "below"
