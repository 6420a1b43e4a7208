"""Evaluate an InversionNet checkpoint with the OpenFWI paper's metrics; pictures and result files.

    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --vis 3
    python eval_inversionnet.py --checkpoint fva_l1.pth --val-list split/flatvel_a_val.txt --dataset flatvel-a
    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --noise-std 0.1 --missing-traces 5
    torchrun --nproc_per_node=2 eval_inversionnet.py --checkpoint runs/inversionnet/best.pt
    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --predict field_shots.npy   # no labels needed
    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --export inversionnet.pt2

The model, split and normalisation come from the checkpoint's saved arguments (so train and eval
cannot drift); flags given here override them. Writes OUT/metrics.json, OUT/result.txt,
OUT/per_sample.csv and, with --vis N, PNGs of the best, median and worst samples by MAE.
--predict writes velocity maps in m/s for shot gathers without labels; --export writes the model as a
torch.export program for use outside this repository.
Metrics (OpenFWI test.py): MAE, MSE, RMSE = sqrt(MSE) and SSIM on the normalised [-1, 1] scale
(SSIM on (x+1)/2, Gaussian 11x11 window, sigma 1.5), plus MAE and RMSE in m/s.
"""
import argparse
import csv
import errno
import glob
import io
import json
import os
import signal
import sys
import tempfile
import threading

SIGINT_AT_START = signal.getsignal(signal.SIGINT)  # Python's KeyboardInterrupt, unless a launcher set another
if __name__ == "__main__" and SIGINT_AT_START is signal.default_int_handler:  # (`cmd &` ignores it: left so)
    # a Ctrl-C in the seconds the imports below take exits at once (130), without a traceback per torchrun rank
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import numpy as np
import torch
import torch.distributed as dist

import train_inversionnet as T

PICTURE_ROWS = 16  # --predict's picture, one row per map: 300 rows made a 30 MB PNG too tall to view, in a minute
# OpenFWI paper, InversionNet with L1 loss: MAE, RMSE, SSIM on the normalised scale
PAPER = {"flatvel-a": (0.0131, 0.0211, 0.9895), "flatvel-b": (0.0351, 0.0876, 0.9461),
         "curvevel-a": (0.0685, 0.1273, 0.8074), "curvevel-b": (0.1497, 0.2891, 0.6727),
         "flatfault-a": (0.0172, 0.0426, 0.9766), "flatfault-b": (0.1055, 0.1741, 0.7208),
         "curvefault-a": (0.0260, 0.0650, 0.9566), "curvefault-b": (0.1646, 0.2477, 0.6163),
         "style-a": (0.0625, 0.1024, 0.8859), "style-b": (0.0689, 0.1614, 0.6314)}


def get_args_parser():
    p = T.ArgumentParser(description="Evaluate InversionNet on OpenFWI-format data.")
    p.add_argument("--checkpoint", type=T.path_arg, required=True, help="last.pt / best.pt of train_inversionnet.py, or an OpenFWI checkpoint")
    p.add_argument("--data-root", type=T.path_arg, default=None, help="OpenFWI layout; the val split is made as in training (default: from the checkpoint)")
    p.add_argument("--val-list", type=T.path_arg, default=None, help="OpenFWI split file to evaluate instead")
    p.add_argument("--split", default=None, choices=["val", "train"], help="which split of --data-root to evaluate (unset: val)")
    p.add_argument("--dataset", default=None, choices=sorted(T.DATASETS),
                   help="the OpenFWI set: its normalisation constants (unless --stats; needed for OpenFWI checkpoints) and paper row")
    p.add_argument("--stats", type=T.path_arg, default=None, help="normalisation JSON (as written by simulate_openfwi.py)")
    p.add_argument("--predict", type=T.path_arg, default=None,
                   help="a .npy of shot gathers (N, 5, 1000, 70), or a directory of them: writes OUTPUT_DIR/<stem>_velocity.npy "
                        "(N, 1, 70, 70) float32 in m/s and a picture of the first --vis predictions; no labels, no metrics")
    p.add_argument("--export", type=T.path_arg, default=None,
                   help="write the model (eval mode, dynamic batch) as a torch.export program to this .pt2 file, with its "
                        "normalisation constants as the extra file normalization.json, and stop")
    p.add_argument("--output-dir", type=T.path_arg, default=None, help="where results go (default: CHECKPOINT_DIR/eval, or CHECKPOINT_DIR/predict)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help="replace the results (or --export file) already there")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="device (auto: CUDA, else MPS, when there is one; --export traces on the CPU unless this names another)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch per process")
    p.add_argument("--amp", default="auto", choices=["auto", *T.AMP_DTYPES],
                   help="autocast dtype of the forward pass (metrics are computed in float32, SSIM in float64, or float32 on MPS); auto: the one the checkpoint was "
                        "trained with (off for a checkpoint that records none); off: float32 throughout")
    p.add_argument("--loader", default="map", choices=["map", "gpu"], help="map: mmap reads; gpu: split held on the device")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of an evaluation; 0: reader threads of this "
                   "process (--predict reads its files in its own process, a batch at a time, and takes none)")
    p.add_argument("--vis", type=int, default=3, help="number of samples to draw (best, median, worst, ...; with --predict the first, "
                   f"at most {PICTURE_ROWS}); 0: none")
    p.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise, as a fraction of each trace's peak amplitude")
    p.add_argument("--missing-traces", type=int, default=0, help="receivers muted at random in every sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (of an evaluation on labelled data)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return p


def check_opts(opts):
    if opts.batch_size <= 0:
        raise T.InputError(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.batch_size > T.MAX_COUNT:
        raise T.InputError(f"--batch-size must be at most {T.MAX_COUNT}, got {opts.batch_size}")
    T.check_workers(opts.num_workers)
    for flag, value in (("--vis", opts.vis), ("--num-workers", opts.num_workers)):
        if value < 0:
            raise T.InputError(f"{flag} must be >= 0, got {value}")
    if not 0 <= opts.noise_std <= 10:  # NaN fails this too
        raise T.InputError(f"--noise-std must be in [0, 10] (times each trace's peak), got {opts.noise_std}")
    if not 0 <= opts.seed <= T.MAX_SEED:  # numpy's seed streams take non-negative integers only
        raise T.InputError(f"--seed must be in [0, {T.MAX_SEED}], got {opts.seed}")
    if not 0 <= opts.missing_traces <= 70:
        raise T.InputError(f"--missing-traces must be in [0, 70], got {opts.missing_traces}")
    if opts.loader == "gpu" and (opts.noise_std or opts.missing_traces):
        raise T.InputError("--noise-std/--missing-traces perturb raw data: use --loader map")
    if opts.predict and opts.export:
        raise T.InputError("--predict and --export are separate jobs: give one of them")
    if (opts.predict or opts.export) and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would write the same files
        raise T.InputError(f"{'--predict' if opts.predict else '--export'} runs in one process: start it with python, not torchrun")
    if opts.val_list and opts.split:
        raise T.InputError("--split chooses a split of --data-root and --val-list names its files: give one of them")
    job = "--predict" if opts.predict else "--export" if opts.export else None
    default = get_args_parser().get_default
    for name in ("output_dir", "vis", "batch_size"):
        if opts.export and getattr(opts, name) != default(name):
            raise T.InputError(f"--export writes the one file it names; {T.flag_of(name)} is not used: leave it out")
    # they choose, read or perturb labelled data, which these jobs never read (--num-workers, a speed setting
    # a script may pass to every job, is left to them)
    for name in ("data_root", "val_list", "split", "noise_std", "missing_traces", "seed", "loader"):
        if job and getattr(opts, name) != default(name):
            raise T.InputError(f"{T.flag_of(name)} belongs to an evaluation on labelled data; {job} does not read any: "
                               f"leave it out")
    if opts.val_list and opts.data_root:  # (the baseline's training maps would come from one, the pairs from the other)
        raise T.InputError("--data-root makes the split to evaluate and --val-list names its files: give one of them")
    for flag, path in (("--checkpoint", opts.checkpoint), ("--val-list", opts.val_list), ("--stats", opts.stats)):
        if path is not None:
            T.require_file(flag, path)
    T.require_packages(*([("tqdm", "")] if not job else []),  # the evaluation's bar
                       *([("matplotlib", ", or pass --vis 0")] if opts.vis and not opts.export else []))


# ---- robustness perturbations ----

class Perturb:
    """Seeded perturbation of one raw shot gather (S, T, R): Gaussian noise of `noise_std` x each trace's
    peak, and `missing` receivers muted in every shot. Drawn from the stream [seed, sample index], so a
    sample gets the same perturbation whatever the batch size, worker or rank, and in its picture."""

    def __init__(self, noise_std, missing, seed):
        self.noise_std, self.missing, self.seed = noise_std, missing, seed

    def __call__(self, x, index):
        rng = np.random.default_rng([self.seed, int(index)])
        if self.noise_std > 0:
            peak = x.abs().amax(dim=1, keepdim=True)
            x = x + self.noise_std * peak * torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
        if self.missing > 0:
            keep = torch.ones(x.shape[-1])
            keep[rng.choice(x.shape[-1], self.missing, replace=False)] = 0
            x = x * keep
        return x


# ---- checkpoint, normalisation and split ----

def saved_args(ckpt):
    """The training arguments our checkpoint saved (a dict); None for an OpenFWI one."""
    saved = ckpt.get("args")
    return saved if isinstance(saved, dict) else None


def train_args_from(ckpt, opts):
    """The training arguments saved in our checkpoint (a Namespace), or defaults for an OpenFWI one."""
    saved = saved_args(ckpt)
    base = T.saved_namespace(saved or {}, f"{opts.checkpoint}: its training arguments")
    for k in ("dataset", "stats"):
        if getattr(opts, k) is not None:
            setattr(base, k, getattr(opts, k))
    if opts.dataset is not None and opts.stats is None:  # named here, it replaces the run's stats file; --stats wins, as in training
        base.stats = None
    if opts.data_root is not None:
        base.data_root, base.train_list = opts.data_root, None
    return base, saved is not None


def load_model(opts, device):
    """(the model in eval mode on the device, the checkpoint, its training arguments, the normaliser, where
    the normaliser came from)."""
    model = T.InversionNet()
    ckpt = T.load_weights(model, opts.checkpoint)
    targs, ours = train_args_from(ckpt, opts)
    named = None if ours else getattr(ckpt.get("args"), "dataset", None)  # OpenFWI saves its argparse Namespace
    by_name = not ours and opts.dataset is None and opts.stats is None  # the constants of the dataset it names
    if by_name:
        if named not in T.DATASETS:
            raise T.InputError(f"{opts.checkpoint} records neither our training arguments nor an OpenFWI dataset name "
                               f"(OpenFWI checkpoint?): name the constants with --dataset or --stats")
        targs.dataset = named
    if ours and not T.split_record_ok(ckpt.get("split", [])):
        raise T.InputError(f"{opts.checkpoint}: its split record is unreadable (not a list of [data file, label file, samples])")
    if ours and opts.dataset is None and opts.stats is None and "normalization" in ckpt:
        n = ckpt["normalization"]
        if not T.normalization_ok(n):
            raise T.InputError(f"{opts.checkpoint}: its normalisation record is unreadable; name the constants with "
                               f"--dataset or --stats")
        normalizer = T.checked_normalizer(f"{opts.checkpoint} (its normalisation)", *(n[k] for k in T.Normalizer.KEYS))
        stats_from = "the checkpoint"
    else:
        normalizer, stats_from = T.resolve_stats(targs)
        if by_name:
            stats_from = f"OpenFWI's {named} constants (the dataset the checkpoint names)"
        trained = ckpt.get("normalization") if ours else None
        if T.normalization_ok(trained) and not T.same_normalization(trained, normalizer.as_dict()):
            T.print0(f"note: normalisation from {stats_from} ({T.shown_normalization(normalizer.as_dict())}), not the "
                     f"one the model was trained with ({T.shown_normalization(trained)})")
    return model.to(device).eval(), ckpt, targs, normalizer, stats_from


def forward_dtype(opts, targs):
    """The autocast dtype of the forward pass. --amp auto: the precision the checkpoint was trained in, float32
    when it records none (OpenFWI's), so that eval repeats the validation figures training logged, at its
    speed; --amp off is the paper's float32 (README: what each gives on the CPU recipe's model)."""
    return T.AMP_DTYPES[(targs.amp or "off") if opts.amp == "auto" else opts.amp]


def dtype_name(amp_dtype):
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"


def non_finite_forward(where, what, amp_dtype, job):
    """The error for NaN or Inf out of the forward pass: the weights (read_state_dict) and inputs were
    finite, so it is most likely an fp16 overflow, and the precision is what to change."""
    hint = f"; {job} with --amp off" if amp_dtype else ""
    return T.DataError(f"{where}: the model's {what} NaN or Inf in its {dtype_name(amp_dtype)} forward pass{hint}")


def forward_settings(opts, model, device, targs):
    """(autocast dtype, channels-last) of the forward pass; the layout is --fast's choice for the device."""
    channels_last = T.fast_compute(device)["channels_last"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return forward_dtype(opts, targs), channels_last


def evaluation_pairs(opts, targs, ours):
    """The pairs to evaluate, and the training pairs whose mean velocity map is the trivial baseline (None
    where no training split is known: an OpenFWI checkpoint with --val-list, or one whose files are gone)."""
    if not ours and not (opts.val_list or opts.data_root):  # the defaults would pick some local data it never saw
        raise T.InputError(f"{opts.checkpoint} records no data (OpenFWI checkpoint?): name the data to evaluate with "
                           f"--val-list or --data-root")
    if opts.val_list:
        pairs, train = T.read_split_list(opts.val_list), None
        T.real_paths(pairs, "--val-list")
        if ours:
            try:
                train = T.splits(targs)[0]
                T.inspect_pairs(train)
            except T.InputError:
                train = None
    else:
        try:
            train, val = T.splits(targs)
        except T.DataError as e:
            if opts.data_root:
                raise
            raise T.DataError(f"the data the checkpoint was trained on: {e}; --data-root or --val-list names the data "
                              f"to evaluate") from None
        pairs = train if opts.split == "train" else val
        gone = next((f for pair in train for f in pair if not os.path.exists(f)), None)
        if gone and opts.split != "train":  # (a run copied with its validation files alone)
            T.print0(f"note: {gone} of the training split is gone: the baseline is the mean of the evaluated maps")
            train = None
        else:
            T.inspect_pairs(train)  # the baseline reads its labels: a broken file is named before anything is written
    if not pairs:
        raise T.DataError(f"the {opts.split or 'val'} split to evaluate is empty (a run trained without validation?): "
                          f"name the data with --val-list or --data-root, or pass --split train")
    return pairs, train


def split_change(ckpt, train_pairs):
    """A line saying so when the training split read now from the checkpoint's own data is not the one it
    recorded (files added to a simulated set since, or removed): the validation split and the baseline then
    come from other files."""
    saved = ckpt.get("split")
    if not saved or not train_pairs:
        return None
    now = T.split_record(train_pairs, T.inspect_pairs(train_pairs))
    if now == saved:
        return None
    files = f"{len(now)} file{'s' * (len(now) != 1)}"
    return (f"the training split now has {files} ({sum(n for *_, n in now)} samples), the checkpoint was "
            f"trained on {len(saved)} ({sum(n for *_, n in saved)} samples{T.first_difference(saved, now)}): the "
            f"evaluated split and the baseline come from today's files")


def trained_files(ckpt):
    """The real paths of the data files the checkpoint trained on, as far as they can still be found: the names
    its split record holds, under the --data-root or in the --train-list its training arguments saved. A file
    is known by where it is, not by its name: every simulated set has a data1.npy."""
    saved, record = saved_args(ckpt), ckpt.get("split")
    if not saved or not record:  # an OpenFWI checkpoint records neither
        return set()
    names, root = {d for d, *_ in record}, saved.get("data_root") or ""
    folder = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root  # (OpenFWI's fault layout)
    try:
        listed = ([d for d, _ in T.read_split_list(saved["train_list"])] if saved.get("train_list")
                  else [os.path.join(folder, n) for n in names])
    except T.InputError:  # the list moved since: nothing tells
        return set()
    return {os.path.realpath(d) for d in listed if os.path.basename(d) in names and os.path.isfile(d)}


def training_record(ckpt, opts, train_pairs, pairs):
    """What the results say about the data the checkpoint trained on: whether its training split changed since
    (asked of its own data: without --data-root, or with one whose training files include some it trained on;
    another set's split is no change of this one), the names of the evaluated files it trained on, and how far
    its weights were trained (last.pt and best.pt of one run differ there; None for a file without counters)."""
    trained = trained_files(ckpt)
    own = opts.data_root is None or any(os.path.realpath(d) in trained for d, _ in train_pairs or ())
    counters = {k: ckpt.get(k) for k in ("step", "epoch", "batch_in_epoch")}
    counters["batch_in_epoch"] = counters["batch_in_epoch"] or 0
    known = all(type(v) is int for v in counters.values())
    if known and saved_args(ckpt) is None:  # OpenFWI saves the index of the epoch just trained: one fewer than trained
        counters["epoch"] += 1
    return {"trained_to": counters if known else None,
            "split_changed_since_training": split_change(ckpt, train_pairs) if own else None,
            "evaluated_files_trained_on": [os.path.basename(d) for d, _ in pairs if os.path.realpath(d) in trained]}


def baseline_sums(train_pairs, pairs, normalizer):
    """Metric sums of the trivial baseline, the mean velocity map of TRAIN_PAIRS, on the evaluated labels.
    Labels only: no shot gather is read."""
    total, n = 0.0, 0
    for _, lpath in train_pairs:
        y = np.load(lpath, mmap_mode="r")
        file_sum = y.sum(axis=0, dtype=np.float64)
        if not np.isfinite(file_sum).all():  # the training labels are read here only, so checked here
            raise T.DataError(f"{lpath}: NaN or Inf in the labels (read for the mean-map baseline)")
        total, n = total + file_sum, n + len(y)
    mean_map = normalizer.label(torch.from_numpy((total / n).astype(np.float32)))
    sums = torch.zeros(4, dtype=torch.float64)
    for _, lpath in pairs:
        labels = np.load(lpath, mmap_mode="r")
        for s in range(0, len(labels), 256):
            y = normalizer.label(torch.from_numpy(np.array(labels[s:s + 256])))
            sums += T.metric_sums(T.per_sample_metrics(mean_map.expand_as(y), y))
    return sums


def gather_rows(per_sample, rank, world, scale):
    """Every rank's per-sample metrics as rows (index, MAE, RMSE, SSIM, MAE m/s, RMSE m/s), sorted by index.
    Rank r evaluated samples r, r + world, ... in order."""
    rows = [(rank + world * k, mae, mse ** 0.5, ssim, mae * scale, mse ** 0.5 * scale)
            for k, (mae, mse, ssim) in enumerate(per_sample.tolist())]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows)


# ---- results ----

def family_file(opts, targs):
    """The stats file that names the evaluated data's family: --stats here; with --val-list, the dataset.json
    beside it, else the run's stats file; without, the run's --stats, else its data's dataset.json (of the
    --data-root given here, or of the run), which a simulated set holds even where training normalised with
    an OpenFWI set's constants (--dataset)."""
    if opts.val_list:
        found = (opts.stats, os.path.join(os.path.dirname(os.path.abspath(opts.val_list)), "dataset.json"), T.stats_path(targs))
    else:  # (--stats here is the run's now: train_args_from put it there)
        found = (targs.stats, T.data_stats_file(targs))
    return next((f for f in found if f and os.path.isfile(f)), None)


def paper_reference(opts, targs):
    """The paper's row for the data: the OpenFWI set named by --dataset here; else the A row of the family that
    the evaluated data's stats file names (a simulated set's dataset.json: indicative only, as that data comes
    from simulate_openfwi.py, not OpenFWI's generator); else the set named in training; None when nothing says."""
    name, source = opts.dataset, "OpenFWI"
    if name is None:
        try:
            with open(family_file(opts, targs)) as fh:
                name, source = f"{json.load(fh)['family']}-a", "simulate_openfwi.py (indicative)"
        except (TypeError, OSError, ValueError, RecursionError, KeyError):
            name = targs.dataset
    if name not in PAPER:
        return None
    return dict(zip(("dataset", "mae", "rmse", "ssim"), (name, *PAPER[name])), data=source)


def result_dict(opts, targs, normalizer, stats_from, pairs, metrics, base):
    scale = normalizer.label_scale
    m = {k: metrics[k] for k in ("mae", "mse", "rmse", "ssim", "count")}
    for d in (m, base):  # the map is linear in velocity; OpenFWI's test.py reports MAE and MSE in m/s
        d["mae_ms"], d["mse_ms2"], d["rmse_ms"] = d["mae"] * scale, d["mse"] * scale ** 2, d["rmse"] * scale
    ema = targs.ema_decay  # the checkpoint's 'model' is the average when it was trained with one
    return {"checkpoint": os.path.abspath(opts.checkpoint), "weights": f"EMA, decay {ema:g}" if ema else "trained",
            "samples": m["count"], "files": len(pairs),
            "split": "list" if opts.val_list else opts.split or "val",
            "normalization": normalizer.as_dict(), "normalization_from": stats_from,
            "perturbation": {"noise_std": opts.noise_std, "missing_traces": opts.missing_traces, "seed": opts.seed},
            "model": m, "baseline_mean_map": base, "paper_reference": paper_reference(opts, targs)}


SPLIT_NAMES = {"val": "the validation split", "train": "the training split", "list": "the --val-list files"}


def trained_to(counters):
    if counters is None:
        return ""
    epochs, batches = counters["epoch"], counters["batch_in_epoch"]
    return (f", step {counters['step']}: {epochs} epoch{'s' * (epochs != 1)}"
            f"{f' and {batches} batch' + 'es' * (batches != 1) if batches else ''} trained")


def report(r):
    m, b, p = r["model"], r["baseline_mean_map"], r["paper_reference"]
    pert = r["perturbation"]
    baseline = "baseline (train mean)" if b["from"] == "training split" else "baseline (eval mean)"
    lines = [f"InversionNet evaluation of {SPLIT_NAMES[r['split']]}: {r['samples']} samples from {r['files']} file{'s' * (r['files'] != 1)} "
             f"({r['checkpoint']}, weights: {r['weights']}{trained_to(r['trained_to'])})",
             f"perturbation: noise {pert['noise_std']:g} x trace peak, {pert['missing_traces']} muted receivers, seed {pert['seed']}",
             f"forward pass: {r['forward']['amp']}{', channels-last' if r['forward']['channels_last'] else ''}; metrics in float32, the model's SSIM in {r['forward']['ssim']}",
             f"{'':24s}{'MAE':>9s}{'RMSE':>9s}{'SSIM':>9s}{'MAE m/s':>10s}{'RMSE m/s':>10s}",
             f"{'model':24s}{m['mae']:9.4f}{m['rmse']:9.4f}{m['ssim']:9.4f}{m['mae_ms']:10.1f}{m['rmse_ms']:10.1f}",
             f"{baseline:24s}{b['mae']:9.4f}{b['rmse']:9.4f}{b['ssim']:9.4f}{b['mae_ms']:10.1f}{b['rmse_ms']:10.1f}"]
    if p:
        lines.append(f"{'paper ' + p['dataset']:24s}{p['mae']:9.4f}{p['rmse']:9.4f}{p['ssim']:9.4f}")
    lines.append(f"beats the baseline: MAE {'yes' if m['mae'] < b['mae'] else 'NO'}, SSIM {'yes' if m['ssim'] > b['ssim'] else 'NO'}")
    if r["split"] == "train" and p:
        lines.append("the training split: samples the model learnt from, so the paper's row (held-out data) is no fair comparison")
    if b["from"] != "training split":
        lines.append("baseline: the mean of the evaluated maps themselves (no training labels at hand): an easier bar than a training mean")
    if p and p["data"] != "OpenFWI":
        lines.append(f"paper row: OpenFWI's {p['dataset']}; this data was drawn by {p['data']}")
    if r["split_changed_since_training"]:
        lines.append(f"warning: {r['split_changed_since_training']}")
    if (seen := r["evaluated_files_trained_on"]) and r["split"] != "train":
        lines.append(f"warning: the evaluated {seen[0]}{f' (and {len(seen) - 1} more)' if seen[1:] else ''} "
                     f"{'is one' if len(seen) == 1 else 'are files'} the checkpoint trained on, so these metrics "
                     f"overstate the model")
    return "\n".join(lines) + "\n"


def sample_places(pairs, counts):
    """(data file, sample in that file) of each index of the evaluated split, in evaluation order: a bad sample
    of per_sample.csv is found without summing file lengths by hand."""
    return [(data, k) for (data, _), n in zip(pairs, counts) for k in range(n)]


def write_results(out, result, rows, places):
    """per_sample.csv, result.txt, then metrics.json, each by temporary name and rename: metrics.json
    last, because it marks a complete result."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["index", "file", "sample_in_file", "mae", "rmse", "ssim", "mae_ms", "rmse_ms"])
    w.writerows((i, *places[i], *rest) for i, *rest in rows)
    remove_results(out, ["metrics.json"])  # --overwrite: a failure below must not leave it beside new files, as
                                           # if they were the complete old result
    for name, content in (("per_sample.csv", table.getvalue()), ("result.txt", report(result)),
                          ("metrics.json", json.dumps(result, indent=2))):
        write_file(os.path.join(out, name), content)


def draw(model, device, normalizer, dataset, rows, out, n, amp_dtype):
    """Truth / prediction / difference in m/s for n samples from best to worst MAE (the input exactly as
    evaluated, perturbations included), the best one's shot gathers, and a histogram of per-sample SSIM."""
    plt = pyplot()
    order = sorted(rows, key=lambda r: r[1])
    m = min(n, len(order))
    picks = [order[int(round(i * (len(order) - 1) / max(m - 1, 1)))] for i in range(m)]
    extent = [0, 700, 700, 0]  # metres: 70 cells of 10 m
    lo, hi = normalizer.label_min, normalizer.label_max
    for i, row in enumerate(picks):
        idx = row[0]
        x, y = dataset[idx]
        with torch.no_grad():
            pred = T.forward(model, normalizer.data(x[None].to(device)), amp_dtype).float()
        vp, vt = normalizer.label_to_velocity(pred)[0, 0].cpu().numpy(), y[0].numpy()
        # evenly spaced ranks by MAE: best, the percentiles between (p50 is the median), worst
        tag = "best" if i == 0 else ("worst" if i == m - 1 else f"p{round(100 * i / (m - 1))}")
        fig, axs = plt.subplots(1, 3, figsize=(13, 4))
        for ax, img, title in ((axs[0], vt, "true velocity"), (axs[1], vp, "prediction")):
            fig.colorbar(ax.imshow(img, cmap="jet", vmin=lo, vmax=hi, extent=extent), ax=ax, label="m/s")
            ax.set(title=title, xlabel="x (m)", ylabel="depth (m)")
        lim = max(abs(vp - vt).max(), 1.0)
        fig.colorbar(axs[2].imshow(vp - vt, cmap="seismic", vmin=-lim, vmax=lim, extent=extent), ax=axs[2], label="m/s")
        axs[2].set(title=f"prediction - truth (MAE {row[4]:.0f} m/s)", xlabel="x (m)")
        fig.suptitle(f"sample {idx} ({tag}): MAE {row[1]:.4f}, SSIM {row[3]:.4f}")
        save_figure(plt, fig, os.path.join(out, f"sample_{idx}_{tag}.png"), dpi=90)
        if i == 0:
            draw_shots(plt, x.numpy(), os.path.join(out, f"sample_{idx}_shots.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([r[3] for r in rows], bins=30)
    ax.set(xlabel="SSIM per sample", ylabel="samples")
    save_figure(plt, fig, os.path.join(out, "ssim_histogram.png"), dpi=90)


def save_figure(plt, fig, path, dpi):
    """The figure as a PNG, rendered in memory and written by write_atomic: a picture is whole or absent."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    write_file(path, buf.getbuffer())


def write_file(path, data, replace=True):
    """T.write_atomic (temporary name, fsync, rename), its failure (a full disk, say) in one line."""
    try:
        T.write_atomic(path, data, replace)
    except OSError as e:
        if isinstance(e, FileExistsError) and not replace and os.path.isfile(path):  # (not refuse_non_file's refusal)
            raise T.InputError(f"{path} was written by another process while this one ran; pass --overwrite to "
                               f"replace it") from None
        raise T.InputError(f"cannot write {path}: {e.strerror}") from None


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def show_gather(ax, gather, clip, title):
    """One shot gather (T, R) in grey, amplitudes clipped at +-CLIP, time down in seconds and receivers across
    in metres."""
    ax.imshow(gather, cmap="gray", aspect="auto", vmin=-clip, vmax=clip, extent=[0, 700, 1.0, 0])
    ax.set(title=title, xlabel="receiver x (m)")


def draw_shots(plt, gather, path):
    """The shot gathers (S, T, R) of one sample side by side, clipped at the 99th amplitude percentile."""
    fig, axs = plt.subplots(1, gather.shape[0], figsize=(3 * gather.shape[0], 4), sharey=True)
    clip = np.percentile(np.abs(gather), 99)
    for s, ax in enumerate(axs):
        show_gather(ax, gather[s], clip, f"shot {s + 1}")
    axs[0].set_ylabel("time (s)")
    save_figure(plt, fig, path, dpi=80)


def default_output_dir(opts, name):
    """--output-dir, or NAME beside the checkpoint (RUN/eval, RUN/predict)."""
    return opts.output_dir or os.path.join(os.path.dirname(os.path.abspath(opts.checkpoint)), name)


def run_evaluation(opts, argv):
    """Metrics, per-sample table, baseline and pictures of the checkpoint on its validation split."""
    out = default_output_dir(opts, "eval")
    refuse_results(out, opts.overwrite)  # now, before the model loads; again under the lock below
    rank, world, local = T.setup_distributed("auto", opts.device)
    device = T.resolve_device(opts.device, local)
    model, ckpt, targs, normalizer, stats_from = load_model(opts, device)
    pairs, train_pairs = evaluation_pairs(opts, targs, saved_args(ckpt) is not None)
    counts = T.inspect_pairs(pairs)
    T.check_label_range(pairs, normalizer, stats_from)
    T.on_rank0(rank, make_results_dir, out, lambda: refuse_results(out, opts.overwrite))
    found = T.eval_results(out)  # as the lock found them: what --overwrite replaces (rank 0 alone writes)
    perturb = Perturb(opts.noise_std, opts.missing_traces, opts.seed) if opts.noise_std or opts.missing_traces else None
    cfg = T.LoaderConfig(kind=opts.loader, batch_size=opts.batch_size, num_workers=opts.num_workers, seed=opts.seed,
                         persistent_workers=False)  # one pass
    if cfg.kind == "gpu":
        T.check_cache_fits(-(-sum(counts) // world), cfg.cache_dtype, device, "use --loader map")
    loader = T.build_loader(cfg, pairs, counts, normalizer, device, rank, world, train=False, transform=perturb)
    amp_dtype, channels_last = forward_settings(opts, model, device, targs)
    metrics = T.evaluate(model, loader, device, normalizer, amp_dtype, channels_last, per_sample=True, progress=opts.progress)
    if not np.isfinite([metrics[k] for k in ("mae", "mse", "ssim")]).all():
        raise non_finite_forward(opts.checkpoint, "predictions hold", amp_dtype, "evaluate")
    rows = gather_rows(metrics["per_sample"], rank, world, normalizer.label_scale)
    if rank != 0:
        return 0
    base = T.summarize(baseline_sums(train_pairs or pairs, pairs, normalizer))
    base["from"] = "training split" if train_pairs else "evaluated maps"
    result = result_dict(opts, targs, normalizer, stats_from, pairs, metrics, base)
    result |= training_record(ckpt, opts, train_pairs, pairs)
    result["forward"] = {"amp": dtype_name(amp_dtype), "channels_last": channels_last,
                         "ssim": dtype_name(T.accum_dtype(device))}
    result["provenance"] = {"evaluation": T.provenance(device, argv, world),
                            "training": ckpt.get("provenance")}
    write_results(out, result, rows, sample_places(pairs, counts))
    remove_results(out, [n for n in found if n.endswith(".png")])  # after the new results are in: a failed run keeps them
    if opts.vis:
        draw(model, device, normalizer, T.MapDataset(pairs, counts, transform=perturb), rows, out, opts.vis, amp_dtype)
    # (print0: a reader that goes, `| head`, ends the lines, not the job; the files are written by now anyway)
    T.print0(report(result).rstrip("\n"))
    T.print0(f"results in {out}")
    return 0


def refuse_results(out, overwrite):
    """Refuse the evaluation results already in OUT, unless --overwrite."""
    found = T.eval_results(out)
    if found and not overwrite:
        raise T.InputError(f"--output-dir {out} already holds results ({', '.join(found[:3])}"
                           f"{f' and {len(found) - 3} more' if len(found) > 3 else ''}); pass --overwrite to replace "
                           f"them or choose another --output-dir")
    for name in found:  # a folder by a result's name would stop --overwrite only after the evaluation's minutes
        T.refuse_non_file(os.path.join(out, name))


_MADE_DIRS = []  # the output folders this process made: cli removes those still empty, so a failure leaves none


def make_results_dir(out, recheck):
    """OUT made, proved writable and locked for this process (OUT/.lock, as training locks its run), so that a
    second evaluation or prediction into OUT is refused while this one runs; RECHECK then repeats the look for
    results to keep, as another one may have finished there since the first look."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise T.InputError(f"--output-dir {out} exists and is not a directory")
    try:
        if not os.path.isdir(out):
            os.makedirs(out)
            _MADE_DIRS.append(out)
        tempfile.TemporaryFile(dir=out).close()  # now, not after the minutes of evaluation it would waste
    except OSError as e:
        raise T.InputError(f"--output-dir {out}: {e.strerror}") from None
    T.lock_run(out)
    recheck()


def remove_results(out, names):
    """Files of the evaluation that --overwrite replaces: pictures that show other samples, or another model,
    and would otherwise stay beside the new ones; the metrics.json that would vouch for a mix."""
    for name in names:
        try:
            os.remove(os.path.join(out, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise T.InputError(f"--overwrite: cannot remove {os.path.join(out, name)}: {e.strerror}") from None


# ---- inference on unlabelled data, and export ----

def prediction_inputs(path):
    """The shot-gather files of --predict, each opened as a read-only memory map and checked. In a directory,
    the *_velocity.npy files that --predict writes are not inputs."""
    in_dir = os.path.isdir(path)
    if in_dir:
        npys = [n for n in os.listdir(path) if n.endswith(".npy")]
        names = sorted((n for n in npys if not n.endswith("_velocity.npy")), key=T.natural_key)
        if not names and npys:
            raise T.InputError(f"--predict {path}: only *_velocity.npy files in this directory, taken for --predict's "
                               f"outputs (name such a file itself to predict from it)")
        if not names:
            raise T.InputError(f"--predict {path}: no .npy files in this directory")
        files = [os.path.join(path, n) for n in names]
        odd = next((f for f in files if not os.path.isfile(f)), None)
        if odd:  # a FIFO would block the read for ever
            raise T.InputError(f"--predict {path}: {os.path.basename(odd)} is not a regular file")
    elif os.path.isfile(path):
        files = [path]
    elif os.path.exists(path):
        raise T.InputError(f"--predict {path}: not a regular file or a directory")
    else:
        raise T.InputError(f"--predict {path}: no such file or directory")
    maps, labels = [], []
    for f in files:
        a = T.open_npy(f)
        if in_dir and a.ndim == 4 and tuple(a.shape[1:]) == T.LABEL_SHAPE:
            labels.append(os.path.basename(f))  # velocity maps beside their gathers (OpenFWI's fault layout: vel*.npy)
            continue
        if not np.issubdtype(a.dtype, np.floating):
            raise T.DataError(f"{f}: dtype {a.dtype}, expected floating-point shot gathers (float32)")
        if a.ndim != 4 or tuple(a.shape[1:]) != T.DATA_SHAPE or len(a) == 0:
            raise T.DataError(f"{f}: shape {tuple(a.shape)}, expected shot gathers (N, 5, 1000, 70) with N >= 1")
        maps.append((f, a))
    if labels:
        T.print0(f"--predict {path}: skipped {len(labels)} file{'s' * (len(labels) != 1)} of velocity maps "
                 f"({T.listed(labels, 3)}), not shot gathers")
    if not maps:
        raise T.InputError(f"--predict {path}: no shot-gather files in this directory, only velocity maps")
    return maps


def predict_file(model, device, normalizer, amp_dtype, channels_last, path, gathers, dest, batch_size):
    """Velocity maps in m/s for every sample of one file, batch by batch from its memory map into a
    memory-mapped .npy under a temporary name, renamed when complete: memory stays bounded by the batch."""
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(gathers), *T.LABEL_SHAPE))
        if hasattr(os, "posix_fallocate"):  # the blocks now: a full disk is ENOSPC here, not a SIGBUS mid-write
            size = os.path.getsize(tmp)
            with open(tmp, "r+b") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, size)
                except OSError as e:  # a file system without fallocate goes on writing into the sparse file
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise T.InputError(f"cannot write {dest} ({size / 1e6:.2f} MB): {e.strerror}") from None
        for s in range(0, len(gathers), batch_size):
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused just below
                x = np.array(gathers[s:s + batch_size], dtype=np.float32)  # a copy: the map stays read-only
            bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))
            if len(bad):
                raise T.DataError(f"{path} sample {s + int(bad[0])}: NaN or Inf in the shot gathers")
            x = normalizer.data(torch.from_numpy(x).to(device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                pred = T.forward(model, x, amp_dtype)
            velocity = normalizer.label_to_velocity(pred.float()).cpu().numpy()
            bad = np.flatnonzero(~np.isfinite(velocity).reshape(len(x), -1).all(1))
            if len(bad):
                raise non_finite_forward(f"{path} sample {s + int(bad[0])}", "prediction holds", amp_dtype, "predict")
            out[s:s + len(x)] = velocity
        out.flush()
        del out
        os.replace(tmp, dest)
    except OSError as e:
        if e.filename != tmp:  # (an input's error names the input)
            raise
        raise T.InputError(f"cannot write {dest}: {e.strerror}") from None  # the name the user gave, not our temporary one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def predict(opts):
    """--predict: velocity maps for unlabelled shot gathers, with the checkpoint's normalisation."""
    files = prediction_inputs(opts.predict)
    out = default_output_dir(opts, "predict")
    stems = [os.path.join(out, os.path.splitext(os.path.basename(f))[0]) for f, _ in files]
    dests = [stem + "_velocity.npy" for stem in stems]
    inputs = {os.path.realpath(f) for f, _ in files}

    def refuse_outputs():
        for d in dests + [stem + "_predictions.png" for stem in stems]:  # (--vis 0 removes an old one: it showed other maps)
            if os.path.realpath(d) in inputs:
                raise T.InputError(f"{d} is one of the --predict inputs; choose another --output-dir")
            T.refuse_non_file(d)
            if os.path.exists(d) and not opts.overwrite:
                raise T.InputError(f"{d} already exists; pass --overwrite to replace it or choose another --output-dir")
    refuse_outputs()
    device = T.resolve_device(opts.device)
    model, _, targs, normalizer, stats_from = load_model(opts, device)
    amp_dtype, channels_last = forward_settings(opts, model, device, targs)
    make_results_dir(out, refuse_outputs)
    for dest in dests:  # a run killed outright (SIGKILL, a power cut) left its partial output under a temporary name
        for stale in glob.glob(glob.escape(dest) + ".tmp-*"):
            if not process_alive(stale.rpartition(".tmp-")[2]):  # a live one's is another --predict's, under way
                os.remove(stale)
    for (path, gathers), stem, dest in zip(files, stems, dests):
        predict_file(model, device, normalizer, amp_dtype, channels_last, path, gathers, dest, opts.batch_size)
        line = f"{path}: {len(gathers)} velocity maps (m/s) -> {dest}"
        if opts.vis:
            asked = min(opts.vis, len(gathers))
            n = min(asked, PICTURE_ROWS)
            draw_predictions(gathers, np.load(dest, mmap_mode="r"), n, stem + "_predictions.png", normalizer)
            most = " (a picture's most)" if n < asked else ""
            line += f"; the first {n}{most} beside their shot gathers: {stem}_predictions.png"
        elif opts.overwrite:  # an earlier picture showed the maps just replaced
            remove_results(out, [os.path.basename(stem) + "_predictions.png"])
        T.print0(line)  # a reader that goes (`| head`) ends the lines, not the files still to predict
    T.print0(f"normalisation from {stats_from}; forward pass {dtype_name(amp_dtype)}")
    return 0


def process_alive(pid):
    """Whether PID (the text after a temporary file's ".tmp-") names a process running on this machine."""
    if not pid.isdigit() or int(pid) == 0:  # (kill(0) would ask about this process group)
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: the existence check alone
    except (ProcessLookupError, OverflowError):  # none by that number, or a number too big to be a pid
        return False
    except PermissionError:  # another user's process
        return True
    return True


def draw_predictions(gathers, velocity, n, path, normalizer):
    """n samples, one row each: the middle shot gather and the predicted velocity map."""
    plt = pyplot()
    fig, axs = plt.subplots(n, 2, figsize=(9, 3.6 * n), squeeze=False)
    for i in range(n):
        g = np.asarray(gathers[i, 2], dtype=np.float32)
        show_gather(axs[i, 0], g, np.percentile(np.abs(g), 99), f"sample {i}: shot 3")
        axs[i, 0].set_ylabel("time (s)")
        im = axs[i, 1].imshow(velocity[i, 0], cmap="jet", vmin=normalizer.label_min, vmax=normalizer.label_max,
                              extent=[0, 700, 700, 0])
        axs[i, 1].set(title="predicted velocity", xlabel="x (m)", ylabel="depth (m)")
        fig.colorbar(im, ax=axs[i, 1], label="m/s")
    save_figure(plt, fig, path, dpi=80)


class UnderAutocast(torch.nn.Module):
    """The model's forward pass under autocast, output in float32: the exported program then computes in the
    precision that eval and --predict use (torch.export records the region for the device it is traced on)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        return T.forward(self.model, x, self.dtype).float()


def export(opts):
    """--export: the model in eval mode as a torch.export program, batch dimension dynamic, in the precision of
    --amp (auto: the checkpoint's), traced on the CPU unless --device names another (its inputs then go there).
    Its input is normalised shot gathers (B, 5, 1000, 70), its output velocity in [-1, 1]; the normalisation
    constants travel with it as the extra file normalization.json."""
    T.refuse_non_file(opts.export)  # before the minute of tracing, not after
    folder = os.path.dirname(os.path.abspath(opts.export))
    if not os.path.isdir(folder):
        raise T.InputError(f"--export {opts.export}: no such directory {folder}")
    if os.path.exists(opts.export) and os.path.samefile(opts.export, opts.checkpoint):  # --overwrite or not
        raise T.InputError(f"--export {opts.export} is the checkpoint it exports: name another file")
    if os.path.exists(opts.export) and not opts.overwrite:
        raise T.InputError(f"--export {opts.export} already exists; pass --overwrite to replace it")
    device = torch.device("cpu") if opts.device == "auto" else T.resolve_device(opts.device)  # auto: portable
    model, _, targs, normalizer, _ = load_model(opts, device)
    dtype = forward_dtype(opts, targs)
    if dtype is not None:
        model = UnderAutocast(model, dtype)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (torch.zeros(2, *T.DATA_SHAPE, device=device),), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"normalization.json": json.dumps(normalizer.as_dict())})
    write_file(opts.export, buf.getbuffer(), replace=opts.overwrite)
    T.print0(f"exported InversionNet to {opts.export} ({dtype_name(dtype)}{' autocast' if dtype else ''} on {device.type}): "
             f"torch.export.load(path).module() maps normalised shot gathers (B, 5, 1000, 70) to velocity in [-1, 1]; "
             f"normalisation {normalizer.as_dict()}")
    return 0


def main(opts, argv=()):
    check_opts(opts)
    if opts.export:
        return export(opts)
    if opts.predict:
        return predict(opts)
    return run_evaluation(opts, argv)


def remove_empty(dirs):
    while dirs:
        try:
            os.rmdir(dirs.pop())  # only an empty folder goes: one that holds results stays
        except OSError:
            pass


class Terminated(BaseException):
    """SIGTERM (a scheduler, `timeout`) raised on the main thread as Ctrl-C is, so that the file being written
    is removed on the way out (predict_file's finally) instead of left behind as a temporary file."""
    received = False  # set by the handler: whether this run's cli() has had one


def raise_terminated(signum, frame):
    # noted as well as raised: raised inside a finalizer (a progress bar's __del__), the exception is
    # printed and ignored by Python, and the run would go on to exit 0
    Terminated.received = True
    raise Terminated


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # where alone signal handlers can be set
    Terminated.received = False
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    # two tries: a signal that a failing call held back arrives inside the inner one's error report
    try:
        try:
            code = main(get_args_parser().parse_args(argv), ["eval_inversionnet.py", *argv])
            if Terminated.received:  # (its raise was lost in a finalizer)
                raise Terminated
            T.wait_for_ranks(code)
            return code
        except (T.InputError, RuntimeError, OSError) as e:
            if not T.report_input_error("eval_inversionnet.py", e):
                raise
            return 2
    except (KeyboardInterrupt, Terminated) as e:
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        if T.is_main():
            print(f"eval_inversionnet.py: {'terminated' if signum == signal.SIGTERM else 'interrupted'}; the files "
                  f"written so far are whole, the one under way is removed", file=sys.stderr)
        return 128 + signum
    finally:
        T.cleanup_distributed()
        T.unlock_run(remove=True)
        remove_empty(_MADE_DIRS)
        if main_thread:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: a handler not set from Python


if __name__ == "__main__":
    if SIGINT_AT_START is signal.default_int_handler:  # the imports are done: cli() reports a Ctrl-C
        signal.signal(signal.SIGINT, SIGINT_AT_START)
    sys.exit(cli())
