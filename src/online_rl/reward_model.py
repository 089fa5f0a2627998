"""A learned reward model that ranks completions for the preference algorithms (algo.reward_model).

Any transformers sequence-classification model with one output (a hub id or a local directory),
scoring the conversation [user: prompt, assistant: completion] through its own chat template when it
has one, the plain concatenation otherwise. It ranks pairs; the configured reward functions are still
computed and logged beside it.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardModel:
    def __init__(
        self,
        name_or_path: str,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        trust_remote_code: bool = False,
        batch_size: int = 16,
    ):
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval().requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {name_or_path} has {self.model.config.num_labels} outputs; a reward model gives one score"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The score is read at the last real token; the model finds it from pad_token_id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.device, self.autocast_dtype, self.batch_size = device, autocast_dtype, batch_size

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        if self.tokenizer.chat_template is None:
            return [prompt + completion for prompt, completion in zip(prompts, completions)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                tokenize=False,
            )
            for prompt, completion in zip(prompts, completions)
        ]

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """One float per completion, (N,)."""
        texts = self.texts(prompts, completions)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        scores = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=self.tokenizer.chat_template is None,
            ).to(self.device)
            with autocast:
                scores.append(self.model(**inputs).logits[:, 0].float().cpu())
        return torch.cat(scores)

    def close(self) -> None:
        self.model = None
