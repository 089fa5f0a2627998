"""Guess the number: the model guesses, the environment says higher or lower, until it is right or out of turns.
A task a tiny random model can learn (answer with a number, end the turn, move the right way); finishing in
fewer turns scores more. Its data: data=guess_number (rows with a `secret`, made in code)."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


class GuessNumber:
    """reset(row): the row's question (`prompt`) and its `secret`; step: "higher", "lower" or done.

    Reward on a right guess at turn t: 1 / t (1, 0.5, 0.33, ...); a turn with no number scores nothing and is
    told so. An episode that runs out of turns (env.max_turns) scores 0.
    """

    def reset(self, row: dict) -> str:
        self.secret, self.turn = int(row["secret"]), 0
        return row["prompt"]

    def step(self, assistant_text: str) -> tuple[str | None, float | None, bool]:
        self.turn += 1
        guess = NUMBER.search(assistant_text)
        if guess is None:
            return "Say a number.", 0.0, False
        if int(guess.group()) == self.secret:
            return None, 1.0 / self.turn, True
        return ("Higher." if int(guess.group()) < self.secret else "Lower."), 0.0, False
