"""Your own reward functions: a module here is found by its import path when you run from a clone's root, e.g.

    # rewards/brevity.py
    def short_answer(completions, **kwargs):
        return [1.0 if len(c) < 200 else 0.0 for c in completions]

    # src/online_rl/conf/rewards/brevity.yaml
    brevity:
      fn: rewards.brevity.short_answer
      weight: 0.5

    python train.py rewards=[digits,brevity]

A reward is called by keyword, as TRL calls its own: `completions`, `prompts`, `completion_ids`,
`completion_lengths` and the dataset's columns (e.g. `solution`), one value per completion; it names the ones
it reads and takes the rest as **kwargs. It returns a number (or None for "no opinion") per completion.
The built-in ones are in src/online_rl/rewards/. This folder is not part of the installed package.
"""
