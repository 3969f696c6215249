#!/usr/bin/env bash
# The GPU check from a fresh copy of the repository on a machine with one CUDA GPU and no network:
#
#     OUT=/path/for/results bash bench/gpu_remote.sh
#
# Uses the Python on PATH (its torch / triton / pytest; nothing is downloaded). Wheels shipped beside the tree in
# wheels/ (e.g. liger-kernel, trl: pure-Python peers the benchmarks compare against) are installed first with
# --no-index --no-deps. Results (gpu.json, GPU.md, log.txt, per-suite JSON) go to $OUT (default runs/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
shopt -s nullglob
for wheel in wheels/*.whl; do
    "$PY" -m pip install -q --no-index --no-deps "$wheel" || echo "gpu_remote: could not install $wheel (skipped)"
done
"$PY" -m bench.gpu_check --out "${OUT:-runs/gpu-check}"
