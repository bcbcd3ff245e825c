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

# Two pytest workers (one torch thread each), test files kept together per worker: most of the
# suite is single-threaded Python (tracing, export), so this cut the wall time by about 30%.
# The Triton kernel tests run in a second process with TRITON_INTERPRET=1 set before anything
# imports a kernel (Triton reads the flag when a kernel is decorated; the flag would also change
# how the main suite runs).
WORKERS ?= 2
test: $(STAMP)
	REWRITER_TEST_THREADS=1 $(PY) -m pytest -p no:cacheprovider -n $(WORKERS) --dist loadfile --durations=15 --ignore=tests/triton $(PYTEST_ARGS)
	TRITON_INTERPRET=1 REWRITER_TEST_THREADS=1 $(PY) -m pytest -p no:cacheprovider tests/triton

lint: $(STAMP)
	$(VENV)/bin/ruff check rewriter passes backends kernels tests examples benchmarks

clean:
	rm -rf $(VENV) out build dist *.egg-info
