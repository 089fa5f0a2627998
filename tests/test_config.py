"""Every option of every config group composes; bad overrides fail at compose time and name the key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from .conftest import CONF, ROOT, compose_config


def group_options():
    """(group, option) for every YAML of the packaged configs (src/online_rl/conf/), found recursively."""
    found = []
    for folder, _, files in os.walk(CONF, followlinks=True):
        group = Path(folder).relative_to(CONF).as_posix()
        found += [
            (group, Path(name).stem) for name in sorted(files) if name.endswith(".yaml") and group != "."
        ]
    return sorted(found)


def test_every_group_of_the_design_is_there():
    groups = {group for group, _ in group_options()}
    assert {"algo", "vllm", "model", "rewards", "hardware", "data", "env", "logger", "recipe"} <= groups


@pytest.mark.parametrize("group, option", group_options())
def test_every_option_composes(group, option):
    if group == "rewards":
        override = f"rewards=[{option}]"
    elif group == "recipe":
        override = f"+recipe={option}"
    else:
        override = f"{group}={option}"
    cfg = compose_config([override])
    OmegaConf.resolve(cfg.rewards)  # interpolations such as ${sampling.max_completion_length} resolve
    if group == "rewards":
        assert list(cfg.rewards) == [option]
    for key in ("algo", "vllm", "model", "hardware", "data", "logger"):
        # typed by its schema: config.py's, or for algo= its entry's in the algorithm table
        assert OmegaConf.get_type(cfg[key]).__module__ in ("online_rl.config", "online_rl.algorithms"), key


def test_the_readme_command_parses():
    cfg = compose_config(["algo=grpo", "vllm=colocate", "model=qwen2_0.5b", "rewards=[format,math_accuracy]"])
    assert cfg.model.name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert list(cfg.rewards) == ["format", "math_accuracy"]
    assert cfg.vllm.mode == "colocate" and cfg.vllm.sleep_level == 2


def test_the_readme_own_data_command_composes():
    cfg = compose_config(
        [
            "data=jsonl",
            "data.data_files=my.jsonl",
            "data.prompt_column=question",
            "data.solution_column=answer",
        ]
    )
    assert (cfg.data.path, cfg.data.data_files, cfg.data.synthetic_rows) == ("json", "my.jsonl", None)
    assert (cfg.data.prompt_column, cfg.data.solution_column) == ("question", "answer")
    assert (cfg.eval.split, cfg.eval.holdout_size) == ("test[:64]", 64)  # no test split: 64 rows held out
    assert "data=jsonl data.data_files=my.jsonl" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.epsiloon=0.1", "Key 'epsiloon' not in 'GRPOConfig'"),
        ("algo.epsilon=abc", "Value 'abc' of type 'str' could not be converted to Float"),
        ("algo.scale_rewards=grop", "Invalid value 'grop', expected one of \\[group, batch, none\\]"),
        ("algo.loss_type=ppo", "Invalid value 'ppo'"),
        ("max_stepz=3", "Key 'max_stepz' not in 'TrainConfig'"),
        ("model.lora.r=eight", "could not be converted to Integer"),
        (
            "rewards.digits.wieght=2",
            "Key 'wieght' is not in struct.*\n.*\\+rewards.digits.wieght|Could not override",
        ),
        ("optim.lr_scheduler=exponential", "Invalid value 'exponential'"),
        ("eval.holdout_size=all", "could not be converted to Integer"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config([override])
    chain = []
    error = caught.value
    while error is not None:  # Hydra wraps OmegaConf's message; the whole chain is what the user sees
        chain.append(str(error))
        error = error.__cause__
    assert any(re.search(message, text) for text in chain), chain


def test_a_reward_added_on_the_command_line_trains_and_a_misspelt_one_is_named(make_config):
    """+rewards.<name>.fn=... adds a reward (OmegaConf cannot type an entry an override builds, so the
    entries are read over RewardConfig's defaults when the run starts); a key RewardConfig lacks, or no fn,
    is refused by check_config, before anything loads, naming the reward and the keys it takes."""
    from online_rl.checks import check_config
    from online_rl.loop import run

    added = ["+rewards.mine.fn=online_rl.rewards.digits.digit_fraction", "+rewards.mine.weight=0.5"]
    history = run(make_config("max_steps=1", "data.synthetic_rows=64", "prompts_per_step=4", *added)).history
    assert history[0]["reward/mine_mean"] == history[0]["reward/digits_mean"]  # the same function, scored
    for override, message in [
        (
            "+rewards.mine.wieght=0.5",
            r"rewards.mine: Key 'wieght' not in 'RewardConfig'; a reward takes fn, weight",
        ),
        ("+rewards.mine.weight=0.5", r"rewards.mine: Missing mandatory value: fn"),
        (
            "rewards.digits.weight=heavy",
            r"rewards.digits: Value 'heavy' of type 'str' could not be converted",
        ),
    ]:
        cfg = make_config(*(added[:1] if "wieght" in override else []), override)
        with pytest.raises(ValueError, match=message):
            check_config(cfg)


def test_unknown_option_lists_the_available_ones():
    with pytest.raises(MissingConfigException, match="Could not find 'algo/grpoo'"):
        compose_config(["algo=grpoo"])


def test_command_line_error_is_readable():
    result = subprocess.run(
        [sys.executable, "train.py", "algo.epsilon=abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "full_key: algo.epsilon" in result.stderr


@pytest.mark.slow  # 35 s on 2 cores: two jobs, each a process of its own
def test_multirun_sweep_runs_every_job(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "algo.loss_type=grpo,dr_grpo",
            "max_steps=1",
            "logger=none",
            "data.synthetic_rows=64",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "step_000001" / "model.safetensors").exists()
    assert OmegaConf.load(tmp_path / "1" / "config_resolved.yaml").algo.loss_type == "dr_grpo"


def test_the_readme_multi_gpu_commands_compose():
    """Every `accelerate launch` line of the README launches plain processes (the trainer reads no accelerate
    config) as many as its hardware= option expects, with overrides that compose."""
    lines = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if "accelerate launch --" in line
    ]
    assert len(lines) >= 3
    for line in lines:
        words = line.split("#")[0].split()
        assert "--multi_gpu" in words and "--config_file" not in words, line
        overrides = [w.strip("'") for w in words[words.index("train.py") + 1 :] if "=" in w]
        cfg = compose_config(overrides)
        assert cfg.hardware.num_processes == int(words[words.index("--num_processes") + 1]), line


def test_hardware_auto_is_the_default_and_picks_the_gpu_when_torch_sees_one(monkeypatch):
    import torch

    cfg = compose_config()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (cfg.hardware.device, cfg.hardware.autocast_dtype) == ("cpu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (cfg.hardware.device, cfg.hardware.autocast_dtype) == ("cuda", "bfloat16")
    assert OmegaConf.to_container(cfg.hardware, resolve=True)["device"] == "cuda"  # what a run saves
    assert compose_config(["hardware=cpu"]).hardware.device == "cpu"  # an explicit choice stays


@pytest.mark.parametrize("gpus", [0, 1, 3])
def test_hardware_auto_says_what_it_picked_and_how_to_use_several_gpus(monkeypatch, gpus):
    import torch

    from online_rl.config import hardware_auto_reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    reason = hardware_auto_reason()
    if gpus == 0:
        assert reason.startswith("hardware=auto: torch sees no CUDA GPU, so this run trains on the CPU")
    else:
        assert reason.startswith(
            "hardware=auto: NVIDIA H100 80GB HBM3, float32 weights with bfloat16 autocast"
        )
    assert ("--num_processes 3 train.py hardware=2gpu_ddp" in reason) == (gpus == 3)


def test_evaluations_fall_between_rollouts():
    from online_rl.checks import check_config

    cfg = compose_config(["algo.num_iterations=2", "eval_every=3"])
    with pytest.raises(
        ValueError, match=r"eval_every=3 is not a multiple of algo.num_iterations=2.*eval_every=6"
    ):
        check_config(cfg)
