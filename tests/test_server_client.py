"""The pure parts of vllm=server: splitting prompts, NCCL ranks, the request and answer formats, bounded
waits, the choice of weight transfer (NCCL or CUDA IPC) and the same-GPU guard, IPC's buckets and request
body, and the IPC push against a dead or hung endpoint. No vLLM server needed (test_vllm_server_cpu.py runs
the real one)."""

import base64
import importlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from online_rl.engines import EngineUnavailable
from online_rl.engines.server.gpu_guard import (
    SameDeviceError,
    ServerPlacement,
    TransferMismatchError,
    is_local_host,
    normalize_uuid,
    pick_transfer,
    server_gpu_uuids,
    visible_devices_in,
)
from online_rl.engines.server.vllm_server import (
    Background,
    bucket_counts,
    check_server_config,
    completion_request,
    import_ipc_engine,
    ipc_update_body,
    parse_completions,
    rank_offsets,
    serve_hint,
    shard,
    wait_all,
)

from .conftest import ROOT, compose_config, free_port

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
    assert serve_hint("m", ["http://h:8000"], "ipc").endswith("PORT=8000 MEM=0.3 TRANSFER=ipc")


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


def at(url, backend, *gpus):
    """A server on this host's GPUs `gpus` (indices into GPU) taking weights by `backend`."""
    return ServerPlacement(url, backend, [GPU[i] for i in gpus])


def elsewhere(url, backend):
    """A server on another host: its GPUs are not this host's to compare."""
    return ServerPlacement(url, backend, None)


TRAINER_ON_0 = GPU[0].removeprefix("GPU-").upper()  # torch reports UUIDs without the prefix
A, B = "http://127.0.0.1:8000", "http://127.0.0.1:8001"


@pytest.mark.parametrize(
    "servers, transfer",
    [
        ([at(A, "ipc", 0)], "ipc"),  # make serve GPUS=0 MEM=0.3 TRANSFER=ipc beside the trainer on GPU 0
        ([at(A, "nccl", 1)], "nccl"),  # the two-GPU layout
        ([at(A, "nccl", 1, 2), at(B, "nccl", 3)], "nccl"),  # TP=2 and TP=1 servers on GPUs of their own
        ([elsewhere("http://10.0.0.7:8000", "nccl")], "nccl"),
        ([at(A, "ipc", 0), at(B, "ipc", 0)], "ipc"),  # two servers sharing the trainer's GPU
    ],
)
def test_transfer_follows_where_the_servers_run(servers, transfer):
    assert pick_transfer(TRAINER_ON_0, servers, GPU, "m") == transfer


def test_nccl_server_on_the_trainers_gpu_is_refused_naming_the_ipc_flag():
    """The bad case of a user who serves on the trainer's GPU without IPC: the error names both fixes."""
    with pytest.raises(SameDeviceError) as refused:
        pick_transfer(TRAINER_ON_0, [at(A, "nccl", 0), at(B, "nccl", 2)], GPU, "Qwen/Qwen2-0.5B")
    message = str(refused.value)
    assert "GPU 0" in message and "127.0.0.1:8000" in message
    assert "make serve MODEL=Qwen/Qwen2-0.5B GPUS=0 MEM=0.3 TRANSFER=ipc PORT=8000" in message
    assert "CUDA_VISIBLE_DEVICES=1,3 python" in message  # or a GPU no server uses


def test_ipc_server_on_another_gpu_is_refused_naming_the_nccl_flag():
    with pytest.raises(TransferMismatchError) as refused:
        pick_transfer(GPU[1], [at(A, "ipc", 2)], GPU, "m")
    message = str(refused.value)
    assert "on GPU 2 of this host and the trainer on GPU 1" in message
    assert "make serve MODEL=m TRANSFER=nccl PORT=8000" in message
    assert "CUDA_VISIBLE_DEVICES=2 python" in message  # or train where the server is
    with pytest.raises(TransferMismatchError, match="on another host"):
        pick_transfer(GPU[1], [elsewhere("http://10.0.0.7:8000", "ipc")], GPU, "m")


def test_a_server_spanning_the_trainers_gpu_and_others_is_refused():
    """IPC reaches one GPU (vLLM looks its own UUID up in the handles), NCCL needs another: neither fits."""
    with pytest.raises(SameDeviceError, match=r"one of the 2 GPUs.*GPUS=0 MEM=0.3 TRANSFER=ipc"):
        pick_transfer(TRAINER_ON_0, [at(A, "ipc", 0, 1)], GPU, "m")


def test_servers_of_both_transfers_are_refused():
    with pytest.raises(TransferMismatchError, match="one push goes one way"):
        pick_transfer(TRAINER_ON_0, [at(A, "ipc", 0), at(B, "nccl", 1)], GPU, "m")


def test_no_gpu_left_for_the_trainer_says_so():
    with pytest.raises(SameDeviceError, match="serve on fewer GPUs"):
        pick_transfer(GPU[0], [at(A, "nccl", 0, 1, 2, 3)], GPU, "m")


def server_info(backend, env_vars="CUDA_VISIBLE_DEVICES=0\n"):
    """The parts of /server_info that check_server_config reads."""
    return {
        "vllm_config": {
            "model_config": {"logprobs_mode": "processed_logprobs"},
            "weight_transfer_config": {"backend": backend} if backend else None,
        },
        "system_env": {"env_vars": env_vars},
    }


def test_server_transfer_flags_are_checked():
    check_server_config(A, server_info("nccl"), needs_weight_transfer=True)
    check_server_config(A, server_info("ipc", "VLLM_ALLOW_INSECURE_SERIALIZATION=1\n"), True)
    with pytest.raises(ValueError, match="without VLLM_ALLOW_INSECURE_SERIALIZATION=1.*TRANSFER=ipc"):
        check_server_config(A, server_info("ipc"), needs_weight_transfer=True)
    with pytest.raises(ValueError, match="'sparse_nccl' weight-transfer engine.*TRANSFER=nccl"):
        check_server_config(A, server_info("sparse_nccl"), needs_weight_transfer=True)
    with pytest.raises(ValueError, match="no weight-transfer engine"):
        check_server_config(A, server_info(None), needs_weight_transfer=True)
    check_server_config(A, server_info(None), needs_weight_transfer=False)  # generation only


@pytest.mark.parametrize(
    "sizes, capacity, counts",
    [
        ([4, 4, 4, 4], 8, [2, 2]),
        ([4, 4, 4], 8, [2, 1]),
        ([3, 9, 2, 2], 8, [1, 1, 2]),  # a tensor over the capacity goes alone (the buffer is raised to it)
        ([1, 1, 1], 100, [3]),
        ([], 8, []),
    ],
)
def test_ipc_buckets_keep_push_order_and_capacity(sizes, capacity, counts):
    assert bucket_counts(sizes, capacity) == counts
    assert sum(counts) == len(sizes)


IPC_MODULE = "vllm.distributed.weight_transfer.ipc_engine"


@pytest.fixture
def ipc_engine_module(monkeypatch):
    """vLLM's IPC module; where ray is not installed (CPU machines), imported with an empty `ray` for its
    import line, and forgotten afterwards."""
    pytest.importorskip("vllm")
    if importlib.util.find_spec("ray") is not None:
        yield import_ipc_engine()
        return
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.delitem(sys.modules, IPC_MODULE, raising=False)
    yield import_ipc_engine()
    sys.modules.pop(IPC_MODULE, None)


def test_ipc_update_body_is_what_vllms_route_decodes(ipc_engine_module, monkeypatch):
    handle = {"gpu-uuid": ("rebuild", "args", 6, 7)}  # the shape of torch's reduce_tensor arguments
    update = ipc_engine_module.IPCWeightTransferUpdateInfo(
        names=["a", "b"],
        dtype_names=["bfloat16", "float32"],
        shapes=[[2, 3], [4]],
        ipc_handles=handle,
        tensor_sizes=[12, 16],
        packed=True,
    )
    body = ipc_update_body(update)
    json.dumps(body)  # it travels as JSON
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # as make serve TRANSFER=ipc sets it
    # an engine started earlier in this process made vLLM cache its environment variables: read them afresh
    # (vLLM's own switch for isolating tests; uncached, every later read just looks the variable up)
    importlib.import_module("vllm.envs").disable_envs_cache()
    receiver = object.__new__(ipc_engine_module.IPCWeightTransferEngine)  # parsing needs no model or GPU
    parsed = receiver.parse_update_info(dict(body["update_info"]))
    assert parsed.ipc_handles == handle and parsed.packed and parsed.tensor_sizes == [12, 16]
    assert (parsed.names, parsed.shapes) == (["a", "b"], [[2, 3], [4]])
    assert pickle.loads(base64.b64decode(body["update_info"]["ipc_handles_pickled"])) == handle


def test_missing_ray_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    monkeypatch.delitem(sys.modules, IPC_MODULE, raising=False)
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match=r"imports ray.*pip install -e '\.\[server\]'"):
        import_ipc_engine()


class EndpointStandIn(BaseHTTPRequestHandler):
    """The start-up routes of a vLLM server (what VLLMServerEngine reads before any push), and an
    /update_weights that never answers: an unreachable endpoint, not vLLM's computation."""

    def do_GET(self):
        answers = {
            "/health": {},
            "/server_info": server_info("ipc", "VLLM_ALLOW_INSECURE_SERIALIZATION=1\n"),
            "/get_world_size": {"world_size": 1},
        }
        self.answer(answers.get(self.path.split("?")[0]))

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/update_weights":
            time.sleep(30)  # hung: the client's timeout must end the wait
        self.answer({})

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_server():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), EndpointStandIn)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def bucket_update():
    return types.SimpleNamespace(
        names=["w"], dtype_names=["float32"], shapes=[[4]], tensor_sizes=[16], ipc_handles={"gpu-uuid": (1,)}
    )


def engine_at(url, **settings):
    """A generation-only engine (a CPU needs no GPU for it) whose IPC push runs against `url`."""
    from online_rl.engines.server.vllm_server import VLLMServerEngine

    overrides = {"sync_weights": "false", "connect_timeout_s": 5, **settings}
    cfg = compose_config(
        ["vllm=server", f"vllm.base_urls=[{url}]", *[f"vllm.{k}={v}" for k, v in overrides.items()]]
    )
    return VLLMServerEngine(cfg.vllm, torch.device("cpu"), model_path="tiny")


def test_ipc_bucket_to_a_hung_server_ends_within_the_sync_timeout(stand_in_server):
    engine = engine_at(f"http://127.0.0.1:{stand_in_server.server_port}", nccl_timeout_s=1)
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnavailable, match=r"did not answer POST /update_weights after 1 attempt"):
            engine.post_ipc_bucket(bucket_update())
    finally:
        engine.close()
    assert time.monotonic() - started < 10


def test_ipc_bucket_to_a_dead_server_fails_at_once_naming_make_serve(stand_in_server):
    engine = engine_at(f"http://127.0.0.1:{stand_in_server.server_port}")
    stand_in_server.shutdown()  # killed between start-up and the push
    stand_in_server.server_close()
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnavailable, match=r"Is it still running\? Start it again with `make serve"):
            engine.post_ipc_bucket(bucket_update())
    finally:
        engine.close()
    assert time.monotonic() - started < 10


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


def test_serve_with_ipc_shares_the_trainers_gpu():
    """make serve MODEL=... GPUS=0 TRANSFER=ipc: the IPC engine, the handles' serialization allowed, a third
    of the GPU by default, and the trainer told to use the same GPU."""
    status, out = serve_plan(GPUS="0", TRANSFER="ipc")
    assert status == 0, out
    (server,) = [line for line in out.splitlines() if "api_server" in line]
    assert '--weight-transfer-config \\{\\"backend\\":\\"ipc\\"\\}' in server
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION=1" in server and "--gpu-memory-utilization 0.3" in server
    assert "CUDA_VISIBLE_DEVICES=0 python train.py vllm=server hardware=1gpu" in out
    status, out = serve_plan(GPUS="0", TRANSFER="ipc", MEM="0.5")
    assert "--gpu-memory-utilization 0.5" in out


def test_serve_defaults_to_nccl_where_gpus_are_left_for_the_trainer():
    """auto picks IPC only when the server takes the host's one GPU; this host's count comes from nvidia-smi
    (none on a CPU machine: NCCL, as before)."""
    status, out = serve_plan(GPUS="0,1", TP="2")
    assert status == 0, out
    assert '\\"backend\\":\\"nccl\\"' in out and "--gpu-memory-utilization 0.9" in out
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in out


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"MODEL": ""}, "MODEL is required"),
        ({"TRANSFER": "ipc", "GPUS": "0,1", "TP": "2"}, "TP and DP must be 1"),
        ({"TRANSFER": "ipc", "HOST": "0.0.0.0"}, "leave HOST at 127.0.0.1"),
        ({"TRANSFER": "shm"}, "TRANSFER must be auto, nccl or ipc"),
        ({"GPUS": "0", "DP": "2"}, "needs 2, e.g. GPUS=0,1"),
        ({"TP": "0"}, "TP and DP must be positive integers"),
    ],
)
def test_serve_refuses_bad_settings_naming_the_fix(settings, message):
    status, out = serve_plan(**settings)
    assert status == 2 and message in out, out
