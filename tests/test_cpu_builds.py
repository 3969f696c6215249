"""The C++ extension's code paths that the default build on this machine does not run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmr1_kernels as K

import oracle as O

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_baseline_avx2_build_passes_the_cpu_kernel_tests(tmp_path):
    """On an AVX-512 host the ifunc picks the x86-64-v4 clones, so the AVX2 baseline never runs. Build the extension
    with -DMMR1_NO_MULTIVERSION=ON (baseline only; no zmm register in the library), then run the C++ kernel tests
    against that build."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("x86-64 Linux only")
    bin_dir = Path(sys.executable).parent
    cmake = shutil.which("cmake", path=str(bin_dir)) or shutil.which("cmake")
    ninja = shutil.which("ninja", path=str(bin_dir)) or shutil.which("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake / ninja not found")
    pkg = tmp_path / "mmr1_kernels"
    shutil.copytree(ROOT / "mmr1_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    build = tmp_path / "build"
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DMMR1_NO_MULTIVERSION=ON",
                          f"-DMMR1_OUTPUT_DIR={pkg}"], capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    made = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-3000:]
    (lib,) = pkg.glob("_C*.so")
    dis = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, timeout=300)
    if dis.returncode == 0:
        assert "%zmm" not in dis.stdout, "the baseline build still contains AVX-512 code"
        assert "%ymm" in dis.stdout, "the baseline build should use AVX2 (ymm) registers"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MMR1_REQUIRE_CPP": "1", "TRITON_INTERPRET": "0"}
    # the kernels' numerics and errors; not the torch.compile / opcheck plumbing (the same on every build)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                          "not triton and not compile and not inductor and not opcheck",
                          "tests/test_logprob.py", "tests/test_sampler.py", "tests/test_advantages.py",
                          "tests/test_reference_oracle.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_gradient_buffers_of_a_mebibyte_and_more_are_fresh_zero_pages():
    """zeros_untouched maps buffers >= 1 MiB straight from the kernel (untouched zero pages) and allocates smaller
    ones normally; both are zeros, writable, and freed -- and a fused-linear weight gradient that large (here
    [8192, 64] fp32 = 2 MiB) is still right where it is written and exactly 0 outside the vocab window."""
    from mmr1_kernels._library import op

    for numel in (1000, (1 << 20) // 4, (3 << 20) // 4 + 7):
        z = op("zeros_untouched")(torch.empty(0), [numel], torch.float32)
        assert z.shape == (numel,) and bool((z == 0).all())
        z[::4097] = 1.0
        assert float(z.sum()) == len(range(0, numel, 4097))
    g = torch.Generator().manual_seed(0)
    V, d, lo, hi = 8192, 64, 100, 4100
    hidden = torch.randn(3, 5, d, generator=g)
    weight = torch.randn(V, d, generator=g) / 8
    targets = torch.randint(lo, hi, (3, 5), generator=g)
    w = weight.clone().requires_grad_(True)
    K.fused_linear_logprobs(hidden, w, targets, 1.0, (lo, hi)).sum().backward()
    _, want = O.grad(lambda ww: O.logprobs(hidden.double() @ ww.T, targets, 1.0, lo, hi).sum(), weight)
    assert w.grad.numel() * 4 >= 1 << 20
    assert bool((w.grad[:lo] == 0).all()) and bool((w.grad[hi:] == 0).all())
    torch.testing.assert_close(w.grad.double(), want, atol=1e-5, rtol=1e-4)
