"""No remote code unless asked; no secrets in saved configs, logs, trackio data or the printed resume command."""

import subprocess
import sys

import pytest

from online_rl.config import ModelConfig
from online_rl.redaction import REDACTED, redact, redact_override

from .conftest import ROOT, compose_config
from .test_config import group_options


@pytest.mark.parametrize("option", [option for group, option in group_options() if group == "model"])
def test_trust_remote_code_is_off_in_every_model(option):
    assert ModelConfig.trust_remote_code is False
    assert compose_config([f"model={option}"]).model.trust_remote_code is False


@pytest.mark.parametrize(
    "text, expected",
    [
        ("+rewards.judge.kwargs.api_key=abc123", f"+rewards.judge.kwargs.api_key={REDACTED}"),
        ("hf_token=xyz,max_steps=3", f"hf_token={REDACTED},max_steps=3"),  # Hydra's override_dirname
        ("vllm.max_num_batched_tokens=8192", "vllm.max_num_batched_tokens=8192"),  # not a secret
        ("model.random_init.tokenizer_vocab_size=512", "model.random_init.tokenizer_vocab_size=512"),
        ("data.path=https://user:hunter2@example.com/x", f"data.path=https://{REDACTED}@example.com/x"),
        ("note=hf_" + "a" * 34, f"note={REDACTED}"),  # a Hugging Face token under any key
    ],
)
def test_redact_override(text, expected):
    assert redact_override(text) == expected


def test_redact_config_by_key_name():
    config = {"kwargs": {"api_key": "k", "password": "p", "timeout_s": 5}, "secret": None, "tokens": 3}
    assert redact(config) == {
        "kwargs": {"api_key": REDACTED, "password": REDACTED, "timeout_s": 5},
        "secret": None,
        "tokens": 3,
    }


def test_a_secret_on_the_command_line_is_nowhere_a_training_or_eval_only_run_writes(tmp_path):
    """Config files (ours and Hydra's), trackio's database, metrics, checkpoints, the model card, eval.json
    and the console: a training run, then eval_only on its model, each with a token on the command line."""
    secret = "sk-THISISNOTAREALKEY0123456789"

    def train_py(*overrides: str) -> str:
        result = subprocess.run(
            [sys.executable, "train.py", "data.synthetic_rows=64", f"+rewards.digits.kwargs.api_key={secret}",
             *overrides],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        return output

    trained, scored = tmp_path / "train", tmp_path / "eval"
    output = train_py("max_steps=1", "eval_every=1", f"hydra.run.dir={trained}")
    output += train_py("eval_only=true", f"eval.model={trained}/model", f"hydra.run.dir={scored}")
    assert secret not in output
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"README.md", "eval.json", "metrics.jsonl", "trainer_state.pt"} <= names  # all of them are read
    assert sum(path.suffix == ".db" for path in written) == 2  # each run's trackio data
    assert [path for path in written if secret.encode() in path.read_bytes()] == []
    for run_dir in (trained, scored):
        assert f"api_key: {REDACTED}" in (run_dir / "config_resolved.yaml").read_text()
