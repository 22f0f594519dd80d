#!/usr/bin/env bash
# One-step set-up and run on a fresh machine.
#   ./run.sh quickstart [train flags]   staged training run on the built-in corpus (CPU or GPU)
#   ./run.sh test [pytest args]         the test suite (CPU, gloo, several processes)
#   ./run.sh setup                      only install
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  # torch first: a plain requirement could pull a multi-GB CUDA build onto a CPU machine.
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  "$PY" -m pip install -q -e ".[test]"
}

cmd=${1:-quickstart}
shift || true
case "$cmd" in
  setup) setup ;;
  quickstart) setup; exec "$PY" -m megatron_staged quickstart "$@" ;;
  test) setup; exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: ./run.sh {quickstart|test|setup} [args]" >&2; exit 2 ;;
esac
