# One-command set-up: `make train` (the main job) and `make test` (the test suite) create or reuse
# the virtual environment .venv and install what they need.
#
# torch is installed first, on its own, as TORCH_SPEC: on a CPU-only machine with a local CPU wheel
# `torch==2.13.0` resolves to it (never to the multi-GB CUDA wheels); on a GPU machine set
# TORCH_SPEC to the CUDA build you want.

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/cpu-tiny.toml
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,peers]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/moesys train --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) runs build *.egg-info
