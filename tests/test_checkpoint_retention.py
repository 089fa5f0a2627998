"""checkpoint.keep_last: old checkpoints go once a new one is written, but never the one the run resumed from,
nor the newest intact one (what resume=auto would go back to)."""

import pytest

from online_rl.checkpoint import prune_checkpoints, save_checkpoint, step_directories
from online_rl.loop import run
from online_rl.resume import find_checkpoint

from .conftest import compose_config

SMALL = ["logger=none", "eval_every=0", "data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4",
         "micro_batch_size=8", "sampling.max_completion_length=16"]  # fmt: skip


@pytest.fixture
def write_checkpoints(tiny_model_dir, tmp_path):
    """write(*steps): real checkpoints of the tiny model under tmp_path/checkpoints; returns their root."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path / "checkpoints"

    def write(*steps: int):
        for step in steps:
            save_checkpoint(root, step, model, tokenizer, {})
        return root

    return write


def names(root):
    return [path.name for path in step_directories(root)]


def test_keep_last_keeps_the_newest_and_deletes_the_rest(write_checkpoints):
    root = write_checkpoints(1, 2, 3, 4, 5)
    deleted = prune_checkpoints(root, 2, root / "step_000005", resumed_from=None)
    assert names(root) == ["step_000005", "step_000004"]
    assert [path.name for path in deleted] == ["step_000003", "step_000002", "step_000001"]
    assert prune_checkpoints(root, None, root / "step_000005", None) == []  # null: keep every one


def test_the_checkpoint_a_run_resumed_from_is_never_deleted(write_checkpoints):
    root = write_checkpoints(1, 2, 3, 4)
    prune_checkpoints(root, 1, root / "step_000004", resumed_from=root / "step_000002")
    assert names(root) == ["step_000004", "step_000002"]


def test_a_newer_intact_checkpoint_is_kept_when_the_newest_is_broken(write_checkpoints):
    """A run resumed from step 1 while steps 3 and 4 of an earlier attempt remain, step 4 damaged: with
    keep_last=1 the newest by number (4) stays, and so does 3, the newest whose manifest verifies, which
    resume=auto would take."""
    root = write_checkpoints(1, 2, 3, 4)
    shard = root / "step_000004" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    prune_checkpoints(root, 1, root / "step_000002", resumed_from=None)
    assert names(root) == ["step_000004", "step_000003", "step_000002"]
    assert find_checkpoint("auto", root.parent) == root / "step_000003"


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_a_run_keeps_its_last_checkpoints_and_the_one_it_resumed_from(tmp_path):
    """checkpoint_every=1 with keep_last=1: one checkpoint at a time; resumed from step 2 in the same
    directory, the run keeps step 2 beside its newest, and no staging directory is left behind."""
    cfg = [f"output_dir={tmp_path}", "checkpoint_every=1", "checkpoint.keep_last=1", *SMALL]
    run(compose_config([*cfg, "max_steps=2"]))
    root = tmp_path / "checkpoints"
    assert names(root) == ["step_000002"]
    run(compose_config([*cfg, "max_steps=4", f"resume={root / 'step_000002'}"]))
    assert names(root) == ["step_000004", "step_000002"]
    assert not list(root.glob(".tmp-*"))


def test_keep_last_below_one_names_a_value_that_works(tmp_path):
    with pytest.raises(
        ValueError, match=r"checkpoint.keep_last=0 would keep no checkpoint: use checkpoint.keep_last=3"
    ):
        run(compose_config([f"output_dir={tmp_path}", "checkpoint.keep_last=0", *SMALL]))
