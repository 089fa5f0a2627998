"""The real datasets.load_dataset path on local files with the hub datasets' schemas, prompt formatting, and
the eval rows held out of a user's own file."""

import json
import logging

import pytest

from online_rl.checks import check_config
from online_rl.data import (
    PromptSampler,
    check_prompt_budget,
    load_prompts,
    synthetic_arithmetic,
    tokenize_prompts,
    training_and_eval_prompts,
)
from online_rl.models import load_tokenizer
from online_rl.rewards.math_accuracy import math_accuracy

from .conftest import DATA, OWN_DATA, compose_config, write_own_jsonl


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
    assert math_accuracy(completions=["<answer>55</answer>"], solution=[dataset[0]["solution"]]) == [1.0]
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


def own_data_sets(*overrides, min_training_rows=4):
    """(training rows, eval rows) of a user's data, composed as `python train.py data=jsonl ...`."""
    cfg = compose_config([*OWN_DATA, *overrides])
    return training_and_eval_prompts(load_prompts(cfg.data), cfg.data, cfg.eval, min_training_rows)


def test_own_data_holds_out_seeded_eval_rows_that_training_never_samples(tmp_path, caplog):
    """No test split: eval.holdout_size rows of the file, the same whatever `seed` says, which the training
    sampler never yields in any epoch; the log line names them."""
    data_file = write_own_jsonl(tmp_path / "own.jsonl", 40)
    with caplog.at_level(logging.INFO, logger="online_rl.data"):
        training, held_out = own_data_sets(f"data.data_files={data_file}", "eval.holdout_size=8")
    assert (len(training), len(held_out)) == (32, 8)
    assert held_out.column_names == training.column_names  # question/answer mapped to prompt/solution
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    indices = [i for i, row in enumerate(rows) if row["question"] in set(held_out["prompt"])]
    assert held_out["solution"] == [rows[i]["answer"] for i in indices]
    [line] = [r.getMessage() for r in caplog.records if "held out" in r.getMessage()]
    assert line.startswith("Evaluation set: 8 rows held out of data.split=train and never trained on")
    assert "no split 'test' (eval.split=test[:64]; its splits: ['train'])" in line
    assert line.endswith(f"indices in data.split: {', '.join(map(str, indices))}.")

    sampler = PromptSampler(training, batch_size=4, seed=42)
    sampled = {
        row["prompt"] for _ in range(3 * len(training) // 4) for row in sampler.next_batch()
    }  # 3 epochs
    assert sampled == set(training["prompt"]) and not sampled & set(held_out["prompt"])

    again = own_data_sets(
        f"data.data_files={data_file}", "eval.holdout_size=8", "seed=7"
    )  # a resume, or another seed: same rows
    assert again[1]["prompt"] == held_out["prompt"] and again[0]["prompt"] == training["prompt"]


def test_a_repeated_held_out_prompt_does_not_train_either(tmp_path):
    data_file = write_own_jsonl(tmp_path / "twice.jsonl", 20, copies=2)  # every question twice
    training, held_out = own_data_sets(f"data.data_files={data_file}", "eval.holdout_size=3")
    assert not set(training["prompt"]) & set(held_out["prompt"])
    assert len(training) == 40 - 2 * len(set(held_out["prompt"]))


def test_a_holdout_that_leaves_too_little_to_train_on_names_a_size_that_works(tmp_path):
    data_file = write_own_jsonl(tmp_path / "small.jsonl", 10)
    with pytest.raises(
        ValueError,
        match=r"eval.holdout_size=64: .* data.split's 10 rows .* fewer than prompts_per_step=4 .* eval.holdout_size=2",
    ):
        own_data_sets(f"data.data_files={data_file}")
    training, held_out = own_data_sets(
        f"data.data_files={data_file}", "eval.holdout_size=2"
    )  # the value the error names
    assert (len(training), len(held_out)) == (8, 2)
    with pytest.raises(ValueError, match="add rows to the data, set eval.split to a split the data has"):
        own_data_sets(f"data.data_files={data_file}", "eval.holdout_size=1", min_training_rows=10)


def test_data_with_a_test_split_evaluates_on_it_and_trains_on_all_of_train(tmp_path):
    folder = tmp_path / "with_test"
    folder.mkdir()
    write_own_jsonl(folder / "train.jsonl", 12)
    (folder / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n")
    training, held_out = own_data_sets(f"data.path={folder}")
    assert len(training) == 12 and held_out["prompt"] == ["What is 2 + 2?"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.path=json"], r"data.synthetic_rows=2000 .* data=jsonl data.data_files=<file>"),
        (["data=jsonl"], "data.path=json reads local files.*data.data_files=my.jsonl"),
    ],
)
def test_data_settings_that_would_go_unread_fail_before_loading(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose_config(overrides))
