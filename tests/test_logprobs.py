"""The trainer's token log-probs, and the transformers engine that samples."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.engines.transformers_engine import TransformersEngine, cut_at_eos
from online_rl.logprobs import completion_logprobs, micro_batch_rows, pack

from .conftest import compose_config


def unpadded_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_padding_does_not_change_logprobs(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # the second is left-padded by 3
    completions = [[20, 21], [22, 23, 24, 25]]  # the first is right-padded by 2
    batch = pack(prompts, completions, pad_id=0)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, batch, temperature=0.7, with_entropy=True)
        for i in range(2):
            expected = unpadded_logprobs(model, prompts[i], completions[i], 0.7)
            torch.testing.assert_close(logp[i, : len(completions[i])], expected, atol=1e-5, rtol=1e-5)
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    vocab = model.config.vocab_size
    assert ((entropy > 0) & (entropy <= torch.log(torch.tensor(float(vocab))) + 1e-4)).all()


def test_cut_at_eos():
    assert cut_at_eos([4, 5, 2, 7, 2], {2}) == ([4, 5, 2], True)
    assert cut_at_eos([4, 5, 6], {2}) == ([4, 5, 6], False)


def test_transformers_engine_samples_n_per_prompt(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.train()
    engine = TransformersEngine(model, tokenizer, torch.device("cpu"), None)
    sampling = compose_config(["sampling.max_completion_length=6"]).sampling
    prompts = [tokenizer("What is 1 + 2?")["input_ids"], tokenizer("What is 40 - 3?")["input_ids"]]
    torch.manual_seed(0)
    first = engine.generate(prompts, n=3, sampling=sampling)
    torch.manual_seed(0)
    again = engine.generate(prompts, n=3, sampling=sampling)
    assert (
        len(first.completion_ids) == 6 and first.completion_ids == again.completion_ids
    )  # seeded sampling repeats
    assert len(set(map(tuple, first.completion_ids))) > 1  # it samples, not greedy
    for ids, finished in zip(first.completion_ids, first.finished):
        assert 0 < len(ids) <= 6
        assert finished == (ids[-1] == tokenizer.eos_token_id)
        assert tokenizer.pad_token_id not in ids[:-1]
    assert model.training  # the engine restores train mode after sampling in eval mode


def test_packed_batch_keeps_sampler_logprobs_when_moved():
    batch = pack([[1, 2], [3]], [[4], [5, 6]], pad_id=0, sampler_logprobs=[[-0.5], [-1.0, -2.0]])
    moved = batch.to(torch.device("cpu"))
    assert moved.sampler_logp.tolist() == [[-0.5, 0.0], [-1.0, -2.0]]
    assert moved.completion_mask.tolist() == [[1, 0], [1, 1]]


def test_chunked_logprobs_equal_the_full_log_softmax_in_value_and_gradient(monkeypatch):
    """Logits are upcast and normalised a chunk of rows at a time (recomputed in backward): the same
    log-probs, entropies and gradients as one log_softmax over the whole tensor, bf16 logits included."""
    from online_rl import logprobs

    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * 5 * 11)  # 3 rows per chunk: 7 rows -> 3 chunks
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(7, 5, 11)).to(dtype).requires_grad_()
        targets = torch.randint(0, 11, (7, 5))
        weights = torch.randn(7, 5)  # a loss that weighs every position differently
        logp, entropy = logprobs.token_logprobs(logits, targets, temperature=0.7, with_entropy=True)
        (logp * weights).sum().backward()
        chunked_grad, logits.grad = logits.grad, None

        full = torch.log_softmax(logits.float() / 0.7, dim=-1)
        expected = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (expected * weights).sum().backward()
        torch.testing.assert_close(logp, expected)
        torch.testing.assert_close(chunked_grad, logits.grad)
        torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach())
        assert logp.dtype == torch.float32 and not entropy.requires_grad


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_fused_logprob_kernels_equal_the_eager_ones_in_value_and_gradient(temperature):
    """The GPU path's two torch.compile'd kernels with their own backward (compiled here for the CPU: same
    graphs, other backend) give the eager fp32 values, entropies and gradients, on bf16 logits and on a
    strided view as the model's output is sliced; without the entropy, only the log-probs."""
    from online_rl import logprobs

    torch.manual_seed(0)
    for dtype, width in ((torch.bfloat16, 5), (torch.float32, 3)):  # a second shape: no recompile needed
        output = (3 * torch.randn(4, width + 1, 11)).to(dtype).requires_grad_()
        logits = output[:, :-1]  # (B, C, V), not contiguous
        targets = torch.randint(0, 11, (4, width))
        weights = torch.randn(4, width)
        logp, entropy = logprobs.fused_token_logprobs(logits, targets, temperature, with_entropy=True)
        (logp * weights).sum().backward()
        fused_grad, output.grad = output.grad, None
        expected = logprobs.chunk_logprobs(logits, targets, temperature)
        (expected * weights).sum().backward()
        torch.testing.assert_close(logp, expected)
        assert fused_grad.dtype == dtype
        torch.testing.assert_close(fused_grad, output.grad)
        full = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
        torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
        assert not entropy.requires_grad
        alone, no_entropy = logprobs.fused_token_logprobs(logits, targets, temperature)
        assert no_entropy is None
        torch.testing.assert_close(alone, expected)


LENGTHS = [5, 30, 12, 28, 7, 31, 11, 29]  # tokens of rows 0-7 (prompt + completion)


def padding(groups: list[list[int]], lengths: list[int]) -> int:
    """Token positions `pack` fills with padding: every row padded to its micro-batch's longest."""
    return sum(len(rows) * max(lengths[r] for r in rows) - sum(lengths[r] for r in rows) for rows in groups)


@pytest.mark.parametrize(
    "rows, per_unit, by_length, size, expected",
    [
        # the rollout's order: consecutive rows
        (range(8), 1, False, 4, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # longest first: 31, 30, 29, 28 | 12, 11, 7, 5
        (range(8), 1, True, 4, [[5, 1, 7, 3], [2, 6, 4, 0]]),
        # a last micro-batch with fewer rows
        (range(8), 1, True, 3, [[5, 1, 7], [3, 2, 6], [4, 0]]),
        # pairs stay whole and in order, ranked by their longer row: (4,5) 31, (0,1) 30, (6,7) 29, (2,3) 28
        (range(8), 2, True, 4, [[4, 5, 0, 1], [6, 7, 2, 3]]),
        # a micro-batch smaller than a pair still holds one whole pair
        (range(4), 2, False, 1, [[0, 1], [2, 3]]),
        # Nash-MD trains on every other row only: 12, 11 | 7, 5
        ([0, 2, 4, 6], 1, True, 2, [[2, 6], [4, 0]]),
    ],
)
def test_micro_batch_rows(rows, per_unit, by_length, size, expected):
    assert micro_batch_rows(list(rows), LENGTHS, size, by_length, per_unit) == expected


def test_micro_batches_by_length_pad_less_and_as_many_on_every_rank():
    generator = random.Random(0)
    lengths = [generator.randint(20, 1024) for _ in range(128)]  # completions of a math task, say
    rows = list(range(128))
    in_order = micro_batch_rows(rows, lengths, 8, by_length=False)
    by_length = micro_batch_rows(rows, lengths, 8, by_length=True)
    assert sorted(r for rows in by_length for r in rows) == list(range(128))
    assert len(by_length) == len(in_order) == 16  # ranks agree on the count of backward passes
    # 0.42 of the positions are padding in the rollout's order, 0.05 sorted
    total = sum(len(rows) * max(lengths[r] for r in rows) for rows in in_order)
    assert padding(in_order, lengths) / total > 0.3
    assert padding(by_length, lengths) < padding(in_order, lengths) / 10
