"""Hydra plugins of online-rl: the process-per-job launcher (conf/train.yaml makes it multirun's default)."""
