"""The benchmark suite itself runs end to end in --quick mode and writes its report, CSV and plots."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_suite_writes_report_csv_and_plots(tmp_path):
    env = {**os.environ, "MMR1_BENCH_RESULTS": str(tmp_path / "results")}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--report-path", str(tmp_path / "BENCH.md")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "BENCH.md").read_text()
    for section in ("## logprob", "## sampler", "## generation", "## train_step", "x vs ours"):
        assert section in report
    rows = (tmp_path / "results" / "all_quick.csv").read_text().splitlines()
    assert len(rows) > 30 and rows[0].startswith("suite,bench,case,provider,median_ms")
    for png in ("bench_time_vs_shape.png", "bench_memory_vs_vocab.png", "bench_decode_breakdown.png"):
        assert (tmp_path / "docs" / "bench" / png).stat().st_size > 1000
