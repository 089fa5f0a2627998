"""scripts/gpu_validate_server_ipc.sh (issue 28, point 5) on a CPU: the commands it would run (DRY_RUN=1), and
its summary (scripts/summarize_server_ipc.py) from a work directory as the script leaves it."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from .conftest import ROOT, compose_config, gone


def plan(**settings) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_validate_server_ipc.sh", "algo.beta=0.0"],
        cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1", **settings},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_dry_run_serves_the_trainers_model_and_runs_k0_k1_k2_then_colocate(tmp_path):
    model_dir = str(tmp_path / "model")
    done = plan(MODEL_DIR=model_dir, GPU="1", PORT="8100")
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]
    build, serve, *runs, summarize = commands
    assert build == ["python", "scripts/build_random_model.py", "model=qwen2_0.5b_random", "--out", model_dir]
    assert serve[-2:] == ["bash", "scripts/serve.sh"]
    for setting in (
        f"MODEL={model_dir}",
        "GPUS=1",
        "PORT=8100",
        "MEM=0.3",
        "TRANSFER=ipc",
        "EXTRA=--dtype bfloat16",
    ):
        assert setting in serve, setting
    assert summarize[:2] == ["python", "scripts/summarize_server_ipc.py"]
    configs = []
    for run in runs:
        assert run[:4] == ["env", "CUDA_VISIBLE_DEVICES=1", "python", "train.py"]
        overrides = [o for o in run[4:] if not o.startswith("hydra.")]
        configs.append(compose_config(overrides))
    k0, k1, k2, colocate = configs
    for k, cfg in enumerate((k0, k1, k2)):
        assert cfg.vllm.mode.value == "server" and list(cfg.vllm.base_urls) == ["http://127.0.0.1:8100"]
        assert cfg.off_policy_steps == k
    assert colocate.vllm.mode.value == "colocate" and colocate.off_policy_steps == 0
    for cfg in configs:  # the server's directory is the trainer's starting model; the rest the same for all
        assert cfg.model.random_init is None and cfg.model.name_or_path == model_dir
        assert list(cfg.rewards) == ["digits"]
        assert (cfg.max_steps, cfg.prompts_per_step, cfg.sampling.max_completion_length) == (20, 16, 32)
        assert cfg.optim.lr == 1e-3 and cfg.hardware.device == "cuda" and cfg.algo.beta == 0.0
    assert [run[-1] for run in runs] == [
        f"hydra.run.dir=/tmp/gpu-validate-server-ipc-work/runs/{n}" for n in ("k0", "k1", "k2", "colocate")
    ]


def test_an_unknown_run_is_refused_before_anything_starts():
    done = plan(RUNS="k0 k3")
    assert done.returncode == 2 and "unknown run k3 (k0, k1, k2, colocate)" in done.stderr
    assert "build_random_model" not in done.stdout


def step(n: int, gap: float, staleness: int, reward: float, seconds: float) -> dict:
    return {
        "step": n,
        "reward/total_mean": reward,
        "sync/logp_gap_mean": gap,
        "rollout/staleness": staleness,
        "time/sync_s": 0.2,
        "time/step_s": seconds,
        "memory/torch_peak_reserved_gib": 9.5,
    }


@pytest.fixture
def work(tmp_path):
    """A work directory as the script leaves it: the server up at t=100, k0 (on-policy) in 110-130 with the
    trainer as pid 7 beside the server's pid 5, k1 in 131-150 with nvidia-smi showing no processes, colocate
    in 160-180, k2 skipped for time."""
    work = tmp_path / "work"
    runs = {
        "k0": [step(1, 0.004, 0, 0.1, 9.0), step(2, 0.005, 0, 0.3, 1.0), step(3, 0.006, 0, 0.5, 1.2)],
        # stale steps far off the trainer; only the first (on-policy) is checked
        "k1": [step(1, 0.004, 0, 0.1, 9.0), step(2, 0.4, 1, 0.2, 0.8), step(3, 0.5, 1, 0.4, 0.6)],
        "colocate": [step(1, 0.007, 0, 0.1, 30.0), step(2, 0.008, 0, 0.2, 1.1), step(3, 0.009, 0, 0.6, 1.3)],
    }
    for name, lines in runs.items():
        (work / "runs" / name).mkdir(parents=True)
        (work / "runs" / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (work / "runs.tsv").write_text(
        "k0\t110\t130\t7\t0\nk1\t131\t150\t8\t0\nk2\t-\t-\t-\tskipped\ncolocate\t160\t180\t9\t0\n"
    )
    (work / "server.txt").write_text("server_up 100 after 150 s\nserver_down 155\n")
    memory = ["101,device,20000", "105,device,21000", "105,app,5,20500"]
    memory += [
        "115,app,5,21000",
        "115,app,7,30000",
        "115,device,51500",
        "120,app,7,35000",
        "120,device,56500",
    ]
    memory += ["140,device,60000", "140,app,[N/A]", "170,app,9,40000", "170,device,40500"]
    (work / "memory.csv").write_text("\n".join(memory) + "\n")
    return work


def test_summary_checks_on_policy_steps_and_splits_the_memory(work, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "scripts/summarize_server_ipc.py", str(work), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    runs = {run["run"]: run for run in summary["runs"]}
    assert summary["server_alone_mib"] == 21000  # the device from /health to the first run
    k0, k1, k2, colocate = runs["k0"], runs["k1"], runs["k2"], runs["colocate"]
    assert k0["gap_ok"] and k0["on_policy_gap_max"] == 0.006 and k0["staleness"] == [0, 0, 0]
    assert k0["median_step_s"] == 1.1 and k0["first_step_s"] == 9.0  # the first step apart
    assert (k0["reward_first"], k0["reward_last"]) == (0.1, 0.5) and k0["sync_s_median"] == 0.2
    assert k0["memory"] == {"trainer_mib": 35000, "server_mib": 21000, "device_peak_mib": 56500}
    assert k1["gap_ok"] and k1["on_policy_gap_max"] == 0.004 and k1["staleness"] == [0, 1, 1]
    assert k1["memory"]["trainer_mib"] is None and k1["memory"]["trainer_mib_estimated"] == 60000 - 21000
    assert k2 == {"run": "k2", "status": "skipped", "steps": 0}
    assert colocate["memory"]["trainer_mib"] == 40000 and colocate["memory"]["server_mib"] is None
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["run"] for line in lines] == ["k0"] * 3 + ["k1"] * 3 + ["colocate"] * 3
    table = (out / "summary.md").read_text()
    assert table.strip() == done.stdout.strip()
    assert "| k1 | 0 | 3 | 0.0040 | True |" in table and "~39000" in table and "| k2 | skipped | 0 |" in table
    assert "- k1: 0.0040/0/0.20 0.4000/1/0.20 0.5000/1/0.20" in table


def test_an_on_policy_step_over_the_threshold_is_not_ok(work, tmp_path):
    from scripts.summarize_server_ipc import run_summary

    lines = [step(1, 0.004, 0, 0.1, 9.0), step(2, 0.2, 0, 0.2, 1.0)]
    assert run_summary(lines)["gap_ok"] is False and run_summary([])["steps"] == 0


STAND_IN_PYTHON = """\
#!/usr/bin/env bash
# `python` for the script on a CPU: the model build, the health probe, the server and train.py stand-ins; the
# summary runs for real
case $1 in
  scripts/build_random_model.py) mkdir -p "${@: -1}" && echo {} > "${@: -1}/config.json" ;;
  -c) [[ $2 == *urlopen* && -n ${NEVER_HEALTHY:-} ]] && exit 1; exit 0 ;;  # serve.sh's `import ray`, the /health probe
  -m) echo $$ > "$STAND_IN/server.pid"; exec sleep 600 ;;  # the server: up until stopped
  train.py)
    for arg; do case $arg in hydra.run.dir=*) dir=${arg#*=} ;; off_policy_steps=*) k=${arg#*=} ;; esac; done
    mkdir -p "$dir" && echo "$CUDA_VISIBLE_DEVICES $*" >> "$STAND_IN/trained.txt"
    for n in 1 2 3; do
      echo "{\\"step\\": $n, \\"reward/total_mean\\": 0.$n, \\"sync/logp_gap_mean\\": 0.00$n, \\"rollout/staleness\\": $(( n > 1 ? ${k:-0} : 0 )), \\"time/step_s\\": 1.$n, \\"time/sync_s\\": 0.1}" >> "$dir/metrics.jsonl"
    done ;;
  *) exec {python} "$@" ;;
esac
"""


def stand_ins(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STAND_IN_PYTHON.replace("{python}", sys.executable))
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 1234\n")  # one number per query
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STAND_IN": str(tmp_path),
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "MODEL_DIR": str(tmp_path / "model"),
        "PORT": "8197",
    }


def run_script(env: dict[str, str]) -> None:
    """The validation script for real (not a dry run), with the stand-ins of `env`; it must exit 0."""
    env.pop("DRY_RUN", None)
    done = subprocess.run(
        ["bash", "scripts/gpu_validate_server_ipc.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_script_runs_its_steps_stops_the_server_and_leaves_its_files(tmp_path):
    """The script itself with stand-ins for vLLM, the trainer and nvidia-smi: every run against the one server,
    then colocate; the server stopped at the end; the summary's files in OUT."""
    env = {**os.environ, **stand_ins(tmp_path)}
    run_script(env)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "logs.txt",
        "memory.csv",
        "metrics.jsonl",
        "summary.json",
        "summary.md",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert [(run["run"], run["status"], run["steps"]) for run in summary["runs"]] == [
        ("k0", "0", 3),
        ("k1", "0", 3),
        ("k2", "0", 3),
        ("colocate", "0", 3),
    ]
    assert [run["staleness"] for run in summary["runs"]] == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 0, 0]]
    assert summary["server"].startswith("server_up ") and summary["server_alone_mib"] == 1234
    trained = (tmp_path / "trained.txt").read_text().splitlines()
    assert len(trained) == 4 and all(line.startswith("0 train.py ") for line in trained)
    assert gone(int((tmp_path / "server.pid").read_text())), "the stand-in server outlived the script"
    assert "serve: stopping 1 server(s)" in (tmp_path / "work" / "serve.log").read_text()


def test_runs_that_cannot_end_before_the_limit_are_skipped_and_still_summarized(tmp_path):
    env = {**os.environ, **stand_ins(tmp_path), "LIMIT_S": "60", "RUN_S": "100", "RUNS": "k0 colocate"}
    run_script(env)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(run["run"], run["status"]) for run in summary["runs"]] == [
        ("k0", "skipped"),
        ("colocate", "skipped"),
    ]
    assert not (tmp_path / "trained.txt").exists()


def test_a_server_that_never_answers_is_stopped_and_colocate_still_runs(tmp_path):
    env = {**os.environ, **stand_ins(tmp_path), "NEVER_HEALTHY": "1", "SERVER_START_S": "3"}
    run_script(env)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(run["run"], run["status"]) for run in summary["runs"]] == [
        ("k0", "no server"),
        ("k1", "no server"),
        ("k2", "no server"),
        ("colocate", "0"),
    ]
    assert summary["server"].startswith("server_failed")
    assert gone(int((tmp_path / "server.pid").read_text()))
