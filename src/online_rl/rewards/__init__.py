"""The built-in reward functions (conf/rewards/*.yaml name them). Each is a plain function a user can copy,
called the way TRL calls its reward functions, by keyword:

    fn(completions: list[str], **kwargs) -> list[float | None]

`kwargs` holds `prompts`, `completion_ids` (token ids), `completion_lengths` (tokens per completion) and the
dataset's columns (e.g. `solution`), one value per completion; a function names the ones it reads.
Return None for "no opinion". Weights live in conf/rewards/*.yaml, never here; these files import nothing
of the library.
"""
