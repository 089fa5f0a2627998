"""The hosted engine (`vllm.separate_process=true`): vLLM's whole engine in a process of its own on the
trainer's GPU (engine_host.py), the trainer's weights copied into memory both processes map (shared_weights.py),
and CUDA's Multi-Process Service settings that let the two processes' kernels run side by side (mps.py)."""
