# `make test` works on a fresh machine: it creates .venv, installs everything
# (torch pinned to the CPU wheel; override TORCH_SPEC for a CUDA build), builds
# the C++ extension and runs the whole test suite (slow cases included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
# TRL is pinned: tests/test_trl_parity.py checks mmr1_kernels.policy_loss against this release's GRPOTrainer code
TRL_SPEC ?= trl>=1.16,<1.17
DEPS := triton transformers safetensors tokenizers tqdm numpy pillow pytest pytest-benchmark pytest-xdist hypothesis ninja cmake matplotlib "$(TRL_SPEC)"
BENCH_DEPS := liger-kernel "$(TRL_SPEC)"

.PHONY: venv build test test-fast demo cold-start ablation mutants bench bench-quick bench-pytest gpu-check clean

# pip byte-compiles every installed module (22 of the install's 43 CPU-s here). Keep it: where PYTHONDONTWRITEBYTECODE
# is set (it is on the development machines) Python never caches a compiled module, and with `pip install --no-compile`
# every process of the suite compiled torch's modules again (measured: make test +150 CPU-s from a fresh clone).
$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(DEPS) "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.installed

$(VENV)/.peers: $(VENV)/.installed
	$(PIP) install -q $(BENCH_DEPS) "$(TORCH_SPEC)"
	touch $@

build: venv
	$(PIP) install -q --no-build-isolation -e .

demo: build
	$(PY) -m mmr1.world.demo

# rebuild the demo's shipped world + cold-start weights (mmr1/assets/demo); the manifest records how long it took
cold-start: build
	$(PY) -m mmr1.cli sft --out-dir runs/cold_start --eval-every 1000
	rm -rf mmr1/assets/demo && mkdir -p mmr1/assets/demo
	cp -r runs/cold_start/world runs/cold_start/cold_start runs/cold_start/manifest.json mmr1/assets/demo/

# planted bugs the suite must kill (tests/mutants.py): prints which survive; not part of `make test`
mutants: build
	MMR1_REQUIRE_CPP=1 $(PY) tests/mutants.py

# X-CoT vs direct (same model, cold-start and GRPO budgets); writes docs/ablation.{md,png,json}
ABLATION_ARGS ?=
ablation: build
	$(PY) -m mmr1.world.ablation $(ABLATION_ARGS)

# two workers (pytest-xdist), one per core, each on one thread (tests/conftest.py); the tolerance report needs a
# single process: MMR1_TOLERANCE_REPORT=1 $(PY) -m pytest -q tests. Tests go to the workers one at a time, the slow
# ones first (--maxschedchunk 1 and tests/conftest.py): xdist's default chunks left one worker running the slow tests
# one after another for minutes after the other had finished (pytest 252 s -> 222 s here, the same CPU time).
TEST_WORKERS ?= 2
PYTEST_XDIST := -n $(TEST_WORKERS) --maxschedchunk 1
test: build
	MMR1_REQUIRE_CPP=1 $(PY) -m pytest -q $(PYTEST_XDIST) tests

test-fast: build
	MMR1_REQUIRE_CPP=1 $(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow" tests

bench: build $(VENV)/.peers
	$(PY) -m bench

bench-quick: build $(VENV)/.peers
	$(PY) -m bench --quick

bench-pytest: build $(VENV)/.peers
	$(PY) -m pytest bench/test_kernels_benchmark.py --benchmark-enable --benchmark-only

# One prepared GPU run (bench/gpu_check.py) with the machine's own Python (no venv, no network):
#   make gpu-check                      on a CUDA machine: tests + benchmarks, results in runs/gpu-check and
#                                       bench/results/gpu.json (merged into BENCHMARKS.md by python -m bench --report)
#   make gpu-check GPU_CHECK_DRY=1      the same steps on CPU at tiny shapes (make test runs this)
# From a fresh copy on the GPU machine: OUT=<dir> bash bench/gpu_remote.sh
GPU_PYTHON ?= python3
ifeq ($(GPU_CHECK_DRY),1)
gpu-check: build
	$(PY) -m bench.gpu_check --dry
else
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check
endif

clean:
	rm -rf build *.egg-info mmr1_kernels/_C*.so
