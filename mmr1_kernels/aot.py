"""Ahead-of-time compilation of the Triton kernels, with no GPU attached.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the
whole Triton -> PTX -> cubin pipeline for a given architecture on any machine;
the cubin's resource usage is then read with the ``cuobjdump`` that ships in
the triton wheel (the system ptxas of CUDA 13.0 cannot read the PTX 9.x that
recent triton emits for sm_90; the wheel's own tools can). STACK or LOCAL > 0
means register spills / local-memory arrays: the kernels are tuned so both are 0.

Used by tests/test_aot.py and ``python -m mmr1_kernels.aot`` (prints a table).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from .gpu.specs import KernelSpec  # noqa: E402

ARCHS = (80, 90)


@dataclass(frozen=True)
class ResourceUsage:
    registers: int
    stack: int
    shared: int
    local: int


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_cubin(spec: KernelSpec, cc: int) -> bytes:
    sig = dict(spec.signature)
    for k in spec.constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.num_warps})
    return compiled.asm["cubin"]


def resource_usage(cubin: bytes) -> ResourceUsage:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    fields = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump output has no {key} field:\n{out}")
        fields[key] = int(m.group(1))
    return ResourceUsage(fields["REG"], fields["STACK"], fields["SHARED"], fields["LOCAL"])


def all_specs():
    """Every kernel configuration the launchers use (the AOT test compiles each for sm_80 and sm_90)."""
    from .gpu import advantages, attention, logprob

    specs = list(logprob.aot_specs()) + list(advantages.aot_specs()) + list(attention.aot_specs())
    try:
        from .gpu import sampler
    except ImportError:
        return specs
    return specs + list(sampler.aot_specs())


def main() -> None:
    import json
    import sys

    rows = []
    for spec in all_specs():
        for cc in ARCHS:
            u = resource_usage(compile_cubin(spec, cc))
            rows.append(dict(kernel=spec.name, sm=cc, registers=u.registers, stack=u.stack, local=u.local,
                             shared=u.shared))
    if "--json" in sys.argv:
        print(json.dumps(rows))
        return
    print(f"{'kernel':50s} {'sm':>4s} {'regs':>5s} {'stack':>6s} {'local':>6s} {'smem':>7s}")
    for r in rows:
        print(f"{r['kernel']:50s} {r['sm']:>4d} {r['registers']:>5d} {r['stack']:>6d} {r['local']:>6d} {r['shared']:>7d}")


if __name__ == "__main__":
    main()
