"""A new user's mistakes end in our own message (the key or the reward, and a value or fix that works), not a
library's traceback, and silent failures are said out loud. Where the config alone can tell, the message comes
from check_config, before anything loads."""

import json
import logging

import pytest
from omegaconf import open_dict
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from online_rl.checks import check_config
from online_rl.config import RewardConfig
from online_rl.data import tokenize_prompts
from online_rl.loop import run
from online_rl.models import ModelUnavailable, load_tokenizer
from online_rl.rewarding import RewardError, load_reward_functions, score_completions

from .conftest import compose_config

SMALL = ["data.synthetic_rows=64", "prompts_per_step=2", "algo.num_generations=4", "micro_batch_size=8"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompts_per_step=0", "prompts_per_step=0 must be at least 1, e.g. prompts_per_step=8"),
        ("sampling.max_completion_length=0", "sampling.max_completion_length=0 must be at least 1"),
        ("max_steps=-1", "max_steps=-1 must be at least 1"),
        ("data.max_prompt_length=0", "data.max_prompt_length=0 must be at least 1"),
        ("optim.lr=-1", r"optim.lr=-1.0 must be > 0, e.g. optim.lr=1e-6"),
        ("optim.lr=nan", r"optim.lr=nan must be > 0"),
        ("optim.adam_beta2=1", r"optim.adam_beta2=1.0 must be in \[0, 1\)"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 must be >= 0"),
    ],
)
def test_a_bad_count_or_optimizer_setting_names_the_key_and_a_value(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose_config([override]))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE set (as in CI) and a hub cache with nothing in it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model=qwen2_0.5b"], "model.name_or_path=Qwen/Qwen2-0.5B-Instruct"),
        (["eval_only=true", "eval.model=someone/never-downloaded"], "eval.model=someone/never-downloaded"),
        (["model.name_or_path=./no/such/dir", "model.random_init=null"], "model.name_or_path=./no/such/dir"),
    ],
)
def test_a_hub_model_offline_and_not_cached_fails_before_loading_with_the_ways_out(
    empty_hub_cache, overrides, key
):
    with pytest.raises(ModelUnavailable) as caught:
        check_config(compose_config(overrides))
    message = str(caught.value)
    assert message.startswith(f"{key} is not a local directory and not in the Hugging Face cache")
    for way_out in ("HF_HUB_OFFLINE is set", "/path/to/model", "hf download", "model=qwen2_0.5b_random"):
        assert way_out in message


def test_a_tokenizer_the_hub_cannot_give_is_named_with_the_ways_out(empty_hub_cache):
    with pytest.raises(
        ModelUnavailable, match=r"model.name_or_path=someone/x .*could not be reached.*hf download"
    ):
        load_tokenizer("someone/x", trust_remote_code=False)


def test_a_local_model_directory_passes_the_offline_check(empty_hub_cache, tiny_model_dir):
    check_config(compose_config([f"model.name_or_path={tiny_model_dir}", "model.random_init=null"]))


def test_prompts_a_tokenizer_turns_into_nothing_are_refused_before_an_engine_sees_them():
    # a tokenizer that knows no character of the prompt (and has no chat template) drops all of it
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"@": 0}, merges=[])))
    with pytest.raises(
        ValueError, match=r"the prompt 'What is 1 \+ 2\?' is no tokens at all.*data.prompt_column"
    ):
        tokenize_prompts(tokenizer, ["What is 1 + 2?"], None, 128)


def words_reward(prompts, completions, **columns):
    return ["good"] * len(completions)


def numeric_strings_reward(prompts, completions, **columns):
    return ["1.0"] * len(completions)


def numbers_reward(prompts, completions, **columns):
    import numpy as np

    return [True, 2, np.float32(0.5), None][: len(completions)]


def functions(fn: str):
    return load_reward_functions(
        {"r": RewardConfig(fn=f"tests.test_user_errors.{fn}", weight=1.0, kwargs={})}
    )


@pytest.mark.parametrize("fn, returned", [("words_reward", "'good'"), ("numeric_strings_reward", "'1.0'")])
def test_a_reward_returning_strings_is_named_even_numeric_ones(fn, returned):
    with pytest.raises(
        RewardError, match=rf"reward 'r' returned {returned} \(str\) for completion 0: return a number"
    ):
        score_completions(functions(fn), ["q"] * 2, ["a", "b"], {})


def test_numbers_bools_numpy_scalars_and_none_are_scores():
    scores = score_completions(functions("numbers_reward"), ["q"] * 4, ["a", "b", "c", "d"], {})
    assert scores == {"r": [1.0, 2.0, 0.5, None]}


def no_opinion(prompts, completions, **columns):
    return [None] * len(completions)


def with_rewards(cfg, *paths):
    with open_dict(cfg):
        for path in paths:
            cfg.rewards[path.rsplit(".", 1)[-1]] = RewardConfig(fn=path)
    return cfg


def test_a_reward_that_scores_nothing_is_named_once_then_counted(make_config, tmp_path, caplog):
    cfg = with_rewards(make_config("max_steps=3", *SMALL), "tests.test_user_errors.no_opinion")
    with caplog.at_level(logging.WARNING):
        run(cfg)  # digits and overlong still score: the run goes on
    warnings = [
        r.getMessage()
        for r in caplog.records
        if "reward 'no_opinion' scored every completion" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].startswith("step 1: ")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/no_opinion_unscored_steps"] for m in logged] == [1.0, 2.0, 3.0]
    assert [m["reward/digits_unscored_steps"] for m in logged] == [0.0, 0.0, 0.0]


def test_every_trained_reward_silent_for_n_steps_stops_with_a_checkpoint(make_config, tmp_path):
    cfg = make_config("max_steps=10", "max_unscored_steps=2", "rewards=[digits]", *SMALL)
    with open_dict(cfg):
        cfg.rewards.digits.weight = 0.0  # logged, not trained on: the only trained reward is no_opinion
    with_rewards(cfg, "tests.test_user_errors.no_opinion")
    with pytest.raises(RewardError) as caught:
        run(cfg)
    message = str(caught.value)
    assert (
        "no trained reward (no_opinion) scored any completion for 2 steps in a row (max_unscored_steps=2)"
        in message
    )
    checkpoint = tmp_path / "checkpoints" / "step_000001"
    assert f"resume={checkpoint}" in message and (checkpoint / "manifest.json").exists()
