"""Our policy-gradient losses against TRL's own code (trl==1.16.0, a dev dependency), on identical tensors.

TRL's `GRPOTrainer._compute_loss` runs unchanged on a stand-in for the trainer that holds only the attributes it
reads; its "model" answers TRL's forward (`model(..., labels=..., fused_lm_head=True)`) with log-probs we control,
so the reference numbers and their gradient come from TRL's code, not from a re-implementation. TRL computes the
sampler's importance weights inline in `_generate_and_score_completions`, which needs a generation; that block of
TRL's source is run as it stands (the test fails if it moves).

Where the options mean the same, loss and gradient match to 1e-6 (in float64 they agree to ~1e-16). Options map:
GSPO = TRL's importance_sampling_level="sequence" with loss_type="grpo"; CISPO's upper bound 1 + epsilon_high =
TRL's epsilon_high for loss_type="cispo" (TRL's is the cap itself); vllm.importance_sampling's level and mode =
TRL's vllm_importance_sampling_mode "<level>_<mode>", min/max = its clip_min/clip_max.

Where we differ on purpose (tests at the end):
- GSPO with beta > 0 and the ratio-weighted KL: we weight each token's k3 by its own ratio pi/pi_old, under which
  k3's gradient is the reverse KL's (test_grpo.py proves it); TRL weights it by the sequence ratio s (its docs say
  the unbiased property holds at token level only). With the plain k3 (kl_ratio_weighted=false) both agree.
- A NaN or infinite sampler log-prob: ours gives that token weight 1 (and the sync check stops the run); TRL maps
  NaN to weight 1 but +inf to the float maximum (so truncate caps it and mask drops it).
- CISPO's lower bound (algo.epsilon) has no TRL counterpart; at its default (null) both have none.
"""

import inspect
import math
import textwrap
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from online_rl.algorithms import grpo  # noqa: E402
from online_rl.algorithms.cispo import cispo_loss  # noqa: E402
from online_rl.algorithms.gspo import gspo_loss  # noqa: E402
from online_rl.algorithms.sampler_correction import ImportanceSampling  # noqa: E402

B, P, T = 4, 2, 5  # completions, prompt tokens, completion tokens
MASK = torch.tensor(
    [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float64
)  # lengths 5, 3, 4, 1
TOKENS = int(MASK.sum())


def rollout_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Log-probs of the policy (with gradient), of the rollout policy one update earlier (mu = 2), of the reference
    and of the sampler, spread enough that the clip, the KL and every importance-sampling bound act."""
    generator = torch.Generator().manual_seed(seed)

    def noise(scale: float) -> torch.Tensor:
        return scale * torch.randn(B, T, generator=generator, dtype=torch.float64)

    logp = -3 * torch.rand(B, T, generator=generator, dtype=torch.float64)
    return {
        "logp": logp,
        "old": logp + noise(0.3),
        "ref": logp + noise(0.5),
        "sampler": logp + noise(0.3) + noise(0.4),
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64),
    }


def trl_importance_weights(old: torch.Tensor, sampler: torch.Tensor, mode: str, low, high) -> torch.Tensor:
    """TRL's vllm_importance_sampling_ratio, by running its block of `_generate_and_score_completions` verbatim."""
    source = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    start = source.index(
        "                mask = completion_mask if tool_mask is None else completion_mask * tool_mask"
    )
    end = source.index("# Compute the per-token log probabilities for the reference model", start)
    block = textwrap.dedent(source[start:end].rstrip() + "\n")
    assert "vllm_importance_sampling_ratio = torch.exp(logps_diff)" in block
    trainer = SimpleNamespace(
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=low,
        vllm_importance_sampling_clip_max=high,
    )
    scope = {
        "self": trainer,
        "completion_mask": MASK,
        "tool_mask": None,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampler,
    }
    exec(block, {"torch": torch, "math": math}, scope)
    return scope["vllm_importance_sampling_ratio"]


class FusedHeadModel:
    """Answers TRL's forward with the log-probs we hand it (the completion's; the prompt's are never read)."""

    def __init__(self, logp: torch.Tensor):
        self.logp = logp

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head):
        prompt = torch.zeros(B, P, dtype=self.logp.dtype)
        return SimpleNamespace(
            log_probs=torch.cat([prompt, self.logp], dim=1),
            entropy=torch.zeros(B, P + T, dtype=self.logp.dtype),
        )


class StandInTrainer:
    """Exactly the attributes `_compute_loss` reads, one process, one micro-batch per optimizer step."""

    _compute_loss = trl_grpo.GRPOTrainer._compute_loss
    _get_per_token_logps_and_entropies = trl_grpo.GRPOTrainer._get_per_token_logps_and_entropies

    def __init__(self, loss_type, epsilon_low, epsilon_high, beta, bias_correction_kl, level, use_vllm):
        self.loss_type, self.epsilon_low, self.epsilon_high, self.beta = (
            loss_type,
            epsilon_low,
            epsilon_high,
            beta,
        )
        self.importance_sampling_level = level
        self.use_vllm = self.vllm_importance_sampling_correction = use_vllm
        self.args = SimpleNamespace(
            use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1
        )
        self.max_completion_length = T
        self.current_gradient_accumulation_steps = 1
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(
            autocast=nullcontext,
            num_processes=1,
            is_main_process=True,
            gather=lambda x: x,
            reduce=lambda x, reduction: x,
        )
        self._metrics = defaultdict(lambda: defaultdict(list))


def trl_loss_and_gradient(case: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logp = tensors["logp"].clone().requires_grad_()
    trainer = StandInTrainer(
        case["trl_loss_type"],
        case["epsilon"],
        case["trl_epsilon_high"],
        case.get("beta", 0.0),
        case.get("kl_ratio_weighted", True),
        case.get("level", "token"),
        use_vllm="is" in case,
    )
    inputs = {
        "prompt_ids": torch.zeros(B, P, dtype=torch.long),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": MASK,
        "advantages": tensors["advantages"],
        "num_items_in_batch": torch.tensor(float(TOKENS)),
    }
    if case.get("mu2", True):
        inputs["old_per_token_logps"] = tensors["old"]
    if "beta" in case:
        inputs["ref_per_token_logps"] = tensors["ref"]
    if "is" in case:
        level, mode, low, high = case["is"]
        old = tensors["old"] if case.get("mu2", True) else tensors["logp"]
        inputs["importance_sampling_ratio"] = trl_importance_weights(
            old, tensors["sampler"], f"{level}_{mode}", low, high
        )
    loss = trainer._compute_loss(FusedHeadModel(logp), inputs)
    (gradient,) = torch.autograd.grad(loss, logp)
    return loss.detach(), gradient


def our_loss_and_gradient(case: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logp = tensors["logp"].clone().requires_grad_()
    loss_fn = {"grpo": grpo.policy_gradient_loss, "gspo": gspo_loss, "cispo": cispo_loss}[case["algo"]]
    loss, _ = loss_fn(
        logp,
        tensors["old"] if case.get("mu2", True) else logp.detach(),
        tensors["advantages"],
        MASK,
        epsilon_low=case["epsilon"],
        epsilon_high=case["trl_epsilon_high"] - 1 if case["algo"] == "cispo" else case["trl_epsilon_high"],
        loss_type="dapo" if case["algo"] == "cispo" else case["trl_loss_type"],
        num_micro_batches=1,
        rollout_token_count=TOKENS,
        max_completion_length=T,
        ref_logp=tensors["ref"] if "beta" in case else None,
        beta=case.get("beta", 0.0),
        kl_ratio_weighted=case.get("kl_ratio_weighted", True),
        sampler_logp=tensors["sampler"] if "is" in case else None,
        importance_sampling=ImportanceSampling(*case["is"]) if "is" in case else None,
    )
    (gradient,) = torch.autograd.grad(loss, logp)
    return loss.detach(), gradient


GRPO = {"algo": "grpo", "epsilon": 0.2, "trl_epsilon_high": 0.2}
GSPO = {"algo": "gspo", "trl_loss_type": "grpo", "level": "sequence"}
CISPO = {"algo": "cispo", "trl_loss_type": "cispo", "epsilon": None}
CASES = {  # TRL's GRPOConfig in words: each case's options on both sides
    "grpo on-policy": {**GRPO, "trl_loss_type": "grpo", "mu2": False},
    "grpo mu=2": {**GRPO, "trl_loss_type": "grpo"},
    "bnpo mu=2": {**GRPO, "trl_loss_type": "bnpo"},
    "dr_grpo mu=2 clip-higher": {**GRPO, "trl_loss_type": "dr_grpo", "trl_epsilon_high": 0.28},
    "dapo mu=2 clip-higher": {**GRPO, "trl_loss_type": "dapo", "trl_epsilon_high": 0.28},
    "dapo beta=0.04 ratio-weighted kl": {**GRPO, "trl_loss_type": "dapo", "beta": 0.04},
    "grpo beta=0.04 plain k3": {**GRPO, "trl_loss_type": "grpo", "beta": 0.04, "kl_ratio_weighted": False},
    "dapo IS token truncate 2 (ours)": {
        **GRPO,
        "trl_loss_type": "dapo",
        "is": ("token", "truncate", None, 2.0),
    },
    "grpo IS token truncate [0.5, 2]": {
        **GRPO,
        "trl_loss_type": "grpo",
        "is": ("token", "truncate", 0.5, 2.0),
    },
    "bnpo IS token mask [0.5, 2]": {**GRPO, "trl_loss_type": "bnpo", "is": ("token", "mask", 0.5, 2.0)},
    "dapo IS sequence truncate 3": {
        **GRPO,
        "trl_loss_type": "dapo",
        "is": ("sequence", "truncate", None, 3.0),
    },
    "dapo IS sequence mask 3 (TRL's)": {
        **GRPO,
        "trl_loss_type": "dapo",
        "is": ("sequence", "mask", None, 3.0),
    },
    "gspo mu=2 (3e-4, 4e-4)": {**GSPO, "epsilon": 3e-4, "trl_epsilon_high": 4e-4},
    "gspo mu=2 (0.2, 0.2)": {**GSPO, "epsilon": 0.2, "trl_epsilon_high": 0.2},
    "gspo beta=0.04 plain k3, IS sequence mask 3": {
        **GSPO,
        "epsilon": 0.2,
        "trl_epsilon_high": 0.28,
        "beta": 0.04,
        "kl_ratio_weighted": False,
        "is": ("sequence", "mask", None, 3.0),
    },  # fmt: skip
    "cispo mu=2 cap 5": {**CISPO, "trl_epsilon_high": 5.0},
    "cispo mu=2 cap 1.2": {**CISPO, "trl_epsilon_high": 1.2},
    "cispo cap 1.2 beta=0.04, IS token truncate 2": {
        **CISPO,
        "trl_epsilon_high": 1.2,
        "beta": 0.04,
        "is": ("token", "truncate", None, 2.0),
    },  # fmt: skip
}


@pytest.mark.parametrize("name", CASES)
def test_our_loss_and_gradient_are_trl_s(name):
    tensors = rollout_tensors()
    trl_loss, trl_gradient = trl_loss_and_gradient(CASES[name], tensors)
    loss, gradient = our_loss_and_gradient(CASES[name], tensors)
    assert trl_gradient.abs().max() > 1e-3  # a case whose gradient vanished would compare nothing
    assert abs(loss - trl_loss) <= 1e-6, (name, float(loss), float(trl_loss))
    assert (gradient - trl_gradient).abs().max() <= 1e-6, name


@pytest.mark.parametrize(
    "level, mode, low, high",
    [("token", "truncate", None, 2.0), ("token", "mask", 0.5, 2.0), ("sequence", "truncate", 0.5, 3.0),
     ("sequence", "mask", None, 3.0), ("sequence", "mask", 0.5, None)],
)  # fmt: skip
def test_our_importance_weights_are_trl_s(level, mode, low, high):
    from online_rl.algorithms.sampler_correction import importance_weights

    tensors = rollout_tensors(seed=1)
    theirs = trl_importance_weights(tensors["old"], tensors["sampler"], f"{level}_{mode}", low, high)
    ours = importance_weights(
        tensors["old"], tensors["sampler"], MASK, ImportanceSampling(level, mode, low, high)
    )
    real = (
        MASK.bool() if level == "token" else torch.ones(B, 1, dtype=torch.bool)
    )  # padding: ours 1, TRL's too
    assert (ours - theirs)[real].abs().max() <= 1e-12
    assert 0 < int((ours == 0).sum() if mode == "mask" else (ours != 1).sum())  # the bounds did act


def test_gspo_with_the_ratio_weighted_kl_differs_from_trl_on_purpose():
    """TRL multiplies each token's k3 by the sequence ratio s; we by the token's own ratio, the weight under which
    k3's gradient is KL(pi || pi_ref)'s (test_grpo.py). The rest of the loss is the same: with the KL term set to
    TRL's weighting by hand, the two agree."""
    tensors = rollout_tensors()
    case = {**GSPO, "epsilon": 0.2, "trl_epsilon_high": 0.2, "beta": 0.04}
    trl_loss, trl_gradient = trl_loss_and_gradient(case, tensors)
    loss, gradient = our_loss_and_gradient(case, tensors)
    assert (gradient - trl_gradient).abs().max() > 1e-4
    logp = tensors["logp"].clone().requires_grad_()
    without_kl, _ = gspo_loss(
        logp, tensors["old"], tensors["advantages"], MASK,
        epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", num_micro_batches=1, rollout_token_count=TOKENS,
        max_completion_length=T,
    )  # fmt: skip
    from online_rl.algorithms.gspo import sequence_ratio

    s = sequence_ratio(logp, tensors["old"], MASK).unsqueeze(1)
    trl_kl = s * grpo.k3_kl(logp, tensors["ref"])
    with_trl_kl = without_kl + 0.04 * grpo.aggregate_loss(trl_kl, MASK, "grpo", 1, TOKENS, T)
    assert abs(with_trl_kl.detach() - trl_loss) <= 1e-6
    (trl_weighted_gradient,) = torch.autograd.grad(with_trl_kl, logp)
    assert (trl_weighted_gradient - trl_gradient).abs().max() <= 1e-6
