"""`vllm.separate_process=true`: the trainer's weights reach a vLLM engine that runs in a process of its own,
on the same device, through one block of memory both processes map.

    trainer process                                   vLLM's engine process (worker)
    SharedWeightBuffer.push(model):
      copy a bucket of weights into the block  ->
      wait for the copies, then call ------------->   SharedWeightsWorker.load_shared_weights(layout):
                                                        load the bucket's views into vLLM's model,
      next bucket, once the call has returned  <----    wait for the copies, return

On a GPU the block is a CUDA tensor shared by a CUDA IPC handle; on a CPU, a file in shared memory. The
block is mapped once, at the first push; each push sends only the bucket's layout (names, dtypes, shapes,
offsets). The block holds at most `bucket_bytes` (or the largest single weight), in vLLM's dtype. With
several engine processes (`vllm.engine_processes`) every one maps the same block: each bucket is copied once,
then loaded by all of them at the same time.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass

import torch

from online_rl.engines.weights import inference_weight_specs, inference_weights

ALIGNMENT = 256  # bytes: every view starts aligned for any dtype


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes into the block

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * getattr(torch, self.dtype).itemsize


def plan_buckets(specs, dtype: torch.dtype, bucket_bytes: int) -> tuple[list[list[Slot]], int]:
    """The weights (name, dtype, shape), in order, cut into buckets of at most bucket_bytes (a larger weight
    gets a bucket of its own); and the block's size in bytes, that of the largest bucket. Floating-point
    weights travel in `dtype` (vLLM's), others as they are."""
    buckets: list[list[Slot]] = [[]]
    block, offset = 0, 0
    for name, weight_dtype, shape in specs:
        travel = dtype if weight_dtype.is_floating_point else weight_dtype
        slot = Slot(name, str(travel).removeprefix("torch."), tuple(shape), 0)
        if offset and offset + slot.nbytes > bucket_bytes:
            buckets.append([])
            offset = 0
        buckets[-1].append(Slot(slot.name, slot.dtype, slot.shape, offset))
        offset = -(-(offset + slot.nbytes) // ALIGNMENT) * ALIGNMENT
        block = max(block, offset)
    return buckets, block


def slot_view(block: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The slot's weight inside the block (a uint8 tensor), as its dtype and shape: no copy."""
    return block[slot.offset : slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)


class SharedWeightBuffer:
    """The trainer's side: a block of `bucket_bytes` on its device, mapped by every engine's worker at the first
    push, through which every push sends the model's weights one bucket at a time."""

    def __init__(self, each_engine: Callable, device: torch.device, dtype: torch.dtype, bucket_bytes: int):
        # each_engine(call): call(llm) for every engine (VLLMColocateEngine.each), all at once when several
        self.each_engine, self.device, self.dtype = each_engine, device, dtype
        # On a CPU every weight goes in one bucket: vLLM's reload there repacks the whole model after loading.
        self.bucket_bytes = bucket_bytes if device.type == "cuda" else float("inf")
        self.buckets: list[list[Slot]] | None = None
        self.block: torch.Tensor | None = None
        self.path: str | None = None  # the shared-memory file of a CPU block

    def push(self, model: torch.nn.Module) -> None:
        if self.buckets is None:
            self.attach(model)
        weights = inference_weights(model)
        for bucket in self.buckets:
            for slot in bucket:
                name, tensor = next(weights)
                if name != slot.name:
                    raise RuntimeError(
                        f"the weights changed since they were laid out: {name} where {slot.name} was"
                    )
                slot_view(self.block, slot).copy_(tensor)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the worker reads the block from another process
            # as plain tuples: vLLM's RPC between processes carries only built-in types
            self.call_workers("load_shared_weights", [astuple(slot) for slot in bucket])

    def attach(self, model: torch.nn.Module) -> None:
        self.buckets, size = plan_buckets(inference_weight_specs(model), self.dtype, self.bucket_bytes)
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            self.block = torch.empty(size, dtype=torch.uint8, device=self.device)
            handle = ("cuda", reduce_tensor(self.block)[1])  # the arguments of rebuild_cuda_tensor
        else:
            descriptor, self.path = tempfile.mkstemp(prefix="online-rl-weights-", dir=shared_memory_dir())
            os.close(descriptor)
            self.block = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
            handle = ("file", self.path, size)
        self.call_workers("attach_shared_weights", pickle.dumps(handle))

    def call_workers(self, method: str, argument) -> None:
        """method(argument) in every engine's worker."""
        self.each_engine(lambda llm: llm.collective_rpc(method, args=(argument,)))

    def close(self) -> None:
        self.block = None
        if self.path is not None:
            os.unlink(self.path)
            self.path = None


def shared_memory_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class SharedWeightsWorker:
    """The engine process's side, mixed into vLLM's worker (`worker_extension_cls`): maps the trainer's block
    once, then loads each bucket of weights from it into vLLM's model."""

    def attach_shared_weights(self, handle: bytes) -> None:
        kind, *details = pickle.loads(handle)  # from the trainer, which started this process
        if kind == "cuda":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            arguments = list(details[0])
            arguments[6] = torch.cuda.current_device()  # the same GPU, by this process's numbering
            self.shared_weight_block = rebuild_cuda_tensor(*arguments)
        else:
            path, size = details
            self.shared_weight_block = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)

    def load_shared_weights(self, bucket: list[tuple]) -> None:
        block = self.shared_weight_block
        slots = [Slot(name, dtype, tuple(shape), offset) for name, dtype, shape, offset in bucket]
        weights: Iterator[tuple[str, torch.Tensor]] = ((slot.name, slot_view(block, slot)) for slot in slots)
        if block.is_cuda:
            self.model_runner.model.load_weights(weights)
            # the trainer writes the next bucket into the block as soon as this returns
            torch.cuda.synchronize(block.device)
        else:
            # on a CPU vLLM repacks linear weights for oneDNN after loading, which only reload_weights redoes
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
