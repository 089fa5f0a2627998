"""The background rollout of off_policy_steps=1: the interpreter hands over often only while it runs."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.engines.transformers_engine import TransformersEngine
from online_rl.rollout_ahead import SWITCH_INTERVAL_S, RolloutAhead

from .conftest import compose_config


def test_threads_switch_often_only_while_a_rollout_is_in_flight(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TransformersEngine(model, tokenizer, torch.device("cpu"), None)
    sampling = compose_config(["sampling.max_completion_length=4"]).sampling
    ahead = RolloutAhead(engine, torch.device("cpu"))
    default = sys.getswitchinterval()
    prompts = [tokenizer("What is 1 + 2?")["input_ids"]]
    ahead.start([{"prompt": "What is 1 + 2?"}], prompts, 2, sampling, sampler_state={})
    assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    pending, rollout, seconds = ahead.take()
    assert sys.getswitchinterval() == default
    assert pending.prompt_ids == prompts and len(rollout.completion_ids) == 2 and seconds > 0
    ahead.close()
    assert sys.getswitchinterval() == default
