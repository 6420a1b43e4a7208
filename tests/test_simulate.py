"""Physics and file behaviour of simulate_openfwi.py, checked against independent expectations."""
import contextlib
import errno
import fcntl
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import simulate_openfwi as so
from helpers import SIMULATE, SignalledOnRelease, run_script, run_without_reader, start, wait_until, write_negative_shape_npy


def run_cli(*args):
    """simulate_openfwi.cli in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = so.cli(["--no-progress", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def peak_time(trace):
    """Sub-sample time of the largest sample, by a parabola through it and its neighbours."""
    k = int(np.argmax(trace))
    a, b, c = trace[k - 1], trace[k], trace[k + 1]
    return k + 0.5 * (a - c) / (a - 2 * b + c)


def test_ricker_matches_openfwi_convention():
    w = so.ricker()
    assert w.shape == (1000,)
    assert np.argmax(w) == 73 and w[73] == pytest.approx(1.0)
    assert np.flatnonzero(w).max() == 146 and np.all(w[147:] == 0)  # 2.2 / f long
    w = so.ricker(f=10.0)  # 220 samples long rounds up to 221, so the peak still falls on a sample
    assert np.argmax(w) == 110 and w[110] == pytest.approx(1.0) and np.flatnonzero(w).max() == 220


def test_shapes_dtype_and_openfwi_amplitude_range():
    v = torch.from_numpy(so.flatvel(np.random.default_rng(3), 2))
    d = so.simulate(v)
    assert d.shape == (2, 5, 1000, 70) and d.dtype == torch.float32
    # direct wave positive and dominant, as in the released FlatVel-A data ([-26.95, 52.77])
    assert 40 < d.max().item() < 60 and -35 < d.min().item() < -15
    # at the source the 2-D line-source response peaks just after the wavelet's 73 ms
    assert 73 <= peak_time(d[0, 2, :, 34].numpy()) <= 80


def test_writes_what_the_trainer_reads():
    """The simulator stands alone, so it keeps its own copy of the trainer's sample shapes and label range."""
    import train_inversionnet as T
    assert (so.DATA_SHAPE, so.MODEL_SHAPE) == (T.DATA_SHAPE, T.LABEL_SHAPE)
    assert (so.LABEL_MIN, so.LABEL_MAX) == (T.LABEL_MIN, T.LABEL_MAX)


def test_direct_wave_moveout_gives_top_layer_velocity():
    v = torch.full((1, 70, 70), 2400.0)
    v[:, 50:] = 3800.0  # deep interface, its reflection arrives after the picked window
    d = so.simulate(v, nt=450, src_cols=(0,))[0, 0].numpy()
    offsets = np.arange(20, 50)
    times = np.array([peak_time(d[:, x]) for x in offsets]) * so.DT
    slope = np.polyfit(offsets * so.DX, times, 1)[0]
    assert abs(1.0 / slope - 2400.0) / 2400.0 < 0.01


def test_reflection_arrives_at_two_way_time():
    # interface between rows 29 and 30 (depth 295 m); source and receiver at 10 m depth
    two_way_path = 2 * (295.0 - 10.0)  # 570 m = the direct path to the receiver 57 cells away
    homog = torch.full((1, 70, 70), 2000.0)
    layered = homog.clone()
    layered[:, 30:] = 4000.0
    both = so.simulate(torch.cat([homog, layered]), nt=450, src_cols=(0,))[:, 0].numpy()
    reflection = both[1][:, 0] - both[0][:, 0]  # zero offset, direct wave removed
    t_reflection = peak_time(reflection)
    # the same 2-D pulse after the same path length, measured on the direct wave
    t_direct_same_path = peak_time(both[0][:, int(two_way_path / so.DX)])
    expected = two_way_path / 2000.0 / so.DT + 73
    assert abs(t_reflection - t_direct_same_path) < 2
    assert abs(t_reflection - expected) < 6  # 2-D line-source pulses peak a few ms late


def boundary_error(v, src_cols=so.SRC_COLS, pml_width=so.PML_WIDTH):
    """Relative L2 of simulate(v)'s traces against those of the same maps in a grid 150 cells larger on every
    side, so far out that nothing comes back from its edges within 1 s."""
    pad = 150
    big = F.pad(v[:, None], (pad,) * 4, mode="replicate")[:, 0]
    ref = so.simulate(big, src_cols=tuple(pad + c for c in src_cols), src_row=pad + 1, rec_row=pad + 1)[..., pad:pad + 70]
    return ((so.simulate(v, src_cols=src_cols, pml_width=pml_width) - ref).norm() / ref.norm()).item()


def test_boundary_reflections_below_a_tenth_of_a_percent():
    """The 12-cell C-PML on a two-layer map, one shot: 0.037 % relative L2 when measured; the bar sits at
    0.1 %, and a 1-cell PML must miss it."""
    v = torch.full((1, 70, 70), 2000.0)
    v[:, 40:] = 3500.0
    assert boundary_error(v, src_cols=(17,)) < 1e-3
    assert boundary_error(v, src_cols=(17,), pml_width=1) > 1e-3  # no real absorber: must fail the same bar


@pytest.mark.parametrize("family", sorted(so.FAMILIES))
def test_boundary_error_on_a_map_of_each_family_stays_under_0_15_percent(family):
    """Measured on 4 maps of each family, all five shots: 0.07-0.13 %; at --pml-width 8, the CLI's floor,
    0.38-0.49 % (bench/RESULTS.md)."""
    assert boundary_error(torch.from_numpy(so.FAMILIES[family](np.random.default_rng(1), 1))) < 1.5e-3


def test_stable_at_max_velocity():
    d = so.simulate(torch.full((1, 70, 70), 4500.0))
    assert torch.isfinite(d).all()
    late, early = d[..., 800:, :].abs().max(), d[..., :200, :].abs().max()
    assert late < 0.05 * early  # energy leaves through the PML, nothing grows


@pytest.mark.parametrize("bad, match", [
    (torch.full((1, 70, 70), 7000.0), "unstable"),
    (torch.full((1, 70, 70), 6200.0), r"unstable .* v < 6124 m/s"),  # just past the limit at dx 10 m, dt 1 ms
    (torch.full((1, 70, 70), -10.0), "positive"),
    (torch.full((1, 70, 70), 0.0), "positive"),
    (torch.full((1, 70, 70), float("nan")), "NaN"),
    (torch.zeros(70, 70), "shape"),
])
def test_simulate_rejects_bad_velocity(bad, match):
    with pytest.raises(so.SimulationError, match=match):
        so.simulate(bad)


@pytest.mark.parametrize("width", [-1, -40, 2.5, float("nan"), True])
def test_simulate_rejects_a_pml_width_that_is_not_a_cell_count(width):
    with pytest.raises(so.SimulationError, match=rf"pml_width must be a whole number of cells >= 0, got {width}$"):
        so.simulate(torch.full((1, 70, 70), 2000.0), nt=10, pml_width=width)


@pytest.mark.parametrize("engine", ["auto", "torch"])
def test_simulate_gives_the_same_float32_traces_under_a_float64_default_dtype(engine):
    """The C++ kernel writes float32 through a raw pointer: a buffer of the default dtype would be half filled."""
    v = torch.from_numpy(np.random.default_rng(5).uniform(1500, 4500, (1, 30, 30)).astype(np.float32))
    kw = dict(nt=200, src_cols=(3, 20), engine=engine)
    want = so.simulate(v, **kw)
    torch.set_default_dtype(torch.float64)
    try:
        got = so.simulate(v, **kw)
    finally:
        torch.set_default_dtype(torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_independent_results():
    v = torch.from_numpy(so.curvefault(np.random.default_rng(1), 3))
    together = so.simulate(v)
    alone = so.simulate(v[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(so.FAMILIES))
def test_family_maps(family):
    maps = so.FAMILIES[family](np.random.default_rng(7), 16)
    assert maps.shape == (16, 70, 70) and maps.dtype == np.float32
    assert maps.min() >= 1500 and maps.max() <= 4500
    again = so.FAMILIES[family](np.random.default_rng(7), 16)
    assert np.array_equal(maps, again)
    laterally_constant = [np.all(m == m[:, :1]) for m in maps]
    if family == "flatvel":
        assert all(laterally_constant)
        n_layers = [len(np.unique(m[:, 0])) for m in maps]
        assert min(n_layers) >= 2 and max(n_layers) <= 5
        increasing = np.mean([np.all(np.diff(m[:, 0]) >= 0) for m in maps])
        assert increasing >= 0.5  # mostly increasing with depth
        many = so.flatvel(np.random.default_rng(7), 400)
        columns = many[:, :, 0]
        counts = [len(np.unique(c)) for c in columns]
        assert set(counts) == {2, 3, 4, 5}  # 2-5 layers, each drawn
        thickness = [np.diff(np.flatnonzero(np.diff(c))) for c in columns]  # rows between interfaces
        assert min(t.min() for t in thickness if len(t)) >= 4  # interfaces at least 4 cells apart
        swapped = np.mean([not np.all(np.diff(c) >= 0) for c, k in zip(columns, counts) if k >= 3])
        assert 0.15 < swapped < 0.35  # one adjacent pair swapped with probability 0.25
    else:
        assert sum(laterally_constant) <= 2


def test_curves_and_faults_span_their_documented_ranges():
    """curvevel's first sinusoid reaches amplitudes up to 8 cells (with the second, up to 11); a fault throws its
    hanging wall 4-15 cells."""
    peaks = [np.abs(so._curve(np.random.default_rng(i))).max() for i in range(300)]
    assert 8 < max(peaks) <= 11
    faults = [f for i in range(300) for f in so._faults(np.random.default_rng(i))]
    throws = [abs(f[3]) for f in faults]
    assert min(throws) >= 4 and 14 < max(throws) <= 15
    columns, dips = [f[0] for f in faults], [np.rad2deg(f[1]) for f in faults]
    assert 15 <= min(columns) < 17 and 53 < max(columns) <= 55  # through the top edge, away from the sides
    assert 45 <= min(dips) < 47 and 78 < max(dips) <= 80


REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "simulate_reference.npz")


@pytest.mark.parametrize("engine", ["auto", "torch"])  # auto: the C++ kernel on CPU, where it builds
def test_matches_stored_reference(engine):
    """Traces equal those stored from the simulator as of commit aa8a4ea (a flatfault and a curvevel
    map from default_rng(2024), all 5 shots, receivers at columns 0, 34 and 69, all 1000 samples):
    any change to the solver must keep them within 1e-5 relative L2."""
    ref = np.load(REFERENCE)
    traces = so.simulate(torch.from_numpy(ref["velocity"]), engine=engine)[..., ref["receiver_cols"]].numpy()
    for ours, stored in zip(traces, ref["traces"]):
        assert np.linalg.norm(ours - stored) / np.linalg.norm(stored) <= 1e-5


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
                    reason="no C++ compiler or no ninja")
def test_cpu_kernel_builds_where_there_is_a_compiler():
    assert so.cpu_kernel() is not None  # else every CPU run silently takes the slow PyTorch loop


def test_a_build_killed_outright_does_not_leave_the_next_run_waiting(tmp_path):
    """torch's build lock, left behind by a build killed with SIGKILL, would make every later run wait for
    ever: the next run clears it and loads the cached kernel. The build folder is copied, so nothing is rebuilt."""
    if so.cpu_kernel() is None:
        pytest.skip("no C++ kernel here")
    built = os.path.dirname(so.cpu_kernel().__file__)
    folder = tmp_path / "ext" / os.path.basename(built)
    shutil.copytree(built, folder)
    (folder / "lock").touch()
    so_file = next(folder.glob("*.so"))
    mtime = so_file.stat().st_mtime_ns
    r = run_script(SIMULATE, "--out", tmp_path / "o", "--files", 1, "--samples-per-file", 1,
                   "--device", "cpu", env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, timeout=120)
    # the kernel, not the PyTorch loop's fallback line; and no progress bar drawn into a pipe
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert not (folder / "lock").exists() and so_file.stat().st_mtime_ns == mtime  # cleared, and not rebuilt


def test_a_stale_build_lock_is_cleared_only_under_our_own_lock(tmp_path, monkeypatch):
    import fcntl

    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "lock").touch()
    with so.one_build_at_a_time(cpp_extension, "k"):
        assert not (tmp_path / "k" / "lock").exists()
    (tmp_path / "k" / "lock").touch()

    def no_locks(fh, op):  # a network file system without flock
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with so.one_build_at_a_time(cpp_extension, "k"):  # the build goes on, as torch alone runs it
        assert (tmp_path / "k" / "lock").exists()  # without our lock it could be a live build's: kept


@pytest.mark.parametrize("shape, pml, src_cols, src_row, rec_row", [
    ((2, 40, 90), 0, (0, 45, 89), 3, 7),
    ((1, 40, 90), 1, (10,), 0, 39),
    ((2, 33, 21), 5, (20, 3), 32, 0),
    ((1, 3, 40), 5, (39, 0), 1, 2),  # strips clipped to half the padded grid
    ((1, 70, 70), 30, (0, 69), 1, 1),
])
def test_kernel_equals_torch_loop(shape, pml, src_cols, src_row, rec_row):
    if so.cpu_kernel() is None:  # simulate() would take the loop itself and compare it with itself
        pytest.skip("no C++ kernel here")
    v = torch.from_numpy(np.random.default_rng(4).uniform(1500, 4500, shape).astype(np.float32))
    kw = dict(nt=300, pml_width=pml, src_cols=src_cols, src_row=src_row, rec_row=rec_row)
    loop = so.simulate(v, engine="torch", **kw)
    kernel = so.simulate(v, **kw)
    assert kernel.shape == loop.shape == (shape[0], len(src_cols), 300, shape[2])
    assert ((kernel - loop).norm() / loop.norm()).item() <= 1e-5


def test_without_compiler_falls_back_with_one_line(tmp_path):
    env = {"CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    r = run_script(SIMULATE, "--no-progress", "--out", tmp_path / "o", "--files", 1, "--samples-per-file", 1,
                   "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [f"simulate_openfwi: C++ kernel unavailable (no C++ compiler "
                                             f"{tmp_path / 'no-such-c++'}); using the slower PyTorch loop"]
    assert np.load(tmp_path / "o" / "data" / "data1.npy").shape == (1, 5, 1000, 70)


@pytest.mark.parametrize("stop", [so.Terminated, KeyboardInterrupt])
def test_a_stop_signal_during_the_kernel_build_stops_the_run(monkeypatch, capsys, stop):
    """A SIGTERM or Ctrl-C in the 10 s build is a stop, not a failed build to fall back from."""
    def build():
        raise stop
    monkeypatch.setattr(so, "_kernel", None)
    monkeypatch.setattr(so, "_build_kernel", build)
    with pytest.raises(stop):
        so.cpu_kernel()
    assert so._kernel is None and "unavailable" not in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("deepwave") is None, reason="deepwave is not installed")
def test_agrees_with_deepwave():
    import deepwave
    v = torch.from_numpy(so.flatfault(np.random.default_rng(5), 1))
    ours = so.simulate(v)[0]
    amp = torch.from_numpy(so.ricker(so.NT + 1)).float()[None, None].repeat(5, 1, 1)
    src = torch.zeros(5, 1, 2, dtype=torch.long)
    src[..., 0] = 1
    src[:, 0, 1] = torch.tensor(so.SRC_COLS)
    rec = torch.zeros(5, 70, 2, dtype=torch.long)
    rec[..., 0] = 1
    rec[..., 1] = torch.arange(70)
    out = deepwave.scalar(v[0], so.DX, so.DT, source_amplitudes=amp, source_locations=src,
                          receiver_locations=rec, pml_width=20, pml_freq=15, max_vel=4500,
                          courant_number=0.65)[-1]
    theirs = -out[..., 1:].transpose(1, 2)  # OpenFWI sign, one sample earlier
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.01


def test_cli_writes_openfwi_layout_and_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_script(SIMULATE, "--no-progress", "--out", a, "--files", "2", "--samples-per-file", "2", "--seed", "11")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # the whole process path, once
    code, _, err = run_cli("--out", b, "--files", "2", "--samples-per-file", "2", "--seed", "11")
    assert code == 0, err
    for i in (1, 2):
        d, m = np.load(a / "data" / f"data{i}.npy"), np.load(a / "model" / f"model{i}.npy")
        assert d.shape == (2, 5, 1000, 70) and m.shape == (2, 1, 70, 70)
        assert d.dtype == np.float32 and m.dtype == np.float32
        assert (a / "data" / f"data{i}.npy").read_bytes() == (b / "data" / f"data{i}.npy").read_bytes()
    train = (a / "train.txt").read_text().splitlines()
    val = (a / "val.txt").read_text().splitlines()
    assert train == ["data/data1.npy\tmodel/model1.npy"] and val == ["data/data2.npy\tmodel/model2.npy"]
    import train_inversionnet as T
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)  # relative to their folder, the lists name the files wherever the set goes
    assert T.read_split_list(moved / "val.txt") == [(str(moved / "data" / "data2.npy"), str(moved / "model" / "model2.npy"))]
    meta = json.loads((a / "dataset.json").read_text())
    every = np.concatenate([np.load(a / "data" / f"data{i}.npy").ravel() for i in (1, 2)])
    assert meta["data_min"] == pytest.approx(float(every.min())) and meta["data_max"] == pytest.approx(float(every.max()))
    assert meta["label_min"] == 1500 and meta["label_max"] == 4500 and meta["nt"] == 1000
    assert (meta["seed"], meta["family"], meta["files"], meta["samples_per_file"]) == (11, "flatvel", 2, 2)
    assert not list(a.rglob("*.tmp-*"))
    # the extremes come from every file, whichever holds them: file 1 scaled past file 2's, and re-run
    np.save(b / "data" / "data1.npy", np.load(b / "data" / "data1.npy") * 10)
    assert run_cli("--out", b, "--files", "2", "--samples-per-file", "2", "--seed", "11")[0] == 0
    first = np.load(b / "data" / "data1.npy")
    meta = json.loads((b / "dataset.json").read_text())
    assert (meta["data_min"], meta["data_max"]) == pytest.approx((float(first.min()), float(first.max())))


def test_cli_simulates_with_the_pml_width_it_is_given(tmp_path):
    """--pml-width reaches the solver: the file's traces are simulate() of its own velocity maps at that
    width, which differ from the default width's (and dataset.json records the width)."""
    code, _, err = run_cli("--out", tmp_path, "--files", "1", "--samples-per-file", "1", "--pml-width", "8")
    assert code == 0, err
    data = np.load(tmp_path / "data" / "data1.npy")
    v = torch.from_numpy(np.load(tmp_path / "model" / "model1.npy")[:, 0])
    np.testing.assert_array_equal(data, so.simulate(v, pml_width=8).numpy())
    assert not np.allclose(data, so.simulate(v).numpy(), rtol=1e-3, atol=1e-3)  # the width shows in the traces
    assert json.loads((tmp_path / "dataset.json").read_text())["pml_width"] == 8


def test_cli_files_larger_than_a_batch_hold_every_sample(tmp_path):
    """A file is simulated in --batch-size chunks: each of its rows holds the traces of its own map, the last
    chunk's included, exactly as simulating every map at once."""
    code, _, err = run_cli("--out", tmp_path, "--files", "1", "--samples-per-file", "3", "--batch-size", "2")
    assert code == 0, err
    v = torch.from_numpy(np.load(tmp_path / "model" / "model1.npy")[:, 0])
    assert len(v) == 3 and not torch.equal(v[1], v[2])
    np.testing.assert_array_equal(np.load(tmp_path / "data" / "data1.npy"), so.simulate(v).numpy())


@pytest.mark.parametrize("family", ["curvefault", "flatfault"])
def test_cli_writes_the_maps_of_the_family_it_is_given(tmp_path, family):
    """--family reaches the generator: file 1's velocity maps are that family's draw from the file's stream
    [seed, 1], not flatvel's (the default) from the same stream, and dataset.json names the family."""
    code, _, err = run_cli("--out", tmp_path, "--files", "1", "--samples-per-file", "1", "--seed", "5", "--family", family)
    assert code == 0, err
    model = np.load(tmp_path / "model" / "model1.npy")
    np.testing.assert_array_equal(model, so.FAMILIES[family](np.random.default_rng([5, 1]), 1)[:, None])
    assert not np.array_equal(model, so.flatvel(np.random.default_rng([5, 1]), 1)[:, None])
    assert json.loads((tmp_path / "dataset.json").read_text())["family"] == family


def fake_generation(monkeypatch, simulated):
    """generate_file replaced by constant arrays (file i holds i), recording which files were simulated:
    these tests are about files, not physics."""
    def generate(args, i, device, progress=lambda k: None):
        simulated.append(i)
        n = args.samples_per_file
        return np.full((n, 5, 1000, 70), i, np.float32), np.full((n, 1, 70, 70), 1500.0 + i, np.float32)
    monkeypatch.setattr(so, "generate_file", generate)


def test_cli_writes_each_file_while_simulating_the_next(tmp_path, monkeypatch):
    simulated, overlapped, real_save = [], [], so.save_npy_atomic
    fake_generation(monkeypatch, simulated)

    def save(path, array):
        if os.path.basename(path) == "data1.npy":  # held until file 2's simulation has begun
            overlapped.append(wait_until(lambda: 2 in simulated, 10))
        real_save(path, array)
    monkeypatch.setattr(so, "save_npy_atomic", save)
    code, _, err = run_cli("--out", tmp_path, "--files", "3", "--samples-per-file", "2")
    assert code == 0, err
    assert overlapped == [True] and simulated == [1, 2, 3]
    for i in (1, 2, 3):
        assert np.all(np.load(tmp_path / "data" / f"data{i}.npy") == i)
        assert np.all(np.load(tmp_path / "model" / f"model{i}.npy") == 1500 + i)


def test_cli_failed_write_is_one_line_and_stops_at_the_next_file(tmp_path, monkeypatch):
    simulated, real_save = [], so.save_npy_atomic
    fake_generation(monkeypatch, simulated)

    def save(path, array):
        if os.path.basename(path) == "data1.npy":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)
    monkeypatch.setattr(so, "save_npy_atomic", save)
    code, _, err = run_cli("--out", tmp_path, "--files", "3", "--samples-per-file", "2")
    assert code == 2 and err == f"simulate_openfwi.py: error: {tmp_path / 'data' / 'data1.npy'}: No space left on device\n"
    assert simulated == [1, 2]  # the error surfaces once file 2 is simulated, before file 2 is written
    assert sorted(p.name for p in tmp_path.rglob("*.npy")) == ["model1.npy"]
    monkeypatch.setattr(so, "save_npy_atomic", real_save)  # space freed: the same command completes the set
    code, out, err = run_cli("--out", tmp_path, "--files", "3", "--samples-per-file", "2")
    assert code == 0 and "0 complete, 3 to make" in out, err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_run_keeps_whole_files_says_so_and_the_same_command_resumes(tmp_path, sig, code, word):
    out = tmp_path / "set"
    argv = ["--no-progress", "--out", out, "--files", 40, "--samples-per-file", 4, "--val-files", 1]
    p = start(SIMULATE, *argv)
    assert wait_until(lambda: (out / "data" / "data2.npy").exists(), 120)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and err == f"simulate_openfwi.py: {word}; complete files are kept, re-run to resume\n"
    made = sorted(out.rglob("data*.npy"))
    assert 2 <= len(made) < 40 and not list(out.rglob("*.tmp-*"))
    assert all(so.npy_complete(d, (4, *so.DATA_SHAPE)) for d in made)
    argv[4] = len(made) + 1  # --files: the same command, shortened to one more file
    r = run_script(SIMULATE, *argv)
    assert r.returncode == 0 and f"{len(made)} complete, 1 to make" in r.stdout


def test_a_sigterm_whose_raise_a_finalizer_swallowed_still_ends_the_run_as_terminated(monkeypatch, capsys):
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)  # where Python reports what a finalizer raised
    monkeypatch.setattr(so, "main", lambda args: (SignalledOnRelease(), 0)[1])
    assert so.cli(["--out", "unused"]) == 128 + signal.SIGTERM
    assert [u.exc_type for u in swallowed] == [so.Terminated]
    assert capsys.readouterr().err == "simulate_openfwi.py: terminated; complete files are kept, re-run to resume\n"


def test_a_second_simulator_in_an_out_in_use_is_refused(tmp_path):
    """While one simulator holds OUT/.lock, another started there stops before it removes anything (the first
    one's file in flight looks like a killed run's leftover); the lock goes with the process that held it."""
    out = tmp_path / "set"
    (out / "data").mkdir(parents=True)
    (out / "data" / "data1.npy.tmp-4242").write_bytes(b"a write under way")
    with open(out / ".lock", "a+") as held:  # flock locks open files, so this process's own cli() competes too
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("simulate_openfwi.py PID 4242 on elsewhere\n")  # the holder, as the lock names it
        held.flush()
        code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
        assert code == 2 and err == (f"simulate_openfwi.py: error: --out {out} is in use by another process "
                                     f"(simulate_openfwi.py PID 4242 on elsewhere, which holds {out / '.lock'}); wait for it to end, or choose "
                                     "another --out\n")
        assert sorted(p.name for p in out.rglob("*")) == [".lock", "data", "data1.npy.tmp-4242"]
    assert run_cli("--out", out, "--files", "2", "--samples-per-file", "2")[0] == 0
    assert not list(out.rglob("*.tmp-*")) and (out / "val.txt").is_file()
    assert run_cli("--out", out, "--files", "2", "--samples-per-file", "2")[0] == 0  # released when cli() returned


def test_cli_resumes_interrupted_generation(tmp_path):
    out = tmp_path / "run"
    assert run_cli("--out", out, "--files", "2", "--samples-per-file", "2")[0] == 0
    first = (out / "data" / "data2.npy").read_bytes()
    kept = (out / "data" / "data1.npy").stat().st_mtime_ns
    # an interrupted run: file 2 half-written under its final name, a temp file left behind
    (out / "data" / "data2.npy").write_bytes(first[: len(first) // 2])
    (out / "data" / "data2.npy.tmp-999").write_bytes(b"junk")
    code, stdout, _ = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "1 complete, 1 to make" in stdout
    assert (out / "data" / "data2.npy").read_bytes() == first
    assert (out / "data" / "data1.npy").stat().st_mtime_ns == kept
    assert not list(out.rglob("*.tmp-*"))
    np.save(out / "data" / "data2.npy", np.load(out / "data" / "data2.npy").astype(np.float64))  # the right shape, not float32
    code, stdout, _ = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "1 complete, 1 to make" in stdout and (out / "data" / "data2.npy").read_bytes() == first
    np.savez(out / "data" / "zipped.npz", np.zeros(3))  # a zip archive where a .npy should be: remade, not a crash
    (out / "data" / "zipped.npz").replace(out / "data" / "data2.npy")
    code, stdout, _ = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "1 complete, 1 to make" in stdout and (out / "data" / "data2.npy").read_bytes() == first
    assert "note" not in stdout  # the same split lists
    labels = (out / "model" / "model2.npy").read_bytes()  # the velocity maps are checked as the gathers are
    (out / "model" / "model2.npy").write_bytes(labels[: len(labels) // 2])
    code, stdout, _ = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "1 complete, 1 to make" in stdout and (out / "model" / "model2.npy").read_bytes() == labels
    write_negative_shape_npy(out / "model" / "model2.npy", (-1, 1, 70, 70))  # a header numpy's memory map overflows on
    code, stdout, _ = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "1 complete, 1 to make" in stdout and (out / "model" / "model2.npy").read_bytes() == labels
    # fewer files: the lists shrink (file 2 leaves the training list) and it is said
    code, stdout, _ = run_cli("--out", out, "--files", "1", "--samples-per-file", "2", "--val-files", "0")
    assert code == 0 and (out / "train.txt").read_text() == "data/data1.npy\tmodel/model1.npy\n"
    assert ("simulate_openfwi: note: train.txt / val.txt now list 1 / 0 files (they listed 1 / 1): a run trained "
            "on the old split resumes only on it") in stdout


def test_a_data_root_the_simulator_made_splits_as_its_lists(tmp_path):
    """Training on --data-root DIR then uses the split `bash run.sh` trains on (DIR's train.txt / val.txt);
    a --train-size given still draws its own."""
    import train_inversionnet as T
    out = tmp_path / "set"
    assert run_cli("--out", out, "--files", "3", "--samples-per-file", "1", "--val-files", "1")[0] == 0
    args = T.get_args_parser().parse_args(["--data-root", str(out)])
    lists = T.read_split_list(str(out / "train.txt")), T.read_split_list(str(out / "val.txt"))
    assert T.splits(args) == lists and [len(s) for s in lists] == [2, 1]
    assert T.split_rule(args, lists[0] + lists[1]) == "split by the simulator's train.txt / val.txt in --data-root"
    for kind in ("data", "model"):  # a pair copied in since is in neither list: the data line says it is not used
        shutil.copy(out / kind / f"{kind}1.npy", out / kind / f"{kind}9.npy")
    assert T.split_rule(args, lists[0] + lists[1]) == ("split by the simulator's train.txt / val.txt in --data-root (1 more "
                                                       "pair there, from data9.npy, in neither and not used: --train-size F "
                                                       "draws from every pair)")
    os.remove(out / "model" / "model9.npy")  # a stray file now, which this split never reads: no note, no error
    assert T.split_rule(args, lists[0] + lists[1]) == "split by the simulator's train.txt / val.txt in --data-root"
    os.remove(out / "data" / "data9.npy")
    args.train_size = 0.34  # one file of three trains
    assert [len(s) for s in T.splits(args)] == [1, 2] and T.split_rule(args, lists[0]).startswith("files drawn by --seed")
    assert run_cli("--out", out, "--files", "3", "--samples-per-file", "1", "--val-files", "0")[0] == 0
    args.train_size = None
    assert T.splits(args) == (T.read_split_list(str(out / "train.txt")), []) and len(T.splits(args)[0]) == 3
    with pytest.raises(T.DataError, match=f"the validation split is empty: {out / 'val.txt'} lists no files \\(simulated "
                                          "with --val-files 0\\); pass --val-every 0, or --train-size F to draw files"):
        T.load_splits(args, 1)
    # a resume refused for another split says how to get the seeded one (what --data-root gives with --train-size)
    assert T.simulated_hint(args) == (" (--data-root splits as its simulator's train.txt / val.txt; --train-size 0.8 "
                                      "draws files by --seed instead)")
    code, stdout, _ = run_cli("--out", out, "--files", "3", "--samples-per-file", "1", "--val-files", "1")
    assert code == 0 and "train.txt / val.txt now list 2 / 1 files (they listed 3 / 0)" in stdout  # from an empty val.txt


@pytest.mark.parametrize("args, needle", [
    (["--family", "bogusvel"], "argument --family: invalid choice: 'bogusvel'"),
    (["--files", "two"], "argument --files: invalid int value: 'two' (--help lists the flags)"),
    (["--files", "0"], "--files must be positive"),
    (["--samples-per-file", "-3"], "--samples-per-file must be positive"),
    (["--pml-width", "101"], "--pml-width must be at most 100, got 101"),
    (["--pml-width", "7"], "--pml-width must be at least 8 (a thinner absorber reflects 0.5 % of the trace or more), got 7"),
    (["--out", ""], "--out: an empty path"),
    (["--files", "2", "--val-files", "2"], "--val-files"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--files", "99999999999"], "--files 99999999999 x --samples-per-file 500 need 70,979,999,999.3 GB in --out"),
    pytest.param(["--device", "cuda"], "--device cuda requested but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_cli_bad_arguments(tmp_path, args, needle):
    code, _, err = run_cli("--out", tmp_path / "o", *args)
    assert code == 2 and needle in err and err.count("\n") == 1, err  # one line, no traceback or usage text
    assert not (tmp_path / "o").exists()  # a run that cannot start leaves nothing behind


def test_cli_refuses_a_file_larger_than_memory_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(so, "available_memory", lambda: 10**9)
    code, _, err = run_cli("--out", tmp_path / "o", "--samples-per-file", "400")  # 0.57 GB a file, two at a time
    assert code == 2 and err == ("simulate_openfwi.py: error: --samples-per-file 400: a file is 567.8 MB and two are held "
                                 "in memory, but 1.0 GB is available; make more files of fewer samples\n")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_set_larger_than_the_free_disk_in_readable_units(tmp_path, monkeypatch):
    monkeypatch.setattr(so.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))  # a full disk
    code, _, err = run_cli("--out", tmp_path / "o", "--files", "2", "--samples-per-file", "2")
    assert code == 2 and err == (f"simulate_openfwi.py: error: --files 2 x --samples-per-file 2 need 5.7 MB in --out "
                                 f"{tmp_path / 'o'}, and its disk has 0.0 MB free\n")


def test_a_complete_set_re_run_on_a_full_disk_is_not_refused(tmp_path, monkeypatch):
    """The disk check counts what the set already holds: re-running the same command (to rewrite its lists, or
    after a stop) needs no more room."""
    out = tmp_path / "o"
    assert run_cli("--out", out, "--files", "2", "--samples-per-file", "2")[0] == 0
    monkeypatch.setattr(so.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    code, stdout, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert code == 0 and "2 complete, 0 to make" in stdout, err


def test_cli_refuses_to_replace_a_directory_with_a_file(tmp_path):
    out = tmp_path / "o"
    assert run_cli("--out", out, "--files", "2", "--samples-per-file", "2")[0] == 0
    (out / "data" / "data2.npy").unlink()
    (out / "data" / "data2.npy").mkdir()
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "2")
    assert (code, err) == (2, f"simulate_openfwi.py: error: {out / 'data' / 'data2.npy'} exists and is not a regular file\n")


def test_cli_out_defaults_to_the_familys_folder():
    """data/FAMILY, as bash run.sh writes it (flatvel's is the trainer's default --data-root)."""
    for family in ("flatvel", "curvefault"):
        args = so.get_args_parser().parse_args(["--family", family])
        so.check_args(args)
        assert args.out == os.path.join("data", family)
    args = so.get_args_parser().parse_args(["--family", "curvefault", "--out", "elsewhere"])
    so.check_args(args)
    assert args.out == "elsewhere"


def test_cli_out_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    code, _, err = run_cli("--out", f, "--files", "1", "--samples-per-file", "1")
    assert code == 2 and str(f) in err and "not a directory" in err
    assert len(err.strip().splitlines()) == 1 and f.read_text() == "keep me"


def test_cli_out_cannot_be_created(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a directory cannot be made under a file, even by root
    code, _, err = run_cli("--out", blocker / "sub", "--files", "1", "--samples-per-file", "1")
    assert code == 2 and "cannot write into --out" in err and str(blocker / "sub") in err


def test_cli_never_replaces_other_data(tmp_path):
    out = tmp_path / "set"
    assert run_cli("--out", out, "--files", "1", "--samples-per-file", "2", "--val-files", "0", "--seed", "1")[0] == 0
    before = (out / "data" / "data1.npy").read_bytes()
    code, _, err = run_cli("--out", out, "--files", "1", "--samples-per-file", "3", "--val-files", "0", "--seed", "2")
    assert code == 2 and err.strip() == (f"simulate_openfwi.py: error: --out {out} holds data made with "
                                                      "--seed 1, --samples-per-file 2; re-run with those settings to "
                                                      "resume it, or choose another --out")
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "2", "--val-files", "0", "--seed", "1",
                           "--pml-width", "8")  # the absorbing layer changes every trace: files of two widths must not mix
    assert code == 2 and f"--out {out} holds data made with --pml-width 12;" in err
    assert (out / "data" / "data1.npy").read_bytes() == before and not (out / "data" / "data2.npy").exists()
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "2", "--val-files", "0", "--seed", "1",
                           "--family", "curvevel")  # one set, one family
    assert code == 2 and f"--out {out} holds data made with --family flatvel;" in err
    foreign = tmp_path / "openfwi"
    (foreign / "data").mkdir(parents=True)
    np.save(foreign / "data" / "data1.npy", np.ones((3, 5, 1000, 70), np.float32))  # e.g. a downloaded set
    theirs = (foreign / "data" / "data1.npy").read_bytes()
    (foreign / "data" / "data2.npy.tmp-7").write_bytes(b"theirs too")  # looks like our leftover, is not ours
    code, _, err = run_cli("--out", foreign, "--files", "1", "--samples-per-file", "2", "--val-files", "0")
    assert code == 2 and "did not make (no simulate.json)" in err
    assert (foreign / "data" / "data1.npy").read_bytes() == theirs and not (foreign / "model" / "model1.npy").exists()
    assert (foreign / "data" / "data2.npy.tmp-7").read_bytes() == b"theirs too"


def test_cli_never_writes_beside_a_dataset_in_openfwis_fault_layout(tmp_path):
    """seis*.npy / vel*.npy side by side: our data/ and model/ would hide them from the trainer's --data-root."""
    out = tmp_path / "flatfault"
    out.mkdir()
    for name in ("seis2_1_0.npy", "vel2_1_0.npy"):
        np.save(out / name, np.zeros(1, np.float32))
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "1")
    assert code == 2 and err.strip() == (f"simulate_openfwi.py: error: --out {out} already holds seis2_1_0.npy and more "
                                         ".npy files, which simulate_openfwi.py does not write (a dataset in OpenFWI's "
                                         "layout?); choose another --out")
    assert sorted(os.listdir(out)) == ["seis2_1_0.npy", "vel2_1_0.npy"]


def test_cli_never_replaces_split_lists_or_stats_it_did_not_write(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    for name in ("train.txt", "val.txt", "dataset.json"):
        (out / name).write_text(f"their {name}")
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "1")
    assert code == 2 and err.strip() == (f"simulate_openfwi.py: error: --out {out} already holds train.txt, val.txt, "
                                         "dataset.json that simulate_openfwi.py did not make (its dataset.json is not one "
                                         "simulate_openfwi.py wrote); choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train.txt", "val.txt"]
    assert all((out / n).read_text() == f"their {n}" for n in ("train.txt", "val.txt", "dataset.json"))
    (out / "simulate.json").write_text("{}")  # present but not ours: the message says so rather than "no simulate.json"
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "1")
    assert code == 2 and "did not make (its simulate.json is not one simulate_openfwi.py wrote)" in err
    (out / "simulate.json").unlink()
    (out / "simulate.json").mkdir()  # unreadable (as root, a directory is what cannot be read)
    code, _, err = run_cli("--out", out, "--files", "2", "--samples-per-file", "1")
    assert code == 2 and "did not make (its simulate.json cannot be read: Is a directory)" in err


def test_cli_never_writes_into_a_training_run_or_evaluation_folder(tmp_path):
    for names in (("args.json", "last.pt", "train.log"), ("metrics.json",)):
        out = tmp_path / names[0]
        out.mkdir()
        for name in names:
            (out / name).write_text("theirs")
        code, _, err = run_cli("--out", out, "--files", "1", "--samples-per-file", "1")
        assert code == 2 and err == (f"simulate_openfwi.py: error: --out {out} holds {', '.join(sorted(names))}: a "
                                     f"training run or evaluation results, not a dataset; choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_a_reader_that_goes_ends_the_lines_not_the_run(tmp_path):
    """`simulate_openfwi.py | head -1`: the files, the split lists and dataset.json are all written, exit 0."""
    code, err = run_without_reader(SIMULATE, "--no-progress", "--out", tmp_path, "--files", "2", "--samples-per-file", "1")
    assert code == 0 and "Traceback" not in err and "Broken pipe" not in err, err
    assert json.loads((tmp_path / "dataset.json").read_text())["files"] == 2 and (tmp_path / "model" / "model2.npy").exists()


@pytest.mark.skipif(so.triton is not None, reason="triton is installed here")
def test_triton_engine_without_triton_is_refused_in_one_line():
    with pytest.raises(so.SimulationError, match="engine 'triton' needs the triton package"):
        so.simulate(torch.full((1, 10, 10), 2000.0), nt=5, engine="triton")
