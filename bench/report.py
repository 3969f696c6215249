"""Turn bench/results/*.json into BENCHMARKS.md, one CSV of every row, and PNG plots."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

from .common import RESULTS_DIR, Row, format_table

SUITES = ["logprob", "sampler", "generation", "jacobi", "train_step", "trl_loss", "attention", "trl_trainer", "janus"]


def load(suffix: str) -> Dict[str, dict]:
    out = {}
    for name in SUITES:
        path = RESULTS_DIR / f"{name}{suffix}.json"
        if path.exists():
            data = json.loads(path.read_text())
            out[name] = {"meta": data["meta"], "rows": [Row(**r) for r in data["rows"]]}
    return out


def write_csv(results: Dict[str, dict], path: Path) -> None:
    fields = list(asdict(Row("", "", "", 0, 0, 0)).keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["suite"] + fields)
        w.writeheader()
        for suite, data in results.items():
            for r in data["rows"]:
                w.writerow({"suite": suite, **{k: (json.dumps(v) if isinstance(v, dict) else v)
                                              for k, v in asdict(r).items()}})


def write_plots(results: Dict[str, dict], out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. time vs shape per provider: sampler (rows B) and GRPO fwd+bwd (tokens N)
    panels = []
    if "sampler" in results:
        panels.append(("cfg_sample: time vs batch rows", "cfg_sample", lambda c: int(c.split()[0][2:]), "B (x2 rows)"))
    if "logprob" in results:
        panels.append(("grpo_loss fwd+bwd (bf16): time vs tokens", "grpo_loss fwd+bwd",
                       lambda c: int(c.split()[0][2:]) if "bfloat16" in c else None, "N tokens"))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
        axes = [axes] if len(panels) == 1 else axes
        for ax, (title, bench, xof, xlabel) in zip(axes, panels):
            rows = [r for d in results.values() for r in d["rows"] if r.bench == bench]
            series = defaultdict(list)
            for r in rows:
                x = xof(r.case)
                if x is not None and r.median_ms == r.median_ms:
                    series[r.provider].append((x, r.median_ms))
            for prov, pts in series.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median ms")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(out_dir / "bench_time_vs_shape.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    # 2. memory vs vocab
    mem = [r for d in results.values() for r in d["rows"] if r.bench.startswith("memory vs vocab")]
    if mem:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        series = defaultdict(list)
        for r in mem:
            series[r.provider].append((r.extra["V"], r.peak_mib))
        for prov, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocab size V")
        ax.set_ylabel("peak extra MiB")
        ax.set_title(mem[0].bench + "\n" + mem[0].case.rsplit(" V=", 1)[0])
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out_dir / "bench_memory_vs_vocab.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    # 3. decode-step breakdown
    gen = [r for r in results.get("generation", {}).get("rows", []) if "ms_per_step" in r.extra]
    if gen:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        labels = [f"{r.provider}\n{r.case.split()[0]}" for r in gen]
        fwd = [r.extra["ms_per_step"] * (1 - r.extra["outside_forward_frac"]) for r in gen]
        out = [r.extra["ms_per_step"] * r.extra["outside_forward_frac"] for r in gen]
        ax.bar(labels, fwd, label="transformer forward")
        ax.bar(labels, out, bottom=fwd, label="everything else (head, CFG, sampling, host)")
        ax.set_ylabel("ms per decode step")
        ax.set_title("image decode step breakdown")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out_dir / "bench_decode_breakdown.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def write_report(quick: bool, report: Path) -> Path:
    suffix = "_quick" if quick else ""
    results = load(suffix)
    csv_path = RESULTS_DIR / f"all{suffix}.csv"
    write_csv(results, csv_path)
    plot_dir = report.parent / "docs" / "bench"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, plot_dir)
    parts = ["# Benchmarks", "",
             f"Generated by `python -m bench{' --quick' if quick else ''}` (bench/); every row is also in "
             f"`{csv_path.relative_to(report.parent) if csv_path.is_relative_to(report.parent) else csv_path}`.",
             "", "How to read: every provider of a case ran in the same process, interleaved; times are medians "
             "(IQR), `x vs ours` is the peer's median divided by ours (> 1: we are faster), `peak MiB` is the extra "
             "memory of one call (CPU: the process high-water mark with a fixed 64 KiB glibc mmap threshold, so "
             "every tensor is its own mapping), `% floor` is the time the bytes that must move would take at the "
             "copy bandwidth measured in the same run (fused-linear rows: the three GEMMs over the vocab window at "
             "the GEMM speed measured in the same run), divided by the measured time. `n/a`: not measured.", ""]
    for p in plots:
        parts += [f"![{p.stem}]({p.relative_to(report.parent)})", ""]
    for name, data in results.items():
        parts += [f"## {name}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in data["meta"].items()), ""]
        for bench in dict.fromkeys(r.bench for r in data["rows"]):
            parts += [f"### {bench}", "", format_table([r for r in data["rows"] if r.bench == bench]), ""]
    gpu = RESULTS_DIR / "gpu.json"
    if not quick and gpu.exists():  # the last `make gpu-check` on a GPU machine
        from .gpu_check import section

        parts += [section(json.loads(gpu.read_text()))]
    else:
        parts += ["## GPU", "", "No GPU figures yet: `make gpu-check` on a CUDA machine writes bench/results/gpu.json "
                  "(see bench/gpu_check.py; `OUT=<dir> bash bench/gpu_remote.sh` from a fresh copy), and "
                  "`python -m bench --report` merges it here.", ""]
    report.write_text("\n".join(parts))
    return report

