"""Small OpenFWI-layout datasets for tests, the one way tests start a script in its own process, and the checks
several test files share."""
import atexit
import contextlib
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_inversionnet.py")
EVAL = os.path.join(ROOT, "eval_inversionnet.py")
SIMULATE = os.path.join(ROOT, "simulate_openfwi.py")
# torchrun leaves a torchelastic_* folder of rank logs in the temporary directory at every launch: the suite's
# launches keep theirs in one folder that goes when the tests end
TORCHRUN_TMP = tempfile.mkdtemp(prefix="inversionnet-tests-")
atexit.register(shutil.rmtree, TORCHRUN_TMP, True)


def resolved_args(device, *flags):
    """Training arguments as `train_inversionnet.py --device DEVICE --parallel none FLAGS` checks and resolves them
    before it builds its run: one device, also on a machine with several GPUs, unless FLAGS name --parallel."""
    import train_inversionnet as T
    args = T.check_args(T.get_args_parser().parse_args(["--device", device.type, "--parallel", "none", *flags]))
    T.resolve_speed(args, device)
    return args


@contextlib.contextmanager
def module_dir(tmp_path_factory, name):
    """A folder shared by one module's tests and removed when the module is done: a run in it holds about 600 MB
    of checkpoints, which pytest's own clean-up would keep until the session ends."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def sample_ids(x, normalizer):
    """The ids write_ids_dataset put in x[:, 0, 0, 0], read back from a batch NORMALIZER scaled (its inverse)."""
    import train_inversionnet as T
    lo, hi = T.log_transform(normalizer.data_min), T.log_transform(normalizer.data_max)
    t = (x[:, 0, 0, 0].double().cpu() + 1) / 2 * (hi - lo) + lo
    return (torch.sign(t) * torch.expm1(t.abs())).round().long().tolist()


def layered_maps(n, seed=0):
    """(n, 1, 70, 70) float32 flatvel velocity maps from the simulator's generator, normalised to [-1, 1]: nearly
    constant windows, where SSIM's local variances are differences of nearly equal numbers."""
    import simulate_openfwi as so
    return ((so.flatvel(np.random.default_rng(seed), n)[:, None] - 3000) / 1500).astype(np.float32)


def write_negative_shape_npy(path, shape=(-1, 5, 1000, 70)):
    """A .npy whose header claims SHAPE (a negative dimension: numpy's memory map overflows on it), a few bytes after."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    header += " " * (117 - len(header)) + "\n"  # padded so that the 10-byte preamble and the header fill 128 bytes
    with open(path, "wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))
    return path


def write_split_list(path, pairs):
    with open(path, "w") as fh:
        fh.writelines(f"{d}\t{m}\n" for d, m in pairs)
    return path


def start(script, *args, nproc=None, torchrun=(), env=None, cwd=ROOT, **popen_kw):
    """Start `python SCRIPT ARGS` in CWD, or with nproc the same under `torchrun --standalone` (torchrun
    flags in `torchrun`), with unbuffered output and two threads per process in all (one per rank)."""
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *torchrun]
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1" if nproc else "2")
    if nproc:
        e["TMPDIR"] = TORCHRUN_TMP
    e.update(env or {})
    return subprocess.Popen([*launcher, script, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=cwd, **popen_kw)


def run_script(script, *args, timeout=600, **kw):
    """start() and wait: a CompletedProcess with returncode, stdout and stderr."""
    p = start(script, *args, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_without_reader(script, *args, timeout=600):
    """start() with its stdout's reader gone before the first line (`script | head -0`): (exit code, stderr)."""
    p = start(script, *args)
    p.stdout.close()
    try:
        err = p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, err


def wait_until(cond, seconds):
    """Poll COND until it holds (True) or SECONDS pass (False): for work that finishes on another thread."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class SignalledOnRelease:
    """An object whose finalizer receives a SIGTERM: Python prints and ignores what a finalizer raises."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def assert_same_weights(a, b):
    """Two checkpoints (dicts) at the same epoch and step, with bit-identical weights and buffers."""
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def conv_dtypes_during(fn):
    """(FN's result, the output dtype of every (transposed) convolution that ran during it), by a global
    forward hook: what a forward actually computed in, whatever its settings say."""
    seen = []

    def hook(module, inputs, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            seen.append(output.dtype)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = fn()
    finally:
        handle.remove()
    return result, seen
