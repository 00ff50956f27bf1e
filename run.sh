#!/usr/bin/env bash
# Entry point for a new machine; installs what is missing first (install/install.sh, idempotent).
#   bash run.sh demo [flags]      the embedded tiny experiment on CPU (see README)
#   bash run.sh test [pytest args] the test suite (CPU, offline)
#   bash run.sh python ARGS...    any command inside the project's venv, e.g. bash run.sh python rl_dapo.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash install/install.sh "${INSTALL_MODE:-auto}"
PY="${VENV:-$ROOT/.venv}/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cmd="${1:-}"; shift || true
case "$cmd" in
  demo)
    if [ -f demo.py ]; then exec "$PY" demo.py "$@"; fi
    # Until demo.py lands: build the tiny fixture, the stage every other one starts from.
    exec "$PY" -m common.tiny "${1:-runs/tiny}" ;;
  test)
    # Each test process gets one thread: pytest, torchrun workers and vLLM would otherwise fight over 2 cores.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    exec "$PY" -m pytest tests "$@" ;;
  python) exec "$PY" "$@" ;;
  *) echo "usage: bash run.sh demo|test|python ..." >&2; exit 2 ;;
esac
