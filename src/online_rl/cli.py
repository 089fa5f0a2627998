"""The console command `online-rl-train` (and a clone's `python train.py`): compose the packaged Hydra config
(online_rl/conf/) with the command line's overrides and hand it to the training loop."""

import hydra

from online_rl.loop import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    run(cfg)
