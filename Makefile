# The two commands of the README. Both create .venv when it is missing and install prunelab into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench-core

demo: $(VENV)/.installed
	$(BIN)/prunelab run

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@
