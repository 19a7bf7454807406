# sd35hub — the two Quickstart commands are `make demo` and `make test`.
#
# Choosing torch: the venv gets $(TORCH) installed first (default torch==2.13.0, which on the
# project's build machines is a local CPU wheel and elsewhere PyPI's CUDA build). Pick another with
#   make demo TORCH="torch==2.5.1" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
# or point VENV at an environment that already has the torch you want.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test test-slow test-all lint format space venv dev clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH)"
	touch $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

# The dev/test environment is the one the Space pins (space/requirements.txt), so tests run with the
# tested versions; torch stays whatever $(TORCH) chose.
$(VENV)/.dev: pyproject.toml space/requirements.txt $(VENV)/.torch
	grep -v '^torch==' space/requirements.txt > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev,space]"
	touch $@ $(VENV)/.runtime

venv: $(VENV)/.runtime
dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/sd35hub demo --output demo-output

# `make test`: the fast set (everything not marked slow; a few minutes on 2 cores), the 15 slowest printed.
# `make test-slow`: only the tests marked slow (DDP launches, the notebook, the Space's browser sessions).
# `make test-all`: both in one pytest run. CI (.ci/run) runs `make test` and then `make test-slow`.
test: $(VENV)/.dev
	$(BIN)/python -m pytest -m "not slow" --durations=15 $(PYTEST_ARGS)

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow --durations=15 $(PYTEST_ARGS)

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check sd35hub tests space benchmarks

format: $(VENV)/.dev
	$(BIN)/ruff format sd35hub tests space benchmarks

space: $(VENV)/.dev
	$(BIN)/streamlit run space/app.py --server.headless true --server.address 127.0.0.1 --browser.gatherUsageStats false

bench: $(VENV)/.runtime
	$(BIN)/sd35hub bench --model tiny

clean:
	rm -rf $(VENV) demo-output .pytest_cache
