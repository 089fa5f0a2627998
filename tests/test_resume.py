"""Exact resume: a run stopped after k steps and resumed to N ends with the very weights of a run of N steps
straight (torch.equal on CPU), whether it stopped at a checkpoint or by a SIGTERM to `python train.py`."""

import json
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from online_rl.loop import run
from online_rl.resume import find_checkpoint

from .conftest import ROOT, compose_config

SMALL = [
    "logger=none",
    "data.synthetic_rows=64",
    "prompts_per_step=4",
    "algo.num_generations=4",
    "micro_batch_size=8",
]
# A warmup + linear decay, Adam and sampling: a resume that missed the scheduler, the optimizer's moments,
# the data position or an RNG state would end elsewhere.
EXACT = [*SMALL, "optim.lr=1e-2", "optim.lr_scheduler=linear", "optim.warmup_steps=2"]
LORA = ["model.lora.enabled=true", "model.lora.target_modules=[q_proj,v_proj]", "algo.beta=0.1"]
# Nash-MD samples the pair's second completion from torch's RNG, against a frozen reference model.
NASH_MD = ["algo=nash_md"]


def saved_weights(checkpoint):
    name = (
        "adapter_model.safetensors"
        if (checkpoint / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(checkpoint / name)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("extra", [[], LORA, NASH_MD], ids=["full", "lora", "nash_md"])
def test_resume_from_a_mid_run_checkpoint_ends_with_identical_weights(tmp_path, extra):
    """Run 4 steps straight (a checkpoint at step 2 on the way); a second run starts from that checkpoint
    in its own directory, never seeing steps 3-4 of the first, and must end bit for bit where it did."""
    # the preference algorithms sample a pair per prompt: no num_generations
    exact = [o for o in EXACT if not (extra == NASH_MD and o.startswith("algo.num_generations"))]
    straight = run(
        compose_config([f"output_dir={tmp_path / 'a'}", "max_steps=4", "checkpoint_every=2", *exact, *extra])
    )
    middle = tmp_path / "a" / "checkpoints" / "step_000002"
    resumed = run(
        compose_config([f"output_dir={tmp_path / 'b'}", "max_steps=4", f"resume={middle}", *exact, *extra])
    )
    assert [m["train/loss"] for m in resumed.history] == [m["train/loss"] for m in straight.history[2:]]
    assert_same_weights(saved_weights(straight.final_checkpoint), saved_weights(resumed.final_checkpoint))
    if (
        extra == LORA
    ):  # the reference of the KL term is the initial model, not the checkpoint: same KL as straight
        assert [m["train/kl"] for m in resumed.history] == [m["train/kl"] for m in straight.history[2:]]


def read_until(process, text, timeout_lines=10_000):
    seen = []
    for _ in range(timeout_lines):
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"never printed {text!r}:\n" + "".join(seen)[-3000:])


def test_sigterm_checkpoints_and_prints_the_command_that_resumes_exactly(tmp_path):
    """A real `python train.py` gets SIGTERM after step 2: it finishes its step, writes a checkpoint, exits 143
    and prints the resume command; that command (run as printed) continues to step 5 in the same directory,
    one metrics.jsonl, and ends with the weights of an uninterrupted run."""
    overrides = ["max_steps=5", *EXACT]
    run_dir = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = read_until(process, "step 2/5 |")
        process.send_signal(signal.SIGTERM)
        output += process.communicate(timeout=300)[0]
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM: finishing this step" in output
    command = output.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    stopped_at = find_checkpoint("auto", run_dir)
    assert stopped_at is not None and command.endswith(f"resume={stopped_at}")
    assert (
        command.startswith("python train.py max_steps=5 logger=none")
        and f"hydra.run.dir={run_dir}" in command
    )
    assert 2 <= int(stopped_at.name.removeprefix("step_")) < 5

    words = shlex.split(command)
    result = subprocess.run(
        [sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    straight = run(compose_config([f"output_dir={tmp_path / 'straight'}", *overrides]))
    assert_same_weights(
        saved_weights(straight.final_checkpoint), saved_weights(run_dir / "checkpoints" / "step_000005")
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "train/loss" in m]  # the training steps (the final eval has its own line)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]  # each step once, across the stop
    assert [m["train/loss"] for m in logged] == [m["train/loss"] for m in straight.history]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["resume=/nonexistent/run"], "there is no checkpoint there"),
        (["checkpoint_every=3", "algo.num_iterations=2"], "not a multiple of algo.num_iterations=2"),
    ],
)
def test_bad_resume_settings_name_the_fix(tmp_path, overrides, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        run(compose_config([f"output_dir={tmp_path}", "max_steps=1", *SMALL, *overrides]))


def test_resume_auto_starts_fresh_then_refuses_a_finished_run(tmp_path):
    cfg = [f"output_dir={tmp_path}", "max_steps=1", "resume=auto", *SMALL]
    assert len(run(compose_config(cfg)).history) == 1  # no checkpoint yet: from step 0
    with pytest.raises(ValueError, match="is at step 1, and max_steps=1: the run is done. Raise max_steps"):
        run(compose_config(cfg))
    with pytest.raises(ValueError, match="holds full model weights, not a LoRA adapter"):
        run(compose_config([*cfg, "max_steps=2", *LORA]))


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [
        ("step_000002", True),
        ("step_000010", True),
        ("step_000011", False),
        (".tmp-step_000012", True),
    ]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.pt").write_bytes(b"")
    assert (
        find_checkpoint("auto", tmp_path) == root / "step_000010"
    )  # numeric order; partial and staging skipped
    assert find_checkpoint(str(tmp_path), tmp_path / "elsewhere") == root / "step_000010"  # a run directory
    assert find_checkpoint(None, tmp_path) is None
