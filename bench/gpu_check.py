"""One prepared GPU run: validate and benchmark every Triton kernel on one GPU, in a few minutes, no network.

    python -m bench.gpu_check [--out DIR]          (make gpu-check; the machine's own Python, no venv)
    python -m bench.gpu_check --dry [--out DIR]    (make gpu-check GPU_CHECK_DRY=1: the same steps on CPU, tiny)

Steps, each under its own time limit, with a progress line; a failing step is recorded and the run goes on:

1. environment: GPU name, driver, torch / triton / python versions (the full run requires CUDA);
2. build: the C++ extension against this torch (``pip install --no-build-isolation --no-deps -e .``);
3. kernel tests on the device: tests/test_gpu.py (public ops' CUDA dispatch and autograd in fp32/bf16/fp16 vs the
   fp64 oracle, the sampler's chi-square and batch invariance, C++ == Triton tokens at Lumina's shapes), then the
   backend matrices of test_logprob / test_sampler / test_advantages / test_fused_linear with Triton on the GPU;
4. benchmarks on the device (bench.sampler, bench.logprob, bench.train_step, bench.generation and a Lumina-7B-width
   decode, bench.attention (decode_attention vs masked SDPA, flash-attn's flash_attn_with_kvcache and FlashInfer's
   batch decode where installed; the GRPO update through the shared prefix vs per row, which decides
   GRPOConfig.update_prefix="auto" on GPUs), bench.trl_trainer (TRL's GRPOTrainer with its own Triton log-prob
   kernel vs with mmr1's, when TRL is importable), with every peer whose package is importable -- Liger, TRL, FlashInfer,
   transformers), each with its % of the copy bandwidth measured in the same run;
5. results: DIR/gpu.json (every row, the step log, the environment) and DIR/GPU.md; the full run also copies
   gpu.json to bench/results/gpu.json, which ``python -m bench --report`` merges into BENCHMARKS.md.

The dry run uses the smallest shapes, CPU tensors, the C++ kernels and the Triton interpreter, runs the benchmark
steps' ``main(argv)`` one after another in one child process (one import instead of eight), and never writes into
bench/results/: ``make test`` runs it so that a change that breaks the GPU run fails on CPU first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_logprob.py", "tests/test_sampler.py", "tests/test_advantages.py",
                "tests/test_fused_linear.py", "tests/test_decode_attention.py"]


def environment(dry: bool) -> Dict[str, str]:
    import torch

    from bench.common import machine_info

    env = {**machine_info(), "dry_run": str(dry)}
    if torch.cuda.is_available():
        env["cuda"] = str(torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = "unknown"
    return env


def _run(cmd: List[str], limit: int, env: Dict[str, str], log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[timed out after {limit} s]\n")
            return 124


def _run_in_one_process(steps: List[Dict], limit: int, env: Dict[str, str], log: Path, out: Path) -> Dict:
    """Run the ``python -m bench.<suite> ARGS`` steps one after another in one child process (``run_steps``);
    returns {step name: (status, seconds)} -- a step the child never reached is "not run"."""
    status_file = out / "steps.json"
    plan_ = [{"name": st["name"], "module": st["cmd"][2], "argv": st["cmd"][3:]} for st in steps]
    from bench.common import BENCH_ENV  # what each suite's command line would re-exec itself under

    rc = _run([sys.executable, "-m", "bench.gpu_check", "--run-steps", json.dumps(plan_), "--status", str(status_file)],
              limit, {**env, **BENCH_ENV}, log)
    got = json.loads(status_file.read_text()) if status_file.exists() else {}
    return {st["name"]: tuple(got.get(st["name"], ("timed out" if rc == 124 else f"not run (exit {rc})", 0.0)))
            for st in steps}


def run_steps(plan_: List[Dict], status_file: Path) -> int:
    """The child of _run_in_one_process: each step's ``main(argv)``, its status and seconds written after each."""
    import importlib
    import traceback

    got: Dict[str, tuple] = {}
    for st in plan_:
        print(f"\n$ python -m {st['module']} {' '.join(st['argv'])}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(st["module"]).main(st["argv"])
            status = "ok"
        except SystemExit as err:
            status = "ok" if err.code in (0, None) else f"FAILED (exit {err.code})"
        except Exception:  # noqa: BLE001  (recorded, the next step runs)
            traceback.print_exc()
            status = "FAILED (exception)"
        got[st["name"]] = (status, time.perf_counter() - t0)
        status_file.write_text(json.dumps(got))
    return 0 if all(s == "ok" for s, _ in got.values()) else 1


SMOKE_SUITES = ("sampler", "logprob", "train_step", "generation", "jacobi", "attention", "janus")


def plan(dry: bool, py: str) -> List[Dict]:
    """The steps: name, time limit (s), command."""
    quick = ["--quick"] if dry else []
    steps = []
    if not dry:
        steps.append({"name": "build the C++ extension", "limit": 300,
                      "cmd": [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "-e", "."]})
    steps.append({"name": "GPU-path tests (public ops, dtypes, autograd, C++ == Triton tokens)", "limit": 240,
                  "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]})
    if not dry:
        steps.append({"name": "kernel test matrices with Triton on the GPU", "limit": 300,
                      "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not inductor",
                              *KERNEL_TESTS]})
    for suite, limit, extra in (("sampler", 120, []),
                                ("logprob", 150, []),
                                ("train_step", 120, []),
                                ("generation", 150, ["--repeats", "1"] if dry else []),
                                ("jacobi", 120, []),
                                ("attention", 150, [] if dry else ["--layers-only", "--repeats", "9"]),
                                ("trl_trainer", 240, ["--repeats", "1", "--tokens", "2x32", "--vocabs", "16384"]
                                 if dry else ["--repeats", "3"]),
                                ("janus", 240, ["--layers", "1"] if dry else ["--layers", "4", "--repeats", "3"])):
        # the dry run checks that every step runs end to end: the suites with a --smoke size use it (their quick
        # shapes cost 1-5 min each on 2 CPU cores), the others their quick shapes
        size = ["--smoke"] if dry and suite in SMOKE_SUITES else quick
        steps.append({"name": f"bench.{suite}", "limit": limit, "cmd": [py, "-m", f"bench.{suite}", *size, *extra],
                      "suite": suite + ("_quick" if dry else "")})
    if not dry:  # the GRPO update through the shared prefix (the "gather" path on CUDA) vs per row, into attention.json
        steps.append({"name": "bench.attention --update-only (GRPO update: shared prefix vs per row)", "limit": 90,
                      "cmd": [py, "-m", "bench.attention", "--update-only", "--repeats", "5"], "suite": "attention"})
        steps.append({"name": "bench.generation at Lumina-7B width (2 layers, bf16)", "limit": 150,
                      "cmd": [py, "-m", "bench.generation", "--lumina7b", "--repeats", "2"],
                      "suite": "generation_lumina7b"})
    return steps


def section(result: Dict) -> str:
    """The markdown section for BENCHMARKS.md."""
    sys.path.insert(0, str(ROOT))
    from bench.common import Row, format_table

    e = result["environment"]
    lines = [f"## GPU: {e.get('gpu', 'none (dry run on CPU)')}", "",
             "Produced by `make gpu-check` (`python -m bench.gpu_check`) in one run: "
             + ", ".join(f"{k} {v}" for k, v in e.items()), "",
             "| step | result | seconds |", "|---|---|---:|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in result["steps"]]
    for suite, data in result["suites"].items():
        lines += ["", f"### {suite}", ""]
        rows = [Row(**r) for r in data["rows"]]
        for bench in dict.fromkeys(r.bench for r in rows):
            lines += [f"#### {bench}", "", format_table([r for r in rows if r.bench == bench]), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="CPU, tiny shapes, interpreter (what make test runs)")
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", str(ROOT / "runs" / "gpu-check")))
    ap.add_argument("--run-steps", help=argparse.SUPPRESS)  # internal: the dry run's one child process
    ap.add_argument("--status", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_steps:
        return run_steps(json.loads(args.run_steps), Path(args.status))
    import torch

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "results").mkdir(parents=True)
    log = out / "log.txt"
    env_info = environment(args.dry)
    if not args.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --dry (GPU_CHECK_DRY=1) for the CPU dry run")
        return 2
    env = {**os.environ, "MMR1_BENCH_RESULTS": str(out / "results"), "MMR1_REQUIRE_CPP": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    steps = plan(args.dry, sys.executable)
    if args.dry:  # CPU: compiles and quick shapes take longer than the GPU's budget allows
        for st in steps:
            st["limit"] *= 4
    t_all = time.perf_counter()
    done = []
    print(f"gpu-check ({'dry run, CPU' if args.dry else env_info.get('gpu')}): {len(steps)} steps, log in {log}",
          flush=True)
    # the dry run's benchmark steps share one process (one import of torch, triton, transformers instead of eight:
    # ~35 of its ~75 CPU-s on 2 cores); each step still runs its suite's main() with the same arguments
    shared = [st for st in steps if args.dry and st.get("suite")]
    statuses = _run_in_one_process(shared, sum(st["limit"] for st in shared), env, log, out) if shared else {}
    for i, st in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {st['name']} (limit {st['limit']} s) ...", end=" ", flush=True)
        if st["name"] in statuses:
            status, secs = statuses[st["name"]]
        else:
            t0 = time.perf_counter()
            rc = _run(st["cmd"], st["limit"], env, log)
            secs = time.perf_counter() - t0
            status = "ok" if rc == 0 else ("timed out" if rc == 124 else f"FAILED (exit {rc})")
        print(f"{status} ({secs:.0f} s)", flush=True)
        done.append({"name": st["name"], "status": status, "seconds": secs, "cmd": " ".join(st["cmd"][1:])})
    suites = {}
    for st in steps:
        path = out / "results" / f"{st.get('suite', '')}.json"
        if st.get("suite") and path.exists():
            suites[st["suite"]] = json.loads(path.read_text())
    result = {"environment": env_info, "steps": done, "suites": suites, "seconds": time.perf_counter() - t_all}
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    (out / "GPU.md").write_text(section(result))
    if not args.dry:
        shutil.copy(out / "gpu.json", ROOT / "bench" / "results" / "gpu.json")
    failed = [s for s in done if s["status"] != "ok"]
    print(f"gpu-check: {len(done) - len(failed)} of {len(done)} steps ok in {result['seconds']:.0f} s; "
          f"wrote {out / 'gpu.json'} and {out / 'GPU.md'}" + ("" if args.dry else " (+ bench/results/gpu.json)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
