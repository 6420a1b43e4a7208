"""Small OpenFWI-layout datasets for tests: cheap labelled noise, or real simulated shots."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_inversionnet.py")
EVAL = os.path.join(ROOT, "eval_inversionnet.py")


def write_ids_dataset(root, counts, seed=0):
    """Files whose samples carry their global id in data[:, 0, 0, 0]; returns the (data, label) pairs."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    os.makedirs(os.path.join(root, "model"), exist_ok=True)
    pairs, gid = [], 0
    for i, n in enumerate(counts, 1):
        x = rng.normal(0, 5, size=(n, 5, 1000, 70)).astype(np.float32)
        x[:, 0, 0, 0] = np.arange(gid, gid + n)
        y = rng.uniform(1500, 4500, size=(n, 1, 70, 70)).astype(np.float32)
        gid += n
        d, m = os.path.join(root, "data", f"data{i}.npy"), os.path.join(root, "model", f"model{i}.npy")
        np.save(d, x)
        np.save(m, y)
        pairs.append((d, m))
    return pairs


def child_env(env=None):
    """The environment scripts run in from tests: unbuffered output, two threads, plus `env`."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    e.update(env or {})
    return e


def run_script(script, *args, env=None, timeout=600, **popen_kw):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout, cwd=ROOT, **popen_kw)
