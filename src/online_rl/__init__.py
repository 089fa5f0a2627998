"""online_rl: a readable online-RL post-training loop for language models, composed by Hydra."""
