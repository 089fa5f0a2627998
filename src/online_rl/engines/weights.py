"""The trainer's weights as an inference engine wants them: full tensors under the checkpoint's names."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from online_rl.distributed import full_tensors
from online_rl.models import is_lora

PEFT_PREFIX = "base_model.model."
BASE_WEIGHT_SUFFIX = ".base_layer.weight"


def inference_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs named as in the model's checkpoint, one at a time.

    Full fine-tune: the parameters themselves, no copy (FSDP2: each gathered in full, one at a time). LoRA: each adapted weight is W + scale * B A,
    computed out of place. The base weights are never merged into and unmerged from: that round trip
    is not exact in floating point, and repeated every step it would drift the frozen base.
    """
    if not is_lora(model):
        yield from full_tensors((name, param.detach()) for name, param in model.named_parameters())
        return
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        tensor = param.detach()
        if name.endswith(BASE_WEIGHT_SUFFIX):
            layer = modules[name.removesuffix(BASE_WEIGHT_SUFFIX)]
            with torch.no_grad():
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield name.removeprefix(PEFT_PREFIX).replace(".base_layer", ""), tensor


def inference_weight_specs(model: torch.nn.Module) -> Iterator[tuple[str, torch.dtype, torch.Size]]:
    """(name, dtype, shape) of what inference_weights yields, in its order, without computing any of it:
    no LoRA merge, no FSDP2 gather (a sharded parameter reports its full shape)."""
    lora = is_lora(model)
    for name, param in model.named_parameters():
        if lora:
            if "lora_" in name:
                continue
            name = name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        yield name, param.dtype, param.shape
