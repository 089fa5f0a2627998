"""Entry point of a clone: `python train.py <overrides>` is `online-rl-train <overrides>` (online_rl/cli.py),
composing the same packaged configs (src/online_rl/conf/). Nothing else lives here."""

from online_rl.cli import main

if __name__ == "__main__":
    main()
