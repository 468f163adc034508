# llmft: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PORT ?= 3000
HOST ?= 127.0.0.1
export LLMFT_HOME ?= $(CURDIR)/.llmft
export DAGSTER_HOME ?= $(LLMFT_HOME)/dagster_home
# BentoML's build looks for uv on PATH (and tries to install it otherwise): the venv has it.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export BENTOML_HOME ?= $(LLMFT_HOME)/bentoml

.PHONY: install demo test test-fast lint format ui check-defs serve benchmarks gpu-suite clean constraints

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: install
	mkdir -p $(DAGSTER_HOME)
	$(PY) -m llmft_assets.demo

test: install
	# The tests use their own temporary homes (llmft_assets_tests/conftest.py) and fail if .llmft/ changes.
	bash scripts/ensure_postgres.sh
	bash scripts/ensure_chromium.sh
	$(BIN)/pytest -ra

test-fast: install
	$(BIN)/pytest -ra -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: install
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml -h $(HOST) -p 3001

check-defs: install
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dg check defs

serve: install
	$(BIN)/bentoml serve bentos.service:LLMChatService --host $(HOST) --port $(PORT)

benchmarks: install
	$(PY) benchmarks/data_pipeline.py --quick
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/drift.py
	$(PY) benchmarks/eval_generation.py

# On a CUDA machine (vLLM parts: LLMFT_VLLM_PYTHON or .venv-serve with bentos/requirements-gpu.txt).
gpu-suite: install
	PYTHON=$(PY) benchmarks/gpu_suite.sh

constraints: install
	$(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > constraints.txt

clean:
	rm -rf $(LLMFT_HOME)
