# Two commands on a fresh machine: `make repro` (whole pipeline) and `make test`.
PYTHON ?= python3.11
# requirements.lock pins torch==2.13.0+cpu, which only PyTorch's index serves (as in the Dockerfile).
# For CUDA: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cu124` (and a +cu124 pin).
# An empty TORCH_INDEX (as .ci/run sets it) uses only pip's configured indexes and find-links.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
VENV := .venv
BIN := $(VENV)/bin
# The venv's bin first on PATH: DVC runs `regflow`, MLflow starts `uvicorn` by name.
VENV_PATH := PATH=$(CURDIR)/$(BIN):$$PATH
# `make serve`: the registered champion on http://$(HOST):$(PORT)/invocations
MODEL ?= models:/regflow@champion
HOST ?= 127.0.0.1
PORT ?= 5001
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup repro serve test test-slow lint bench bench-accuracy results

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_INDEX_ARG) -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

repro: setup
	$(VENV_PATH) $(BIN)/dvc repro

# `regflow serve`: MLflow's scoring app for $(MODEL) under uvicorn, admission control, workers that end with it
serve: setup
	$(VENV_PATH) $(BIN)/regflow serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check regflow tests benchmarks
	$(BIN)/hadolint Dockerfile

bench: setup
	$(BIN)/python -m benchmarks.core --results benchmarks/results/speed.json

bench-accuracy: setup
	$(BIN)/python -m benchmarks.accuracy

# docs/results.md and the README's results summary from the committed benchmarks/results/*.json
results: setup
	$(BIN)/python -m benchmarks.results
