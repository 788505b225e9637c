# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment in .venv/ when it is missing or out of date (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and pinned, so that no other package can pull a CUDA build of it.
TORCH := torch==2.13.0

.PHONY: venv demo test test-slow lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dense,dev]"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

demo: $(STAMP)
	$(BIN)/python -m searchgym.demo

clean:
	rm -rf runs indexes .pytest_cache .ruff_cache
