"""The server engine (`vllm=server`): the stock vLLM OpenAI server started by `make serve`, its completions API
and its native weight-transfer API (vllm_server.py), the check that trainer and servers use different GPUs
(gpu_guard.py), and rank 0 speaking for every rank when several train (main_rank.py)."""
