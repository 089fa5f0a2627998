"""The rollout's record: rows expanded by G once, micro-batches that carry their rows' signal."""

from __future__ import annotations

import pytest
import torch

from online_rl.engines import Rollout
from online_rl.rollout import Samples


class CharTokenizer:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(96 + t) for t in row) for row in ids]


def two_prompts_two_samples(sampler_logprobs=True) -> Samples:
    rows = [{"prompt": "1+1", "solution": "2"}, {"prompt": "2+2", "solution": "4"}]
    rollout = Rollout(
        completion_ids=[[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]],
        finished=[True, False, True, True],
        sampler_logprobs=[[-0.1] * 3, [-0.2], [-0.3] * 2, [-0.4] * 4] if sampler_logprobs else None,
    )
    return Samples.from_rollout(rows, [[11], [12, 13]], rollout, [True] * 4, CharTokenizer())


def test_rows_expand_each_prompt_and_column_by_its_samples():
    samples = two_prompts_two_samples()
    assert len(samples) == 4 and samples.group_size == 2
    assert samples.prompts == ["1+1", "1+1", "2+2", "2+2"]
    assert samples.prompt_ids == [[11], [11], [12, 13], [12, 13]]
    assert samples.columns == {"solution": ["2", "2", "4", "4"], "completion_lengths": [3, 1, 2, 4]}
    assert samples.completions == ["abc", "d", "ef", "ghij"]
    assert samples.finished.tolist() == [True, False, True, True]


def test_micro_batches_by_length_carry_their_rows_signal_and_padding():
    samples = two_prompts_two_samples()
    samples.signal = {"advantages": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    micro_batches = samples.micro_batches(
        torch.ones(4, dtype=torch.bool), 2, True, 1,
        pad_id=0, device=torch.device("cpu"), mask_truncated=True,
    )  # fmt: skip
    # lengths (prompt + completion): 4, 2, 4, 6 -> longest first: rows 3, 0 | 2, 1
    assert [mb.rows for mb in micro_batches] == [[3, 0], [2, 1]]
    assert micro_batches[0].signal["advantages"].tolist() == pytest.approx([0.4, 0.1])
    assert micro_batches[1].signal["advantages"].tolist() == pytest.approx([0.3, 0.2])
    # the real tokens and the padded positions of [pad prompt | completion pad], 2 + 4 columns per row
    assert (micro_batches[0].tokens, micro_batches[0].positions) == (10, 12)
    # row 1 was cut at max_completion_length: mask_truncated leaves it out of the loss
    assert micro_batches[1].packed.completion_mask.tolist() == [[1, 1], [0, 0]]
    assert micro_batches[1].packed.sampler_logp[0].tolist() == pytest.approx([-0.3, -0.3])


def test_pairs_share_a_micro_batch_and_untrained_rows_stay_out():
    samples = two_prompts_two_samples(sampler_logprobs=False)
    pairs = samples.micro_batches(
        torch.ones(4, dtype=torch.bool), 2, True, 2, pad_id=0, device=torch.device("cpu")
    )
    assert [mb.rows for mb in pairs] == [[2, 3], [0, 1]]  # whole pairs, the longer pair first
    engine_rows = torch.tensor([True, False, True, False])  # Nash-MD trains on the engine's samples only
    only = samples.micro_batches(engine_rows, 4, False, 1, pad_id=0, device=torch.device("cpu"))
    assert [mb.rows for mb in only] == [[0, 2]] and only[0].packed.sampler_logp is None
