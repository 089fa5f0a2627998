"""Models: load from the hub or a directory, or build a random Qwen2-architecture model offline; LoRA.

A random model is written to disk like any checkpoint (weights + tokenizer), so every engine, vLLM
included, loads it by path exactly as it would a hub model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from online_rl.checkpoint import SHARDED

log = logging.getLogger(__name__)

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# The ChatML layout Qwen2 models use, so prompts for the random model look like the real ones.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_byte_level_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (what Qwen2Tokenizer expects) learnt from `texts`, with ChatML specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END, pad_token=END_OF_TEXT)
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_random_model(spec: Any, texts: Iterable[str], directory: Path) -> Path:
    """Write a Qwen2-architecture model with random weights and a tokenizer trained on `texts` to `directory`."""
    tokenizer = train_byte_level_tokenizer(texts, spec.tokenizer_vocab_size)
    config = random_model_config(spec, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    # A random model must not stop on hub generation defaults, only on EOS and max_new_tokens.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_model_config(spec: Any, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """The Qwen2 config of a random_init spec with its tokenizer (build it on the meta device to count it)."""
    vocab_size = spec.model_vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(
            f"model_vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


class ModelUnavailable(ValueError):
    """A hub model that is neither a local directory nor in the local cache, where the hub cannot be reached."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or huggingface_hub's own offline switch) is set: nothing is fetched from the hub."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub.constants import is_offline_mode

    return flag or is_offline_mode()


def unavailable_model(key: str, name: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"{key}={name} is not a local directory and not in the Hugging Face cache, and {why}. Pass a local "
        f"directory ({key}=/path/to/model), download it once where there is network (`hf download {name}`, "
        "then HF_HUB_OFFLINE=1 reads the cache), or train a random-weight model offline (model=qwen2_0.5b_random)"
    )


def check_model_available(key: str, name: str) -> None:
    """Before anything loads: offline, a hub id must already be in the local cache (a directory always is)."""
    if Path(name).exists() or not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a repo id either (a mistyped path, say)
        cached = None
    if not isinstance(cached, str):
        raise unavailable_model(key, name, "HF_HUB_OFFLINE is set, so it cannot be downloaded")


def resolve_model_path(model_cfg: Any, texts: Iterable[str], output_dir: Path) -> str:
    """The path or hub id to load: a freshly built random model, or model.name_or_path."""
    if model_cfg.random_init is None:
        return model_cfg.name_or_path
    directory = output_dir / "random_init" / model_cfg.name_or_path
    log.info(
        "Building %s (random weights, tokenizer trained on the data) in %s", model_cfg.name_or_path, directory
    )
    return str(build_random_model(model_cfg.random_init, texts, directory))


def load_tokenizer(path: str, trust_remote_code: bool, key: str = "model.name_or_path") -> Any:
    """The tokenizer of `path` (the first file a run reads from the hub: the place to say it cannot be had)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(path).exists():
            raise
        raise unavailable_model(
            key, path, f"the hub could not be reached ({str(error).splitlines()[0]})"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only pads; padded positions are masked everywhere
    return tokenizer


def load_policy(
    path: str,
    model_cfg: Any,
    dtype: torch.dtype,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The trainable model: all weights, or LoRA adapters on a frozen base when model.lora.enabled. `dtype`
    is the trained weights' (the adapters' under LoRA); the frozen base's is `frozen_base_dtype`."""
    lora = model_cfg.lora
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=frozen_base_dtype(lora, dtype, autocast_dtype) if lora.enabled else dtype,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    ).to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        model = add_lora(model, lora)
        # peft makes the adapters in the base's dtype (or upcasts them to fp32): they train in `dtype`
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype)
    if model_cfg.disable_dropout:
        disable_dropout(model)
    return model


def frozen_base_dtype(lora: Any, dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The frozen base's dtype under LoRA: model.lora.base_dtype; unset, the autocast dtype (bf16 on a GPU),
    else `dtype`. Under autocast every matrix product runs in the autocast dtype anyway, and a frozen fp32
    weight is cast again at each forward (autocast caches only weights that train) with the copy kept for the
    backward: at 7B the fp32 base (28 GiB) plus those copies (14 GiB) against 14 GiB in bf16. The residual
    stream and norms then run in bf16, as in the engine that samples."""
    if lora.base_dtype:
        return torch_dtype(lora.base_dtype)
    return autocast_dtype or dtype


def compiled_for_training(
    policy: torch.nn.Module, model_cfg: Any, device: torch.device, world_size: int
) -> torch.nn.Module:
    """The module the training passes call: `policy` itself, or with model.compile `CompiledBlocks(policy)`.
    Generation, the reference and checkpoints keep calling the eager model, whose weights these share."""
    return CompiledBlocks(policy) if compiles(model_cfg.compile, device, world_size) else policy


def compiles(setting: Any, device: torch.device, world_size: int) -> bool:
    """model.compile: true, false, or auto: on one CUDA GPU. There the one-off compile (~30 s at the first
    step) pays after about a hundred steps: at 0.5B a training pass took 0.79 s compiled against 1.07 s eager
    (H200, 13021df). On a CPU, in seconds-long test runs, it never pays; several ranks (DDP, FSDP2) compiled
    have not run on a GPU here yet."""
    if setting == "auto":
        return device.type == "cuda" and world_size == 1
    return bool(setting)


class CompiledBlocks(torch.nn.Module):
    """Calls `policy` with its repeated blocks (a transformers model's decoder layers) torch.compile'd.

    Compiling block by block rather than the whole model: the blocks run the same code, so dynamo compiles
    one block's forward and backward and every layer reuses them. Compiling a whole Qwen2-0.5B at once had
    not finished its first training step after 3 minutes on the H200 machine (2026-11-30). Dynamic shapes:
    micro-batches of every width share the graphs. The blocks are compiled only while this module runs, so
    every other call of `policy` (generation with a KV cache, the LoRA reference) stays eager. A model
    without known blocks (no `_no_split_modules`) is compiled whole.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        block_classes = {
            name for module in policy.modules() for name in (getattr(module, "_no_split_modules", None) or ())
        }
        # along the class's ancestry: FSDP2 makes each sharded layer an instance of a subclass of its own
        blocks = [
            module
            for module in policy.modules()
            if any(cls.__name__ in block_classes for cls in type(module).__mro__)
        ]
        # (block, its compiled forward): each wraps the block's own eager forward, captured here
        self.compiled = [(block, torch.compile(block.forward, dynamic=True)) for block in blocks]
        self.whole = None if blocks else torch.compile(policy, dynamic=True)
        log.info(
            "model.compile: %s",
            f"{len(blocks)} {type(blocks[0]).__name__} blocks, compiled once for all"
            if blocks
            else "no repeated blocks known (_no_split_modules), so the whole model",
        )

    def forward(self, *args, **kwargs):
        if self.whole is not None:
            return self.whole(*args, **kwargs)
        for block, compiled in self.compiled:
            block.forward = compiled  # an instance attribute: Module.__call__ now runs the compiled forward
        try:
            return self.policy(*args, **kwargs)
        finally:
            for block, _ in self.compiled:
                del block.forward  # the class's eager forward again


def load_trained_model(
    path: str, model_cfg: Any, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, str]:
    """(model in eval mode, path of its full-weight base) for scoring: a hub id, a full-weight directory
    (a checkpoint or an exported model/), or a LoRA adapter directory, loaded on top of the base model
    its adapter_config.json names. For full weights the base is `path` itself."""
    if (Path(path) / SHARDED).is_dir():
        raise ValueError(
            f"eval.model={path} is an FSDP2 checkpoint: its weights are shards in {SHARDED}/, which neither "
            "transformers nor vLLM read. Score the run's exported model/ instead (eval.model=<run dir>/model), or "
            "resume the run under FSDP2 to its end, which exports one"
        )
    adapter_config = Path(path) / "adapter_config.json"
    base_path = (
        json.loads(adapter_config.read_text())["base_model_name_or_path"] if adapter_config.exists() else path
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        dtype=dtype,
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if adapter_config.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    return model.to(device).eval(), base_path


def disable_dropout(model: torch.nn.Module) -> None:
    """Make training forwards the same function the engine sampled from: dropout would make the
    on-policy ratio differ from 1 and blur the trainer-vs-engine log-prob check."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def add_lora(model: torch.nn.Module, lora_cfg: Any) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(lora_cfg.target_modules) - module_names)
    if missing:
        linear_names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ValueError(
            f"model.lora.target_modules has {missing}, which this model does not have. "
            f"Its linear layers are {linear_names}: e.g. model.lora.target_modules=[q_proj,v_proj]"
        )
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input under LoRA
    return get_peft_model(model, config)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy for a full fine-tune: the initial weights, frozen."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]
