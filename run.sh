#!/usr/bin/env bash
# bash run.sh        simulate a dataset, train InversionNet, evaluate it (see --help)
# bash run.sh test   install, then run the test suite and the bench in test mode
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}

install() {
  # torch first and pinned: an unpinned torch on a CPU-only machine pulls GBs of CUDA packages
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
}

if [[ "${1:-}" == "test" ]]; then
  shift
  install
  exec "$PY" -m pytest tests "$@"
fi
echo "run.sh: the main job is not written yet; use 'bash run.sh test'" >&2
exit 2
