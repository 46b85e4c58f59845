#!/usr/bin/env bash
# The GPU check in one command, from any directory: CUDA tests, then every Triton kernel timed against torch.
# Writes benchmarks/results/gpu.json (or $OUT/gpu.json when OUT is set, as on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
exec "$PY" benchmarks/gpu_check.py --json "${OUT:-benchmarks/results}/gpu.json" "$@"
