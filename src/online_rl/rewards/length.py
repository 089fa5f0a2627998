"""Length shaping."""


def overlong_penalty(
    completion_lengths: list[int], max_length: int, soft_window: int, **kwargs
) -> list[float | None]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), in tokens.

    0 up to max_length - soft_window tokens, then falling linearly to -1 at max_length.
    """
    if not 0 < soft_window <= max_length:
        raise ValueError(f"soft_window must be in (0, max_length={max_length}], got {soft_window}")
    start = max_length - soft_window
    return [0.0 if n <= start else max(-1.0, (start - n) / soft_window) for n in completion_lengths]
