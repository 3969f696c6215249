"""Shared benchmark machinery: timing, peak memory, the bandwidth floor, machine facts, tables.

Method (docs/kernel-semantics.md, "Benchmark method"): every provider of a case runs in the
same process, interleaved round-robin so slow drift of a noisy machine hits all
of them alike; we report the median of the repeats, the ratio of each peer's
median to ours, the peak extra memory of one call, and for memory-bound ops the
fraction of the bandwidth floor: bytes that must move / copy bandwidth measured
in the same run.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

# Where benchmark tensors and models live: the GPU (Triton kernels) when there is one, else the CPU (C++).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

RESULTS_DIR = Path(os.environ.get("MMR1_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))

# Process settings every benchmark runs under (set before torch starts threads or allocates):
BENCH_ENV = {
    # glibc keeps freed blocks below its (dynamically growing, up to 32 MiB)
    # mmap threshold in the heap, so RSS would miss the peak of any provider
    # whose temporaries fit in memory freed earlier. A fixed 64 KiB threshold
    # makes every tensor >= 64 KiB its own mapping: RSS-based peaks are exact,
    # and every provider pays first-touch page faults for its temporaries alike.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    # Inductor's parallel-compile worker pool keeps processes around that steal
    # one of the two cores from whatever is timed next.
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}


def ensure_bench_env(module: str) -> None:
    """Re-exec ``python -m module`` under BENCH_ENV unless it is already in effect."""
    import sys

    if all(os.environ.get(k) == v for k, v in BENCH_ENV.items()):
        return
    env = {**os.environ, **BENCH_ENV}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


# --------------------------------------------------------------------------- machine


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


_FROZEN = []


def _collect() -> None:
    """gc.collect() over the benchmark's own objects. The first call freezes what is alive then (torch, dynamo,
    transformers: ~10^6 long-lived objects) into gc's permanent generation: a full collection scanned them every
    time, 0.3 s per call on a 2-core machine (11 of the 23 s of ``bench.logprob --smoke``); now it takes
    milliseconds. Frozen objects are still freed by reference counting; they are unfrozen at exit (nanobind, under
    triton, reports every object still alive then as a leak)."""
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)
        _FROZEN.append(True)
    gc.collect()


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak memory one call of ``fn`` adds on top of what is live before it, in MiB.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process high-water mark
    (VmHWM) reset through /proc/self/clear_refs, minus the resident set before
    the call (the CPU allocator returns large blocks to the OS, so RSS tracks
    live tensors).
    """
    _collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM") - before
    del out
    _collect()
    return max(peak, 0) / 1024


# --------------------------------------------------------------------------- timing


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_providers(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                   budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Seconds per call for each provider, round-robin over ``repeats`` rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Copy bandwidth (bytes read + bytes written per second) of a large tensor copy, in GB/s."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_providers({"copy": lambda: dst.copy_(src)}, repeats, warmup=2)["copy"]
    return 2 * nbytes / statistics.median(t) / 1e9


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    bench: str
    case: str
    provider: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    peak_mib: float = float("nan")
    ratio_vs_ours: float = float("nan")  # peer median / our median (>1: we are faster)
    floor_pct: float = float("nan")  # bandwidth (or compute) floor / measured time
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)


def summarize(bench: str, case: str, times: Dict[str, List[float]], ours: str,
              peaks: Optional[Dict[str, float]] = None, floor_s: Optional[float] = None,
              notes: Optional[Dict[str, str]] = None) -> List[Row]:
    rows = []
    ours_med = statistics.median(times[ours]) if ours in times else float("nan")
    for name, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        med = statistics.median(t)
        rows.append(Row(
            bench=bench, case=case, provider=name, median_ms=med * 1e3, p25_ms=q[0] * 1e3, p75_ms=q[2] * 1e3,
            peak_mib=(peaks or {}).get(name, float("nan")),
            ratio_vs_ours=med / ours_med if ours_med == ours_med else float("nan"),
            floor_pct=100 * floor_s / med if floor_s else float("nan"),
            note=(notes or {}).get(name, ""),
        ))
    return rows


def format_table(rows: List[Row]) -> str:
    head = f"| case | provider | median ms | IQR ms | x vs ours | peak MiB | % floor | note |\n|---|---|---:|---:|---:|---:|---:|---|"
    lines = [head]
    for r in rows:
        fmt = lambda v, p=2: "n/a" if v != v else f"{v:.{p}f}"  # noqa: E731  (NaN: not measured)
        lines.append(f"| {r.case} | {r.provider} | {fmt(r.median_ms)} | {fmt(r.p25_ms)}-{fmt(r.p75_ms)} | "
                     f"{fmt(r.ratio_vs_ours)} | {fmt(r.peak_mib, 0)} | {fmt(r.floor_pct, 0)} | {r.note} |")
    return "\n".join(lines)


def save_rows(name: str, rows: List[Row], meta: Dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return path
