"""Evaluation: the pass@k maths on hand-computed values, the eval split, greedy decoding, and real tiny runs
(evaluation during training, on a user's own JSONL file too, and eval_only on the exported model and on a
LoRA adapter)."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.data import held_out_arithmetic, load_prompts, synthetic_arithmetic, training_and_eval_prompts
from online_rl.engines.transformers_engine import TransformersEngine
from online_rl.evaluation import k_values, mean_pass_at_k, pass_at_k
from online_rl.loop import run

from .conftest import DATA, OWN_DATA, compose_config, write_own_jsonl

SMALL_ROLLOUT = ["prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]
SMALL = ["data.synthetic_rows=64", *SMALL_ROLLOUT]
EVAL = ["eval.split='test[:8]'", "eval.num_generations=4", "eval.batch_size=4"]


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 0, 1, 0.0),
        (4, 1, 1, 0.25),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 3, 2, 1.0),  # n - c < k: every pair holds a pass
        (4, 1, 4, 1.0),
        (4, 4, 1, 1.0),
    ],
)
def test_pass_at_k_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_pass_at_k_averages_over_prompts():
    passes = [[True, False, False, False], [True, True, False, False], [False] * 4]
    means = mean_pass_at_k(passes, [1, 2, 4])
    assert means[1] == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert means[2] == pytest.approx((0.5 + (1 - 1 / 6) + 0) / 3)
    assert means[4] == pytest.approx(2 / 3)
    assert k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6] and k_values(1) == [1]


def test_synthetic_eval_split_is_held_out_and_sliced_like_load_dataset():
    training = set(synthetic_arithmetic(2000)["prompt"])
    full = held_out_arithmetic(2000, "test")
    assert len(full) == 500 and len(set(full["prompt"])) == 500
    assert not training & set(full["prompt"])
    assert held_out_arithmetic(2000, "test[:64]")["prompt"] == full["prompt"][:64]
    assert held_out_arithmetic(2000, "test[10%:20%]")["prompt"] == full["prompt"][50:100]
    for question, answer in zip(full["prompt"][:20], full["solution"][:20]):
        assert eval(question.removeprefix("What is ").removesuffix("?")) == int(answer)
    with pytest.raises(ValueError, match="eval.split='test\\[::2\\]'"):
        held_out_arithmetic(2000, "test[::2]")


def test_eval_split_of_a_real_dataset_and_a_missing_split():
    """A split the data has is the eval set, and training keeps every row; a missing one is held out of them."""
    gsm8k = [
        "data=gsm8k",
        "data.path=json",
        f"data.data_files={DATA / 'gsm8k_sample.jsonl'}",
        "data.subset=null",
    ]
    cfg = compose_config([*gsm8k, "eval.split='train[:2]'"])
    training, held_out = training_and_eval_prompts(load_prompts(cfg.data), cfg.data, cfg.eval, 2)
    assert held_out["solution"] == ["6", "210"] and len(training) == 4
    cfg = compose_config([*gsm8k, "eval.split=test", "eval.holdout_size=1"])
    training, held_out = training_and_eval_prompts(load_prompts(cfg.data), cfg.data, cfg.eval, 2)
    assert len(held_out) == 1 and len(training) == 3
    assert held_out["prompt"][0] not in training["prompt"]


def test_greedy_decoding_picks_the_argmax_token(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TransformersEngine(model, tokenizer, torch.device("cpu"), None)
    greedy = compose_config(["sampling.temperature=0", "sampling.max_completion_length=6"]).sampling
    prompt = tokenizer("What is 1 + 2?")["input_ids"]
    rollout = engine.generate([prompt], 3, greedy)
    assert rollout.completion_ids[0] == rollout.completion_ids[1] == rollout.completion_ids[2]
    ids = list(prompt)
    with torch.no_grad():
        for token in rollout.completion_ids[0]:
            assert token == int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.pass_reward=accuracy"], "eval.pass_reward=accuracy is not one of the configured rewards"),
        (["eval.temperature=0"], "eval.greedy=true"),
        (["eval.num_generations=0"], "eval.num_generations=0"),
        (["eval.holdout_size=0"], "eval.holdout_size=0: .* use >= 1, e.g. eval.holdout_size=64"),
        (["save_merged=true"], "model.lora.enabled=false"),
    ],
)
def test_bad_eval_and_export_settings_fail_before_training(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(make_config("max_steps=1", "eval_every=1", *SMALL, *overrides))


def test_training_evaluates_on_schedule_without_changing_the_run(make_config, tmp_path):
    """Evaluations at steps 2 and 4 (the end), logged under eval/; the training itself is the run without them;
    eval_only on the exported model reproduces the final greedy scores exactly."""
    summary = run(make_config("max_steps=4", "eval_every=2", *SMALL, *EVAL))
    assert len(summary.evals) == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/pass@1" in line] == [2, 4]
    for metrics in summary.evals:
        assert metrics["eval/prompts"] == 8
        assert 0 <= metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= metrics["eval/pass@4"] <= 1
        for key in ("eval/pass@1_greedy", "eval/reward_mean_greedy", "eval/reward_mean", "eval/digits_mean"):
            assert key in metrics, key
    # pass = total reward >= 1.0 (the default): check the share against the mean it cannot exceed
    assert summary.evals[-1]["eval/pass@1"] <= summary.evals[-1]["eval/digits_mean"] + 1e-9

    plain = run(make_config("max_steps=4", "eval_every=0", f"output_dir={tmp_path}/plain", *SMALL))
    assert plain.reward_means == summary.reward_means
    assert [m["train/loss"] for m in plain.history] == [m["train/loss"] for m in summary.history]

    scored = run(
        make_config(
            "eval_only=true", f"eval.model={summary.model_dir}", f"output_dir={tmp_path}/eval", *SMALL, *EVAL
        )
    )
    assert scored.final_checkpoint is None and not scored.history
    [only] = scored.evals
    assert only["eval/pass@1_greedy"] == summary.evals[-1]["eval/pass@1_greedy"]
    assert only["eval/reward_mean_greedy"] == pytest.approx(
        summary.evals[-1]["eval/reward_mean_greedy"], abs=1e-6
    )
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["model"] == str(summary.model_dir) and saved["eval/pass@1"] == only["eval/pass@1"]


def test_eval_only_scores_a_lora_adapter_and_the_built_base_model(make_config, tmp_path):
    lora = ["model.lora.enabled=true", "optim.lr=1e-2"]
    trained = run(
        make_config("max_steps=3", f"output_dir={tmp_path}/train", *SMALL, *lora, "eval_every=3", *EVAL)
    )
    assert (trained.model_dir / "adapter_config.json").exists()
    scored = run(
        make_config(
            "eval_only=true", f"eval.model={trained.model_dir}", f"output_dir={tmp_path}/a", *SMALL, *EVAL
        )
    )
    assert scored.evals[0]["eval/pass@1_greedy"] == trained.evals[-1]["eval/pass@1_greedy"]
    assert scored.evals[0]["eval/reward_mean_greedy"] == pytest.approx(
        trained.evals[-1]["eval/reward_mean_greedy"], abs=1e-6
    )
    # no eval.model: the model group's model, here the random one built as for training (a baseline)
    base = run(make_config("eval_only=true", f"output_dir={tmp_path}/base", *SMALL, *EVAL))
    assert base.evals[0]["eval/prompts"] == 8
    assert (tmp_path / "base" / "random_init" / "tiny-random-qwen2" / "model.safetensors").exists()


def test_own_jsonl_trains_and_evaluates_on_rows_held_out_of_it(make_config, tmp_path, caplog):
    """A user's file has no test split: with the default eval.split the run used to stop ("does not name a
    split of json"); now it evaluates on eval.holdout_size rows held out of the file, logged, and eval_only on
    its model scores those same rows. eval_every=0 holds nothing out (here 64 rows would not even fit)."""
    data_file = write_own_jsonl(tmp_path / "own.jsonl", 40)
    own = [*OWN_DATA, f"data.data_files={data_file}", "model=tiny", "vllm=off", *SMALL_ROLLOUT]
    own += ["rewards=[digits]", "sampling.max_completion_length=8"]
    small_eval = ["eval.holdout_size=8", "eval.num_generations=2", "eval.batch_size=8"]
    with caplog.at_level(logging.INFO, logger="online_rl"):
        trained = run(make_config(*own, "max_steps=2", "eval_every=2", *small_eval))
    [held_out_line] = [r.getMessage() for r in caplog.records if "held out of data.split" in r.getMessage()]
    assert held_out_line.startswith("Evaluation set: 8 rows held out of data.split=train")
    assert [m["eval/prompts"] for m in trained.evals] == [8]
    assert any("eval at step 2 on 8 prompts" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="online_rl"):
        scored = run(
            make_config(
                *own,
                "eval_only=true",
                f"eval.model={trained.model_dir}",
                f"output_dir={tmp_path}/e",
                *small_eval,
            )
        )
    assert [r.getMessage() for r in caplog.records if "held out of data.split" in r.getMessage()] == [
        held_out_line
    ]
    assert scored.evals[0]["eval/pass@1_greedy"] == trained.evals[-1]["eval/pass@1_greedy"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="online_rl"):
        plain = run(make_config(*own, "max_steps=1", "eval_every=0", f"output_dir={tmp_path}/plain"))
    assert not plain.evals and not [r for r in caplog.records if "Evaluation set" in r.getMessage()]
