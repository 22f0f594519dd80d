#!/usr/bin/env bash
# One-GPU smoke test of the fast path (see docs/gpu.md):
#   a ~1B Llama-style model in bf16 (8 -> 16 layers, hidden 2048, seq 2048, mock data) trains 100
#   iterations, grows depth x2 inside the run, trains 100 more; prints TFLOP/s per GPU and MFU
#   before and after growth, the growth's seconds and peak GPU memory, and the eval loss just
#   before and after the growth (identity growth: equal within the documented bf16 tolerance).
#
#   examples/gpu_smoke.sh                      # on a GPU machine with megatron-core installed
#   examples/gpu_smoke.sh --iters 20           # shorter
#   examples/gpu_smoke.sh --toy                # tiny model: checks the script anywhere (CPU too)
#   extra flags are train flags, e.g. --micro-batch-size 8 or --recompute-granularity selective
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # as Megatron-LM's scripts
exec "${PYTHON:-python}" examples/gpu_smoke.py "$@"
