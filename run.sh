#!/usr/bin/env bash
# bash run.sh [options]   simulate a FlatVel-style dataset, train InversionNet, evaluate it
# bash run.sh test [pytest args]   install, then run the checks, tests/ and the bench suite in test mode
set -euo pipefail
here=$PWD  # --data, --run and PYTHON given as relative paths are the caller's: taken from here, not the repository
cd -P "$(dirname "${BASH_SOURCE[0]}")"  # -P: the folder run.sh is in, not a symlink's parent
PY=${PYTHON:-python3}
[[ "$PY" != */* || "$PY" == /* ]] || PY=$here/$PY

usage() {
  cat <<'USAGE'
Usage: bash run.sh [--profile auto|cpu|gpu] [--family flatvel|curvevel|flatfault|curvefault]
                   [--data DIR] [--run DIR] [--sim-args "..."] [--train-args "..."] [--eval-args "..."]
       bash run.sh test [pytest arguments]

Main job: install what is missing, simulate data with simulate_openfwi.py (reused when already
there), train with train_inversionnet.py, evaluate with eval_inversionnet.py, print a summary.
  --profile    cpu: 800 samples (700 train, 100 val), the --fast path and a 13-epoch recipe (6 to 10 minutes on 2 cores
               with fast bf16, 23 on an Intel VM without AMX; each epoch's line says the time left);
               gpu: 15,000 samples (half of OpenFWI's FlatVel-A: 12,000 train, 3,000 val) and the --fast path with L1 + L2 for 170 epochs (about 8 minutes on an H200);
               auto (default): gpu when CUDA is available, else cpu
  --family     velocity-model family to simulate (default flatvel)
  --data DIR   the simulated data (default data/<family>: train_inversionnet.py's default --data-root for
               flatvel, so a bare torchrun launch of train_inversionnet.py trains on it next, on the same split;
               the summary prints the launch line)
  --run DIR    checkpoints, logs and evaluation (default runs/<family>-<profile>); a re-run continues the run
               there, so to start over remove DIR or name another
  --*-args     extra flags passed to the simulator, the trainer and the evaluator, split at spaces (no quoting
               inside: a value with a space goes to the script itself); the paths run.sh hands from stage to
               stage (--out, --family, --output-dir, --resume, --train-list, --val-list, --data-root,
               --checkpoint) come from --data, --family and --run and are refused there, as is a stage's --help
Options take --opt value or --opt=value. A relative --data, --run or PYTHON is taken from the directory
run.sh is started in; the defaults are in the repository.
Both profiles write files of 100 samples: the gpu profile extends the cpu one's data set (the cpu profile run after
it lists its own 8 files again, and the simulator says so).
test: the same install step, then ruff's pyflakes checks and pytest over tests/ and bench/ (--benchmark-disable).
USAGE
}

install() {
  # pip ends a Ctrl-C with exit 1, as it ends a failed download: without the traps it would read as "offline".
  # A SIGTERM to run.sh alone waits for pip to finish, as it does for a stage
  trap 'echo "run.sh: interrupted during the install" >&2; exit 130' INT
  trap 'echo "run.sh: stopped by SIGTERM during the install; the same command goes on" >&2; exit 143' TERM
  # torch first and pinned. PyPI's x86-64 Linux torch brings GBs of CUDA packages, so a machine without an
  # NVIDIA driver asks for the CPU build by name (2.13.0+cpu: PyTorch's CPU index or a local wheel; PyPI has
  # none, so an unreachable index cannot turn into the CUDA build). Elsewhere the pin alone (macOS wheels
  # carry no +cpu). A torch before 2.3 lacks torch.amp.GradScaler, which the trainer uses: replaced too.
  # pip's warning about running as root (containers, CI) would be a stray line on every run
  local cpu=() spec=torch==2.13.0
  if [[ ! -e /proc/driver/nvidia/version ]] && ! command -v nvidia-smi >/dev/null; then
    cpu=(--extra-index-url https://download.pytorch.org/whl/cpu --retries 0)
    [[ "$(uname -sm)" == "Linux x86_64" ]] && spec=torch==2.13.0+cpu
  fi
  "$PY" -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 3))" 2>/dev/null \
    || PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check ${cpu[@]+"${cpu[@]}"} "$spec" \
    || { echo "run.sh: error: pip could not install $spec (above); install torch 2.3 or later and run again" >&2; exit 1; }
  # an offline machine (a cluster node, say) may lack an extra such as torch-tb-profiler: what the
  # job imports ($1) decides whether it can go on
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt && { trap - INT TERM; return; }
  trap - INT TERM
  "$PY" -c "import $1" || { echo "run.sh: error: pip could not install requirements.txt (above) and $1 do not all import" >&2; exit 1; }
  echo "run.sh: note: pip could not install all of requirements.txt (offline?); $1 import, so the job goes on" >&2
}

if [[ "${1:-}" == "test" ]]; then
  shift
  install "numpy, tqdm, matplotlib, tensorboard, pytest, pytest_benchmark"
  if "$PY" -m ruff --version >/dev/null 2>&1; then
    "$PY" -m ruff check --select F --no-cache .
  else
    echo "run.sh: note: ruff is missing and could not be installed: its pyflakes check (ruff check --select F) is skipped" >&2
  fi
  exec "$PY" -m pytest tests bench --benchmark-disable -p no:cacheprovider "$@"
fi

need() { (( $2 >= 2 )) || { echo "run.sh: error: $1 needs a value (see bash run.sh --help)" >&2; exit 2; }; }
path() {  # an option there (--run --data) is a value forgotten, not a directory: ./-name names one that starts with -
  [[ -n "$2" ]] || { echo "run.sh: error: $1 needs a directory, got an empty value" >&2; exit 2; }
  [[ "$2" != -* ]] || { echo "run.sh: error: $1 needs a directory, got the option $2 (write ./$2 for a folder of that name)" >&2; exit 2; }
  [[ "$2" == /* || "$here" == "$PWD" ]] && echo "$2" || echo "$here/$2"
}
profile=auto family=flatvel data="" run="" sim_args="" train_args="" eval_args=""
while [[ $# -gt 0 ]]; do
  [[ "$1" == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --opt=value, as the Python scripts take it
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --profile) need "$1" $#; profile=$2 ;;
    --family) need "$1" $#; family=$2 ;;
    --data) need "$1" $#; data=$(path "$1" "$2") ;;
    --run) need "$1" $#; run=$(path "$1" "$2") ;;
    --sim-args) need "$1" $#; sim_args=$2 ;;
    --train-args) need "$1" $#; train_args=$2 ;;
    --eval-args) need "$1" $#; eval_args=$2 ;;
    *) echo "run.sh: error: unknown option $1 (see bash run.sh --help)" >&2; exit 2 ;;
  esac
  shift 2
done
case "$profile" in auto|cpu|gpu) ;; *) echo "run.sh: error: --profile must be auto, cpu or gpu, got $profile" >&2; exit 2 ;; esac
case "$family" in flatvel|curvevel|flatfault|curvefault) ;;
  *) echo "run.sh: error: --family must be flatvel, curvevel, flatfault or curvefault, got $family" >&2; exit 2 ;; esac
# the stages split the --*-args values at tabs and newlines as at spaces (and expand no * or ?: set -f), so the
# checks below see spaces only
set -f
sim_args=${sim_args//[$'\t\n']/ } train_args=${train_args//[$'\t\n']/ } eval_args=${eval_args//[$'\t\n']/ }
# the eval stage runs with --overwrite (it re-evaluates its own run), which must not reach a user's --export file
case " $eval_args " in *" --export"*|*" --predict"*)
  echo "run.sh: error: --eval-args evaluates the run; --export and --predict are jobs of eval_inversionnet.py itself" >&2; exit 2 ;; esac
# a stage's --help would print and end that stage with exit 0, and the next stage would start
no_help() {  # no_help OPTION SCRIPT "ARGS"
  case " $3 " in *" -h "*|*" --help "*)
    echo "run.sh: error: $1 cannot hold --help: run python $2 --help" >&2; exit 2 ;; esac
}
no_help --sim-args simulate_openfwi.py "$sim_args"
no_help --train-args train_inversionnet.py "$train_args"
no_help --eval-args eval_inversionnet.py "$eval_args"
# the paths each stage hands to the next are run.sh's own: a stage sent elsewhere would leave the next one
# reading (and the eval stage's --overwrite replacing) another run's files
owned() {  # owned OPTION "ARGS" FLAG=WHAT_SETS_IT ...
  local opt=$1 args=" $2 " pair; shift 2
  for pair in "$@"; do
    case "$args" in *" ${pair%%=*} "*|*" ${pair%%=*}="*)
      echo "run.sh: error: $opt: ${pair%%=*} is run.sh's to set (from its ${pair#*=})" >&2; exit 2 ;; esac
  done
}
owned --sim-args "$sim_args" --out=--data --family=--family
owned --train-args "$train_args" --output-dir=--run "--resume=--run, whose run it continues" --train-list=--data --val-list=--data --data-root=--data
owned --eval-args "$eval_args" --checkpoint=--run --output-dir=--run

install "numpy, tqdm, matplotlib, tensorboard"
# a SIGTERM to this shell alone (kill PID; docker stop of a container whose first process is run.sh) cannot
# reach the stage under way without signalling it twice when the group is signalled too: that stage finishes
# and no other starts (after the last stage, the evaluation, the summary follows, exit 0: the job is done)
stopped=""
trap 'stopped=1' TERM
if [[ "$profile" == auto ]]; then
  profile=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
data=${data:-data/$family}
run=${run:-runs/$family-$profile}
if [[ "$here" != "$PWD" ]]; then  # started elsewhere: the summary's lines paste there too
  [[ "$data" == /* ]] || data=$PWD/$data
  [[ "$run" == /* ]] || run=$PWD/$run
fi
if [[ "$profile" == gpu ]]; then
  sim=(--files 150 --samples-per-file 100 --val-files 30)
  # measured on an H100 and an H200 (bench/RESULTS.md, time to accuracy): --precise-bn settles the validation curve
  # that running BatchNorm statistics made swing; L1 + L2 lowered the validation RMSE by 6 % against L1 alone
  train=(--fast --epochs 170 --batch-size 256 --lr 1e-3 --lambda-l2 1 --lr-scheduler cosine --lr-warmup-epochs 1
         --num-workers 4 --precise-bn 4)
else
  # measured on 2 cores (bench/RESULTS.md): the compute budget goes to epochs over a small set, L1+L2 and
  # recomputed BatchNorm statistics keep the validation curve settled
  sim=(--files 8 --samples-per-file 100 --val-files 1)
  train=(--fast --epochs 13 --batch-size 16 --lr 5e-4 --lambda-l2 1 --lr-scheduler cosine --lr-warmup-epochs 1
         --precise-bn 16 --log-every 22 --no-progress)
fi

# a stage's exit code is run.sh's; an input error (exit 2) has already said what is wrong, in one line; a
# stage stopped by Ctrl-C (SIGINT), by a SIGTERM to the whole process group (timeout, a batch scheduler) or by
# a SIGHUP exits 130 / 143 / 129, and the trap keeps this shell alive to say how to go on
step() {
  [[ -z "$stopped" ]] || { echo "run.sh: stopped by SIGTERM before $1; the same bash run.sh command goes on" >&2; exit 143; }
  echo; echo "== $1"
}
failed() {
  if (( $1 == 129 || $1 == 130 || $1 == 143 )); then echo "run.sh: $2 stopped by a signal; the same bash run.sh command goes on" >&2
  elif (( $1 != 2 )); then echo "run.sh: $2 failed (exit $1)" >&2; fi
  exit "$1"
}
step "1/3 simulate ($family, profile $profile) -> $data"
# shellcheck disable=SC2086
"$PY" simulate_openfwi.py --family "$family" --out "$data" "${sim[@]}" $sim_args \
  || failed $? simulation
step "2/3 train -> $run"
rc=0
# --resume auto continues the run in $run if there is one and starts a new one otherwise, so the same command
# goes on after any stop, even a kill before the first checkpoint; a signal reaches the trainer too, which
# saves last.pt first
# shellcheck disable=SC2086
"$PY" train_inversionnet.py --train-list "$data/train.txt" --val-list "$data/val.txt" \
  --output-dir "$run" "${train[@]}" --resume auto $train_args || rc=$?
if (( rc == 129 || rc == 130 || rc == 143 )); then
  [[ -f "$run/last.pt" ]] && hint="; the same bash run.sh command continues it from $run/last.pt" || hint=""
  echo "run.sh: training stopped by a signal$hint" >&2
  exit "$rc"
fi
(( rc == 0 )) || failed "$rc" training
step "3/3 evaluate -> $run/eval"
# shellcheck disable=SC2086
"$PY" eval_inversionnet.py --checkpoint "$run/best.pt" --vis 3 --overwrite $eval_args \
  || failed $? evaluation
# the launch line trains where its --device auto does, whatever the profile: one process per GPU (more are
# refused), and on a CPU two as well as one
nproc=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
# the trainer's defaults are data/flatvel into runs/inversionnet; --resume auto lets the line be run again.
# Paths are quoted as the shell needs them, so each line can be pasted
launch="torchrun --nproc_per_node=$nproc train_inversionnet.py"
[[ "$here" == "$PWD" ]] || launch="cd $(printf %q "$PWD") && $launch"
[[ "$data" == data/flatvel ]] || launch+=" --data-root $(printf %q "$data") --output-dir $(printf %q "runs/$(basename "$data")-torchrun")"
q=$(printf %q "$run")
cat <<SUMMARY

== done
data          $(printf %q "$data") (next: $launch --resume auto)
checkpoints   $q/best.pt, $q/last.pt
metrics       $q/eval/metrics.json, result.txt, per_sample.csv
pictures      $q/eval/*.png
TensorBoard   tensorboard --logdir $q/tb
SUMMARY
