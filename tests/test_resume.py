"""Exact resume: a run stopped after k steps and resumed to N ends with the very weights of a run of N steps
straight (torch.equal on CPU), whether it stopped at a checkpoint or by a SIGTERM to `python train.py`."""

import hashlib
import json
import logging
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from online_rl.checkpoint import save_checkpoint
from online_rl.loop import run
from online_rl.resume import find_checkpoint, load_weights

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
    overrides = ["max_steps=5", "logger.log_every=1", *EXACT]  # a console line per step: SIGTERM after step 2
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
        command.startswith("python train.py max_steps=5 logger.log_every=1 logger=none")
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


@pytest.fixture
def two_checkpoints(tiny_model_dir, tmp_path):
    """A run directory with real checkpoints at steps 1 and 2 of the tiny model; (run dir, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoints", step, model, tokenizer, {"note": step})
    return tmp_path, model


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_lists_each_file_with_its_size_and_sha256(two_checkpoints):
    run_dir, _ = two_checkpoints
    checkpoint = run_dir / "checkpoints" / "step_000002"
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.name != "manifest.json"}
    assert set(files) == on_disk and {"model.safetensors", "trainer_state.pt"} <= on_disk
    for name, entry in files.items():  # what `sha256sum` prints, so a user can check one by hand
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    "damage, file, problem",
    [
        (truncate, "model.safetensors", r"model.safetensors has \d+ bytes, the manifest says \d+"),
        (flip_a_byte, "model.safetensors", "model.safetensors has the right size but other bytes"),
        (lambda path: path.unlink(), "model.safetensors", "model.safetensors is missing"),
        (lambda path: path.unlink(), "trainer_state.pt", "trainer_state.pt is missing"),
        (lambda path: path.unlink(), "tokenizer.json", "tokenizer.json is missing"),
        (lambda path: path.write_text("{not json"), "manifest.json", "manifest.json cannot be read"),
    ],
    ids=[
        "truncated",
        "same-size-corrupt",
        "weights-deleted",
        "state-deleted",
        "tokenizer-deleted",
        "bad-manifest",
    ],
)
def test_a_broken_newest_checkpoint_is_skipped_by_auto_and_refused_by_name(
    two_checkpoints, caplog, damage, file, problem
):
    run_dir, _ = two_checkpoints
    older, newest = run_dir / "checkpoints" / "step_000001", run_dir / "checkpoints" / "step_000002"
    damage(newest / file)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint("auto", run_dir) == older
        assert find_checkpoint(str(run_dir), run_dir / "elsewhere") == older  # a run directory: the same walk
    assert re.search(
        f"skipping the broken checkpoint {re.escape(str(newest))} \\({problem}.*\\); trying the one before it",
        caplog.text,
    )
    with pytest.raises(
        ValueError,
        match=f"resume={re.escape(str(newest))}: this checkpoint is broken \\({problem}.*older step_NNNNNN",
    ):
        find_checkpoint(str(newest), run_dir)


def test_resume_auto_with_every_checkpoint_broken_says_so_instead_of_starting_over(two_checkpoints):
    run_dir, _ = two_checkpoints
    for step in (1, 2):
        truncate(run_dir / "checkpoints" / f"step_00000{step}" / "trainer_state.pt")
    with pytest.raises(
        ValueError,
        match=r"every checkpoint under .* is broken \(step_000002: trainer_state.pt has .* \| step_000001: .*Restore the files named from a copy, or start afresh in a new run directory",
    ):
        find_checkpoint("auto", run_dir)


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning_and_names_a_damaged_file(
    two_checkpoints, caplog
):
    run_dir, model = two_checkpoints
    newest = run_dir / "checkpoints" / "step_000002"
    (newest / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint("auto", run_dir) == newest
    assert (
        f"{newest} has no manifest.json (it was written before checkpoints carried one): its files cannot be verified"
        in caplog.text
    )
    truncate(newest / "model.safetensors")  # nothing to tell before it loads: the load names the file
    with pytest.raises(
        ValueError,
        match=r"model.safetensors cannot be read \(.*\): the checkpoint is damaged. Resume from an older",
    ):
        load_weights(model, newest)


def test_a_run_resumes_from_the_newest_intact_checkpoint_after_the_last_was_truncated(tmp_path, caplog):
    """The issue's case end to end: the newest checkpoint's weights cut short, then resume=auto."""
    cfg = [f"output_dir={tmp_path}", "checkpoint_every=1", "eval_every=0", *SMALL]
    run(compose_config([*cfg, "max_steps=2"]))
    broken = tmp_path / "checkpoints" / "step_000002"
    truncate(broken / "model.safetensors")
    with pytest.raises(ValueError, match=f"resume={re.escape(str(broken))}: this checkpoint is broken"):
        run(compose_config([*cfg, "max_steps=3", f"resume={broken}"]))
    with caplog.at_level(logging.WARNING):
        resumed = run(compose_config([*cfg, "max_steps=3", "resume=auto"]))
    assert f"skipping the broken checkpoint {broken} (model.safetensors has" in caplog.text
    assert len(resumed.history) == 2  # from step 1: step 2 redone, then step 3
