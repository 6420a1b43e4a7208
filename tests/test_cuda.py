"""What CUDA exercises: mixed precision and its GradScaler, channels-last kernels, torch.compile, the
device cache, pinned memory and the side-stream prefetch, DataParallel, NCCL with SyncBatchNorm, the
whole CLI on a GPU, and the simulator's CUDA path. Skipped where no CUDA device is visible, but for the
tests of what the CPU's --fast path uses as well (channels-last, the device cache), which run on both.

Tiny data throughout (a few samples, batches of 2-4); one test compiles."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import eval_inversionnet as E
import simulate_openfwi as so
import train_inversionnet as T
from helpers import TRAIN, layered_maps, resolved_args, run_script, sample_ids, write_ids_dataset, write_split_list

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = torch.device("cuda")
BOTH = pytest.mark.parametrize("device", [torch.device("cpu"), pytest.param(DEVICE, marks=needs_cuda)], ids=str)
NORM = T.Normalizer(-30, 60)  # covers write_ids_dataset's N(0, 5) shot gathers


def new_run(*flags, seed=0, device=DEVICE):
    """(Run, parallel mode) built by the script from FLAGS for DEVICE, constant learning rate, weights from SEED."""
    args = resolved_args(device, "--lr-scheduler", "none", *flags)
    torch.manual_seed(seed)
    return T.build_run(args, device, iters_per_epoch=10)


def fixed_batch(n=4, channels_last=False, device=DEVICE):
    """One batch as device_batches delivers it: normalised shot gathers and velocity maps on DEVICE."""
    g = torch.Generator().manual_seed(0)
    x = NORM.data(torch.randn(n, *T.DATA_SHAPE, generator=g) * 5).to(device)
    y = NORM.label(torch.rand(n, *T.LABEL_SHAPE, generator=g) * 3000 + 1500).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def finite_weights(run):
    return all(torch.isfinite(p).all() for p in run.raw_model.parameters())


def stored(pairs):
    """Every sample of the files in PAIRS, as the arrays hold them: (shot gathers, velocity maps)."""
    return tuple(torch.from_numpy(np.concatenate([np.load(pair[k]) for pair in pairs])) for k in (0, 1))


@pytest.fixture
def no_tf32(monkeypatch):
    """Full float32 convolutions and matmuls for the test; the settings before it come back after it
    (train_inversionnet's main() sets TF32 and cudnn.benchmark process-wide)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)


# ---- compute: precision, layout, compile, DataParallel ----

@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_lower_the_loss_and_match_the_fp32_forward(amp):
    """--amp bf16/fp16 with --channels-last trains (fp16 through its GradScaler, bf16 without one), keeps the
    weights finite, and its forward pass gives what float32 gives with the same weights."""
    run, _ = new_run("--amp", amp, "--channels-last", "--lr", "1e-3", "--weight-decay", "0")
    assert run.amp_dtype == T.AMP_DTYPES[amp] and run.scaler.is_enabled() == (amp == "fp16")
    x, y = fixed_batch(channels_last=True)
    seen = []
    hook = run.raw_model.convblock1.layers[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    # 10 steps: fp16's GradScaler starts at 2^16 and skips the first steps whose scaled gradients overflow
    losses = [T.train_step(run, x, y).item() for _ in range(10)]
    hook.remove()
    assert set(seen) == {run.amp_dtype}  # the step's convolutions ran in the autocast dtype
    assert run.step == 10 and all(math.isfinite(v) for v in losses) and finite_weights(run)
    assert losses[-1] < 0.9 * losses[0], losses
    with torch.no_grad():  # train mode: batch statistics, as the loss saw them
        full = run.model(x)
        mixed = T.forward(run.model, x, run.amp_dtype)
    assert mixed.dtype == run.amp_dtype and full.dtype == torch.float32
    assert full.std() > 0.05  # outputs spread over the tanh range, so the comparison means something
    assert (mixed.float() - full).abs().mean() < 1e-2


@BOTH
def test_channels_last_gives_the_contiguous_numbers_in_fp32(no_tf32, device):
    """Channels-last changes the kernels, not the numbers: the same weights and batch give the same forward
    pass, loss and gradients in float32."""
    plain, _ = new_run("--amp", "off", "--no-channels-last", device=device)
    cl, _ = new_run("--amp", "off", "--channels-last", device=device)
    assert cl.raw_model.convblock5_1.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = fixed_batch(device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        diff = (cl.model(x_cl) - plain.model(x)).abs()
    assert diff.mean() < 1e-4 and diff.max() < 1e-3  # float32 sums in another order, through 26 layers
    loss_plain, loss_cl = T.train_step(plain, x, y), T.train_step(cl, x_cl, y)
    assert loss_cl.item() == pytest.approx(loss_plain.item(), rel=1e-4)
    g_plain = torch.cat([p.grad.flatten() for p in plain.raw_model.parameters()])
    g_cl = torch.cat([p.grad.flatten() for p in cl.raw_model.parameters()])
    # rounding moves a few activations across LeakyReLU's kink (slope 1 vs 0.2): the gradients agree to
    # about 1e-2 (7e-3 on a CPU), where a layout mix-up would differ by order 1
    assert ((g_cl - g_plain).norm() / g_plain.norm()).item() < 5e-2


@needs_cuda
@pytest.mark.slow
def test_compiled_run_matches_eager_and_trains():
    """--compile (with bf16 and channels-last, as --fast picks on CUDA) computes the eager loss from the same
    weights and batch, trains, and keeps its parameters those of the saved, unprefixed raw model."""
    flags = ("--amp", "bf16", "--channels-last", "--lr", "1e-3", "--weight-decay", "0")
    eager, _ = new_run(*flags)
    compiled, _ = new_run(*flags, "--compile")
    assert compiled.model._orig_mod is compiled.raw_model
    for (k, a), b in zip(eager.raw_model.state_dict().items(), compiled.raw_model.state_dict().values()):
        assert torch.equal(a, b), k
    x, y = fixed_batch(channels_last=True)
    eager_loss = T.train_step(eager, x, y).item()
    losses = [T.train_step(compiled, x, y).item() for _ in range(5)]
    assert losses[0] == pytest.approx(eager_loss, rel=2e-2)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0], losses
    assert finite_weights(compiled)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in compiled.raw_model.state_dict())


@needs_cuda
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_data_parallel_trains_and_saves_unprefixed_names(amp):
    """--parallel dp wraps the model in nn.DataParallel, trains through it, computes what the bare model
    computes (its replica threads in the run's AMP dtype, not the thread default fp16), and the model that is
    saved has OpenFWI's unprefixed names. The batch gives each GPU DataParallel sees two samples (BatchNorm
    cannot train on one)."""
    run, parallel = new_run("--parallel", "dp", "--amp", amp, "--lr", "1e-3")
    assert parallel == "dp" and isinstance(run.model, nn.DataParallel) and run.model.module.module is run.raw_model
    x, y = fixed_batch(n=2 * max(2, torch.cuda.device_count()))
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    losses = [T.train_step(run, x, y).item() for _ in range(2)]
    assert run.step == 2 and all(math.isfinite(v) for v in losses) and finite_weights(run)
    assert any(not torch.equal(a, p) for a, p in zip(before, run.raw_model.parameters()))
    keys = list(run.raw_model.state_dict())
    assert len(keys) == 175 and not any(k.startswith("module.") for k in keys)
    assert all(k.startswith("module.") for k in run.model.state_dict())  # only the wrapper's names carry it
    run.model.eval()
    with torch.no_grad():
        wrapped, bare = T.forward(run.model, x, run.amp_dtype), T.forward(run.raw_model, x, run.amp_dtype)
    assert wrapped.dtype == bare.dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
    torch.testing.assert_close(wrapped, bare)


# ---- data on the device ----

@BOTH
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_device_cache_holds_the_normalised_split_in_its_dtype(tmp_path, dtype, device):
    """--loader gpu: the split sits on the device, normalised, the data in --cache-dtype, equal to the float32 CPU
    normalisation within that dtype's precision, the labels in float32 exactly; an epoch is len(loader) batches
    of distinct samples."""
    pairs = write_ids_dataset(tmp_path, (5, 4))
    loader = T.build_loader(T.LoaderConfig(kind="gpu", batch_size=2, cache_dtype=dtype, seed=1), pairs, [5, 4], NORM, device)
    want = getattr(torch, dtype)
    assert isinstance(loader, T.DeviceLoader) and loader.normalized
    assert loader.x.dtype == want and loader.y.dtype == torch.float32
    assert loader.x.device.type == loader.y.device.type == device.type
    x_raw, y_raw = stored(pairs)
    x_ref, y_ref = NORM.data(x_raw), NORM.label(y_raw)
    tol = dict(rtol=max(torch.finfo(want).eps, 1e-5), atol=1e-5)  # one unit in the last place of the cache dtype
    torch.testing.assert_close(loader.x.float().cpu(), x_ref, **tol)
    torch.testing.assert_close(loader.y.cpu(), y_ref, rtol=1e-6, atol=1e-6)  # float32: rounding only
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(T.device_batches(loader, device, NORM))
        assert len(batches) == len(loader) == 4  # 9 samples in batches of 2, the last partial batch dropped
        ids = []
        for x, y in batches:
            assert x.shape == (2, *T.DATA_SHAPE) and x.device.type == device.type and x.dtype == want
            batch_ids = sample_ids(x, NORM)
            torch.testing.assert_close(x.float().cpu(), x_ref[batch_ids], **tol)
            torch.testing.assert_close(y.cpu(), y_ref[batch_ids], rtol=1e-6, atol=1e-6)  # float32: rounding only
            ids += batch_ids
        assert len(set(ids)) == 8 and set(ids) <= set(range(9))
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled per epoch


@needs_cuda
@pytest.mark.parametrize("workers", [0, 1], ids=["reader-threads", "worker"])
@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
def test_map_loader_batches_reach_the_device_as_on_the_cpu(tmp_path, pin, workers):
    """A map loader with a worker or with reader threads, pinned or not, fed through device_batches (copy and
    normalisation on a side stream, one batch ahead) gives the batches the same loader gives on the CPU: same
    samples, same order, same values."""
    pairs = write_ids_dataset(tmp_path, (5, 4))
    cfg = T.LoaderConfig(kind="map", batch_size=2, num_workers=workers, pin_memory=pin, seed=2)

    def epoch(device):
        loader = T.build_loader(cfg, pairs, [5, 4], NORM, device)
        loader.set_epoch(1)
        return loader, [(x.device.type, x.cpu(), y.cpu()) for x, y in T.device_batches(loader, device, NORM)]

    loader, on_device = epoch(DEVICE)
    assert loader.loader.pin_memory is pin and not loader.normalized
    assert all(x.is_pinned() == y.is_pinned() == pin for x, y in loader)  # handed over pinned, or not at all
    _, on_cpu = epoch(torch.device("cpu"))
    assert len(on_device) == len(on_cpu) == len(loader) == 4
    x_raw, y_raw = stored(pairs)
    ids = []
    for (where, x, y), (_, x_cpu, y_cpu) in zip(on_device, on_cpu):
        batch_ids = sample_ids(x, NORM)
        assert where == DEVICE.type and batch_ids == sample_ids(x_cpu, NORM)
        torch.testing.assert_close(x, x_cpu, rtol=1e-6, atol=2e-6)  # float32 log1p on two devices
        torch.testing.assert_close(y, y_cpu, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x_cpu, NORM.data(x_raw[batch_ids]))  # and both are the stored samples, normalised
        torch.testing.assert_close(y_cpu, NORM.label(y_raw[batch_ids]))
        ids += batch_ids
    assert len(set(ids)) == 8


# ---- the scripts on CUDA ----

@needs_cuda
def test_metrics_on_cuda_equal_the_cpu_ones_with_tf32_allowed(monkeypatch):
    """cuDNN may compute float32 convolutions in TF32 by default (and training allows it): SSIM on layered maps,
    whose local variances cancel, must not change on the GPU."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    truth = torch.from_numpy(layered_maps(8))
    pred = (truth + 0.01 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    on_gpu = T.per_sample_metrics(pred.to(DEVICE), truth.to(DEVICE)).cpu()
    torch.testing.assert_close(on_gpu, T.per_sample_metrics(pred, truth), rtol=0, atol=1e-6)


@needs_cuda
@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_on_cuda(tmp_path, capsys, no_tf32):
    """The training CLI with --fast (compile left to the test above) trains on the GPU, writes best.pt and
    last.pt, resumes with --resume auto at the next epoch, and eval on the GPU gives the CPU's metrics."""
    root = tmp_path / "d"
    pairs = write_ids_dataset(root, (4, 4, 4))
    lists = ["--train-list", str(write_split_list(root / "train.txt", pairs[:2])),
             "--val-list", str(write_split_list(root / "val.txt", pairs[2:]))]
    out = tmp_path / "run"
    argv = [*lists, "--output-dir", str(out), "--device", DEVICE.type, "--fast", "--no-compile", "--no-tf32", "--batch-size", "2",
            "--parallel", "none", "--num-workers", "0", "--no-progress", "--no-tensorboard", "--dataset", "flatvel-a"]
    assert T.cli([*argv, "--epochs", "2"]) == 0
    log = capsys.readouterr().out
    assert f"parameters on {DEVICE.type}:0 (none, " in log and "world 1)" in log  # one GPU, also where there are several
    assert (out / "best.pt").exists()
    ck = torch.load(out / "last.pt", weights_only=False)
    fast = T.fast_compute(DEVICE)
    assert (ck["epoch"], ck["step"]) == (2, 8)  # 8 training samples in batches of 2
    assert {k: ck["args"][k] for k in ("amp", "channels_last", "compile", "loader")} == dict(
        amp=fast["amp"], channels_last=True, compile=False, loader="gpu")
    assert T.cli([*argv, "--epochs", "3", "--resume", "auto"]) == 0
    assert f"resuming from {out / 'last.pt'}: step 8, continuing at the start of epoch 2" in capsys.readouterr().out
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (3, 12)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    metrics = {}
    for name, device, amp in (("trained", DEVICE.type, "auto"), ("gpu", DEVICE.type, "off"), ("cpu", "cpu", "off")):
        assert E.cli(["--checkpoint", str(out / "best.pt"), "--output-dir", str(tmp_path / name), "--device", device,
                      "--amp", amp, "--num-workers", "0", "--no-progress", "--vis", "0"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    trained = metrics["trained"]  # --amp auto: the precision best.pt was trained in
    assert trained["samples"] == 4 and trained["forward"] == {
        "amp": str(T.AMP_DTYPES[fast["amp"]] or "float32").replace("torch.", ""), "channels_last": True, "ssim": "float64"}
    gpu, cpu = metrics["gpu"]["model"], metrics["cpu"]["model"]
    for k in ("mae", "ssim"):
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-3), k


@needs_cuda
def test_export_on_cuda_traces_there_and_gives_the_models_outputs(tmp_path, capsys):
    """--device cuda traces the program on the GPU (under CUDA autocast with --amp bf16): fed CUDA inputs, it
    gives eval's forward pass; --device auto still exports for the CPU, which loads anywhere."""
    torch.manual_seed(0)
    model = T.InversionNet()
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict()}, ck)
    base = ["--checkpoint", str(ck), "--dataset", "flatvel-a"]
    assert E.cli([*base, "--export", str(tmp_path / "cuda.pt2"), "--device", "cuda", "--amp", "bf16"]) == 0
    assert E.cli([*base, "--export", str(tmp_path / "auto.pt2")]) == 0
    out = capsys.readouterr().out
    assert "(bfloat16 autocast on cuda)" in out and "(float32 on cpu)" in out
    model = model.to(DEVICE).eval()
    x = torch.randn(3, *T.DATA_SHAPE, device=DEVICE)
    with torch.no_grad():
        expected = T.forward(model, x, torch.bfloat16).float()
        got = torch.export.load(str(tmp_path / "cuda.pt2")).module()(x)
        on_cpu = torch.export.load(str(tmp_path / "auto.pt2")).module()(x.cpu())
        assert got.device.type == "cuda" and torch.equal(got, expected)
        torch.testing.assert_close(on_cpu, model.cpu()(x.cpu()), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.slow
def test_ddp_with_sync_bn_under_torchrun(tmp_path):
    """torchrun with one process: --parallel ddp --sync-bn initialises NCCL, trains through DDP with the
    BatchNorms converted to SyncBatchNorm, and saves a checkpoint that loads into a plain InversionNet. (With
    one process SyncBatchNorm uses the local batch statistics; their cross-GPU reduction needs two GPUs.)"""
    data = tmp_path / "d"
    write_ids_dataset(data, (4, 4, 4))  # the default split trains on 2 files: 8 samples, 4 steps of 2
    out = tmp_path / "run"
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--parallel", "ddp", "--sync-bn", "--device", DEVICE.type,
                   "--epochs", 1, "--batch-size", 2, "--num-workers", 0, "--no-progress", "--no-tensorboard",
                   "--log-every", 1, "--dataset", "flatvel-a", nproc=1, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"parameters on {DEVICE.type}:0 (ddp, world 1)" in r.stdout and "epoch 0 train loss" in r.stdout, r.stdout
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["world"], ck["epoch"], ck["step"]) == (1, 1, 4)
    T.InversionNet().load_state_dict(ck["model"])  # strict: SyncBatchNorm saved under BatchNorm's names, unprefixed


@pytest.mark.parametrize("velocity, kw", [
    ("flatvel", dict(nt=400)),
    ((2, 33, 21), dict(nt=300, pml_width=5, src_cols=(20, 3), src_row=32, rec_row=0)),
    ((1, 3, 40), dict(nt=300, pml_width=5, src_cols=(39, 0), src_row=1, rec_row=2)),  # strips clipped
], ids=["flatvel", "odd-grid", "clipped-strips"])
@needs_cuda
def test_simulator_on_cuda_matches_the_cpu(velocity, kw):
    """simulate() on a CUDA tensor (whatever engine it picks there) gives the traces of the reference PyTorch
    loop on the CPU, on the OpenFWI grid and on small odd grids where the absorbing strips are clipped."""
    if velocity == "flatvel":
        v = torch.from_numpy(so.flatvel(np.random.default_rng(0), 2))
    else:
        v = torch.from_numpy(np.random.default_rng(4).uniform(1500, 4500, velocity).astype(np.float32))
    on_device = so.simulate(v.to(DEVICE), **kw)
    on_cpu = so.simulate(v, engine="torch", **kw)  # no C++ kernel build; it agrees with the loop to ~1e-6
    shots = len(kw.get("src_cols", so.SRC_COLS))
    assert on_device.device.type == DEVICE.type and on_device.shape == on_cpu.shape == (len(v), shots, kw["nt"], v.shape[2])
    assert ((on_device.cpu() - on_cpu).norm() / on_cpu.norm()).item() <= 1e-4
