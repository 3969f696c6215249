"""Build and install mmr1 + mmr1_kernels.

The C++ CPU kernels are compiled by CMake (Ninja generator) into
``mmr1_kernels/_C.so``. Install with::

    pip install --no-build-isolation -e .

(--no-build-isolation so the extension is built against the torch that is
already installed, not a fresh one pulled into an isolated build env.) A
plain ``pip install .`` (build isolation, pip's default) stops at once and
says so. ``pip install .`` installs the kernels (``mmr1_kernels``, needing
only torch) and the ``mmr1`` package; ``pip install .[mmr1]`` adds what the
model, tokenizers and trainers import (transformers, safetensors, ...).
The benchmarks (bench/) stay a folder of the repository, run from a checkout.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _torch_for_the_build():
    """The installed torch the extension will run with; without one (pip's isolated build environment, or torch not
    installed yet) a clear stop instead of a long build against the wrong torch."""
    try:
        import torch
        import torch.utils
    except ImportError:
        raise SystemExit(
            "mmr1: the C++ kernels are compiled against the torch they will run with, and this build environment "
            "has none (pip builds in an isolated environment by default).\n"
            "  1. install torch first, e.g.  pip install torch==2.13.0   (a CPU or CUDA build, as you will run it)\n"
            "  2. then build against it:     pip install --no-build-isolation <this directory or git URL>")
    return torch


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _torch_for_the_build()

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        # a persistent build directory per torch build and Python (pip builds in a fresh temporary directory each
        # time): an unchanged tree rebuilds nothing -- `make demo` / `make test` re-run this install every time
        tag = f"{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}".replace("+", "_")
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DMMR1_OUTPUT_DIR={out_dir}",
            f"-DMMR1_OUTPUT_FILE={out_path.name}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if "MMR1_CPU_ARCH_FLAGS" in os.environ:
            cmake_args.append(f"-DMMR1_CPU_ARCH_FLAGS={os.environ['MMR1_CPU_ARCH_FLAGS']}")
        subprocess.run(cmake_args, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)


setup(
    name="mmr1",
    version="0.1.0",
    description="Fused GRPO / CFG-sampling kernels and a lean MM-R1 implementation",
    packages=find_packages(include=["mmr1", "mmr1.*", "mmr1_kernels", "mmr1_kernels.*"]),
    # the demo's shipped world + cold-start weights (`make cold-start` rebuilds them)
    package_data={"mmr1": ["assets/demo/*.json", "assets/demo/*/*.json", "assets/demo/*/*.safetensors"]},
    ext_modules=[CMakeExtension("mmr1_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["mmr1=mmr1.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],  # what mmr1_kernels needs
    extras_require={
        "mmr1": ["numpy", "safetensors", "tokenizers", "transformers", "tqdm", "pillow"],
        "gpu": ["triton", "flash-attn"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "triton"],
        "bench": ["liger-kernel", "trl", "matplotlib"],
    },
)
