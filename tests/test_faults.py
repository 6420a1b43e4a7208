"""Faults and bad input, triggered for real: signals, kills, non-finite losses, bad files, failing storage."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, TRAIN, run_script, write_ids_dataset

pytestmark = pytest.mark.slow
BASE = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1", "--dataset", "flatvel-a"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "d"
    write_ids_dataset(d, (6, 6, 4))
    return d


def start(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, TRAIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def test_sigkill_leaves_a_loadable_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    p = start("--data-root", data, "--output-dir", out, "--epochs", 50, *BASE)
    wait_for(out / "last.pt", p)
    time.sleep(1.5)  # land somewhere in the next epoch, possibly mid-write
    p.kill()
    p.communicate()
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] >= 1 and "model" in ck
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", ck["epoch"] + 1, "--resume", "auto", *BASE)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr


def corrupt(root, case):
    d, m = root / "data" / "data1.npy", root / "model" / "model1.npy"
    if case == "truncated":
        d.write_bytes(d.read_bytes()[:5000])
        return "data1.npy", "truncated"
    if case == "wrong_dtype":
        np.save(d, np.load(d).astype(np.float64))
        return "data1.npy", "float64"
    if case == "wrong_shape":
        np.save(d, np.load(d)[:, :, :500])
        return "data1.npy", "expected (N, 5, 1000, 70)"
    if case == "unpaired":
        os.remove(m)
        return "data1.npy", "no matching model"
    if case == "count_mismatch":
        np.save(m, np.load(m)[:3])
        return "data1.npy", "but"
    if case in ("nan_gpu", "nan_map"):
        x = np.load(d)
        x[:, 1, 10, 10] = np.nan
        np.save(d, x)
        return "data1.npy sample 0" if case == "nan_gpu" else "data1.npy sample", "NaN"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "wrong_dtype", "wrong_shape", "unpaired", "count_mismatch", "nan_gpu", "nan_map"])
def test_bad_data_one_line_exit_2(tmp_path, case):
    root = tmp_path / "d"
    write_ids_dataset(root, (4, 4))
    name, needle = corrupt(root, case)
    extra = ["--loader", "gpu"] if case == "nan_gpu" else (["--num-workers", "1"] if case == "nan_map" else [])
    r = run_script(TRAIN, "--data-root", root, "--output-dir", tmp_path / "o", "--epochs", 1, "--train-size", 0.5,
                   "--seed", 1, *BASE, *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert name in r.stderr and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--data-root", "/nonexistent/fwi"], "no such directory"),
    (["--data-root", "EMPTY"], "expected subdirectories"),
    (["--resume", "/nonexistent.pt"], "--resume /nonexistent.pt: no such file"),
    (["--init-from", "GARBAGE"], "not a readable checkpoint"),
    (["--output-dir", "AFILE"], "not a directory"),
])
def test_bad_arguments_one_line_exit_2(data, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "afile").write_text("x")
    subst = {"EMPTY": str(tmp_path / "empty"), "GARBAGE": str(tmp_path / "garbage.pt"), "AFILE": str(tmp_path / "afile")}
    args = [subst.get(a, a) for a in args]
    if "--data-root" not in args:
        args = ["--data-root", str(data), *args]
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "o")]
    r = run_script(TRAIN, *args, "--epochs", 1, "--batch-size", "2", "--num-workers", "0", "--no-progress", "--dataset", "flatvel-a")
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
