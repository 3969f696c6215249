"""Build and install mmr1 + mmr1_kernels.

The C++ CPU kernels are compiled by CMake (Ninja generator) into
``mmr1_kernels/_C.so``. Install with::

    pip install --no-build-isolation -e .

(--no-build-isolation so the extension is built against the torch that is
already installed, not a fresh one pulled into an isolated build env.)
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # noqa: F401  (build requires the installed torch)
        import torch.utils

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
    packages=find_packages(include=["mmr1*", "mmr1_kernels*", "bench*"]),
    # the demo's shipped world + cold-start weights (`make cold-start` rebuilds them)
    package_data={"mmr1": ["assets/demo/*.json", "assets/demo/*/*.json", "assets/demo/*/*.safetensors"]},
    ext_modules=[CMakeExtension("mmr1_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["mmr1=mmr1.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tokenizers", "transformers", "tqdm"],
    extras_require={
        "gpu": ["triton", "flash-attn"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "triton"],
        "bench": ["liger-kernel", "trl", "matplotlib"],
    },
)
