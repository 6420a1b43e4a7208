"""Shared fixtures and the end-of-run report of the bench suite.

Sizes: BENCH_SCALE=small (default; 2-core CPU, about 4 minutes) or BENCH_SCALE=gpu (bigger batches,
more samples, more workers). BENCH_COMPILE=1: include the torch.compile rows on a CPU (about 40 s of
compilation). BENCH_TRACE_DIR: where the profiler trace is kept (by default it goes with pytest's temporary folders).
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_inversionnet as T  # noqa: E402  (found through ROOT)

ENV_ERRORS = []  # switches set to what they cannot be: pytest_configure stops the run with them in one line


def env_choice(name, choices):
    """An environment switch of the bench, one of CHOICES (the first: unset); another value is refused, as a typo
    would otherwise measure another configuration under the name asked for."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        ENV_ERRORS.append(f"{name} must be {' or '.join(choices)}, got {value!r}")
    return value


def pytest_configure(config):
    if ENV_ERRORS:
        raise pytest.UsageError("; ".join(ENV_ERRORS))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    """A run stopped inside a benchmark (Ctrl-C, a time limit) leaves that benchmark without a single timing, and
    pytest-benchmark's JSON writer fails on it, taking the report of every figure measured before with it: it is
    dropped before that writer runs (outside it, as this wrapper is the first)."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b.stats.data]
    yield


SCALE = env_choice("BENCH_SCALE", ("small", "gpu"))
COMPILE_ON_CPU = env_choice("BENCH_COMPILE", ("0", "1")) == "1"
CPUS = os.cpu_count() or 1
if SCALE == "gpu":
    CFG = dict(files=16, per_file=128, batches=(64, 128, 256), steps=6, rounds=3, whole_epochs=3,
               workers=sorted({0, 4, 16} & set(range(CPUS + 1))))
else:
    CFG = dict(files=4, per_file=16, batches=(4, 8), steps=2, rounds=2, whole_epochs=2,
               workers=sorted({0, 1, 2, 4} & set(range(CPUS + 1))))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOADER_BATCH = CFG["batches"][-1]
# every figure the benchmarks measure, printed as tables at the end of the run
RESULTS = {"loader": {}, "compute": {}, "e2e": {}, "whole": {}, "sim": {}}
SAMPLE_BYTES = (math.prod(T.DATA_SHAPE) + math.prod(T.LABEL_SHAPE)) * 4  # one float32 shot-gather set and its velocity map
# bf16 dense TFLOP/s and HBM bytes/s: the H100 figure is the rate its bf16 matmuls reach when measured (the
# datasheet's 989 is not reached in practice); the H200 has the same compute die
PEAK_TFLOPS = {"H100": (790.0, 3.35e12), "H200": (790.0, 4.8e12), "A100": (312.0, 2.0e12)}


def environment():
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "cpu_count": CPUS, "threads": torch.get_num_threads(), "scale": SCALE}


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory):
    """OpenFWI-layout files of random float32 data (loader cost does not depend on the values)."""
    d = str(tmp_path_factory.mktemp("bench-data"))
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(d, "data"))
    os.makedirs(os.path.join(d, "model"))
    pairs = []
    for i in range(1, CFG["files"] + 1):
        x = rng.standard_normal((CFG["per_file"], 5, 1000, 70), dtype=np.float32) * 10
        y = rng.uniform(1500, 4500, (CFG["per_file"], 1, 70, 70)).astype(np.float32)
        dp, mp = os.path.join(d, "data", f"data{i}.npy"), os.path.join(d, "model", f"model{i}.npy")
        np.save(dp, x)
        np.save(mp, y)
        pairs.append((dp, mp))
    return pairs


def pytest_terminal_summary(terminalreporter):
    lines = report_lines()
    if lines:
        once = terminalreporter.config.getoption("benchmark_disable", False)  # `bash run.sh test`: a check, not a measurement
        terminalreporter.write_sep("=", "InversionNet: where the time goes" + (
            " (test mode: each case ran once at test scale; measure with --benchmark-only)" if once else ""))
        for line in lines:
            terminalreporter.write_line(line)


def report_lines():
    env = environment()
    out = [f"device {env['device']}, torch {env['torch']}, {env['cpu_count']} CPUs, {env['threads']} threads, scale {SCALE}"]
    out += compute_lines(RESULTS["compute"]) + loader_lines(RESULTS["loader"], RESULTS["e2e"], RESULTS["compute"])
    if "fill" in RESULTS:
        n, secs = RESULTS["fill"]
        out.append(f"device cache fill (--loader gpu): {n} samples in {secs:.2f} s, {n * SAMPLE_BYTES / secs / 1e9:.2f} GB/s of float32 files")
    if "checkpoint" in RESULTS:
        size, stall, whole = RESULTS["checkpoint"]
        out.append(f"checkpoint of the model and AdamW state ({size / 1e6:.0f} MB): {stall:.3f} s on the training thread, "
                   f"{whole:.2f} s for the whole write timed alone (the rest goes on beside training)")
    whole = RESULTS["whole"]
    if len(whole) == 2:
        out.append(f"whole run ({RESULTS['whole_size']}, start-up and "
                   f"validation included): defaults {whole['plain']:.1f} s, --fast {whole['fast']:.1f} s: "
                   f"{speedup(whole['plain'] / whole['fast'])}")
    sim = RESULTS["sim"]
    if sim:
        deepwave = max((v for k, v in sim.items() if k.startswith("deepwave")), default=None)
        out.append("simulator samples/s (median of the rounds, same process): " + ", ".join(f"{k} {v:.2f}" for k, v in sim.items())
                   + (f"; ours / deepwave {sim['ours'] / deepwave:.2f}x" if deepwave else ""))
    return out


def speedup(ratio):
    """'2.11x faster', or '3.36x slower' where the ratio is under 1 ('0.30x faster' would read as a gain)."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def compute_lines(compute):
    """One row per compute variant: samples/s per batch size and the ratio to fp32 at the largest batch."""
    if not compute:
        return []
    batches = sorted({b for _, b in compute})
    base = compute.get(("fp32", batches[-1]))
    out = [f"compute-only samples/s, inputs on the device ({' / '.join(f'batch {b}' for b in batches)}; x fp32 at {batches[-1]}):"]
    for mode in dict.fromkeys(m for m, _ in compute):
        row = "".join(f"{compute[(mode, b)]:9.1f}" if (mode, b) in compute else f"{'-':>9s}" for b in batches)
        ratio = f"{compute[(mode, batches[-1])] / base:6.2f}x" if base and (mode, batches[-1]) in compute else ""
        out.append(f"  {mode:14s}{row}{ratio}{'   <- --fast on this device' if mode == 'fast' else ''}")
    return out


def loader_lines(loader, e2e, compute):
    """Each loader against the --fast step's demand, end to end, and OpenFWI's configuration beside it (the
    end-to-end lines print on their own when only those cases ran)."""
    need = compute.get(("fast", LOADER_BATCH))
    if not (loader or e2e):
        return []
    if not need:  # a -k that left out the case they are measured against
        return [f"loader and end-to-end figures are judged against the --fast compute case at batch {LOADER_BATCH}, "
                f"which did not run: add it to -k (\"... or (compute_throughput and fast)\")"]
    return (loader_table(loader, e2e, need) if loader else []) + e2e_lines(e2e, need)


def loader_table(loader, e2e, need):
    out = [f"loaders feeding the --fast step (batch {LOADER_BATCH}, {need:.1f} samples/s compute-only):",
           f"{'loader':9s}{'workers':>8s}{'pin':>5s}{'loader/s':>10s}{'GB/s':>7s}{'ratio':>7s}{'e2e/s':>8s}{'wait':>7s}  verdict"]
    best = None
    for (kind, workers, pin), (sps, gbs) in sorted(loader.items()):
        e_sps, wait = e2e.get((kind, workers, pin), (float("nan"), float("nan")))  # (end to end: the script's own pin)
        verdict = "compute-bound" if sps / need >= 1.1 else "input-bound"
        out.append(f"{kind:9s}{workers:8d}{'y' if pin else 'n':>5s}{sps:10.1f}{gbs:7.2f}{sps / need:7.2f}{e_sps:8.1f}"
                   f"{100 * wait:6.0f}%  {verdict}")
        if verdict == "compute-bound" and (best is None or (workers, kind != "gpu") < (best[1], best[0] != "gpu")):
            best = (kind, workers)
    out.append(f"recommendation: --loader {best[0]} --num-workers {best[1]} keeps the device fed (fewest workers with "
               f"loader >= 1.1x compute)" if best else
               "recommendation: every loader is input-bound here; use --loader gpu if the split fits in device memory")
    return out


def e2e_lines(e2e, need):
    out = []
    openfwi = [(k, v) for k, v in e2e.items() if k[0] == "openfwi"]
    fast = e2e.get(("gpu", 0, DEVICE.type == "cuda"))
    if fast:
        out.append(f"--fast end to end (device cache): {fast[0]:.1f} samples/s = {100 * fast[0] / need:.0f}% of its "
                   f"compute-only {need:.1f}")
    if openfwi and fast:
        (_, workers, _), (sps, wait) = openfwi[0]
        out.append(f"OpenFWI-style (map, {workers} workers normalising, fp32): {sps:.1f} samples/s, data wait {100 * wait:.0f}%; "
                   f"--fast with the device cache: {fast[0]:.1f} samples/s, wait {100 * fast[1]:.0f}%: {fast[0] / sps:.2f}x")
    return out
