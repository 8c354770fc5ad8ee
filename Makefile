# Both entry points bootstrap .venv themselves: a fresh machine needs only Python 3.11+ and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/redlb demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint browser
	$(BIN)/pytest -q -p no:cacheprovider

# The dashboard test drives Debian's chromium + chromium-driver; installed here when missing.
browser: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| $(BIN)/python tests/browser.py

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/idle_memory.py

clean:
	rm -rf $(VENV) .redlb .mypy_cache .ruff_cache .pytest_cache
