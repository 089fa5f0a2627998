# make help lists the targets. PYTHON picks the interpreter (a virtualenv's python, say).
PYTHON ?= python
TORCH_CPU ?= 2.13.0
TORCH_GPU ?= 2.11.0

.DEFAULT_GOAL := help
.PHONY: help install install-gpu test test-gpu train lint format

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## CPU install: torch (pinned CPU wheel), the project and its test tools
	$(PYTHON) -m pip install "torch==$(TORCH_CPU)"
	$(PYTHON) -m pip install -e ".[dev]"

install-gpu:  ## GPU install: torch (pinned CUDA build, the H200 image's), the project and its test tools
	$(PYTHON) -m pip install "torch==$(TORCH_GPU)"
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## CPU tests (the default markers: not gpu, not slow)
	$(PYTHON) -m pytest

test-gpu:  ## GPU tests (needs a CUDA GPU)
	$(PYTHON) -m pytest -m gpu

train:  ## the quickstart; pass Hydra overrides with ARGS="algo.beta=0.04 max_steps=50"
	$(PYTHON) train.py $(ARGS)

lint:  ## ruff: lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## ruff: fix what it can and format
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
