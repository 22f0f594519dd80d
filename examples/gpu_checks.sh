#!/usr/bin/env bash
# Every GPU check of docs/gpu.md on a one-GPU machine, logs and figures under $OUT:
#   examples/gpu_checks.sh tests   # tests/gpu: the GPU path end to end against CPU / growth / resume / HF oracles (~3 min)
#   examples/gpu_checks.sh smoke   # examples/gpu_smoke.sh: ~1B bf16, 100 it, depth x2, 100 it; MFU, memory (~5 min)
#   examples/gpu_checks.sh         # both
# Extra arguments after the first go to gpu_smoke.sh (e.g. --iters 50).
# Without megatron-core installed it installs the wheels in .whl/ (the lent GPU machines reach no
# registry; docs/gpu.md says how to fetch them here and carry them).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}; shift || true
case "$what" in tests|smoke|all) ;; *) echo "usage: $0 [tests|smoke|all] [gpu_smoke.sh flags]" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! $PY -c "import megatron.core" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "megatron-core is not installed and .whl/ holds no wheels (docs/gpu.md: Running it on a machine without megatron-core)" >&2
    exit 1
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{ nvidia-smi 2>&1 | head -15
  $PY -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], '| torch', torch.__version__, '| megatron-core', m.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"
rc=0
if [ "$what" != smoke ]; then
  $PY -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/tests.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
if [ "$what" != tests ]; then
  PYTHON=$PY bash examples/gpu_smoke.sh --json "$OUT/smoke.json" "$@" 2>&1 | tee "$OUT/smoke.log"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
exit $rc
