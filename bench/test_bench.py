"""Where the time goes: each compute variant, the loaders against the --fast step, end to end, a whole run.

    pytest bench --benchmark-only                      # about 4 minutes on a 2-core CPU
    BENCH_SCALE=gpu pytest bench --benchmark-only      # bigger batches and more workers on a GPU machine
    pytest bench --benchmark-only --benchmark-json=bench.json   # every figure also in extra_info

Runs, steps and loaders are the ones train_inversionnet.py builds from its own flags (T.build_run,
T.train_step, T.build_loader: imported, not copied), so each row is what a user of those flags gets.
Every benchmark but the whole run (one start of the script per mode, start-up included) warms up outside
the timed region, synchronises the device and repeats (pedantic rounds); figures are ratios taken in one
run. With --benchmark-disable (as `bash run.sh test` runs it) each body runs once.
"""
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import simulate_openfwi as S
import train_inversionnet as T
from conftest import CFG, COMPILE_ON_CPU, DEVICE, LOADER_BATCH, PEAK_TFLOPS, RESULTS, ROOT, SAMPLE_BYTES, environment

sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import resolved_args  # noqa: E402  (the tests' own way to resolve a script's flags)

NORM = T.Normalizer(*T.DATASETS["flatvel-a"])
SAMPLES = CFG["files"] * CFG["per_file"]  # in random_dataset


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_args(*flags):
    """Training arguments as `train_inversionnet.py FLAGS` resolves them on this device (batch LOADER_BATCH)."""
    return resolved_args(DEVICE, "--batch-size", str(LOADER_BATCH), *flags)


def make_run(*flags):
    """The Run that `train_inversionnet.py FLAGS` trains with, on this device, with the backend settings
    (TF32, cudnn.benchmark) the script makes, applied at every call since they are process-wide; its
    step is T.train_step."""
    T.configure_backends(make_args(*flags), DEVICE)
    return _build_run(*flags)


@functools.lru_cache(maxsize=None)
def _build_run(*flags):
    """One Run per set of flags, so that a compiled model is compiled once for all the benchmarks that use it."""
    torch.manual_seed(0)
    return T.build_run(make_args(*flags), DEVICE, iters_per_epoch=1, normalizer=NORM)[0]


def make_loader(pairs, args):
    """The training loader the script builds from these arguments, over an epoch long enough to time it (see
    epoch_pairs)."""
    pairs = epoch_pairs(pairs, args)
    return T.build_loader(T.LoaderConfig.from_args(args, train=True), pairs, T.inspect_pairs(pairs), NORM, DEVICE)


def epoch_pairs(pairs, args):
    """PAIRS, listed again as often as it takes an epoch to hold 4 x the batches its loader reads ahead (workers x
    prefetch, or the map loader's reader threads without workers): they start every epoch empty, so a shorter
    epoch would time their start-up more than their throughput (at gpu scale, 16 workers would each make one batch
    of an 8-batch epoch). Files listed twice are read twice, as another file would be (from the page cache, as a
    set that fits in memory is after its first epoch)."""
    if args.loader == "gpu":
        ahead = 0
    else:
        ahead = args.num_workers * args.prefetch_factor or (T.reader_threads() if args.loader == "map" else 0)
    return pairs * max(1, -(-4 * ahead * args.batch_size // SAMPLES))


def loader_flags(kind, workers, pin):
    return ["--fast", "--loader", kind, "--num-workers", str(workers), "--pin-memory" if pin else "--no-pin-memory",
            "--persistent-workers" if workers else "--no-persistent-workers"]


def loader_cases():
    """The device cache, then map and iterable loaders per worker count (pinned and not on CUDA). (The iterable
    loader splits each epoch's samples over its workers: epoch_pairs gives each at least 8 batches.)"""
    pins = (False, True) if torch.cuda.is_available() else (False,)
    return [("gpu", 0, False)] + [(kind, w, pin) for kind in ("map", "iterable") for w in CFG["workers"] for pin in pins]


@pytest.mark.parametrize("kind, workers, pin", loader_cases(), ids=lambda v: str(v))
def test_loader_throughput(benchmark, random_dataset, kind, workers, pin):
    """Samples/s delivered on the device (copied and normalised as the --fast step takes them), one epoch per round."""
    args = make_args(*loader_flags(kind, workers, pin))
    loader = make_loader(random_dataset, args)
    epoch = [0]

    def one_epoch():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for x, _ in T.device_batches(loader, DEVICE, NORM, args.channels_last):
            n += len(x)
        sync()
        return n

    t0 = time.perf_counter()
    n = benchmark.pedantic(one_epoch, rounds=CFG["rounds"], warmup_rounds=1 if benchmark.enabled else 0)
    # map: whole batches; iterable: every sample, a worker's last batch short when its shard is not a multiple
    assert n == (len(loader) * LOADER_BATCH if kind != "iterable" else len(epoch_pairs(random_dataset, args)) * CFG["per_file"])
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    sps = n / secs
    RESULTS["loader"][(kind, workers, pin)] = (sps, sps * SAMPLE_BYTES / 1e9)
    benchmark.extra_info.update(environment(), loader=kind, workers=workers, pin_memory=pin, samples_per_s=sps,
                                gb_per_s=sps * SAMPLE_BYTES / 1e9, batch=LOADER_BATCH)


def test_device_cache_fill(benchmark, random_dataset):
    """Seconds to fill the --loader gpu cache from the files (read, checked, copied, normalised): the part of a
    --fast run's start-up that grows with the data."""
    args = make_args("--fast", "--loader", "gpu")

    def fill():
        loader = make_loader(random_dataset, args)
        sync()
        return len(loader.x)

    t0 = time.perf_counter()
    n = benchmark.pedantic(fill, rounds=CFG["rounds"], warmup_rounds=1 if benchmark.enabled else 0)
    assert n == SAMPLES
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    RESULTS["fill"] = (n, secs)
    benchmark.extra_info.update(environment(), samples=n, seconds=secs, gb_per_s=n * SAMPLE_BYTES / secs / 1e9)


def test_checkpoint_stall(benchmark, tmp_path):
    """Seconds a checkpoint of the model and AdamW's moments takes from the training thread
    (T.CheckpointWriter.save: a copy on the CPU), against the whole write (copy, serialise, fsync, rename)
    timed alone: the part that goes on beside training in a run."""
    run = make_run()
    T.train_step(run, torch.randn(2, 5, 1000, 70, device=DEVICE), torch.rand(2, 1, 70, 70, device=DEVICE))  # the moments
    state = {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict()}
    writer, path, stalls = T.CheckpointWriter(), str(tmp_path / "last.pt"), []

    def after_the_last_write():
        writer.wait()
        sync()

    def save():
        t = time.perf_counter()
        writer.save(state, path)
        stalls.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    writer.save(state, path)
    writer.wait()
    whole = time.perf_counter() - t0
    os.remove(path)  # what the check below reads is the timed writes' file
    benchmark.pedantic(save, setup=after_the_last_write, rounds=CFG["rounds"], warmup_rounds=0)
    writer.wait()
    back = torch.load(path, weights_only=False)  # the timed writes wrote the whole state
    assert all(torch.equal(back["model"][k], v.cpu()) for k, v in state["model"].items())
    assert back["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()
    stall = statistics.median(stalls)
    RESULTS["checkpoint"] = (os.path.getsize(path), stall, whole)
    benchmark.extra_info.update(environment(), bytes=os.path.getsize(path), training_thread_s=stall, whole_write_s=whole)


@functools.lru_cache(maxsize=None)
def flops_per_sample():
    from torch.utils.flop_counter import FlopCounterMode
    m = T.InversionNet()
    x = torch.randn(2, 5, 1000, 70)  # BatchNorm cannot train on one sample
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    return fc.get_total_flops() / 2


def compute_modes():
    """Name -> the training flags of each compute variant. `fast` is what --fast resolves to here; on CUDA
    `fast-fp16` is the same with fp16 and its GradScaler: eager runs on an H100 found fp16 1.31x faster than
    bf16, compiled the two came out level (bench/RESULTS.md), so --fast keeps bf16. The `-ema` rows add the weight
    EMA's update to the step (eager on CUDA, beside `fast-eager`, to save a compilation)."""
    if DEVICE.type == "cuda":
        return {"fp32": ["--no-tf32"], "tf32": [], "tf32-cl": ["--channels-last"], "bf16": ["--amp", "bf16"],
                "bf16-cl": ["--amp", "bf16", "--channels-last"], "fp16-cl": ["--amp", "fp16", "--channels-last"],
                "fast-eager": ["--fast", "--no-compile"], "fast-eager-ema": ["--fast", "--no-compile", "--ema-decay", "0.999"],
                "fast-fp16": ["--fast", "--amp", "fp16"], "fast": ["--fast"]}
    return {"fp32": [], "fp32-cl": ["--channels-last"], "bf16": ["--amp", "bf16"],
            "bf16-cl": ["--amp", "bf16", "--channels-last", "--no-fused-adam"],
            "bf16-cl-fused": ["--amp", "bf16", "--channels-last", "--fused-adam"],
            "compile": ["--fast", "--compile"], "fast-ema": ["--fast", "--ema-decay", "0.999"], "fast": ["--fast"]}


def compiles(mode):
    return bool(make_args(*compute_modes()[mode]).compile)


def compute_cases():
    """Every mode at every batch size, except that a compiled mode runs at the largest batch only: each new
    input shape costs a recompilation (30-60 s)."""
    return [(m, b) for m in compute_modes() for b in CFG["batches"] if b == CFG["batches"][-1] or not compiles(m)]


def assert_runs_as_named(run, mode):
    """A compute row times what its name says: the Run that times it has that precision (TF32 in the tf32
    rows only), layout, fused AdamW, weight EMA and compilation (--fast compiles on CUDA only)."""
    precision, flags = mode.split("-")[0], compute_modes()[mode]
    if precision in ("fp32", "tf32", "bf16", "fp16"):
        want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        assert run.amp_dtype == want and run.channels_last == ("-cl" in mode), (mode, run.amp_dtype, run.channels_last)
    if precision in ("fp32", "tf32") and DEVICE.type == "cuda":
        assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (precision == "tf32"), mode
    if "--fused-adam" in flags or "--no-fused-adam" in flags:
        assert bool(run.optimizer.defaults.get("fused")) == ("--fused-adam" in flags), mode
    assert (run.ema is not None) == mode.endswith("-ema"), mode
    compiled = mode == "compile" or (DEVICE.type == "cuda" and mode.startswith("fast") and "eager" not in mode)
    assert hasattr(run.model, "_orig_mod") == compiled, mode  # torch.compile's wrapper


@pytest.mark.parametrize("mode, batch", compute_cases(), ids=lambda v: str(v))
def test_compute_throughput(benchmark, mode, batch):
    """Training-step samples/s (forward, backward, AdamW) on inputs already on the device, through the
    script's own Run and train_step, for each precision / layout / compile variant."""
    if compiles(mode) and DEVICE.type == "cpu" and not COMPILE_ON_CPU:  # tests/ compile on the CPU once
        pytest.skip("torch.compile on CPU costs ~40 s of compilation; set BENCH_COMPILE=1 to include it")
    run = make_run(*compute_modes()[mode])
    assert_runs_as_named(run, mode)
    args = make_args(*compute_modes()[mode])
    # the step's input as a run with these flags gets it: the --loader gpu cache (--fast's) hands over its dtype
    x = torch.randn(batch, 5, 1000, 70, device=DEVICE, dtype=getattr(torch, args.cache_dtype) if args.loader == "gpu" else None)
    if run.channels_last:  # as device_batches hands batches to the step
        x = x.contiguous(memory_format=torch.channels_last)
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
    info = dict(environment(), mode=mode, flags=compute_modes()[mode], batch=batch, samples_per_s=sps, flops_per_sample=flops,
                achieved_tflops=tflops)
    for key, (peak, _) in PEAK_TFLOPS.items():
        if key in info["device"]:
            info["fraction_of_bf16_peak"] = tflops / peak
    benchmark.extra_info.update(info)
    assert 12e9 < flops < 13e9  # forward + backward: 12.49 GFLOP per sample (forward 4.19)


def e2e_cases():
    """The --fast step fed by each loader, and OpenFWI's own configuration: map-style dataset, normalisation
    in the workers, the most workers tried, fp32."""
    cases = {(kind, w, DEVICE.type == "cuda"): loader_flags(kind, w, DEVICE.type == "cuda")
             for kind, w, pin in loader_cases() if not pin}
    cases[("openfwi", max(CFG["workers"]), DEVICE.type == "cuda")] = [
        "--loader", "map", "--num-workers", str(max(CFG["workers"])), "--normalize", "workers", "--amp", "off",
        "--no-channels-last", "--no-compile"]
    return cases


class RecordingMonitor(T.Monitor):
    """The script's log step, keeping the figures it would send to TensorBoard at its last log step."""

    def scalars(self, prefix, values, step):
        self.last = values


@pytest.mark.parametrize("case", list(e2e_cases()), ids=lambda v: "-".join(map(str, v)))
def test_end_to_end(benchmark, random_dataset, case):
    """Samples/s of the script's own epoch loop (train_one_epoch: its step, log step and stop) fed by the real
    loader, and the data-wait share the script logs, over whole epochs: a round that stopped inside one would
    leave the workers' prefetched batches for the next round's start to wait for, timing them twice. (Without
    timing, as `bash run.sh test` runs it, two steps.)"""
    args = make_args(*e2e_cases()[case])
    # the loader flags do not change the Run: the --fast cases share one (compiled once on CUDA)
    run = make_run("--fast") if case[0] != "openfwi" else make_run(*e2e_cases()[case])
    loader = make_loader(random_dataset, args)
    limit = len(loader) if benchmark.enabled else 2
    monitor, waits = RecordingMonitor(log_every=10**9), []

    def run_epoch():
        run.batch_in_epoch = 0
        T.train_one_epoch(run, loader, monitor, T.Stop(max_steps=run.step + limit))
        sync()
        waits.append(monitor.last["data_wait"])
        return monitor.samples  # the iterable loader's last batch of a shard can be short

    t0 = time.perf_counter()
    n = benchmark.pedantic(run_epoch, rounds=CFG["rounds"], warmup_rounds=1 if benchmark.enabled else 0)
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    sps = n / secs
    wait = sorted(waits)[len(waits) // 2]
    RESULTS["e2e"][case] = (sps, wait)
    benchmark.extra_info.update(environment(), loader=case[0], workers=case[1], flags=e2e_cases()[case], samples_per_s=sps,
                                data_wait_share=wait)
    assert n == limit * LOADER_BATCH or (case[0] == "iterable" and 0 < n <= limit * LOADER_BATCH)


@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_whole_run(benchmark, random_dataset, tmp_path, mode):
    """Wall-clock of a short real run of the script, start-up, loading and validation included: its
    defaults against --fast, on the same files."""
    lists = []
    for name, part in (("train", random_dataset[:-1]), ("val", random_dataset[-1:])):
        (tmp_path / f"{name}.txt").write_text("".join(f"{d}\t{m}\n" for d, m in part))
        lists += [f"--{name}-list", str(tmp_path / f"{name}.txt")]
    steps = ["--epochs", str(CFG["whole_epochs"])] if benchmark.enabled else ["--epochs", "1", "--max-steps", "2"]
    argv = [sys.executable, os.path.join(ROOT, "train_inversionnet.py"), *lists, *steps, "--batch-size", str(LOADER_BATCH),
            "--dataset", "flatvel-a", "--no-progress", "--no-tensorboard", *(["--fast"] if mode == "fast" else [])]

    def whole_run():
        out = tempfile.mkdtemp(dir=tmp_path)
        r = subprocess.run([*argv, "--output-dir", out], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    t0 = time.perf_counter()
    stdout = benchmark.pedantic(whole_run, rounds=1, warmup_rounds=0)
    secs = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    RESULTS["whole"][mode] = secs
    RESULTS["whole_size"] = (f"{CFG['whole_epochs']} epochs of {len(random_dataset[:-1]) * CFG['per_file']} samples"
                             if benchmark.enabled else f"2 steps of batch {LOADER_BATCH}")
    speed = [line for line in stdout.splitlines() if line.startswith("speed:")]
    assert len(speed) == 1 and speed[0].split("; ")[1].startswith("--fast for" if mode == "fast" else "defaults"), speed
    benchmark.extra_info.update(environment(), mode=mode, seconds=secs, argv=argv[1:], speed=speed)


def deepwave_runs(v, nt):
    """deepwave.scalar with OpenFWI's geometry (20-cell PML, nt + 1 steps; its traces are ours negated): one call per
    sample, and one call for every shot of the batch; {} when deepwave is not installed."""
    if importlib.util.find_spec("deepwave") is None:
        return {}
    import deepwave
    amp = torch.from_numpy(S.ricker(nt + 1)).float()[None, None].repeat(5, 1, 1).to(DEVICE)
    src = torch.zeros(5, 1, 2, dtype=torch.long, device=DEVICE)
    src[..., 0] = 1
    src[:, 0, 1] = torch.tensor(S.SRC_COLS)
    rec = torch.zeros(5, 70, 2, dtype=torch.long, device=DEVICE)
    rec[..., 0] = 1
    rec[..., 1] = torch.arange(70)
    kw = dict(pml_width=20, pml_freq=15, max_vel=4500, courant_number=0.65)
    n = len(v)

    def per_sample():
        for b in range(n):
            deepwave.scalar(v[b], S.DX, S.DT, source_amplitudes=amp, source_locations=src, receiver_locations=rec, **kw)

    def batched():
        deepwave.scalar(v.repeat_interleave(5, 0), S.DX, S.DT, source_amplitudes=amp.repeat(n, 1, 1),
                        source_locations=src.repeat(n, 1, 1), receiver_locations=rec.repeat(n, 1, 1), **kw)
    return {"deepwave per sample": (n, per_sample), "deepwave batched": (n, batched)}


def test_simulator_throughput(benchmark):
    """simulate_openfwi samples/s at its default batch, its PyTorch loop (the fallback on either device)
    and deepwave when installed, in one process: the candidates take turns each round, median of the rounds."""
    import numpy as np
    batch = S.default_batch(DEVICE)
    v = torch.from_numpy(S.flatvel(np.random.default_rng(0), batch)).to(DEVICE)
    nt = 1000 if benchmark.enabled else 100
    cands = {"ours": (batch, lambda: S.simulate(v, nt=nt))}
    loop_n = 2 if DEVICE.type == "cpu" else batch  # the loop is ~10x slower on CPU: 2 samples make the figure
    cands["ours, PyTorch loop"] = (loop_n, lambda: S.simulate(v[:loop_n], nt=nt, engine="torch"))
    if benchmark.enabled:
        cands.update(deepwave_runs(v[:8] if DEVICE.type == "cpu" else v, nt))
    S.simulate(v[:1], nt=10)  # builds the CPU kernel, or compiles the Triton kernels, outside the timed region
    times, outputs = {name: [] for name in cands}, {}

    def rounds():
        for _ in range(CFG["rounds"] if benchmark.enabled else 1):
            for name, (_, fn) in cands.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                sync()
                times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(rounds, rounds=1, warmup_rounds=0)
    ours, loop = outputs["ours"][:loop_n], outputs["ours, PyTorch loop"]  # the engines timed compute the same traces
    assert torch.linalg.vector_norm(ours - loop) <= 1e-4 * torch.linalg.vector_norm(loop)
    for name, (n, _) in cands.items():
        RESULTS["sim"][name] = n / statistics.median(times[name]) * nt / 1000
    info = dict(environment(), batch=batch, nt=nt, rounds=len(times["ours"]), samples_per_s=dict(RESULTS["sim"]))
    best_deepwave = max((RESULTS["sim"][k] for k in RESULTS["sim"] if k.startswith("deepwave")), default=None)
    if best_deepwave:
        info["ratio_to_deepwave"] = RESULTS["sim"]["ours"] / best_deepwave
    for key, (_, hbm) in PEAK_TFLOPS.items():
        if key in info["device"]:  # each step reads u, u_old and v^2 and writes u_old: 16 bytes per cell at least
            cells = (S.N_GRID + 2 * S.PML_WIDTH) ** 2  # the grid with the default PML
            info["fraction_of_hbm_bound"] = RESULTS["sim"]["ours"] * len(S.SRC_COLS) * S.NT * cells * 16 / hbm
    benchmark.extra_info.update(info)


def test_profiler_trace(benchmark, tmp_path):
    """A torch.profiler trace of training steps, as --profile takes it, for the torch-tb-profiler plugin."""
    out = os.environ.get("BENCH_TRACE_DIR") or str(tmp_path)
    run = make_run()
    x = torch.randn(2, 5, 1000, 70, device=DEVICE)
    y = torch.rand(2, 1, 70, 70, device=DEVICE)

    def trace():
        with T.make_profiler(out, DEVICE) as prof:
            for _ in range(5):  # the schedule's skipped, warm-up and three traced steps
                T.train_step(run, x, y)
                prof.step()

    before = set(os.listdir(out)) if os.path.isdir(out) else set()  # BENCH_TRACE_DIR may hold earlier traces
    benchmark.pedantic(trace, rounds=1, warmup_rounds=0)
    assert [f for f in set(os.listdir(out)) - before if ".pt.trace.json" in f]
    benchmark.extra_info.update(environment(), trace_dir=out)


def test_report_reads_a_slower_run_as_slower_and_prints_end_to_end_lines_without_the_loader_table():
    """The end-of-run report (a plain test: --benchmark-only skips it, `bash run.sh test` runs it)."""
    import conftest as C
    assert (C.speedup(2.0), C.speedup(0.25)) == ("2.00x faster", "4.00x slower")
    cuda = DEVICE.type == "cuda"
    fast = {("fast", LOADER_BATCH): 1000.0}
    e2e = {("gpu", 0, cuda): (900.0, 0.01), ("openfwi", 4, cuda): (100.0, 0.8)}
    assert C.loader_lines({}, e2e, fast) == [
        "--fast end to end (device cache): 900.0 samples/s = 90% of its compute-only 1000.0",
        "OpenFWI-style (map, 4 workers normalising, fp32): 100.0 samples/s, data wait 80%; --fast with the device cache: "
        "900.0 samples/s, wait 1%: 9.00x"]
    assert C.loader_lines({}, {}, fast) == []
    assert C.loader_lines({("map", 0, False): (2000.0, 1.0)}, {}, {}) == [  # -k left the compute cases out
        f"loader and end-to-end figures are judged against the --fast compute case at batch {LOADER_BATCH}, which did "
        f"not run: add it to -k (\"... or (compute_throughput and fast)\")"]
    table = C.loader_lines({("map", 0, False): (2000.0, 1.0)}, {}, fast)
    assert table[-1] == ("recommendation: --loader map --num-workers 0 keeps the device fed (fewest workers with loader >= "
                         "1.1x compute)")
    several = {("map", 0, False): (500.0, 1.0), ("map", 4, False): (3000.0, 1.0), ("map", 2, False): (1500.0, 1.0)}
    assert C.loader_lines(several, {}, fast)[-1].startswith("recommendation: --loader map --num-workers 2 keeps")
    assert C.loader_lines({("map", 2, False): (900.0, 1.0)}, {}, fast)[-1] == (
        "recommendation: every loader is input-bound here; use --loader gpu if the split fits in device memory")


def test_a_bench_switch_set_to_what_it_cannot_be_stops_the_run_in_one_line():
    """A typo (BENCH_SCALE=GPU) once measured the small configuration under the name asked for."""
    env = {**os.environ, "BENCH_SCALE": "GPU", "BENCH_COMPILE": "yes"}
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout, r.stderr.strip()) == (
        4, "", "ERROR: BENCH_SCALE must be small or gpu, got 'GPU'; BENCH_COMPILE must be 0 or 1, got 'yes'"), r.stderr


def test_a_run_stopped_inside_a_benchmark_keeps_the_figures_measured_before(tmp_path):
    """Ctrl-C (or a time limit's SIGINT) in the middle of a long GPU bench run once ended in a traceback from
    pytest-benchmark's JSON writer and no figures at all. Here the second benchmark is stopped at its first epoch."""
    (tmp_path / "stop_second_benchmark.py").write_text(
        "import train_inversionnet as T\n"
        "calls, device_batches = [0], T.device_batches\n"
        "def stopping(*a, **k):  # the device cache case takes 3 epochs (1 warm-up, 2 rounds); the 4th is the next case's\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 4:\n"
        "        raise KeyboardInterrupt\n"
        "    return device_batches(*a, **k)\n"
        "T.device_batches = stopping\n")
    env = {**os.environ, "BENCH_SCALE": "small", "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    report = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-p", "no:cacheprovider", "-p",
                        "stop_second_benchmark", "-k", "loader_throughput and (gpu or map-0)", "--benchmark-json", str(report)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "KeyboardInterrupt" in r.stdout and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "InversionNet: where the time goes" in r.stdout and "test_loader_throughput[gpu-0-False] " in r.stdout, r.stdout
    saved = json.loads(report.read_text())["benchmarks"]
    assert [b["name"] for b in saved] == ["test_loader_throughput[gpu-0-False]"] and saved[0]["extra_info"]["samples_per_s"] > 0
