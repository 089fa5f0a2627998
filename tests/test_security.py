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


def test_a_secret_on_the_command_line_is_nowhere_in_the_run_directory_or_output(tmp_path):
    secret = "sk-THISISNOTAREALKEY0123456789"
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "max_steps=1",
            "data.synthetic_rows=64",
            f"+rewards.digits.kwargs.api_key={secret}",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert secret not in output
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".db" for path in written)  # trackio's data is among the files checked
    assert [path for path in written if secret.encode() in path.read_bytes()] == []
    assert f"api_key: {REDACTED}" in (tmp_path / "config_resolved.yaml").read_text()
