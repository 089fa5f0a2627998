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


# issue 27: TRL at its best, our default command, and the shapes beyond the 0.5B anchor


def test_shape_fields_are_the_sums_of_hand_numbers():
    from bench.shapes import median, mfu, peak_bf16_flops, ratio, share, vllm_awake_gib

    assert median([3.0, 9.0, 4.0]) == 4.0 and median([2.0, 4.0]) == 3.0 and median([]) is None
    # nvidia-smi's names, as machine() records them ("name, driver, max SM clock")
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3, 570.133.20, 1980 MHz") == 989e12
    assert peak_bf16_flops("NVIDIA H200, 570.133.20, 1980 MHz") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe, 550.54, 1755 MHz") == 756e12
    assert peak_bf16_flops("Tesla T4, 535.0, 1590 MHz") is None and peak_bf16_flops(None) is None
    # 6 N x tokens: a 1.5e9-parameter model over 163,840 tokens in 4 s on an H100
    assert mfu(6 * 1.5e9 * 163_840, 4.0, 989e12) == pytest.approx(0.3727, abs=1e-4)
    assert mfu(1e15, 4.0, None) is None and mfu(1e15, 0.0, 989e12) is None
    assert share(0.09, 4.5) == pytest.approx(0.02) and share(None, 4.5) is None
    assert ratio(6.08, 4.38) == pytest.approx(1.388, abs=1e-3)  # issue 27's command: TRL 64 x 2 over ours
    assert ratio(None, 4.38) is None and ratio(6.08, None) is None
    assert vllm_awake_gib(55.6, 41.2) == pytest.approx(14.4) and vllm_awake_gib(None, 41.2) is None


def test_trl_phases_split_its_steps_into_generation_sync_and_training():
    from bench.shapes import trl_phases

    record = {"step_s": [10.0, 12.0, 11.0], "generate_s": [6.0, 7.0, 6.5], "sync_s": [0.5, 0.5, 0.4]}
    fields = trl_phases(record, train_flops=2e15, peak_flops=1e15)
    assert fields["median_step_s"] == 11.0 and fields["generate_s"] == 6.5 and fields["sync_s"] == 0.5
    assert fields["train_s"] == pytest.approx(4.1)  # median of 3.5, 4.5, 4.1
    assert fields["sync_sleep_share"] == pytest.approx(0.5 / 11.0)
    assert fields["train_mfu"] == pytest.approx(2 / 4.1)
    assert trl_phases(record, 2e15, None)["train_mfu"] is None  # a GPU without a known peak (or a CPU)


def bench_row(arm: str, seconds: float, command: int, **fields) -> dict:
    return {
        "arm": arm,
        "s_per_step_median": seconds,
        "command": command,
        "arm_command": f"run {arm}",
        **fields,
    }


def test_shape_entries_compare_our_arms_with_trl_of_their_own_command():
    """Ratios are TRL's median over ours, each with TRL of the same command; TRL's anchor comes from trl_tuned's
    sweep where no trl_full ran with it; one object per arm (ours_default's command first)."""
    from bench.shapes import shape_entries

    sweep = [
        {"name": "8:gc", "anchor": True, "median_step_s": 9.0, "step_s": [9.0], "arm_command": "anchor"},
        {"name": "32", "anchor": False, "median_step_s": 6.0, "step_s": [6.0]},
        {"name": "64", "anchor": False, "error": "OutOfMemoryError: ..."},
    ]
    rows = [
        bench_row(
            "ours_default", 4.0, 1, phases_s={"generate": 2.5, "train": 1.3, "sync": 0.05, "sleep_wake": 0.1}
        ),
        bench_row("trl_tuned", 6.0, 1, sweep=sweep, tuned="32", peak_gpu_gib=40.0),
        bench_row("ours_offpolicy", 3.0, 2),
        bench_row("trl_full", 8.0, 2),
        bench_row("floor", 3.5, 1),
    ]
    entries = shape_entries(rows, "1.5b", {"commit": "abc1234"})
    by_arm = {e["arm"]: e for e in entries}
    assert [e["arm"] for e in entries] == ["ours_default", "ours_off_policy", "trl_anchor", "trl_tuned"]
    assert all(e["shape"] == "1.5b" and e["commit"] == "abc1234" for e in entries)
    ours = by_arm["ours_default"]
    assert ours["ratio_vs_trl_tuned"] == 1.5 and ours["ratio_vs_trl_anchor"] == 2.25  # 6 / 4, 9 / 4
    assert ours["command"] == "run ours_default" and ours["generate_s"] == 2.5 and ours["sleep_wake_s"] == 0.1
    assert ours["ratio_same_command"] == {"trl_tuned": True, "trl_anchor": True}
    # the off-policy arm ran beside trl_full (8 s), not beside trl_tuned: that ratio is across commands
    off_policy = by_arm["ours_off_policy"]
    assert off_policy["ratio_vs_trl_tuned"] == 2.0 and off_policy["ratio_vs_trl_anchor"] == pytest.approx(
        8.0 / 3.0
    )
    assert off_policy["ratio_same_command"] == {"trl_tuned": False, "trl_anchor": True}
    (alone,) = shape_entries([bench_row("ours_default", 4.0, 1)], "1.5b", {})
    assert alone["ratio_vs_trl_tuned"] is None and alone["ratio_same_command"]["trl_tuned"] is None
    # the anchor kept is the sweep's, measured with ours_default; trl_full's (command 2) gave only its ratio
    anchor = by_arm["trl_anchor"]
    assert (anchor["from_sweep"], anchor["median_step_s"], anchor["measured_in_command"]) == ("8:gc", 9.0, 1)
    tuned = by_arm["trl_tuned"]
    assert tuned["tuned"] == "32" and [r["name"] for r in tuned["sweep"]] == ["8:gc", "32", "64"]
    assert tuned["sweep"][2]["error"].startswith("OutOfMemoryError") and tuned["peak_mem_gib"] == 40.0


def test_the_shapes_file_keeps_other_shapes_and_replaces_its_own(tmp_path):
    from bench.shapes import write_shapes

    path = tmp_path / "2026-12-08-shapes.json"
    write_shapes(path, "1.5b", [{"shape": "1.5b", "arm": "ours_default", "median_step_s": 9.0}])
    write_shapes(path, "7b_lora", [{"shape": "7b_lora", "arm": "ours_default", "median_step_s": 30.0}])
    write_shapes(path, "1.5b", [{"shape": "1.5b", "arm": "ours_default", "median_step_s": 8.0}])
    assert [(e["shape"], e["median_step_s"]) for e in json.loads(path.read_text())] == [
        ("7b_lora", 30.0),
        ("1.5b", 8.0),
    ]


def test_trl_candidates_keep_the_step_and_name_their_settings(tmp_path):
    """Each candidate trains the step's completions per optimizer step (batch x accumulation); `best` takes the
    fastest so far with the spec's flags; a batch that does not divide the step, or an unknown flag, is refused."""
    from bench.settings import SHAPES, Settings, shape_settings
    from bench.trl_sweep import Candidate, grpo_arguments, parse_candidate

    settings = Settings()
    candidate = parse_candidate("32:gc:compile", [])
    assert (
        candidate == Candidate(32, gradient_checkpointing=True, compile=True)
        and candidate.name == "32:gc:compile"
    )
    arguments = grpo_arguments(settings, candidate, 4, tmp_path)
    assert (arguments["per_device_train_batch_size"], arguments["gradient_accumulation_steps"]) == (32, 4)
    assert arguments["gradient_checkpointing"] and arguments["torch_compile"] and arguments["max_steps"] == 4
    assert "model_init_kwargs" not in arguments
    assert grpo_arguments(settings, parse_candidate("16:bf16base", []), 4, tmp_path)["model_init_kwargs"] == {
        "dtype": "bfloat16"
    }
    measured = [
        {"candidate": Candidate(8, True), "median_step_s": 9.0},
        {"candidate": Candidate(64, True), "median_step_s": 5.5},
        {"candidate": Candidate(32, False), "error": "OutOfMemoryError"},
    ]
    assert parse_candidate("best:compile", measured) == Candidate(64, True, compile=True)
    with pytest.raises(ValueError, match="unknown flags"):
        parse_candidate("32:fast", [])
    with pytest.raises(ValueError, match="does not divide the step's 128 completions"):
        grpo_arguments(settings, parse_candidate("48", []), 4, tmp_path)
    for name in SHAPES:  # every shape's candidates keep 128 completions a step
        shaped = shape_settings(settings, name)
        for spec in shaped.trl_sweep:
            if not spec.startswith("best"):
                arguments = grpo_arguments(shaped, parse_candidate(spec, []), 4, tmp_path)
                batch, steps = (
                    arguments["per_device_train_batch_size"],
                    arguments["gradient_accumulation_steps"],
                )
                assert batch * steps == 128, (name, spec)


def test_a_sweep_stopped_midway_keeps_the_fastest_it_measured():
    """The records as the sweep writes them after each candidate (<arm>.sweep.json): what a stopped trl_tuned
    arm reports."""
    from bench.trl_sweep import tuned_result

    records = [
        {"name": "8:gc", "anchor": True, "median_step_s": 9.0, "step_s": [9.1, 8.9]},
        {"name": "32", "anchor": False, "error": "OutOfMemoryError: ..."},
        {"name": "32:gc", "anchor": False, "median_step_s": 6.0, "step_s": [6.0, 6.0]},
    ]
    tuned = tuned_result(records)
    assert (tuned["tuned"], tuned["step_s"], tuned["sweep"]) == ("32:gc", [6.0, 6.0], records)
    assert tuned_result(records[1:2]) is None


def test_ours_default_is_the_command_a_user_types_and_the_shapes_their_models(tmp_path):
    """ours_default names only the run (model, LoRA, data, lengths): hardware, the engine's memory, compile and
    the micro-batch are our defaults; the other arms keep the bench's speed settings. The 7B shape's LoRA is
    r 16 on every linear layer, its model config the real one's (gradient checkpointing on)."""
    from bench.arms import compose_config, our_overrides
    from bench.settings import ALL_LINEAR, SMOKE, Settings, shape_settings

    paths = (tmp_path / "model", tmp_path / "prompts.jsonl", tmp_path)
    defaults = compose_config(["algo=grpo", "vllm=colocate"])
    seven = shape_settings(Settings(), "7b_lora")
    overrides = our_overrides(seven, "ours_default_lora", *paths)
    assert not [o for o in overrides if o.split("=")[0] in ("hardware", "micro_batch_size", "model.compile")]
    assert not [o for o in overrides if o.startswith(("vllm.", "off_policy_steps"))]
    cfg = compose_config(overrides)
    assert cfg.model.gradient_checkpointing and cfg.model.lora.enabled and cfg.model.lora.r == 16
    assert tuple(cfg.model.lora.target_modules) == ALL_LINEAR
    assert cfg.sampling.max_completion_length == 1024 and cfg.data.max_prompt_length == 256
    assert cfg.micro_batch_size == defaults.micro_batch_size and cfg.model.compile == defaults.model.compile
    assert cfg.vllm == defaults.vllm and cfg.hardware == defaults.hardware
    # --smoke --shape: the tiny step on the CPU, in the shape's rows
    smoke = shape_settings(SMOKE, "7b_lora", resize=False)
    assert (smoke.model, smoke.trl_sweep, smoke.lora_r, smoke.shape) == (
        "tiny",
        SMOKE.trl_sweep,
        SMOKE.lora_r,
        "7b_lora",
    )
    tuned = compose_config(our_overrides(shape_settings(Settings(), "1.5b"), "ours_full", *paths))
    assert tuned.model.compile and tuned.vllm.kv_cache_memory_gib == 4.0 and tuned.micro_batch_size == 16
    assert tuned.sampling.max_completion_length == 1024 and not tuned.model.lora.enabled


@pytest.mark.parametrize(
    ("model", "parameters", "multiplying"),
    [
        # Qwen2.5-1.5B: tied embeddings, 1.54B parameters; Qwen2.5-7B: untied, 7.62B, of them the input
        # embedding (152064 x 3584) a lookup, not a matrix product
        ("qwen2.5_1.5b_random", 1_543_714_304, 1_543_714_304),
        ("qwen2.5_7b_random", 7_615_616_512, 7_615_616_512 - 152064 * 3584),
    ],
)
def test_the_random_shapes_have_the_real_models_sizes(model, parameters, multiplying):
    """The configs compose and build (on the meta device, nothing allocated) to the real models' sizes."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.arms import compose_config
    from bench.summary import multiplying_parameters
    from online_rl.models import random_model_config, train_byte_level_tokenizer

    spec = compose_config([f"model={model}"]).model.random_init
    tokenizer = train_byte_level_tokenizer([f"{i} plus {i} is" for i in range(50)], 300)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(random_model_config(spec, tokenizer))
    assert sum(p.numel() for p in built.parameters()) == parameters
    assert multiplying_parameters(built) == multiplying


def test_a_shape_runs_only_arms_of_its_kind(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--shape",
            "7b_lora",
            "--arms",
            "ours_default",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--shape 7b_lora trains LoRA; ['ours_default'] do not" in result.stderr


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_a_shape_command_measures_our_default_against_trl_tuned(tmp_path):
    """--shape: ours_default (train.py as typed) and trl_tuned (TRL's anchor, then its candidates, in one
    process) in one command; the shapes file holds their objects with the ratios of that command; an --append
    of trl_full keeps one object per arm."""
    out, work = tmp_path / "results", tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--shape",
        "0.5b",
        "--arms",
        "ours_default,trl_tuned",
    ]
    command += ["--workdir", str(work), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (results_file,) = out.glob("*-smoke-0.5b.json")
    settings = json.loads(results_file.read_text())["settings"]
    (shapes_file,) = out.glob("????-??-??-shapes.json")
    assert shapes_file.name[:10] == results_file.name[:10]
    entries = {e["arm"]: e for e in json.loads(shapes_file.read_text())}
    assert set(entries) == {"ours_default", "trl_anchor", "trl_tuned"}
    for e in entries.values():
        assert e["shape"] == "0.5b" and e["measured_in_command"] == 1 and e["median_step_s"] > 0
        for key in ("command", "peak_mem_gib", "train_mfu", "sync_sleep_share", "generate_s", "train_s"):
            assert key in e
        assert 0 < e["generate_s"] < e["median_step_s"] and 0 <= e["sync_sleep_share"] < 1
    ours, anchor, tuned = entries["ours_default"], entries["trl_anchor"], entries["trl_tuned"]
    assert ours["command"].startswith(
        "python train.py algo=grpo vllm=off model=qwen2_0.5b model.name_or_path="
    )
    assert "hardware=" not in ours["command"] and "model.compile" not in ours["command"]
    assert ours["ratio_vs_trl_tuned"] == pytest.approx(tuned["median_step_s"] / ours["median_step_s"])
    assert ours["ratio_vs_trl_anchor"] == pytest.approx(anchor["median_step_s"] / ours["median_step_s"])

    # the sweep: TRL's anchor (batch 2 with its default gradient checkpointing) over the bench's measured
    # steps, then each candidate over the sweep's; the tuned row is the fastest of them
    sweep = tuned["sweep"]
    assert (sweep[0]["name"], sweep[0]["anchor"], anchor["from_sweep"]) == ("2:gc", True, "2:gc")
    assert len(sweep[0]["step_s"]) == settings["measured_steps"] == len(anchor["steps_s"])
    assert sweep[1]["name"] == "1" and len(sweep[1]["step_s"]) == settings["sweep_measured_steps"]
    assert len(sweep[1]["warmup_s"]) == settings["sweep_warmup_steps"]
    fastest = min(sweep, key=lambda record: record["median_step_s"])
    assert (tuned["tuned"], tuned["median_step_s"]) == (fastest["name"], fastest["median_step_s"])
    # `best:gc`: the fastest of the two with gradient checkpointing (already measured, if that was the anchor)
    assert [r["name"] for r in sweep[2:]] == ([] if fastest["name"] == "2:gc" else ["1:gc"])
    batch = int(tuned["tuned"].split(":")[0])
    assert (
        f'"per_device_train_batch_size": {batch}, "gradient_accumulation_steps": {4 // batch}'
        in tuned["command"]
    )
    assert "| trl_tuned | 2:gc" in results_file.with_suffix(".md").read_text()

    # TRL's anchor in a process of its own, appended: the file keeps one anchor, the one beside ours_default
    appended = subprocess.run(
        [*command[:7], "trl_full", *command[8:], "--append"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert appended.returncode == 0, (appended.stdout + appended.stderr)[-3000:]
    entries = json.loads(shapes_file.read_text())
    assert sorted(e["arm"] for e in entries) == ["ours_default", "trl_anchor", "trl_tuned"]
    assert next(e for e in entries if e["arm"] == "trl_anchor")["measured_in_command"] == 1
    assert "the model and prompts of an earlier command" in appended.stdout


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_trl_candidates_share_one_vllm_engine_and_train_on_one_rank(tmp_path, monkeypatch):
    """The sweep on vLLM's CPU build: TRL's anchor and a candidate, two GRPOTrainers in one process, with one
    vLLM engine between them; the rank variables TRL's engine sets are gone before the next trainer (with
    them, its arguments turned on DistributedDataParallel); a candidate that fails is recorded, not fatal."""
    from dataclasses import replace

    import trl.generation.vllm_generation as generation

    from bench.arms import prepare
    from bench.settings import SMOKE
    from bench.trl_sweep import sweep

    monkeypatch.setenv(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # (vLLM's engine in this process, as TRL's on GPUs)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    built = []
    real_llm = generation.LLM

    def counted(**kwargs):
        built.append(kwargs)
        return real_llm(**kwargs)

    monkeypatch.setattr(generation, "LLM", counted)
    # a batch of 3 does not divide the step's 4 completions: that candidate fails alone, the sweep goes on
    settings = replace(SMOKE, use_vllm=True, trl_sweep=("3", "1"), warmup_steps=1, measured_steps=1)
    model_dir, prompts = prepare(settings, tmp_path / "work")
    records = sweep(settings, False, (model_dir, prompts, tmp_path / "trl"), tmp_path / "sweep.json")
    assert [r["name"] for r in records] == ["2:gc", "3", "1"]
    assert records[1]["error"].startswith("ValueError: a per-device batch of 3 does not divide")
    records = [records[0], records[2]]
    assert [len(r["step_s"]) for r in records] == [1, 1]
    assert all(r["sync_s"][0] > 0 and r["generate_s"][0] > 0 for r in records)  # weights pushed to vLLM
    assert len(built) == 1 and built[0]["max_num_seqs"] == 4  # (batch x accumulation: the step's completions)
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)
    assert [r["name"] for r in json.loads((tmp_path / "sweep.json").read_text())] == ["2:gc", "3", "1"]
