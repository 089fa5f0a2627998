"""Environments for multi-turn rollouts. Each is a plain class a user can copy (it imports nothing of the
library), one instance per sample:

    reset(row: dict) -> str | list[dict]        the conversation's opening: a user message, or messages
                                                ({"role": ..., "content": ...}); `row` is the dataset row
    step(assistant_text: str) -> (reply, reward, done)
        reply:  None, a user message (str) or messages (e.g. {"role": "tool", "content": "42"})
        reward: None (no opinion yet) or a number; a sample's reward is the sum of those it got
        done:   True ends the episode

Picked with `env=<name>` (src/online_rl/conf/env/<name>.yaml names the class); `env.max_turns` caps the
model's turns. Your own go in a clone's envs/ (`cls: envs.<module>.<Class>`).
"""
