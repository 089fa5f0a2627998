"""Entry point: compose the Hydra config (conf/) and hand it to the training loop. Nothing else lives here."""

import hydra

from online_rl.loop import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
