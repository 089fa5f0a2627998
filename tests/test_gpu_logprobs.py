"""The trainer's log-probs on a CUDA GPU (`make test-gpu`): the fused compiled kernels against the eager fp32 maths."""

import pytest
import torch

from online_rl import logprobs

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


def test_fused_logprobs_match_fp32_at_the_qwen2_vocabulary():
    """bf16 logits of a 152k vocabulary, sliced as the model's output is: values, gradients and entropies of
    the compiled path equal one fp32 log_softmax over the whole tensor."""
    torch.manual_seed(0)
    output = (4 * torch.randn(4, 65, 151936, device="cuda")).bfloat16().requires_grad_()
    logits, targets = output[:, :-1], torch.randint(0, 151936, (4, 64), device="cuda")
    weights = torch.randn(4, 64, device="cuda")
    logp, entropy = logprobs.token_logprobs(logits, targets, 0.7, with_entropy=True)
    (logp * weights).sum().backward()
    compiled_grad, output.grad = output.grad, None

    full = torch.log_softmax(logits.float() / 0.7, dim=-1)
    expected = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad.float(), output.grad.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach(), atol=1e-4, rtol=1e-4)
    assert logp.dtype == torch.float32 and not entropy.requires_grad
