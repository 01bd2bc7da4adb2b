# `make demo` runs the walkthrough, `make test` the checks; both create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned torch first (an unpinned one would pull a multi-GB CUDA build); where pip has no
	# local CPU wheel of it, install the CPU build beforehand as README says.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check producer workers tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: install
	$(BIN)/memfleet demo

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
