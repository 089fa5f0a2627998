"""Multi-turn rollouts (env != none): the model acts, an environment (envs/) replies, the model goes on.

    reset(row) -> opening messages -> prompt ids            (the chat template, as a single-turn prompt)
    turn 1: engine.generate(prompt ids, G)                  (G samples per prompt, as single-turn)
    env.step(the turn's text) -> reply, reward, done        (per sample)
    reply -> its tokens appended to the sample's running ids, then turn 2: engine.generate(running ids, 1) ...

A sample's completion is everything after its prompt: its model turns and the environment's replies, in order.
Earlier turns are never re-tokenised: the engine continues the very ids it sampled, and only the reply's text
is tokenised, so the trainer scores exactly the tokens the engine saw. `model_mask` marks the tokens the model
wrote (1) and the environment's (0): the loss and the sync check count only the model's. Limits: max_turns
model turns, max_tokens tokens after the prompt (a conversation that reaches it ends, truncated: not finished),
sampling.max_completion_length per model turn.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from online_rl.engines import Rollout

PLACEHOLDER = "\x00assistant turn\x00"  # an assistant message's content, found again in the rendered template


class EnvironmentFailure(RuntimeError):
    """An environment raised or returned something unusable; the message names it and the turn."""


@dataclass
class TurnSampling:
    """The run's sampling settings with this turn's token limit (what the engines read of `sampling`)."""

    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int


@dataclass
class Conversation:
    """One sample's episode: its environment and every token after the prompt."""

    env: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # after the prompt: model turns and replies, in order
    model_mask: list[int] = field(default_factory=list)  # per token of ids: 1 the model wrote it
    logprobs: list[float] = field(default_factory=list)  # per token of ids: the engine's (0.0 for replies)
    reward: float | None = None  # the sum of the environment's rewards so far; None: it gave none
    turns: int = 0
    tool_calls: int = 0  # reply messages with role "tool"
    turns_cut: int = 0  # model turns cut at sampling.max_completion_length (no EOS)
    over: bool = False
    finished: bool = True  # the last model turn ended with EOS, within env.max_tokens
    out_of_turns: bool = False  # still going at max_turns

    @property
    def running_ids(self) -> list[int]:
        return self.prompt_ids + self.ids


def import_environment(path: str, key: str = "env.cls") -> type:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"{key}={path!r} is not an importable class ({error}): use a path like online_rl.envs.calculator.Calculator"
        ) from error


def environment_reward(env_reward: list, **kwargs) -> list:
    """The environment's reward of each sample as a reward function's scores (a named column, weight env.weight)."""
    return list(env_reward)


def checked_messages(value: Any, name: str, what: str) -> list[dict[str, str]]:
    """A str (one user message) or a list of {"role", "content"} str dicts, as messages; else an error."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise EnvironmentFailure(
        f"environment {name!r} {what} returned {value!r} ({type(value).__name__}): return a str (a user "
        'message) or a non-empty list of {"role": ..., "content": ...} dicts with str values'
    )


def checked_step(value: Any, name: str, turn: int) -> tuple[list[dict] | None, float | None, bool]:
    """step()'s (reply messages or None, reward or None, done), checked."""
    what = f"step() at turn {turn}"
    if not (isinstance(value, tuple) and len(value) == 3):
        raise EnvironmentFailure(
            f"environment {name!r} {what} returned {value!r}: return a tuple (reply or None, reward or None, done)"
        )
    reply, reward, done = value
    if not isinstance(done, bool):
        raise EnvironmentFailure(f"environment {name!r} {what} returned done={done!r}: return True or False")
    if reward is not None and (not isinstance(reward, numbers.Real) or not math.isfinite(reward)):
        raise EnvironmentFailure(
            f"environment {name!r} {what} returned reward={reward!r}: return a finite number or None"
        )
    if reply is None and not done:
        raise EnvironmentFailure(
            f"environment {name!r} {what} returned no reply with done=False: reply, or end the episode"
        )
    messages = checked_messages(reply, name, what) if reply is not None else None
    return messages, (float(reward) if reward is not None else None), done


TURN = [{"role": "user", "content": "?"}, {"role": "assistant", "content": PLACEHOLDER}]


@functools.lru_cache(maxsize=4)
def rendered_turn(tokenizer: Any) -> str:
    """TURN through the tokenizer's chat template: the same text for every reply of a run, rendered once."""
    return tokenizer.apply_chat_template(TURN, tokenize=False)


def reply_text(tokenizer: Any, messages: list[dict[str, str]], after_eos: bool) -> str:
    """The text that follows the model's turn when `messages` reply to it: the rest of the assistant turn's
    template (less the EOS, when the model wrote it), the messages, and the next assistant turn's header.

    Read from the chat template itself, rendered with and without the reply: the extra text is what the
    template puts between the turns, whatever the model family's format."""
    if not tokenizer.chat_template:
        return "".join(f"\n{m['content']}\n" for m in messages)
    before = rendered_turn(tokenizer)
    after = tokenizer.apply_chat_template(TURN + messages, tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError(
            "the tokenizer's chat template renders earlier turns differently once a reply follows, so a "
            "conversation cannot be continued from its token ids: use a model whose template appends turns"
        )
    rest_of_turn = before[before.rindex(PLACEHOLDER) + len(PLACEHOLDER) :]
    if after_eos and tokenizer.eos_token and rest_of_turn.startswith(tokenizer.eos_token):
        rest_of_turn = rest_of_turn[len(tokenizer.eos_token) :]
    return rest_of_turn + after[len(before) :]


class Episodes:
    """Plays env.cls's episodes with an engine: one environment per sample, up to env.max_turns model turns."""

    def __init__(self, env_cfg: Any, tokenizer: Any, system_prompt: str | None, max_prompt_length: int):
        self.cfg, self.name, self.tokenizer = env_cfg, env_cfg.name, tokenizer
        self.make_env = import_environment(env_cfg.cls)
        self.system_prompt, self.max_prompt_length = system_prompt, max_prompt_length

    def open(self, row: dict[str, Any]) -> Conversation:
        """A fresh environment for `row`, reset, and its opening as prompt ids (left-truncated as prompts are)."""
        try:
            env = self.make_env(**self.cfg.kwargs)
            opening = env.reset(dict(row))
        except Exception as error:
            raise EnvironmentFailure(
                f"environment {self.name!r} ({self.cfg.cls}) raised in reset() at turn 0: {error!r}"
            ) from error
        messages = checked_messages(opening, self.name, "reset() at turn 0")
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['content']}\n" for m in messages)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt_length :]
        return Conversation(env, ids)

    def play(
        self, engine: Any, rows: list[dict], n: int, sampling: Any, refresh: Callable[[], Any] | None = None
    ) -> tuple[list[list[int]], Rollout]:
        """n episodes per row, prompt-major: (each row's prompt ids, a Rollout of whole conversations with
        `model_mask`, and the column `env_reward` for the reward functions). refresh: called before every turn
        after the first (a colocated vLLM that sleeps after each call needs the weights pushed again)."""
        env_s, stats = 0.0, {}
        self.engine_logprobs = False  # vllm engines report them; transformers generate does not
        started = time.perf_counter()
        conversations = [self.open(row) for row in rows for _ in range(n)]
        prompt_ids = [conversations[p * n].prompt_ids for p in range(len(rows))]
        if any(c.prompt_ids != prompt_ids[i // n] for i, c in enumerate(conversations)):
            raise EnvironmentFailure(
                f"environment {self.name!r} opened the same row in different ways: reset(row) must depend on "
                "the row only (draw any randomness from the row's columns)"
            )
        env_s += time.perf_counter() - started
        for turn in range(1, self.cfg.max_turns + 1):
            playing = [c for c in conversations if not c.over]
            if not playing:
                break
            if turn > 1 and refresh is not None:
                refresh()
            turns = self.generate_turn(engine, playing, n, turn, sampling, stats)
            for conversation, tokens, logprobs, ended in turns:
                started = time.perf_counter()
                self.take_turn(conversation, tokens, logprobs, ended, turn)
                env_s += time.perf_counter() - started
        stats.update(
            {
                "env/turns_per_sample": sum(c.turns for c in conversations) / len(conversations),
                "env/tool_calls": float(sum(c.tool_calls for c in conversations)),
                "env/truncated": float(sum(not c.finished for c in conversations)),
                "env/turns_cut": float(sum(c.turns_cut for c in conversations)),
                "env/max_turns_reached": float(sum(c.out_of_turns for c in conversations)),
                "time/env_s": env_s,
            }
        )
        rollout = Rollout(
            completion_ids=[c.ids for c in conversations],
            finished=[c.finished for c in conversations],
            sampler_logprobs=[c.logprobs for c in conversations] if self.engine_logprobs else None,
            stats=stats,
            model_mask=[c.model_mask for c in conversations],
            columns={"env_reward": [c.reward for c in conversations]},
        )
        return prompt_ids, rollout

    def generate_turn(self, engine, playing: list[Conversation], n: int, turn: int, sampling, stats: dict):
        """(conversation, new token ids, their engine log-probs or None, ended with EOS) for every conversation
        still playing. Turn 1 samples n per prompt; later turns continue each conversation once, in groups of
        equal token limit (the turn's limit, or less where a conversation is near env.max_tokens)."""
        if turn == 1:
            limit = min(sampling.max_completion_length, self.cfg.max_tokens)
            prompt_ids = [c.prompt_ids for c in playing[::n]]
            rollouts = [(playing, self.generate(engine, prompt_ids, n, sampling, limit, stats))]
        else:
            rollouts = []
            by_limit = sorted(playing, key=lambda c: self.turn_limit(c, sampling))
            for limit, group in groupby(by_limit, key=lambda c: self.turn_limit(c, sampling)):
                group = list(group)
                running_ids = [c.running_ids for c in group]
                rollouts.append((group, self.generate(engine, running_ids, 1, sampling, limit, stats)))
        for group, rollout in rollouts:
            self.engine_logprobs = rollout.sampler_logprobs is not None
            for i, conversation in enumerate(group):
                logprobs = rollout.sampler_logprobs[i] if self.engine_logprobs else None
                yield conversation, rollout.completion_ids[i], logprobs, rollout.finished[i]

    def turn_limit(self, conversation: Conversation, sampling: Any) -> int:
        return min(sampling.max_completion_length, self.cfg.max_tokens - len(conversation.ids))

    @staticmethod
    def generate(engine, prompt_ids: list[list[int]], n: int, sampling, limit: int, stats: dict) -> Rollout:
        turn_sampling = TurnSampling(limit, sampling.temperature, sampling.top_p, sampling.top_k)
        rollout = engine.generate(prompt_ids, n, turn_sampling)
        for key, value in rollout.stats.items():  # the engine's seconds add up over the turns
            stats[key] = stats.get(key, 0.0) + value if key.startswith("time/") else value
        return rollout

    def take_turn(self, conversation: Conversation, tokens, logprobs, ended: bool, turn: int) -> None:
        """Append the model's turn; unless a limit ends the episode, ask the environment and append its reply.
        A turn cut at sampling.max_completion_length still goes to the environment (env/turns_cut), as the
        model left it: a task can teach brevity through its rewards."""
        conversation.ids += tokens
        conversation.model_mask += [1] * len(tokens)
        conversation.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)
        conversation.turns, conversation.turns_cut = turn, conversation.turns_cut + (not ended)
        if len(conversation.ids) >= self.cfg.max_tokens:  # the conversation's budget is spent
            conversation.over, conversation.finished = True, False
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        try:
            raw = conversation.env.step(text)
        except Exception as error:
            raise EnvironmentFailure(
                f"environment {self.name!r} ({self.cfg.cls}) raised in step() at turn {turn}: {error!r}\n"
                f"  the model's turn: {text[:200]!r}"
            ) from error
        reply, reward, done = checked_step(raw, self.name, turn)
        if reward is not None:
            conversation.reward = (conversation.reward or 0.0) + reward
        if done or turn == self.cfg.max_turns:
            conversation.over, conversation.out_of_turns, conversation.finished = True, not done, ended
            return
        conversation.tool_calls += sum(m["role"] == "tool" for m in reply)
        text = reply_text(self.tokenizer, reply, after_eos=ended)
        reply_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(conversation.ids) + len(reply_ids) >= self.cfg.max_tokens:  # no room for the reply and a turn
            conversation.over, conversation.finished = True, False
            return
        conversation.ids += reply_ids
        conversation.model_mask += [0] * len(reply_ids)
        conversation.logprobs += [0.0] * len(reply_ids)
