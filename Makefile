# Set-up installs the CPU torch pin first so that resolving `torch>=2.1` installs nothing more
# (on machines with a local CPU wheel this avoids the multi-GB CUDA build). A GPU user can pass
# TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu124' or install torch first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/quickstart

.PHONY: demo test test-fast setup lint format clean screenshots docs
SOURCES := ddrs tests benchmarks experiments examples conftest.py

$(BIN)/ddrs: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/ddrs

setup: $(BIN)/ddrs

demo: setup
	$(BIN)/ddrs quickstart --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

# the edit-test loop: everything but the end-to-end runs (marked slow) and the README's blocks
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# the page's screenshots in docs/, taken by the browser tests (needs Debian's chromium)
screenshots: setup
	DDRS_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_page.py

# the API reference from the docstrings (pdoc), warnings as errors
docs: setup
	$(BIN)/python -W error -m pdoc ddrs -o docs/api

# one formatter (ruff format) and one linter; CI runs `make lint` after the tests
lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

format: setup
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

clean:
	rm -rf $(VENV) runs .pytest_cache
