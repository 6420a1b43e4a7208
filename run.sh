#!/usr/bin/env bash
# bash run.sh [options]   simulate a FlatVel-style dataset, train InversionNet, evaluate it
# bash run.sh test [pytest args]   install, then run tests/ and the bench suite in test mode
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}

usage() {
  cat <<'USAGE'
Usage: bash run.sh [--profile auto|cpu|gpu] [--family flatvel|curvevel|flatfault|curvefault]
                   [--out DIR] [--sim-args "..."] [--train-args "..."] [--eval-args "..."]
       bash run.sh test [pytest arguments]

Main job: install what is missing, simulate data with simulate_openfwi.py (reused when already
there), train with train_inversionnet.py, evaluate with eval_inversionnet.py, print a summary.
  --profile    cpu: 160 samples and 15 short epochs, under 10 minutes on 2 cores;
               gpu: 30 files x 500 samples (OpenFWI's FlatVel size: 24 train, 6 val) and the --fast training preset;
               auto (default): gpu when CUDA is available, else cpu
  --family     velocity-model family to simulate (default flatvel)
  --out DIR    where data/ and run/ go (default out/<family>-<profile>)
  --*-args     extra flags passed to the simulator, the trainer and the evaluator
test: the same install step, then ruff's pyflakes checks and pytest over tests/ and bench/ (--benchmark-disable).
USAGE
}

install() {
  # torch first and pinned: an unpinned torch on a CPU-only machine pulls GBs of CUDA packages
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
}

if [[ "${1:-}" == "test" ]]; then
  shift
  install
  "$PY" -m ruff check --select F --no-cache .
  exec "$PY" -m pytest tests bench --benchmark-disable -p no:cacheprovider "$@"
fi

profile=auto family=flatvel out="" sim_args="" train_args="" eval_args=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --family) family=${2:?--family needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --sim-args) sim_args=${2-}; shift 2 ;;
    --train-args) train_args=${2-}; shift 2 ;;
    --eval-args) eval_args=${2-}; shift 2 ;;
    *) echo "run.sh: error: unknown option $1 (see bash run.sh --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in auto|cpu|gpu) ;; *) echo "run.sh: error: --profile must be auto, cpu or gpu, got $profile" >&2; exit 2 ;; esac

install
if [[ "$profile" == auto ]]; then
  profile=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
out=${out:-out/$family-$profile}
if [[ "$profile" == gpu ]]; then
  sim=(--files 30 --samples-per-file 500 --val-files 6)
  train=(--fast --epochs 60 --batch-size 256 --lr 1e-3 --lr-scheduler cosine --lr-warmup-epochs 1 --num-workers 4)
else
  sim=(--files 5 --samples-per-file 32 --val-files 1 --batch-size 8)
  train=(--epochs 15 --batch-size 8 --lr 1e-3 --num-workers 1 --log-every 16 --no-progress)
fi

step() { echo; echo "== $1"; }
step "1/3 simulate ($family, profile $profile) -> $out/data"
# shellcheck disable=SC2086
"$PY" simulate_openfwi.py --family "$family" --out "$out/data" "${sim[@]}" $sim_args \
  || { echo "run.sh: simulation failed" >&2; exit 1; }
step "2/3 train -> $out/run"
resume=()
[[ -f "$out/run/last.pt" ]] && resume=(--resume auto)
# shellcheck disable=SC2086
"$PY" train_inversionnet.py --train-list "$out/data/train.txt" --val-list "$out/data/val.txt" \
  --output-dir "$out/run" "${train[@]}" "${resume[@]}" $train_args \
  || { echo "run.sh: training failed" >&2; exit 1; }
step "3/3 evaluate -> $out/run/eval"
# shellcheck disable=SC2086
"$PY" eval_inversionnet.py --checkpoint "$out/run/best.pt" --vis 3 --overwrite $eval_args \
  || { echo "run.sh: evaluation failed" >&2; exit 1; }
cat <<SUMMARY

== done
checkpoints   $out/run/best.pt, $out/run/last.pt
metrics       $out/run/eval/metrics.json, result.txt, per_sample.csv
pictures      $out/run/eval/*.png
TensorBoard   tensorboard --logdir $out/run/tb
SUMMARY
