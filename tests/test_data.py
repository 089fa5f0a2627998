"""The real datasets.load_dataset path on local files with the hub datasets' schemas, and prompt formatting."""

import pytest

from online_rl.data import (
    PromptSampler,
    check_prompt_budget,
    load_prompts,
    synthetic_arithmetic,
    tokenize_prompts,
)
from online_rl.models import load_tokenizer
from rewards.math_accuracy import math_accuracy

from .conftest import DATA, compose_config


def data_config(option, *overrides):
    return compose_config([f"data={option}", *overrides]).data


def test_numina_schema_loads_through_load_dataset():
    cfg = data_config(
        "numina_math_tir", "data.path=json", f"data.data_files={DATA / 'numina_math_tir_sample.jsonl'}"
    )
    dataset = load_prompts(cfg)
    assert dataset[0]["prompt"].startswith("What is the sum of the first 10")
    assert "\\boxed{55}" in dataset[0]["solution"]
    assert "messages" in dataset.column_names  # other columns stay for rewards that want them
    # the gold solutions parse: a right answer scores 1
    assert math_accuracy(["q"], ["<answer>55</answer>"], solution=[dataset[0]["solution"]]) == [1.0]
    assert "<think>" in cfg.system_prompt  # the DeepSeek-R1 system prompt of the seed notebook


def test_gsm8k_schema_keeps_only_the_final_answer():
    cfg = data_config(
        "gsm8k", "data.path=json", f"data.data_files={DATA / 'gsm8k_sample.jsonl'}", "data.subset=null"
    )
    dataset = load_prompts(cfg)
    assert dataset["solution"] == ["6", "210", "15", "48"]
    assert dataset[1]["prompt"].startswith("Tom reads 15 pages")


def test_missing_column_names_the_fix():
    cfg = data_config(
        "gsm8k",
        "data.path=json",
        f"data.data_files={DATA / 'numina_math_tir_sample.jsonl'}",
        "data.subset=null",
    )
    with pytest.raises(
        ValueError,
        match=r"no column 'question' \(data.prompt_column\).*\['problem', 'solution', 'messages'\]",
    ):
        load_prompts(cfg)


def test_missing_solution_column_names_the_fix():
    cfg = data_config(
        "numina_math_tir",
        "data.path=json",
        f"data.data_files={DATA / 'gsm8k_sample.jsonl'}",
        "data.prompt_column=question",
    )
    with pytest.raises(
        ValueError, match=r"no column 'solution' \(data.solution_column\).*or data.solution_column=null"
    ):
        load_prompts(cfg)


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = data_config("numina_math_tir", "data.path=json", f"data.data_files={empty}")
    with pytest.raises(ValueError, match="no rows"):
        load_prompts(cfg)


def test_synthetic_data_is_the_same_every_time():
    a, b = synthetic_arithmetic(50), synthetic_arithmetic(50)
    assert a["prompt"] == b["prompt"]
    for question, answer in zip(a["prompt"][:20], a["solution"][:20]):
        assert eval(question.removeprefix("What is ").removesuffix("?")) == int(answer)


def test_chat_template_and_left_truncation(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), trust_remote_code=False)
    [full] = tokenize_prompts(tokenizer, ["What is 12 + 30?"], "Answer with a number.", 10_000)
    text = tokenizer.decode(full)
    assert text.startswith(
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?"
    )
    assert text.endswith("<|im_start|>assistant\n")
    [cut] = tokenize_prompts(tokenizer, ["What is 12 + 30?"], "Answer with a number.", 8)
    assert cut == full[-8:]  # the end, where the question and the assistant turn are, survives


def test_prompt_budget_smaller_than_the_system_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir), trust_remote_code=False)
    with pytest.raises(ValueError, match=r"data.max_prompt_length=5 tokens.*Raise it"):
        check_prompt_budget(tokenizer, "Answer with a number, and think before you answer.", 5)


def test_sampler_is_seeded_and_resumable():
    dataset = synthetic_arithmetic(10)
    first = PromptSampler(dataset, batch_size=4, seed=1)
    batches = [
        first.next_batch() for _ in range(3)
    ]  # the third batch starts epoch 2 (10 rows = 2 full batches)
    assert {r["prompt"] for r in batches[0] + batches[1]} <= set(dataset["prompt"])
    assert len({r["prompt"] for r in batches[0] + batches[1]}) == 8  # no repeats inside an epoch
    again = PromptSampler(dataset, batch_size=4, seed=1)
    assert [again.next_batch() for _ in range(3)] == batches
    resumed = PromptSampler(dataset, batch_size=4, seed=1)
    resumed.load_state_dict({"epoch": 1, "position": 0})
    assert resumed.next_batch() == batches[2]
    with pytest.raises(ValueError, match="prompts_per_step=20 is larger than the dataset"):
        PromptSampler(dataset, batch_size=20, seed=1)
