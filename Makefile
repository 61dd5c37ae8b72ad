# Set-up installs the CPU torch pin first so that resolving `torch>=2.1` installs nothing more
# (on machines with a local CPU wheel this avoids the multi-GB CUDA build). A GPU user can pass
# TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu124' or install torch first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/quickstart

.PHONY: demo test setup lint bench clean screenshots docs

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

# the page's screenshots in docs/, taken by the browser tests (needs Debian's chromium)
screenshots: setup
	DDRS_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_page.py

# the API reference from the docstrings (pdoc), warnings as errors
docs: setup
	$(BIN)/python -W error -m pdoc ddrs -o docs/api

lint: setup
	$(BIN)/ruff check ddrs tests benchmarks experiments examples conftest.py

clean:
	rm -rf $(VENV) runs .pytest_cache
