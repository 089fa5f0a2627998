"""Your own environments for multi-turn rollouts: a module here is found by its import path when you run from
a clone's root, e.g.

    # envs/echo.py: a class with reset(row) -> opening message(s) and step(text) -> (reply, reward, done)
    # src/online_rl/conf/env/echo.yaml
    name: echo
    cls: envs.echo.Echo
    max_turns: 3

    python train.py env=echo

The interface, and the built-in environments to copy from (calculator, guess_number), are in
src/online_rl/envs/; docs/environments.md walks through one. This folder is not part of the installed package.
"""
