#!/usr/bin/env bash
# The CUDA/bf16 path on a GPU machine: correctness against the CPU/fp32 reference and
# throughput against plain PEFT and HF generate (benchmarks/gpu_check.py), then the engine
# tests. Runnable as is from the repository root of a checkout whose Python has a CUDA build
# of torch (PYTHON=... to point at it; default .venv/bin/python).
#
#   bash benchmarks/gpu_check.sh [--device cuda:0] [--batch 16 --seq-len 512]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "no $PYTHON: run 'make setup' (with a CUDA build of torch) or set PYTHON" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available())'
"$PYTHON" -m benchmarks.gpu_check "$@"
# The engine's own tests (numerics, isolation, sampling) on the tiny model, on the CPU; the
# check above is what exercises the device.
"$PYTHON" -m pytest -q -m "not slow" tests/engine
