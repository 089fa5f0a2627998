"""Write a random-weight model of a `model=` option to a directory, e.g. to serve it with vLLM offline.

    python scripts/build_random_model.py model=tiny --out /tmp/tiny
    python scripts/build_random_model.py model=qwen2_0.5b_random --out /tmp/qwen05-random

The tokenizer is trained on the same text `train.py` would use (the `data=` option's prompts), so the
directory is the very model a run with these options builds.
"""

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir

from online_rl.config import CONF_DIR, register_configs
from online_rl.data import load_prompts, tokenizer_corpus
from online_rl.models import build_random_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny data=synthetic")
    parser.add_argument(
        "--out", required=True, type=Path, help="directory to write the model and tokenizer to"
    )
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    if cfg.model.random_init is None:
        raise SystemExit(
            f"model={cfg.model.name_or_path} loads from the hub; pick a random one (tiny, qwen2_0.5b_random)"
        )
    corpus = tokenizer_corpus(load_prompts(cfg.data), cfg.data.system_prompt)
    print(build_random_model(cfg.model.random_init, corpus, args.out))


if __name__ == "__main__":
    main()
