"""Prompts: load a dataset, normalise its columns, format prompts into token ids, and sample batches.

Every row leaves `load_prompts` with a `prompt` (the question) and, when the data has one, a
`solution` (the reference answer); the dataset's other columns stay and reach the reward functions.
A run that evaluates takes its eval rows from `training_and_eval_prompts`: eval.split when the data has
that split, else a seeded slice of data.split held out of training (a user's own JSONL file has one split).
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

import datasets
import torch

SYNTHETIC_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SYNTHETIC_HELD_OUT_ROWS = 500
GUESS_RANGE = 9  # data=guess_number's secrets: 1 ... GUESS_RANGE  # the synthetic data's eval split, before eval.split's slice
# the seed that draws the eval rows held out of data.split: fixed, not `seed`, so that every run on the same
# data (a resume, a sweep over seeds, eval_only on the exported model) evaluates on the same rows
HOLDOUT_SEED = 0

log = logging.getLogger(__name__)


def synthetic_arithmetic(num_rows: int, seed: int = 0) -> datasets.Dataset:
    """Arithmetic word problems with integer answers, made in code so the quickstart needs no download."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(list(SYNTHETIC_OPERATIONS))
        rows.append({"prompt": f"What is {a} {op} {b}?", "solution": str(SYNTHETIC_OPERATIONS[op](a, b))})
    return datasets.Dataset.from_list(rows)


def guess_the_number(num_rows: int, seed: int = 0) -> datasets.Dataset:
    """Rows of env=guess_number: a question and a `secret` from 1 to GUESS_RANGE, made in code like the
    arithmetic. The task is the strategy (a number, then the right way after "higher"/"lower"), not the rows,
    so the eval split is the same task drawn with another seed."""
    rng = random.Random(seed)
    return datasets.Dataset.from_list(
        [
            {"prompt": f"I am thinking of a number from 1 to {GUESS_RANGE}. Guess it.", "secret": secret}
            for secret in (rng.randint(1, GUESS_RANGE) for _ in range(num_rows))
        ]
    )


# data.synthetic_task -> the rows it makes (num_rows, seed)
SYNTHETIC_TASKS = {"arithmetic": synthetic_arithmetic, "guess_number": guess_the_number}


def synthetic_rows(data_cfg: Any) -> datasets.Dataset:
    """data.synthetic_rows rows of data.synthetic_task, made in code."""
    if data_cfg.synthetic_task not in SYNTHETIC_TASKS:
        raise ValueError(
            f"data.synthetic_task={data_cfg.synthetic_task!r} is not a task made in code: use one of "
            f"{sorted(SYNTHETIC_TASKS)}, e.g. data.synthetic_task=arithmetic"
        )
    return SYNTHETIC_TASKS[data_cfg.synthetic_task](data_cfg.synthetic_rows)


def held_out_arithmetic(training_rows: int, split: str) -> datasets.Dataset:
    """The synthetic data's eval split: SYNTHETIC_HELD_OUT_ROWS problems made with another seed, none of
    them a prompt of the `training_rows` training problems, then sliced by `split` as load_dataset would
    (`test[:64]`, `test[10%:20%]`; the split's name itself is not used)."""
    training = set(synthetic_arithmetic(training_rows)["prompt"])
    rng, rows, seen = random.Random(1), [], set()
    for _ in range(SYNTHETIC_HELD_OUT_ROWS * 100):
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(list(SYNTHETIC_OPERATIONS))
        prompt = f"What is {a} {op} {b}?"
        if prompt not in training and prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "solution": str(SYNTHETIC_OPERATIONS[op](a, b))})
            if len(rows) == SYNTHETIC_HELD_OUT_ROWS:
                break
    else:
        raise ValueError(
            f"data.synthetic_rows={training_rows} leaves too few unseen problems for an eval split: lower it"
        )
    return slice_split(datasets.Dataset.from_list(rows), split)


def slice_split(rows: datasets.Dataset, split: str) -> datasets.Dataset:
    """`rows` sliced by `split` as load_dataset would (`test[:64]`, `test[10%:20%]`; the name is not used)."""
    name = split.split("[", 1)[0]
    try:
        [span] = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(rows)})
    except (ValueError, AssertionError) as error:
        raise ValueError(
            f"eval.split={split!r} is not a split like test, test[:64] or test[:10%]: {error}"
        ) from error
    return rows.select(range(span.from_, span.to))


def load_split(data_cfg: Any, split: str, key: str) -> datasets.Dataset:
    """datasets.load_dataset of data.path at `split` (which the config sets as `key`), columns normalised."""
    if not data_cfg.path:
        raise ValueError(
            "data.path is empty: set data.path (a hub id or a builder such as json) or data.synthetic_rows"
        )
    try:
        dataset = datasets.load_dataset(
            data_cfg.path, data_cfg.subset, data_files=data_cfg.data_files, split=split
        )
    except StopIteration as error:  # what the json builder raises on an empty file
        raise ValueError(
            f"the dataset has no rows: data.data_files={data_cfg.data_files} is empty"
        ) from error
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise ValueError(
            f"{key}={split!r} does not name a split of {data_cfg.path}: {str(error).rstrip('.')}. Set {key} to one of its "
            "splits, sliced if you like (e.g. test[:200])"
        ) from error
    return normalise_columns(
        dataset, data_cfg.prompt_column, data_cfg.solution_column, data_cfg.solution_regex
    )


def load_prompts(data_cfg: Any) -> datasets.Dataset:
    """The dataset named by `data_cfg`, with `prompt` and `solution` columns (see DataConfig)."""
    if data_cfg.synthetic_rows:
        return synthetic_rows(data_cfg)
    return load_split(data_cfg, data_cfg.split, "data.split")


def training_and_eval_prompts(
    dataset: datasets.Dataset, data_cfg: Any, eval_cfg: Any, min_training_rows: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rows to train on, rows to evaluate on), both with the columns of `dataset` (data.split's rows).

    The eval rows are eval.split's when the data has that split (synthetic data: problems unseen in training)
    and the training rows all of `dataset`. Data without it, such as a user's own JSONL file, gets
    eval.holdout_size rows of `dataset` held out instead (see hold_out), which then trains on the rest; it
    must keep `min_training_rows` (prompts_per_step) to train on.
    """
    if data_cfg.synthetic_rows and data_cfg.synthetic_task == "guess_number":
        held_out = slice_split(guess_the_number(SYNTHETIC_HELD_OUT_ROWS, seed=1), eval_cfg.split)
    elif data_cfg.synthetic_rows:
        held_out = held_out_arithmetic(data_cfg.synthetic_rows, eval_cfg.split)
    else:
        splits = dataset_splits(data_cfg)
        missing = [name for name in split_names(eval_cfg.split) if name not in splits]
        if missing:
            training, held_out, rows = hold_out(dataset, eval_cfg.holdout_size, min_training_rows)
            log.info(
                "Evaluation set: %d rows held out of data.split=%s and never trained on, as the data has no "
                "split %s (eval.split=%s; its splits: %s). eval.holdout_size=%d rows drawn with seed %d; their "
                "indices in data.split: %s.%s",
                len(rows), data_cfg.split, " or ".join(map(repr, missing)), eval_cfg.split, splits,
                eval_cfg.holdout_size, HOLDOUT_SEED, index_list(rows),
                shared_prompts_note(len(dataset) - len(training) - len(rows)),
            )  # fmt: skip
            return training, held_out
        held_out = load_split(data_cfg, eval_cfg.split, "eval.split")
    log.info("Evaluation set: %d prompts of eval.split=%s", len(held_out), eval_cfg.split)
    return dataset, held_out


def split_names(split: str) -> list[str]:
    """The splits a load_dataset split spec reads: 'test[:64]' -> ['test'], 'train[:10]+test' -> both."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def dataset_splits(data_cfg: Any) -> list[str]:
    """The names of data.path's splits (read from the cache that loading data.split filled)."""
    return list(datasets.load_dataset(data_cfg.path, data_cfg.subset, data_files=data_cfg.data_files))


def holdout_indices(num_rows: int, size: int) -> list[int]:
    """The indices of the `size` rows of `num_rows` held out for evaluation, in order: drawn with
    HOLDOUT_SEED, so the same on every run (and resume) over the same rows."""
    return sorted(random.Random(HOLDOUT_SEED).sample(range(num_rows), size))


def hold_out(
    dataset: datasets.Dataset, size: int, min_training_rows: int
) -> tuple[datasets.Dataset, datasets.Dataset, list[int]]:
    """(training rows, held-out rows, the held-out rows' indices in `dataset`). The training rows are the
    others, less any whose prompt is also a held-out row's (a duplicate), so no eval prompt is trained on."""
    num_rows = len(dataset)
    if size < num_rows:
        held = holdout_indices(num_rows, size)
        prompts = list(dataset["prompt"])
        held_prompts = {prompts[i] for i in held}
        training = [i for i, prompt in enumerate(prompts) if prompt not in held_prompts]
        if len(training) >= min_training_rows:
            return dataset.select(training), dataset.select(held), held
    room = num_rows - min_training_rows
    fix = (
        f"use e.g. eval.holdout_size={max(1, min(num_rows // 5, room))}"
        if room >= 1
        else "add rows to the data, set eval.split to a split the data has, or eval_every=0 (no evaluation)"
    )
    raise ValueError(
        f"eval.holdout_size={size}: holding out that many of data.split's {num_rows} rows for evaluation leaves "
        f"fewer than prompts_per_step={min_training_rows} to train on; {fix}"
    )


def index_list(indices: list[int], shown: int = 64) -> str:
    """'3, 17, 25' or, past `shown` of them, '3, 17, ... (100 in all)'."""
    text = ", ".join(map(str, indices[:shown]))
    return text if len(indices) <= shown else f"{text}, ... ({len(indices)} in all)"


def shared_prompts_note(count: int) -> str:
    return f" {count} other rows repeat a held-out prompt and are not trained on either." if count else ""


def normalise_columns(
    dataset: datasets.Dataset, prompt_column: str, solution_column: str | None, solution_regex: str | None
) -> datasets.Dataset:
    """Rename the question column to `prompt` and the answer column to `solution` (cut by solution_regex)."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows: check data.path, data.data_files and data.split")
    for key, column in (("data.prompt_column", prompt_column), ("data.solution_column", solution_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"the dataset has no column {column!r} ({key}); its columns are {dataset.column_names}. "
                f"Fix it with {key}=<one of those>"
                + (" or data.solution_column=null" if key.startswith("data.sol") else "")
            )
    renames = {prompt_column: "prompt"}
    if solution_column is not None:
        renames[solution_column] = "solution"
    clashes = [new for old, new in renames.items() if old != new and new in dataset.column_names]
    dataset = dataset.remove_columns(clashes).rename_columns({o: n for o, n in renames.items() if o != n})
    if solution_column is not None and solution_regex:
        pattern = re.compile(solution_regex, re.MULTILINE)

        def cut(row: dict) -> dict:
            match = pattern.search(row["solution"])
            return {"solution": match.group(1) if match else row["solution"]}

        dataset = dataset.map(cut)
    return dataset


def prompt_messages(question: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def prompt_text(tokenizer: Any, question: str, system_prompt: str | None) -> str:
    """The text the model continues: the chat template when the tokenizer has one, else plain text."""
    if tokenizer.chat_template:
        messages = prompt_messages(question, system_prompt)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{system_prompt}\n\n{question}\n" if system_prompt else f"{question}\n"


def tokenize_prompts(
    tokenizer: Any, questions: list[str], system_prompt: str | None, max_prompt_length: int
) -> list[list[int]]:
    """Token ids per prompt, left-truncated to max_prompt_length (the end, where the question is, stays)."""
    texts = [prompt_text(tokenizer, q, system_prompt) for q in questions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for question, row in zip(questions, ids):
        if not row:  # an engine cannot continue nothing (vLLM: "decoder prompt cannot be empty")
            raise ValueError(
                f"the prompt {question!r} is no tokens at all with this tokenizer (it has no chat template, or "
                "drops these characters): check that data.prompt_column names the question column and that its "
                "rows are not empty, use a model whose tokenizer has a chat template, or frame the prompts with "
                "data.system_prompt=..."
            )
    return [row[-max_prompt_length:] for row in ids]


def check_prompt_budget(tokenizer: Any, system_prompt: str | None, max_prompt_length: int) -> None:
    """Fail early when the template and system prompt alone use up max_prompt_length."""
    overhead = len(tokenize_prompts(tokenizer, [""], system_prompt, 10**9)[0])
    if overhead >= max_prompt_length:
        raise ValueError(
            f"data.max_prompt_length={max_prompt_length} tokens, but the chat template and system prompt "
            f"alone take {overhead}: left-truncation would cut the system prompt. "
            f"Raise it, e.g. data.max_prompt_length={overhead + 256}, or shorten data.system_prompt"
        )


class PromptSampler:
    """Yields batches of rows, reshuffled every epoch by its own seeded generator.

    Its state (epoch and position) is part of a checkpoint, so a resumed run sees the same prompts.
    """

    def __init__(self, dataset: datasets.Dataset, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size > len(dataset):
            raise ValueError(
                f"prompts_per_step={batch_size} is larger than the dataset ({len(dataset)} rows): lower prompts_per_step"
            )
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def next_batch(self) -> list[dict]:
        """The next batch_size rows; an epoch's tail too short for a batch is skipped."""
        if self.position + self.batch_size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.dataset[i] for i in indices]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


def tokenizer_corpus(dataset, system_prompt: str | None):
    """The text a random model's tokenizer learns from: the system prompt, questions and answers."""
    yield system_prompt or ""
    for row in dataset:
        yield str(row["prompt"])
        yield str(row.get("solution", ""))
