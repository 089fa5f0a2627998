"""Multi-turn environments: the calculator refuses anything but arithmetic, conversations keep the engine's token
ids with the environment's tokens masked out of the loss and the sync check, bad environments are named with
their turn, limits end episodes with counts, and the guessing task is learnt."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.algorithms.sampler_correction import logp_gap
from online_rl.engines.transformers_engine import TransformersEngine, eos_token_ids
from online_rl.envs.calculator import MAX_EXPRESSION_CHARS, Calculator, CalculatorError, calculate
from online_rl.envs.guess_number import GuessNumber
from online_rl.logprobs import completion_logprobs, pack
from online_rl.loop import run
from online_rl.multiturn import EnvironmentFailure, Episodes, reply_text
from online_rl.rollout import Samples

from .conftest import compose_config

GUESS = ["env=guess_number", "data=guess_number", "rewards=[]", "sampling.max_completion_length=8"]


@pytest.mark.parametrize(
    "expression, value",
    [("2+3*4", 14), ("-2**2", -4), ("(1 + 2) / 4", 0.75), ("2**10", 1024), ("--3", 3), ("1.5*2", 3.0)],
)
def test_calculator_computes_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression, refusal",
    [
        ("x + 1", "Name"),  # names
        ("__import__('os').system('ls')", "Call"),  # calls
        ("(1).real", "Attribute"),  # attributes
        ("'a' * 3", "Constant"),  # strings
        ("True + 1", "Constant"),  # bools are not numbers here
        ("9 ** 9 ** 9", "exponent"),  # huge powers, however nested
        ("10 ** 65", "exponent"),
        ("99999999999 ** 2", "beyond"),  # a result past the magnitude cap
        ("1e300 * 1e300", "beyond"),
        ("1 / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("[1, 2]", "List"),
        ("lambda: 1", "Lambda"),
        ("1 if 1 else 2", "IfExp"),
        ("7 // 2", "BinOp"),  # only + - * / **
        ("1 +", "not an expression"),
        ("1+" * MAX_EXPRESSION_CHARS + "1", "longer than"),
    ],
)
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, refusal):
    with pytest.raises(CalculatorError, match=refusal):
        calculate(expression)


def test_calculator_environment_answers_tool_calls_then_scores_the_answer():
    env = Calculator()
    opening = env.reset({"prompt": "What is 12 * 3?", "solution": "36"})
    assert opening[0]["role"] == "user" and "What is 12 * 3?" in opening[0]["content"]
    assert env.step("<tool>12*3</tool>") == ([{"role": "tool", "content": "36"}], None, False)
    assert env.step("<tool>open('x')</tool>")[0][0]["content"].startswith("error: Call")
    assert env.step("It is 36.") == (None, 1.0, True)
    assert env.step("35") == (None, 0.0, True)


def test_guess_number_says_higher_or_lower_and_pays_less_for_later_turns():
    env = GuessNumber()
    env.reset({"prompt": "Guess.", "secret": 6})
    assert env.step("3") == ("Higher.", 0.0, False)
    assert env.step("no idea") == ("Say a number.", 0.0, False)
    assert env.step("8") == ("Lower.", 0.0, False)
    assert env.step("6") == (None, 0.25, True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def eos_only_engine(tiny_model_dir, tokenizer):
    """The tiny model with its output layer made to say EOS, always: every model turn is exactly [EOS], so
    the expected conversations and masks can be written down by hand. The real engine samples them."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # every input the same, the layers adding nothing: one final hidden state h
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros_like(model.lm_head.weight)  # (untied from the embeddings) only EOS scores h
        head[tokenizer.eos_token_id] = 10 * model.model.norm.weight
        model.lm_head.weight = torch.nn.Parameter(head)
    return TransformersEngine(model, tokenizer, torch.device("cpu"), None)


class Scripted:
    """An environment that replies `replies` in turn (a list of replies or exceptions), then ends with reward 1."""

    script: list = []

    def reset(self, row):
        self.turn = 0
        return row["prompt"]

    def step(self, text):
        self.turn += 1
        reply = self.script[self.turn - 1] if self.turn <= len(self.script) else None
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, tuple):  # a whole (wrong) answer
            return reply
        return (reply, 0.5, False) if reply is not None else (None, 1.0, True)


def episodes(tokenizer, script, **env) -> Episodes:
    Scripted.script = script
    cfg = compose_config(["env=calculator", "env.cls=tests.test_env.Scripted", "env.name=scripted"]).env
    for key, value in env.items():
        cfg[key] = value
    return Episodes(cfg, tokenizer, None, 64)


def sampling(max_completion_length=4):
    return compose_config([f"sampling.max_completion_length={max_completion_length}"]).sampling


def test_reply_text_is_what_the_chat_template_puts_between_the_turns(tokenizer):
    # ChatML: the model wrote <|im_end|>; then the turn's newline, the reply, and the next turn's header
    text = reply_text(tokenizer, [{"role": "tool", "content": "36"}], after_eos=True)
    assert text == "\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"
    assert reply_text(tokenizer, [{"role": "user", "content": "Lower."}], after_eos=False).startswith(
        "<|im_end|>\n<|im_start|>user\nLower."
    )


def test_conversations_keep_token_ids_and_mask_the_environments_tokens(eos_only_engine, tokenizer):
    eos = tokenizer.eos_token_id
    reply = tokenizer(reply_text(tokenizer, [{"role": "user", "content": "more"}], True))["input_ids"]
    playing, refreshed = episodes(tokenizer, ["more", "more"], max_turns=4), []
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    prompt_ids, rollout = playing.play(eos_only_engine, rows, 2, sampling(), lambda: refreshed.append(1))
    assert len(refreshed) == 2  # before turns 2 and 3 (a sleeping vLLM gets the weights again)
    opening = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt_ids[0] == tokenizer(opening, add_special_tokens=False)["input_ids"]
    # three model turns ([EOS] each) with two replies between them, written out by hand
    assert rollout.completion_ids == [[eos, *reply, eos, *reply, eos]] * 4
    assert rollout.model_mask == [[1] + [0] * len(reply) + [1] + [0] * len(reply) + [1]] * 4
    assert rollout.finished == [True] * 4
    assert rollout.columns == {"env_reward": [2.0] * 4}  # 0.5 + 0.5 + 1.0
    assert rollout.stats["env/turns_per_sample"] == 3 and rollout.stats["env/max_turns_reached"] == 0
    assert rollout.sampler_logprobs is None  # transformers generate reports none


def test_the_model_mask_reaches_the_loss_mask_and_the_sync_check(tiny_model_dir):
    """A hand-built conversation: prompt [5, 6], completion [7, 8 | 9, 10 | 11] where 9, 10 are the
    environment's. The trainer's log-probs at the model's tokens are those of one forward over the whole
    sequence, and the environment's tokens (with nonsense sampler log-probs) stay out of the gap."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rollout = Rollout_(
        completion_ids=[[7, 8, 9, 10, 11]],
        finished=[True],
        sampler_logprobs=[[0.0, 0.0, 0.0, 0.0, 0.0]],
        model_mask=[[1, 1, 0, 0, 1]],
    )
    samples = Samples.from_rollout([{"prompt": "p"}], [[5, 6]], rollout, [True], DecodeNothing())
    [micro_batch] = samples.micro_batches(
        torch.ones(1, dtype=torch.bool), 1, False, 1, pad_id=0, device="cpu"
    )
    assert micro_batch.packed.completion_mask.tolist() == [[1, 1, 0, 0, 1]]
    logp, _ = completion_logprobs(model, micro_batch.packed, 1.0)
    whole = torch.log_softmax(model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]])).logits[0], -1)
    # position t predicts token t + 1
    expected = [whole[t, token] for t, token in zip(range(1, 6), [7, 8, 9, 10, 11])]
    assert logp[0].tolist() == pytest.approx([float(v) for v in expected], abs=1e-5)
    sampler = logp.detach().clone()
    sampler[0, 2:4] = 50.0  # the environment's tokens: no engine log-prob, a gap of ~50 if they counted
    gap, peak, _ = logp_gap(logp, sampler, micro_batch.packed.completion_mask)
    assert float(gap) == pytest.approx(0.0) and float(peak) == pytest.approx(0.0)
    # padding stays out too: a shorter row beside a longer one
    packed = pack([[5], [5, 6]], [[7, 9], [7, 8, 9]], 0, None, [[1, 0], [1, 0, 1]])
    assert packed.completion_mask.tolist() == [[1, 0, 0], [1, 0, 1]]


class DecodeNothing:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in ids]


def Rollout_(**fields):
    from online_rl.engines import Rollout

    return Rollout(**fields)


@pytest.mark.parametrize(
    "script, message",
    [
        ([RuntimeError("board on fire")], "'scripted'.*step\\(\\) at turn 1.*board on fire"),
        (["ok", ("ok", 1.0)], "step\\(\\) at turn 2 returned \\('ok', 1.0\\)"),
        ([("ok", "1", False)], "turn 1 returned reward='1'"),
        ([("ok", 0.0, "no")], "turn 1 returned done='no'"),
        ([(42, 0.0, False)], "turn 1 returned 42 \\(int\\)"),
        ([(None, 0.0, False)], "turn 1 returned no reply with done=False"),
    ],
)
def test_a_bad_environment_is_named_with_its_turn(eos_only_engine, tokenizer, script, message):
    with pytest.raises(EnvironmentFailure, match=message):
        episodes(tokenizer, script).play(eos_only_engine, [{"prompt": "a"}], 2, sampling())


def test_limits_end_episodes_and_are_counted(eos_only_engine, tokenizer):
    never_ends = ["again"] * 10
    _, rollout = episodes(tokenizer, never_ends, max_turns=3).play(
        eos_only_engine, [{"prompt": "a"}], 2, sampling()
    )
    assert rollout.stats["env/max_turns_reached"] == 2 and rollout.stats["env/turns_per_sample"] == 3
    reply = tokenizer(reply_text(tokenizer, [{"role": "user", "content": "again"}], True))["input_ids"]
    # room for one turn, one reply and one turn: the second reply does not fit, so the episode is cut there
    budget = 2 * (1 + len(reply))
    _, rollout = episodes(tokenizer, never_ends, max_turns=10, max_tokens=budget).play(
        eos_only_engine, [{"prompt": "a"}], 2, sampling()
    )
    assert rollout.stats["env/truncated"] == 2 and rollout.finished == [False, False]
    assert all(len(ids) <= budget for ids in rollout.completion_ids)
    assert rollout.completion_ids[0] == [tokenizer.eos_token_id, *reply, tokenizer.eos_token_id]


def test_a_turn_cut_at_its_length_goes_on_and_the_last_one_leaves_the_sample_unfinished(
    tiny_model_dir, tokenizer
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)))
    # never EOS: every turn runs to its limit
    model.lm_head.register_forward_hook(lambda _, __, logits: logits.index_fill(-1, eos_ids, -1e4))
    engine = TransformersEngine(model, tokenizer, torch.device("cpu"), None)
    _, rollout = episodes(tokenizer, ["more"]).play(engine, [{"prompt": "a"}], 2, sampling(5))
    # the model did not write <|im_end|>: the reply's text brings it (masked, as the environment's)
    reply = tokenizer(reply_text(tokenizer, [{"role": "user", "content": "more"}], after_eos=False))[
        "input_ids"
    ]
    assert reply[0] == tokenizer.eos_token_id
    assert rollout.model_mask == [[1] * 5 + [0] * len(reply) + [1] * 5] * 2
    assert [ids[5 : 5 + len(reply)] for ids in rollout.completion_ids] == [reply] * 2
    assert rollout.stats["env/turns_cut"] == 4 and rollout.finished == [False, False]
    assert rollout.columns["env_reward"] == [1.5, 1.5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo=dpo"], "preference algorithms \\(dpo, nash_md, xpo\\) do not support"),
        (["algo=nash_md"], "do not support multi-turn"),
        (["off_policy_steps=1", "vllm=colocate"], "on-policy only"),
        (["env.max_turns=0"], "env.max_turns=0 must be at least 1"),
        (["env.cls=null"], "env.cls is empty"),
        (["vllm=colocate", "vllm.max_model_len=64"], "vllm.max_model_len=64 is shorter than a conversation"),
    ],
)
def test_bad_env_settings_fail_before_anything_loads(make_config, overrides, message):
    from online_rl.checks import check_config

    with pytest.raises(ValueError, match=message):
        check_config(make_config("env=calculator", *overrides))


def test_an_unknown_environment_class_is_named(tokenizer):
    cfg = compose_config(["env=calculator", "env.cls=online_rl.envs.calculator.Abacus"]).env
    with pytest.raises(
        ValueError, match="env.cls='online_rl.envs.calculator.Abacus' is not an importable class"
    ):
        Episodes(cfg, tokenizer, None, 64)


def reward_curve(history: list[dict]) -> tuple[float, float]:
    rewards = [m["reward/guess_number_mean"] * (1 - m["reward/guess_number_none_frac"]) for m in history]
    return sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8


@pytest.mark.slow
def test_the_guessing_task_is_learnt_without_vllm(make_config):
    summary = run(make_config(*GUESS, "max_steps=40", "vllm=off"))
    first, last = reward_curve(summary.history)
    assert last > first + 0.05, (first, last)
    metrics = [json.loads(line) for line in (summary.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["env/turns_per_sample"] >= 1 and "time/env_s" in metrics[-1]


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_policy_gradient_algorithms_train_and_evaluate_on_conversations(make_config, algo):
    summary = run(
        make_config(
            *GUESS, f"algo={algo}", "max_steps=2", "prompts_per_step=2", "algo.num_generations=4",
            "micro_batch_size=8", "eval_every=2", "eval.split='test[:4]'", "eval.num_generations=2",
        )
    )  # fmt: skip
    for metrics in summary.history:
        assert {"env/turns_per_sample", "env/tool_calls", "env/truncated", "time/env_s"} <= set(metrics)
        assert "reward/guess_number_mean" in metrics
    assert "eval/guess_number_mean" in summary.evals[-1]
