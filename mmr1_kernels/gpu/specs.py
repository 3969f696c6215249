"""What a Triton kernel's ahead-of-time compile needs: its signature and constexprs (mmr1_kernels.aot compiles them).

Each kernel module (gpu/*.py) lists its launch configurations with ``aot_specs()`` yielding KernelSpecs;
mmr1_kernels.aot imports the kernel modules and compiles every spec for sm_80 / sm_90. This module imports
nothing of the package, so the dependency runs one way: aot -> gpu kernels -> specs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class KernelSpec:
    """One compile configuration of a kernel: pointer/scalar signature + constexpr values."""

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int


__all__ = ["KernelSpec"]
