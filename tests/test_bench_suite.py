"""The benchmark tooling end to end on CPU: the GPU check's dry run (bench/gpu_check.py: the GPU-path tests and every
benchmark suite at quick shapes), then the quick report, CSV and plots from the same results -- all in a scratch
directory, leaving BENCHMARKS.md, bench/results/ and docs/bench/ exactly as they were."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _published():
    files = [ROOT / "BENCHMARKS.md", *sorted((ROOT / "bench" / "results").glob("*")),
             *sorted((ROOT / "docs" / "bench").glob("*"))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.mark.slow
def test_gpu_check_dry_run_and_quick_report_leave_the_published_results_alone(tmp_path):
    before = _published()
    env = dict(os.environ)
    for k in ("MMR1_BENCH_RESULTS", "TRITON_INTERPRET"):
        env.pop(k, None)
    scratch = tmp_path / "scratch"
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(scratch)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    log = (scratch / "log.txt").read_text() if (scratch / "log.txt").exists() else ""
    assert out.returncode == 0, out.stdout[-2000:] + log[-4000:]
    result = json.loads((scratch / "gpu.json").read_text())
    assert [s["status"] for s in result["steps"]] == ["ok"] * 9
    assert set(result["suites"]) == {"sampler_quick", "logprob_quick", "train_step_quick", "generation_quick",
                                     "jacobi_quick", "attention_quick", "trl_trainer_quick", "janus_quick"}
    md = (scratch / "GPU.md").read_text()
    assert md.startswith("## GPU: none (dry run on CPU)") and "| step | result |" in md and "x vs ours" in md
    # the quick report from those results, in the same scratch directory
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--report", "--scratch", str(scratch)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (scratch / "BENCHMARKS.md").read_text()
    for section in ("## logprob", "## sampler", "## generation", "## train_step", "x vs ours", "--quick"):
        assert section in report
    rows = (scratch / "results" / "all_quick.csv").read_text().splitlines()
    assert len(rows) > 30 and rows[0].startswith("suite,bench,case,provider,median_ms")
    for png in ("bench_time_vs_shape.png", "bench_memory_vs_vocab.png", "bench_decode_breakdown.png"):
        assert (scratch / "docs" / "bench" / png).stat().st_size > 1000
    assert _published() == before, "a dry / quick run changed the published benchmark report"


def test_trl_loss_bench_runs_at_tiny_shapes():
    """bench.trl_loss's three benchmarks (TRL's kernels and loss code as peers when TRL is installed)."""
    from bench import trl_loss

    rows = trl_loss.bench_logprobs(64, 16, 1) + trl_loss.bench_policy_loss(2, 16, 1) + \
        trl_loss.bench_grpo_from_hidden(64, 16, 1)
    providers = {r.provider for r in rows}
    assert {"mmr1 fused_linear_logprobs", "mmr1 policy_loss", "mmr1 fused_linear_grpo_loss (grads in forward)"} \
        <= providers
    if trl_loss.peers.have("trl"):
        assert {"TRL ChunkedLogProbFunction +entropy", "TRL GRPOTrainer._compute_loss"} <= providers
    assert all(r.median_ms > 0 for r in rows)


def test_the_dry_runs_shared_process_records_a_failing_step_and_runs_the_next(tmp_path):
    """bench.gpu_check.run_steps (the dry run's one child process for the benchmark steps): a step whose main()
    exits non-zero is FAILED with its exit code, the steps after it still run, the status file holds every step."""
    import json

    from bench.gpu_check import run_steps

    status = tmp_path / "steps.json"
    plan = [{"name": "bad", "module": "bench.sampler", "argv": ["--no-such-flag"]},
            {"name": "good", "module": "bench.gpu_check", "argv": ["--run-steps", "[]", "--status",
                                                                   str(tmp_path / "inner.json")]}]
    assert run_steps(plan, status) == 1
    got = json.loads(status.read_text())
    assert got["bad"][0] == "FAILED (exit 2)" and got["good"][0] == "ok"


def test_janus_memory_table_adds_up():
    """bench.janus_memory's estimate: the parts by hand for one setting, the peaks as their sums, and the settings
    ordered as they must be (micro-batches and checkpointing only shrink the update; the fused loss has no logits)."""
    from bench import janus_memory as M

    t2i, ckpt, ours, micro, both = (M.estimate(s, 8, 1, 64, 256) for s in M.SETTINGS)
    T = 64 + 256 + 578
    assert t2i["rollout KV cache"] == 2 * 8 * T * 2 * 30 * 4096 * 2  # 16 rows x T positions, K and V, bf16
    assert t2i["loss logits"] == 3 * 4 * 8 * (256 * 102400 + 576 * 16384) and ours["loss logits"] == 0
    assert t2i["update activations"] == 8 * T * 30 * (34 * 4096 + 6 * 11008)
    for e in (t2i, ours, micro):
        base = e["train state (fp32 master + grads + AdamW, sharded)"] + e["reference model (bf16)"]
        assert e["peak in the update"] == base + e["update activations"] + e["loss logits"]
    assert both["update activations"] < micro["update activations"] < ours["update activations"]
    assert ckpt["update activations"] < t2i["update activations"]
    assert "| mmr1, micro_batch_size 1 | 2 |" in M.main(["--prompts-per-gpu", "2"])
