"""What a run hands back: the final model in Hugging Face format, a model card beside it, and an
optional upload to the hub.

    <output_dir>/model/          full weights (safetensors), config, generation_config, tokenizer, README.md;
                                 a LoRA run: the adapter instead of the weights
    <output_dir>/model_merged/   LoRA with save_merged=true: the base with the adapter merged in

Both load with `AutoModelForCausalLM.from_pretrained(dir)` (the adapter through peft) and the full
ones serve with `vllm serve dir`. Unlike checkpoints/, they carry no optimizer state.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from online_rl.engines.weights import inference_weights
from online_rl.models import hub_offline, is_lora

log = logging.getLogger(__name__)

EVAL_NAMES = {
    "eval/pass@1_greedy": "pass@1, greedy",
    "eval/reward_mean_greedy": "mean reward, greedy",
    "eval/reward_mean": "mean reward, sampled",
}


def save_model(
    model: torch.nn.Module, tokenizer: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """The trained weights (a LoRA run: its adapter) and the tokenizer, in Hugging Face format.
    state_dict: the weights, when the model cannot give them itself (FSDP2 shards, gathered)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with cache_enabled(model):
        model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    return directory


def save_merged_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> Path:
    """A LoRA model as plain full weights: each adapted weight W + scale * B A is computed out of place
    (as for the engines), so the training model is left exactly as it was."""
    from huggingface_hub import save_torch_state_dict

    if not is_lora(model):
        raise ValueError(
            "only a LoRA model has an adapter to merge; a full fine-tune's model/ is full weights"
        )
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    base = model.get_base_model()
    state = {name: tensor.to("cpu").contiguous() for name, tensor in inference_weights(model)}
    save_torch_state_dict(state, directory)
    with cache_enabled(base):
        base.config.save_pretrained(directory)
    base.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class cache_enabled:
    """Saves with use_cache=true: gradient checkpointing turns it off for training, but whoever loads the
    model wants the KV cache when generating."""

    def __init__(self, model: torch.nn.Module):
        self.config, self.before = model.config, model.config.use_cache

    def __enter__(self) -> None:
        self.config.use_cache = True

    def __exit__(self, *exc: object) -> None:
        self.config.use_cache = self.before


def model_card(
    config: dict[str, Any], steps: int, eval_metrics: dict[str, float] | None, merged: bool = False
) -> ModelCard:
    """README.md for the exported model: its metadata (library, base model, tags, the final evaluation as
    Hub-readable `model-index` results) from huggingface_hub's ModelCardData, and a body naming the base model,
    algorithm, rewards, data, steps and scores.

    `config` is the run's resolved config as plain containers; `merged`: the card of model_merged/."""
    model, algo, lora = config["model"], config["algo"], config["model"]["lora"]
    random_base = model.get("random_init") is not None
    algo_name = algo.get("name", "?")
    adapter = lora["enabled"] and not merged
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=None if random_base else model["name_or_path"],
        tags=["online-rl", algo_name],
        model_name=f"{model['name_or_path']}-{algo_name}",
        eval_results=eval_results(config, eval_metrics) if eval_metrics else None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(config, steps, eval_metrics, merged)}")


def eval_results(config: dict[str, Any], eval_metrics: dict[str, float]) -> list[EvalResult]:
    """The final evaluation's pass@k and mean rewards as the Hub's eval results (model-index metadata)."""
    data, split = config["data"], config["eval"]["split"]
    synthetic = bool(data.get("synthetic_rows"))
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type="synthetic-arithmetic" if synthetic else data["path"],
            dataset_name="synthetic arithmetic" if synthetic else data["path"],
            dataset_config=None if synthetic else data.get("subset"),
            dataset_split=split,
            metric_type=key.removeprefix("eval/"),
            metric_name=metric_name(key),
            metric_value=float(value),
        )
        for key, value in eval_metrics.items()
        if key.startswith("eval/pass@") or key in EVAL_NAMES
    ]


def metric_name(key: str) -> str:
    return EVAL_NAMES.get(key, key.removeprefix("eval/") + ", sampled")


def card_body(config: dict[str, Any], steps: int, eval_metrics: dict[str, float] | None, merged: bool) -> str:
    """The card's Markdown: what was trained, how, on what, and the final scores; how to load it."""
    model, algo, data, lora = config["model"], config["algo"], config["data"], config["model"]["lora"]
    random_base = model.get("random_init") is not None
    base = f"{model['name_or_path']} (random weights built in code)" if random_base else model["name_or_path"]
    algo_name = algo.get("name", "?")
    knobs = ", ".join(f"{key}={value}" for key, value in algo.items() if key != "name")
    rewards = ", ".join(f"{name} (weight {spec['weight']})" for name, spec in config["rewards"].items())
    dataset = (
        f"synthetic arithmetic ({data['synthetic_rows']} problems made in code)"
        if data.get("synthetic_rows")
        else f"{data['path']}"
        + (f" ({data['subset']})" if data.get("subset") else "")
        + f", split {data['split']}"
    )
    adapter = lora["enabled"] and not merged
    weights = "full fine-tune"
    if lora["enabled"]:
        weights = f"LoRA (r={lora['r']}, alpha={lora['alpha']}, on {', '.join(lora['target_modules'])})"
        weights = f"{weights}, merged into the base weights" if merged else f"{weights}: the adapter only"
    lines = [
        f"# {model['name_or_path']}, {algo_name.upper()}",
        "",
        "Trained with online RL by the online-rl recipe repo.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        f"| algorithm | {algo_name}: {knobs} |",
        f"| rewards | {rewards} |",
        f"| data | {dataset} |",
        f"| steps | {steps} ({config['prompts_per_step']} prompts per step) |",
        f"| weights | {weights} |",
        "",
        "## Evaluation",
        "",
    ]
    if eval_metrics:
        evaluation = config["eval"]
        decided_by = evaluation["pass_reward"] or "the weighted total reward"
        lines += [
            f"At the end of training, on {eval_metrics['eval/prompts']:.0f} prompts of split "
            f"`{evaluation['split']}`; a completion passes when {decided_by} is >= {evaluation['pass_threshold']}. "
            f"pass@k from {evaluation['num_generations']} samples per prompt (unbiased estimator); the same "
            "numbers are in the metadata above (`model-index`).",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for key, value in eval_metrics.items():
            if key.startswith("eval/pass@") or key in EVAL_NAMES:
                lines.append(f"| {metric_name(key)} | {value:.3f} |")
    else:
        lines.append("No evaluation ran (set `eval_every` > 0).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```",
        "",
        "Serve the merged model with `vllm serve <output_dir>/model_merged` (written with save_merged=true)."
        if adapter
        else "Serve it with `vllm serve <this directory>`.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub_repo(repo_id: str, directory: Path) -> bool:
    """Upload `directory` to the hub repo `repo_id` (created if missing). Offline, without a token, or when
    the hub cannot be reached, log why and how to upload later, and return False: the model is saved."""
    import huggingface_hub

    later = f"upload it later with: hf upload {repo_id} {directory}"
    if hub_offline():
        log.warning("push_to_hub=%s skipped: HF_HUB_OFFLINE is set; %s", repo_id, later)
        return False
    if huggingface_hub.get_token() is None:
        log.warning(
            "push_to_hub=%s skipped: no Hugging Face token (hf auth login, or HF_TOKEN); %s", repo_id, later
        )
        return False
    try:
        huggingface_hub.create_repo(repo_id, exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=directory, commit_message="online-rl: final model"
        )
    except Exception as error:  # network, auth or permission: the run's result is on disk either way
        log.warning("push_to_hub=%s failed (%s: %s); %s", repo_id, type(error).__name__, error, later)
        return False
    log.info("Pushed %s to https://huggingface.co/%s", directory, repo_id)
    return True


def export_final_model(
    model: torch.nn.Module,
    tokenizer: Any,
    output_dir: Path,
    steps: int,
    eval_metrics: dict | None,
    config: dict[str, Any],
    save_merged: bool = False,
    push_to_hub: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """model/ (and model_merged/ with save_merged=true), each with its model card; pushed to the hub repo
    `push_to_hub` if set. `config`: the run's resolved config as plain containers, secrets redacted (the
    card is public once pushed)."""
    directory = save_model(model, tokenizer, output_dir / "model", state_dict)
    model_card(config, steps, eval_metrics).save(directory / "README.md")
    if save_merged:
        merged = save_merged_model(model, tokenizer, output_dir / "model_merged")
        model_card(config, steps, eval_metrics, merged=True).save(merged / "README.md")
        log.info("Merged model: %s", merged)
    log.info("Final model: %s (loads with AutoModelForCausalLM.from_pretrained)", directory)
    if push_to_hub:
        push_to_hub_repo(push_to_hub, directory)
    return directory
