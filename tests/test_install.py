"""mmr1 installs as a dependency: the wheel holds only the project's packages, installs next to an existing torch
and runs an op from outside the checkout; pip's default (isolated) build stops at once with the command to run."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _pip(*args, cwd=ROOT, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_wheel_holds_the_packages_and_runs_an_op_outside_the_checkout(tmp_path):
    out = _pip("wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "dist"), ".")
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("mmr1-*.whl"))
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {"mmr1", "mmr1_kernels"} <= top and not top & {"bench", "tests"}, top
    assert any(n.startswith("mmr1_kernels/_C") for n in zipfile.ZipFile(wheel).namelist())  # the compiled kernels
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    requires = [ln for ln in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if ln.startswith("Requires-Dist")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: torch>=2.4"], requires
    # installed into a directory of its own, next to this interpreter's torch, run from elsewhere
    target = tmp_path / "site"
    out = _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel))
    assert out.returncode == 0, out.stderr[-3000:]
    code = ("import sys, torch, mmr1_kernels as K\n"
            "assert mmr1_kernels_file.startswith(sys.argv[1]), mmr1_kernels_file\n"
            "assert K.HAS_CPP and 'transformers' not in sys.modules\n"
            "z = torch.randn(4, 50); t = torch.randint(0, 50, (4,))\n"
            "lp = K.token_logprobs(z[None], t[None])[0]\n"
            "assert torch.allclose(lp, torch.log_softmax(z, -1).gather(1, t[:, None])[:, 0], atol=1e-5)\n"
            "print('ok')\n").replace("mmr1_kernels_file", "K.__file__")
    env = {**os.environ, "PYTHONPATH": str(target), "MMR1_REQUIRE_CPP": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_an_isolated_build_stops_at_once_with_the_command_to_run(tmp_path):
    out = _pip("wheel", "--no-deps", "-w", str(tmp_path), ".", timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "pip install --no-build-isolation" in log, log[-3000:]
    assert "Collecting torch" not in log and "Downloading torch" not in log, log[-3000:]  # no torch fetched
