"""The Hydra configs (train.yaml and a folder per config group), a package so that Hydra finds them inside an
installed wheel (`pkg://online_rl.conf`) as in a clone. The folder name is the command-line key."""
