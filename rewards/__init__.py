"""Reward functions. Each is a plain function a user can copy:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` holds the dataset's columns for each completion (e.g. `solution`) and `completion_lengths`.
Return None for "no opinion". Weights live in conf/rewards/*.yaml, never here.
"""
