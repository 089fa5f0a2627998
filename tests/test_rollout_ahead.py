"""Bounded-staleness rollouts (off_policy_steps=k): the scheduling rules on hand-made sequences, then the
background thread itself with a transformers engine that holds its own copy of the weights, as vLLM does."""

import copy
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.engines import EngineUnavailable
from online_rl.engines.transformers_engine import TransformersEngine
from online_rl.rollout_ahead import (
    SWITCH_INTERVAL_S,
    PendingRollout,
    RolloutsAhead,
    first_updates_to_draw,
    may_start,
    rollouts_ahead,
)

from .conftest import compose_config

CPU = torch.device("cpu")
STEP = (
    1e-3  # each of the trainer's "updates" below adds this to every weight: the weights' version is readable
)


@pytest.mark.parametrize(
    "first_update, trainer_version, k, allowed",
    [
        (1, 0, 1, True),  # one step off-policy: the next rollout samples with the weights before this update
        (2, 0, 1, False),  # two updates behind: wait for the trainer's next update
        (2, 1, 1, True),
        (2, 0, 2, True),
        (3, 0, 2, False),
        (5, 3, 2, True),
        (5, 9, 2, True),  # the trainer is past it (a rollout started late): fresher weights are fine
        (0, 0, 1, True),
    ],
)
def test_a_rollout_may_start_only_with_weights_at_most_k_updates_old(
    first_update, trainer_version, k, allowed
):
    assert may_start(first_update, trainer_version, k) is allowed


@pytest.mark.parametrize(
    "k, mu, ahead", [(1, 1, 1), (2, 1, 2), (3, 1, 3), (1, 2, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (1, 4, 1)]
)
def test_rollouts_drawn_ahead_are_those_that_can_start_while_this_one_trains(k, mu, ahead):
    assert rollouts_ahead(k, mu) == ahead
    # the last one drawn may start before this rollout's last update; the one after it only after
    assert may_start(ahead * mu, mu - 1, k) and not may_start((ahead + 1) * mu, mu - 1, k)


def test_prompts_are_drawn_ahead_up_to_the_bound_and_never_past_the_run():
    # k=2, one pass each: at step 0 (nothing queued) the two next rollouts; then one per step
    assert first_updates_to_draw(0, 0, 2, 1, 10) == [1, 2]
    assert first_updates_to_draw(1, 1, 2, 1, 10) == [3]
    assert first_updates_to_draw(2, 2, 2, 1, 10) == []  # already two ahead (a step that took none)
    # the last steps: no rollout the run will not train
    assert first_updates_to_draw(8, 1, 2, 1, 10) == []
    assert first_updates_to_draw(7, 1, 2, 1, 10) == [9]
    # two passes per rollout (num_iterations=2): rollouts begin at even updates
    assert first_updates_to_draw(0, 0, 3, 2, 10) == [2, 4]
    assert first_updates_to_draw(4, 1, 3, 2, 10) == [8]
    assert first_updates_to_draw(6, 0, 1, 2, 7) == []  # step 8 is past max_steps=7


def simulate(k, mu, rollouts, max_steps):
    """A generator faster than the trainer: each queued rollout starts as soon as `may_start` allows, with the
    trainer's newest weights. Returns each rollout's staleness when the trainer starts on it."""
    sampled_with, queue, staleness = {}, [], []
    for step in range(0, max_steps, mu):  # the trainer starts on the rollout at update `step`
        if step:
            staleness.append(step - sampled_with[queue.pop(0)])
        else:
            sampled_with[0] = 0  # the first, generated on the trainer's thread
            staleness.append(0)
        queue += first_updates_to_draw(step, len(queue), k, mu, max_steps)
        for version in range(step, step + mu):  # the updates of this rollout's passes
            for first_update in queue:
                if first_update not in sampled_with and may_start(first_update, version, k):
                    sampled_with[first_update] = version
    return staleness[:rollouts]


@pytest.mark.parametrize(
    "k, mu, expected",
    [
        (1, 1, [0, 1, 1, 1, 1, 1]),  # one step off-policy, as before
        (2, 1, [0, 1, 2, 2, 2, 2]),
        (3, 1, [0, 1, 2, 3, 3, 3]),
        (1, 2, [0, 1, 1, 1, 1, 1]),  # two passes: the next rollout starts after this one's first update
        (2, 2, [0, 2, 2, 2, 2, 2]),
    ],
)
def test_a_generator_ahead_of_the_trainer_stays_k_updates_behind(k, mu, expected):
    assert simulate(k, mu, 6, 12 * mu) == expected


class OwnCopyEngine(TransformersEngine):
    """transformers' generate on a copy of the trainer's model that only sync_weights updates (as vLLM holds
    its own weights). Each call records which version of the trainer's weights it holds, per weight."""

    def __init__(self, trainer, tokenizer, initial):
        super().__init__(copy.deepcopy(trainer), tokenizer, CPU, None)
        self.initial, self.calls, self.switch_intervals = initial, [], []

    def versions_held(self) -> set[int]:
        with torch.no_grad():
            held = self.model.named_parameters()
            return {round(float((p - self.initial[name]).mean()) / STEP) for name, p in held}

    def sync_weights(self, model):
        self.model.load_state_dict(model.state_dict())
        self.calls.append(("sync", self.versions_held()))

    def generate(self, prompt_ids, n, sampling):
        self.calls.append(("generate", self.versions_held()))
        self.switch_intervals.append(sys.getswitchinterval())
        return super().generate(prompt_ids, n, sampling)


@pytest.fixture
def trainer_and_engine(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    return model, tokenizer, OwnCopyEngine(model, tokenizer, initial)


SAMPLING = compose_config(["sampling.max_completion_length=4"]).sampling


def an_update(ahead, model, version):
    """What optimizer.step does to the weights, slowly: half of them, a pause, the rest. A push that read
    them meanwhile would hold two versions at once."""
    params = list(model.parameters())
    with ahead.updating_weights(version), torch.no_grad():
        for p in params[: len(params) // 2]:
            p.add_(STEP)
        time.sleep(0.02)
        for p in params[len(params) // 2 :]:
            p.add_(STEP)


def prompts(tokenizer, count):
    return [tokenizer(f"What is {i} + 2?")["input_ids"] for i in range(count)]


@pytest.mark.parametrize("k", [1, 2])
def test_rollouts_sample_whole_versions_at_most_k_updates_behind(trainer_and_engine, k):
    """The loop's pattern by hand: take the oldest rollout, draw the next, train (0.5 s, ten times a
    rollout's generation), update. Every rollout is sampled with one whole version of the weights (never a
    push mid-update), the one it reports, as far behind as the faster generator of `simulate` gets: k
    updates; the interpreter switches often only while the engine generates."""
    model, tokenizer, engine = trainer_and_engine
    default = sys.getswitchinterval()
    ahead = RolloutsAhead(engine, model, CPU, k, 2, SAMPLING)
    ahead.engine_holds(0)  # as after the first rollout, generated on the trainer's thread
    staleness = []
    try:
        for step in range(6):
            if step:
                pending, sampled = ahead.take()
                assert pending.first_update == step
                staleness.append(step - sampled.weights_version)
                assert len(sampled.rollout.completion_ids) == 2 * len(pending.prompt_ids)
            for first_update in first_updates_to_draw(step, ahead.queued, k, 1, 6):
                ahead.add(PendingRollout([], prompts(tokenizer, 2), {"drawn": first_update}, first_update))
            time.sleep(0.5)
            an_update(ahead, model, step + 1)
    finally:
        ahead.close()
    assert staleness == simulate(k, 1, 6, 6)[1:], staleness
    assert all(len(versions) == 1 for _, versions in engine.calls), engine.calls  # whole versions only
    assert engine.switch_intervals and set(engine.switch_intervals) == {SWITCH_INTERVAL_S}
    assert sys.getswitchinterval() == default


def test_the_generator_waits_for_the_trainer_then_pushes_its_newest_weights(trainer_and_engine):
    """k=1: a rollout two updates ahead waits; the trainer's update lets it start, with those weights."""
    model, tokenizer, engine = trainer_and_engine
    ahead = RolloutsAhead(engine, model, CPU, 1, 2, SAMPLING)
    ahead.engine_holds(0)
    try:
        ahead.add(PendingRollout([], prompts(tokenizer, 1), {}, first_update=1))
        ahead.add(PendingRollout([], prompts(tokenizer, 1), {}, first_update=2))
        first, sampled = ahead.take()
        assert sampled.weights_version == 0 and sampled.push_s == 0  # the engine held them already
        time.sleep(0.3)
        waiting = ahead.queue[0]
        assert not waiting.started and not waiting.result.done()  # needs the trainer at update 1
        an_update(ahead, model, 1)
        _, sampled = ahead.take()
        assert sampled.weights_version == 1 and engine.calls[-2:] == [("sync", {1}), ("generate", {1})]
    finally:
        ahead.close()


def test_pause_frees_the_engine_and_starts_nothing_until_the_next_take(trainer_and_engine):
    """An evaluation: pause waits for the rollout being generated; while paused nothing starts, even a rollout
    the trainer's update allows; the next take goes on, with the newest weights."""
    model, tokenizer, engine = trainer_and_engine
    ahead = RolloutsAhead(engine, model, CPU, 1, 2, SAMPLING)
    ahead.engine_holds(0)
    try:
        for first_update in (1, 2):
            ahead.add(PendingRollout([], prompts(tokenizer, 1), {}, first_update))
        ahead.pause()
        assert not ahead.generating
        an_update(ahead, model, 1)  # rollout 2 may start now, but the engine is the trainer's
        calls = len(engine.calls)
        engine.sync_weights(model)
        engine.generate(prompts(tokenizer, 1), 2, SAMPLING)
        time.sleep(0.3)
        assert not ahead.queue[1].started and len(engine.calls) == calls + 2  # the evaluation's calls alone
        _, first = ahead.take()
        _, second = ahead.take()
        assert first.weights_version in (0, 1) and second.weights_version == 1
        assert engine.calls[-1] == ("generate", {1})
    finally:
        ahead.close()


def test_an_engine_error_is_raised_by_take_and_keeps_the_rollout_queued(trainer_and_engine):
    """The engine fails on the second rollout: the first comes through, the second's take raises the error
    and leaves it queued (a checkpoint saves the sampler before its prompts), and nothing more is generated."""
    model, tokenizer, engine = trainer_and_engine
    real_generate = engine.generate

    def fail_on_the_second(prompt_ids, n, sampling):
        if len([c for c in engine.calls if c[0] == "generate"]) == 1:
            engine.calls.append(("generate", set()))
            raise EngineUnavailable("the engine went away (injected)")
        return real_generate(prompt_ids, n, sampling)

    engine.generate = fail_on_the_second
    ahead = RolloutsAhead(engine, model, CPU, 3, 2, SAMPLING)
    ahead.engine_holds(0)
    try:
        for first_update in (1, 2, 3):
            ahead.add(PendingRollout([], prompts(tokenizer, 1), {"before": first_update}, first_update))
        ahead.take()
        with pytest.raises(EngineUnavailable, match="went away"):
            ahead.take()
        assert ahead.sampler_state() == {"before": 2} and ahead.queued == 2
        assert not ahead.queue[1].started and ahead.stopped
    finally:
        ahead.close()


def test_close_never_hangs_on_a_rollout_that_does_not_end(trainer_and_engine):
    model, tokenizer, engine = trainer_and_engine
    release = threading.Event()
    engine.generate = lambda prompt_ids, n, sampling: release.wait(60)  # a server that stopped answering
    default = sys.getswitchinterval()
    ahead = RolloutsAhead(engine, model, CPU, 1, 2, SAMPLING)
    ahead.engine_holds(0)
    ahead.add(PendingRollout([], prompts(tokenizer, 1), {}, first_update=1))
    while not ahead.generating:
        time.sleep(0.01)
    started = time.monotonic()
    ahead.close(timeout=0.5)
    assert time.monotonic() - started < 5 and sys.getswitchinterval() == default
    release.set()
    ahead.thread.join(10)
    assert not ahead.thread.is_alive()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["off_policy_steps=-1"], "off_policy_steps=-1: use 0 .* e.g. off_policy_steps=1"),
        (["off_policy_steps=2", "vllm=off"], "off_policy_steps=2 needs vllm=colocate or vllm=server"),
        (
            ["off_policy_steps=2", "algo=dpo", "vllm=colocate"],
            "off_policy_steps=2 is for grpo.*use off_policy_steps=0",
        ),
        (
            ["off_policy_steps=3", "vllm=colocate", "vllm.sleep_level=1"],
            r"off_policy_steps=3 with vllm=colocate needs vllm.sleep_level=0 \(not 1\)",
        ),
        (
            ["off_policy_steps=2", "vllm=server", "vllm.importance_sampling_correction=false"],
            "up to 2 update.*set vllm.importance_sampling_correction=true",
        ),
        (
            ["off_policy_steps=2", "vllm=server", "hardware.num_processes=2"],
            "off_policy_steps=2 runs on one process for now.*hardware=1gpu",
        ),
    ],
    ids=["negative", "no-vllm", "preference", "asleep", "uncorrected", "ranks"],
)
def test_off_policy_settings_it_cannot_run_name_the_key_and_a_value_that_works(overrides, message):
    from online_rl.checks import check_off_policy

    with pytest.raises(ValueError, match=message):
        check_off_policy(compose_config(overrides))


@pytest.mark.parametrize("algo", ["grpo", "rloo", "gspo", "cispo"])
def test_off_policy_steps_of_two_pass_the_checks_for_each_policy_gradient_algorithm(algo):
    from online_rl.checks import check_off_policy

    for mode in (["vllm=server"], ["vllm=colocate", "vllm.sleep_level=0"]):
        check_off_policy(compose_config(["off_policy_steps=2", f"algo={algo}", *mode]))
