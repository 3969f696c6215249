"""Shared test helpers: backends, the C++ requirement, the tolerance report."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The suite needs the C++ kernels: without them every "C++" case would compare the reference with itself. A missing
# or unloadable extension is an ImportError here (MMR1_REQUIRE_CPP=0 opts out, for a pure-Python install).
os.environ.setdefault("MMR1_REQUIRE_CPP", "1")
# Without a GPU the Triton kernels run on CPU tensors through the interpreter.
# triton decides at @triton.jit time, so this must precede every kernel import.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs `-n 2`: one worker per core) each worker computes on one thread: two workers
# with two threads each would contend for the two cores. The processes the tests start (torchrun jobs, the CLI, the
# GPU check's dry run) inherit OMP_NUM_THREADS=1 for the same reason: with the other worker busy, a second OpenMP
# thread spins at every barrier (the dry run took 70 CPU-s in the suite, 47 with this).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

import mmr1_kernels  # noqa: E402,F401  (registers the ops)
from mmr1_kernels._library import HAS_CPP, HAS_TRITON  # noqa: E402

# Tolerances: tests/tolerance.py derives them per element from error analysis; the oracle is tests/oracle.py.


requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built (pip install --no-build-isolation -e .)")


def _triton_version():
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def triton_device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def triton_kernels():
    """The Triton launchers, runnable here: on the GPU, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    if not ON_GPU and _triton_version() < (3, 7):
        # triton 3.6's interpreter fails on the kernels' range(0, W, BLOCK) loops ("only 0-dimensional arrays can
        # be converted to Python scalars"); 3.9 is what these tests run with. On a GPU every version compiles them.
        pytest.skip(f"triton {_triton_version()}'s interpreter cannot run these kernels (use triton >= 3.9 on CPU)")
    from mmr1_kernels.gpu import advantages, attention, logprob

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy: -inf - -inf in masked lanes
        yield type("TritonKernels", (), {"logprob": logprob, "advantages": advantages, "attention": attention})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def torchrun_scenarios(tmp_path_factory):
    """tests/torchrun_scenarios.py (every two-process scenario of the trainer and Janus tests) under `torchrun
    --nproc-per-node 2`, launched once per session however many tests and xdist workers ask (a file lock in the
    session's shared temporary directory: the pattern pytest-xdist documents for once-per-session fixtures).
    Returns ``scenario(name) -> Path``, that scenario's output directory; a scenario that did not finish fails the
    asking test with the launch's exit code and stderr."""
    import json
    import subprocess
    from pathlib import Path

    from filelock import FileLock

    from soak import torchrun_command

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "torchrun_scenarios"
    here = Path(__file__).resolve().parent
    with FileLock(str(shared / "torchrun_scenarios.lock")):
        if not (root / "launch.json").exists():
            root.mkdir(exist_ok=True)
            try:
                out = subprocess.run(torchrun_command(str(here / "torchrun_scenarios.py"), str(root), str(here)),
                                     capture_output=True, text=True, timeout=900,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
                rc, err = out.returncode, out.stderr
            except subprocess.TimeoutExpired as timeout:  # recorded once: the other tests fail at once, not after 900 s
                rc, err = "timed out after 900 s", (timeout.stderr or b"").decode(errors="replace")
            (root / "launch.json").write_text(json.dumps({"rc": rc, "stderr": err[-6000:]}))
    launch = json.loads((root / "launch.json").read_text())

    def scenario(name: str) -> Path:
        if not (root / name / "done").exists():
            pytest.fail(f"tests/torchrun_scenarios.py did not finish scenario {name!r} (torchrun exit {launch['rc']}):"
                        f"\n{launch['stderr']}", pytrace=False)
        return root / name

    return scenario


def pytest_collection_modifyitems(config, items):
    """The slow tests first (the order is otherwise kept): with `make test`'s --maxschedchunk 1, pytest-xdist hands
    out one test at a time to whichever worker is free, so the longest start first and the short ones fill in.
    (With xdist's default chunks one worker was left with the slow tests queued, running them one after another
    for minutes after the other had finished: pytest 252 s -> 222 s here, the same CPU time.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_terminal_summary(terminalreporter):
    """MMR1_TOLERANCE_REPORT=1: the worst observed error / tolerance of every error-analysis check (tests/tolerance.py)."""
    if os.environ.get("MMR1_TOLERANCE_REPORT") == "1":
        import tolerance

        terminalreporter.write_line("tolerances (worst error / tolerance; 1 = at the limit):")
        terminalreporter.write_line(tolerance.report())
