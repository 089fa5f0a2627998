"""The pure parts of vllm=server: splitting prompts, NCCL ranks, the request and answer formats, bounded
waits, and the same-GPU guard. No server needed (test_vllm_server_cpu.py runs the real one)."""

import os
import subprocess
import time

import pytest

from online_rl.engines import EngineUnavailable
from online_rl.engines.server.gpu_guard import (
    SameDeviceError,
    check_trainer_gpu,
    is_local_host,
    normalize_uuid,
    server_gpu_uuids,
    visible_devices_in,
)
from online_rl.engines.server.vllm_server import (
    Background,
    completion_request,
    parse_completions,
    rank_offsets,
    serve_hint,
    shard,
    wait_all,
)

from .conftest import ROOT, compose_config

GPU = [f"GPU-{i}aaaaaaa-1111-2222-3333-44444444444{i}" for i in range(4)]  # NVML's form, host order


@pytest.mark.parametrize(
    "items, parts, expected",
    [
        (list(range(7)), 3, [[0, 1, 2], [3, 4], [5, 6]]),
        (list(range(6)), 2, [[0, 1, 2], [3, 4, 5]]),
        ([9], 3, [[9], [], []]),
        ([], 2, [[], []]),
    ],
)
def test_shard_is_contiguous_balanced_and_joins_back(items, parts, expected):
    shares = shard(items, parts)
    assert shares == expected
    assert [x for share in shares for x in share] == items


def test_rank_offsets_follow_the_trainer_server_by_server():
    assert rank_offsets([1]) == [1]
    assert rank_offsets([2, 1, 4]) == [1, 3, 4]  # TP=2 server, TP=1 server, TP=4 server; trainer is rank 0


def test_completion_request_pins_every_sampling_knob():
    sampling = compose_config(["sampling.temperature=0.7", "sampling.top_k=20"]).sampling
    body = completion_request([[1, 2], [3]], 4, sampling, regex=None)
    assert body["prompt"] == [[1, 2], [3]] and body["n"] == 4
    assert (body["temperature"], body["top_k"], body["top_p"]) == (0.7, 20, 1.0)
    # a hub model's generation_config must not change what the server samples from
    assert (body["repetition_penalty"], body["min_p"], body["presence_penalty"]) == (1.0, 0.0, 0.0)
    assert body["logprobs"] == 0 and body["return_token_ids"] is True
    assert "structured_outputs" not in body
    assert completion_request([[1]], 1, sampling, regex="[0-9]+")["structured_outputs"] == {"regex": "[0-9]+"}


def choice(index, tokens, finish="length"):
    return {
        "index": index,
        "token_ids": tokens,
        "finish_reason": finish,
        "logprobs": {"token_logprobs": [-0.5 * (t + 1) for t in range(len(tokens))]},
    }


def test_parse_completions_orders_choices_prompt_major():
    answer = {"choices": [choice(3, [7]), choice(0, [1, 2], "stop"), choice(2, [5, 6]), choice(1, [3])]}
    ids, finished, logprobs = parse_completions(answer, prompts=2, n=2)
    assert ids == [[1, 2], [3], [5, 6], [7]]
    assert finished == [True, False, False, False]
    assert logprobs == [[-0.5, -1.0], [-0.5], [-0.5, -1.0], [-0.5]]


def test_parse_completions_rejects_short_or_incomplete_answers():
    with pytest.raises(RuntimeError, match="returned 1 completions for 2 prompts"):
        parse_completions({"choices": [choice(0, [1])]}, prompts=2, n=1)
    no_logprobs = {**choice(0, [1, 2]), "logprobs": None}
    with pytest.raises(RuntimeError, match="lacks token ids or their log-probs"):
        parse_completions({"choices": [no_logprobs]}, prompts=1, n=1)


def test_serve_hint_names_the_port_and_servers():
    assert (
        serve_hint("Qwen/Qwen2-0.5B", ["http://127.0.0.1:8100"])
        == "make serve MODEL=Qwen/Qwen2-0.5B GPUS=0 PORT=8100"
    )
    assert serve_hint("m", ["http://h:9000", "http://h:9001"]).endswith("PORT=9000 DP=2")


def test_wait_all_raises_the_first_error_without_waiting_for_a_hung_task():
    hung = Background(lambda: time.sleep(30), "a hung broadcast")
    failed = Background(lambda: 1 / 0, "a refused update")
    started = time.monotonic()
    with pytest.raises(ZeroDivisionError):
        wait_all([hung, failed], timeout=20)
    assert time.monotonic() - started < 5


def test_wait_all_bounds_a_hung_task():
    hung = Background(lambda: time.sleep(30), "the NCCL rendezvous")
    with pytest.raises(EngineUnavailable, match="the NCCL rendezvous did not finish within 1 s"):
        wait_all([hung, Background(lambda: 3, "quick")], timeout=1)
    assert wait_all([Background(lambda: 3, "a"), Background(lambda: 4, "b")], timeout=5) == [3, 4]


def test_visible_devices_from_the_servers_environment_report():
    assert visible_devices_in("VLLM_X=1\nCUDA_VISIBLE_DEVICES=2,3\nNCCL_DEBUG=INFO\n") == "2,3"
    assert visible_devices_in("VLLM_X=1\n") is None


@pytest.mark.parametrize(
    "visible, world_size, expected",
    [
        ("0", 1, [0]),
        ("2,3", 2, [2, 3]),
        ("3,1,0", 1, [3]),  # a TP=1 server uses the first GPU it sees
        (None, 2, [0, 1]),  # no CUDA_VISIBLE_DEVICES: the first world_size GPUs of the host
        ("GPU-2aaa,GPU-0aaaaaaa-1111", 2, [2, 0]),  # UUID prefixes, as CUDA accepts them
    ],
)
def test_server_gpu_uuids(visible, world_size, expected):
    assert server_gpu_uuids(visible, GPU, world_size) == [normalize_uuid(GPU[i]) for i in expected]


def test_server_gpu_uuids_rejects_devices_this_host_lacks():
    with pytest.raises(ValueError, match="names GPU 7, but this host has 4"):
        server_gpu_uuids("7", GPU, 1)


def test_trainer_on_a_server_gpu_is_refused_with_the_devices_to_use():
    servers = {"http://127.0.0.1:8000": [GPU[0]], "http://127.0.0.1:8001": [GPU[2]]}
    torch_style = GPU[2].removeprefix("GPU-").upper()  # torch reports UUIDs without the prefix
    with pytest.raises(
        SameDeviceError, match=r"GPU 2 .*127.0.0.1:8001 uses.*CUDA_VISIBLE_DEVICES=1,3 python"
    ):
        check_trainer_gpu(torch_style, servers, GPU)
    check_trainer_gpu(GPU[1], servers, GPU)  # a GPU of its own: fine


def test_no_gpu_left_for_the_trainer_says_so():
    with pytest.raises(SameDeviceError, match="serve on fewer GPUs"):
        check_trainer_gpu(GPU[0], {"http://127.0.0.1:8000": GPU}, GPU)


def test_local_hosts():
    assert is_local_host("http://127.0.0.1:8000")
    assert is_local_host("http://localhost:8000")
    assert not is_local_host("http://203.0.113.7:8000")  # TEST-NET-3: no machine's own address
    assert not is_local_host("http://no-such-host.invalid:8000")


def serve_plan(**settings):
    """scripts/serve.sh's output with DRY_RUN=1 (the commands it would run), and its exit status."""
    # no HOST from the caller's environment: the default bind address is part of what is tested
    env = {**{k: v for k, v in os.environ.items() if k != "HOST"}, "DRY_RUN": "1", "MODEL": "m", **settings}
    result = subprocess.run(
        ["bash", "scripts/serve.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    return result.returncode, result.stdout + result.stderr


def test_serve_splits_dp_into_servers_on_disjoint_gpus_and_ports():
    status, out = serve_plan(GPUS="0,1,2,3", TP="2", DP="2", PORT="9000", MAX_LEN="1024")
    assert status == 0, out
    servers = [line for line in out.splitlines() if "api_server" in line]
    assert len(servers) == 2
    assert "CUDA_VISIBLE_DEVICES=0\\,1" in servers[0] and "--port 9000" in servers[0]
    assert "CUDA_VISIBLE_DEVICES=2\\,3" in servers[1] and "--port 9001" in servers[1]
    for line in servers:
        assert "VLLM_SERVER_DEV_MODE=1" in line and "--logprobs-mode processed_logprobs" in line
        assert "--weight-transfer-config" in line and "--tensor-parallel-size 2" in line
        assert "--max-model-len 1024" in line and "--host 127.0.0.1" in line
    assert "vllm=server 'vllm.base_urls=[http://127.0.0.1:9000,http://127.0.0.1:9001]'" in out


def test_serve_native_dp_is_one_server():
    status, out = serve_plan(GPUS="0,1", DP="2", DP_MODE="native")
    assert status == 0, out
    (server,) = [line for line in out.splitlines() if "api_server" in line]
    assert "--data-parallel-size 2" in server and "'vllm.base_urls=[http://127.0.0.1:8000]'" in out


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"MODEL": ""}, "MODEL is required"),
        ({"GPUS": "0", "DP": "2"}, "needs 2, e.g. GPUS=0,1"),
        ({"TP": "0"}, "TP and DP must be positive integers"),
    ],
)
def test_serve_refuses_bad_settings_naming_the_fix(settings, message):
    status, out = serve_plan(**settings)
    assert status == 2 and message in out, out
