"""make bench's harness on a CPU: both frameworks run the same tiny GRPO step, and the results files say so.

The numbers on a CPU measure nothing; the H200 runs are in bench/results/. This checks that one command
runs our loop and TRL's GRPOTrainer on the same model, prompts and settings and reports them side by side.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_bench_runs_ours_and_trl_side_by_side(tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--arms",
        "trl_full,ours_full,floor",
        "--set",
        "measured_steps=2",
        "--set",
        "profile=true",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    # from the repository's root, as `make bench` runs it
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (results_file,) = out.glob("*-smoke.json")
    results = json.loads(results_file.read_text())
    arms = {row["arm"]: row for row in results["arms"]}
    assert set(arms) == {"trl_full", "ours_full", "floor"} and not results["failures"]

    settings = results["settings"]
    prompts = (tmp_path / "work" / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) >= settings["prompts_per_step"] * (
        settings["warmup_steps"] + settings["measured_steps"]
    )
    for name in ("trl_full", "ours_full"):
        raw = json.loads((tmp_path / "work" / f"{name}.json").read_text())
        assert len(raw["step_s"]) == settings["measured_steps"]
        # every completion of the tiny random model runs to the length limit in both frameworks
        full_step = settings["prompts_per_step"] * settings["num_generations"] * settings["completion_tokens"]
        assert all(0 < tokens <= full_step for tokens in raw["completion_tokens"])

    ours, floor = arms["ours_full"], arms["floor"]
    assert floor["floor_s"] == floor["generate_alone_s"] + floor["train_alone_s"] > 0
    # our phases inside a step: generation and training are there, and the rest is what the step adds
    assert 0 < ours["phases_s"]["generate"] + ours["phases_s"]["train"] < ours["s_per_step_median"]
    assert ours["phases_s"]["logprobs"] == 0  # TRL's defaults (mu=1, beta=0): no log-prob pass of its own
    # of them, the seconds in Python's garbage collector, per step and per generation alone
    assert len(ours["gc_steps_s"]) == settings["measured_steps"] and 0 <= ours["phases_s"]["gc"]
    assert len(floor["generate_alone_gc_s"]) == settings["measured_steps"]
    # and the main thread's CPU seconds in each rollout: some, and never more than the rollout's own
    for walls, cpus in (
        (ours["generate_steps_s"], ours["generate_cpu_steps_s"]),
        (floor["generate_alone_steps_s"], floor["generate_alone_cpu_s"]),
    ):
        assert len(cpus) == settings["measured_steps"]
        assert all(0 < cpu <= wall for cpu, wall in zip(cpus, walls))
    assert all(steal >= 0 for steal in ours["generate_steal_steps_s"] + floor["generate_alone_steal_s"])
    report = results_file.with_suffix(".md").read_text()
    assert "| ours_full | " in report.split("Each measured rollout")[1]
    measured = {target["target"]: target["measured"] for target in results["targets"]}
    assert measured["full fine-tune: step / floor (generation alone + training alone)"] == pytest.approx(
        ours["s_per_step_median"] / floor["floor_s"]
    )
    # how far TRL's step is above the floor: the most a step that generates, then trains, could gain on it
    assert results["floor_bounds"]["floor"]["trl_over_floor"] == pytest.approx(
        arms["trl_full"]["s_per_step_median"] / floor["floor_s"]
    )
    assert (
        abs(
            results["ours_over_trl"]["full"]
            - ours["completion_tokens_per_s"] / arms["trl_full"]["completion_tokens_per_s"]
        )
        < 1e-9
    )
    table = results_file.with_suffix(".md").read_text()
    assert "| trl_full |" in table and "| ours_full |" in table and "Our phases" in table
    # what the command ran on: machines differ from one lease to the next
    (the_command,) = results["commands"]
    assert the_command["machine"]["cpus"] == os.cpu_count() and f"{os.cpu_count()} CPUs" in table
    assert "TRL's step / floor" in table
    # how fast the host's CPUs ran Python before and after each arm (other tenants slow them)
    for row in arms.values():
        for probe in (row["host_cpus_ms"]["before"], row["host_cpus_ms"]["after"]):
            assert 0 < probe["fastest"] <= probe["median"] <= probe["slowest"]
    assert (
        "The host's CPUs before -> after each arm" in table and "trl_full " in table.split("host's CPUs")[1]
    )
    assert results_file.with_suffix(".png").stat().st_size > 0
    # the floor's extra, untimed step under torch.profiler: the matrix products of the forward and backward
    profile = results_file.with_name(results_file.stem + "-floor-train-profile.txt").read_text()
    assert "aten::mm" in profile and "AdamW" in profile

    # the same command again, without --append, must not erase these results
    written = results_file.read_bytes()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "exists: add these arms to it with --append" in again.stderr
    assert results_file.read_bytes() == written

    # a second command's arms join the first's results, each arm saying which command measured it
    more = [*command[:5], "ours_lora", *command[6:], "--append"]
    appended = subprocess.run(more, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert appended.returncode == 0, (appended.stdout + appended.stderr)[-3000:]
    results = json.loads(results_file.read_text())
    assert [c["arms"] for c in results["commands"]] == [["trl_full", "ours_full", "floor"], ["ours_lora"]]
    assert {row["arm"]: row["command"] for row in results["arms"]} == {
        "trl_full": 1,
        "ours_full": 1,
        "floor": 1,
        "ours_lora": 2,
    }
    assert "full" in results["ours_over_trl"] and "lora" not in results["ours_over_trl"]  # no trl_lora
    # --append where no results of this commit are: an error, not a results file of its own
    elsewhere = (
        more[: more.index("--out") + 1] + [str(tmp_path / "elsewhere")] + more[more.index("--out") + 2 :]
    )
    lost = subprocess.run(elsewhere, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (
        lost.returncode != 0 and "point --out at the directory of the first command's results" in lost.stderr
    )
    assert not list((tmp_path / "elsewhere").glob("*.json"))


def smoke_variants(
    tmp_path, module: str, variants: str, profile: str, *options: str, env: dict | None = None
) -> tuple[dict, str]:
    """python -m bench.<module> --smoke over variants, one of them profiled: (its results file, its printed
    output)."""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--smoke", "--variants", variants, *options]
        + ["--profile", profile, "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (results_file,) = out.glob(f"{module.replace('_', '-')}-*-smoke.json")
    return json.loads(results_file.read_text()), result.stdout


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_train_speed_times_the_bench_training_step_under_variants(tmp_path):
    """bench.train_speed: the bench's optimizer step alone, one process per variant, warm-up apart from
    the measured steps, and the profiled variant's kernel table."""
    results, stdout = smoke_variants(tmp_path, "train_speed", "eager,lora_eager", "lora_eager")
    out = tmp_path / "results"
    settings = results["settings"]
    assert [v["variant"] for v in results["variants"]] == ["eager", "lora_eager"] and not results["failures"]
    for variant in results["variants"]:
        assert len(variant["warmup_s"]) == settings["warmup_steps"]
        assert len(variant["step_s"]) == settings["measured_steps"]
        assert variant["train_s"] > 0
    assert results["variants"][1]["overrides"] == ["model.lora.enabled=true"]
    (profile,) = out.glob("train-speed-*-smoke-lora_eager-profile.txt")
    assert "aten::" in profile.read_text()
    assert "| eager | 2 |" in stdout  # the table: variant, micro-batch size, seconds


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_gen_speed_times_the_bench_rollout_under_variants(tmp_path):
    """bench.gen_speed: the bench's rollout alone, one process per variant (here the CPU's engine:
    transformers generate), warm-up apart, each measured rollout's CPU seconds, and the profiled variant's
    kernel and Python tables; with --mps, CUDA's MPS daemon (a stand-in here) runs around the variants."""
    calls = tmp_path / "mps-calls"
    fake = stand_in_mps_control(tmp_path / "bin", calls)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    results, stdout = smoke_variants(
        tmp_path, "gen_speed", "default,half_batch", "half_batch", "--mps", env=env
    )
    pipe = tmp_path / "work" / "mps" / "pipe"
    assert calls.read_text().splitlines() == [f"start {pipe}", f"quit {pipe}"] and results["mps"]
    out = tmp_path / "results"
    settings = results["settings"]
    assert results["machine"]["cpus"] == os.cpu_count()
    default, half = results["variants"]
    assert (default["variant"], half["variant"]) == ("default", "half_batch") and not results["failures"]
    rows = settings["prompts_per_step"] * settings["num_generations"]
    assert (default["completions"], half["completions"]) == (rows, rows // 2)
    for variant in (default, half):
        assert len(variant["warmup_s"]) == settings["warmup_steps"]
        assert len(variant["generate_steps_s"]) == settings["measured_steps"]
        assert variant["generate_s"] > 0 and variant["completion_tokens_per_s"] > 0
        assert len(variant["generate_cpu_s_steps"]) == settings["measured_steps"]
        assert all(cpu > 0 for cpu in variant["generate_cpu_s_steps"])
        # before each rollout, every CPU's speed at running Python
        assert [len(probe) for probe in variant["cpu_probe_ms_steps"]] == [
            len(os.sched_getaffinity(0))
        ] * len(variant["generate_steps_s"])
        assert (
            len(variant["generate_gc_s_steps"])
            == len(variant["generate_steal_s_steps"])
            == settings["measured_steps"]
        )
    first_rollout, first_cpu = default["generate_steps_s"][0], default["generate_cpu_s_steps"][0]
    assert f"| default | {rows} |" in stdout and f"{first_rollout:.2f} ({first_cpu:.2f})" in stdout
    assert half["profiled_wall_s"] > 0 and "profiled_wall_s" not in default
    (python,) = out.glob("gen-speed-*-smoke-half_batch-python.txt")
    assert "function calls" in python.read_text()  # cProfile's table
    (kernels,) = out.glob("gen-speed-*-smoke-half_batch-kernels.txt")
    assert "aten::" in kernels.read_text()


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_gen_speed_measures_rollouts_beside_a_training_process(tmp_path):
    """gen_speed's beside_training: the rollouts alone, then again beside a training process (train_speed's
    steps, back to back) in every MPS round, each training process started with that round's MPS settings."""
    from bench.gen_speed import MPS_ROUNDS
    from online_rl.engines.hosted.mps import TRAINER_ONLY as MPS_SETTINGS
    from online_rl.engines.hosted.mps import trainer_mps_settings

    round_settings = [trainer_mps_settings(options) for options in MPS_ROUNDS]

    fake = stand_in_mps_control(tmp_path / "bin", tmp_path / "mps-calls")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    results, stdout = smoke_variants(
        tmp_path, "gen_speed", "beside_training", "beside_training", "--mps", env=env
    )
    (variant,) = results["variants"]
    measured = results["settings"]["measured_steps"]
    assert len(variant["generate_steps_s"]) == measured
    rounds = variant["beside_training"]
    assert [each["trainer_mps_env"] for each in rounds] == round_settings
    pipe = str(tmp_path / "work" / "mps" / "pipe")
    for each, mps_env in zip(rounds, round_settings):
        # the training process saw the round's settings and the daemon's pipes, and trained meanwhile
        seen = each["trainer_process_mps_env"]
        assert seen["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        assert {key: value for key, value in seen.items() if key in MPS_SETTINGS} == mps_env
        assert len(each["generate_steps_s"]) == measured and each["generate_s"] > 0
        assert each["train_steps_s"] and all(seconds > 0 for seconds in each["train_steps_s"])
    assert "beside compiled training CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 |" in stdout


def test_train_speed_refuses_a_profile_of_a_variant_it_does_not_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_speed", "--smoke", "--variants", "eager"]
        + ["--profile", "compiled", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "--profile compiled: not one of --variants eager" in result.stderr


def test_a_second_speed_command_of_one_commit_and_day_gets_files_of_its_own(tmp_path):
    from bench.speed_variants import unused_stem

    stem = "gen-speed-2026-11-30-abc1234"
    assert unused_stem(tmp_path, stem) == stem
    (tmp_path / f"{stem}.json").write_text("{}")
    assert unused_stem(tmp_path, stem) == f"{stem}-2"
    (tmp_path / f"{stem}-2.json").write_text("{}")
    assert unused_stem(tmp_path, stem) == f"{stem}-3"


def test_peak_gpu_memory_is_the_largest_reading_of_nvidia_smi_beside_the_arm(tmp_path, monkeypatch, capsys):
    """The poller runs nvidia-smi in a process of its own (here a stand-in printing what nvidia-smi prints:
    MiB, one reading a line); with no nvidia-smi the arm still runs and its peak is unknown."""
    from bench.host import PeakDeviceMemory

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '1000\\n30541\\n2000\\n'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with PeakDeviceMemory("cuda") as memory:
        time.sleep(0.5)
    assert memory.gib == pytest.approx(30541 / 1024)

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with PeakDeviceMemory("cuda") as memory:
        pass
    assert memory.gib is None and "no peak GPU memory" in capsys.readouterr().out
    with PeakDeviceMemory("cpu") as memory:
        pass
    assert memory.gib is None


def stand_in_mps_control(directory: Path, calls: Path) -> Path:
    """An nvidia-cuda-mps-control in `directory` that writes each call to `calls`: "start <pipe directory>"
    for -d, "<command read from stdin> <pipe directory>" otherwise."""
    fake = directory / "nvidia-cuda-mps-control"
    directory.mkdir(parents=True, exist_ok=True)
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = "-d" ]; then echo "start $CUDA_MPS_PIPE_DIRECTORY" >> '
        f'{calls}; else read command; echo "$command $CUDA_MPS_PIPE_DIRECTORY" >> {calls}; fi\n'
    )
    fake.chmod(0o755)
    return fake


def test_mps_daemon_runs_for_the_arms_of_a_command_and_names_its_fix_when_missing(tmp_path, monkeypatch):
    """--set mps=true: CUDA's MPS daemon is started before the arms and told to quit after them, with its
    pipes where the arms' environment points (here a stand-in for nvidia-cuda-mps-control logs its calls)."""
    from bench.processes import MultiProcessService

    calls = tmp_path / "calls.txt"
    fake = stand_in_mps_control(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with MultiProcessService(True, tmp_path / "mps") as mps:
        assert calls.read_text() == f"start {tmp_path / 'mps' / 'pipe'}\n"
        assert mps.env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "pipe")
        assert (tmp_path / "mps" / "log").is_dir()
    assert calls.read_text().splitlines()[1] == f"quit {tmp_path / 'mps' / 'pipe'}"

    with MultiProcessService(False, tmp_path / "unused") as mps:  # the default: nothing started
        assert mps.env == {}
    assert not (tmp_path / "unused").exists()

    fake.write_text("#!/bin/sh\necho 'An instance of this daemon is already running' >&2\nexit 1\n")
    quit_command = f"echo quit | CUDA_MPS_PIPE_DIRECTORY={tmp_path / 'mps' / 'pipe'} nvidia-cuda-mps-control"
    with pytest.raises(SystemExit, match="already running") as stopped:
        MultiProcessService(True, tmp_path / "mps").__enter__()
    assert quit_command in str(stopped.value)  # the fix, with this command's pipes
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="not on this machine's PATH.*leave out mps"):
        MultiProcessService(True, tmp_path / "mps").__enter__()


def test_a_command_stopped_by_sigterm_stops_its_arm_and_the_mps_daemon(tmp_path):
    """`timeout` or a scheduler ends a command with SIGTERM: the arm running then is killed and the MPS daemon
    told to quit, where they used to outlive the command (and the next command's daemon failed to start)."""
    calls = tmp_path / "calls.txt"
    fake = stand_in_mps_control(tmp_path / "bin", calls)
    pid_file = tmp_path / "arm.pid"
    command = f"""
import subprocess, sys
from pathlib import Path
from bench.processes import MultiProcessService, sigterm_exits
with sigterm_exits(), MultiProcessService(True, Path({str(tmp_path / "mps")!r})):
    arm = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    subprocess.run([sys.executable, "-c", arm])
"""
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    stderr = tmp_path / "stderr.txt"  # (a file, not a pipe: an arm left running would hold a pipe open)
    with open(stderr, "w") as stderr_file:
        command_process = subprocess.Popen(
            [sys.executable, "-c", command], cwd=REPO, env=env, stderr=stderr_file
        )
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    arm_pid = int(pid_file.read_text())
    command_process.terminate()  # SIGTERM
    assert command_process.wait(timeout=60) != 0
    assert "stopped by signal" in stderr.read_text()
    assert calls.read_text().splitlines()[-1] == f"quit {tmp_path / 'mps' / 'pipe'}"
    with pytest.raises(ProcessLookupError):  # the arm is gone too
        for _ in range(100):
            os.kill(arm_pid, 0)
            time.sleep(0.05)


def test_trainer_mps_settings_go_to_the_off_policy_arm_alone(tmp_path):
    """--set trainer_sm_percent=N (with mps): the off-policy arm's config caps its trainer, as it trains beside
    generation; the on-policy arms' do not, even with engines in processes of their own (they would only train
    slower); without mps the command stops with the fix."""
    from bench.arms import compose_config, our_overrides
    from bench.settings import Settings, parse_settings

    settings = parse_settings(Settings(), ["mps=true", "trainer_sm_percent=60", "engine_processes=2"])
    paths = (tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path)
    off_policy = compose_config(our_overrides(settings, "ours_offpolicy", *paths))
    assert off_policy.vllm.trainer_sm_percent == 60 and off_policy.vllm.separate_process
    for arm in ("ours_full", "floor", "ours_lora"):
        on_policy = compose_config(our_overrides(settings, arm, *paths))
        assert on_policy.vllm.separate_process and on_policy.vllm.trainer_sm_percent is None
    with pytest.raises(SystemExit, match="add --set mps=true"):
        parse_settings(Settings(), ["trainer_sm_percent=60"])


def test_results_from_before_a_setting_was_removed_still_load():
    """--report FILE.json of an older command: a setting the bench no longer has is left out."""
    from dataclasses import asdict

    from bench.settings import SMOKE, settings_from_json

    fields = {**json.loads(json.dumps(asdict(SMOKE))), "trainer_below_normal_priority": False}
    assert settings_from_json(fields) == SMOKE


def test_cpu_speeds_probe_every_allowed_cpu_and_leave_the_affinity_as_it_was():
    from bench.host import cpu_speeds, speeds_summary

    allowed = os.sched_getaffinity(0)
    speeds = cpu_speeds()
    assert set(speeds) == allowed and all(seconds > 0 for seconds in speeds.values())
    assert os.sched_getaffinity(0) == allowed
    # in ms: the fastest CPU's, the median CPU's (the upper of two middle ones) and the slowest's
    assert speeds_summary({0: 0.002, 1: 0.004, 2: 0.0045, 3: 0.003}) == {
        "fastest": 2.0,
        "median": 4.0,
        "slowest": 4.5,
    }
