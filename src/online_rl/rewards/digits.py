"""The quickstart's reward: a signal a randomly initialised model can learn in a few minutes on a CPU."""


def digit_fraction(completions: list[str], **kwargs) -> list[float | None]:
    """Share of the completion's non-space characters that are digits (the synthetic answers are numbers).

    An empty completion has no characters to judge: None.
    """
    scores: list[float | None] = []
    for completion in completions:
        characters = [c for c in completion if not c.isspace()]
        scores.append(sum(c.isdigit() for c in characters) / len(characters) if characters else None)
    return scores
