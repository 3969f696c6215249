"""Run every benchmark and regenerate BENCHMARKS.md (+ bench/results/all.csv and PNG plots).

    python -m bench            # full shapes (about half an hour on a 2-core CPU)
    python -m bench --quick    # small shapes, a few minutes: checks the suite itself
    python -m bench --report   # only rebuild the report from bench/results/*.json
    python -m bench --only sampler --only generation

Each benchmark runs in its own process (python -m bench.<name>), so one
provider's compiled graphs or allocator state cannot leak into the next.
Set MMR1_BENCH_RESULTS to write results elsewhere.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .report import SUITES, write_report

REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", action="store_true", help="only regenerate the report")
    ap.add_argument("--only", choices=SUITES, action="append")
    ap.add_argument("--report-path", default=str(REPORT))
    args = ap.parse_args()
    if not args.report:
        for name in args.only or SUITES:
            cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    print("wrote", write_report(args.quick, Path(args.report_path)))


if __name__ == "__main__":
    main()
