# `make test` works on a fresh machine: it creates .venv, installs everything
# (torch pinned to the CPU wheel; override TORCH_SPEC for a CUDA build), builds
# the C++ extension and runs the whole test suite (slow cases included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
DEPS := triton transformers safetensors tokenizers tqdm numpy pillow pytest pytest-benchmark hypothesis ninja cmake matplotlib
BENCH_DEPS := liger-kernel trl

.PHONY: venv build test test-fast demo cold-start bench bench-quick bench-pytest clean

$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(DEPS)
	touch $@

venv: $(VENV)/.installed

$(VENV)/.peers: $(VENV)/.installed
	$(PIP) install -q $(BENCH_DEPS) "$(TORCH_SPEC)"
	touch $@

build: venv
	$(PIP) install -q --no-build-isolation -e .

demo: build
	$(PY) -m mmr1.demo

# rebuild the demo's shipped world + cold-start weights (mmr1/assets/demo): ~15 min on 2 cores
cold-start: build
	$(PY) -m mmr1.cli sft --out-dir runs/cold_start
	rm -rf mmr1/assets/demo && mkdir -p mmr1/assets/demo
	cp -r runs/cold_start/world runs/cold_start/cold_start runs/cold_start/manifest.json mmr1/assets/demo/

test: build
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

bench: build $(VENV)/.peers
	$(PY) -m bench

bench-quick: build $(VENV)/.peers
	$(PY) -m bench --quick

bench-pytest: build $(VENV)/.peers
	$(PY) -m pytest bench/test_kernels_benchmark.py --benchmark-enable --benchmark-only

clean:
	rm -rf build *.egg-info mmr1_kernels/_C*.so
