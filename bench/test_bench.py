"""Where the time goes: DataLoader throughput against compute, per worker count.

    pytest bench --benchmark-only                      # about 5 minutes on a 2-core CPU
    BENCH_SCALE=gpu pytest bench --benchmark-only      # bigger batches and more workers on a GPU machine
    pytest bench --benchmark-only --benchmark-json=bench.json   # every figure also in extra_info

Loaders are the ones train_inversionnet.py builds (imported, not copied). Every benchmark warms up
outside the timed region, synchronises the device and repeats (pedantic rounds); figures are ratios
taken in one run. With --benchmark-disable (as `bash run.sh test` runs it) each body runs once.
"""
import importlib.util
import os
import tempfile
import time

import pytest
import torch

import simulate_openfwi as S
import train_inversionnet as T
from conftest import CFG, DEVICE, LOADER_BATCH, PEAK_TFLOPS, RESULTS, environment

NORM = T.Normalizer(-26.95, 52.77)
SAMPLE_BYTES = (5 * 1000 * 70 + 70 * 70) * 4


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()




def loader_cases():
    pins = (False, True) if torch.cuda.is_available() else (False,)
    cases = [("gpu", 0, False)]
    for kind in ("map", "iterable"):
        for w in CFG["workers"]:
            for pin in pins:
                cases.append((kind, w, pin))
    return cases


def make_loader(pairs, kind, workers, pin):
    cfg = T.LoaderConfig(kind=kind, batch_size=LOADER_BATCH, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    return T.build_loader(cfg, pairs, T.inspect_pairs(pairs), NORM, DEVICE)


@pytest.mark.parametrize("kind, workers, pin", loader_cases(), ids=lambda v: str(v))
def test_loader_throughput(benchmark, random_dataset, kind, workers, pin):
    """Samples/s delivered on the device (copied and normalised), one epoch per round."""
    loader = make_loader(random_dataset, kind, workers, pin)
    epoch = [0]

    def one_epoch():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for x, _ in T.device_batches(loader, DEVICE, NORM):
            n += len(x)
        sync()
        return n

    t0 = time.perf_counter()
    n = benchmark.pedantic(one_epoch, rounds=CFG["rounds"], warmup_rounds=1 if benchmark.enabled else 0)
    assert n == len(loader) * LOADER_BATCH
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    sps = n / secs
    RESULTS["loader"][(kind, workers, pin)] = (sps, sps * SAMPLE_BYTES / 1e9)
    benchmark.extra_info.update(environment(), loader=kind, workers=workers, pin_memory=pin, samples_per_s=sps,
                                gb_per_s=sps * SAMPLE_BYTES / 1e9, batch=LOADER_BATCH)


def flops_per_sample():
    from torch.utils.flop_counter import FlopCounterMode
    m = T.InversionNet()
    x = torch.randn(2, 5, 1000, 70)  # BatchNorm cannot train on one sample
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    return fc.get_total_flops() / 2


def make_run(*flags):
    """The Run that `train_inversionnet.py FLAGS` trains with, on this device; its step is T.train_step."""
    torch.manual_seed(0)
    args = T.check_args(T.get_args_parser().parse_args(["--device", DEVICE.type, *flags]))
    return T.build_run(args, DEVICE, iters_per_epoch=1)[0]


def compute_cases():
    modes = ["fp32", "bf16"] + (["fp16"] if DEVICE.type == "cuda" else [])
    cases = [(m, b) for m in modes for b in CFG["batches"]]
    cases.append(("compile", CFG["batches"][-1]))
    return cases


@pytest.mark.parametrize("mode, batch", compute_cases(), ids=lambda v: str(v))
def test_compute_throughput(benchmark, mode, batch):
    """Training-step samples/s (forward, backward, AdamW) on inputs already on the device."""
    if mode == "compile" and DEVICE.type == "cpu" and benchmark.enabled and not os.environ.get("BENCH_COMPILE"):
        pytest.skip("torch.compile on CPU costs ~40 s of compilation; set BENCH_COMPILE=1 to include it")
    run = make_run(*{"compile": ["--compile"], "fp32": []}.get(mode, ["--amp", mode]))
    x = torch.randn(batch, 5, 1000, 70, device=DEVICE)
    y = torch.rand(batch, 1, 70, 70, device=DEVICE) * 2 - 1
    T.train_step(run, x, y)  # warm-up (and compilation) outside the timed region
    sync()

    n_steps = CFG["steps"] if benchmark.enabled else 1

    def steps():
        for _ in range(n_steps):
            T.train_step(run, x, y)
        sync()

    t0 = time.perf_counter()
    benchmark.pedantic(steps, rounds=CFG["rounds"], warmup_rounds=0)
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    sps = batch * n_steps / secs
    flops = flops_per_sample()
    tflops = sps * flops / 1e12
    RESULTS["compute"][(mode, batch)] = sps
    info = dict(environment(), mode=mode, batch=batch, samples_per_s=sps, flops_per_sample=flops, achieved_tflops=tflops)
    name = info["device"]
    for key, (peak, _) in PEAK_TFLOPS.items():
        if key in name:
            info["fraction_of_bf16_peak"] = tflops / peak
    benchmark.extra_info.update(info)
    assert 12e9 < flops < 13e9  # forward + backward: 12.49 GFLOP per sample (forward 4.19)


@pytest.mark.parametrize("kind, workers", [("gpu", 0)] + [("map", w) for w in CFG["workers"]] + [("iterable", w) for w in CFG["workers"]],
                         ids=lambda v: str(v))
def test_end_to_end(benchmark, random_dataset, kind, workers):
    """Training-step samples/s with the real loader feeding the model, and the share of time spent waiting."""
    pin = DEVICE.type == "cuda"
    loader = make_loader(random_dataset, kind, workers, pin)
    run = make_run()
    limit = min(len(loader), CFG["steps"] + 1 if benchmark.enabled else 2)
    waits = []

    def run_epoch():
        wait, n = 0.0, 0
        it = T.device_batches(loader, DEVICE, NORM)
        t_start = time.perf_counter()
        for i in range(limit):
            t0 = time.perf_counter()
            x, y = next(it)
            sync()
            wait += time.perf_counter() - t0
            T.train_step(run, x, y)
            sync()
            n += len(x)
        waits.append(wait / (time.perf_counter() - t_start))
        del it
        return n

    t0 = time.perf_counter()
    n = benchmark.pedantic(run_epoch, rounds=CFG["rounds"], warmup_rounds=1 if benchmark.enabled else 0)
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    sps = n / secs
    wait = sorted(waits)[len(waits) // 2]
    RESULTS["e2e"][(kind, workers, pin)] = (sps, wait)
    benchmark.extra_info.update(environment(), loader=kind, workers=workers, samples_per_s=sps, data_wait_share=wait)
    assert n == limit * LOADER_BATCH


def test_simulator_throughput(benchmark):
    """simulate_openfwi samples/s, and the ratio to deepwave in the same run when it is installed."""
    import numpy as np
    batch = 8 if DEVICE.type == "cpu" else 256
    v = torch.from_numpy(S.flatvel(np.random.default_rng(0), batch)).to(DEVICE)
    nt = 1000 if benchmark.enabled else 100
    S.simulate(v[:1], nt=50)

    def run():
        S.simulate(v, nt=nt)
        sync()

    t0 = time.perf_counter()
    benchmark.pedantic(run, rounds=CFG["rounds"], warmup_rounds=0)
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    ours = batch / secs * nt / 1000
    RESULTS["sim"]["ours"] = ours
    info = dict(environment(), samples_per_s=ours, batch=batch)
    if importlib.util.find_spec("deepwave") and benchmark.enabled:
        import deepwave
        amp = torch.from_numpy(S.ricker(1001)).float()[None, None].repeat(5, 1, 1).to(DEVICE)
        src = torch.zeros(5, 1, 2, dtype=torch.long, device=DEVICE)
        src[..., 0] = 1
        src[:, 0, 1] = torch.tensor(S.SRC_COLS)
        rec = torch.zeros(5, 70, 2, dtype=torch.long, device=DEVICE)
        rec[..., 0] = 1
        rec[..., 1] = torch.arange(70)
        t0 = time.perf_counter()
        for b in range(batch):
            deepwave.scalar(v[b], 10.0, 1e-3, source_amplitudes=amp, source_locations=src, receiver_locations=rec,
                            pml_width=20, pml_freq=15, max_vel=4500, courant_number=0.65)
        sync()
        theirs = batch / (time.perf_counter() - t0)
        RESULTS["sim"]["deepwave"] = theirs
        info.update(deepwave_samples_per_s=theirs, ratio_to_deepwave=ours / theirs)
    benchmark.extra_info.update(info)


def test_profiler_trace(benchmark):
    """A torch.profiler trace of a few training steps for the torch-tb-profiler TensorBoard plugin."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
    out = os.environ.get("BENCH_TRACE_DIR") or tempfile.mkdtemp(prefix="bench-trace-")
    run = make_run()
    x = torch.randn(2, 5, 1000, 70, device=DEVICE)
    y = torch.rand(2, 1, 70, 70, device=DEVICE)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])

    def trace():
        with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=2, repeat=1),
                     on_trace_ready=tensorboard_trace_handler(out)) as prof:
            for _ in range(3):
                T.train_step(run, x, y)
                prof.step()

    benchmark.pedantic(trace, rounds=1, warmup_rounds=0)
    files = [f for f in os.listdir(out) if ".pt.trace.json" in f]
    assert files
    benchmark.extra_info.update(environment(), trace_dir=out)
