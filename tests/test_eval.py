"""eval_inversionnet.py: metric definitions, perturbations, files, bad input."""
import argparse
import csv
import fcntl
import importlib.util
import json
import os
import signal
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from unittest.mock import ANY

import eval_inversionnet as E
import train_inversionnet as T
from helpers import (EVAL, TRAIN, SignalledOnRelease, conv_dtypes_during, layered_maps, module_dir, run_script, run_without_reader, write_ids_dataset,
                     write_negative_shape_npy, write_split_list)


def ssim_reference(a, b):
    """Independent float64 SSIM of one map pair in [-1, 1]: explicit 11x11 Gaussian window, zero padding."""
    x, y = (a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2
    r = np.arange(11) - 5
    g = np.exp(-(r ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(img):
        p = np.pad(img, 5)
        out = np.zeros_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[i, j] = (p[i:i + 11, j:j + 11] * w).sum()
        return out

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean()


def test_ssim_of_identical_maps_is_one():
    x = torch.rand(3, 1, 70, 70) * 2 - 1
    assert T.ssim_per_sample(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_ssim_matches_independent_float64_computation():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 1, 70, 70)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    ours = T.ssim_per_sample(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = [ssim_reference(a[i, 0], b[i, 0]) for i in range(2)]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_ssim_of_layered_maps_matches_the_float64_reference():
    """Flat layers and predictions close to them, where a float32 (or TF32) computation loses digits."""
    truth = layered_maps(4)
    rng = np.random.default_rng(1)
    for pred in (np.clip(truth + rng.normal(0, 0.01, truth.shape), -1, 1).astype(np.float32), truth + np.float32(0.02)):
        ours = T.ssim_per_sample(torch.from_numpy(pred), torch.from_numpy(truth)).numpy()
        np.testing.assert_allclose(ours, [ssim_reference(p[0], t[0]) for p, t in zip(pred, truth)], atol=1e-6)


def test_metrics_zero_for_perfect_prediction_and_hand_computed_values():
    t = torch.zeros(2, 1, 70, 70)
    m = T.summarize(T.metric_sums(T.per_sample_metrics(t, t)))
    assert m["mae"] == 0 and m["mse"] == 0 and m["rmse"] == 0 and m["ssim"] == pytest.approx(1.0)
    p = t.clone()
    p[0, 0, :35] = 0.2  # half of sample 0 off by 0.2, sample 1 perfect
    m = T.summarize(T.metric_sums(T.per_sample_metrics(p, t)))
    assert m["mae"] == pytest.approx((0.1 + 0) / 2) and m["mse"] == pytest.approx((0.02 + 0) / 2)
    assert m["rmse"] == pytest.approx(0.1)


def test_perturbations_are_seeded_per_sample_and_do_what_they_say():
    x = torch.randn(5, 1000, 70)
    keep = x.clone()
    p = E.Perturb(0.1, 4, seed=1)
    a = p(x, 7)
    assert torch.equal(a, p(x, 7)) and torch.equal(x, keep)
    assert not torch.equal(a, E.Perturb(0.1, 4, seed=2)(x, 7)) and not torch.equal(a, p(x, 8))
    # one stream per (seed, sample): another --seed is not the same draws shifted by one sample
    assert not torch.equal(E.Perturb(0.1, 4, seed=1)(x, 0), E.Perturb(0.1, 4, seed=0)(x, 1))
    for i in range(20):  # K distinct receivers muted in every shot, whatever the draw
        muted = (E.Perturb(0, 30, seed=1)(x, i) == 0).all(dim=1)
        assert (muted.sum(dim=1) == 30).all() and (muted == muted[0]).all()
    muted = (a.abs().sum(dim=(0, 1)) == 0).sum().item()
    assert muted == 4  # the same receivers in every shot
    noisy = E.Perturb(0.1, 0, seed=1)(x, 0) - x
    ratio = noisy.std(dim=1) / x.abs().amax(dim=1)
    assert ratio.mean().item() == pytest.approx(0.1, rel=0.05)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with module_dir(tmp_path_factory, "evalrun") as base:
        write_ids_dataset(base / "d", (4, 4, 4))
        # relative paths, trained in another working directory than the tests evaluate from: the run records
        # its inputs as absolute paths, so eval finds the training data from anywhere
        r = run_script(TRAIN, "--data-root", "d", "--output-dir", "run", "--epochs", 1, "--batch-size", 2,
                       "--num-workers", 0, "--no-progress", "--dataset", "flatvel-a", "--train-size", 0.67, cwd=base)
        assert r.returncode == 0, r.stderr
        assert json.loads((base / "run" / "args.json").read_text())["data_root"] == str(base / "d")
        yield base


@pytest.mark.slow
def test_end_to_end_eval_writes_all_files(tiny_run):
    out = tiny_run / "ev"
    r = run_script(EVAL, "--checkpoint", tiny_run / "run" / "best.pt", "--output-dir", out, "--num-workers", 0,
                   "--vis", 3, "--noise-std", 0.05, "--missing-traces", 2)
    assert r.returncode == 0 and "eval:" not in r.stderr, r.stderr  # no progress bar redrawn into a pipe or a log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 4 and metrics["files"] == 1  # the split rule of training, from the checkpoint
    assert (out / "result.txt").read_text().startswith("InversionNet evaluation of the validation split: 4 samples from 1 file (")
    assert "best.pt, weights: trained, step 4: 1 epoch trained)\n" in (out / "result.txt").read_text()
    assert metrics["trained_to"] == {"step": 4, "epoch": 1, "batch_in_epoch": 0}  # 8 training samples, batch 2
    assert E.trained_to({"step": 9, "epoch": 2, "batch_in_epoch": 1}) == ", step 9: 2 epochs and 1 batch trained"
    assert E.trained_to(None) == ""  # a file without counters (OpenFWI's own checkpoints)
    assert metrics["perturbation"] == {"noise_std": 0.05, "missing_traces": 2, "seed": 0}
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    trained = {d for d, *_ in torch.load(tiny_run / "run" / "best.pt", weights_only=False)["split"]}
    [val] = [d for d, _ in T.find_pairs(str(tiny_run / "d")) if os.path.basename(d) not in trained]
    assert [(r["index"], r["file"], r["sample_in_file"]) for r in rows] == [(str(k), val, str(k)) for k in range(4)]
    assert E.sample_places([("a.npy", "ma.npy"), ("b.npy", "mb.npy")], [3, 2]) == [
        ("a.npy", 0), ("a.npy", 1), ("a.npy", 2), ("b.npy", 0), ("b.npy", 1)]
    assert np.mean([float(r["mae"]) for r in rows]) == pytest.approx(metrics["model"]["mae"])
    assert np.mean([float(r["rmse"]) ** 2 for r in rows]) == pytest.approx(metrics["model"]["mse"])  # per sample, RMSE
    for row in rows:
        assert (float(row["mae_ms"]), float(row["rmse_ms"])) == pytest.approx((float(row["mae"]) * 1500, float(row["rmse"]) * 1500))
    model = metrics["model"]  # OpenFWI's test.py also reports MAE and MSE in m/s
    assert (model["mae_ms"], model["mse_ms2"]) == pytest.approx((model["mae"] * 1500, model["mse"] * 1500 ** 2))
    assert (model["rmse"], model["rmse_ms"]) == pytest.approx((model["mse"] ** 0.5, model["mse"] ** 0.5 * 1500))
    # the verdict line follows the two rows it compares (it is printed whatever the verdict)
    base = metrics["baseline_mean_map"]
    verdict = (f"beats the baseline: MAE {'yes' if model['mae'] < base['mae'] else 'NO'}, "
               f"SSIM {'yes' if model['ssim'] > base['ssim'] else 'NO'}\n")
    assert "baseline (train mean)" in (out / "result.txt").read_text() and verdict in r.stdout, r.stdout
    assert "; metrics in float32, the model's SSIM in float64\n" in (out / "result.txt").read_text()
    assert metrics["paper_reference"] == {"dataset": "flatvel-a", "mae": 0.0131, "rmse": 0.0211, "ssim": 0.9895, "data": "OpenFWI"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    tags = sorted(p.rsplit("_", 1)[1] for p in pngs if p.startswith("sample_") and not p.endswith("shots.png"))
    assert tags == ["best.png", "p50.png", "worst.png"]  # p50: the median sample by MAE
    drawn = {p.rsplit("_", 1)[1][:-4]: int(p.split("_")[1]) for p in pngs if p.startswith("sample_")}
    by_mae = [int(r["index"]) for r in sorted(rows, key=lambda r: float(r["mae"]))]
    assert drawn == {"best": by_mae[0], "p50": by_mae[2], "worst": by_mae[3], "shots": by_mae[0]}
    assert "ssim_histogram.png" in pngs


def test_openfwi_checkpoint_needs_and_uses_dataset(tiny_run, tmp_path, capsys):
    sd = torch.load(tiny_run / "run" / "best.pt", weights_only=False)["model"]
    torch.save({"model": sd, "epoch": 0}, tmp_path / "fva_l1.pth")
    lst = tmp_path / "val.txt"
    lst.write_text(f"{tiny_run / 'd' / 'data' / 'data1.npy'}\t{tiny_run / 'd' / 'model' / 'model1.npy'}\n")
    args = ["--checkpoint", str(tmp_path / "fva_l1.pth"), "--val-list", str(lst), "--num-workers", "0", "--no-progress", "--vis", "0"]
    assert E.cli(args) == 2 and "--dataset" in capsys.readouterr().err
    no_data = [a for a in args if a not in ("--val-list", str(lst))] + ["--dataset", "flatvel-a"]
    assert E.cli(no_data) == 2  # without --val-list it would score whatever data/flatvel holds here
    assert "records no data (OpenFWI checkpoint?): name the data to evaluate with --val-list or --data-root" in capsys.readouterr().err
    assert E.cli(args + ["--dataset", "flatvel-a", "--output-dir", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["samples"] == 4
    # OpenFWI's train.py saves its argparse Namespace (the dataset named there) and the index of the epoch
    # just trained: the constants and the paper row come from that name, and one epoch is one epoch
    torch.save({"model": sd, "epoch": 0, "step": 2, "args": argparse.Namespace(dataset="flatvel-a", lr=1e-4)},
               tmp_path / "named.pth")
    capsys.readouterr()
    assert E.cli([*args[2:], "--checkpoint", str(tmp_path / "named.pth"), "--output-dir", str(tmp_path / "n")]) == 0
    named, given = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("n", "o"))
    assert named["model"] == given["model"] and named["paper_reference"] == given["paper_reference"]
    assert named["normalization_from"] == "OpenFWI's flatvel-a constants (the dataset the checkpoint names)"
    assert "named.pth, weights: trained, step 2: 1 epoch trained)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "truncated", "incompatible", "no_normalization", "inf_normalization", "empty_split",
                                  "km_per_s"])
def test_bad_checkpoint_or_data(tiny_run, tmp_path, capsys, case):
    ck = tiny_run / "run" / "best.pt"
    args = ["--num-workers", "0", "--no-progress", "--vis", "0", "--output-dir", str(tmp_path / "o")]
    if case == "missing":
        args += ["--checkpoint", str(tmp_path / "nope.pt")]
        needle = "no such file"
    elif case == "truncated":
        (tmp_path / "t.pt").write_bytes(ck.read_bytes()[:1000])
        args += ["--checkpoint", str(tmp_path / "t.pt")]
        needle = "not a readable checkpoint"
    elif case == "incompatible":
        torch.save({"model": {"fc.weight": torch.zeros(2)}}, tmp_path / "i.pt")
        args += ["--checkpoint", str(tmp_path / "i.pt"), "--dataset", "flatvel-a"]
        needle = "incompatible"
    elif case == "no_normalization":
        ckpt = torch.load(ck, weights_only=False)
        ckpt["normalization"] = {}
        torch.save(ckpt, tmp_path / "n.pt")
        args += ["--checkpoint", str(tmp_path / "n.pt")]
        needle = "n.pt: its normalisation record is unreadable; name the constants with --dataset or --stats"
    elif case == "inf_normalization":
        ckpt = torch.load(ck, weights_only=False)
        ckpt["normalization"]["data_max"] = float("inf")
        torch.save(ckpt, tmp_path / "inf.pt")
        args += ["--checkpoint", str(tmp_path / "inf.pt")]
        needle = "inf.pt (its normalisation): the constants must be finite numbers, got"
    elif case == "empty_split":
        (tmp_path / "empty.txt").write_text("\n")
        args += ["--checkpoint", str(ck), "--val-list", str(tmp_path / "empty.txt")]
        needle = "empty split"
    else:  # labels in km/s would score a model against maps it can never draw
        pairs = write_ids_dataset(tmp_path / "d", (2,))
        np.save(pairs[0][1], np.load(pairs[0][1]) / 1000)
        (tmp_path / "val.txt").write_text(f"{pairs[0][0]} {pairs[0][1]}\n")
        args += ["--checkpoint", str(ck), "--val-list", str(tmp_path / "val.txt")]
        needle = "(the file's median), far outside the normalisation's 1500 to 4500 m/s (the checkpoint)"
    assert E.cli(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--batch-size", "100000000000000000000"], "--batch-size must be at most 2147483647, got 100000000000000000000"),
    (["--missing-traces", "71"], "--missing-traces must be in [0, 70], got 71"),
    (["--noise-std", "-0.1"], "--noise-std must be in [0, 10] (times each trace's peak), got -0.1"),
    (["--seed", "-1"], "--seed must be in [0, 2147483647], got -1"),
    (["--noise-std", "nan"], "--noise-std must be in [0, 10] (times each trace's peak), got nan"),
    (["--noise-std", "inf"], "--noise-std must be in [0, 10] (times each trace's peak), got inf"),
    (["--predict", ""], "argument --predict: an empty path (--help lists the flags)"),
    (["--num-workers", "100000"], f"--num-workers 100000 is more than 4 per CPU of this machine ({4 * os.cpu_count()}); the "
                                  "loaders gain nothing beyond a few"),
    (["--val-list", "/nonexistent/val.txt"], "--val-list /nonexistent/val.txt: no such file"),
    (["--split", "test"], "argument --split: invalid choice: 'test' (choose from 'val', 'train') (--help lists the flags)"),
    (["--vis"], "argument --vis: expected one argument (--help lists the flags)"),
    (["--val-list", "VAL", "--split", "train"], "--split chooses a split of --data-root and --val-list names its files: "
                                                "give one of them"),
    (["--val-list", "VAL", "--data-root", "."], "--data-root makes the split to evaluate and --val-list names its files: "
                                                "give one of them"),
    (["--predict", "X.npy", "--loader", "gpu"], "--loader belongs to an evaluation on labelled data; --predict does not "
                                                "read any: leave it out"),
    (["--predict", "X.npy", "--val-list", "VAL"], "--val-list belongs to an evaluation on labelled data; --predict does not "
                                                  "read any: leave it out"),
    (["--export", "m.pt2", "--noise-std", "0.1"], "--noise-std belongs to an evaluation on labelled data; --export does not "
                                                  "read any: leave it out"),
    (["--predict", "X.npy", "--missing-traces", "5"], "--missing-traces belongs to an evaluation on labelled data; --predict "
                                                      "does not read any: leave it out"),
    (["--predict", "X.npy", "--data-root", "."], "--data-root belongs to an evaluation on labelled data; --predict does "
                                                 "not read any: leave it out"),
    (["--export", "m.pt2", "--split", "train"], "--split belongs to an evaluation on labelled data; --export does not "
                                                "read any: leave it out"),
    (["--predict", "X.npy", "--seed", "3"], "--seed belongs to an evaluation on labelled data; --predict does not read "
                                            "any: leave it out"),
    (["--export", "m.pt2", "--seed", "3"], "--seed belongs to an evaluation on labelled data; --export does not read any: "
                                           "leave it out"),
    (["--export", "m.pt2", "--vis", "5"], "--export writes the one file it names; --vis is not used: leave it out"),
    (["--export", "m.pt2", "--batch-size", "7"], "--export writes the one file it names; --batch-size is not used: leave "
                                                 "it out"),
    (["--predict", "X.npy", "--export", "m.pt2"], "--predict and --export are separate jobs: give one of them"),
    (["--vis", "-1"], "--vis must be >= 0, got -1"),
    (["--noise-std", "10.5"], "--noise-std must be in [0, 10] (times each trace's peak), got 10.5"),
    # the device cache holds the normalised data: a perturbation of the raw gathers would be skipped, not refused
    (["--loader", "gpu", "--noise-std", "0.1"], "--noise-std/--missing-traces perturb raw data: use --loader map"),
    (["--loader", "gpu", "--missing-traces", "3"], "--noise-std/--missing-traces perturb raw data: use --loader map"),
])
def test_bad_flags_one_line_exit_2(tmp_path, capsys, args, needle):
    (tmp_path / "never-read.pt").touch()  # there, so the flag's own check is the one that fails
    (tmp_path / "val.txt").touch()
    args = [str(tmp_path / "val.txt") if a == "VAL" else a for a in args]
    assert E.cli(["--checkpoint", str(tmp_path / "never-read.pt"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"eval_inversionnet.py: error: {needle}"


@pytest.mark.parametrize("missing, flags, needle", [
    ("matplotlib", [], "the matplotlib package is not installed: pip install -r requirements.txt, or pass --vis 0"),
    ("matplotlib", ["--predict", "X.npy"], "the matplotlib package is not installed: pip install -r requirements.txt, or "
                                           "pass --vis 0"),
    ("tqdm", ["--vis", "0"], "the tqdm package is not installed: pip install -r requirements.txt"),
])
def test_a_missing_package_is_named_before_anything_is_read(tmp_path, capsys, monkeypatch, missing, flags, needle):
    """The pictures and the bar import their packages where they are drawn, after the metrics: without one
    the run is refused at the start, and a job that does not draw or show them is not."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    (tmp_path / "never-read.pt").touch()
    checkpoint = ["--checkpoint", str(tmp_path / "never-read.pt")]
    assert E.cli([*checkpoint, *flags]) == 2
    assert capsys.readouterr().err.strip() == f"eval_inversionnet.py: error: {needle}"
    without = ["--vis", "0"] if missing == "matplotlib" else ["--predict", "X.npy"]
    E.check_opts(E.get_args_parser().parse_args([*checkpoint, *without]))  # (no drawing, or no bar)


def test_the_ends_of_each_flags_range_are_accepted(tmp_path):
    (tmp_path / "ck.pt").touch()
    for flags in (["--noise-std", "10", "--missing-traces", "70", "--seed", str(T.MAX_SEED), "--vis", "0"],
                  ["--noise-std", "0", "--missing-traces", "0", "--seed", "0"]):
        E.check_opts(E.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "ck.pt"), *flags]))
    for job in (["--predict", "X.npy"], ["--export", "m.pt2"]):  # a speed setting a script may pass to every job
        E.check_opts(E.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "ck.pt"), *job, "--num-workers", "0"]))


def test_a_missing_checkpoint_flag_is_one_line(capsys):
    assert E.cli([]) == 2
    assert capsys.readouterr().err == ("eval_inversionnet.py: error: the following arguments are required: --checkpoint "
                                       "(--help lists the flags)\n")


def test_existing_results_are_kept_unless_overwrite(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    args = ["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0", "--no-progress",
            "--vis", "0"]
    assert E.cli(args) == 0
    first = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert E.cli(args + ["--noise-std", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == (f"eval_inversionnet.py: error: --output-dir {out} already holds results "
                                               "(metrics.json, per_sample.csv, result.txt); pass --overwrite to replace them "
                                               "or choose another --output-dir")
    assert (out / "metrics.json").read_bytes() == first
    (out / "metrics.json").unlink()  # any file an evaluation would replace is kept, not only metrics.json
    assert E.cli(args) == 2 and "already holds results (per_sample.csv, result.txt); pass" in capsys.readouterr().err
    (out / "sample_99_worst.png").write_bytes(b"an earlier evaluation's picture")
    (out / "notes.txt").write_text("the user's own")
    (out / "sample_1_mine.png").write_bytes(b"the user's own picture, named as eval's are")
    kept = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(*a, **kw):
        raise T.DataError("a bad sample")
    monkeypatch.setattr(T, "evaluate", fails)
    assert E.cli(args + ["--overwrite"]) == 2  # an evaluation that fails replaces nothing
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
    monkeypatch.undo()
    assert E.cli(args + ["--noise-std", "0.5", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["perturbation"]["noise_std"] == 0.5
    assert not list(out.glob("*.tmp-*"))
    # the replaced results go, pictures included (--vis 0 draws none now); other files stay
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt", "per_sample.csv", "result.txt",
                                                     "sample_1_mine.png"]


def eval_or_predict(tiny_run, tmp_path, job, out):
    """The arguments of an evaluation (--vis 0) or a --predict of one file into OUT, and the file each writes
    first (metrics.json, the velocity maps)."""
    args = ["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
            "--no-progress", "--vis", "0"]
    if job == "eval":
        return args, out / "metrics.json"
    np.save(tmp_path / "line.npy", np.zeros((2, 5, 1000, 70), np.float32))
    return args + ["--predict", str(tmp_path / "line.npy")], out / "line_velocity.npy"


@pytest.mark.parametrize("job", ["eval", "predict"])
def test_a_second_job_in_a_directory_in_use_is_refused(tiny_run, tmp_path, capsys, job):
    """While another process holds OUT/.lock (an evaluation, a prediction, a training), a job into OUT is refused
    before it writes anything; the lock names its holder, and goes with it."""
    out = tmp_path / "o"
    out.mkdir()
    args, first = eval_or_predict(tiny_run, tmp_path, job, out)
    with open(out / ".lock", "a+") as held:  # flock locks open files, so this process's own cli() competes too
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("eval_inversionnet.py PID 4242 on elsewhere\n")
        held.flush()
        assert E.cli(args) == 2
        assert capsys.readouterr().err == (
            f"eval_inversionnet.py: error: --output-dir {out} is in use by another process (eval_inversionnet.py PID "
            f"4242 on elsewhere, which holds {out / '.lock'}); wait for it to end, or choose another --output-dir\n")
        assert os.listdir(out) == [".lock"]
    assert E.cli(args) == 0 and first.is_file()


@pytest.mark.parametrize("job", ["eval", "predict"])
def test_results_another_job_wrote_meanwhile_are_kept(tiny_run, tmp_path, capsys, monkeypatch, job):
    """Results that appear between the first look and the lock (another job that ended in between) are looked
    for again under the lock and kept, unless --overwrite."""
    out = tmp_path / "o"
    args, first = eval_or_predict(tiny_run, tmp_path, job, out)
    lock_run = T.lock_run

    def another_job_ends_first(path):
        first.write_bytes(b"theirs")
        lock_run(path)
    monkeypatch.setattr(T, "lock_run", another_job_ends_first)
    assert E.cli(args) == 2
    err = capsys.readouterr().err
    assert (f"{out} already holds results (metrics.json)" if job == "eval" else f"{first} already exists") in err, err
    assert first.read_bytes() == b"theirs"


def test_an_overwrite_replaces_the_pictures_another_job_drew_meanwhile(tiny_run, tmp_path, monkeypatch):
    """--overwrite replaces the results found under the lock, those of a job that ended since the first look
    included: its pictures would otherwise stay beside the new results."""
    out = tmp_path / "o"
    args, _ = eval_or_predict(tiny_run, tmp_path, "eval", out)
    lock_run = T.lock_run

    def another_job_ends_first(path):
        (out / "sample_9_worst.png").write_bytes(b"theirs")
        lock_run(path)
    monkeypatch.setattr(T, "lock_run", another_job_ends_first)
    assert E.cli(args + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["metrics.json", "per_sample.csv", "result.txt"]


def test_perturbed_metrics_do_not_depend_on_the_batch_size(tiny_run, tmp_path, monkeypatch):
    """Each sample draws its own noise and muted receivers, so a robustness figure is reproducible. The model
    is replaced by one whose output is its input's spread: a trained InversionNet maps tiny_run's noise data
    to nearly the same map whatever the perturbation."""
    batches = []
    monkeypatch.setattr(T.InversionNet, "forward", lambda self, x: batches.append(len(x)) or
                        x.float().std(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 1, 70, 70))
    results, both, muted = [], ["--noise-std", "0.2", "--missing-traces", "9"], ["--missing-traces", "9"]
    for batch, perturb, seed in ((1, both, 0), (3, both, 0), (3, [], 0), (3, both, 1), (3, muted, 0)):
        out = tmp_path / f"b{batch}{len(perturb)}{seed}"
        flags = [*perturb, "--seed", str(seed)]
        assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
                      "--no-progress", "--vis", "0", "--batch-size", str(batch), "--device", "cpu", *flags]) == 0
        results.append(json.loads((out / "metrics.json").read_text())["model"])
        if len(results) <= 2:  # the 4 samples came in batches of --batch-size
            assert batches == ([1, 1, 1, 1] if batch == 1 else [3, 1]), batches
        batches.clear()
    # on the CPU (one kernel for every batch size); cuDNN may pick another SSIM convolution per batch shape, and
    # the SSIM of a constant map is a cancellation that moves by ~2e-5 with the summation order
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    assert results[1]["mae"] != pytest.approx(results[2]["mae"], rel=1e-3)  # the perturbation reached the model
    assert results[3]["mae"] != results[1]["mae"]  # --seed draws it: another seed, other noise and muted receivers
    assert json.loads((tmp_path / "b341" / "metrics.json").read_text())["perturbation"]["seed"] == 1
    assert results[4]["mae"] != pytest.approx(results[2]["mae"], rel=1e-3)  # muted receivers alone perturb too


def test_the_pictures_show_the_input_as_it_was_evaluated(tiny_run, tmp_path, monkeypatch):
    """With --missing-traces 9 the shot gathers drawn beside the best sample are its perturbed input: nine
    receivers silent in every shot."""
    shown = []
    monkeypatch.setattr(E, "draw_shots", lambda plt, gather, path: shown.append(gather))
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(tmp_path / "o"), "--num-workers",
                  "0", "--no-progress", "--vis", "1", "--device", "cpu", "--missing-traces", "9"]) == 0
    [gather] = shown
    assert gather.shape == (5, 1000, 70) and (np.abs(gather).sum(axis=(0, 1)) == 0).sum() == 9


def test_perturbed_metrics_do_not_depend_on_the_worker_count(tiny_run, tmp_path, monkeypatch):
    """The perturbation is drawn from the sample's own stream in whichever process or thread loads it, so two
    workers (each loading every other batch) give the figures of the main process's reader threads. The model
    is the input-spread stand-in above: its metrics follow the perturbation."""
    monkeypatch.setattr(T.InversionNet, "forward", lambda self, x: x.float().std(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 1, 70, 70))
    read_into = T.MapDataset.read_into

    def loaded_by(self, indices, *args):  # a file per sample names the process that read it: forked workers share no memory
        worker = torch.utils.data.get_worker_info()
        for i in indices:
            (tmp_path / f"sample{i}.by-{worker.id if worker else 'main'}").touch()
        return read_into(self, indices, *args)

    monkeypatch.setattr(T.MapDataset, "read_into", loaded_by)
    results, rows, loaders = [], [], []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", str(workers),
                      "--no-progress", "--vis", "0", "--batch-size", "1", "--device", "cpu", "--noise-std", "0.2",
                      "--missing-traces", "9"]) == 0
        results.append(json.loads((out / "metrics.json").read_text())["model"])
        rows.append((out / "per_sample.csv").read_text())
        loaders.append(sorted(p.suffix for p in tmp_path.glob("sample*.by-*")))
        for p in tmp_path.glob("sample*.by-*"):
            p.unlink()
    if torch.multiprocessing.get_start_method() == "fork":  # a spawned worker imports the unpatched dataset
        assert loaders == [[".by-main"] * 4, [".by-0", ".by-0", ".by-1", ".by-1"]]  # batch 1: workers take turns
    assert results[0]["count"] == 4 and results[0] == pytest.approx(results[1], rel=1e-6)
    assert rows[0] == rows[1]  # sample by sample


def test_evaluate_runs_the_forward_in_bf16_and_the_metrics_in_float32():
    """evaluate() with amp_dtype bf16 (validation of a bf16 run, eval --amp bf16) computes InversionNet's
    convolutions in bf16, then scores the float32 copy of that prediction: the metrics are those of the bf16
    forward to float32 precision, and close to, not equal to, the fp32 evaluation's."""
    torch.manual_seed(0)
    model = T.InversionNet().eval()
    x, y = torch.randn(2, 5, 1000, 70), torch.rand(2, 1, 70, 70) * 2 - 1
    batches = T.RepeatedBatch(x, y, 2)  # normalised already
    cpu = torch.device("cpu")
    bf16, seen = conv_dtypes_during(lambda: T.evaluate(model, batches, cpu, amp_dtype=torch.bfloat16, per_sample=True))
    assert len(seen) == 2 * 25 and set(seen) == {torch.bfloat16}  # 25 (de)convolutions per batch
    fp32, seen = conv_dtypes_during(lambda: T.evaluate(model, batches, cpu, per_sample=True))
    assert set(seen) == {torch.float32}
    assert bf16["first"][0].dtype == bf16["per_sample"].dtype == torch.float32 and bf16["count"] == 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x).double()
    err = pred - y.double()
    assert bf16["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-6)
    assert bf16["mse"] == pytest.approx((err ** 2).mean().item(), rel=1e-6)
    assert bf16["loss"] == pytest.approx(bf16["mae"], rel=1e-6)  # pure L1
    for k in ("mae", "rmse", "ssim", "loss"):
        assert bf16[k] == pytest.approx(fp32[k], rel=0.02) and bf16[k] != fp32[k], k


def test_forward_pass_takes_the_precision_the_checkpoint_was_trained_in(tiny_run, tmp_path):
    """--amp auto evaluates in the training precision (float32 for tiny_run; bf16 for a checkpoint saying so);
    --amp off forces float32. Metrics accumulate in float32 and stay close."""
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["args"]["amp"] = "bf16"
    torch.save(ck, tmp_path / "bf16.pt")
    results, convs = {}, {}
    for name, checkpoint, amp in (("fp32", tiny_run / "run" / "best.pt", "auto"), ("bf16", tmp_path / "bf16.pt", "auto"),
                                  ("off", tmp_path / "bf16.pt", "off")):
        out = tmp_path / name
        code, seen = conv_dtypes_during(lambda: E.cli(["--checkpoint", str(checkpoint), "--output-dir", str(out),
                                                       "--num-workers", "0", "--no-progress", "--vis", "0", "--amp", amp,
                                                       "--device", "cpu"]))
        assert code == 0 and seen
        results[name], convs[name] = json.loads((out / "metrics.json").read_text()), set(seen)
    assert convs == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "off": {torch.float32}}  # what ran, not its label
    assert results["fp32"]["forward"] == results["off"]["forward"] == {"amp": "float32", "channels_last": True,
                                                                      "ssim": "float64"}
    assert results["bf16"]["forward"] == {"amp": "bfloat16", "channels_last": True, "ssim": "float64"}
    assert results["fp32"]["model"] == results["off"]["model"]
    for k in ("mae", "rmse", "ssim"):
        assert results["bf16"]["model"][k] == pytest.approx(results["off"]["model"][k], rel=0.02)
    assert results["bf16"]["model"]["mae"] != results["off"]["model"]["mae"]


def evaluate_to(out, checkpoint, *flags):
    """E.cli without pictures or workers; returns metrics.json."""
    assert E.cli(["--checkpoint", str(checkpoint), "--output-dir", str(out), "--num-workers", "0", "--no-progress",
                  "--vis", "0", "--device", "cpu", *map(str, flags)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_training_label_with_inf_stops_the_baseline_naming_its_file(tmp_path):
    pairs = write_ids_dataset(tmp_path / "d", (2, 2))
    y = np.load(pairs[0][1])
    y[1, 0, 3, 3] = np.inf
    np.save(pairs[0][1], y)
    with pytest.raises(T.DataError, match=r"model1\.npy: NaN or Inf in the labels \(read for the mean-map baseline\)"):
        E.baseline_sums(pairs[:1], pairs[1:], T.Normalizer(*T.DATASETS["flatvel-a"]))


def test_a_run_copied_with_its_validation_files_alone_is_evaluated_against_their_mean(tiny_run, tmp_path, capsys):
    """A run trained on split lists, copied to another machine with its validation files alone: the evaluation
    goes on with the mean of the evaluated maps as its baseline and says so; the training split itself is refused."""
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    trained = {d for d, *_ in ck["split"]}
    gone = [(str(tmp_path / "gone" / "data" / d), str(tmp_path / "gone" / "model" / m)) for d, m, _ in ck["split"]]
    val = [pair for pair in T.find_pairs(str(tiny_run / "d")) if os.path.basename(pair[0]) not in trained]
    ck["args"] |= {"data_root": None, "train_list": str(write_split_list(tmp_path / "train.txt", gone)),
                   "val_list": str(write_split_list(tmp_path / "val.txt", val))}  # as a run trained on lists saves them
    torch.save(ck, tmp_path / "copied.pt")
    args = ["--checkpoint", str(tmp_path / "copied.pt"), "--num-workers", "0", "--no-progress", "--vis", "0", "--device", "cpu"]
    assert E.cli([*args, "--output-dir", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"note: {gone[0][0]} of the training split is gone: the baseline is the mean of the evaluated maps" in out
    assert "baseline (eval mean)" in out and "(no training labels at hand)" in out
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["baseline_mean_map"]["from"] == "evaluated maps"
    assert E.cli([*args, "--split", "train", "--output-dir", str(tmp_path / "tr")]) == 2
    assert f"{gone[0][0]}: no such file" in capsys.readouterr().err


def test_a_broken_training_label_is_named_before_anything_is_written(tiny_run, tmp_path, capsys):
    """The baseline reads the training labels of the split it evaluates: a truncated one is one line naming
    it, exit 2, and no results folder is made."""
    shutil.copytree(tiny_run / "d", tmp_path / "d")
    label = tmp_path / "d" / "model" / torch.load(tiny_run / "run" / "best.pt", weights_only=False)["split"][0][1]
    label.write_bytes(label.read_bytes()[:1000])
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--data-root", str(tmp_path / "d"), "--output-dir",
                  str(out), "--num-workers", "0", "--no-progress", "--vis", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"eval_inversionnet.py: error: {label}: unreadable or truncated .npy")
    assert not out.exists()


def test_baseline_is_the_training_mean_map_scored_independently(tiny_run, tmp_path, capsys):
    """The trivial baseline, recomputed in float64 numpy: the mean velocity map of the run's training files,
    scored on the validation maps with the paper's MAE, RMSE and SSIM. --val-list keeps the training mean for
    our checkpoints; only where no training split is known (an OpenFWI checkpoint) it is the evaluated maps'
    own mean, and the results say so."""
    train, val = T.split_pairs(T.find_pairs(str(tiny_run / "d")), 0.67, 0)  # tiny_run's split
    labels = [np.load(m).astype(np.float64) for _, m in train]
    mean = np.concatenate(labels).mean(axis=0)[0]
    y = np.load(val[0][1]).astype(np.float64)[:, 0]

    def norm(v):
        return (v - 1500) / 3000 * 2 - 1

    def expected(mean_map):
        err = norm(mean_map)[None] - norm(y)
        return {"mae": np.abs(err).mean(), "rmse": np.sqrt((err ** 2).mean()),
                "ssim": np.mean([ssim_reference(norm(mean_map).astype(np.float32), norm(t).astype(np.float32)) for t in y])}

    ck = tiny_run / "run" / "best.pt"
    want = expected(mean)
    lst = tmp_path / "val.txt"
    lst.write_text(f"{val[0][0]}\t{val[0][1]}\n")
    for name, flags in (("split", []), ("list", ["--val-list", lst])):
        base = evaluate_to(tmp_path / name, ck, *flags)["baseline_mean_map"]
        assert base["from"] == "training split" and base["count"] == 4
        assert (tmp_path / name / "result.txt").read_text().startswith(
            f"InversionNet evaluation of {'the --val-list files' if name == 'list' else 'the validation split'}: 4 samples")
        for k in ("mae", "rmse", "ssim"):
            assert base[k] == pytest.approx(want[k], rel=1e-4), (name, k)
    torch.save({"model": torch.load(ck, weights_only=False)["model"]}, tmp_path / "openfwi.pth")
    capsys.readouterr()
    base = evaluate_to(tmp_path / "openfwi", tmp_path / "openfwi.pth", "--val-list", lst, "--dataset", "flatvel-a")["baseline_mean_map"]
    assert base["from"] == "evaluated maps" and base["mae"] == pytest.approx(expected(y.mean(axis=0))["mae"], rel=1e-4)
    assert "baseline: the mean of the evaluated maps themselves" in capsys.readouterr().out


def test_paper_row_follows_the_data_family(tiny_run, tmp_path, capsys, monkeypatch):
    """--dataset names OpenFWI's row; a simulated set's dataset.json names its family's A row (marked indicative);
    stats without a family give no paper row at all rather than a wrong one."""
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    stats = {"data_min": -30.0, "data_max": 60.0, "label_min": 1500.0, "label_max": 4500.0}
    for name, extra in (("curvevel", {"family": "curvevel"}), ("unknown", {})):
        (tmp_path / f"{name}.json").write_text(json.dumps({**stats, **extra}))
        ck["args"].update(dataset=None, stats=str(tmp_path / f"{name}.json"))
        torch.save(ck, tmp_path / f"{name}.pt")
    capsys.readouterr()
    paper = evaluate_to(tmp_path / "c", tmp_path / "curvevel.pt")["paper_reference"]
    assert paper == {"dataset": "curvevel-a", "mae": 0.0685, "rmse": 0.1273, "ssim": 0.8074, "data": "simulate_openfwi.py (indicative)"}
    assert "paper row: OpenFWI's curvevel-a; this data was drawn by simulate_openfwi.py" in capsys.readouterr().out
    assert evaluate_to(tmp_path / "u", tmp_path / "unknown.pt")["paper_reference"] is None
    assert not [line for line in (tmp_path / "u" / "result.txt").read_text().splitlines() if line.startswith("paper")]
    assert evaluate_to(tmp_path / "f", tmp_path / "unknown.pt", "--dataset", "flatfault-a")["paper_reference"]["dataset"] == "flatfault-a"
    # trained with --dataset flatvel-a, evaluated on simulated curvevel data with its stats: the data's family counts
    paper = evaluate_to(tmp_path / "s", tiny_run / "run" / "best.pt", "--stats", tmp_path / "curvevel.json")["paper_reference"]
    assert (paper["dataset"], paper["data"]) == ("curvevel-a", "simulate_openfwi.py (indicative)")
    # a --val-list beside a simulated set's dataset.json: that set's family, not the one trained on
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "dataset.json").write_text(json.dumps({**stats, "family": "curvefault"}))
    (tmp_path / "cv" / "val.txt").write_text(f"{tiny_run / 'd' / 'data' / 'data3.npy'}\t{tiny_run / 'd' / 'model' / 'model3.npy'}\n")
    paper = evaluate_to(tmp_path / "v", tiny_run / "run" / "best.pt", "--val-list", tmp_path / "cv" / "val.txt")["paper_reference"]
    assert (paper["dataset"], paper["data"]) == ("curvefault-a", "simulate_openfwi.py (indicative)")
    # --stats named here wins over the file beside the list; a list with none beside it keeps the run's row
    paper = evaluate_to(tmp_path / "vs", tiny_run / "run" / "best.pt", "--val-list", tmp_path / "cv" / "val.txt",
                        "--stats", tmp_path / "curvevel.json")["paper_reference"]
    assert paper["dataset"] == "curvevel-a"
    (tmp_path / "val.txt").write_text((tmp_path / "cv" / "val.txt").read_text())
    assert evaluate_to(tmp_path / "vn", tiny_run / "run" / "best.pt", "--val-list", tmp_path / "val.txt")[
        "paper_reference"]["dataset"] == "flatvel-a"
    # a simulated set normalised in training with an OpenFWI set's constants (--dataset): its dataset.json names it
    shutil.copytree(tiny_run / "d", tmp_path / "sim")
    (tmp_path / "sim" / "dataset.json").write_text((tmp_path / "cv" / "dataset.json").read_text())
    paper = evaluate_to(tmp_path / "ds", tiny_run / "run" / "best.pt", "--data-root", tmp_path / "sim")["paper_reference"]
    assert (paper["dataset"], paper["data"]) == ("curvefault-a", "simulate_openfwi.py (indicative)")
    # an OpenFWI checkpoint that names its set, on a --val-list with no dataset.json beside it: that set's row, however
    # a simulated set in the default --data-root, which it never saw, is labelled
    torch.save({"model": ck["model"], "args": argparse.Namespace(dataset="flatvel-a")}, tmp_path / "openfwi.pth")
    shutil.copytree(tmp_path / "sim", tmp_path / "here" / "data" / "flatvel")
    monkeypatch.chdir(tmp_path / "here")
    paper = evaluate_to(tmp_path / "of", tmp_path / "openfwi.pth", "--val-list", tmp_path / "val.txt")["paper_reference"]
    assert (paper["dataset"], paper["data"]) == ("flatvel-a", "OpenFWI")


def test_split_stats_and_dataset_flags(tiny_run, tmp_path, capsys):
    """--split train evaluates the training files; --stats replaces the checkpoint's constants; --dataset names
    OpenFWI's, and --stats wins over it, as in training."""
    ck = tiny_run / "run" / "best.pt"
    m = evaluate_to(tmp_path / "train", ck, "--split", "train")
    assert (m["samples"], m["files"], m["split"]) == (8, 2, "train")
    told = (tmp_path / "train" / "result.txt").read_text()
    assert told.startswith("InversionNet evaluation of the training split: 8 samples from 2 files (")
    assert "\nthe training split: samples the model learnt from, so the paper's row (held-out data) is no fair comparison\n" in told
    stats = {"data_min": -3.0, "data_max": 9.0, "label_min": 1000.0, "label_max": 5000.0}
    (tmp_path / "s.json").write_text(json.dumps(stats))
    for name, flags in (("stats", ["--stats", tmp_path / "s.json"]),
                        ("both", ["--stats", tmp_path / "s.json", "--dataset", "curvevel-a"])):
        m = evaluate_to(tmp_path / name, ck, *flags)
        assert m["normalization"] == stats and m["normalization_from"] == str(tmp_path / "s.json"), name
    capsys.readouterr()
    m = evaluate_to(tmp_path / "ds", ck, "--dataset", "curvevel-a")
    lo, hi = T.DATASETS["curvevel-a"]
    assert (m["normalization"]["data_min"], m["normalization"]["data_max"]) == (lo, hi)
    # the inputs are then scaled otherwise than in training: said, not refused (a deliberate probe)
    assert (f"note: normalisation from --dataset curvevel-a (data {lo:g} to {hi:g}, velocity 1500 to 4500), not the one "
            "the model was trained with (data -26.95 to 52.77, velocity 1500 to 4500)") in capsys.readouterr().out
    evaluate_to(tmp_path / "own", ck, "--dataset", "flatvel-a")  # the constants it was trained with
    assert "note: normalisation" not in capsys.readouterr().out
    saved = torch.load(ck, weights_only=False)  # a run trained with --stats: --dataset named here replaces its file
    saved["args"]["stats"] = str(tmp_path / "s.json")
    torch.save(saved, tmp_path / "stats_run.pt")
    m = evaluate_to(tmp_path / "ds2", tmp_path / "stats_run.pt", "--dataset", "curvevel-a")
    assert (m["normalization"]["data_min"], m["normalization"]["data_max"]) == (lo, hi)


def test_device_cache_loader_gives_the_map_loaders_metrics(tiny_run, tmp_path, monkeypatch):
    ck = tiny_run / "run" / "best.pt"
    built, build = [], T.build_loader
    monkeypatch.setattr(T, "build_loader", lambda *a, **kw: built.append(build(*a, **kw)) or built[-1])
    cached, mapped = (evaluate_to(tmp_path / k, ck, "--loader", k)["model"] for k in ("gpu", "map"))
    assert [type(b).__name__ for b in built] == ["DeviceLoader", "Loader"]  # the cache served the first
    for k in ("mae", "rmse", "ssim", "count"):
        assert cached[k] == pytest.approx(mapped[k], rel=1e-6), k


def test_a_device_cache_that_would_not_fit_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "free_memory", lambda device: 4 * 10**6)  # 4 MB: the 4 samples' cache needs 5.7
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--loader", "gpu",
                  "--device", "cpu", "--no-progress", "--vis", "0"]) == 2
    assert capsys.readouterr().err == ("eval_inversionnet.py: error: --loader gpu: the split's cache needs 0.01 GB on cpu "
                                       "and 0.00 GB is free; use --loader map\n")


def test_a_training_split_that_changed_since_training_is_reported(tiny_run, tmp_path, capsys):
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    assert evaluate_to(tmp_path / "same", tiny_run / "run" / "best.pt")["split_changed_since_training"] is None
    ck["split"] = ck["split"][:1]  # as if a file had been added to the set since
    torch.save(ck, tmp_path / "grown.pt")
    capsys.readouterr()
    note = evaluate_to(tmp_path / "grown", tmp_path / "grown.pt")["split_changed_since_training"]
    added = " ".join(map(str, torch.load(tiny_run / "run" / "best.pt", weights_only=False)["split"][1]))
    assert note == ("the training split now has 2 files (8 samples), the checkpoint was trained on 1 (4 samples; "
                    f"file 2 is now {added}, was absent): the evaluated split and the baseline come from today's files")
    assert f"warning: {note}" in capsys.readouterr().out
    trained = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["split"] = trained["split"] + trained["val_split"]  # trained on every file: the set has shrunk since
    torch.save(ck, tmp_path / "shrunk.pt")
    m = evaluate_to(tmp_path / "shrunk", tmp_path / "shrunk.pt")
    assert m["split_changed_since_training"].endswith("come from today's files")
    assert m["evaluated_files_trained_on"] == [trained["val_split"][0][0]]
    assert (f"warning: the evaluated {trained['val_split'][0][0]} is one the checkpoint trained on, so these metrics "
            "overstate the model") in (tmp_path / "shrunk" / "result.txt").read_text()
    ck["split"] = [list(f) for f in torch.load(tiny_run / "run" / "best.pt", weights_only=False)["split"]]
    now = " ".join(map(str, ck["split"][1]))
    ck["split"][1][0] = "elsewhere.npy"  # the same counts from other files: a file replaced by another since
    torch.save(ck, tmp_path / "other.pt")
    note = evaluate_to(tmp_path / "other", tmp_path / "other.pt")["split_changed_since_training"]
    assert note.startswith("the training split now has 2 files (8 samples), the checkpoint was trained on 2 (8 samples; "
                           f"file 2 is now {now}, was elsewhere.npy {now.split(' ', 1)[1]}): the evaluated split")
    # its own data under another spelling (a link to the folder) is still its own: the change is reported
    (tmp_path / "link").symlink_to(tiny_run / "d")
    assert evaluate_to(tmp_path / "linked", tmp_path / "grown.pt", "--data-root", tmp_path / "link")[
        "split_changed_since_training"].startswith("the training split now has 2 files (8 samples), the checkpoint was "
                                                   "trained on 1 (4 samples")


def test_files_the_checkpoint_trained_on_are_known_by_where_they_are_not_by_name(tiny_run, tmp_path):
    """Every data set has a data1.npy: another set's is no file the model saw, and it is no change of the
    checkpoint's split either. The checkpoint's own training files are, under any name a list spells them by."""
    ck = tiny_run / "run" / "best.pt"
    write_ids_dataset(tmp_path / "other", (4, 4, 4), seed=5)  # the same names, other samples
    m = evaluate_to(tmp_path / "o", ck, "--data-root", tmp_path / "other")
    assert m["evaluated_files_trained_on"] == [] and m["split_changed_since_training"] is None
    assert "warning" not in (tmp_path / "o" / "result.txt").read_text()
    assert evaluate_to(tmp_path / "own", ck)["evaluated_files_trained_on"] == []  # its own validation split
    trained = torch.load(ck, weights_only=False)["split"][0][0]
    lst = tmp_path / "val.txt"  # a training file, spelt through a relative path with a detour
    lst.write_text(f"{os.path.relpath(tiny_run / 'd' / 'data', tmp_path)}/../data/{trained}\t"
                   f"{tiny_run / 'd' / 'model' / trained.replace('data', 'model')}\n")
    m = evaluate_to(tmp_path / "l", ck, "--val-list", lst)
    assert m["evaluated_files_trained_on"] == [trained]
    assert (f"warning: the evaluated {trained} is one the checkpoint trained on, so these metrics overstate the "
            "model") in (tmp_path / "l" / "result.txt").read_text()
    assert evaluate_to(tmp_path / "t", ck, "--split", "train")["evaluated_files_trained_on"] == [trained, ANY]
    # a run trained on split lists: its files are the list's; a list gone since tells nothing
    listed = torch.load(ck, weights_only=False)
    listed["args"]["train_list"] = str(write_split_list(tmp_path / "train.txt", [
        (tiny_run / "d" / "data" / trained, tiny_run / "d" / "model" / trained.replace("data", "model"))]))
    torch.save(listed, tmp_path / "listed.pt")
    assert evaluate_to(tmp_path / "tl", tmp_path / "listed.pt", "--val-list", lst)["evaluated_files_trained_on"] == [trained]
    (tmp_path / "train.txt").unlink()
    assert evaluate_to(tmp_path / "gone", tmp_path / "listed.pt", "--val-list", lst)["evaluated_files_trained_on"] == []
    # OpenFWI's fault layout: seis*.npy and vel*.npy side by side in --data-root, no data/ folder
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tiny_run / "d" / "data" / "data1.npy", flat / "seis1_0.npy")
    shutil.copy(tiny_run / "d" / "model" / "model1.npy", flat / "vel1_0.npy")
    saved = torch.load(ck, weights_only=False)
    saved["args"]["data_root"], saved["split"] = str(flat), [["seis1_0.npy", "vel1_0.npy", 4]]
    torch.save(saved, tmp_path / "flat.pt")
    (tmp_path / "flat.txt").write_text(f"{flat / 'seis1_0.npy'}\t{flat / 'vel1_0.npy'}\n")
    assert evaluate_to(tmp_path / "f", tmp_path / "flat.pt", "--val-list", tmp_path / "flat.txt")["evaluated_files_trained_on"] == ["seis1_0.npy"]
    assert "overstate" not in (tmp_path / "t" / "result.txt").read_text()  # asked for: the report says so otherwise


def test_a_val_list_that_names_a_file_twice_is_refused(tiny_run, tmp_path, capsys):
    d, m = tiny_run / "d" / "data" / "data3.npy", tiny_run / "d" / "model" / "model3.npy"
    (tmp_path / "val.txt").write_text(f"{d}\t{m}\n{tiny_run / 'd' / '.' / 'data' / 'data3.npy'}\t{m}\n")
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--val-list", str(tmp_path / "val.txt"),
                  "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tiny_run / 'd' / '.' / 'data' / 'data3.npy'} is "
                                       f"listed twice in the --val-list split: its samples would count twice\n")
    assert not (tmp_path / "o").exists()


def test_an_overwrite_that_fails_leaves_no_old_metrics_beside_new_files(tiny_run, tmp_path, capsys, monkeypatch):
    """metrics.json marks a complete result: after a failed --overwrite it must not vouch for a mixed set."""
    out = tmp_path / "ev"
    evaluate_to(out, tiny_run / "run" / "best.pt")
    disk_fills_on(monkeypatch, "result.txt.tmp-")
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
                  "--no-progress", "--vis", "0", "--device", "cpu", "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["per_sample.csv", "result.txt"]  # result.txt: the old one


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_evaluation(tiny_run, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(T, "evaluate", lambda *a, **kw: pytest.fail("evaluated into a folder it cannot write"))
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(tmp_path / "o"),
                  "--num-workers", "0"]) == 2
    assert capsys.readouterr().err == f"eval_inversionnet.py: error: --output-dir {tmp_path / 'o'}: Read-only file system\n"


def test_a_folder_by_a_results_name_is_refused_before_the_evaluation(tiny_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "o" / "ssim_histogram.png").mkdir(parents=True)
    (tmp_path / "o" / "metrics.json").write_text("{}")
    monkeypatch.setattr(T, "evaluate", lambda *a, **kw: pytest.fail("evaluated, to fail at the folder afterwards"))
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(tmp_path / "o"),
                  "--num-workers", "0", "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tmp_path / 'o' / 'ssim_histogram.png'}: exists "
                                       "and is not a regular file\n")
    assert (tmp_path / "o" / "metrics.json").read_text() == "{}"  # the old result stays as it was


def disk_fills_on(monkeypatch, marker):
    """The disk fills while a file whose temporary name holds MARKER is written, after its bytes went to it."""
    import errno
    real_fsync = os.fsync

    def full_disk(fd):
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)


def test_a_result_file_that_cannot_be_written_leaves_no_metrics_json(tiny_run, tmp_path, capsys, monkeypatch):
    """metrics.json marks a complete result, so it is written last: a disk that fills on result.txt leaves none."""
    disk_fills_on(monkeypatch, "result.txt.tmp-")
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
                  "--no-progress", "--vis", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"eval_inversionnet.py: error: cannot write {out}/result.txt: No space left on device\n"
    assert sorted(p.name for p in out.iterdir()) == ["per_sample.csv"]


def test_a_picture_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tiny_run, tmp_path, capsys, monkeypatch):
    disk_fills_on(monkeypatch, ".png.tmp-")
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
                  "--no-progress", "--vis", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval_inversionnet.py: error: cannot write {out}/sample_") and err.endswith(".png: No space left on device\n")
    assert not list(out.glob("*.png*"))


def test_a_checkpoint_whose_split_lists_moved_is_one_line(tiny_run, tmp_path, capsys):
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["args"].update(train_list=str(tmp_path / "moved" / "train.txt"), val_list=str(tmp_path / "moved" / "val.txt"))
    torch.save(ck, tmp_path / "moved.pt")
    assert E.cli(["--checkpoint", str(tmp_path / "moved.pt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: the data the checkpoint was trained on: "
                                       f"{tmp_path / 'moved' / 'train.txt'}: cannot read this split list (No such file or "
                                       "directory); --data-root or --val-list names the data to evaluate\n")
    ck["args"].update(train_list=None, data_root=str(tmp_path / "gone"))  # a run copied from another machine
    torch.save(ck, tmp_path / "gone.pt")
    assert E.cli(["--checkpoint", str(tmp_path / "gone.pt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval_inversionnet.py: error: the data the checkpoint was trained on: --data-root {tmp_path / 'gone'}: "
                          "no such directory") and err.endswith("; --data-root or --val-list names the data to evaluate\n")


def test_a_checkpoint_with_hand_edited_training_arguments_is_one_line(tiny_run, tmp_path, capsys):
    """Saved arguments are read back through the trainer's parser: a bad value names the checkpoint and the
    flag; a setting this version does not know is passed over."""
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["args"].update(amp="fp8")
    torch.save(ck, tmp_path / "edited.pt")
    assert E.cli(["--checkpoint", str(tmp_path / "edited.pt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval_inversionnet.py: error: {tmp_path / 'edited.pt'}: its training arguments: argument "
                          "--amp: invalid choice: 'fp8'") and err.count("\n") == 1
    ck["args"].update(amp="off", batch_size="two")
    torch.save(ck, tmp_path / "edited.pt")
    assert E.cli(["--checkpoint", str(tmp_path / "edited.pt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    # the trainer's flag, not one of eval's: no pointer to eval's --help
    assert capsys.readouterr().err.endswith("its training arguments: argument --batch-size: invalid int value: 'two'\n")
    ck["args"].update(batch_size=2, retired_setting=3)
    torch.save(ck, tmp_path / "old.pt")
    assert evaluate_to(tmp_path / "old", tmp_path / "old.pt")["model"] == evaluate_to(tmp_path / "new", tiny_run / "run" / "best.pt")["model"]


@pytest.mark.slow
def test_torchrun_evaluation_matches_one_process(tiny_run, tmp_path):
    """Two ranks each evaluate every other sample; rank 0 gathers the rows into the same table and metrics."""
    ck = tiny_run / "run" / "best.pt"
    one = evaluate_to(tmp_path / "one", ck, "--split", "train")
    r = run_script(EVAL, "--checkpoint", ck, "--output-dir", tmp_path / "two", "--num-workers", 0, "--no-progress", "--vis", 0,
                   "--device", "cpu", "--split", "train", nproc=2)
    assert r.returncode == 0, r.stderr
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    rows = [(tmp_path / d / "per_sample.csv").read_text().splitlines() for d in ("one", "two")]
    assert len(rows[0]) == 9 and [r.split(",")[0] for r in rows[1]] == ["index", *map(str, range(8))]
    assert [r.split(",")[2] for r in rows[1][1:]] == [*map(str, range(4))] * 2  # two training files of 4 samples
    for a, b in zip(rows[0][1:], rows[1][1:]):
        a, b = a.split(","), b.split(",")
        assert a[:3] == b[:3]  # the index, file and sample in the file
        assert np.allclose([float(v) for v in a[3:]], [float(v) for v in b[3:]], rtol=1e-5)
    for k in ("mae", "rmse", "ssim", "count"):
        assert two["model"][k] == pytest.approx(one["model"][k], rel=1e-5)
    assert two["provenance"]["evaluation"]["world_size"] == 2


@pytest.mark.slow
def test_torchrun_evaluation_that_cannot_write_is_one_line(tiny_run, tmp_path):
    """Rank 0 makes the output directory; when it cannot, the other rank stops with it, not in a collective."""
    (tmp_path / "afile").touch()
    r = run_script(EVAL, "--checkpoint", tiny_run / "run" / "best.pt", "--output-dir", tmp_path / "afile" / "ev",
                   "--num-workers", 0, "--no-progress", "--device", "cpu", nproc=2)
    assert r.returncode != 0 and "[rank1]" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("eval_inversionnet.py: error:") == 1
    assert f"eval_inversionnet.py: error: --output-dir {tmp_path / 'afile' / 'ev'}: Not a directory" in r.stderr


# ---- inference on unlabelled data, export ----

def model_of(checkpoint):
    model = T.InversionNet()
    ckpt = T.load_weights(model, str(checkpoint))
    n = ckpt["normalization"]
    return model.eval(), T.Normalizer(n["data_min"], n["data_max"], n["label_min"], n["label_max"])


def test_predict_writes_velocity_in_m_per_s_for_a_file_and_a_directory(tiny_run, tmp_path, capsys, monkeypatch):
    ck = tiny_run / "run" / "best.pt"
    shots = np.load(tiny_run / "d" / "data" / "data1.npy")  # no labels are read
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "line7.npy", shots[:3])
    np.save(tmp_path / "in" / "line12.npy", shots[1:].astype(np.float64))  # other float dtypes are converted
    np.save(tmp_path / "in" / "vel7.npy", np.full((3, 1, 70, 70), 2000.0, np.float32))  # OpenFWI's fault layout
    out = tmp_path / "out"
    assert E.cli(["--checkpoint", str(ck), "--predict", str(tmp_path / "in"), "--output-dir", str(out), "--amp", "off",
                  "--batch-size", "2", "--vis", "2", "--device", "cpu"]) == 0
    assert f"--predict {tmp_path / 'in'}: skipped 1 file of velocity maps (vel7.npy), not shot gathers\n" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.npy")) == ["line12_velocity.npy", "line7_velocity.npy"]
    model, norm = model_of(ck)
    with torch.no_grad():
        expected = norm.label_to_velocity(model(norm.data(torch.from_numpy(shots)))).numpy()
    v7, v12 = np.load(out / "line7_velocity.npy"), np.load(out / "line12_velocity.npy")
    assert v7.dtype == np.float32 and v7.shape == (3, 1, 70, 70) and v12.shape == (3, 1, 70, 70)
    np.testing.assert_allclose(v7, expected[:3], atol=0.05)  # m/s
    np.testing.assert_allclose(v12, expected[1:], atol=0.05)
    assert (out / "line7_predictions.png").stat().st_size > 10_000 and (out / "line12_predictions.png").stat().st_size > 10_000
    assert not list(out.glob("*.tmp-*"))
    assert E.cli(["--checkpoint", str(ck), "--predict", str(tmp_path / "in" / "line7.npy"), "--output-dir", str(out)]) == 2
    assert "line7_velocity.npy already exists; pass --overwrite" in capsys.readouterr().err
    (out / "line7_velocity.npy").unlink()  # its picture is kept as well
    assert E.cli(["--checkpoint", str(ck), "--predict", str(tmp_path / "in" / "line7.npy"), "--output-dir", str(out)]) == 2
    assert "line7_predictions.png already exists; pass --overwrite" in capsys.readouterr().err
    assert E.cli(["--checkpoint", str(ck), "--predict", str(tmp_path / "in" / "line7.npy"), "--output-dir", str(out),
                  "--vis", "0"]) == 2  # no picture asked for, and the old one would sit beside other maps
    assert "line7_predictions.png already exists; pass --overwrite" in capsys.readouterr().err
    assert E.cli(["--checkpoint", str(ck), "--predict", str(tmp_path / "in" / "line7.npy"), "--output-dir", str(out),
                  "--overwrite", "--vis", "0"]) == 0
    assert (out / "line7_velocity.npy").exists() and not (out / "line7_predictions.png").exists()  # it showed the old maps
    # no --output-dir: RUN/predict beside the checkpoint; --vis 3 (the default) on a file of two draws both
    (tmp_path / "run").mkdir()
    shutil.copy(ck, tmp_path / "run" / "best.pt")
    np.save(tmp_path / "two.npy", shots[:2])
    shown = []
    monkeypatch.setattr(E, "draw_predictions", lambda gathers, velocity, n, path, normalizer: shown.append((n, path)))
    assert E.cli(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--predict", str(tmp_path / "two.npy")]) == 0
    monkeypatch.undo()
    assert np.load(tmp_path / "run" / "predict" / "two_velocity.npy").shape == (2, 1, 70, 70)
    assert shown == [(2, str(tmp_path / "run" / "predict" / "two_predictions.png"))]
    # a picture holds at most PICTURE_ROWS maps, and the line says so when --vis asked for more
    monkeypatch.setattr(E, "draw_predictions", lambda gathers, velocity, n, path, normalizer: shown.append((n, path)))
    monkeypatch.setattr(E, "PICTURE_ROWS", 1)
    assert E.cli(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--predict", str(tmp_path / "two.npy"), "--overwrite"]) == 0
    monkeypatch.undo()
    assert shown[1:] == [(1, str(tmp_path / "run" / "predict" / "two_predictions.png"))]
    assert "; the first 1 (a picture's most) beside their shot gathers" in capsys.readouterr().out
    # predictions written beside their inputs, twice: the *_velocity.npy files are outputs, never inputs
    again = ["--checkpoint", str(ck), "--predict", str(tmp_path / "in"), "--output-dir", str(tmp_path / "in"), "--vis", "0"]
    assert E.cli(again) == 0 and E.cli([*again, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["line12.npy", "line12_velocity.npy", "line7.npy",
                                                                   "line7_velocity.npy", "vel7.npy"]
    assert np.array_equal(np.load(tmp_path / "in" / "line7.npy"), shots[:3])


def test_a_reader_that_goes_ends_the_lines_not_the_job(tiny_run, tmp_path):
    """`eval_inversionnet.py ... | head -1`: every file is still written, exit 0, no traceback."""
    (tmp_path / "in").mkdir()
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / "in" / name, np.load(tiny_run / "d" / "data" / "data1.npy")[:2])
    common = ["--checkpoint", tiny_run / "run" / "best.pt", "--no-progress", "--num-workers", 0, "--vis", 0]
    code, err = run_without_reader(EVAL, *common, "--predict", tmp_path / "in", "--output-dir", tmp_path / "p")
    assert code == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert sorted(os.listdir(tmp_path / "p")) == ["a_velocity.npy", "b_velocity.npy"]
    code, err = run_without_reader(EVAL, *common, "--output-dir", tmp_path / "e")
    assert code == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["samples"] == 4


def test_predict_with_amp_bf16_computes_in_bf16_and_writes_float32_m_per_s(tiny_run, tmp_path, capsys):
    ck = tiny_run / "run" / "best.pt"
    shots = np.load(tiny_run / "d" / "data" / "data1.npy")[:2]
    np.save(tmp_path / "shots.npy", shots)
    argv = ["--checkpoint", str(ck), "--predict", str(tmp_path / "shots.npy"), "--vis", "0", "--device", "cpu"]
    code, seen = conv_dtypes_during(lambda: E.cli([*argv, "--output-dir", str(tmp_path / "bf16"), "--amp", "bf16"]))
    assert code == 0 and len(seen) == 25 and set(seen) == {torch.bfloat16}  # one batch, 25 (de)convolutions
    assert "forward pass bfloat16" in capsys.readouterr().out
    assert E.cli([*argv, "--output-dir", str(tmp_path / "fp32"), "--amp", "off"]) == 0
    bf16, fp32 = np.load(tmp_path / "bf16" / "shots_velocity.npy"), np.load(tmp_path / "fp32" / "shots_velocity.npy")
    assert bf16.dtype == np.float32 and bf16.shape == (2, 1, 70, 70)
    np.testing.assert_allclose(bf16, fp32, atol=30)  # m/s: bf16 rounding of a map spanning 1500-4500
    assert not np.array_equal(bf16, fp32)


def test_non_finite_weights_or_predictions_are_one_line_and_write_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    """NaN weights are refused on loading; a NaN prediction from finite weights (an fp16 overflow) stops
    evaluation before any result is written, and --predict before its velocity file is."""
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["model"]["deconv6.layers.0.weight"][0] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    np.save(tmp_path / "shots.npy", np.load(tiny_run / "d" / "data" / "data1.npy"))
    common = ["--no-progress", "--vis", "0", "--device", "cpu", "--num-workers", "0"]
    for job in ([], ["--predict", str(tmp_path / "shots.npy")]):
        assert E.cli(["--checkpoint", str(tmp_path / "nan.pt"), "--output-dir", str(tmp_path / "o"), *common, *job]) == 2
        assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tmp_path / 'nan.pt'}: its weights hold NaN or Inf "
                                           "(deconv6.layers.0.weight); use a checkpoint saved before the run diverged\n")
    forward = T.forward
    all_nan = lambda model, x, amp: forward(model, x, amp) * float("nan")  # finite weights, NaN out (an fp16 overflow)
    monkeypatch.setattr(T, "forward", all_nan)
    best = str(tiny_run / "run" / "best.pt")
    assert E.cli(["--checkpoint", best, "--output-dir", str(tmp_path / "e"), *common]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {best}: the model's predictions hold NaN or Inf in its "
                                       "float32 forward pass\n")
    assert not (tmp_path / "e").exists()  # nor the folder it made for them
    batches = []

    def nan_in_the_second_batchs_second_sample(model, x, amp):
        out = forward(model, x, amp)
        batches.append(len(x))
        if len(batches) == 2:
            out[1] = float("nan")
        return out

    monkeypatch.setattr(T, "forward", nan_in_the_second_batchs_second_sample)
    assert E.cli(["--checkpoint", best, "--output-dir", str(tmp_path / "p"), *common, "--predict", str(tmp_path / "shots.npy"),
                  "--batch-size", "2"]) == 2
    assert batches == [2, 2]
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tmp_path / 'shots.npy'} sample 3: the model's prediction "
                                       "holds NaN or Inf in its float32 forward pass\n")
    assert not (tmp_path / "p").exists()
    monkeypatch.setattr(T, "forward", all_nan)
    (tmp_path / "p").mkdir()  # the user's own folder stays, empty as it was
    assert E.cli(["--checkpoint", best, "--output-dir", str(tmp_path / "p"), *common, "--predict", str(tmp_path / "shots.npy")]) == 2
    assert (tmp_path / "p").is_dir() and not list((tmp_path / "p").glob("*"))
    capsys.readouterr()
    assert E.cli(["--checkpoint", best, "--output-dir", str(tmp_path / "e"), *common, "--amp", "bf16"]) == 2
    assert capsys.readouterr().err.endswith("in its bfloat16 forward pass; evaluate with --amp off\n")  # the likely cause


def test_a_run_trained_without_validation_points_to_the_data_eval_can_take(tiny_run, tmp_path, capsys):
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    d = tiny_run / "d"
    (tmp_path / "train.txt").write_text(f"{d}/data/data1.npy\t{d}/model/model1.npy\n")
    ck["args"].update(train_list=str(tmp_path / "train.txt"), val_list=None, val_every=0)
    torch.save(ck, tmp_path / "noval.pt")
    args = ["--checkpoint", str(tmp_path / "noval.pt"), "--no-progress", "--vis", "0", "--num-workers", "0"]
    assert E.cli([*args, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("eval_inversionnet.py: error: the val split to evaluate is empty (a run trained "
                                       "without validation?): name the data with --val-list or --data-root, or pass "
                                       "--split train\n")
    assert evaluate_to(tmp_path / "t", tmp_path / "noval.pt", "--split", "train")["samples"] == 4


def test_a_checkpoint_with_an_unreadable_split_record_is_one_line(tiny_run, tmp_path, capsys):
    ck = torch.load(tiny_run / "run" / "best.pt", weights_only=False)
    ck["split"] = "garbage"
    torch.save(ck, tmp_path / "s.pt")
    assert E.cli(["--checkpoint", str(tmp_path / "s.pt"), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tmp_path / 's.pt'}: its split record is unreadable "
                                       "(not a list of [data file, label file, samples])\n")


def test_predict_memory_stays_bounded_by_the_batch(tiny_run, tmp_path):
    """A file of 24 samples (34 MB) predicted 2 at a time never holds more than a few batches in numpy memory."""
    import tracemalloc
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(24, 5, 1000, 70))
    big[:] = np.load(tiny_run / "d" / "data" / "data1.npy")[np.arange(24) % 4]
    big.flush()
    del big
    tracemalloc.start()
    try:
        assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(tmp_path / "big.npy"),
                      "--output-dir", str(tmp_path / "o"), "--batch-size", "2", "--vis", "0", "--amp", "off",
                      "--device", "cpu"]) == 0  # host memory only: no CUDA start-up allocations in the trace
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8e6, peak  # a batch of 2 is 2.8 MB; the whole file 34 MB
    assert np.load(tmp_path / "o" / "big_velocity.npy", mmap_mode="r").shape == (24, 1, 70, 70)


@pytest.mark.parametrize("case, needle", [
    ("shape", "shape (2, 5, 999, 70), expected shot gathers (N, 5, 1000, 70)"),
    ("dtype", "dtype int16, expected floating-point shot gathers"),
    ("nan", "bad.npy sample 1: NaN or Inf in the shot gathers"),
    ("garbage", "unreadable or truncated .npy"),
    ("negative_shape", "bad.npy: unreadable or truncated .npy"),
    ("two_arrays", "bad.npy: 1400128 bytes after its array of 1 samples (two arrays saved into one file?)"),
    ("two_values", "bad.npy: 132 bytes after its array of one value (two arrays saved into one file?)"),
    ("npz", "bad.npy: an .npz archive, not a .npy array"),
    ("text", "bad.npy: not a .npy file (no NumPy header)"),
    ("overflow", "bad.npy sample 2: NaN or Inf in the shot gathers"),  # float64 beyond float32's range, no numpy warning
    ("missing", "--predict MISSING: no such file or directory"),
    ("empty_dir", "no .npy files in this directory"),
    ("labels_only", "no shot-gather files in this directory, only velocity maps"),
    ("outputs_only", "only *_velocity.npy files in this directory, taken for --predict's outputs (name such a file "
                     "itself to predict from it)"),
    ("labels_file", "shape (2, 1, 70, 70), expected shot gathers (N, 5, 1000, 70)"),  # named alone: an input it cannot take
    ("device_file", "--predict /dev/null: not a regular file or a directory"),
    ("no_samples", "shape (0, 5, 1000, 70), expected shot gathers (N, 5, 1000, 70) with N >= 1"),
    ("fifo_in_dir", "shots: b.npy is not a regular file"),  # reading it would block for ever
])
def test_predict_bad_input_is_one_line(tiny_run, tmp_path, capsys, case, needle):
    bad = tmp_path / "bad.npy"
    if case == "shape":
        np.save(bad, np.zeros((2, 5, 999, 70), np.float32))
    elif case == "dtype":
        np.save(bad, np.zeros((2, 5, 1000, 70), np.int16))
    elif case == "nan":
        x = np.zeros((3, 5, 1000, 70), np.float32)
        x[1, 2, 500, 7] = np.nan
        np.save(bad, x)
    elif case == "garbage":
        bad.write_bytes(b"\x93NUMPY garbage")
    elif case == "negative_shape":
        write_negative_shape_npy(bad)
    elif case == "two_arrays":  # np.save twice into one open file: the second sample would be dropped unsaid
        with open(bad, "wb") as fh:
            np.save(fh, np.zeros((1, 5, 1000, 70), np.float32)), np.save(fh, np.zeros((1, 5, 1000, 70), np.float32))
    elif case == "two_values":  # as two_arrays, of 0-d arrays: no samples to count
        with open(bad, "wb") as fh:
            np.save(fh, np.float32(1)), np.save(fh, np.float32(2))
    elif case == "text":
        bad.write_text("hello")
    elif case == "npz":
        with open(bad, "wb") as fh:
            np.savez(fh, np.zeros((2, 5, 1000, 70), np.float32))
    elif case == "overflow":
        x = np.zeros((3, 5, 1000, 70))
        x[2, 0, 0, 0] = 1e300
        np.save(bad, x)
    elif case == "no_samples":
        np.save(bad, np.zeros((0, 5, 1000, 70), np.float32))
    elif case == "missing":
        bad = tmp_path / "missing.npy"
        needle = needle.replace("MISSING", str(bad))
    elif case == "device_file":
        bad = "/dev/null"
    elif case == "labels_file":
        np.save(bad, np.zeros((2, 1, 70, 70), np.float32))
    elif case == "outputs_only":  # shot gathers under a name --predict gives its outputs
        bad = tmp_path / "shots"
        bad.mkdir()
        np.save(bad / "line1_velocity.npy", np.zeros((2, 5, 1000, 70), np.float32))
    elif case == "fifo_in_dir":
        bad = tmp_path / "shots"
        bad.mkdir()
        np.save(bad / "a.npy", np.zeros((2, 5, 1000, 70), np.float32))
        os.mkfifo(bad / "b.npy")
    elif case == "labels_only":
        bad = tmp_path / "velocity"
        bad.mkdir()
        np.save(bad / "vel1.npy", np.zeros((2, 1, 70, 70), np.float32))
    else:
        bad = tmp_path / "nothing"
        bad.mkdir()
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(bad), "--output-dir",
                  str(tmp_path / "o"), "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


@pytest.mark.parametrize("job", [["--predict", "x.npy"], ["--export", "m.pt2"]])
def test_predict_and_export_refuse_a_torchrun_launch(tmp_path, capsys, monkeypatch, job):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: each rank would write the same files
    (tmp_path / "c.pt").write_bytes(b"")
    assert E.cli(["--checkpoint", str(tmp_path / "c.pt"), *job]) == 2
    assert capsys.readouterr().err == f"eval_inversionnet.py: error: {job[0]} runs in one process: start it with python, not torchrun\n"


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_predict_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_run, tmp_path, capsys, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)  # what a full disk does; without it, writing the map would SIGBUS
    np.save(tmp_path / "shots.npy", np.zeros((2, 5, 1000, 70), np.float32))
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(tmp_path / "shots.npy"),
                  "--output-dir", str(tmp_path / "o"), "--vis", "0"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: cannot write {tmp_path / 'o' / 'shots_velocity.npy'} "
                                       "(0.04 MB): No space left on device\n")
    assert not (tmp_path / "o").exists()  # nothing partial, nor the folder made for it


def test_predict_names_the_output_not_its_temporary_file_when_the_rename_is_refused(tiny_run, tmp_path, capsys, monkeypatch):
    real = os.replace

    def refused(src, dst):
        if str(dst).endswith("_velocity.npy"):  # as an immutable (chattr +i) existing output refuses it
            raise PermissionError(1, "Operation not permitted", src, None, dst)
        real(src, dst)
    monkeypatch.setattr(os, "replace", refused)
    np.save(tmp_path / "shots.npy", np.zeros((2, 5, 1000, 70), np.float32))
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(tmp_path / "shots.npy"),
                  "--output-dir", str(tmp_path / "o"), "--vis", "0"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: cannot write {tmp_path / 'o' / 'shots_velocity.npy'}: "
                                       "Operation not permitted\n")
    assert not (tmp_path / "o").exists()  # no temporary file left, nor the folder made for it


def test_outputs_that_are_not_regular_files_are_refused_even_with_overwrite(tiny_run, tmp_path, capsys):
    ck = str(tiny_run / "run" / "best.pt")
    fifo = tmp_path / "pipe.pt2"
    os.mkfifo(fifo)  # as /dev/null would be: a rename would replace it
    assert E.cli(["--checkpoint", ck, "--export", str(fifo), "--overwrite"]) == 2
    assert capsys.readouterr().err == f"eval_inversionnet.py: error: {fifo}: exists and is not a regular file\n"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "adir").mkdir()  # said as it is at once, not as "pass --overwrite", which could not help
    assert E.cli(["--checkpoint", ck, "--export", str(tmp_path / "adir")]) == 2
    assert capsys.readouterr().err == f"eval_inversionnet.py: error: {tmp_path / 'adir'}: exists and is not a regular file\n"
    assert E.cli(["--checkpoint", ck, "--export", str(tmp_path / "nowhere" / "m.pt2")]) == 2  # before tracing
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: --export {tmp_path / 'nowhere' / 'm.pt2'}: no such "
                                       f"directory {tmp_path / 'nowhere'}\n")
    assert E.cli(["--checkpoint", ck, "--export", str(tmp_path / "m.pt2"), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("eval_inversionnet.py: error: --export writes the one file it names; --output-dir "
                                       "is not used: leave it out\n")
    np.save(tmp_path / "shots.npy", np.zeros((2, 5, 1000, 70), np.float32))
    (tmp_path / "o" / "shots_velocity.npy").mkdir(parents=True)
    assert E.cli(["--checkpoint", ck, "--predict", str(tmp_path / "shots.npy"), "--output-dir", str(tmp_path / "o"),
                  "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {tmp_path / 'o' / 'shots_velocity.npy'}: "
                                       "exists and is not a regular file\n")


def test_export_round_trips_with_a_dynamic_batch(tiny_run, tmp_path, capsys):
    ck = tiny_run / "run" / "best.pt"
    path = tmp_path / "inversionnet.pt2"
    assert E.cli(["--checkpoint", str(ck), "--export", str(path)]) == 0
    assert f"exported InversionNet to {path} (float32 on cpu): " in capsys.readouterr().out
    extra = {"normalization.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    model, norm = model_of(ck)
    assert json.loads(extra["normalization.json"]) == norm.as_dict()
    for batch in (1, 3):
        x = torch.randn(batch, 5, 1000, 70)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    # any batch a user infers at, not only those tried here (a batch of 4,096 would need 6 GB to try)
    assert [(r.lower, r.upper) for r in program.range_constraints.values()] == [(1, 1 << 16)]
    assert E.cli(["--checkpoint", str(ck), "--export", str(path)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # a model trained in bf16 is exported under bf16 autocast: the same numbers as eval's forward pass
    assert E.cli(["--checkpoint", str(ck), "--export", str(path), "--overwrite", "--amp", "bf16"]) == 0
    assert "(bfloat16 autocast on cpu)" in capsys.readouterr().out
    x = torch.randn(3, 5, 1000, 70)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = model(x).float()
    with torch.no_grad():
        got, in_float32 = torch.export.load(str(path)).module()(x), model(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected) and not torch.equal(got, in_float32)


def test_export_keeps_a_file_another_process_wrote_while_it_traced(tiny_run, tmp_path, capsys, monkeypatch):
    target = tmp_path / "m.pt2"
    load_model = E.load_model

    def another_export_ends_first(*a):
        target.write_bytes(b"theirs")
        return load_model(*a)
    monkeypatch.setattr(E, "load_model", another_export_ends_first)
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--export", str(target)]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: {target} was written by another process while "
                                       f"this one ran; pass --overwrite to replace it\n")
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["m.pt2"]


def test_export_never_replaces_the_checkpoint_it_reads(tiny_run, tmp_path, capsys):
    ck = tmp_path / "last.pt"
    shutil.copyfile(tiny_run / "run" / "best.pt", ck)
    before = ck.read_bytes()
    assert E.cli(["--checkpoint", str(ck), "--export", str(tmp_path / "." / "last.pt"), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"eval_inversionnet.py: error: --export {tmp_path / '.' / 'last.pt'} is the "
                                       f"checkpoint it exports: name another file\n")
    assert ck.read_bytes() == before


def test_metrics_carry_the_provenance_of_training_and_evaluation(tiny_run, tmp_path):
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--output-dir", str(out), "--num-workers", "0",
                  "--no-progress", "--vis", "0"]) == 0
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    training = torch.load(tiny_run / "run" / "best.pt", weights_only=False)["provenance"]
    assert prov["training"] == training and training["command"][0] == "train_inversionnet.py"
    assert prov["evaluation"]["command"][:2] == ["eval_inversionnet.py", "--checkpoint"]
    assert prov["evaluation"]["git_commit"] == training["git_commit"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_predict_with_one_line_and_no_partial_file(tiny_run, tmp_path, capsys, monkeypatch, signum):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", np.zeros((2, 5, 1000, 70), np.float32))
    np.save(tmp_path / "in" / "b.npy", np.zeros((4, 5, 1000, 70), np.float32))
    out = tmp_path / "o"
    out.mkdir()
    (out / f"b_velocity.npy.tmp-{ended_pid()}").write_bytes(b"the partial output of a run killed outright")
    real, calls, handler = T.forward, [], signal.getsignal(signal.SIGTERM)

    def signalled(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # b.npy's second batch of 2: a scheduler's SIGTERM, or Ctrl-C, mid-file
            os.kill(os.getpid(), signum)
        return real(*a, **kw)
    monkeypatch.setattr(T, "forward", signalled)
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(tmp_path / "in"), "--output-dir",
                  str(out), "--batch-size", "2", "--vis", "0", "--device", "cpu"]) == 128 + signum
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert capsys.readouterr().err == (f"eval_inversionnet.py: {what}; the files written so far are whole, the one under "
                                       "way is removed\n")
    assert sorted(p.name for p in out.iterdir()) == ["a_velocity.npy"] and len(calls) == 3
    assert np.load(out / "a_velocity.npy").shape == (2, 1, 70, 70)
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def ended_pid():
    """The pid of a process that has ended (and been reaped): no process has it until the system reuses it."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_predict_removes_a_killed_runs_partial_output_but_not_a_live_runs(tiny_run, tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 5, 1000, 70), np.float32))
    out = tmp_path / "o"
    out.mkdir()
    killed, live = out / f"a_velocity.npy.tmp-{ended_pid()}", out / f"a_velocity.npy.tmp-{os.getppid()}"
    for p in (killed, live):
        p.write_bytes(b"partial")
    assert E.cli(["--checkpoint", str(tiny_run / "run" / "best.pt"), "--predict", str(tmp_path / "a.npy"), "--output-dir",
                  str(out), "--vis", "0", "--device", "cpu"]) == 0
    assert not killed.exists() and live.read_bytes() == b"partial"  # another --predict, still writing, keeps its file
    assert np.load(out / "a_velocity.npy").shape == (2, 1, 70, 70)


def test_a_ctrl_c_held_back_behind_a_peer_error_ends_eval_as_interrupted(monkeypatch, capsys):
    """A call that holds a Ctrl-C back until it fails (a peer of a torchrun evaluation has gone) delivers it as its
    error is reported: the interrupted line, exit 130, not a traceback of the one inside the other."""
    def peer_gone(*args):
        raise RuntimeError("Connection closed by peer")
    def reported(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "main", peer_gone)
    monkeypatch.setattr(T, "report_input_error", reported)
    try:
        assert E.cli(["--checkpoint", "x.pt"]) == 128 + signal.SIGINT
    except KeyboardInterrupt:  # (escaping, it would stop the whole pytest session)
        pytest.fail("the Ctrl-C escaped cli()")
    assert capsys.readouterr().err == ("eval_inversionnet.py: interrupted; the files written so far are whole, the one "
                                       "under way is removed\n")


def test_a_sigterm_whose_raise_a_finalizer_swallowed_still_ends_eval_as_terminated(monkeypatch, capsys):
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)  # where Python reports what a finalizer raised
    monkeypatch.setattr(E, "main", lambda *a: (SignalledOnRelease(), 0)[1])
    assert E.cli(["--checkpoint", "x.pt"]) == 128 + signal.SIGTERM
    assert [u.exc_type for u in swallowed] == [E.Terminated]
    assert capsys.readouterr().err == ("eval_inversionnet.py: terminated; the files written so far are whole, the one "
                                       "under way is removed\n")
