# Two commands on a fresh machine: `make repro` (whole pipeline) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup repro test test-slow lint bench bench-accuracy

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check regflow tests benchmarks
	$(BIN)/hadolint Dockerfile

bench: setup
	$(BIN)/python -m benchmarks.core

bench-accuracy: setup
	$(BIN)/python -m benchmarks.accuracy
