"""Hydra plugins of online-rl: the process-per-job launcher (online_rl/conf/train.yaml makes it multirun's default)."""
