"""Shared helpers: compose the real Hydra config the way train.py does, with test-sized overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from online_rl.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(__file__).resolve().parent / "data"

register_configs()


def compose_config(overrides: list[str] = ()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def make_config(tmp_path):
    """compose_config with the run's outputs in tmp_path and no trackio."""

    def make(*overrides: str):
        return compose_config([f"output_dir={tmp_path}", "logger=none", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The `model=tiny` model, built once on the synthetic data, as a directory like any hub download."""
    from online_rl.data import synthetic_arithmetic
    from online_rl.models import build_random_model

    cfg = compose_config()
    rows = synthetic_arithmetic(500)
    texts = [cfg.data.system_prompt, *rows["prompt"], *rows["solution"]]
    return build_random_model(cfg.model.random_init, texts, tmp_path_factory.mktemp("tiny"))
