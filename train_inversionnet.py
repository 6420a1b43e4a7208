"""Train InversionNet (OpenFWI) on OpenFWI-format seismic data.

One process (CPU, one GPU, or all visible GPUs with DataParallel):
    python train_inversionnet.py --data-root data/flatvel --epochs 20
    python train_inversionnet.py --train-list split/flatvel_a_train.txt --val-list split/flatvel_a_val.txt --dataset flatvel-a
DDP on one node (NCCL on CUDA, Gloo on CPU):
    torchrun --nproc_per_node=2 train_inversionnet.py
    torchrun --nproc_per_node=8 train_inversionnet.py --data-root /data/flatvel-a --dataset flatvel-a --fast
Several nodes (run on every node; the rendezvous host is any one of them):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=fwi1 --max-restarts=3 train_inversionnet.py --data-root /shared/flatvel-a --resume auto
Sanity check (overfit one batch): python train_inversionnet.py --overfit-batch --max-steps 200

Data stay as stored (float32 mmaps or file reads); OpenFWI's log + min-max normalisation runs on the
training device (or in the loader workers with --normalize workers), never in place on loaded arrays.
Exit codes: 0 done, 2 bad input (one line on stderr), 130/143/129 interrupted by SIGINT/SIGTERM/SIGHUP
after writing last.pt, 3 a non-finite loss or weights that diverged (never saved).
"""
import argparse
import collections
import concurrent.futures
import copy
import datetime
import errno
import fcntl
import importlib.util
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt, unless a launcher set another
if __name__ == "__main__" and SIGINT_AT_START is signal.default_int_handler:  # (`cmd &` ignores it: left so)
    # a Ctrl-C in the seconds the imports below take exits at once (130), without a traceback per torchrun rank
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- constants and errors ----

# OpenFWI dataset_config.json: (data_min, data_max) per family; velocity is always 1500-4500 m/s
DATASETS = {
    "flatvel-a": (-26.95, 52.77), "flatvel-b": (-27.17, 56.05),
    "curvevel-a": (-27.11, 55.10), "curvevel-b": (-29.04, 57.03),
    "flatfault-a": (-26.10, 50.86), "flatfault-b": (-24.86, 50.28),
    "curvefault-a": (-26.48, 52.32), "curvefault-b": (-24.93, 50.98),
    "style-a": (-24.96, 48.93), "style-b": (-23.76, 46.01),
}
LABEL_MIN, LABEL_MAX = 1500.0, 4500.0
DATA_SHAPE, LABEL_SHAPE = (5, 1000, 70), (1, 70, 70)
DEFAULT_TRAIN_SIZE = 0.8  # the fraction of --data-root's files that train, unless they are a released OpenFWI set
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OVERFIT_STEPS = 100  # --overfit-batch's steps when --max-steps is not given
MAX_SEED = 2**31 - 1  # offset by rank and epoch, a seed must stay well inside the 64 bits torch.manual_seed takes
MAX_COUNT = 2**31 - 1  # a count flag's bound (batch, epochs, steps): far past any run, well inside what slicing and torch take


class InputError(Exception):
    """Bad flag, file or value: one line on stderr, exit code 2. Under torchrun every rank meets the same
    bad input and rank 0 alone prints it; a `local` one (a bad sample only this rank read) prints where it is met."""

    def __init__(self, message, local=False):
        super().__init__(message)
        self.local = local


class DataError(InputError):
    """A data file that cannot be used (names the file and, where known, the sample)."""


class NonFiniteLoss(Exception):
    """A NaN/Inf loss, weights an update left NaN/Inf, or an autograd anomaly: exit code 3, last.pt keeps the
    last good state."""


# ---- arguments ----

HELP_HINT = " (--help lists the flags)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each flag's default, except None: the help of such a flag says what leaving it unset means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are InputErrors: one line instead of a page of usage, exit 2, and under
    torchrun printed by rank 0 alone, as --help is."""

    def __init__(self, **kwargs):  # whole flag names only: run.sh screens flags and args.json records them by name
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def print_help(self, file=None):
        if int(os.environ.get("RANK", "0")) == 0:
            super().print_help(file)

    def error(self, message):
        raise InputError(f"{message}{HELP_HINT}")


def path_arg(text):
    """A path flag's value: an empty one (an unset shell variable, say) would silently mean "not given"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def get_args_parser():
    p = ArgumentParser(description="Train InversionNet on OpenFWI-format data.")
    add_data_args(p.add_argument_group("data"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_speed_args(p.add_argument_group("devices and speed"))
    add_run_args(p.add_argument_group("run"))
    return p


def add_data_args(g):
    g.add_argument("--data-root", type=path_arg, default="data/flatvel",
                   help="OpenFWI layout: data/data*.npy + model/model*.npy (or seis*/vel*), split by file")
    g.add_argument("--train-list", type=path_arg, default=None, help="OpenFWI split file (data<TAB>label per line); overrides --data-root")
    g.add_argument("--val-list", type=path_arg, default=None, help="OpenFWI split file for validation (with --train-list)")
    g.add_argument("--train-size", type=float, default=None,
                   help="fraction of files for training with --data-root, drawn by --seed (default: the train.txt / val.txt "
                        f"of a set simulate_openfwi.py made, OpenFWI's own split of a whole released set, else {DEFAULT_TRAIN_SIZE})")
    g.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                   help="normalisation constants from OpenFWI's table; default: the dataset.json beside --train-list or in DATA_ROOT "
                        "if present, else flatvel-a")
    g.add_argument("--stats", type=path_arg, default=None, help="JSON with data_min/data_max/label_min/label_max (simulate_openfwi.py writes one)")
    g.add_argument("--loader", default=None, choices=["map", "iterable", "gpu"],
                   help="map: random access over mmaps; iterable: whole files sharded over ranks and workers (a worker's last batch "
                        "may be smaller; the start-up line counts them); gpu: the normalised "
                        "split cached on the training device (in RAM on a CPU). Unset: map, or with --fast gpu when the split "
                        "takes at most half the free device memory")
    g.add_argument("--cache-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype of the shot gathers in the --loader gpu cache (the labels stay float32). Unset: "
                        "the autocast dtype, else float32")
    g.add_argument("--normalize", default="device", choices=["device", "workers"],
                   help="where the log/min-max normalisation runs (OpenFWI: in workers)")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank; 0: reader threads "
                   "of this process read each batch straight into place (--loader map)")
    g.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=None, help="pinned host batches (default: on with CUDA)")
    g.add_argument("--prefetch-factor", type=int, default=2, help="batches prefetched per worker")
    g.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each loader's workers from epoch to epoch (default: on): no start-up per epoch, and no fork "
                        "as another thread ends, which can hang the new worker on Python before 3.12 (CPython gh-112275)")


def add_optimisation_args(g):
    g.add_argument("--epochs", type=int, default=10, help="epochs to train")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total, validating the model there; the cosine "
                   "schedule decays to its end there, not at --epochs")
    g.add_argument("--batch-size", type=int, default=32, help="samples per step per process")
    g.add_argument("--val-batch-size", type=int, default=None, help="validation batch (default: --batch-size)")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam"], help="optimizer")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (OpenFWI: 1e-4)")
    g.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=True, help="multiply --lr by the world size (OpenFWI)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="Adam betas")
    g.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None, help="fused Adam(W) kernel. Unset: on with CUDA, and with --fast on CPU")
    g.add_argument("--lambda-l1", type=float, default=1.0, help="weight of the L1 loss (paper benchmark: pure L1)")
    g.add_argument("--lambda-l2", type=float, default=0.0, help="weight of the MSE loss")
    g.add_argument("--lr-scheduler", default="warmup-multistep", choices=["warmup-multistep", "step", "cosine", "none"],
                   help="learning-rate schedule, stepped every iteration")
    g.add_argument("--lr-warmup-epochs", type=float, default=0.0, help="linear warm-up (warmup-multistep, cosine)")
    g.add_argument("--lr-milestones", type=float, nargs="*", default=[], help="epochs where warmup-multistep multiplies lr by --lr-gamma")
    g.add_argument("--lr-step-size", type=float, default=30.0, help="StepLR period in epochs")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor of warmup-multistep and step")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="validate, evaluate and save as the checkpoints' 'model' an exponential moving average of the weights "
                        "with this decay per step (e.g. 0.999; 0: off, the trained weights themselves)")
    g.add_argument("--precise-bn", type=int, default=0,
                   help="after each epoch (and at a --max-steps stop), replace the BatchNorm running statistics of the model "
                        "that is validated and saved (the average with --ema-decay) by their average over this many training "
                        "batches (0: keep the running averages)")


def add_speed_args(g):
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="training device")
    g.add_argument("--parallel", default="auto", choices=["auto", "none", "dp", "ddp"],
                   help="auto: DDP under torchrun, DataParallel with several CUDA devices, else none")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False, help="SyncBatchNorm under DDP (CUDA only)")
    g.add_argument("--amp", default=None, choices=list(AMP_DTYPES),
                   help="autocast dtype; fp16 adds a GradScaler. Unset: off, or with --fast bf16 where the device computes it "
                        "natively (CUDA with bf16; CPUs with AVX512-BF16, AMX or Arm BF16)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model. Unset: off, or with --fast on CUDA")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format. Unset: off, or with --fast on CUDA and CPU")
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                   help="the fastest combination measured for this device (bench/RESULTS.md), filling in only the speed flags "
                        "not given: CUDA bf16 autocast (fp16 where the GPU lacks bf16), channels-last, compile, fused AdamW, device "
                        "cache; CPU bf16 autocast where native, channels-last, fused AdamW (torch 2.4+), device cache, no compile. The run's log and args.json say what it chose")
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy, torch (plus the rank) and the file split")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="deterministic algorithms, cudnn.benchmark off: a repeated run gives the same weights")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cudnn autotuner (off with --deterministic)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 tensor cores for float32 convolutions and matmuls on CUDA (10-bit mantissa products, "
                        "float32 sums); --no-tf32: full float32")


def add_run_args(g):
    g.add_argument("--output-dir", type=path_arg, default="runs/inversionnet", help="checkpoints, args.json, train.log and tb/")
    g.add_argument("--config", type=path_arg, default=None,
                   help="a run's args.json: its arguments become the defaults and the flags given here win, so "
                        "--config RUN/args.json --output-dir NEW repeats RUN, with its speed flags as resolved unless "
                        "--fast or --no-fast is given here (--resume and --overwrite are never taken from it)")
    g.add_argument("--resume", type=path_arg, default=None,
                   help="'auto' (OUTPUT_DIR/last.pt if present) or a checkpoint path. Refused, naming the flag, where a setting "
                        "differs from the checkpoint's that would change what the saved position, optimizer state or best.pt "
                        "mean: --batch-size, --loader (map and gpu agree in one process), --num-workers (iterable), --seed "
                        "(inside an epoch), the splits, the normalisation, the optimizer's flags, --lambda-l1/-l2; a different "
                        "world size restarts the current epoch")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace the run in --output-dir: its checkpoints, args.json, provenance.json, train.log, tb/ and "
                        "eval_inversionnet.py's results in eval/ are removed once the new run's checks pass")
    g.add_argument("--init-from", type=path_arg, default=None, help="initial weights: our checkpoint or an OpenFWI one (dict with 'model')")
    g.add_argument("--init-strict", default="yes", choices=["yes", "no"],
                   help="no: load only the --init-from tensors whose names and shapes match the model, and log the rest")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs and after the last (0: never)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines / host syncs")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True, help="TensorBoard logs in OUTPUT_DIR/tb")
    g.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False, help="torch.profiler trace of a few steps into OUTPUT_DIR/tb (torch-tb-profiler)")
    g.add_argument("--detect-anomaly", action=argparse.BooleanOptionalAction, default=False, help="autograd anomaly detection (slow; for debugging; one process only)")
    g.add_argument("--overfit-batch", action=argparse.BooleanOptionalAction, default=False, help=f"sanity mode: train on one fixed batch for --max-steps steps (default {OVERFIT_STEPS}) in one epoch, no validation")


def flag_of(dest):
    """The command-line spelling of an argument's name: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def spelled(dest, value):
    """An argument as the command line gives it: --batch-size 4, --no-scale-lr."""
    if isinstance(value, bool):
        return flag_of(dest if value else "no_" + dest)
    return f"{flag_of(dest)} {shown(value)}"


def shown(value):
    """A value as the command line (or a split record) spells it: lists space-separated."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


CONFIG_SKIP = ("config", "resume", "overwrite")  # a repeated run must not continue or replace the one it repeats


def config_argv(path, given, skip=()):
    """The arguments saved in a run's args.json as command-line flags (less those named in SKIP, and those
    check_args derived from a setting GIVEN afresh), checked by the parser itself."""
    require_file("--config", path)
    try:
        with open(path) as fh:
            saved = json.load(fh)
        assert isinstance(saved, dict)
    except (OSError, ValueError, RecursionError, AssertionError):  # RecursionError: arrays nested beyond the parser's depth
        raise InputError(f"--config {path}: not a readable args.json") from None
    if saved.get("loader") != "gpu":  # the cache dtype of a run without the device cache set nothing
        skip = (*skip, "cache_dtype")
    if "amp" in given and saved.get("cache_dtype") == cache_dtype_of(saved.get("amp")):  # the one its --amp chose
        skip = (*skip, "cache_dtype")
    # what was filled in follows what it came from: a --val-batch-size that was --batch-size's, the one epoch
    # without validation that --overfit-batch imposed, and a cache dtype that was --amp's
    if "batch_size" in given and saved.get("val_batch_size") == saved.get("batch_size"):
        skip = (*skip, "val_batch_size")
    if "overfit_batch" in given and saved.get("overfit_batch"):
        skip = (*skip, "epochs", "val_every")
    return saved_argv(saved, f"--config {path}", tuple(k for k in skip if k not in given))


def saved_argv(saved, where, skip=(), known_only=False):
    """SAVED, a run's arguments as a dict (args.json, a checkpoint's "args"), as command-line flags less those
    named in SKIP (and, with KNOWN_ONLY, settings this version does not have), checked by the parser itself;
    an error names WHERE they came from (the saved value is no flag of the command line --help describes)."""
    parser = get_args_parser()
    known = vars(parser.parse_args([]))
    switches = {a.dest for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)}
    argv = []
    for key, value in saved.items():
        flag = flag_of(key)
        if key not in known and not known_only:
            raise InputError(f"{where}: unknown setting {key!r}")
        if key not in known or key in CONFIG_SKIP or key in skip or value is None:
            continue
        if key in switches and not isinstance(value, bool):  # as a flag's value it would read as a stray argument
            raise InputError(f"{where}: {key} must be true or false, got {value!r}")
        if isinstance(value, bool):
            argv.append(spelled(key, value))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    try:
        parser.parse_args(argv)
    except InputError as e:
        raise InputError(f"{where}: {str(e).removesuffix(HELP_HINT)}") from None
    return argv


def saved_namespace(saved, where):
    """A run's saved arguments (a checkpoint's "args") as the parser reads them back: a hand-edited value is
    one line naming WHERE; a setting this version no longer has cannot matter and is passed over."""
    return get_args_parser().parse_args(saved_argv(saved, where, known_only=True))


def parse_args(argv=None):
    """The command line; with --config, the saved flags come first, so the ones given here win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    if not args.config:
        return args
    given = given_names(argv)  # --data-root given here replaces the saved split lists, which would otherwise win
    skip = ("train_list", "val_list") if "data_root" in given and "train_list" not in given else ()
    for named, other in (("dataset", "stats"), ("stats", "dataset")):  # the normalisation given here, either way
        skip += (other,) if named in given and other not in given else ()
    if "fast" in given:  # args.json holds the speed flags as resolved; --fast / --no-fast here resolves them afresh
        skip += tuple(k for k in SPEED_FLAGS if k not in given)
    return get_args_parser().parse_args(config_argv(args.config, given, skip) + argv)


def from_config(message, config, argv):
    """MESSAGE, naming the --config file when the flag it is about came from that file, not the command line."""
    flag = re.match(r"--([\w-]+)", message)
    if not (config and flag):
        return message
    return message if flag.group(1).replace("-", "_") in given_names(argv) else f"{message} (the value comes from --config {config})"


def given_names(argv):
    """The settings that ARGV itself sets, read as argparse reads it (--batch-size 0 and --batch-size=0 alike)."""
    unset = object()
    ns = argparse.Namespace(**dict.fromkeys(vars(get_args_parser().parse_args([])), unset))  # a default fills no name set here
    return {k for k, v in vars(get_args_parser().parse_args(argv, namespace=ns)).items() if v is not unset}


POSITIVE = ("epochs", "batch_size", "val_batch_size", "log_every", "prefetch_factor", "max_steps", "lr_step_size")
NON_NEGATIVE = ("num_workers", "val_every", "grad_clip", "weight_decay", "lr_warmup_epochs", "precise_bn", "seed",
                "lambda_l1", "lambda_l2")
# bash run.sh trains with --resume auto and refuses --overwrite and --resume: the way to start over there
RUN_SH_RESUMES = "(bash run.sh passes --resume auto: remove its --run directory to start over, or pass another --run)"


def check_workers(n):
    """Beyond a few per CPU, worker processes only contend (and 100,000 of them take the machine down)."""
    limit = 4 * (os.cpu_count() or 1)
    if n > limit:
        raise InputError(f"--num-workers {n} is more than 4 per CPU of this machine ({limit}); the loaders gain nothing beyond a few")


def require_file(flag, path):
    if not os.path.isfile(path):
        what = "a directory, not a file" if os.path.isdir(path) else "not a regular file" if os.path.exists(path) else "no such file"
        raise InputError(f"{flag} {path}: {what}")


def check_args(args):
    """Validate and resolve arguments right after parsing (the speed flags wait for the device: resolve_speed);
    raises InputError naming the flag. NaN fails every range test below, so it is refused too."""
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:  # None: not given
            raise InputError(f"{flag_of(name)} must be positive, got {value}")
        if value is not None and value > MAX_COUNT:
            raise InputError(f"{flag_of(name)} must be at most {MAX_COUNT}, got {value}")
    for name in NON_NEGATIVE:
        if not 0 <= getattr(args, name) < math.inf:
            raise InputError(f"{flag_of(name)} must be >= 0, got {getattr(args, name)}")
    check_workers(args.num_workers)
    if args.batch_size == 1:
        raise InputError("--batch-size must be at least 2: BatchNorm cannot train on one sample")
    if args.val_batch_size is None:
        args.val_batch_size = args.batch_size
    if args.overfit_batch:  # one fixed batch, served --max-steps times in one epoch: nothing to validate
        args.epochs, args.val_every = 1, 0
    if not 0 < args.lr <= 10:  # beyond 10, Adam's first step overflows float32 long before it means anything
        raise InputError(f"--lr must be in (0, 10], got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise InputError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0 < args.lr_gamma <= 1:
        raise InputError(f"--lr-gamma must be in (0, 1] (the factor of each decay), got {args.lr_gamma}")
    if args.seed > MAX_SEED:
        raise InputError(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    if not all(0 <= b < 1 for b in args.betas):
        raise InputError(f"--betas must both be in [0, 1), got {' '.join(map(str, args.betas))}")
    if not all(0 <= m < math.inf for m in args.lr_milestones):
        raise InputError(f"--lr-milestones must be epochs >= 0, got {' '.join(map(str, args.lr_milestones))}")
    if args.lr_milestones and args.lr_scheduler != "warmup-multistep":  # they would be dropped without a word
        raise InputError(f"--lr-milestones apply to --lr-scheduler warmup-multistep, not {args.lr_scheduler} (an empty "
                         f"--lr-milestones drops milestones that came with --config)")
    if args.lr_warmup_epochs and args.lr_scheduler in ("step", "none"):
        raise InputError(f"--lr-warmup-epochs applies to --lr-scheduler warmup-multistep and cosine, not {args.lr_scheduler}")
    if args.init_strict == "no" and not args.init_from:
        raise InputError("--init-strict no applies to the weights of --init-from, and none is given")
    if args.train_size is not None and not 0 < args.train_size < 1:
        raise InputError(f"--train-size must be in (0, 1), got {args.train_size}")
    if args.lambda_l1 + args.lambda_l2 == 0:
        raise InputError("--lambda-l1 and --lambda-l2 must not both be 0")
    if args.val_list and not args.train_list:
        raise InputError("--val-list needs --train-list")
    if args.train_list and not args.val_list and args.val_every:
        raise InputError("--train-list needs --val-list (or --val-every 0 to train without validation)")
    for name in ("train_list", "val_list", "stats", "init_from", "resume"):  # parse_args has read --config already
        if getattr(args, name) is not None and not (name == "resume" and args.resume == "auto"):
            require_file(flag_of(name), getattr(args, name))
    if args.overwrite and args.resume == "auto":
        raise InputError("--overwrite replaces the run in --output-dir and --resume auto continues it: give one of them "
                         f"{RUN_SH_RESUMES}")
    if args.overwrite and (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
                           or int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1):
        # torchrun re-runs the command on a restart, or when nodes join or leave, without a sign on every path
        raise InputError("--overwrite in a torchrun launch that can restart (--max-restarts, or several nodes) would "
                         "delete the run a restarted group has to continue: remove the old run first, or choose another "
                         "--output-dir")
    require_packages(("tqdm", ""), *([("tensorboard", ", or pass --no-tensorboard")] if args.tensorboard else []))
    return args


def require_packages(*needs):
    """NEEDS: (package, another way out) pairs. The packages imported only where they are first used (TensorBoard
    at the first log step, matplotlib at the pictures): one missing is named now, before anything is written,
    not by a traceback after."""
    for name, instead in needs:
        if importlib.util.find_spec(name) is None:
            raise InputError(f"the {name} package is not installed: pip install -r requirements.txt{instead}")


# ---- small helpers: distributed, logging, seeding, devices, files ----

def setup_distributed(parallel="auto", device="auto"):
    """Init the process group when launched by torchrun; returns (rank, world, local_rank)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and parallel in ("none", "dp"):  # each process would train alone into the same --output-dir
        raise InputError(f"--parallel {parallel} under torchrun would start {launched} separate runs writing to one "
                         f"--output-dir: use --parallel ddp (or auto), or launch with python")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1 and parallel in ("auto", "ddp"):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if parallel == "auto" and world == 1:
            return 0, 1, 0
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count() if cuda else 0
        if cuda and per_node > gpus:  # NCCL runs one process per GPU
            raise InputError(f"torchrun started {per_node} processes on this node, which has {gpus} CUDA device(s): "
                             f"use --nproc_per_node={gpus}, or --device cpu")
        if cuda:
            torch.cuda.set_device(local)
        timeout = datetime.timedelta(minutes=30)
        kw = {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0:
            # torchrun keeps one key-value store across restarts; without a key space of its own the new
            # group can read the dead group's addresses and fail to connect ("Connection refused")
            store = next(dist.rendezvous("env://", timeout=timeout))[0]
            kw = dict(store=dist.PrefixStore(f"inversionnet/restart-{restart}", store), rank=rank, world_size=world)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **kw)
        return rank, world, local
    if parallel == "ddp":
        raise InputError("--parallel ddp needs a torchrun launch (torchrun --nproc_per_node=N train_inversionnet.py ...)")
    return 0, 1, 0


def wait_for_ranks(code):
    """Every rank waits for the others before the group goes: a Gloo rank that tore the group down and exited
    while rank 0 still worked (writing its last files) once aborted with 'terminate called without an active
    exception', and torchrun then killed rank 0 mid-write. After a run that stopped (CODE non-zero: a signal's
    130 / 143 / 129, a non-finite loss's 3) a peer that torchrun's next signal killed in the meantime changes
    nothing: rank 0 has written what it writes, and the stop's code stands."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            if code == 0:
                raise


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


_LOG_FILE = None  # OUTPUT_DIR/train.log once the run directory exists; rank 0 appends every line to it


def set_log_file(path):
    global _LOG_FILE
    _LOG_FILE = path


def print0(*msg):
    """Print (and append to train.log) on rank 0 only."""
    if not is_main():
        return
    text = " ".join(str(m) for m in msg)
    try:
        print(text, flush=True)
    except OSError as e:  # the reader went (`| head`), the terminal hung up: training goes on, its lines in train.log
        if e.errno not in (errno.EPIPE, errno.EIO):
            raise
        detach_console((sys.stdout.fileno(),))
    _append_log(text)


def detach_console(fds=(1, 2), terminals_only=False):
    """Point the descriptors FDS (stdout, stderr) at /dev/null, so that neither the next line, the unflushed
    bytes of the last one nor the flush at exit fail again on a console that went away; with TERMINALS_ONLY,
    those on a terminal alone (a file or pipe they were redirected to keeps its lines)."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        if not terminals_only or stat.S_ISCHR(os.fstat(fd).st_mode):  # (isatty itself fails on a hung-up one)
            os.dup2(quiet, fd)
    os.close(quiet)


def log0(text):
    """Append to train.log only, on rank 0 only: for lines the console already shows another way."""
    if is_main():
        _append_log(text)


def _append_log(text, warn=True):
    if _LOG_FILE is None:
        return
    try:
        with open(_LOG_FILE, "a") as fh:
            fh.write(text + "\n")
    except OSError as e:  # a full disk must not kill the run here; the checkpoint write reports it
        if warn:
            print(f"train_inversionnet.py: warning: cannot append to {_LOG_FILE} ({e.strerror}); log file disabled",
                  file=sys.stderr, flush=True)
        set_log_file(None)


def error0(text):
    """A one-line error on stderr (and in train.log), rank 0 only."""
    if is_main():
        print_error("train_inversionnet.py", text)


def print_error(script, line):
    """The error line on stderr, and in train.log once the run has one (rank 0): the log of a start that failed
    says why, as the refusal of the next start tells the user it does (a second line about a full disk would not)."""
    print(f"{script}: error: {line}", file=sys.stderr, flush=True)
    if is_main():
        _append_log(f"error: {line}", warn=False)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def init_worker(worker_id):
    """DataLoader worker_init_fn: numpy/random streams derived from the worker's torch seed, and the worker
    out of the rank's signals. Each worker leads its own process group: torchrun, SLURM and a terminal's
    Ctrl-C signal the rank's whole group, and a worker killed under the step would abort the run before Stop
    can finish the step and save last.pt. The DataLoader still stops its workers by pid, and a worker exits
    by itself when its parent dies."""
    os.setpgid(0, 0)
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def configure_backends(args, device):
    """The one place that chooses cudnn autotuning vs determinism; returns a line for the log."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # each setting both ways: a process that runs twice (tests, notebooks) keeps no choice of an earlier run
    torch.use_deterministic_algorithms(bool(args.deterministic))
    torch.backends.cudnn.deterministic = bool(args.deterministic)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark) and not args.deterministic
    note = f"deterministic algorithms {'on' if args.deterministic else 'off'}"
    if device.type != "cuda":  # cudnn and TF32 are CUDA's: naming them on a CPU would mislead
        return note
    return f"{note}, cudnn.benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}, TF32 {'on' if args.tf32 else 'off'}"


def resolve_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available on this machine")
        return torch.device("cuda", local_rank)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16():
    """Whether this CPU does bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX, Arm BF16), read from
    /proc/cpuinfo (False where there is none). Without it oneDNN emulates bf16, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as fh:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", fh.read()))
    except OSError:
        return False


def free_memory(device):
    """Bytes a data cache may use on the device: CUDA's free memory, MPS's budget, the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":  # (the budget's query came with torch 2.5; requirements.txt allows 2.3)
        budget = getattr(torch.mps, "recommended_max_memory", None)
        return budget() - torch.mps.driver_allocated_memory() if budget else 0
    try:
        with open("/proc/meminfo") as fh:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", fh.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0  # unknown: no cache


SPEED_FLAGS = ("amp", "channels_last", "compile", "fused_adam", "loader", "cache_dtype")


def fast_compute(device):
    """The compute settings --fast picks for a device: the fastest combination measured in bench/."""
    if device.type == "cuda":
        return dict(amp="bf16" if torch.cuda.is_bf16_supported() else "fp16", channels_last=True, compile=True, fused_adam=True)
    if device.type == "cpu":  # torch.compile: no gain after a ~40 s compilation; fused AdamW: 6-10 % faster steps
        cpu_fused = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)  # fused on CPU since torch 2.4
        return dict(amp="bf16" if cpu_has_native_bf16() else "off", channels_last=True, compile=False, fused_adam=cpu_fused)
    return dict(amp="off", channels_last=False, compile=False, fused_adam=False)  # mps: nothing measured there yet


def resolve_speed(args, device, cache_samples=0):
    """Fill in the speed flags not given: --fast's choice for this device, or the plain defaults. The
    device cache (--loader gpu) is chosen when the `cache_samples` this process would hold take at most
    half the free device memory. Returns the line that tells the log what was chosen."""
    given = [flag_of(k) for k in SPEED_FLAGS if getattr(args, k) is not None]
    choice = fast_compute(device) if args.fast else dict(amp="off", channels_last=False, compile=False,
                                                         fused_adam=device.type == "cuda", loader="map")
    amp = args.amp or choice["amp"]
    if amp == "fp16" and device.type == "mps":
        raise InputError("--amp fp16 is not supported on mps; use bf16 or off")
    cache_dtype = args.cache_dtype or cache_dtype_of(amp)
    cache_bytes = cache_size(cache_samples, cache_dtype)
    if args.loader == "gpu":
        check_cache_fits(cache_samples, cache_dtype, device, "use --loader map, or a smaller --cache-dtype")
    if args.fast:
        short = float(cache_bytes * host_share(device) > free_memory(device) / 2)
        # every rank takes the same loader (they shard the samples differently): the cache only where all have room
        choice["loader"] = "map" if all_reduce_sum(torch.tensor([short])).item() else "gpu"
    choice.update(amp=amp, cache_dtype=cache_dtype)
    for k in SPEED_FLAGS:
        if getattr(args, k) is None:
            setattr(args, k, choice[k])
    onoff = lambda v: "on" if v else "off"
    cache = f" ({args.cache_dtype} cache, {cache_bytes / 1e9:.2f} GB)" if args.loader == "gpu" else ""
    why = f"--fast for {device.type}" + (f" (native bf16: {'yes' if cpu_has_native_bf16() else 'no'})" if device.type == "cpu" else "")
    # PyTorch's CPU convolution backward has no fast fp16 kernel (the forward has): measured in bench/RESULTS.md
    warn = ("; note: fp16 training on a CPU is far slower than fp32 (PyTorch's fp16 convolution backward "
            "is a slow generic kernel there): bf16 or off trains faster") if args.amp == "fp16" and device.type == "cpu" else ""
    if "--cache-dtype" in given and args.loader != "gpu":
        warn += f"; note: --cache-dtype has no effect with --loader {args.loader} (it sets the --loader gpu cache)"
    return (f"speed: amp {args.amp}, channels-last {onoff(args.channels_last)}, compile {onoff(args.compile)}, fused adam "
            f"{onoff(args.fused_adam)}, loader {args.loader}{cache}; {why if args.fast else 'defaults'}"
            f"{(', given' + (' or from --config' if args.config else '') + ': ' + ' '.join(given)) if given else ''}{warn}")


def cache_dtype_of(amp):
    """The --loader gpu cache dtype an --amp setting chooses: the precision its forward pass reads anyway."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(amp, "float32")


def cache_size(samples, cache_dtype):
    """Bytes of a --loader gpu cache of SAMPLES samples: shot gathers in CACHE_DTYPE, labels in float32."""
    return samples * (math.prod(DATA_SHAPE) * torch.finfo(getattr(torch, cache_dtype)).bits // 8 + math.prod(LABEL_SHAPE) * 4)


def host_share(device):
    """How many processes' caches one device holds: a host's RAM holds every local rank's, a GPU one rank's."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type != "cuda" else 1


def check_cache_fits(samples, cache_dtype, device, instead):
    """Refuse --loader gpu where the caches of SAMPLES samples per process exceed the device's free memory (when
    it is known): the fill would otherwise end in an out-of-memory error or kill. The ranks agree, as one device
    may have less free than the others: a rank short of memory names its figures (rank 0 alone, where every
    rank is short), and rank 0 says that others are."""
    need, free = cache_size(samples, cache_dtype) * host_share(device), free_memory(device)
    short = 0 < free < need
    ranks_short = int(all_reduce_sum(torch.tensor([float(short)])).item())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if short:
        raise InputError(f"--loader gpu: the split's cache needs {need / 1e9:.2f} GB on {device.type} and "
                         f"{free / 1e9:.2f} GB is free; {instead}", local=ranks_short < world)
    if ranks_short:
        raise InputError(f"--loader gpu: the split's cache does not fit on {ranks_short} of the {world} ranks (their "
                         f"lines say how short); {instead}")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = re.search(r"model name\s*:\s*(.+)", fh.read())
    except OSError:
        model = None
    return f"{device.type}: {model.group(1).strip() if model else platform.processor() or platform.machine()}"


def provenance(device, argv, world=1):
    """What made a run or a result: the code's git commit (and whether its tracked files had changes), the
    library versions, the device, the command line and the start time. None where git cannot say."""
    def git(*cmd):
        try:  # (realpath: a symlinked script's own repository)
            r = subprocess.run(["git", "-C", os.path.dirname(os.path.realpath(__file__)), *cmd], capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    # a copy of the script inside another repository, untracked there, ran code that no commit of it holds
    tracked = git("ls-files", "--error-unmatch", os.path.basename(__file__)) is not None
    commit = git("rev-parse", "HEAD") if tracked else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None  # (None: git failed)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "device": device_name(device), "world_size": world, "command": list(argv), "launcher": launcher(),
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def launcher():
    """torchrun's agent process, which starts each rank and restarts the group (--max-restarts) as host:pid;
    None outside torchrun."""
    return f"{platform.node()}:{os.getppid()}" if "TORCHELASTIC_RUN_ID" in os.environ else None


def refuse_non_file(path):
    """Renaming onto a directory fails only after the write, and onto a device (/dev/null) replaces the
    device: an existing target that is not a regular file is refused first."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OSError(errno.EEXIST, "exists and is not a regular file", path)


def write_atomic(path, data, replace=True):
    """Write bytes or text to PATH.tmp-PID, fsync, rename: a crash at any moment leaves the old file intact.
    One write call of ours, so a failure raises its own error (ENOSPC, EFBIG, or the KeyboardInterrupt of
    a second Ctrl-C); the temporary file never outlives the call. REPLACE False: a file at PATH, one another
    process wrote since the caller looked included, stays, and FileExistsError says so (on a file system
    without hard links, the check is the caller's look alone)."""
    refuse_non_file(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # a hard link: made where the name is free, in one step, or not at all
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: published as a replace
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cpu_copy(obj):
    """OBJ with every tensor copied to the CPU, inside rebuilt dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps its type and attributes: a state_dict's _metadata holds module versions
        out.update((k, cpu_copy(v)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        items = [cpu_copy(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # _fields: a namedtuple
    return copy.deepcopy(obj)  # numbers and strings are returned as they are; anything mutable is copied


class CheckpointWriter:
    """Checkpoints copied to the CPU on the caller's thread, then serialised and written (write_atomic:
    fsync, rename) on a background one, so training goes on while a 293 MB file is made: on an H100 an
    epoch of the gpu profile trains in 1.5 s, and serialising on the training thread cost it 0.3-0.5 s
    more (bench/RESULTS.md).
    Serialised once for all PATHS (last.pt and best.pt), in memory first: torch.save writing into a file
    that hits a full disk reports only "unexpected pos", not the cause. One write at a time: save() and
    wait() first finish the one in flight and raise its error. The thread is not a daemon, so an exit
    still completes a write that has begun."""

    THREAD = "checkpoint-writer"

    def __init__(self):
        self._thread, self._error = None, None

    def save(self, obj, *paths):
        self.wait()
        snapshot = cpu_copy(obj)  # the next training step changes the weights and AdamW's moments in place
        # in a list that _write empties: the Thread keeps its args until it ends, which would hold the copy
        thread = threading.Thread(target=self._write, args=([snapshot], paths), name=self.THREAD)
        thread.start()
        # kept only once started: a second Ctrl-C inside start() leaves a thread that join() refuses (it may
        # never run, or run with start() cut short); exit_at_once, the way out after that Ctrl-C, sees to it
        self._thread = thread

    def _write(self, box, paths):
        try:
            buf = io.BytesIO()
            try:  # popped: once serialised the copy is freed, not held beside buf while the file is written
                torch.save(box.pop(), buf)
            except Exception as e:  # e.g. MemoryError: one line through wait() or close(), as a failed write
                raise InputError(f"cannot serialise checkpoint {' and '.join(paths)}: {type(e).__name__}: {e}") from None
            data = buf.getbuffer()
            for path in paths:
                try:
                    write_atomic(path, data)
                except OSError as e:
                    kept = "; the previous one is intact" if os.path.exists(path) else ""
                    raise InputError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self):
        """wait() on the way out of an error: its own failure becomes a line of its own, so it neither
        hides the error under way nor goes unreported."""
        try:
            self.wait()
        except InputError as e:
            error0(str(e))


# ---- data ----

def log_transform(x):
    return torch.sign(x) * torch.log1p(x.abs()) if torch.is_tensor(x) else math.copysign(math.log1p(abs(x)), x)


class Normalizer:
    """OpenFWI normalisation: data -> log -> min-max [-1, 1]; velocity -> min-max [-1, 1]. Never in place."""

    KEYS = ("data_min", "data_max", "label_min", "label_max")  # as stats files and checkpoints record them

    def __init__(self, data_min, data_max, label_min=LABEL_MIN, label_max=LABEL_MAX):
        self.data_min, self.data_max = float(data_min), float(data_max)
        self.label_min, self.label_max = float(label_min), float(label_max)
        self._lo, self._hi = log_transform(self.data_min), log_transform(self.data_max)

    def data(self, x):
        return (log_transform(x) - self._lo) * (2.0 / (self._hi - self._lo)) - 1.0

    def label(self, y):
        return (y - self.label_min) * (2.0 / (self.label_max - self.label_min)) - 1.0

    @property
    def label_scale(self):
        """Metres per second per unit of the normalised velocity scale: errors convert by this factor."""
        return 0.5 * (self.label_max - self.label_min)

    def label_to_velocity(self, y):
        return (y + 1.0) * self.label_scale + self.label_min

    def as_dict(self):
        return {k: getattr(self, k) for k in self.KEYS}


def stats_path(args):
    """The stats JSON of a run: --stats, else (without --dataset) its data's dataset.json; None when there is none."""
    return args.stats if args.stats or args.dataset else data_stats_file(args)


def data_stats_file(args):
    """The dataset.json that simulate_openfwi.py writes, beside the split lists or in DATA_ROOT; None when there is none."""
    base = os.path.dirname(os.path.abspath(args.train_list)) if args.train_list else args.data_root
    path = os.path.join(base, "dataset.json")
    return path if os.path.isfile(path) else None


def resolve_stats(args):
    """Normalisation constants and where they came from: --stats, --dataset, DATA_ROOT/dataset.json, flatvel-a."""
    path = stats_path(args)
    if path is None:
        lo, hi = DATASETS[args.dataset or "flatvel-a"]
        return Normalizer(lo, hi), f"--dataset {args.dataset}" if args.dataset else "OpenFWI flatvel-a (default)"
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:  # (a UnicodeDecodeError is a ValueError)
        raise InputError(f"{path}: not a usable stats file ({getattr(e, 'strerror', None) or e})") from None
    if not (isinstance(meta, dict) and {"data_min", "data_max"} <= meta.keys()):
        raise InputError(f"{path}: not a usable stats file (expected a JSON object with data_min and data_max, "
                         f"and optionally label_min and label_max, as a simulated set's dataset.json holds)")
    values = meta["data_min"], meta["data_max"], meta.get("label_min", LABEL_MIN), meta.get("label_max", LABEL_MAX)
    return checked_normalizer(path, *values), path


def checked_normalizer(where, data_min, data_max, label_min, label_max):
    """A Normalizer from constants read from WHERE (a stats file, a checkpoint), refused in one line naming it
    unless they are finite numbers with each min below its max."""
    try:
        if any(isinstance(v, (bool, str)) for v in (data_min, data_max, label_min, label_max)):  # float() takes them
            raise TypeError("true, false and text are not numbers")
        norm = Normalizer(data_min, data_max, label_min, label_max)
    except (TypeError, ValueError, OverflowError) as e:  # (an integer of 400 digits overflows a float)
        raise InputError(f"{where}: the constants must be numbers ({e})") from None
    values = (norm.data_min, norm.data_max, norm.label_min, norm.label_max)
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{where}: the constants must be finite numbers, got {', '.join(map(str, values))}")
    if not (norm.data_max > norm.data_min and norm.label_max > norm.label_min):
        raise InputError(f"{where}: min must be below max")
    # the scales 2 / span multiply float32 tensors: a span of 1e-300 (or one that overflows) would make every value inf
    big = float(np.finfo(np.float32).max)
    if not all(2 / big < span < big for span in (norm._hi - norm._lo, norm.label_max - norm.label_min)):
        raise InputError(f"{where}: a range too narrow or too wide to normalise in float32 (data {norm.data_min:g} to "
                         f"{norm.data_max:g}, velocity {norm.label_min:g} to {norm.label_max:g})")
    return norm


_PAIR_RE = re.compile(r"^(data|seis|model|vel)(.*)\.npy$")
_NUMBERED_RE = re.compile(r"^(data|seis|model|vel)(\d+(?:_\d+)*)\.npy$")  # OpenFWI's own: data1, seis2_1_0, ...


def find_pairs(data_root):
    """(data, label) paths under DATA_ROOT/data and DATA_ROOT/model, paired by the name after the prefix."""
    ddir, mdir = os.path.join(data_root, "data"), os.path.join(data_root, "model")
    if os.path.isfile(data_root):
        raise DataError(f"--data-root {data_root} is a file: a split list goes to --train-list / --val-list")
    if not os.path.isdir(data_root):
        run_sh = "bash run.sh" + ("" if os.path.normpath(data_root) == os.path.join("data", "flatvel") else f" --data {data_root}")
        raise DataError(f"--data-root {data_root}: no such directory ({run_sh} makes one, or "
                        f"python simulate_openfwi.py --out {data_root})")
    if not os.path.isdir(ddir) and not os.path.isdir(mdir) and any(n.startswith("seis") for n in os.listdir(data_root)):
        ddir = mdir = data_root  # OpenFWI's fault families: seis*.npy and vel*.npy side by side
    if not os.path.isdir(ddir) or not os.path.isdir(mdir):
        raise DataError(f"--data-root {data_root}: expected subdirectories data/ and model/, or seis*.npy and vel*.npy "
                        "files (OpenFWI's layouts)")

    def keyed(d, prefixes):
        out = {}
        for name in sorted(os.listdir(d)):
            m = _PAIR_RE.match(name)
            if m and m.group(1) in prefixes and not name.endswith("_velocity.npy"):  # --predict's output beside its input
                if m.group(2) in out:  # data1.npy and seis1.npy: one would silently replace the other
                    raise DataError(f"{out[m.group(2)]} and {name}: two files of pair '{m.group(2)}' in one folder; keep "
                                    f"one naming ({' or '.join(prefixes)}), or give --train-list and --val-list")
                out[m.group(2)] = os.path.join(d, name)
        return out

    data, model = keyed(ddir, ("data", "seis")), keyed(mdir, ("model", "vel"))
    if not data:
        raise DataError(f"--data-root {data_root}: no data/*.npy files")
    for k in sorted(set(data) ^ set(model)):
        missing = "model" if k in data else "data"
        raise DataError(f"{data.get(k) or model.get(k)}: has no matching {missing} file")
    return [(data[k], model[k]) for k in sorted(data, key=natural_key)]


def natural_key(name):
    """Sort key that puts data2 before data10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_split_list(path, allow_empty=False):
    """OpenFWI split file: `data_path<TAB>label_path` per line (a line without a tab splits at whitespace, so
    paths with spaces need the tab); relative paths are taken from the file's folder. ALLOW_EMPTY: a validation
    list, which a run without validation (--val-every 0, --val-files 0) may leave empty."""
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark some editors write is no path character
            lines = fh.readlines()
    except (OSError, UnicodeDecodeError) as e:  # a checkpoint's saved list may have moved since
        raise DataError(f"{path}: cannot read this split list ({getattr(e, 'strerror', None) or e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        text = line.strip()
        parts = [p.strip() for p in re.split(r"\t+", text)] if "\t" in text else text.split()
        if len(parts) != 2 or not all(parts):
            raise DataError(f"{path}:{n}: expected 'data_path<TAB>label_path'")
        names = [_NUMBERED_RE.match(os.path.basename(p)) for p in parts]
        if all(names) and names[0].group(2) != names[1].group(2):  # OpenFWI's pairs share their number
            raise DataError(f"{path}:{n}: {parts[0]} is paired with {parts[1]}: a pair's files share their name after "
                            f"the prefix (data1.npy, model1.npy)")
        pairs.append(tuple(p if os.path.isabs(p) else os.path.join(base, p) for p in parts))
    if not pairs and not allow_empty:
        raise DataError(f"{path}: empty split list")
    return pairs


def real_paths(pairs, kind):
    """{real path: the path as given} of the data and label files of a split, however each is spelt, for the
    check that no file is in both splits; a data file listed twice is refused (its samples would count twice;
    a label file may serve several data files: shots of one model with other noise or sources). KIND names
    the split in the message."""
    real = {}
    for d, _ in pairs:
        if (r := os.path.realpath(d)) in real:
            raise DataError(f"{d} is listed twice in the {kind} split: its samples would count twice")
        real[r] = d
    return real | {os.path.realpath(m): m for _, m in pairs}


def split_record(pairs, counts):
    """A split as checkpoints record it: [data file name, label file name, samples] per file."""
    return [[os.path.basename(d), os.path.basename(m), n] for (d, m), n in zip(pairs, counts)]


def openfwi_val_files(pairs):
    """The validation files of OpenFWI's own split when PAIRS are a whole released set, else None. Its split
    files keep the last 12 of the 60 files of a Vel family (49-60), the last 14 of the 134 of a Style family,
    and files G_1_32 to G_1_35 of each of the 3 x 36 of a Fault family."""
    names = [_PAIR_RE.match(os.path.basename(d)) for d, _ in pairs]
    if not all(names):
        return None
    keys = {name.group(2): pair for name, pair in zip(names, pairs)}
    if all(k.isdigit() for k in keys) and {int(k) for k in keys} in ({*range(1, 61)}, {*range(1, 135)}):
        first = 49 if len(keys) == 60 else 121
        return {p for k, p in keys.items() if int(k) >= first}
    parts = [k.split("_") for k in keys]
    if (len(keys) == 108 and all(len(t) == 3 and t[1] == "1" and t[0].isdigit() and t[2].isdigit() for t in parts)
            and len({t[0] for t in parts}) == 3 and {int(t[2]) for t in parts} == {*range(36)}):
        return {p for k, p in keys.items() if int(k.split("_")[2]) >= 32}
    return None


def split_pairs(pairs, train_size, seed):
    """File-level split: with TRAIN_SIZE None, OpenFWI's own split of a whole released set; otherwise (and for
    any other set of files) a seeded shuffle, then the first round(TRAIN_SIZE * n) files train (0.8 if None)."""
    val = openfwi_val_files(pairs) if train_size is None else None
    if val is not None:
        return [p for p in pairs if p not in val], [p for p in pairs if p in val]
    train_size = DEFAULT_TRAIN_SIZE if train_size is None else train_size
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_train = min(max(1, int(round(train_size * len(pairs)))), len(pairs) - 1) if len(pairs) > 1 else len(pairs)
    return [pairs[i] for i in sorted(order[:n_train])], [pairs[i] for i in sorted(order[n_train:])]


def splits(args):
    """The (train, val) file pairs of a run: its split lists, the lists simulate_openfwi.py wrote into
    --data-root (so a run on DATA_ROOT splits as `bash run.sh` does on it), or a file-level split of it."""
    if args.train_list:
        return read_split_list(args.train_list), read_split_list(args.val_list, allow_empty=True) if args.val_list else []
    if lists := simulator_split(args):
        train, val = lists
        return read_split_list(train), read_split_list(val, allow_empty=True)
    return split_pairs(find_pairs(args.data_root), args.train_size, args.seed)


def simulator_split(args):
    """DATA_ROOT's train.txt and val.txt where --data-root takes them: no --train-list or --train-size given,
    and a set simulate_openfwi.py made (its simulate.json beside them)."""
    if args.train_list or args.train_size is not None:
        return None
    paths = [os.path.join(args.data_root, n) for n in ("simulate.json", "train.txt", "val.txt")]
    return paths[1:] if all(os.path.isfile(p) for p in paths) else None


def open_npy(path):
    """A read-only memory map of one .npy file; anything else is a DataError naming the file."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if magic[:4] == b"PK\x03\x04":  # np.load would open a zip archive (.npz) whatever the file is called
            raise DataError(f"{path}: an .npz archive, not a .npy array")
        if magic != b"\x93NUMPY":  # np.load would try it as a pickle and say so
            raise DataError(f"{path}: not a .npy file (no NumPy header)")
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError, OverflowError) as e:  # OverflowError: a negative size in the header
        raise DataError(f"{path}: unreadable or truncated .npy ({getattr(e, 'strerror', None) or e})") from None
    if (extra := os.path.getsize(path) - a.offset - a.nbytes) > 0:  # np.load reads the first array alone
        held = f"{a.shape[0]} samples" if a.ndim else "one value"
        raise DataError(f"{path}: {extra} bytes after its array of {held} (two arrays saved into one file?); save the "
                        f"samples as one array")
    return a


def inspect_pairs(pairs):
    """Check headers, dtypes, shapes and counts of every pair without reading the data; returns counts."""
    counts = []
    for dpath, lpath in pairs:
        arrays = []
        for path, shape in ((dpath, DATA_SHAPE), (lpath, LABEL_SHAPE)):
            if not os.path.isfile(path):
                what = ("a directory, not a .npy file" if os.path.isdir(path) else "not a regular file" if os.path.exists(path)
                        else "no such file")
                raise DataError(f"{path}: {what}")
            a = open_npy(path)
            if a.dtype != np.float32:
                other = "float32 in the other byte order" if a.dtype == np.dtype(np.float32).newbyteorder() else a.dtype
                raise DataError(f"{path}: dtype {a.dtype.str} ({other}), expected float32 in this machine's byte order "
                                f"({np.dtype(np.float32).str}; numpy's .astype(np.float32) converts)")
            if a.ndim != 4 or tuple(a.shape[1:]) != shape:
                raise DataError(f"{path}: shape {tuple(a.shape)}, expected (N, {', '.join(map(str, shape))})")
            arrays.append(a)
        if arrays[0].shape[0] != arrays[1].shape[0]:
            raise DataError(f"{dpath}: {arrays[0].shape[0]} samples but {lpath} has {arrays[1].shape[0]}")
        if arrays[0].shape[0] == 0:
            raise DataError(f"{dpath}: holds no samples")
        counts.append(int(arrays[0].shape[0]))
    return counts


def check_label_range(pairs, normalizer, stats_from):
    """Refuse labels in the wrong units (km/s, already normalised) before training on them: the model's tanh
    output cannot reach them, and nothing else would say so. The median of each file's first maps tells (an
    outlier or a NaN there is the loaders' and the loss guard's to name); a quarter of the range beyond either
    end still passes, for a set a little wider than its constants."""
    lo, hi = normalizer.label_min, normalizer.label_max
    margin = (hi - lo) / 4
    for _, lpath in pairs:
        median = float(np.median(np.load(lpath, mmap_mode="r")[:8]))  # 160 KB a file: a few maps tell
        if math.isnan(median) or lo - margin <= median <= hi + margin:
            continue
        raise DataError(f"{lpath}: velocities around {median:.4g} (the file's median), far outside the "
                        f"normalisation's {lo:g} to {hi:g} m/s ({stats_from}): labels are velocities in m/s, "
                        f"not km/s or normalised; a set with another range gives its label_min and label_max "
                        f"in --stats")


def check_finite(x, y, pair, samples):
    """Raise DataError naming the file (of the pair) and the sample if the blocks x, y (rows numbered SAMPLES
    in their files) hold NaN/Inf: the first such row, its data before its label."""
    if np.isfinite(x).all() and np.isfinite(y).all():  # the common case: one pass over each
        return
    bad_x, bad_y = (~np.isfinite(a.reshape(len(a), -1)).all(1) for a in (x, y))
    row = int(np.argmax(bad_x | bad_y))
    path, kind = (pair[0], "data") if bad_x[row] else (pair[1], "label")
    raise DataError(f"{path} sample {samples[row]}: NaN or Inf in the {kind}", local=True)


def empty_batch(n, pin=False):
    """Tensors for a batch of N samples to be read into: pinned ones from torch's cache of them, else numpy's
    memory. Neither filled with NaN as torch.empty's are under --deterministic: a pass the read overwrites."""
    if pin:
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            return torch.empty((n, *DATA_SHAPE), pin_memory=True), torch.empty((n, *LABEL_SHAPE), pin_memory=True)
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill
    return (torch.from_numpy(np.empty((n, *DATA_SHAPE), np.float32)),
            torch.from_numpy(np.empty((n, *LABEL_SHAPE), np.float32)))


class MapDataset(torch.utils.data.Dataset):
    """Random access over np.load(mmap_mode='r') views; opened lazily in each worker, bounded memory.

    Returns float32 tensors (data, label), copied out of the maps. `transform(x, index)` (eval's seeded
    perturbations) sees the raw data; a Normalizer, if given (--normalize workers), runs last. Never in place."""

    def __init__(self, pairs, counts, normalizer=None, transform=None):
        self.pairs, self.counts, self.normalizer, self.transform = pairs, counts, normalizer, transform
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._maps = None

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, idx):
        f = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        return f, idx - int(self.offsets[f])

    def maps(self):
        if self._maps is None:
            self._maps = [(np.load(d, mmap_mode="r"), np.load(m, mmap_mode="r")) for d, m in self.pairs]
        return self._maps

    def __getitem__(self, idx):
        x, y = empty_batch(1)
        self.read_into([idx], x.numpy(), y.numpy())
        x, y = self.finish_batch([idx], x, y)
        return x[0], y[0]

    def read_into(self, indices, x, y, stop=None):
        """Copy the samples INDICES, as stored, into the batch arrays X, Y, each straight out of its map, until the
        event STOP (if any) is set. numpy alone: reader threads run no torch operation (torch.empty's NaN fill
        under --deterministic, a parallel op, running in two reader threads at once changed a --deterministic
        run's weights)."""
        for i, idx in enumerate(indices):
            if stop is not None and stop.is_set():
                return
            f, j = self.locate(idx)
            np.copyto(x[i], self.maps()[f][0][j])
            np.copyto(y[i], self.maps()[f][1][j])
            check_finite(x[i][None], y[i][None], self.pairs[f], [j])

    def finish_batch(self, indices, x, y):
        """What __getitem__ does after its read, for a batch: the transform per sample, then the normaliser."""
        if self.transform is not None:
            x = torch.stack([self.transform(sample, idx) for sample, idx in zip(x, indices)])
        if self.normalizer is not None:
            x, y = self.normalizer.data(x), self.normalizer.label(y)
        return x, y

    def __getstate__(self):  # never pickle open maps into workers
        state = dict(self.__dict__)
        state["_maps"] = None
        return state


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler whose epoch can start at a given batch: a mid-epoch resume reads none of the
    samples it skips. len() stays the whole epoch's."""

    def __init__(self, dataset, num_replicas, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start * self.batch_size, None)


def shard_ranges(n, parts):
    """Split range(n) into `parts` contiguous, nearly equal pieces (sizes differ by at most 1)."""
    q, r = divmod(n, parts)
    bounds = np.cumsum([0] + [q + (i < r) for i in range(parts)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]


def batch_sizes(n, batch):
    """Sizes of the batches n samples make: full batches, then the remainder, except that a remainder of
    one sample joins the batch before it (BatchNorm cannot train on a batch of 1)."""
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def replica_sizes(batch, replicas):
    """How DataParallel splits a batch over its GPUs (torch.chunk: pieces of ceil(batch / replicas))."""
    piece = -(-batch // replicas)
    return [piece] * (batch // piece) + ([batch % piece] if batch % piece else [])


def round_robin_position(per_worker, start):
    """Where batch `start` of an epoch comes from, given each worker's batch count: the DataLoader takes
    batches from its workers in turn, passing over those that have finished. Returns (how many batches
    each worker yielded before it, the worker that yields it)."""
    skips = [0] * len(per_worker)
    for r in range(max(per_worker, default=0)):
        for w, k in enumerate(per_worker):
            if k > r:
                if start == 0:
                    return skips, w
                skips[w] += 1
                start -= 1
    return skips, 0


def _take(pieces, n):
    """The first n samples of a list of (x, y) array pieces, without copying whole pieces."""
    xs, ys = [], []
    while n:
        x, y = pieces[0]
        if len(x) <= n:
            pieces.pop(0)
        else:
            pieces[0] = (x[n:], y[n:])
            x, y = x[:n], y[:n]
        xs.append(x)
        ys.append(y)
        n -= len(x)
    return (xs[0], ys[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ys))


class IterableFileDataset(torch.utils.data.IterableDataset):
    """Whole files, read once per epoch, sharded over DDP ranks and DataLoader workers; yields batches.

    Each epoch the file order is shuffled from the stream [seed, epoch]; the concatenated samples are cut into
    `world` equal contiguous ranges (dropping fewer than `world` samples, so every rank runs the same
    number of steps), each rank's range into `num_workers` contiguous pieces, and each worker reads
    its files' slices, shuffles samples within each file and yields batches. len() is exact.
    set_epoch(epoch, start) begins the epoch at batch `start`; files wholly before it are not read.
    train=False (validation) keeps the file and sample order and every sample."""

    def __init__(self, pairs, counts, batch_size, rank=0, world=1, num_workers=0, seed=0, train=True,
                 normalizer=None, replicas=1):
        self.pairs, self.counts, self.batch, self.replicas = pairs, counts, batch_size, replicas
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.seed, self.train, self.normalizer = seed, train, normalizer
        self._epoch, self._start = mp.Value("i", 0), mp.Value("i", 0)  # shared, so persistent workers see them

    def set_epoch(self, epoch, start=0):
        self._epoch.value, self._start.value = epoch, start

    @property
    def dropped(self):
        """Samples an epoch leaves out, over all ranks (every rank holds as many)."""
        kept = sum(sum(self.sizes(hi - lo)) for lo, hi in self.worker_ranges())
        return sum(self.counts) - kept * self.world if self.train else 0

    @property
    def smaller(self):
        """Batches of an epoch on this rank that are smaller than batch_size: each worker's remainder."""
        return sum(b < self.batch for lo, hi in self.worker_ranges() for b in self.sizes(hi - lo))

    def rank_range(self):
        n = sum(self.counts)
        if self.train:
            per = n // self.world
            return self.rank * per, (self.rank + 1) * per
        return shard_ranges(n, self.world)[self.rank]

    def worker_ranges(self):
        a, b = self.rank_range()
        return [(lo + a, hi + a) for lo, hi in shard_ranges(b - a, self.workers)]

    def sizes(self, n):
        """Batch sizes of a worker holding n samples. In training, a batch that would leave one sample to a
        model replica (a worker's lone sample, or a remainder DataParallel splits down to one) is not trained
        on: BatchNorm cannot train on a batch of one."""
        s = batch_sizes(n, self.batch)
        return [b for b in s if min(replica_sizes(b, self.replicas)) > 1] if self.train else s

    def __len__(self):
        return sum(len(self.sizes(hi - lo)) for lo, hi in self.worker_ranges())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw = info.num_workers if info is not None else 1
        if nw != self.workers:
            raise RuntimeError(f"IterableFileDataset built for {self.workers} workers, run with {nw}")
        epoch, ranges = self._epoch.value, self.worker_ranges()
        skips, first = round_robin_position([len(self.sizes(b - a)) for a, b in ranges], self._start.value)
        # the DataLoader always asks worker 0 first: rotate the shards so that it serves the one whose turn it is
        wid = (first + (info.id if info is not None else 0)) % nw
        lo, hi = ranges[wid]
        sizes, skip = self.sizes(hi - lo), skips[wid]
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid])
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)) if self.train else np.arange(len(self.pairs))
        skip_samples, pieces, k, file_start = sum(sizes[:skip]), [], skip, 0
        for f in order:  # positions below are in the epoch's concatenation of the ordered files
            start, stop = max(lo, file_start), min(hi, file_start + self.counts[f])  # this worker's slice of file f
            s, e = start - file_start, stop - file_start  # the same slice inside file f
            file_start += self.counts[f]
            if start >= stop:
                continue
            perm = rng.permutation(stop - start) if self.train else np.arange(stop - start)  # drawn even when skipped
            if stop - lo <= skip_samples:
                continue  # every sample of this slice belongs to a skipped batch
            x = np.array(np.load(self.pairs[f][0], mmap_mode="r")[s:e])
            y = np.array(np.load(self.pairs[f][1], mmap_mode="r")[s:e])
            check_finite(x, y, self.pairs[f], range(s, e))
            drop = max(0, skip_samples - (start - lo))  # the head of this slice that skipped batches took
            pieces.append((x[perm][drop:], y[perm][drop:]))
            have = sum(len(p[0]) for p in pieces)
            while k < len(sizes) and have >= sizes[k]:
                yield self._emit(*_take(pieces, sizes[k]))
                have -= sizes[k]
                k += 1

    def _emit(self, x, y):
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self.normalizer is not None:
            x, y = self.normalizer.data(x), self.normalizer.label(y)
        return x, y


class EvalSampler(torch.utils.data.Sampler):
    """Indices rank::world in order: every sample on exactly one rank, none padded."""

    def __init__(self, n, rank, world):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))


def reader_threads():
    """Threads that read data files in this process: 4 x a page-cached read's 2 GB/s is past what a pageable copy
    to a GPU takes; the ranks on a node share the cores this process may use."""
    shared = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else shared  # a launcher may pin ranks
    return max(1, min(4, shared, mine))


def read_samples(pairs, counts, keep, chunk=64):
    """The samples numbered KEEP (ascending, over the files in order) as checked float32 arrays, in chunks of
    at most CHUNK, in order. Threads read and check the chunks ahead of the caller (numpy releases the GIL
    for both): one thread reads a page-cached file at about 2 GB/s, so on a GPU machine filling the
    device cache is otherwise bound by that read. At most 2 x threads + 1 chunks are held at once."""
    def read(dpath, lpath, idx):
        # indexing a memory map with an index array already copies: asarray takes that copy as it is
        x, y = np.asarray(np.load(dpath, mmap_mode="r")[idx]), np.asarray(np.load(lpath, mmap_mode="r")[idx])
        check_finite(x, y, (dpath, lpath), idx)
        return x, y

    starts = np.cumsum([0, *counts])
    jobs = [(dpath, lpath, mine[s:s + chunk])
            for (dpath, lpath), lo, hi in zip(pairs, starts, starts[1:])
            for mine in [keep[(keep >= lo) & (keep < hi)] - lo] for s in range(0, len(mine), chunk)]
    threads = reader_threads()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        ahead = collections.deque()
        for job in jobs:
            ahead.append(pool.submit(read, *job))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


class DeviceLoader:
    """--loader gpu: the split held as one normalised tensor on the device, batched by index there.

    Training: every rank holds the samples rank::world (the remainder below `world` is dropped so all
    ranks step together), shuffles them each epoch from (seed + epoch) and drops the last partial
    batch. Evaluation: rank::world, in order, nothing dropped."""

    normalized = True

    def __init__(self, pairs, counts, normalizer, device, batch_size, cache_dtype=torch.float32,
                 rank=0, world=1, seed=0, train=True):
        total = sum(counts)
        per = total // world if train else len(range(rank, total, world))
        self.x = torch.empty((per, *DATA_SHAPE), dtype=cache_dtype, device=device)
        self.y = torch.empty((per, *LABEL_SHAPE), device=device)  # float32: the metrics' truth, 1.4 % of the bytes
        keep = np.arange(rank, total, world)[:per]
        filled = 0
        for x, y in read_samples(pairs, counts, keep):
            self.x[filled:filled + len(x)] = normalizer.data(torch.from_numpy(x).to(device)).to(cache_dtype)
            self.y[filled:filled + len(x)] = normalizer.label(torch.from_numpy(y).to(device))
            filled += len(x)
        self.batch, self.seed, self.train, self.device = batch_size, seed, train, device
        self.epoch, self.start = 0, 0
        self.dropped = total - per // batch_size * batch_size * world if train else 0  # the partial batch too
        self.smaller = 0  # every batch whole

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        n = len(self.x)
        return n // self.batch if self.train else -(-n // self.batch)

    def __iter__(self):
        n = len(self.x)
        if self.train:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(self.start, len(self)):
            idx = order[b * self.batch:(b + 1) * self.batch]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class BatchReader:
    """--loader map without worker processes (--num-workers 0): reader threads each copy a whole batch out of
    the memory maps (MapDataset.read_into), up to a batch per thread plus one ahead of the loop, in the sampler's
    order, into tensors this thread allocates (pinned on CUDA); the transform and normaliser, if any, run here as
    the batch is handed over. Each sample is copied once where a DataLoader in this process copies it three times
    (out of the map, into the stacked batch, into pinned memory) on the thread that also launches the steps. A
    loop that stops early (a signal, --precise-bn's few batches) does not wait for the reads under way: they stop
    at their next sample (a second Ctrl-C during a wait would land in the generator's finaliser, where Python
    prints and drops it)."""

    def __init__(self, dataset, sampler, batch_size, drop_last, pin_memory):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.pin_memory = pin_memory

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        ds = self.dataset
        ds.maps()  # opened here, not by several threads at once
        raw = ds.transform is None and ds.normalizer is None  # else the finished batch is the one pinned
        threads, stop = reader_threads(), threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(threads)
        try:
            ahead = collections.deque()
            for indices in torch.utils.data.BatchSampler(self.sampler, self.batch_size, self.drop_last):
                x, y = empty_batch(len(indices), self.pin_memory and raw)
                ahead.append((indices, x, y, pool.submit(ds.read_into, indices, x.numpy(), y.numpy(), stop)))
                if len(ahead) > threads:
                    yield self.finish(*ahead.popleft())
            while ahead:
                yield self.finish(*ahead.popleft())
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def finish(self, indices, x, y, read):
        read.result()  # a bad sample's error is raised here
        x, y = self.dataset.finish_batch(indices, x, y)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory and not x.is_pinned() else (x, y)


class Loader:
    """A DataLoader (or BatchReader) plus what the loop needs: set_epoch(epoch, start), len, whether its batches
    come out normalised, and how many samples an epoch drops so that all ranks step together."""

    def __init__(self, loader, epoch_source=None, normalized=False, dropped=0, smaller=0):
        self.loader, self.epoch_source, self.normalized, self.dropped = loader, epoch_source, normalized, dropped
        self.smaller = smaller  # batches of an epoch below the batch size (the iterable loader's remainders)

    def set_epoch(self, epoch, start=0):
        if self.epoch_source is not None:
            self.epoch_source.set_epoch(epoch, start)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


@dataclass
class LoaderConfig:
    """How to load one split; the trainer builds it from its flags, eval and the bench from theirs."""
    kind: str = "map"                 # map | iterable | gpu
    batch_size: int = 32
    num_workers: int = 2
    pin_memory: bool | None = None    # None: on with CUDA
    prefetch_factor: int = 2
    persistent_workers: bool | None = None  # None: on (workers forked once, not each epoch)
    cache_dtype: str = "float32"      # of the --loader gpu cache
    normalize_in_workers: bool = False
    seed: int = 0
    replicas: int = 1                 # DataParallel's GPUs: the iterable loader drops what they cannot split

    @classmethod
    def from_args(cls, args, train, replicas=1):
        return cls(args.loader, args.batch_size if train else args.val_batch_size, args.num_workers, args.pin_memory,
                   args.prefetch_factor, args.persistent_workers, args.cache_dtype, args.normalize == "workers", args.seed,
                   replicas)


def build_loader(cfg, pairs, counts, normalizer, device, rank=0, world=1, train=True, transform=None):
    """The loader of one split. Batches come out raw (normalised on the device by device_batches) unless
    cfg.normalize_in_workers or kind 'gpu' (normalised once, into the cache)."""
    if cfg.kind == "gpu":
        return DeviceLoader(pairs, counts, normalizer, device, cfg.batch_size, getattr(torch, cfg.cache_dtype),
                            rank, world, cfg.seed, train)
    in_workers = normalizer if cfg.normalize_in_workers else None
    pin = device.type == "cuda" and cfg.pin_memory is not False  # pinning helps copies to a GPU only
    kw = dict(num_workers=cfg.num_workers, pin_memory=pin, worker_init_fn=init_worker,
              generator=torch.Generator().manual_seed(cfg.seed + rank))
    if cfg.num_workers > 0:
        kw.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=cfg.persistent_workers is not False)
    if cfg.kind == "iterable":
        ds = IterableFileDataset(pairs, counts, cfg.batch_size, rank, world, cfg.num_workers, cfg.seed, train,
                                 in_workers, cfg.replicas)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, **kw)
        return Loader(dl, ds, in_workers is not None, ds.dropped, ds.smaller)
    ds = MapDataset(pairs, counts, in_workers, transform)
    sampler = EpochSampler(ds, world, rank, cfg.seed, cfg.batch_size) if train else EvalSampler(len(ds), rank, world)
    if cfg.num_workers == 0:
        dl = BatchReader(ds, sampler, cfg.batch_size, train, pin)
    else:
        dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=train, **kw)
    return Loader(dl, sampler if train else None, in_workers is not None,
                  len(ds) - len(dl) * cfg.batch_size * world if train else 0)


class RepeatedBatch:
    """--overfit-batch: one fixed batch, already on the device and normalised, served `n` times."""

    normalized, dropped, smaller = True, 0, 0

    def __init__(self, x, y, n):
        self.x, self.y, self.n, self.start = x, y, n, 0

    def set_epoch(self, epoch, start=0):
        self.start = start

    def __len__(self):
        return self.n

    def __iter__(self):
        return ((self.x, self.y) for _ in range(self.start, self.n))


def device_batches(loader, device, normalizer, channels_last=False):
    """Move batches to the device and normalise them there. On CUDA the next batch is copied and
    normalised on a side stream while the current one computes."""
    def prepare(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not loader.normalized:
            x, y = normalizer.data(x.float()), normalizer.label(y.float())
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    if device.type != "cuda" or isinstance(loader, (DeviceLoader, RepeatedBatch)):
        for x, y in loader:
            yield prepare(x, y)
        return
    stream = torch.cuda.Stream(device)
    it = iter(loader)

    def stage():
        try:
            x, y = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            return prepare(x, y)

    nxt = stage()
    while nxt is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        x, y = nxt
        x.record_stream(torch.cuda.current_stream(device))
        y.record_stream(torch.cuda.current_stream(device))
        nxt = stage()
        yield x, y


# ---- model (OpenFWI network.py, same module names so state_dicts load with strict=True) ----

class Block(nn.Module):
    """Conv (or transposed conv) -> BatchNorm -> LeakyReLU(0.2), or tanh for the last block. The three
    layers sit in `.layers` so the state_dict keys are OpenFWI's (`convblock1.layers.0.weight`, ...)."""

    def __init__(self, in_fea, out_fea, kernel_size=3, stride=1, padding=1, transpose=False, tanh=False):
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.layers = nn.Sequential(conv(in_fea, out_fea, kernel_size, stride, padding), nn.BatchNorm2d(out_fea),
                                    nn.Tanh() if tanh else nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x):
        return self.layers(x)


def up(in_fea, out_fea, kernel_size=4, stride=2, padding=1):
    """The decoder's upsampling block: a transposed conv, BatchNorm, LeakyReLU."""
    return Block(in_fea, out_fea, kernel_size, stride, padding, transpose=True)


class InversionNet(nn.Module):
    """InversionNet: (B, 5, 1000, 70) normalised shot gathers -> (B, 1, 70, 70) velocity in [-1, 1]."""

    def __init__(self, dim1=32, dim2=64, dim3=128, dim4=256, dim5=512):
        super().__init__()
        self.convblock1 = Block(5, dim1, kernel_size=(7, 1), stride=(2, 1), padding=(3, 0))
        self.convblock2_1 = Block(dim1, dim2, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock2_2 = Block(dim2, dim2, kernel_size=(3, 1), padding=(1, 0))
        self.convblock3_1 = Block(dim2, dim2, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock3_2 = Block(dim2, dim2, kernel_size=(3, 1), padding=(1, 0))
        self.convblock4_1 = Block(dim2, dim3, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))
        self.convblock4_2 = Block(dim3, dim3, kernel_size=(3, 1), padding=(1, 0))
        self.convblock5_1 = Block(dim3, dim3, stride=2)
        self.convblock5_2 = Block(dim3, dim3)
        self.convblock6_1 = Block(dim3, dim4, stride=2)
        self.convblock6_2 = Block(dim4, dim4)
        self.convblock7_1 = Block(dim4, dim4, stride=2)
        self.convblock7_2 = Block(dim4, dim4)
        self.convblock8 = Block(dim4, dim5, kernel_size=(8, math.ceil(70 / 8)), padding=0)
        self.deconv1_1 = up(dim5, dim5, kernel_size=5, padding=0)
        self.deconv1_2 = Block(dim5, dim5)
        self.deconv2_1 = up(dim5, dim4)
        self.deconv2_2 = Block(dim4, dim4)
        self.deconv3_1 = up(dim4, dim3)
        self.deconv3_2 = Block(dim3, dim3)
        self.deconv4_1 = up(dim3, dim2)
        self.deconv4_2 = Block(dim2, dim2)
        self.deconv5_1 = up(dim2, dim1)
        self.deconv5_2 = Block(dim1, dim1)
        self.deconv6 = Block(dim1, 1, tanh=True)

    def forward(self, x):                 # (B, 5, 1000, 70): sources, time samples, receivers
        # encoder: shrink time to the receivers' width, then both axes to one 512-channel vector
        x = self.convblock1(x)            # (B, 32, 500, 70)
        x = self.convblock2_1(x)          # (B, 64, 250, 70)
        x = self.convblock2_2(x)          # (B, 64, 250, 70)
        x = self.convblock3_1(x)          # (B, 64, 125, 70)
        x = self.convblock3_2(x)          # (B, 64, 125, 70)
        x = self.convblock4_1(x)          # (B, 128, 63, 70)
        x = self.convblock4_2(x)          # (B, 128, 63, 70)
        x = self.convblock5_1(x)          # (B, 128, 32, 35)
        x = self.convblock5_2(x)          # (B, 128, 32, 35)
        x = self.convblock6_1(x)          # (B, 256, 16, 18)
        x = self.convblock6_2(x)          # (B, 256, 16, 18)
        x = self.convblock7_1(x)          # (B, 256, 8, 9)
        x = self.convblock7_2(x)          # (B, 256, 8, 9)
        x = self.convblock8(x)            # (B, 512, 1, 1)
        # decoder: upsample to 80 x 80, crop to the 70 x 70 velocity grid
        x = self.deconv1_1(x)             # (B, 512, 5, 5)
        x = self.deconv1_2(x)             # (B, 512, 5, 5)
        x = self.deconv2_1(x)             # (B, 256, 10, 10)
        x = self.deconv2_2(x)             # (B, 256, 10, 10)
        x = self.deconv3_1(x)             # (B, 128, 20, 20)
        x = self.deconv3_2(x)             # (B, 128, 20, 20)
        x = self.deconv4_1(x)             # (B, 64, 40, 40)
        x = self.deconv4_2(x)             # (B, 64, 40, 40)
        x = self.deconv5_1(x)             # (B, 32, 80, 80)
        x = self.deconv5_2(x)             # (B, 32, 80, 80)
        x = F.pad(x, [-5, -5, -5, -5])    # (B, 32, 70, 70)
        return self.deconv6(x)            # (B, 1, 70, 70), tanh: in [-1, 1]


def clean_state_dict(sd):
    """Drop DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}


def checkpoint_types():
    """What checkpoints hold besides tensors and plain values, none of which runs code as it loads: OpenFWI's
    `args` Namespace, the NumPy RNG state's array, and the torch version string of provenance."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed the module its arrays pickle through
    return [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct,
            type(torch.__version__)]


def load_checkpoint(path, mmap=False):
    """torch.load without running code from the file (torch before 2.5 has no allow-list to give weights_only
    loading, and loads as torch.save wrote); with MMAP, tensors are read only when used."""
    if not hasattr(torch.serialization, "safe_globals"):
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(checkpoint_types()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_state_dict(path):
    """(the checkpoint as stored, its model state_dict without wrapper prefixes)."""
    try:
        ckpt = load_checkpoint(path)
    except OSError as e:  # permissions, say: the system's reason
        raise InputError(f"{path}: not a readable checkpoint ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # truncated zip, pickle garbage, objects that could run code as they load ...
        raise InputError(f"{path}: {unreadable_checkpoint(path, e)}") from None
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise InputError(f"{path}: holds no model state_dict")
    bad = first_non_finite(sd.items())
    if bad is not None:  # every prediction from it would be NaN
        raise InputError(f"{path}: its weights hold NaN or Inf ({bad}); use a checkpoint saved before the run diverged")
    return ckpt, clean_state_dict(sd)


def first_non_finite(named_tensors):
    """The name of the first floating-point tensor holding NaN or Inf, or None (tensors on one device: one host
    sync for them all)."""
    named = [(k, v) for k, v in named_tensors if v.is_floating_point()]
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]) if named else torch.ones(0, dtype=torch.bool)
    bad = (~finite).nonzero().flatten().tolist()
    return named[bad[0]][0] if bad else None


def unreadable_checkpoint(path, error):
    """Why torch.load failed on PATH: objects beyond tensors and plain values (named), or not a checkpoint."""
    try:
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in checkpoint_types()}
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # not a torch.save zip file at all
        unsafe = []
    if unsafe:
        return (f"holds objects other than tensors and plain values ({', '.join(unsafe[:3])}), and loading them could "
                f"run code from the file: not loaded (if you trust its source, re-save its state_dict alone)")
    return f"not a readable checkpoint ({type(error).__name__}): another kind of file, or a copy cut short"


def load_weights(model, path, hint=""):
    """Load our checkpoint, an OpenFWI checkpoint (dict with 'model') or a bare state_dict, strictly;
    returns the checkpoint."""
    ckpt, sd = read_state_dict(path)
    load_exactly(model, sd, f"{path}:", hint)
    return ckpt


def load_exactly(model, sd, whose, hint=""):
    """model.load_state_dict(sd) where every tensor fits; else one line, starting with WHOSE, that names the
    first tensors that do not fit or are missing (torch's own message lists every key, and cut short, none)."""
    if not all(torch.is_tensor(v) for v in sd.values()):
        raise InputError(f"{whose} not a state_dict of tensors")
    try:  # torch decides what fits (BatchNorm fills in a num_batches_tracked an older checkpoint lacks)
        model.load_state_dict(sd, strict=True)
    except RuntimeError:
        own = model.state_dict()
        unfit, missing = unfit_tensors(own, sd), [k for k in own if k not in sd]
        what = ([f"{len(unfit)} tensors that do not fit: {listed(unfit)}"] if unfit else []) + (
            [f"{len(missing)} of the model's missing: {listed(missing)}"] if missing else [])
        raise InputError(f"{whose} incompatible with InversionNet ({'; '.join(what)}){hint}") from None


def unfit_tensors(own, sd):
    """The tensors of SD that a model's state_dict OWN cannot take, each as 'name shape vs the model's shape'
    or 'name shape not in the model'."""
    return [f"{k} {tuple(v.shape)}" + (f" vs {tuple(own[k].shape)}" if k in own else " not in the model")
            for k, v in sd.items() if not (k in own and own[k].shape == v.shape)]


def listed(names, n=6):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_matching(model, path):
    """--init-strict no: load the tensors whose names and shapes match the model, for fine-tuning a changed
    model; returns the line that says what was skipped and what stays freshly initialised."""
    _, sd = read_state_dict(path)
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise InputError(f"--init-from {path}: no tensor matches the model's names and shapes; nothing to fine-tune from")
    model.load_state_dict(take, strict=False)
    skipped, fresh = unfit_tensors(own, sd), [k for k in own if k not in take]
    return (f"--init-from {path}: loaded {len(take)} of the model's {len(own)} tensors; skipped {len(skipped)}"
            f"{': ' + listed(skipped) if skipped else ''}; freshly initialised {len(fresh)}{': ' + listed(fresh) if fresh else ''}")


# ---- metrics (OpenFWI test.py definitions; eval_inversionnet.py uses these) ----

def gaussian_blur_matrix(n, size, sigma, device, dtype):
    """(n, n) matrix A such that A @ X filters the rows of X with the 1-D Gaussian window, zero padded: the
    2-D window is the outer product of two, so A_h @ X @ A_w.T is the zero-padded 'same' convolution."""
    g = torch.exp(-((torch.arange(size, dtype=dtype) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    i = torch.arange(n)
    offset = i[None, :] - i[:, None] + size // 2  # A[i, a] = g[a - i + size // 2] inside the window
    inside = (offset >= 0) & (offset < size)
    return torch.where(inside, g[offset.clamp(0, size - 1)], 0.0).to(device=device, dtype=dtype)


def accum_dtype(device):
    """The dtype that SSIM and every running sum (metrics, loss) use on DEVICE: float64, or float32 on MPS,
    which has no float64 and refuses to make a tensor of it."""
    return torch.float32 if device.type == "mps" else torch.float64


def ssim_per_sample(pred, target, window_size=11, sigma=1.5):
    """SSIM of each sample on maps in [-1, 1], computed on (x + 1) / 2: Gaussian 11x11 window,
    sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, zero-padded 'same' convolution, mean over pixels. In float64
    (float32 on MPS, which has none): on layered velocity maps the local variances are differences of nearly
    equal numbers, which float32 leaves 1e-4 off and a TF32 convolution (cuDNN's default on CUDA) by 1e-2.
    The window filters as two matrix products, which run as fast in float64 as the convolution in float32."""
    dtype = accum_dtype(pred.device)
    x, y = (pred.to(dtype) + 1) / 2, (target.to(dtype) + 1) / 2
    a_h, a_w = (gaussian_blur_matrix(n, window_size, sigma, x.device, dtype) for n in x.shape[-2:])
    blur = lambda t: a_h @ t @ a_w.T
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def per_sample_metrics(pred, target):
    """(B, 3) float32: each sample's MAE, MSE and SSIM on the normalised scale."""
    p, t = pred.float(), target.float()
    return torch.stack([(p - t).abs().flatten(1).mean(1), ((p - t) ** 2).flatten(1).mean(1), ssim_per_sample(p, t)], 1)


def metric_sums(per_sample):
    """(n, 3) per-sample metrics -> [sum of MAE, MSE, SSIM, count] (accum_dtype), on their device, no host sync."""
    m = per_sample.to(accum_dtype(per_sample.device))
    return torch.cat([m.sum(0), torch.ones_like(m[:1, 0]) * len(m)])


def summarize(sums):
    """(sum, count) -> means: MAE, MSE, RMSE = sqrt(MSE), SSIM, all on the normalised scale."""
    mae, mse, ssim_sum, count = sums.tolist()
    n = max(count, 1.0)  # an empty set: zeros, not a division by zero
    return {"mae": mae / n, "mse": mse / n, "rmse": math.sqrt(mse / n), "ssim": ssim_sum / n, "count": int(count)}


def all_reduce_sum(t):
    if dist.is_initialized():
        t = t.clone()
        if dist.get_backend() == "nccl" and not t.is_cuda:
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu()


# ---- the training step, the loop and evaluation ----

def forward(model, x, amp_dtype):
    """MODEL on the batch X under autocast AMP_DTYPE, or in float32 when None (a bf16/fp16 device cache then
    feeds fp32 weights in fp32): mixed precision as a toggle on one code path."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x if amp_dtype else x.float())


def loss_fn(pred, target, l1=1.0, l2=0.0):
    """l1 * L1 + l2 * MSE on the normalised maps, in float32 whatever the autocast dtype."""
    loss = 0.0
    if l1:
        loss = loss + l1 * F.l1_loss(pred.float(), target.float())
    if l2:
        loss = loss + l2 * F.mse_loss(pred.float(), target.float())
    return loss


def build_scheduler(optimizer, args, iters_per_epoch, start=0):
    """Every schedule as a per-iteration LambdaLR, so it is stepped (and resumed) the same way; `start`:
    the iteration it begins at (the optimizer's param groups then carry their 'initial_lr')."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, iters_per_epoch), last_epoch=start - 1)


SCHEDULE_FLAGS = ("lr_scheduler", "epochs", "max_steps", "lr_warmup_epochs", "lr_milestones", "lr_step_size", "lr_gamma")


def total_steps(args, iters_per_epoch):
    """The run's last step: the end of --epochs, or --max-steps when that comes first."""
    return args.epochs * iters_per_epoch if args.max_steps is None else min(args.epochs * iters_per_epoch, args.max_steps)


def lr_factor(args, iters_per_epoch):
    """The schedule's multiplier of the learning rate at each iteration, as the SCHEDULE_FLAGS set it."""
    ipe = max(iters_per_epoch, 1)
    warm = args.lr_warmup_epochs * ipe
    total = total_steps(args, ipe)

    def warmup(it):
        return 1e-5 + (1 - 1e-5) * it / warm if it < warm else 1.0  # OpenFWI warmup_factor 1e-5

    if args.lr_scheduler == "warmup-multistep":
        miles = sorted(m * ipe for m in args.lr_milestones)
        fn = lambda it: warmup(it) * args.lr_gamma ** sum(it >= m for m in miles)
    elif args.lr_scheduler == "step":
        fn = lambda it: args.lr_gamma ** (it // (args.lr_step_size * ipe))  # a float power: 0 (not an error) at inf
    elif args.lr_scheduler == "cosine":
        fn = lambda it: warmup(it) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, it - warm) / max(1, total - warm))))
    else:
        fn = lambda it: 1.0
    return fn


def schedule_note(saved, args, run):
    """'; note: ...' when the flags give the steps to come another learning rate than the run's own schedule
    did (SAVED: its arguments): a cosine schedule spans --epochs and --max-steps, so extending a run draws the
    rest of it out anew, and a run that had decayed to nothing trains at a high rate again."""
    ipe, base = run.meta["batches_per_epoch"], scaled_lr(args, run.world)
    now, was = (base * lr_factor(a, ipe)(run.step) for a in (args, saved))  # after k steps, the next trains at factor(k)
    if math.isclose(now, was, rel_tol=1e-9):
        return ""
    changed = ", ".join(f"{spelled(k, getattr(args, k))} (was {shown(getattr(saved, k))})" for k in SCHEDULE_FLAGS
                        if getattr(args, k) != getattr(saved, k))  # (numbers: 30 == 30.0)
    return (f"; note: {changed} changes the learning-rate schedule: the next steps train at {now:.3g}, where the "
            f"run's schedule gives {was:.3g}")


# (loss summed over samples and ranks, those samples, the batch they begin at): a stopped epoch's running
# mean, which its checkpoint keeps so that the resumed epoch's loss goes on from it
NO_EPOCH_LOSS = (0.0, 0, 0)


@dataclass
class Run:
    """What a training step touches, and the counters a checkpoint records."""
    model: nn.Module                  # what the step calls: the DDP/DataParallel wrapper and/or torch.compile
    raw_model: nn.Module              # the bare InversionNet under it: trained and saved, keys unprefixed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler      # enabled for fp16 only
    device: torch.device
    normalizer: Normalizer | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    loss_weights: tuple = (1.0, 0.0)  # (L1, MSE)
    grad_clip: float = 0.0
    world: int = 1
    step: int = 0                     # optimizer steps taken
    epoch: int = 0                    # the epoch under way, or the next to start
    batch_in_epoch: int = 0           # batches of `epoch` already trained
    best_loss: float = math.inf       # lowest validation loss so far
    epoch_loss: tuple = NO_EPOCH_LOSS  # where a stopped epoch's running loss stood, for its resume
    val_due: bool = False             # a signal stopped the validation (or --precise-bn) of the steps so far: a resume runs it first
    meta: dict = field(default_factory=dict)  # what checkpoints carry besides the state: split, provenance
    ema: "WeightEMA | None" = None    # --ema-decay

    @property
    def eval_model(self):
        """The weights that are validated and saved as 'model': the EMA's with --ema-decay, else the trained ones."""
        return self.raw_model if self.ema is None else self.ema.model


class WeightEMA:
    """--ema-decay: an exponential moving average of the weights and BatchNorm statistics, updated after every
    step in one fused pass. The decay ramps up as (1 + t) / (10 + t) over the first steps t, so the average
    does not hold on to the random initialisation."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)
        mine, live = self.model.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        params = dict.fromkeys(n for n, _ in model.named_parameters())  # in the model's order
        self.weights = ([mine[k].data for k in params], [live[k].data for k in params])  # views of the live tensors
        floats = [k for k in live if k not in params and live[k].is_floating_point()]  # BatchNorm's statistics
        self.stats = ([mine[k].data for k in floats], [live[k].data for k in floats])
        self.counters = [(mine[k].data, live[k].data) for k in live if not live[k].is_floating_point()]

    @torch.no_grad()
    def update(self, step):
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(*self.weights, weight)
        ema_stats, stats = self.stats
        if stats and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP keeps the weights equal on every rank, not the BatchNorm statistics (each follows its own
            # batches): the average follows their mean, so that every rank holds the same average at every step
            # and rank 0's, which a checkpoint saves mid-epoch, is the whole of it. One small all-reduce.
            flat = torch.cat([t.flatten() for t in stats])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            stats = [t.view_as(b) for t, b in zip(flat.split([b.numel() for b in stats]), stats)]
        torch._foreach_lerp_(ema_stats, stats, weight)
        for mine, theirs in self.counters:
            mine.copy_(theirs)


def resolve_parallel(parallel, device):
    """--parallel auto: DDP under torchrun, DataParallel when one process sees several GPUs, else none."""
    if parallel == "auto":
        return "ddp" if dist.is_initialized() else ("dp" if device.type == "cuda" and torch.cuda.device_count() > 1 else "none")
    return parallel


def dp_gpus(parallel, device):
    """The GPUs DataParallel splits each batch over (all it sees), or 1 without it."""
    return torch.cuda.device_count() if resolve_parallel(parallel, device) == "dp" else 1


class ReplicaAutocast(nn.Module):
    """DataParallel runs each replica in a thread of its own and re-enters autocast there without a dtype,
    so the replicas would compute in that thread's default (fp16 on CUDA) under --amp bf16: each replica
    sets the run's dtype itself. Only DataParallel's replicas go through it; the saved keys are raw_model's."""

    def __init__(self, module, amp_dtype):
        super().__init__()
        self.module, self.amp_dtype = module, amp_dtype

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return self.module(x)


def wrap_model(model, device, parallel, local, sync_bn, amp_dtype):
    """The module the step calls and its name: DDP, DataParallel or the model itself."""
    parallel = resolve_parallel(parallel, device)
    if parallel == "ddp":
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None), "ddp"
    if parallel == "dp":
        return nn.DataParallel(ReplicaAutocast(model, amp_dtype)), "dp"
    return model, "none"


def scaled_lr(args, world):
    """--lr for the whole batch of WORLD ranks: multiplied by the world size under --scale-lr, as OpenFWI does."""
    return args.lr * (world if args.scale_lr else 1)


def build_run(args, device, iters_per_epoch, world=1, local=0, normalizer=None):
    """InversionNet, its wrappers, optimizer, schedule and scaler as the flags ask (speed flags resolved by
    resolve_speed); returns (Run, parallel mode)."""
    raw = InversionNet()  # --init-from's weights come in restore(), which knows whether a checkpoint replaces them
    raw.to(device)
    if args.channels_last:
        raw.to(memory_format=torch.channels_last)
    model, parallel = wrap_model(raw, device, args.parallel, local, args.sync_bn, AMP_DTYPES[args.amp])
    if parallel == "ddp" and args.sync_bn:
        raw = model.module  # the module whose BatchNorms were converted (in place, as torch does it today) trains
    if args.compile:
        model = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(raw.parameters(), lr=scaled_lr(args, world), betas=tuple(args.betas),
                        weight_decay=args.weight_decay, **({"fused": True} if args.fused_adam else {}))
    scaler = torch.amp.GradScaler(device.type if device.type != "mps" else "cpu", enabled=args.amp == "fp16")
    run = Run(model, raw, optimizer, build_scheduler(optimizer, args, iters_per_epoch), scaler, device, normalizer,
              AMP_DTYPES[args.amp], args.channels_last, (args.lambda_l1, args.lambda_l2), args.grad_clip, world,
              ema=WeightEMA(raw, args.ema_decay) if args.ema_decay else None)
    return run, parallel


def quiet_schedule_order_warning():
    """The schedule counts iterations, skipped or not; an fp16 step that the GradScaler skipped is logged at the
    log step, and PyTorch's warning about the order of the two steps would read as a fault of the run."""
    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def train_step(run, x, y):
    """One optimizer step on a batch already on the device; returns the detached loss. No host sync, but for
    GradScaler's check for inf gradients with fp16 and an unfused optimizer."""
    try:
        loss = loss_fn(forward(run.model, x, run.amp_dtype), y, *run.loss_weights)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
    except RuntimeError as e:
        if not torch.is_anomaly_enabled():
            raise
        # --detect-anomaly: autograd names the op whose backward made NaN; say where it happened
        first = str(e).strip().splitlines()[0]
        raise NonFiniteLoss(f"autograd anomaly at epoch {run.epoch}, batch {run.batch_in_epoch + 1} (step {run.step + 1}): {first}") from None
    if run.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.step)
    return loss.detach()


def in_finalizer(frame):
    """Whether FRAME runs inside a __del__, however deep."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


STOP_CHECK_SECONDS = 5  # under DDP, the most training time between two checks for a signal: torchrun (and
                        # SLURM) kill the ranks 30 s after the SIGTERM or Ctrl-C they forward


class Stop:
    """Whether to leave the loop, decided in one place: a SIGINT/SIGTERM/SIGHUP on any rank, or --max-steps.
    check() all-reduces the signal under DDP, so every rank leaves at the same step; `now` and `signum`
    hold that agreed decision. A second Ctrl-C stops at once."""

    def __init__(self, max_steps=None):
        self.max_steps, self.received, self.signum, self.now = max_steps, None, None, False
        self._old = {}
        self.every, self.last_check = 1, None  # DDP's cadence of checks, in steps, and (time, step) of the last

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        # the terminal closing (an ssh session dropped) ends the run as SIGTERM does, with its checkpoint; unless
        # the launch asked to outlive it (nohup leaves SIGHUP ignored)
        if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handle)

    def _handle(self, signum, frame):
        if signum == getattr(signal, "SIGHUP", None):
            detach_console(terminals_only=True)  # writes to a terminal that hung up fail (EIO): train.log has them
        # not inside a finaliser (a DataLoader iterator's __del__ joining its workers as the epoch ends):
        # Python would print its traceback as "Exception ignored" and go on as if the key had not been pressed
        if self.received is not None and signum == signal.SIGINT and not in_finalizer(frame):
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    def reached_max(self, run):
        return self.max_steps is not None and run.step >= self.max_steps

    def pending(self, run):
        """A reason to check now: --max-steps reached (the same step on every rank); in a single process, a
        signal; under DDP, every `every` steps (besides the log steps), a cadence the ranks agree on at each
        check so that about STOP_CHECK_SECONDS of training pass between checks."""
        if self.reached_max(run):
            return True
        return run.step % self.every == 0 if dist.is_initialized() else self.received is not None

    def check(self, run):
        signum = self.received or 0
        if dist.is_initialized():  # one collective: the signal (max) and the next cadence (min, as a max of -every)
            now, every = time.perf_counter(), 1
            if self.last_check is not None and run.step > self.last_check[1]:
                per_step = (now - self.last_check[0]) / (run.step - self.last_check[1])
                every = max(1, int(STOP_CHECK_SECONDS / max(per_step, 1e-9)))
            self.last_check = now, run.step
            t = torch.tensor([signum, -every], device=run.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum, least = t.tolist()  # one host sync for both
            self.every = -least
        self.signum = signum or None
        self.now = self.signum is not None or self.reached_max(run)
        return self.now


def shows_bar(progress):
    """Whether a tqdm bar is drawn: asked for, on rank 0, and on a terminal (a pipe or a log file would get
    every redraw; the lines the bar stands for are printed instead)."""
    return progress and is_main() and sys.stderr.isatty()


NO_BAD_BATCH = torch.iinfo(torch.long).max  # Monitor.bad_at while every loss of the epoch is finite


class Monitor:
    """The log step: progress bar, a fixed-format line, TensorBoard scalars and the NaN check. Losses
    and the first non-finite batch stay on the device between log steps: log() is their one host sync."""

    def __init__(self, log_every=10, progress=False, writer=None, profiler=None):
        self.log_every, self.progress, self.writer, self.profiler = log_every, progress, writer, profiler
        self.bar = None

    def start_epoch(self, run, n_batches):
        from tqdm import tqdm
        self.n_batches = n_batches
        self.bar = tqdm(total=n_batches, initial=run.batch_in_epoch, desc=f"epoch {run.epoch}", dynamic_ncols=True,
                        leave=False, disable=not shows_bar(self.progress))
        # a resumed epoch's running mean goes on from its checkpoint's sums (a checkpoint without them: the mean
        # covers the batches from loss_from on); one rank carries them, as mean_loss adds the ranks'
        loss, samples, self.loss_from = run.epoch_loss if run.epoch_loss[1] else (0.0, 0, run.batch_in_epoch)
        if samples and not is_main():
            loss, samples = 0.0, 0
        run.epoch_loss = NO_EPOCH_LOSS
        self.loss_sum = torch.full((), loss, device=run.device, dtype=accum_dtype(run.device))  # sum over samples, on the device
        self.samples = samples
        self.bad_at = torch.full((), NO_BAD_BATCH, device=run.device, dtype=torch.long)
        self.seen, self.t_wait, self.t_last = 0, 0.0, time.perf_counter()
        self.scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        self.lr = self.lr_next = run.optimizer.param_groups[0]["lr"]

    def timed(self, batches):
        """The batches, with the time spent waiting for each added to the data-wait share."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.t_wait += time.perf_counter() - t0
            yield batch

    def after_step(self, run, loss, n):
        b = torch.full_like(self.bad_at, run.batch_in_epoch - 1)
        self.bad_at = torch.where((self.bad_at == NO_BAD_BATCH) & ~torch.isfinite(loss), b, self.bad_at)
        self.loss_sum.add_(loss.to(self.loss_sum.dtype), alpha=n)
        self.seen, self.samples = self.seen + n, self.samples + n
        # the step has moved the schedule on: the rate it trained at is the one read before it
        self.lr, self.lr_next = self.lr_next, run.optimizer.param_groups[0]["lr"]
        if self.profiler is not None:
            self.profiler.step()

    def due(self, run):
        return run.step % self.log_every == 0 or run.batch_in_epoch == self.n_batches

    def log(self, run):
        if dist.is_initialized():  # every rank must stop on a NaN any rank saw, or the rest hang
            dist.all_reduce(self.bad_at, op=dist.ReduceOp.MIN)  # the earliest: a NaN spreads to every rank a step later
        bad = self.bad_at.item()
        if bad != NO_BAD_BATCH:
            step = run.step - (run.batch_in_epoch - 1 - bad)
            raise NonFiniteLoss(f"non-finite loss at epoch {run.epoch}, batch {bad + 1}/{self.n_batches} (step {step})")
        now = time.perf_counter()
        span = max(now - self.t_last, 1e-9)
        rate, wait = self.seen * run.world / span, self.t_wait / span
        lr, mean = self.lr, self.mean_loss()
        if self.scale is not None and run.scaler.get_scale() < self.scale:
            print0(f"step {run.step}: fp16 GradScaler skipped a step (overflow); scale now {run.scaler.get_scale():g}")
        self.scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}", wait=f"{100 * wait:.0f}%")
        self.bar.update(run.batch_in_epoch - self.bar.n)
        line = (f"epoch {run.epoch} step {run.step} batch {run.batch_in_epoch}/{self.n_batches} loss {mean:.5f} "
                f"lr {lr:.3e} samples/s {rate:.1f} data-wait {100 * wait:.1f}%")
        if shows_bar(self.progress):  # the bar shows these figures; train.log keeps the record
            log0(line)
        else:
            print0(line)
        self.scalars("train", {"loss": mean, "lr": lr, "samples_per_s": rate, "data_wait": wait}, run.step)
        self.seen, self.t_wait, self.t_last = 0, 0.0, now

    def mean_loss(self):
        """The mean loss per sample so far this epoch, over every rank (batches can differ in size); under DDP a
        collective, so every rank calls it at the same step (the log steps, the epoch's end)."""
        total = torch.stack([self.loss_sum, torch.full_like(self.loss_sum, self.samples)])
        if dist.is_initialized():
            dist.all_reduce(total)
        loss_sum, samples = total.tolist()  # one host sync for both
        self.totals = (loss_sum, int(samples))
        return loss_sum / max(samples, 1)

    def scalars(self, prefix, values, step):
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag, pred, true, step):
        """Truth beside prediction, both mapped from [-1, 1] to [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, ((torch.cat([true[0], pred[0]], dim=-1) + 1) / 2).clamp(0, 1), step)

    def end_epoch(self):
        """The epoch's mean train loss per sample, over every rank."""
        self.bar.close()
        return self.mean_loss()

    def close(self):
        if self.profiler is not None:
            self.profiler.stop()
        if self.writer is not None:
            self.writer.close()


def train_one_epoch(run, loader, monitor, stop):
    """Train run.epoch from batch run.batch_in_epoch until its end or an agreed stop; returns the mean loss.
    Host syncs (the NaN check, the stop agreement) happen only at log steps, and under DDP at the stop
    checks between them, about every STOP_CHECK_SECONDS of training from each epoch's first step (Stop.pending)."""
    run.model.train()
    # at --max-steps already (a resume that runs the validation due there) it trains nothing
    loader.set_epoch(run.epoch, start=len(loader) if stop.reached_max(run) else run.batch_in_epoch)
    monitor.start_epoch(run, len(loader))
    for x, y in monitor.timed(device_batches(loader, run.device, run.normalizer, run.channels_last)):
        loss = train_step(run, x, y)
        run.batch_in_epoch += 1
        monitor.after_step(run, loss, len(x))
        due = monitor.due(run)
        if due or stop.pending(run):
            if stop.check(run) or due:
                monitor.log(run)  # (a stop logs too: its NaN check comes before last.pt is written)
            if stop.now:
                break
    if run.batch_in_epoch < len(loader) and not (stop.now or stop.reached_max(run)):
        raise RuntimeError(f"the loader ended after {run.batch_in_epoch} of {len(loader)} batches")
    return monitor.end_epoch()


@torch.no_grad()
def precise_bn(run, loader, n_batches, stop=None):
    """--precise-bn: BatchNorm statistics recomputed as the plain average over n training batches of the
    current weights (train-mode forward passes, no gradient). The momentum-0.1 running averages lag a
    model whose weights move fast, so validation swings from epoch to epoch (measured on the CPU recipe:
    val MAE 0.13-0.82 with them, a steady decline with these). Averaged over ranks under DDP, so every
    rank validates and saves the same statistics. A signal that STOP receives puts the statistics back as
    they were and returns False: a Ctrl-C need not wait for the batches, and last.pt holds no partial average.
    The ranks agree on it before each batch, as a SyncBatchNorm forward is a collective."""
    model = run.eval_model  # the weights validation measures
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [[b.clone() for b in m.buffers()] for m in bns]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    loader.set_epoch(run.epoch)
    stopped = False
    for _, (x, _) in zip(range(n_batches), device_batches(loader, run.device, run.normalizer, run.channels_last)):
        if stop is not None and stop.check(run) and stop.signum is not None:
            stopped = True
            break
        forward(model, x, run.amp_dtype)
    for m, momentum, saved in zip(bns, momenta, before):
        m.momentum = momentum
        if stopped:
            for b, old in zip(m.buffers(), saved):
                b.copy_(old)
    if not stopped:
        average_over_ranks(model.buffers())
    return not stopped


@torch.no_grad()
def average_over_ranks(tensors):
    """Floating-point tensors replaced by their mean over DDP ranks, in place. Each rank's BatchNorm running
    statistics follow its own batches (DDP copies rank 0's only at the next forward): averaged before
    validation, every rank measures, and rank 0 saves, the same model."""
    if dist.is_initialized():
        for t in tensors:
            if t.is_floating_point():
                dist.all_reduce(t)
                t /= dist.get_world_size()


@torch.no_grad()
def evaluate(model, loader, device, normalizer=None, amp_dtype=None, channels_last=False, loss_weights=(1.0, 0.0),
             per_sample=False, progress=False, stop=None):
    """Loss and metrics over a split, reduced exactly over ranks as (sum, count); `first` holds the first
    prediction and truth. With per_sample, `per_sample` is this rank's (n, 3) MAE, MSE, SSIM in loader order.
    A signal that STOP receives ends the pass early (its figures then cover part of the split: the caller
    asks Stop.check whether to use them); every rank still meets the others in the final reduction."""
    from tqdm import tqdm
    model.eval()
    sums = torch.zeros(5, dtype=accum_dtype(device), device=device)  # MAE, MSE, SSIM, count, loss (sums)
    rows, first = [], None
    batches = device_batches(loader, device, normalizer, channels_last)
    for x, y in tqdm(batches, total=len(loader), desc="eval", leave=False, disable=not shows_bar(progress)):
        if stop is not None and stop.received is not None:
            break
        pred, y = forward(model, x, amp_dtype).float(), y.float()  # metrics accumulate in float32/float64 whatever the forward ran in
        m = per_sample_metrics(pred, y)
        sums += torch.cat([metric_sums(m), (loss_fn(pred, y, *loss_weights).to(sums.dtype) * len(m))[None]])
        if per_sample:
            rows.append(m.cpu())
        if first is None:
            first = (pred[:1].cpu(), y[:1].cpu())
    total = all_reduce_sum(sums.cpu())
    out = summarize(total[:4])
    out["loss"], out["first"] = total[4].item() / max(total[3].item(), 1.0), first
    if per_sample:
        out["per_sample"] = torch.cat(rows) if rows else torch.zeros(0, 3)
    return out


def validate(run, loader, monitor, stop):
    """Validation metrics of run.eval_model (unwrapped, the average with --ema-decay); returns (log text, whether
    the loss improved), or (None, False) when a signal stopped it: a validation of a large split on a CPU takes
    minutes, which a Ctrl-C should not have to wait for. A NaN or Inf loss (summed over the ranks, so every rank
    sees it) means weights that diverged, though finite: they are not saved."""
    m = evaluate(run.eval_model, loader, run.device, run.normalizer, run.amp_dtype, run.channels_last, run.loss_weights,
                 stop=stop)
    if stop.check(run) and stop.signum is not None:  # agreed over ranks, as in the epoch
        return None, False
    if not math.isfinite(m["loss"]):
        fp16 = " (or the fp16 forward pass overflowed: --amp bf16 avoids that)" if run.amp_dtype == torch.float16 else ""
        raise NonFiniteLoss(f"non-finite validation loss at epoch {run.epoch} (step {run.step}): the weights "
                            f"diverged{fp16}")
    monitor.scalars("val", {k: m[k] for k in ("loss", "mae", "rmse", "ssim")}, run.step)
    if m["first"] is not None:  # None on a DDP rank whose share of a small split is empty
        monitor.image("val/prediction_vs_truth", *m["first"], run.step)
    improved = m["loss"] < run.best_loss
    run.best_loss = min(run.best_loss, m["loss"])
    return f" | val loss {m['loss']:.5f} MAE {m['mae']:.4f} RMSE {m['rmse']:.4f} SSIM {m['ssim']:.4f}", improved


def say_if_complete(run, args, stop, n_batches):
    if run.epoch >= args.epochs and args.overfit_batch:
        print0(f"the run is complete: its --overfit-batch epoch of {n_batches} steps is trained; --overwrite runs it again")
    elif run.epoch >= args.epochs:
        print0(f"the run is complete: {run.epoch} of --epochs {args.epochs} trained; a larger --epochs trains on")
    elif stop.reached_max(run) and not run.val_due:
        print0(f"the run has reached --max-steps {args.max_steps} (step {run.step}); a larger --max-steps trains on")


class TimeLeft:
    """The wall time the run's remaining steps take at this process's pace (validations and checkpoints included), as
    the end of each epoch's line: on a slow machine the first epochs say what the run will cost. This process's
    first epoch pays one-off costs (a torch.compile run compiles for tens of seconds in it), so the pace is that of
    the epochs after it; a run that compiles nothing says its first epoch's pace meanwhile."""

    def __init__(self, run, args, n_batches):
        self.total = total_steps(args, n_batches)
        self.since, self.first, self.compiles = (run.step, time.perf_counter()), True, args.compile

    def after_epoch(self, run):
        (step, t), now = self.since, time.perf_counter()
        if self.first:
            self.since, self.first = (run.step, now), False
            if self.compiles:
                return ""
        if run.step >= self.total or run.step <= step:
            return ""
        s = (now - t) / (run.step - step) * (self.total - run.step)
        return f"; about {s:.0f} s left" if s < 90 else f"; about {s / 60:.0f} min left" if s < 5400 else f"; about {s / 3600:.1f} h left"


def fit(run, train_loader, val_loader, monitor, args):
    """The epoch loop: train, validate, checkpoint, until --epochs, --max-steps or a signal. Returns the exit code."""
    stop, writer = Stop(args.max_steps), CheckpointWriter()
    start, time_left = run.step, TimeLeft(run, args, len(train_loader))
    # a larger --max-steps trains on and validates where it ends; --val-every 0 (no split) validates nothing
    run.val_due &= stop.reached_max(run) and val_loader is not None
    say_if_complete(run, args, stop, len(train_loader))
    stop.install()
    try:
        while run.epoch < args.epochs and (run.val_due or not stop.check(run)):
            t0 = time.perf_counter()
            train_loss = train_one_epoch(run, train_loader, monitor, stop)
            run.val_due = False  # (a due validation comes below, as the run's final one)
            done = run.batch_in_epoch == len(train_loader)
            run.epoch_loss = (*monitor.totals, monitor.loss_from)  # until the epoch is closed: what its resume goes on from
            if not (done or stop.reached_max(run)):  # a signal inside the epoch: last.pt records where
                save_checkpoint(run, args, writer, "last.pt")
                break
            # the loss is the mean over the epoch's batches so far, resumed or not (a checkpoint of an older format
            # holds no sums: then the line says where the batches it covers began, and so do the resumes after it)
            part = ((f" from batch {monitor.loss_from}" if monitor.loss_from else "")
                    + ("" if done else f" to batch {run.batch_in_epoch}/{len(train_loader)}"))
            line, improved, t1 = f"epoch {run.epoch}{part} train loss {train_loss:.5f}", False, time.perf_counter()
            average_over_ranks(run.raw_model.buffers())  # (the average's are the same on every rank already)
            # inside an epoch too: the resumed epoch's end recomputes them again. A signal stops them where a resume
            # comes back to them: not at --max-steps without a validation split (nothing is due there then)
            bn_stop = stop if val_loader is not None or not stop.reached_max(run) else None
            stopped = "--precise-bn" if args.precise_bn and not precise_bn(run, train_loader, args.precise_bn, bn_stop) else None
            # the run's last training is validated too (the last epoch, --max-steps), so a run whose --val-every
            # does not divide it still ends with a validated best.pt: run.sh's eval stage reads it
            final = run.epoch + 1 == args.epochs or stop.reached_max(run)
            if not stopped and val_loader is not None and (((run.epoch + 1) % args.val_every == 0 and done) or final):
                text, improved = validate(run, val_loader, monitor, stop)
                stopped = "validation" if text is None else None
                line += text or ""
            if stopped:  # last.pt keeps the training but not what follows it: a resume runs that first
                run.val_due = True
                save_checkpoint(run, args, writer, "last.pt")
                print0(f"{line} | {stopped} stopped by the signal; a resume runs it")
                break
            if done:
                run.epoch, run.batch_in_epoch, run.epoch_loss = run.epoch + 1, 0, NO_EPOCH_LOSS
            t2 = time.perf_counter()
            try:  # the epoch's line is printed even when the previous checkpoint's write turns out to have failed
                # a run that never validated keeps every epoch's weights in best.pt for eval; one that did keeps
                # its best. best.pt goes before the last.pt whose best_loss vouches for it: a kill or a full disk
                # between the two then leaves a last.pt that retrains the epoch, never one claiming a best.pt not written
                unvalidated = val_loader is None and math.isinf(run.best_loss)
                save_checkpoint(run, args, writer, *(["best.pt"] if improved or unvalidated else []), "last.pt")
            finally:
                times = {"train": t1 - t0, "val": t2 - t1, "checkpoint": time.perf_counter() - t2}
                monitor.scalars("epoch_seconds", times, run.step)
                print0(f"{line} | {', '.join(f'{v:.1f} s {k}' for k, v in times.items())}{time_left.after_epoch(run)}")
        writer.wait()  # (a last.pt the loop has just handed to rank 0's writer is there now)
        # the ranks agree on rank 0's answer: the others' writers wait for nothing, and their file system may differ
        missing = is_main() and not os.path.isfile(os.path.join(args.output_dir, "last.pt"))
        if run.step == start and run.step and all_reduce_sum(torch.tensor([int(missing)])).item():
            # resumed from another directory with nothing left to train: this one is still left a run to continue
            save_checkpoint(run, args, writer, "last.pt")
            writer.wait()
            print0(f"{os.path.join(args.output_dir, 'last.pt')} written: the resumed state, which --resume auto continues there")
    except NonFiniteLoss as e:
        writer.close()
        last_pt = os.path.join(args.output_dir, "last.pt")
        error0(f"{e}; {last_pt + ' keeps the last good state' if os.path.isfile(last_pt) else 'no checkpoint was written before it'}")
        return 3
    finally:
        stop.restore()
        monitor.close()
        writer.close()  # whatever ends the loop, a write under way lands (or says why not) first
    if stop.signum is not None:
        print0(f"stopped by signal {stop.signum} at step {run.step}; last.pt written, resume with --resume auto")
        return 128 + stop.signum
    if stop.reached_max(run) and run.epoch < args.epochs and run.step > start:
        print0(f"stopped at --max-steps {args.max_steps} (epoch {run.epoch}, batch {run.batch_in_epoch}); last.pt written")
    return 0


# ---- checkpoints ----

def rng_state():
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run, args, writer, *names):
    """last.pt / best.pt of the run's current state, written by rank 0 through the CheckpointWriter. Weights
    that the last update made NaN or Inf (a finite loss, then a step too large) are never saved, nor BatchNorm
    statistics gone NaN/Inf; the ranks agree on it (inside an epoch their statistics differ), so all stop alike."""
    weights = {"model": run.eval_model.state_dict()} | ({"train_model": run.raw_model.state_dict()} if run.ema else {})
    bad = first_non_finite((f"{key} {name}", t) for key, sd in weights.items() for name, t in sd.items())
    if all_reduce_sum(torch.tensor([int(bad is not None)])).item():
        raise NonFiniteLoss(f"the {bad or 'state of another rank'} holds NaN or Inf after step {run.step}: an update "
                            f"diverged")
    if not is_main():
        return
    ckpt = {**weights, "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "epoch": run.epoch, "step": run.step, "batch_in_epoch": run.batch_in_epoch, "best_loss": run.best_loss,
            "epoch_loss": list(run.epoch_loss), "val_due": run.val_due,
            "world": run.world, "args": vars(args), "normalization": run.normalizer.as_dict(), "rng": rng_state(),
            **run.meta, "format": "inversionnet-harness-2"}
    writer.save(ckpt, *(os.path.join(args.output_dir, name) for name in names))


def check_resumable(ckpt, trained_args, path, args, meta, world, normalization):
    """Refuse a resume that would mean something other than the flags say, naming what changed: the
    position inside the epoch depends on the batch size and loader (in one process the map and device loaders
    agree; --fast picks between them by free memory), on the seed that shuffled the epoch and on the split and
    the batches an epoch has, unless the world size changed (restore() then restarts the epoch); the optimizer
    state it restores carries the optimizer's own settings, the weights learnt one normalisation, and best.pt
    was kept by the loss on one validation split (META: this run's split records and batches per epoch;
    TRAINED_ARGS: the checkpoint's arguments as the parser reads them)."""
    saved = {k: v for k, v in vars(trained_args).items() if k in ckpt["args"]}
    trained = ckpt.get("normalization", normalization)
    if not same_normalization(trained, normalization):
        raise InputError(f"the normalisation ({shown_normalization(normalization)}) differs from the one {path} was "
                         f"trained with ({shown_normalization(trained)}): other data, or another --dataset / --stats; "
                         f"resume with the run's data and constants, or start a new run (--init-from {path} to start "
                         f"from its weights)")
    position = ("batch_size", "loader") + (("num_workers",) if args.loader == "iterable" else ())  # its shards follow the workers
    same_world = ckpt.get("world", world) == world
    if same_world and world == 1 and {saved.get("loader"), args.loader} <= {"map", "gpu"}:
        position = ("batch_size",)  # one process: both serve one permutation of the split per epoch, batch by batch
    if ckpt.get("batch_in_epoch", 0) and same_world:
        position += ("seed",)  # the batches already trained are those of the saved seed's order
    scaled = ("scale_lr",) if same_world and world > 1 else ()  # (a new world size rebases the rate)
    keys = ("overfit_batch", *position, "optimizer", "lr", *scaled, "weight_decay", "betas", "lambda_l1", "lambda_l2")
    for key in keys:
        if key in saved and shown(saved[key]) != shown(getattr(args, key)):
            where = ("the position inside the epoch" if ckpt.get("batch_in_epoch", 0) else
                     "the steps per epoch of the lr schedule" if key == "batch_size" else "the batches of the epochs to come")
            why = (where if key in position else
                   "what the steps train on (one repeated batch, or the split)" if key == "overfit_batch" else
                   "the validation loss that keeps best.pt" if key.startswith("lambda") else "the optimizer state")
            was = spelled(key, saved[key]) if isinstance(saved[key], bool) else shown(saved[key])
            raise InputError(f"{spelled(key, getattr(args, key))} differs from the {was} that {path} was trained "
                             f"with: {why} would mean something else; resume with {spelled(key, saved[key])} or "
                             f"start a new run")
    check_same_split(ckpt.get("split", meta["split"]), meta["split"], path, args, "training", "trained")
    if math.isfinite(ckpt["best_loss"]) and args.val_every:  # (no loss to compare: never validated, or not now)
        check_same_split(ckpt.get("val_split", meta["val_split"]), meta["val_split"], path, args, "validation",
                         "validated", ": the loss that keeps best.pt would compare two sets")
    batches = meta["batches_per_epoch"]
    was = ckpt.get("batches_per_epoch", batches)
    if was != batches and args.overfit_batch:  # its one epoch is --max-steps long
        raise InputError(f"--max-steps {batches} differs from the {was} steps of the --overfit-batch epoch of {path}: "
                         f"resume with --max-steps {was} or start a new run")
    if was != batches and same_world:  # the flags and the split agree, yet:
        raise InputError(f"an epoch of {path} had {was} batches and has {batches} now (--loader iterable leaves out "
                         f"the remainders that DataParallel's GPUs cannot split): the position inside the epoch would "
                         f"mean something else; resume with as many GPUs or start a new run")


def check_same_split(was, now, path, args, kind, verb, why=""):
    """Refuse a resume whose KIND ('training', 'validation') split record differs from the checkpoint's."""
    def described(split):
        return f"{len(split)} file{'s' * (len(split) != 1)}, {sum(n for *_, n in split)} samples"
    if was != now:
        raise InputError(f"the {kind} split ({described(now)}) differs from the one {path} was {verb} on ({described(was)}"
                         f"{first_difference(was, now)}){why}; resume with that split or start a new run{simulated_hint(args)}")


def simulated_hint(args):
    """Where --data-root takes the simulator's lists, how to get the seeded split of files instead."""
    if not simulator_split(args):
        return ""
    return (f" (--data-root splits as its simulator's train.txt / val.txt; --train-size {DEFAULT_TRAIN_SIZE} draws "
            f"files by --seed instead)")


def first_difference(was, now):
    """'; file i is now X, was Y' for the first file where two split records differ, a file one of them lacks
    included (files added to a set, or removed from it)."""
    pad = [None] * abs(len(was) - len(now))
    i = next((i for i, (a, b) in enumerate(zip(list(now) + pad, list(was) + pad)) if a != b), None)
    if i is None:
        return ""
    return "; file {} is now {}, was {}".format(
        i + 1, *(shown(r[i]) if i < len(r) else "absent" for r in (now, was)))


def is_training_checkpoint(ckpt):
    """What restore() reads, there and of the types it computes with (a crafted or foreign file fails here, in
    one line, not in the middle of the resume)."""
    required = ("optimizer", "scheduler", "scaler", "epoch", "step", "best_loss", "args")
    counters = ("epoch", "step", "batch_in_epoch", "world", "batches_per_epoch")
    return (isinstance(ckpt, dict) and all(k in ckpt for k in required)
            and all(type(ckpt.get(k, 0)) is int and ckpt.get(k, 0) >= 0 for k in counters)
            and ckpt.get("batch_in_epoch", 0) <= ckpt.get("batches_per_epoch", math.inf)
            and isinstance(ckpt["best_loss"], float) and ckpt["best_loss"] >= 0  # inf until a validation; never NaN
            and type(ckpt.get("val_due", False)) is bool
            and epoch_loss_ok(ckpt.get("epoch_loss", NO_EPOCH_LOSS))
            and all(isinstance(ckpt.get(k, {}), dict) for k in ("args", "train_model", "scheduler", "scaler"))
            and split_record_ok(ckpt.get("split", [])) and split_record_ok(ckpt.get("val_split", []))  # where recorded
            and ("normalization" not in ckpt or normalization_ok(ckpt["normalization"]))
            and rng_record_ok(ckpt.get("rng", {})))


def epoch_loss_ok(record):
    """A finite, non-negative loss sum, the samples it is over (none: a zero sum) and the batch they begin at."""
    return (isinstance(record, (list, tuple)) and len(record) == 3 and isinstance(record[0], float)
            and math.isfinite(record[0]) and record[0] >= 0 and all(type(n) is int and n >= 0 for n in record[1:])
            and (record[1] > 0 or record[0] == 0))


def rng_record_ok(st):
    """Of the types set_rng_state() takes, where recorded (an empty record sets nothing)."""
    return isinstance(st, dict) and (not st or (isinstance(st.get("python"), tuple) and isinstance(st.get("numpy"), tuple)
                                                and isinstance(st.get("torch"), torch.Tensor)))


def split_record_ok(split):
    return isinstance(split, list) and all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str)
                                           and isinstance(r[1], str) and type(r[2]) is int for r in split)


def same_normalization(a, b):
    return all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in b)


def shown_normalization(d):
    return f"data {d['data_min']:.7g} to {d['data_max']:.7g}, velocity {d['label_min']:.7g} to {d['label_max']:.7g}"


def normalization_ok(norm):
    return (isinstance(norm, dict) and set(norm) == set(Normalizer.KEYS)
            and all(type(v) in (int, float) for v in norm.values()))


def start_new(run, args, path):
    """A new run's weights: InversionNet's initialisation, or those of --init-from (with --init-strict no, the
    tensors that fit). Returns the line to log, or None."""
    notes = [f"--resume auto: no {path} yet, starting a new run"] if args.resume == "auto" else []
    if args.init_from and args.init_strict == "yes":
        load_weights(run.raw_model, args.init_from, hint="; --init-strict no loads the tensors that fit")
        notes.append(f"weights from --init-from {args.init_from}")
    elif args.init_from:
        notes.append(load_matching(run.raw_model, args.init_from))
    if args.init_from and run.ema is not None:
        run.ema.model.load_state_dict(run.raw_model.state_dict())  # the average starts from the weights that train
    return "; ".join(notes) or None


def restore(run, args, rank):
    """Continue from --resume (or OUTPUT_DIR/last.pt with 'auto'): weights, optimizer, schedule, scaler,
    counters and RNG; or start a new run (start_new). A different world size restarts the current epoch with
    the step count and the schedule rebased to it (its batches would otherwise be split another way). Returns
    the line to log."""
    path = os.path.join(args.output_dir, "last.pt") if args.resume == "auto" else args.resume
    if not path or not os.path.isfile(path):
        return start_new(run, args, path)
    ckpt = load_weights(run.raw_model, path)
    if not is_training_checkpoint(ckpt):
        raise InputError(f"{path}: not a training checkpoint of this script (use --init-from for its weights)")
    trained_args = saved_namespace(ckpt["args"], f"{path}: its training arguments")
    check_resumable(ckpt, trained_args, path, args, run.meta, run.world, run.normalizer.as_dict())
    if not args.val_every and "val_split" in ckpt:  # nothing validated now: best.pt's loss stays that of its split
        run.meta["val_split"] = ckpt["val_split"]
    if run.ema is not None:  # 'model' holds the average, or (a run without one until now) the weights it starts from
        run.ema.model.load_state_dict(run.raw_model.state_dict())
    if "train_model" in ckpt:  # an --ema-decay run's trained weights
        load_exactly(run.raw_model, ckpt["train_model"], f"{path}: its train_model is")
    ema = ""
    if run.ema is not None and "train_model" not in ckpt:
        ema = "; the weight EMA starts from its weights"
    elif run.ema is None and "train_model" in ckpt:
        ema = "; its weight EMA ('model') is not continued without --ema-decay: the trained weights go on"
    amp = load_optimizer_state(run, ckpt, path, args.amp)
    run.step = ckpt["step"]
    if args.overwrite or not os.path.isfile(os.path.join(args.output_dir, "best.pt")):
        run.best_loss = math.inf  # a run continued into a new directory: its first validation writes best.pt there
    else:
        run.best_loss = min(ckpt["best_loss"], newer_best_loss(args.output_dir, ckpt["step"]))
    run.epoch, run.batch_in_epoch = ckpt["epoch"], ckpt.get("batch_in_epoch", 0)
    run.epoch_loss = tuple(ckpt.get("epoch_loss", NO_EPOCH_LOSS)) if run.batch_in_epoch else NO_EPOCH_LOSS
    run.val_due = ckpt.get("val_due", False)
    if ckpt.get("rng") and rank == 0:
        try:
            set_rng_state(ckpt["rng"])
        except (ValueError, TypeError, IndexError, RuntimeError):  # of the right types, yet no generator state
            raise InputError(f"{path}: its RNG record is not a generator state (start a new run with --init-from "
                             f"{path} for its weights)") from None
    if ckpt.get("world", run.world) == run.world:
        schedule = schedule_note(trained_args, args, run)
    else:
        lr, iters_per_epoch = scaled_lr(args, run.world), run.meta["batches_per_epoch"]
        for g in run.optimizer.param_groups:
            g["initial_lr"] = lr
        run.step, run.batch_in_epoch, run.epoch_loss = run.epoch * iters_per_epoch, 0, NO_EPOCH_LOSS
        run.val_due = False  # the epoch restarts: a validation due goes with the training it followed
        run.scheduler = build_scheduler(run.optimizer, args, iters_per_epoch, start=run.step)
        schedule = (f"; world size {ckpt['world']} -> {run.world}: epoch {run.epoch} restarts from its first batch, "
                    f"step and learning-rate schedule rebased to {run.epoch} x {iters_per_epoch} batches")
    where = (f"epoch {run.epoch} after batch {run.batch_in_epoch}/{run.meta['batches_per_epoch']}" if run.batch_in_epoch
             else f"the start of epoch {run.epoch}")  # batch k/N as the log lines count: k batches done
    given, args.init_from = args.init_from, ckpt["args"].get("init_from")  # args.json: what the run began from
    unused = f"; --init-from {given} not used (the weights are {path}'s)" if given and given != args.init_from else ""
    return f"resuming from {path}: step {run.step}, continuing at {where}{schedule}{ema}{amp}{unused}"


def newer_best_loss(output_dir, step):
    """The best loss OUTPUT_DIR/best.pt records if it was written after the checkpoint at STEP (a kill between an
    epoch's two writes, best.pt first): the resumed run's validation must beat that, or it would replace a better
    best.pt. inf when there is no such file, or none readable (eval names what is wrong with it)."""
    try:  # memory-mapped: the weights are not read
        best = load_checkpoint(os.path.join(output_dir, "best.pt"), mmap=True)
        return float(best["best_loss"]) if best["step"] > step else math.inf
    except Exception:  # missing, truncated, another kind of file: nothing newer to go by
        return math.inf


def check_ranks_agree(run):
    """Every rank must start at the same step: on nodes that do not share --output-dir, a rank that found no
    checkpoint would train from other weights than rank 0 and fall out of step with it. (A rank whose own
    restore() failed, on a stale local checkpoint say, has already left: the others wait here until the
    process group times out.)"""
    n, s, s2 = all_reduce_sum(torch.tensor([1, run.step, run.step ** 2], dtype=torch.float64)).tolist()
    if n * s2 != s * s:  # n * sum(step^2) - sum(step)^2 is n^2 times the variance: zero when all agree
        raise InputError(f"the ranks would start at different steps (this one at step {run.step}): --output-dir "
                         f"and --resume must name the same files on every node (a shared filesystem)")


def load_optimizer_state(run, ckpt, path, amp):
    """The optimizer, schedule and GradScaler states of a checkpoint. A run may change --amp on resume; a
    scaler saved while disabled holds nothing, so an fp16 continuation starts its own. The optimizer's
    implementation (--fused-adam) is this run's choice, not the one saved with its state. Returns the note."""
    impl = {k: v for k, v in run.optimizer.param_groups[0].items() if k in ("fused", "foreach", "capturable")}
    try:
        saved = ckpt["optimizer"]
        run.optimizer.load_state_dict({**saved, "param_groups": [{**g, **impl} for g in saved["param_groups"]]})
        run.scheduler.load_state_dict(ckpt["scheduler"])
        # the next step's rate from this run's schedule: the saved one is the old schedule's, which a larger
        # --epochs or --max-steps (the cosine horizon) changes
        for g, base, fn in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas):
            g["lr"] = base * fn(run.scheduler.last_epoch)
        if ckpt["scaler"]:  # (a disabled scaler ignores what it is given)
            run.scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: its optimizer state does not fit this run ({type(e).__name__}: {e})") from None
    # load_state_dict checks the parameter counts, not the shapes of the moments, which the first step would trip on
    for p in run.optimizer.param_groups[0]["params"]:
        for name, v in run.optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and name != "step" and v.shape != p.shape:
                raise InputError(f"{path}: its optimizer state does not fit this run ({name} of shape {tuple(v.shape)} "
                                 f"for a parameter of shape {tuple(p.shape)})")
    before = ckpt["args"].get("amp", amp)
    fresh = " (the fp16 GradScaler starts at its initial scale)" if run.scaler.is_enabled() and not ckpt["scaler"] else ""
    return f"; --amp {before} -> {amp}{fresh}" if before != amp else ""


# ---- main: the output directory, the pieces main() assembles, the command line ----

RUN_FILES = ("last.pt", "best.pt", "args.json", "provenance.json", "train.log", "tb")  # what a run writes


def eval_results(out):
    """The files in OUT that eval_inversionnet.py's evaluation writes (an earlier one's, or anything else by
    those names): eval keeps them unless --overwrite, and training's --overwrite removes them from RUN/eval,
    eval's default --output-dir, with the model they describe."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n in ("metrics.json", "result.txt", "per_sample.csv", "ssim_histogram.png")
                  or re.fullmatch(r"sample_\d+_(best|worst|p\d+|shots)\.png", n))


def continue_elastic_run(args, rank):
    """torchrun --max-restarts: a restarted group continues the run its first start made in --output-dir (known
    by the launcher that provenance.json records), from its last.pt once written, else as first launched, and
    never replaces it. Rank 0 decides for all. A directory another launch made is checked as on a first start,
    so a start refused there is refused again. Returns whether the group continues its own run."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return False
    starts = previous_starts(os.path.join(args.output_dir, "provenance.json"))
    own = rank == 0 and bool(starts) and isinstance(starts[-1], dict) and starts[-1].get("launcher") == launcher()
    if not all_reduce_sum(torch.tensor([float(own)])).item():
        return False
    if args.resume is None or os.path.isfile(os.path.join(args.output_dir, "last.pt")):
        args.resume = "auto"
    return True


def check_output_dir(args, own_restart=False):
    """Refuse to write into an existing run unless continuing it (--resume auto, or --resume with one of its
    own checkpoints, or a restarted group's own run) or told to replace it (--overwrite: its files go first, so
    nothing of it mixes in)."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--output-dir {out} exists and is not a directory")
    taken_paths = [os.path.join(out, n) for n in ("last.pt", "best.pt")]  # their first write comes only after an epoch
    taken = next((p for p in taken_paths if os.path.lexists(p) and not os.path.isfile(p)), None)
    if taken and not args.overwrite:
        raise InputError(f"{taken}: exists and is not a regular file")
    has_run = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in ("args.json", "last.pt", "best.pt"))
    def in_out(path):  # one of this run's own files, also through a link from elsewhere
        where = os.path.dirname(os.path.realpath(path)) if path not in (None, "auto") else None
        return where is not None and os.path.isdir(out) and os.path.isdir(where) and os.path.samefile(where, out)
    if has_run and not (args.resume == "auto" or in_out(args.resume) or args.overwrite or own_restart):
        if not any(os.path.exists(p) for p in taken_paths):  # a start that failed, or a run in its first epoch
            raise InputError(f"--output-dir {out} holds a run that has written no checkpoint yet (one in its first epoch, "
                             f"or a start that failed: its train.log says); pass --resume auto to start it there anew, "
                             f"--overwrite to replace its files, or choose another --output-dir")
        raise InputError(f"--output-dir {out} already holds a run; pass --resume auto to continue it, --overwrite to "
                         f"replace it, or choose another --output-dir")
    if args.overwrite and in_out(args.resume):
        raise InputError(f"--overwrite would delete the run that --resume {args.resume} continues: give one of them")
    if args.overwrite and in_out(args.init_from):
        raise InputError(f"--overwrite would delete the {args.init_from} that --init-from starts from: copy it out of "
                         f"{out} first, or choose another --output-dir")
    orphan = os.path.join(out, "best.pt")  # last.pt is written first, so this run's last.pt was removed
    if args.resume == "auto" and not args.overwrite and os.path.isfile(orphan) and not os.path.lexists(os.path.join(out, "last.pt")):
        raise InputError(f"--resume auto: {out} holds best.pt but no last.pt to continue from, and a new run would replace "
                         "best.pt; pass --overwrite to start over, --resume PATH to continue from a checkpoint, or choose "
                         f"another --output-dir {RUN_SH_RESUMES}")


def on_rank0(rank, fn, *fn_args):
    """fn on rank 0 alone, which every rank waits for and learns the outcome of: a failure there (rank 0
    raises it as it came) stops the other ranks quietly, not with a traceback from their next collective."""
    failure = None
    if rank == 0:
        try:
            fn(*fn_args)
        except BaseException as e:  # a Ctrl-C too: the other ranks are waiting below
            failure = e
    if all_reduce_sum(torch.tensor([int(failure is not None)])).item():
        raise failure if failure is not None else InputError(f"rank 0 failed in {fn.__name__}")  # not printed


def make_output_dir(args, own_restart):
    """Made once every check has passed, proved writable, locked, checked again (a run that began and ended in
    another process while this one read its data is refused, not replaced), and cleared of what a kill during
    a checkpoint write left."""
    out = args.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")  # fail now, not at the first checkpoint
        write_atomic(probe, b"ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--output-dir {out} is not writable: {e.strerror}") from None
    lock_run(out)  # before the clean-up below, which would take a live run's checkpoint write for a killed one's
    check_output_dir(args, own_restart)
    for name in sorted(os.listdir(out)):  # what a kill during a write leaves behind
        if re.fullmatch(r"(last\.pt|best\.pt|args\.json|provenance\.json)\.tmp-\d+", name):
            os.remove(os.path.join(out, name))
            target = name.split(".tmp-")[0]
            kept = f"; {target} itself is intact" if os.path.isfile(os.path.join(out, target)) else ""
            print0(f"removed {name} (the partial write of a run killed while saving{kept})")


_RUN_LOCK = None  # the open OUTPUT_DIR/.lock that this process holds while it writes there (rank 0)


def lock_run(out):
    """Hold OUT/.lock (an advisory flock) for as long as this process trains (or evaluates) into OUT, so that a
    second run started on the same directory is refused instead of interleaving its files with the first. The
    lock names its holder, which the refusal quotes; the simulator locks its --out with a flock too (one it
    never removes). The system drops the lock when the process ends, however it ends, so a killed run never
    leaves OUT locked. A file system without flock (some network mounts), or one whose .lock never stays put
    long enough to be locked, runs unguarded."""
    unlock_run()
    global _RUN_LOCK
    path = os.path.join(out, ".lock")
    for _ in range(100):
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            with fh:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    fh.seek(0)
                    raise InputError(f"--output-dir {out} is in use by another process ({fh.read().strip() or 'unnamed'}, "
                                     f"which holds {path}); wait for it to end, or choose another --output-dir") from None
            return
        try:
            if os.path.samestat(os.stat(path), os.fstat(fh.fileno())):
                break
        except FileNotFoundError:
            pass
        fh.close()  # a file its holder removed as it let go (unlock_run(remove=True)): lock the one there now
    else:
        return
    fh.truncate(0)
    fh.write(f"{os.path.basename(sys.argv[0])} PID {os.getpid()} on {platform.node()}\n")
    fh.flush()
    _RUN_LOCK = fh


def unlock_run(remove=False):
    """Let OUT/.lock go; REMOVE: delete it first, while still held (an evaluation's folder keeps no trace),
    unless the file there is no longer the one held (removed by hand, and now another process's lock)."""
    global _RUN_LOCK
    if _RUN_LOCK is not None:
        if remove:
            try:
                if os.path.samestat(os.stat(_RUN_LOCK.name), os.fstat(_RUN_LOCK.fileno())):
                    os.remove(_RUN_LOCK.name)
            except OSError:
                pass
        _RUN_LOCK.close()  # closing the file releases its flock
        _RUN_LOCK = None


def remove_previous_run(args):
    """--overwrite, once every check has passed: the old run's files go before the new run writes any, so
    nothing of it (a better best.pt, its log, its TensorBoard curves) mixes into the new one."""
    if not args.overwrite:
        return
    removed, results = [], os.path.join(args.output_dir, "eval")
    for name in RUN_FILES + tuple(os.path.join("eval", n) for n in eval_results(results)):  # nothing else of eval/
        path = os.path.join(args.output_dir, name)
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            else:
                continue
        except OSError as e:
            raise InputError(f"--overwrite: cannot remove {path}: {e.strerror}") from None
        removed.append(name)
    if os.path.isdir(results) and not os.listdir(results):
        os.rmdir(results)
    if removed:
        print0(f"--overwrite: removed the previous run's {', '.join(removed)} from {args.output_dir}")


def check_device_args(args, device):
    if args.parallel == "dp" and device.type != "cuda":
        raise InputError("--parallel dp needs CUDA devices")
    gpus = dp_gpus(args.parallel, device)
    if gpus > 1 and min(replica_sizes(args.batch_size, gpus)) < 2:
        raise InputError(f"--batch-size {args.batch_size} over {gpus} GPUs (DataParallel) leaves a GPU one sample, on "
                         f"which BatchNorm cannot train: use a multiple of {gpus} of at least {2 * gpus}")
    if args.sync_bn and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA (SyncBatchNorm does not run on CPU)")
    if args.sync_bn and not dist.is_initialized():  # only the DDP wrapping converts the BatchNorms
        raise InputError("--sync-bn works under DDP only: launch with torchrun --nproc_per_node=N (or pass "
                         "--parallel ddp), or leave it out")
    if args.detect_anomaly and dist.is_initialized() and dist.get_world_size() > 1:
        # the rank whose backward it stops would leave the others in the gradient all-reduce until the timeout
        raise InputError("--detect-anomaly runs in one process (under DDP the rank it stops would leave the others "
                         "waiting): launch with python, or leave it out")


def load_splits(args, world):
    """The train and val pairs with their sample counts, checked before anything is trained."""
    train_pairs, val_pairs = splits(args)
    real = {kind: real_paths(pairs, kind) for kind, pairs in (("training", train_pairs), ("validation", val_pairs))}
    both = next((d for r, d in real["validation"].items() if r in real["training"]), None)
    if both:
        raise DataError(f"{both} is in both the training and the validation split: validation would score samples "
                        f"the model trained on")
    train_counts, val_counts = inspect_pairs(train_pairs), inspect_pairs(val_pairs) if val_pairs else []
    if args.val_every and not val_pairs:  # where the split came from says how to give it files
        if args.val_list:
            raise DataError(f"{args.val_list}: empty split list; name the validation files in it, or pass --val-every 0")
        if lists := simulator_split(args):
            raise DataError(f"the validation split is empty: {lists[1]} lists no files (simulated with --val-files 0); "
                            f"pass --val-every 0, or --train-size F to draw files by --seed")
        raise DataError("the validation split is empty: the split is by file and --data-root holds one; add files, give "
                        "--train-list and --val-list, or pass --val-every 0")
    if sum(train_counts) < args.batch_size * world:
        raise DataError(f"the training split has {sum(train_counts)} samples, fewer than one global batch "
                        f"({args.batch_size} x {world}); lower --batch-size")
    return train_pairs, train_counts, val_pairs, val_counts


def build_loaders(args, data, normalizer, device, rank, world):
    """(train, val) loaders; --overfit-batch swaps the train loader for one batch served --max-steps times."""
    train_pairs, train_counts, val_pairs, val_counts = data
    cfg = LoaderConfig.from_args(args, True, replicas=dp_gpus(args.parallel, device))
    train = build_loader(cfg, train_pairs, train_counts, normalizer, device, rank, world)
    if len(train) == 0:  # the iterable loader's shards (files split over ranks x workers) can each hold less than a batch
        raise DataError(f"no full batch of {args.batch_size} per epoch: --loader {args.loader} splits {sum(train_counts)} "
                        f"samples over {world} rank(s) x {args.num_workers} worker(s); lower --num-workers or --batch-size")
    if args.overfit_batch:
        x, y = next(iter(device_batches(train, device, normalizer)))
        return RepeatedBatch(x, y, args.max_steps or OVERFIT_STEPS), None
    val = None
    if val_pairs and args.val_every:
        val = build_loader(LoaderConfig.from_args(args, False), val_pairs, val_counts, normalizer, device, rank, world, train=False)
    return train, val


def open_monitor(args, device, resumed_at=None):
    """The Monitor with rank 0's TensorBoard writer and, with --profile, a torch.profiler schedule. A run resumed
    at step RESUMED_AT marks its restart there, so TensorBoard drops what a killed start logged past it."""
    writer = profiler = None
    if is_main() and args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        purge = None if resumed_at is None else resumed_at + 1
        writer = SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=purge)
    if is_main() and args.profile:
        profiler = make_profiler(os.path.join(args.output_dir, "tb"), device)
        profiler.start()
    return Monitor(args.log_every, args.progress, writer, profiler)


def make_profiler(trace_dir, device):
    """A torch.profiler that skips one step (its timing is not typical), warms up on one and traces three
    into TRACE_DIR for the torch-tb-profiler TensorBoard plugin; call .step() after each training step."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(trace_dir), record_shapes=True, profile_memory=True)


def record_run(args, prov):
    """OUTPUT_DIR/args.json (the resolved arguments: --config repeats the run from it) and, appended to
    OUTPUT_DIR/provenance.json, what made this start of the run. args.json goes last: it marks the directory
    as holding a run, which a failed start should not leave behind."""
    path = os.path.join(args.output_dir, "provenance.json")
    starts = previous_starts(path) if args.resume else []
    write_atomic(path, json.dumps(starts + [prov], indent=2))
    write_atomic(os.path.join(args.output_dir, "args.json"), json.dumps(vars(args), indent=2, sort_keys=True))


def previous_starts(path):
    """The start records of a run's provenance.json; none when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return list(json.load(fh))
    except (OSError, ValueError, RecursionError, TypeError):
        return []


def absolute_paths(args):
    """The input paths, and the run's own directory, made absolute once they have been read: args.json and the
    checkpoints then name the same files from any working directory (eval, --config: `--config RUN/args.json
    --resume auto` continues RUN wherever it is started)."""
    for name in ("data_root", "train_list", "val_list", "stats", "init_from", "output_dir"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))


def settings_notes(args, n_batches, device):
    """Settings that take no effect in this run as given, said once at the start (not refused: a short trial of
    a longer recipe, or a run continued later with a larger --epochs, gives them on purpose)."""
    beyond = [m for m in args.lr_milestones if m >= args.epochs]
    notes = [f"--lr-milestones {' '.join(f'{m:g}' for m in beyond)} not reached within --epochs {args.epochs}"] if beyond else []
    if args.lr_scheduler == "step" and args.lr_step_size >= args.epochs:
        notes.append(f"--lr-step-size {args.lr_step_size:g} not reached within --epochs {args.epochs}")
    if args.lr_warmup_epochs >= args.epochs:  # (check_args refused a warm-up of the schedules without one)
        notes.append(f"--lr-warmup-epochs {args.lr_warmup_epochs:g} does not end within --epochs {args.epochs} (the rate "
                     f"rises throughout)")
    if args.precise_bn > n_batches:
        notes.append(f"--precise-bn {args.precise_bn}: an epoch has {n_batches} batches, all of which are averaged")
    if args.compile_mode != "default" and not args.compile:
        notes.append(f"--compile-mode {args.compile_mode} has no effect without --compile (--fast compiles on CUDA only)")
    default = get_args_parser().get_default
    if args.lr_gamma != default("lr_gamma") and args.lr_scheduler in ("cosine", "none"):
        notes.append(f"--lr-gamma {args.lr_gamma:g} has no effect with --lr-scheduler {args.lr_scheduler}")
    if args.lr_step_size != default("lr_step_size") and args.lr_scheduler != "step":
        notes.append(f"--lr-step-size {args.lr_step_size:g} has no effect with --lr-scheduler {args.lr_scheduler}")
    if args.loader == "gpu" and args.normalize == "workers":
        notes.append("--normalize workers has no effect with --loader gpu (the cache normalises on the device)")
    if args.pin_memory and device.type != "cuda":
        notes.append(f"--pin-memory has no effect on {device.type} (it speeds copies to a GPU)")
    no_workers = args.num_workers == 0 or args.loader == "gpu"
    if args.persistent_workers and no_workers:
        notes.append("--persistent-workers has no effect without loader workers")
    if args.prefetch_factor != default("prefetch_factor") and no_workers:
        notes.append(f"--prefetch-factor {args.prefetch_factor} has no effect without loader workers")
    if args.val_every == 0 and args.val_batch_size != args.batch_size:  # (check_args made an unset one --batch-size)
        notes.append(f"--val-batch-size {args.val_batch_size} has no effect with --val-every 0 (nothing is validated)")
    if args.train_list and args.train_size is not None:
        notes.append(f"--train-size {args.train_size:g} has no effect with --train-list (the lists are the split)")
    if args.train_list and os.path.abspath(args.data_root) != os.path.abspath(default("data_root")):  # (made absolute)
        notes.append(f"--data-root {args.data_root} has no effect with --train-list (the lists name the files)")
    if args.dataset and args.stats:
        notes.append(f"--dataset {args.dataset} has no effect beside --stats (its constants are used)")
    return "; ".join(notes)


def split_rule(args, pairs):
    if args.train_list:
        return "split by the lists"
    if simulator_split(args):  # pairs copied into a simulated set since are in neither list: said, not dropped silently
        listed = {os.path.realpath(d) for d, _ in pairs}
        try:
            unlisted = [os.path.basename(d) for d, _ in find_pairs(args.data_root) if os.path.realpath(d) not in listed]
        except DataError:  # a stray file the lists do not name: nothing this run reads
            unlisted = []
        more = (f" ({len(unlisted)} more pair{'s' * (len(unlisted) > 1)} there, from {unlisted[0]}, in neither and not "
                "used: --train-size F draws from every pair)") if unlisted else ""
        return f"split by the simulator's train.txt / val.txt in --data-root{more}"
    if args.train_size is None and openfwi_val_files(pairs) is not None:
        return "OpenFWI's split of the released set"
    return f"files drawn by --seed {args.seed} at --train-size {args.train_size or DEFAULT_TRAIN_SIZE}"


def describe_data(data, train_loader, args, world, stats_from):
    train_pairs, train_counts, val_pairs, val_counts = data
    dropped, smaller = train_loader.dropped, train_loader.smaller
    left_out = "partial batches" + (f" and the remainder that would leave the {world} ranks uneven" if world > 1 else "")

    def files(pairs):
        return f"{len(pairs)} file{'s' * (len(pairs) != 1)}"
    return (f"data: train {files(train_pairs)} ({sum(train_counts)} samples), val {files(val_pairs)} "
            f"({sum(val_counts)} samples), {split_rule(args, train_pairs + val_pairs)}; loader {args.loader}, {len(train_loader)} batches/epoch of {args.batch_size}"
            f"{f' ({smaller} of them smaller: each loader worker ends on its remainder)' if smaller else ''}"
            f"{f', {dropped} samples left out of each epoch ({left_out})' if dropped else ''}; "
            f"normalisation from {stats_from}")


def main(args, argv=()):
    rank, world, local = setup_distributed(args.parallel, args.device)
    device = resolve_device(args.device, local)
    check_device_args(args, device)
    own_restart = continue_elastic_run(args, rank)
    check_output_dir(args, own_restart)
    normalizer, stats_from = resolve_stats(args)
    data = load_splits(args, world)  # before the output directory exists: bad data leaves nothing behind
    check_label_range(data[0] + data[2], normalizer, stats_from)
    absolute_paths(args)
    on_rank0(rank, make_output_dir, args, own_restart)
    set_log_file(os.path.join(args.output_dir, "train.log"))
    seed_everything(args.seed + rank)
    backend_note = configure_backends(args, device)
    if args.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    quiet_schedule_order_warning()
    speed_note = resolve_speed(args, device, (sum(data[1]) + sum(data[3])) // world)
    train_loader, val_loader = build_loaders(args, data, normalizer, device, rank, world)
    run, parallel = build_run(args, device, len(train_loader), world, local, normalizer)
    run.meta = {"split": split_record(data[0], data[1]), "val_split": split_record(data[2], data[3]),
                "batches_per_epoch": len(train_loader),
                "provenance": provenance(device, argv, world)}
    resumed = restore(run, args, rank)
    check_ranks_agree(run)
    on_rank0(rank, remove_previous_run, args)
    if resumed:
        print0(resumed)
    on_rank0(rank, record_run, args, run.meta["provenance"])
    print0(f"InversionNet {sum(p.numel() for p in run.raw_model.parameters()):,} parameters on {device} ({parallel}, "
           f"world {world}); {backend_note}")
    print0(speed_note)
    print0(describe_data(data, train_loader, args, world, stats_from))
    if notes := settings_notes(args, len(train_loader), device):
        print0(f"note: {notes}")
    return fit(run, train_loader, val_loader, open_monitor(args, device, run.step if resumed else None), args)


PATH_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS,
               errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG}


def report_input_error(script, e):
    """Print the one line of an InputError, or of a DataError that a loader worker raised (it arrives
    wrapped in a RuntimeError), or of an OSError on a path the system refuses (a directory where a file goes,
    a full disk); False for any other error. Rank 0 alone prints what every rank meets. Under torchrun, a rank
    whose peer stopped on such an error says so in one line instead of the collective's traceback."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and isinstance(e, RuntimeError) and re.search(r"Connection (closed|reset) by peer", str(e)):
        print_error(script, f"[rank {rank}] stopped: another rank left the run (its own line, if it printed one, says why)")
        return True
    if isinstance(e, RuntimeError) and OUT_OF_MEMORY.search(str(e)):
        e = InputError(out_of_memory(script, str(e)), local=True)
    if isinstance(e, RuntimeError) and SHM_FULL.search(str(e)):
        e = InputError(shared_memory_full(), local=True)
    died = loader_worker_death(e)
    if died:
        e = InputError(died, local=True)
    if isinstance(e, OSError):
        if e.errno not in PATH_ERRNOS or not e.filename:  # too many open files, a bug: its traceback
            return False
        e = InputError(f"{e.filename}: {e.strerror}", local=True)
    if isinstance(e, InputError):  # a loader worker's DataError is re-raised with its text alone: local too
        msg = re.sub(r"^\S*(DataError|InputError): ", "", str(e).strip().splitlines()[-1])
        local = e.local or "DataLoader worker" in str(e)
    else:
        m = re.search(r"DataError: (.+)$", str(e).strip())
        if not m:
            return False
        msg, local = m.group(1), True
    if rank == 0 or local:
        print_error(script, f"{f'[rank {rank}] ' if local and world > 1 else ''}{msg}")
    return True


def loader_worker_death(e):
    """One line for a DataLoader worker's death, whichever form torch raised it in (None for any other error):
    it names the signal when its SIGCHLD handler saw the death first, wraps that, or the lost connection to
    the worker, in "exited unexpectedly", or lets the lost connection itself through."""
    chain = []
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(str(x) for x in chain)
    signal_name = re.search(r"DataLoader worker \(pid \d+\) is killed by signal: ([^.]+)", text)
    if signal_name and signal_name.group(1) == "Bus error":
        return ("a DataLoader worker died of SIGBUS: a data file shrank while the run read it through a memory map "
                "(rewritten in place?), or the shared memory (/dev/shm) is full")
    in_loader = isinstance(chain[0], ConnectionError) and any(
        frame.f_code.co_filename.endswith(os.path.join("utils", "data", "dataloader.py"))
        for frame, _ in traceback.walk_tb(chain[0].__traceback__))
    if not (signal_name or in_loader or re.search(r"DataLoader worker \(pid\(s\) [\d, ]+\) exited unexpectedly", text)):
        return None
    return (f"a DataLoader worker died{f' (signal: {signal_name.group(1)})' if signal_name else ''}: after a bus error "
            f"printed above, a data file shrank under its memory map (rewritten in place?) or /dev/shm is full; with no "
            f"such line, often the out-of-memory killer (lower --num-workers or --batch-size)")


# what torch says when CUDA, MPS or the CPU allocator refuses an allocation (torch.OutOfMemoryError on CUDA,
# a RuntimeError elsewhere)
OUT_OF_MEMORY = re.compile(r"(CUDA|MPS backend) out of memory|DefaultCPUAllocator: can't allocate memory")


def out_of_memory(script, text):
    """The one line of an allocation the device refused: its size, and the flags that lower what a step needs."""
    which = OUT_OF_MEMORY.search(text).group(1)
    in_bytes, asked = re.search(r"allocate (\d+) bytes", text), re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", text)
    size = f"{int(in_bytes.group(1)) / 2**30:.2f} GiB" if in_bytes else asked.group(1) if asked else ""
    lower = {"train_inversionnet.py": "--batch-size (--val-batch-size for validation), or --loader map in place "
                                      "of the device cache",
             "eval_inversionnet.py": "--batch-size, or --loader map in place of the device cache"}[script]
    return f"{which.split()[0] if which else 'CPU'} out of memory{f' allocating {size}' if size else ''}; lower {lower}"


# torch's words when a loader worker cannot place a batch in shared memory (/dev/shm) for the main process
SHM_FULL = re.compile(r"unable to allocate shared memory\(shm\)|unable to write to file </torch_")


def shared_memory_full():
    """The one line of a loader worker that found /dev/shm full: a container's 64 MB default holds a few batches."""
    try:
        st = os.statvfs("/dev/shm")
        size = f" ({st.f_blocks * st.f_frsize / 2**20:.0f} MB here)"
    except OSError:
        size = ""
    return (f"the DataLoader workers cannot hand batches over: the shared memory /dev/shm is full{size}; lower "
            f"--num-workers or --batch-size, use --loader gpu (no workers), or give /dev/shm more room (docker run "
            f"--shm-size 8g)")


STOPPED_AT_ONCE = threading.Event()


def exit_at_once(code):
    """Leave a process whose step a second Ctrl-C cut short without the interpreter's teardown, in which torch's
    native threads, left mid-task, have aborted it ("terminate called without an active exception"), but
    only once a checkpoint write under way is done (not every thread a normal exit joins: torch.compile's
    idle worker pool would never end)."""
    for t in threading.enumerate():
        if t.name == CheckpointWriter.THREAD:
            # one whose start() the Ctrl-C cut short runs within moments, or never if cut before it began
            deadline = time.monotonic() + 1
            while not t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            if t.is_alive():
                t.join()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # two tries: a Ctrl-C that a failing call held back (DDP's constructor does, when a peer has gone) arrives
    # inside the inner one's error report
    try:
        try:
            args = parse_args(argv)
            try:
                check_args(args)
            except InputError as e:
                raise InputError(from_config(str(e), args.config, argv)) from None
            code = main(args, ["train_inversionnet.py", *argv])
            wait_for_ranks(code)
            return code
        except (InputError, RuntimeError, OSError) as e:
            if not report_input_error("train_inversionnet.py", e):
                raise
            return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began: torchrun passes it to every rank
        if int(os.environ.get("RANK", "0")) == 0:
            print("train_inversionnet.py: interrupted: stopped at once; last.pt, if there is one, is the previous "
                  "complete checkpoint", file=sys.stderr)
        STOPPED_AT_ONCE.set()
        return 128 + signal.SIGINT
    finally:
        set_log_file(None)
        unlock_run()
        cleanup_distributed()


if __name__ == "__main__":
    if SIGINT_AT_START is signal.default_int_handler:  # the imports are done: cli() reports a Ctrl-C
        signal.signal(signal.SIGINT, SIGINT_AT_START)
    code = cli()
    if STOPPED_AT_ONCE.is_set():
        exit_at_once(code)
    sys.exit(code)
