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
  "$PY" -m pip install -q -e ".[test,muon]"
  # --optimizer muon: emerging-optimizers' only release declares Python >= 3.12 but runs on 3.11
  # (docs/muon.md); a 100 kB pure-Python wheel
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('emerging_optimizers') is None)"; then
    "$PY" -m pip install -q --no-deps --ignore-requires-python "emerging-optimizers==0.3.0" \
      || echo "warning: emerging-optimizers did not install; the Muon tests will be skipped" >&2
  fi
}

cmd=${1:-quickstart}
shift || true
case "$cmd" in
  setup) setup ;;
  quickstart) setup; exec "$PY" -m megatron_staged quickstart "$@" ;;
  test) setup; exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: ./run.sh {quickstart|test|setup} [args]" >&2; exit 2 ;;
esac
