"""Evaluate an InversionNet checkpoint with the OpenFWI paper's metrics; pictures and result files.

    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --vis 3
    python eval_inversionnet.py --checkpoint fva_l1.pth --val-list split/flatvel_a_val.txt --dataset flatvel-a
    python eval_inversionnet.py --checkpoint runs/inversionnet/best.pt --noise-std 0.1 --missing-traces 5
    torchrun --nproc_per_node=2 eval_inversionnet.py --checkpoint runs/inversionnet/best.pt

The model, split and normalisation come from the checkpoint's saved arguments (so train and eval
cannot drift); flags given here override them. Writes OUT/metrics.json, OUT/result.txt,
OUT/per_sample.csv and, with --vis N, PNGs of the best, median and worst samples by MAE.
Metrics (OpenFWI test.py): MAE, MSE, RMSE = sqrt(MSE) and SSIM on the normalised [-1, 1] scale
(SSIM on (x+1)/2, Gaussian 11x11 window, sigma 1.5), plus MAE and RMSE in m/s.
"""
import argparse
import csv
import io
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import simulate_openfwi as S
import train_inversionnet as T

# OpenFWI paper, InversionNet with L1 loss: MAE, RMSE, SSIM on the normalised scale
PAPER = {"flatvel-a": (0.0131, 0.0211, 0.9895), "flatvel-b": (0.0351, 0.0876, 0.9461),
         "curvevel-a": (0.0685, 0.1273, 0.8074), "curvevel-b": (0.1497, 0.2891, 0.6727),
         "flatfault-a": (0.0172, 0.0426, 0.9766), "flatfault-b": (0.1055, 0.1741, 0.7208),
         "curvefault-a": (0.0260, 0.0650, 0.9566), "curvefault-b": (0.1646, 0.2477, 0.6163),
         "style-a": (0.0625, 0.1024, 0.8859), "style-b": (0.0689, 0.1614, 0.6314)}


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate InversionNet on OpenFWI-format data.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="last.pt / best.pt of train_inversionnet.py, or an OpenFWI checkpoint")
    p.add_argument("--data-root", default=None, help="OpenFWI layout; the val split is made as in training (default: from the checkpoint)")
    p.add_argument("--val-list", default=None, help="OpenFWI split file to evaluate instead")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split of --data-root to evaluate")
    p.add_argument("--dataset", default=None, choices=sorted(T.DATASETS), help="normalisation constants (needed for OpenFWI checkpoints)")
    p.add_argument("--stats", default=None, help="normalisation JSON (as written by simulate_openfwi.py)")
    p.add_argument("--output-dir", default=None, help="where results go (default: CHECKPOINT_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --output-dir")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="device")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch per process")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--loader", default="map", choices=["map", "gpu"], help="map: mmap reads; gpu: split held on the device")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--vis", type=int, default=3, help="number of samples to draw (best, median, worst, ...); 0: none")
    p.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise, as a fraction of each trace's peak amplitude")
    p.add_argument("--missing-traces", type=int, default=0, help="receivers muted at random in every sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return p


def ssim(pred, target):
    """Mean SSIM of maps in [-1, 1] (OpenFWI's definition, see train_inversionnet.ssim_per_sample)."""
    return T.ssim_per_sample(pred, target).mean()


def perturb(x, noise_std, missing, generator):
    """Seeded robustness perturbations of raw shot gathers (B, S, T, R), never in place."""
    if noise_std > 0:
        peak = x.abs().amax(dim=2, keepdim=True)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x = x + noise_std * peak * noise
    if missing > 0:
        keep = torch.ones(x.shape[0], 1, 1, x.shape[3])
        for b in range(x.shape[0]):
            keep[b, 0, 0, torch.randperm(x.shape[3], generator=generator)[:missing]] = 0
        x = x * keep.to(x.device)
    return x


def train_args_from(ckpt, cli):
    """The training arguments saved in our checkpoint (a Namespace), or defaults for an OpenFWI one."""
    base = T.get_args_parser().parse_args([])
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(saved, dict):
        for k, v in saved.items():
            setattr(base, k, v)
    for k in ("dataset", "stats"):
        if getattr(cli, k) is not None:
            setattr(base, k, getattr(cli, k))
    if cli.dataset is not None:
        base.stats = None
    if cli.data_root is not None:
        base.data_root, base.train_list = cli.data_root, None
    return base, isinstance(saved, dict)


def evaluation_pairs(cli, targs):
    if cli.val_list:
        return T.read_split_list(cli.val_list), None
    train, val = T.splits(targs)
    return (val if cli.split == "val" else train), train


def mean_velocity_map(train_pairs, counts=None):
    """The mean training velocity map in m/s: the trivial baseline every model must beat."""
    total, n = None, 0
    for _, lpath in train_pairs:
        y = np.load(lpath, mmap_mode="r")
        s = y.sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        n += len(y)
    return torch.from_numpy((total / n).astype(np.float32))


def check_cli(cli):
    if cli.batch_size <= 0:
        raise T.InputError(f"--batch-size must be positive, got {cli.batch_size}")
    for flag, value in (("--noise-std", cli.noise_std), ("--vis", cli.vis), ("--num-workers", cli.num_workers)):
        if value < 0:
            raise T.InputError(f"{flag} must be >= 0, got {value}")
    if not 0 <= cli.missing_traces <= 70:
        raise T.InputError(f"--missing-traces must be in [0, 70], got {cli.missing_traces}")


def main(cli):
    check_cli(cli)
    out = cli.output_dir or os.path.join(os.path.dirname(os.path.abspath(cli.checkpoint)), "eval")
    if os.path.exists(os.path.join(out, "metrics.json")) and not cli.overwrite:
        raise T.InputError(f"--output-dir {out} already holds results (metrics.json); pass --overwrite to replace "
                           f"them or choose another --output-dir")
    rank, world, local = T.setup_distributed(argparse.Namespace(parallel="auto", device=cli.device))
    device = T.resolve_device(cli.device, local)
    if cli.loader == "gpu" and (cli.noise_std or cli.missing_traces):
        raise T.InputError("--noise-std/--missing-traces perturb raw data: use --loader map")
    if not os.path.isfile(cli.checkpoint):
        raise T.InputError(f"--checkpoint {cli.checkpoint}: no such file")
    model = T.InversionNet()
    ckpt = T.load_weights(model, cli.checkpoint)
    targs, ours = train_args_from(ckpt, cli)
    if not ours and cli.dataset is None and cli.stats is None:
        raise T.InputError(f"{cli.checkpoint} carries no training arguments (OpenFWI checkpoint?): name the constants with --dataset or --stats")
    if ours and cli.dataset is None and cli.stats is None and "normalization" in ckpt:
        n = ckpt["normalization"]
        normalizer, stats_from = T.Normalizer(n["data_min"], n["data_max"], n["label_min"], n["label_max"]), "the checkpoint"
    else:
        normalizer, stats_from = T.resolve_stats(targs)
    pairs, train_pairs = evaluation_pairs(cli, targs)
    if not pairs:
        raise T.DataError("the evaluation split is empty")
    counts = T.inspect_pairs(pairs)
    model.to(device).eval()
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise T.InputError(f"--output-dir {out}: {e.strerror}") from None

    largs = argparse.Namespace(loader=cli.loader, batch_size=cli.batch_size, val_batch_size=cli.batch_size,
                               cache_dtype="float32", normalize="device", num_workers=cli.num_workers,
                               pin_memory=None, prefetch_factor=2, persistent_workers=False, seed=cli.seed)
    loader, normalized, _ = T.build_loader(largs, pairs, counts, normalizer, device, rank, world, train=False)
    baseline = normalizer.label(mean_velocity_map(train_pairs if train_pairs else pairs)).to(device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cli.amp)
    gen = torch.Generator().manual_seed(cli.seed + rank)
    sums = torch.zeros(4, dtype=torch.float64)
    base_sums = torch.zeros(4, dtype=torch.float64)
    ms_sums = torch.zeros(2, dtype=torch.float64)  # per-sample mean |error| and error^2 in m/s, summed
    rows, k = [], 0
    from tqdm import tqdm
    bar = tqdm(total=len(loader), disable=not (cli.progress and rank == 0), desc="eval", leave=False)
    scale = (normalizer.label_max - normalizer.label_min) / 2
    with torch.no_grad():
        for x, y in loader:
            if not normalized:
                x = perturb(x.float(), cli.noise_std, cli.missing_traces, gen)
                x, y = normalizer.data(x.to(device)), normalizer.label(y.to(device).float())
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                pred = model(x)
            pred = pred.float()
            y = y.float()
            mae = (pred - y).abs().flatten(1).mean(1)
            mse = ((pred - y) ** 2).flatten(1).mean(1)
            ss = T.ssim_per_sample(pred, y)
            sums += T.metric_sums(pred, y).cpu()
            base_sums += T.metric_sums(baseline.expand_as(y), y).cpu()
            ms_sums += torch.stack([(mae * scale).sum(), (mse * scale ** 2).sum()]).double().cpu()
            for j in range(len(y)):
                rows.append((rank + world * k, mae[j].item(), math.sqrt(mse[j].item()), ss[j].item(),
                             mae[j].item() * scale, math.sqrt(mse[j].item()) * scale))
                k += 1
            bar.update(1)
    bar.close()
    sums, base_sums, ms_sums = T.all_reduce_sum(sums), T.all_reduce_sum(base_sums), T.all_reduce_sum(ms_sums)
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return 0
    rows.sort()
    m = T.summarize(sums)
    n = m["count"]
    m["mae_ms"] = ms_sums[0].item() / n
    m["rmse_ms"] = math.sqrt(ms_sums[1].item() / n)
    b = T.summarize(base_sums)
    b["mae_ms"], b["rmse_ms"] = b["mae"] * scale, b["rmse"] * scale
    family = cli.dataset or getattr(targs, "dataset", None) or "flatvel-a"
    result = {"checkpoint": os.path.abspath(cli.checkpoint), "samples": n, "files": len(pairs), "split": "list" if cli.val_list else cli.split,
              "normalization": normalizer.as_dict(), "normalization_from": stats_from,
              "perturbation": {"noise_std": cli.noise_std, "missing_traces": cli.missing_traces, "seed": cli.seed},
              "model": m, "baseline_mean_map": b, "paper_reference": {"dataset": family, "mae": PAPER[family][0],
                                                                      "rmse": PAPER[family][1], "ssim": PAPER[family][2]}}
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["index", "mae", "rmse", "ssim", "mae_ms", "rmse_ms"])
    w.writerows(rows)
    text = report(result)
    # metrics.json last: it marks a complete result
    for name, content in (("per_sample.csv", table.getvalue()), ("result.txt", text),
                          ("metrics.json", json.dumps(result, indent=2))):
        path = os.path.join(out, name)
        try:
            S.write_text_atomic(path, content)
        except OSError as e:
            raise T.InputError(f"cannot write {path}: {e.strerror}") from None
    if cli.vis:
        draw(cli, model, device, normalizer, pairs, counts, rows, out, amp_dtype)
    print(text, end="")
    print(f"results in {out}")
    return 0


def report(r):
    m, b, p = r["model"], r["baseline_mean_map"], r["paper_reference"]
    pert = r["perturbation"]
    lines = [f"InversionNet evaluation: {r['samples']} samples from {r['files']} files ({r['checkpoint']})",
             f"perturbation: noise {pert['noise_std']:g} x trace peak, {pert['missing_traces']} muted receivers, seed {pert['seed']}",
             f"{'':24s}{'MAE':>9s}{'RMSE':>9s}{'SSIM':>9s}{'MAE m/s':>10s}{'RMSE m/s':>10s}",
             f"{'model':24s}{m['mae']:9.4f}{m['rmse']:9.4f}{m['ssim']:9.4f}{m['mae_ms']:10.1f}{m['rmse_ms']:10.1f}",
             f"{'baseline (mean map)':24s}{b['mae']:9.4f}{b['rmse']:9.4f}{b['ssim']:9.4f}{b['mae_ms']:10.1f}{b['rmse_ms']:10.1f}",
             f"{'paper ' + p['dataset']:24s}{p['mae']:9.4f}{p['rmse']:9.4f}{p['ssim']:9.4f}",
             f"beats the baseline: MAE {'yes' if m['mae'] < b['mae'] else 'NO'}, SSIM {'yes' if m['ssim'] > b['ssim'] else 'NO'}"]
    return "\n".join(lines) + "\n"


def draw(cli, model, device, normalizer, pairs, counts, rows, out, amp_dtype):
    """Truth / prediction / difference in m/s for the best, median and worst samples, their shot
    gathers, and a histogram of per-sample SSIM."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = sorted(rows, key=lambda r: r[1])
    picks = [order[int(round(i * (len(order) - 1) / max(cli.vis - 1, 1)))] for i in range(min(cli.vis, len(order)))]
    ds = T.MapDataset(pairs, counts)
    gen = torch.Generator().manual_seed(cli.seed)
    extent = [0, 700, 700, 0]  # metres: 70 cells of 10 m
    for rank_i, row in enumerate(picks):
        idx = row[0]
        x, y = ds[idx]
        x = perturb(x[None], cli.noise_std, cli.missing_traces, gen)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = model(normalizer.data(x.to(device))).float()
        vp = normalizer.label_to_velocity(pred)[0, 0].cpu().numpy()
        vt = y[0].numpy()
        tag = "best" if rank_i == 0 else ("worst" if rank_i == len(picks) - 1 else f"rank{rank_i}")
        fig, axs = plt.subplots(1, 3, figsize=(13, 4))
        lo, hi = normalizer.label_min, normalizer.label_max
        for ax, img, title in ((axs[0], vt, "true velocity"), (axs[1], vp, "prediction")):
            im = ax.imshow(img, cmap="jet", vmin=lo, vmax=hi, extent=extent)
            ax.set_title(title)
            ax.set_xlabel("x (m)")
            ax.set_ylabel("depth (m)")
            fig.colorbar(im, ax=ax, label="m/s")
        d = vp - vt
        lim = max(abs(d).max(), 1.0)
        im = axs[2].imshow(d, cmap="seismic", vmin=-lim, vmax=lim, extent=extent)
        axs[2].set_title(f"prediction - truth (MAE {row[4]:.0f} m/s)")
        axs[2].set_xlabel("x (m)")
        fig.colorbar(im, ax=axs[2], label="m/s")
        fig.suptitle(f"sample {idx} ({tag}): MAE {row[1]:.4f}, SSIM {row[3]:.4f}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"sample_{idx}_{tag}.png"), dpi=90)
        plt.close(fig)
        if rank_i == 0:
            fig, axs = plt.subplots(1, x.shape[1], figsize=(3 * x.shape[1], 4), sharey=True)
            g = x[0].numpy()
            clip = np.percentile(np.abs(g), 99)
            for s in range(x.shape[1]):
                axs[s].imshow(g[s], cmap="gray", aspect="auto", vmin=-clip, vmax=clip, extent=[0, 700, 1.0, 0])
                axs[s].set_title(f"shot {s + 1}")
                axs[s].set_xlabel("receiver x (m)")
            axs[0].set_ylabel("time (s)")
            fig.tight_layout()
            fig.savefig(os.path.join(out, f"sample_{idx}_shots.png"), dpi=80)
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([r[3] for r in rows], bins=30)
    ax.set_xlabel("SSIM per sample")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ssim_histogram.png"), dpi=90)
    plt.close(fig)


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except T.InputError as e:
        print(f"eval_inversionnet.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        import re
        m = re.search(r"DataError: (.+)$", str(e).strip())
        if m:
            print(f"eval_inversionnet.py: error: {m.group(1)}", file=sys.stderr)
            return 2
        raise
    finally:
        T.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(cli())
