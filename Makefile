# Setup and the two entry points of the README: `make demo` and `make test`.
# torch is pinned here (the CPU build on this machine's disk); pyproject keeps a loose floor.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
EXTRAS := dev,triton,hls,mlir
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rewriter demo

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check rewriter passes backends kernels tests examples benchmarks

clean:
	rm -rf $(VENV) out build dist *.egg-info
