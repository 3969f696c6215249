"""Run every benchmark and regenerate BENCHMARKS.md (+ bench/results/all.csv and PNG plots).

    python -m bench            # full shapes (about half an hour on a 2-core CPU)
    python -m bench --quick    # small shapes, a few minutes: checks the suite itself
    python -m bench --report   # only rebuild the report from bench/results/*.json
    python -m bench --only sampler --only generation

Each benchmark runs in its own process (python -m bench.<name>), so one
provider's compiled graphs or allocator state cannot leak into the next.
Set MMR1_BENCH_RESULTS to write results elsewhere.

A --quick run never touches the published report: its results, report and
plots go to a scratch directory (--scratch, default runs/bench-quick/), not to
BENCHMARKS.md, bench/results/ or docs/bench/.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "BENCHMARKS.md"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="only regenerate the report")
    ap.add_argument("--only", action="append", help="a suite: logprob, sampler, generation, jacobi, train_step, trl_loss, attention, trl_trainer, janus")
    ap.add_argument("--report-path", default=None, help=f"default: {REPORT} (--quick: <scratch>/BENCHMARKS.md)")
    ap.add_argument("--scratch", default=str(ROOT / "runs" / "bench-quick"),
                    help="where a --quick run writes its results, report and plots")
    args = ap.parse_args(argv)
    if args.quick:  # keep the published numbers: quick results, report and plots all go to the scratch directory
        scratch = Path(args.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MMR1_BENCH_RESULTS", str(scratch / "results"))
        report = Path(args.report_path) if args.report_path else scratch / "BENCHMARKS.md"
    else:
        report = Path(args.report_path) if args.report_path else REPORT
    from .report import SUITES, write_report  # reads MMR1_BENCH_RESULTS

    for name in args.only or []:
        if name not in SUITES:
            raise SystemExit(f"error: --only {name!r}: not one of {SUITES}")
    if not args.report:
        for name in args.only or SUITES:
            cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    print("wrote", write_report(args.quick, report))


if __name__ == "__main__":
    main()
