# The two commands of the README. Both create .venv when it is missing and install prunelab into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint browser

demo: $(VENV)/.installed
	$(BIN)/prunelab run

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -n 2 -q

# The HTML report is tested in a real headless browser: Debian's chromium, installed when missing
# and possible (root with apt-get, as on CI); otherwise that one test is skipped with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 \
	  && apt-get install -y -q chromium >/dev/null 2>&1; }; } } \
	  || echo "note: chromium is not installed; the report's browser test will be skipped"

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks scripts

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@
