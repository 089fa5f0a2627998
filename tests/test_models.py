"""model=tiny: a real Qwen2-architecture model and byte-level BPE tokenizer that load with the Auto classes."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from online_rl.models import CompiledBlocks, add_lora, load_policy

from .conftest import compose_config


def test_tiny_tokenizer_round_trips_through_auto_classes(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # what transformers picks for model_type qwen2
    for text in [
        "What is 12 + 30?",
        "<think>ünïcode ✓ 数学</think><answer>\\frac{1}{2}</answer>",
        "  spaces\n\ttabs  ",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 0
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id


def test_tiny_model_loads_and_fits_vllm_cpu_attention(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2"
    assert (
        config.hidden_size // config.num_attention_heads >= 32
    )  # vLLM's CPU attention rejects smaller heads
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size >= len(tokenizer)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()


def test_random_init_is_deterministic(tiny_model_dir, tmp_path):
    from online_rl.models import build_random_model

    from .conftest import compose_config

    spec = compose_config().model.random_init
    texts = ["What is 1 + 1?", "2"] * 50
    first = AutoModelForCausalLM.from_pretrained(build_random_model(spec, texts, tmp_path / "a"))
    second = AutoModelForCausalLM.from_pretrained(build_random_model(spec, texts, tmp_path / "b"))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_lora_on_missing_modules_names_the_real_ones(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = OmegaConf.create(
        {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "query_key_value"]}
    )
    with pytest.raises(ValueError, match=r"\['query_key_value'\].*Its linear layers are .*'q_proj'"):
        add_lora(model, lora)


def test_lora_trains_only_adapters(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    peft_model = add_lora(model, lora)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_base_in_bf16_keeps_the_adapters_in_the_trained_dtype(tiny_model_dir):
    """model.lora.base_dtype=bfloat16: the frozen base in bf16, the adapters in the trained dtype (fp32), and
    a forward and backward under bf16 autocast give the adapters finite fp32 gradients."""
    cfg = compose_config(
        ["model.lora.enabled=true", "model.lora.base_dtype=bfloat16", "model.lora.dropout=0"]
    )
    model = load_policy(str(tiny_model_dir), cfg.model, torch.float32, torch.device("cpu"))
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert set(trained.values()) == {torch.float32} and set(frozen.values()) == {torch.bfloat16}
    ids = torch.randint(0, 300, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, use_cache=False).logits
    torch.log_softmax(logits.float(), dim=-1)[..., 0].mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "base_dtype, autocast, expected",
    [(None, torch.bfloat16, torch.bfloat16), (None, None, torch.float32), ("float32", torch.bfloat16, torch.float32),
     ("bfloat16", None, torch.bfloat16)],
)  # fmt: skip
def test_the_frozen_base_follows_autocast_unless_model_lora_base_dtype_says(
    tiny_model_dir, base_dtype, autocast, expected
):
    """Unset, the LoRA base is in the autocast dtype (bf16 on a GPU, where every product runs in it anyway),
    else in the trained dtype; model.lora.base_dtype wins. The adapters stay fp32 in every case."""
    overrides = ["model.lora.enabled=true"] + ([f"model.lora.base_dtype={base_dtype}"] if base_dtype else [])
    model = load_policy(
        str(tiny_model_dir), compose_config(overrides).model, torch.float32, torch.device("cpu"), autocast
    )
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {expected}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_build_random_model_script(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "scripts/build_random_model.py", "model=tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert AutoConfig.from_pretrained(out).model_type == "qwen2"
    assert AutoTokenizer.from_pretrained(out).decode([]) == ""


def qwen2_of_depth(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
    )
    return AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("layers", [2, 6])
def test_compiled_blocks_compile_one_layer_for_all_and_train_as_eager(layers):
    """model.compile compiles the decoder layer once, whatever the depth; gives the eager gradients, also on a
    micro-batch of another shape, without recompiling; and leaves direct calls of the model eager."""
    from torch._dynamo.utils import counters

    model = qwen2_of_depth(layers)
    compiled = CompiledBlocks(model)
    counters.clear()
    torch._dynamo.reset()
    for rows, width in [(2, 20), (3, 27)]:  # the second micro-batch has another shape
        ids = torch.randint(0, 300, (rows, width))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding
        compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
        for ours, eager in zip(compiled_grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(ours, eager, rtol=1e-3, atol=1e-5)
        model.zero_grad()
    # one graph: the layer's forward (its backward with it), for every layer and both shapes
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == 1  # and the direct calls of the model compiled nothing


def test_compiled_blocks_are_found_through_subclasses_and_a_model_without_blocks_compiles_whole():
    """FSDP2 turns each sharded layer into an instance of a subclass (FSDPQwen2DecoderLayer): still a block.
    A model that names no blocks is compiled whole, and computes what it computed eagerly."""
    model = qwen2_of_depth(3)
    for layer in model.model.layers:
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    compiled = CompiledBlocks(model)
    assert [block for block, _ in compiled.compiled] == list(model.model.layers) and compiled.whole is None

    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    whole = CompiledBlocks(plain)
    assert whole.compiled == [] and whole.whole is not None
    inputs = torch.randn(5, 4)
    torch.testing.assert_close(whole(inputs), plain(inputs))


@pytest.mark.parametrize(
    "setting, device, world_size, expected",
    [("auto", "cuda", 1, True), ("auto", "cpu", 1, False), ("auto", "cuda", 2, False), (True, "cpu", 1, True),
     (False, "cuda", 1, False), (True, "cuda", 2, True)],
)  # fmt: skip
def test_model_compile_auto_compiles_on_one_cuda_gpu_and_an_explicit_setting_wins(
    setting, device, world_size, expected
):
    from online_rl.models import compiles

    assert compiles(setting, torch.device(device), world_size) is expected


@pytest.mark.parametrize("value", ["yes", 1.5])
def test_a_model_compile_setting_that_is_not_auto_true_or_false_is_refused(make_config, value):
    from online_rl.checks import check_config

    with pytest.raises(ValueError, match=r"model.compile=.*use auto"):
        check_config(make_config(f"model.compile={value}"))
