"""train_inversionnet.py: model, loaders, normalisation, optimisation, checkpoints, resume."""
import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import threading
import types

import numpy as np
import pytest
import torch

import train_inversionnet as T
from helpers import TRAIN, assert_same_weights, conv_dtypes_during, module_dir, run_script, sample_ids, wait_until, write_ids_dataset, write_split_list


def small_args(**kw):
    """Training arguments as parsed and checked, with the speed flags resolved for the CPU."""
    args = T.get_args_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    T.check_args(args)
    T.resolve_speed(args, torch.device("cpu"))
    return args


# ---- model ----

def test_parameter_count_output_shape_and_openfwi_keys():
    m = T.InversionNet()
    assert sum(p.numel() for p in m.parameters()) == 24_409_123
    sd = m.state_dict()
    assert len(sd) == 175
    # names and shapes as in OpenFWI's network.py
    assert sd["convblock1.layers.0.weight"].shape == (32, 5, 7, 1)
    assert sd["convblock1.layers.1.running_mean"].shape == (32,)
    assert sd["convblock8.layers.0.weight"].shape == (512, 256, 8, 9)
    assert sd["deconv1_1.layers.0.weight"].shape == (512, 512, 5, 5)
    assert sd["deconv6.layers.0.weight"].shape == (1, 32, 3, 3)
    assert sd["deconv6.layers.1.num_batches_tracked"].shape == ()
    m.eval()
    seen = {}
    for name in ("convblock1", "convblock4_1", "convblock5_1", "convblock6_1", "convblock8", "deconv1_1", "deconv5_2", "deconv6"):
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.update({name: (inp[0], out)}))
    out = m(torch.randn(2, 5, 1000, 70))
    assert out.shape == (2, 1, 70, 70) and out.abs().max() <= 1
    # the feature shapes of OpenFWI's network, and the decoder's 80 x 80 cropped by 5 cells on each side
    assert {k: tuple(o.shape[1:]) for k, (_, o) in seen.items()} == {
        "convblock1": (32, 500, 70), "convblock4_1": (128, 63, 70), "convblock5_1": (128, 32, 35),
        "convblock6_1": (256, 16, 18), "convblock8": (512, 1, 1), "deconv1_1": (512, 5, 5), "deconv5_2": (32, 80, 80),
        "deconv6": (1, 70, 70)}
    assert torch.equal(seen["deconv6"][0], seen["deconv5_2"][1][..., 5:75, 5:75])


def test_openfwi_style_checkpoint_loads_strictly(tmp_path):
    src = T.InversionNet()
    # an OpenFWI checkpoint: dict with 'model' plus its own extras; keys possibly from a DDP module
    path = tmp_path / "fva_l1.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 119, "step": 1}, path)
    dst = T.InversionNet()
    T.load_weights(dst, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # as older torch saved
    T.load_exactly(T.InversionNet(), old, "old.pth:")
    bad = dict(src.state_dict())
    bad.pop("deconv6.layers.0.weight")
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(T.InputError) as e:
        T.load_weights(T.InversionNet(), str(tmp_path / "bad.pth"))
    assert str(e.value) == (f"{tmp_path / 'bad.pth'}: incompatible with InversionNet (1 of the model's missing: "
                            "deconv6.layers.0.weight)")


# ---- normalisation ----

def test_normalizer_matches_openfwi_formula_and_never_writes_in_place():
    n = T.Normalizer(-26.95, 52.77)
    x = torch.tensor([-26.95, 0.0, 52.77, 3.0])
    keep = x.clone()
    lo, hi = -np.log1p(26.95), np.log1p(52.77)
    expected = (np.sign(x.numpy()) * np.log1p(np.abs(x.numpy())) - lo) / (hi - lo) * 2 - 1
    np.testing.assert_allclose(n.data(x).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert n.data(x)[0] == pytest.approx(-1) and n.data(x)[2] == pytest.approx(1)
    assert torch.equal(x, keep)
    v = torch.tensor([1500.0, 3000.0, 4500.0])
    assert n.label(v).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert n.label_to_velocity(n.label(v)).tolist() == pytest.approx(v.tolist())


def test_label_units_are_told_by_the_median_of_a_files_first_maps(tmp_path):
    """m/s within a quarter of the range beyond either end passes; km/s or normalised labels do not; a NaN or
    an outlier is left to the loaders and the loss guard, which name its sample."""
    norm, path = T.Normalizer(-30, 60), tmp_path / "model1.npy"

    def check(y):
        np.save(path, np.asarray(y, np.float32).reshape(-1, 1, 70, 70))
        T.check_label_range([("unused", str(path))], norm, "here")
    for fine in (np.full(4900, 1500.0), np.full(4900, 4500.0), np.full(4900, 800.0), np.full(4900, 5200.0)):
        check(fine)
    y = np.full((3, 4900), 3000.0)
    y[0] = 3.4e38  # an outlier
    check(y)
    y[1, 7] = np.nan
    check(y)
    for bad in (np.full(4900, 3.0), np.full(4900, 0.2), np.full(4900, 700.0), np.full(4900, 5300.0)):
        with pytest.raises(T.DataError, match=r"model1\.npy: velocities around \S+ \(the file's median\), far outside "
                                              r"the normalisation's 1500 to 4500 m/s \(here\)"):
            check(bad)
    y = np.full((200, 4900), 3000.0)
    y[:64] = 3.0  # only the first 64 maps are read: the rest, which would outvote them, are not
    with pytest.raises(T.DataError, match=r"velocities around 3 \(the file's median\)"):
        check(y)


def test_stats_resolution(tmp_path):
    a = small_args(data_root=str(tmp_path), dataset="curvevel-b")
    norm, src = T.resolve_stats(a)
    assert (norm.data_min, norm.data_max) == (-29.04, 57.03) and "curvevel-b" in src
    (tmp_path / "dataset.json").write_text(json.dumps({"data_min": -3.0, "data_max": 7.0, "label_min": 1500, "label_max": 4500}))
    norm, src = T.resolve_stats(small_args(data_root=str(tmp_path)))
    assert (norm.data_min, norm.data_max) == (-3.0, 7.0) and src.endswith("dataset.json")
    norm, src = T.resolve_stats(a)  # --dataset, named, wins over the dataset.json now there
    assert (norm.data_min, norm.data_max) == (-29.04, 57.03) and "curvevel-b" in src
    lists = tmp_path / "lists"  # split lists (run.sh --data DIR): the dataset.json beside them, not DATA_ROOT's
    lists.mkdir()
    (lists / "dataset.json").write_text(json.dumps({"data_min": -5.0, "data_max": 9.0, "label_min": 1500, "label_max": 4500}))
    (lists / "train.txt").write_text("")
    norm, src = T.resolve_stats(small_args(train_list=str(lists / "train.txt"), val_list=str(lists / "train.txt")))
    assert (norm.data_min, norm.data_max) == (-5.0, 9.0) and src == str(lists / "dataset.json")


# ---- loaders ----

def ids_of(batches):
    return [int(v) for x, _ in batches for v in x[:, 0, 0, 0].round().tolist()]


@pytest.mark.parametrize("counts, workers, world", [((5, 3, 7), 0, 1), ((5, 3, 7), 3, 1), ((4, 7, 3), 1, 3), ((6, 5, 3, 5, 7), 3, 3)])
def test_iterable_loader_sees_every_sample_once_with_exact_batch_count(tmp_path, counts, workers, world):
    pairs = write_ids_dataset(tmp_path, counts)
    total, batch = sum(counts), 2
    seen_by_epoch = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = T.IterableFileDataset(pairs, list(counts), batch, rank, world, workers, seed=3)
            ds.set_epoch(epoch)
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
            batches = list(dl)
            assert len(batches) == len(dl) == len(ds)  # the progress bar and LR schedule rely on this
            assert all(len(x) >= 2 for x, _ in batches)
            seen += ids_of(batches)
        assert len(seen) == len(set(seen)) == total - total % world == total - ds.dropped
        seen_by_epoch.append(seen)
    assert seen_by_epoch[0] != seen_by_epoch[1]  # reshuffled per epoch


def test_the_iterable_loaders_smaller_batches_are_counted_and_said(tmp_path, capsys):
    """Each loader worker ends on its remainder (of at least 2 samples): the start-up line says how many
    batches of an epoch are below --batch-size."""
    pairs = write_ids_dataset(tmp_path, (6, 6))
    ds = T.IterableFileDataset(pairs, [6, 6], 4, num_workers=2, seed=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(len(x) for x, _ in batches) == [2, 2, 4, 4] and ds.smaller == 2
    lst = write_split_list(tmp_path / "train.txt", pairs)
    assert T.cli(["--train-list", str(lst), "--val-every", "0", "--loader", "iterable", "--num-workers", "2",
                  "--batch-size", "4", "--max-steps", "1", "--no-progress", "--device", "cpu", "--dataset", "flatvel-a",
                  "--output-dir", str(tmp_path / "run")]) == 0
    assert ("loader iterable, 4 batches/epoch of 4 (2 of them smaller: each loader worker ends on its remainder); "
            "normalisation") in capsys.readouterr().out


def test_iterable_loader_reads_the_files_in_a_new_order_each_epoch_and_the_same_order_for_the_same_epoch(tmp_path):
    """Six files of two samples, batch 2: each batch is one file, so the batches show the order the files were
    read in. That order is drawn anew per epoch (not only the samples within each file) and repeats exactly for
    the same seed and epoch, which a resume relies on."""
    pairs = write_ids_dataset(tmp_path, [2] * 6)

    def file_order(epoch):
        ds = T.IterableFileDataset(pairs, [2] * 6, 2, seed=3)
        ds.set_epoch(epoch)
        return [sorted({i // 2 for i in ids_of([b])}) for b in ds]

    orders = [file_order(e) for e in range(3)]
    assert all(len(o) == 6 and sorted(f for [f] in o) == list(range(6)) for o in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert file_order(1) == orders[1]
    one_file = write_ids_dataset(tmp_path / "one", [8])  # the samples inside a file are shuffled anew each epoch too

    def sample_order(epoch):
        ds = T.IterableFileDataset(one_file, [8], 2, seed=3)
        ds.set_epoch(epoch)
        return ids_of(list(ds))
    assert sorted(sample_order(0)) == list(range(8)) and sample_order(0) != sample_order(1) == sample_order(1)


def test_iterable_loader_eval_mode_keeps_every_sample(tmp_path):
    pairs = write_ids_dataset(tmp_path, (3, 4))
    seen = []
    for rank in range(2):
        ds = T.IterableFileDataset(pairs, [3, 4], 3, rank, 2, 0, train=False)
        seen += ids_of(list(ds))
    assert sorted(seen) == list(range(7))


def test_persistent_workers_follow_set_epoch_and_labels_stay_intact(tmp_path):
    pairs = write_ids_dataset(tmp_path, (4, 4))
    before = [np.load(m).copy() for _, m in pairs]
    cfg = T.LoaderConfig(kind="iterable", num_workers=1, persistent_workers=True, batch_size=2, normalize_in_workers=True)
    norm = T.Normalizer(-30, 60)
    loader = T.build_loader(cfg, pairs, [4, 4], norm, torch.device("cpu"))
    assert loader.normalized
    orders, labels = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        orders.append([float(v) for x, _ in batches for v in x[:, 0, 0, 0]])  # normalised ids
        labels.append(sorted(float(s) for _, y in batches for s in y.flatten(1).sum(1)))
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[1])
    assert labels[0] == pytest.approx(labels[1]) and labels[1] == pytest.approx(labels[2])  # nothing normalised twice
    for (_, m), b in zip(pairs, before):
        assert np.array_equal(np.load(m), b)


@pytest.mark.parametrize("kind", ["map", "gpu"])
def test_seed_draws_the_training_order_of_the_map_and_device_loaders(tmp_path, kind):
    pairs = write_ids_dataset(tmp_path, (5, 4))

    def order(seed, epoch=0):
        args = small_args(data_root=str(tmp_path), loader=kind, num_workers=0, batch_size=2, seed=seed)
        loader = T.build_loader(T.LoaderConfig.from_args(args, True), pairs, [5, 4], T.Normalizer(-30, 60), torch.device("cpu"))
        loader.set_epoch(epoch)
        return [float(v) for x, _ in loader for v in x[:, 0, 0, 0]]

    assert order(4) == order(4) and order(4) != order(0) and order(4, epoch=1) != order(4)


@pytest.mark.parametrize("kind", ["map", "gpu"])
def test_map_and_device_loaders_cover_the_split(tmp_path, kind):
    pairs = write_ids_dataset(tmp_path, (5, 4))
    norm = T.Normalizer(-30, 60)
    args = small_args(data_root=str(tmp_path), loader=kind, num_workers=0, batch_size=2, val_batch_size=3)
    world_seen = []
    for rank in range(2):
        loader = T.build_loader(T.LoaderConfig.from_args(args, True), pairs, [5, 4], norm, torch.device("cpu"), rank, 2)
        batches = list(T.device_batches(loader, torch.device("cpu"), norm))
        assert len(batches) == len(loader) == 2 and loader.dropped == 1
        x, y = batches[0]
        assert x.shape == (2, 5, 1000, 70) and y.min() >= -1 and y.max() <= 1  # normalised on the device
        world_seen += [i for x, _ in batches for i in sample_ids(x, norm)]
        val = T.build_loader(T.LoaderConfig.from_args(args, False), pairs, [5, 4], norm, torch.device("cpu"), rank, 2, train=False)
        sizes = [len(x) for x, _ in T.device_batches(val, torch.device("cpu"), norm)]
        assert sizes == ([3, 2] if rank == 0 else [3, 1])  # --val-batch-size 3 over 5 and 4 of the 9 samples
    assert len(set(world_seen)) == 8
    # the sampler drops the remainder that would leave the ranks uneven rather than padding it with repeats
    idx = [i for r in (0, 1) for i in T.EpochSampler(T.MapDataset(pairs, [5, 4]), 2, r, 0, 2)]
    assert len(idx) == len(set(idx)) == 8
    one = T.build_loader(T.LoaderConfig.from_args(args, True), pairs, [5, 4], norm, torch.device("cpu"))
    assert len(one) == 4 and one.dropped == 1  # one process: the partial last batch is what is left out
    data = (pairs, [5, 4], [], [])
    assert "1 samples left out of each epoch (partial batches);" in T.describe_data(data, one, args, 1, "x")
    assert "(partial batches and the remainder that would leave the 2 ranks uneven)" in T.describe_data(data, loader, args, 2, "x")


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_worker_flags_reach_the_dataloader(tmp_path, kind):
    """--num-workers, --prefetch-factor and --persistent-workers as the DataLoader takes them; pinning only
    where it helps (copies to a GPU)."""
    pairs = write_ids_dataset(tmp_path, (4, 4))
    def loader(**kw):
        args = small_args(loader=kind, num_workers=1, prefetch_factor=3, pin_memory=True, **kw)
        return T.build_loader(T.LoaderConfig.from_args(args, True), pairs, [4, 4], T.Normalizer(-30, 60),
                              torch.device("cpu")).loader
    dl = loader()  # persistent unless told otherwise: no worker forked per epoch
    assert (dl.num_workers, dl.prefetch_factor, dl.persistent_workers, dl.pin_memory) == (1, 3, True, False)
    assert not loader(persistent_workers=False).persistent_workers


def test_device_cache_reads_the_kept_samples_in_order(tmp_path):
    """read_samples, which fills the device cache on several threads, yields exactly the samples asked for,
    in order, across files and chunk boundaries."""
    pairs = write_ids_dataset(tmp_path, (5, 4, 6))
    x_all = np.concatenate([np.load(d) for d, _ in pairs])
    y_all = np.concatenate([np.load(m) for _, m in pairs])
    keep = np.array([0, 2, 3, 4, 5, 8, 9, 11, 12, 14])  # leaves out samples of every file
    chunks = list(T.read_samples(pairs, [5, 4, 6], keep, chunk=2))
    assert all(len(x) <= 2 for x, _ in chunks)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in chunks]), x_all[keep])
    np.testing.assert_array_equal(np.concatenate([y for _, y in chunks]), y_all[keep])


def test_device_cache_keeps_labels_in_float32_whatever_the_data_dtype(tmp_path):
    """A bf16 cache (what --fast picks with bf16 autocast) rounds the data, never the labels: they are the
    metrics' truth."""
    pairs = write_ids_dataset(tmp_path, (5,))
    norm = T.Normalizer(-30, 60)
    loader = T.build_loader(T.LoaderConfig(kind="gpu", batch_size=2, cache_dtype="bfloat16"), pairs, [5], norm,
                            torch.device("cpu"))
    assert loader.x.dtype == torch.bfloat16 and loader.y.dtype == torch.float32
    assert torch.equal(loader.y, norm.label(torch.from_numpy(np.load(pairs[0][1]))))


def test_data_parallel_never_gets_a_batch_that_leaves_a_gpu_one_sample(monkeypatch):
    """DataParallel splits a batch with torch.chunk; a GPU given one sample fails in BatchNorm. Such a
    --batch-size is refused up front, and such a remainder batch of the iterable loader is not trained on."""
    assert T.replica_sizes(9, 8) == [2, 2, 2, 2, 1] and T.replica_sizes(3, 2) == [2, 1]
    assert T.replica_sizes(16, 8) == [2] * 8 and T.replica_sizes(7, 1) == [7]
    ds = T.IterableFileDataset([], [], batch_size=4, replicas=2)
    assert ds.sizes(11) == ds.sizes(10) == [4, 4]  # remainders of 3 and 2 split 2 + 1 and 1 + 1
    assert ds.sizes(13) == [4, 4, 5]  # a remainder of 1 joins the batch before it: 5 splits 3 + 2
    assert T.IterableFileDataset([], [], batch_size=4).sizes(11) == [4, 4, 3]  # one device takes it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    cuda = torch.device("cuda")
    with pytest.raises(T.InputError, match=r"^--batch-size 9 over 8 GPUs \(DataParallel\) leaves a GPU one sample, "
                                           r"on which BatchNorm cannot train: use a multiple of 8 of at least 16$"):
        T.check_device_args(small_args(batch_size=9), cuda)
    with pytest.raises(T.InputError, match=r"^--batch-size 15 over 8 GPUs"):  # seven pieces of 2 and one of 1
        T.check_device_args(small_args(batch_size=15), cuda)
    T.check_device_args(small_args(batch_size=16), cuda)
    T.check_device_args(small_args(batch_size=10), cuda)  # not a multiple of 8, but five pieces of 2 train
    T.check_device_args(small_args(batch_size=9, parallel="none"), cuda)  # one GPU takes the whole batch


def test_data_parallel_replicas_compute_in_the_runs_amp_dtype():
    """DataParallel's replica threads re-enter autocast without a dtype and would get the thread's default
    (fp16 on CUDA under --amp bf16); the wrapper its replicas run sets the run's dtype. Shown on the CPU,
    whose thread default is bf16, with fp16 as the run's dtype."""
    conv, x = torch.nn.Conv2d(1, 1, 3), torch.randn(1, 1, 8, 8)
    replica, got = T.ReplicaAutocast(torch.nn.Conv2d(1, 1, 3), torch.float16), {}  # autocast caches casts per weight

    def replica_thread():  # what DataParallel's parallel_apply does around each replica
        with torch.autocast("cpu", enabled=True):
            got["bare"], got["wrapped"] = conv(x).dtype, replica(x).dtype

    thread = threading.Thread(target=replica_thread)
    thread.start()
    thread.join()
    assert got == {"bare": torch.bfloat16, "wrapped": torch.float16}
    assert T.ReplicaAutocast(conv, None)(x).dtype == torch.float32  # --amp off: float32 as the bare model


@pytest.mark.parametrize("flags, expected", [
    # (deterministic algorithms, cudnn.deterministic, cudnn.benchmark, TF32)
    ([], (False, False, True, True)),  # the defaults: autotuning and TF32 on
    (["--deterministic", "--no-tf32"], (True, True, False, False)),
    (["--deterministic"], (True, True, False, True)),  # determinism wins over --cudnn-benchmark
    (["--no-cudnn-benchmark", "--no-tf32"], (False, False, False, False)),
])
def test_backend_flags_set_the_switches_both_ways(flags, expected):
    """Each switch is set as the flags say, off as well as on: a run never inherits an earlier run's choice in
    the same process."""
    for first in (parsed("--deterministic"), parsed("--no-cudnn-benchmark", "--no-tf32")):
        T.configure_backends(first, torch.device("cpu"))
        line = T.configure_backends(parsed(*flags), torch.device("cpu"))
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == expected
        assert torch.backends.cudnn.allow_tf32 == expected[3]
        assert line == f"deterministic algorithms {'on' if expected[0] else 'off'}"  # cudnn and TF32 are not named on a CPU


def test_split_pairs_by_file_is_seeded():
    pairs = [(f"d{i}", f"m{i}") for i in range(10)]
    tr, va = T.split_pairs(pairs, 0.8, seed=1)
    assert len(tr) == 8 and len(va) == 2 and set(tr).isdisjoint(va)
    assert T.split_pairs(pairs, 0.8, seed=1) == (tr, va)
    assert T.split_pairs(pairs, 0.8, seed=2) != (tr, va)
    assert tr == [p for p in pairs if p in tr] and va == [p for p in pairs if p in va]  # each list in file order
    twelve = [(f"d{i}", f"m{i}") for i in range(12)]
    assert len(T.split_pairs(twelve, 0.8, seed=0)[0]) == 10  # 9.6 rounds to 10 files, not down to 9
    assert tuple(map(len, T.split_pairs(pairs[:3], 0.9, seed=0))) == (2, 1)  # a validation file is always kept


def test_a_released_openfwi_set_splits_as_openfwi_does_unless_train_size_is_given(tmp_path):
    vel = [(f"r/data/data{i}.npy", f"r/model/model{i}.npy") for i in range(1, 61)]
    tr, va = T.split_pairs(vel, None, seed=0)
    assert [d for d, _ in va] == [f"r/data/data{i}.npy" for i in range(49, 61)] and len(tr) == 48
    style = [(f"data{i}.npy", f"model{i}.npy") for i in range(1, 135)]
    assert [d for d, _ in T.split_pairs(style, None, seed=0)[1]] == [f"data{i}.npy" for i in range(121, 135)]
    for g in (6, 7, 8):  # a fault family: seis*/vel* side by side in one folder, as OpenFWI ships them
        for j in range(36):
            for prefix in ("seis", "vel"):
                (tmp_path / f"{prefix}{g}_1_{j}.npy").touch()
    fault = T.find_pairs(str(tmp_path))
    tr, va = T.split_pairs(fault, None, seed=0)
    assert sorted(os.path.basename(d) for d, _ in va) == sorted(f"seis{g}_1_{j}.npy" for g in (6, 7, 8) for j in range(32, 36))
    assert len(tr) == 96 and all(m == d.replace("seis", "vel") for d, m in fault)
    assert T.split_pairs(vel[:59], None, seed=0) == T.split_pairs(vel[:59], 0.8, seed=0)  # not a whole set: drawn
    assert len(T.split_pairs(vel, 0.5, seed=0)[1]) == 30  # a --train-size given is followed


# ---- metrics ----

def test_metric_sums_reduce_as_sum_and_count():
    p = torch.zeros(3, 1, 70, 70)
    t = torch.zeros(3, 1, 70, 70)
    t[0] += 0.5
    s = T.metric_sums(T.per_sample_metrics(p, t))
    m = T.summarize(s)
    assert m["mae"] == pytest.approx(0.5 / 3) and m["mse"] == pytest.approx(0.25 / 3)
    assert m["rmse"] == pytest.approx((0.25 / 3) ** 0.5) and m["count"] == 3
    halves = T.summarize(T.metric_sums(T.per_sample_metrics(p[:1], t[:1])) + T.metric_sums(T.per_sample_metrics(p[1:], t[1:])))
    assert halves["mae"] == pytest.approx(m["mae"]) and halves["ssim"] == pytest.approx(m["ssim"])



class Float64Made(torch.overrides.TorchFunctionMode):
    """Names every torch call that returns a float64 tensor: on MPS each would be an error."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in torch.utils._pytree.tree_leaves(out)):
            self.calls.append(getattr(func, "__name__", str(func)))
        return out


def test_with_the_float32_sums_of_mps_an_epoch_and_an_evaluation_make_no_float64_tensor(monkeypatch):
    """MPS has no float64 and refuses to make a tensor of it. With accum_dtype as it is there (float32), a training
    epoch (its step, running loss and log line) and an evaluation (SSIM, metric and loss sums) make none, and give
    the float64 figures to float32 precision."""
    torch.manual_seed(0)
    y = torch.rand(6, 1, 70, 70) * 2 - 1
    x = y + 0.1 * torch.randn_like(y)

    def epoch_and_evaluation():
        model = torch.nn.Conv2d(1, 1, 3, padding=1)
        torch.nn.init.dirac_(model.weight)
        torch.nn.init.zeros_(model.bias)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = T.Run(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0),
                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
        loss = T.train_one_epoch(run, T.RepeatedBatch(x, y, 3), T.Monitor(log_every=2), T.Stop())
        return loss, T.evaluate(model, T.RepeatedBatch(x, y, 2), torch.device("cpu"), loss_weights=(1.0, 1.0))

    assert T.accum_dtype(torch.device("mps")) == torch.float32 and T.accum_dtype(torch.device("cpu")) == torch.float64
    loss64, metrics64 = epoch_and_evaluation()
    monkeypatch.setattr(T, "accum_dtype", lambda device: torch.float32)  # as on MPS
    with Float64Made() as made:
        loss32, metrics32 = epoch_and_evaluation()
    assert made.calls == []
    assert loss32 == pytest.approx(loss64, rel=1e-6) and metrics32["count"] == metrics64["count"] == 12
    for k in ("mae", "mse", "ssim", "loss"):
        assert metrics32[k] == pytest.approx(metrics64[k], rel=1e-5), k


# ---- schedules ----

def lr_trace(steps, **flags):
    """The learning rate at each of STEPS optimizer steps of the schedule FLAGS build (lr 1, 10 steps per epoch)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = T.build_scheduler(opt, small_args(**flags), iters_per_epoch=10)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


def test_schedulers_follow_their_definitions():
    lrs = lr_trace(40, lr_scheduler="warmup-multistep", lr_warmup_epochs=1, lr_milestones=[2, 3], lr_gamma=0.1, epochs=4)
    assert lrs[0] == pytest.approx(1e-5) and lrs[5] == pytest.approx(0.5, abs=1e-5)
    assert lrs[15] == 1.0 and lrs[25] == pytest.approx(0.1) and lrs[35] == pytest.approx(0.01)
    lrs = lr_trace(20, lr_scheduler="cosine", epochs=2)
    assert lrs[0] == 1.0 and lrs[10] == pytest.approx(0.5) and lrs[19] < 0.01
    # cosine after warm-up: the ramp, then the half-cosine over the steps after it
    lrs = lr_trace(30, lr_scheduler="cosine", lr_warmup_epochs=1, epochs=3)
    assert lrs[0] == pytest.approx(1e-5) and lrs[5] == pytest.approx(0.5, abs=1e-5)
    assert lrs[10] == 1.0 and lrs[20] == pytest.approx(0.5) and lrs[29] < 0.01
    # cosine under --max-steps anneals to its end over the steps that run, not over --epochs
    lrs = lr_trace(20, lr_scheduler="cosine", epochs=10, max_steps=20)
    assert lrs[10] == pytest.approx(0.5) and lrs[19] < 0.01
    # step: gamma per --lr-step-size epochs; a step size of almost nothing decays to 0, not to an OverflowError
    for step_size, expected in ((1.5, [1.0] * 15 + [0.5] * 5), (1e-320, [1.0] + [0.0] * 19)):
        assert lr_trace(20, lr_scheduler="step", lr_step_size=step_size, lr_gamma=0.5, epochs=2) == expected


def test_channels_last_reaches_the_batches_the_model_sees():
    """--channels-last converts the model and every input batch; a channels-first input would make each
    convolution convert it again."""
    x, y = torch.randn(2, 5, 1000, 70), torch.zeros(2, 1, 70, 70)
    for flag in (True, False):
        bx, _ = next(T.device_batches(T.RepeatedBatch(x, y, 1), torch.device("cpu"), None, channels_last=flag))
        assert bx.is_contiguous(memory_format=torch.channels_last) == flag and torch.equal(bx, x)


def test_best_pt_follows_the_lowest_validation_loss_of_the_runs_own_loss(monkeypatch):
    """An epoch improves (and rewrites best.pt) only on a strictly lower validation loss than every earlier one;
    the loss is the run's own, with its --lambda-l1 / --lambda-l2 weights."""
    losses, weights_seen = iter([0.5, 0.5, 0.7, 0.4, 0.6]), []

    def evaluate(model, loader, device, normalizer, amp_dtype, channels_last, loss_weights=(1.0, 0.0), stop=None):
        weights_seen.append(loss_weights)
        return {"loss": next(losses), "mae": 0.0, "rmse": 0.0, "ssim": 0.0, "first": None}
    monkeypatch.setattr(T, "evaluate", evaluate)
    run = argparse.Namespace(eval_model=None, device=None, normalizer=None, amp_dtype=None, channels_last=False,
                             loss_weights=(1.0, 0.5), best_loss=math.inf, step=0)
    monitor = argparse.Namespace(scalars=lambda *a: None, image=lambda *a: None)
    assert [T.validate(run, None, monitor, T.Stop())[1] for _ in range(5)] == [True, False, False, True, False]
    assert run.best_loss == 0.4 and weights_seen == [(1.0, 0.5)] * 5


def test_provenance_names_the_whole_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    """Provenance of code in a repository of its own: clean, with an untracked file (not a change to the code),
    with a tracked file edited, and outside any repository."""
    import subprocess
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = lambda *cmd: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *cmd],
                                      capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(T, "__file__", str(tmp_path / "train_inversionnet.py"))
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # set when the suite runs from a git hook
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git looks no higher than tmp_path
    assert {k: T.provenance(torch.device("cpu"), ["x"])[k] for k in ("git_commit", "git_dirty")} == {
        "git_commit": None, "git_dirty": None}  # not a repository yet
    git("init", "-q")
    (tmp_path / "train_inversionnet.py").write_text("v1\n")
    git("add", "train_inversionnet.py")
    git("commit", "-q", "-m", "v1")
    head = git("rev-parse", "HEAD")
    states = []
    for change in (lambda: (tmp_path / "notes.txt").write_text("untracked"),
                   lambda: (tmp_path / "train_inversionnet.py").write_text("v2\n")):
        prov = T.provenance(torch.device("cpu"), ["x"])
        states.append((prov["git_commit"], prov["git_dirty"]))
        change()
    prov = T.provenance(torch.device("cpu"), ["x"])
    states.append((prov["git_commit"], prov["git_dirty"]))
    assert len(head) == 40 and states == [(head, False), (head, False), (head, True)]
    (tmp_path / "sub").mkdir()  # a copy of the script, untracked inside that repository: no commit holds it
    (tmp_path / "sub" / "train_inversionnet.py").write_text("v3\n")
    monkeypatch.setattr(T, "__file__", str(tmp_path / "sub" / "train_inversionnet.py"))
    assert {k: T.provenance(torch.device("cpu"), ["x"])[k] for k in ("git_commit", "git_dirty")} == {
        "git_commit": None, "git_dirty": None}


def test_a_file_in_both_split_lists_is_refused(ids_data, tmp_path, capsys):
    """Validation would score samples the model trained on; the same file spelt another way is caught too."""
    root, _ = ids_data
    pair = (root / "data" / "data1.npy", root / "model" / "model1.npy")
    train = write_split_list(tmp_path / "train.txt", [pair, (root / "data" / "data2.npy", root / "model" / "model2.npy")])
    val = write_split_list(tmp_path / "val.txt", [(root / "data" / ".." / "data" / "data1.npy", pair[1])])
    assert T.cli(["--train-list", str(train), "--val-list", str(val), *BASE_RUN, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: {root / 'data' / '..' / 'data' / 'data1.npy'} is in "
                                       "both the training and the validation split: validation would score samples the "
                                       "model trained on\n")
    assert not (tmp_path / "o").exists()


def test_a_file_listed_twice_in_a_split_is_refused(ids_data, tmp_path, capsys):
    """Its samples would count twice in the epoch (or in the validation metrics), however the path is spelt."""
    root, _ = ids_data
    pairs = [(root / "data" / f"data{i}.npy", root / "model" / f"model{i}.npy") for i in (1, 2)]
    again = (root / "data" / ".." / "data" / "data1.npy", pairs[0][1])
    for kind, lists in (("training", ([*pairs, again], [])), ("validation", ([pairs[1]], [pairs[0], again]))):
        train, val = (write_split_list(tmp_path / f"{n}.txt", p) for n, p in (("train", lists[0]), ("val", lists[1])))
        argv = ["--train-list", str(train), *(["--val-list", str(val)] if lists[1] else ["--val-every", "0"])]
        assert T.cli([*argv, *BASE_RUN, "--output-dir", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == (f"train_inversionnet.py: error: {again[0]} is listed twice in the {kind} "
                                           "split: its samples would count twice\n")


def test_a_label_file_stays_in_one_split_and_pairs_share_their_number(ids_data, tmp_path, capsys):
    """One label map file may serve several data files of a split (shots of one model with other noise), but
    not both splits; a list line pairing data1.npy with model2.npy names the line (names not numbered as
    OpenFWI's are not compared)."""
    root, _ = ids_data
    for name, target in (("shots_a.npy", "data/data1.npy"), ("shots_b.npy", "data/data2.npy"), ("labels.npy", "model/model1.npy")):
        (tmp_path / name).symlink_to(root / target)
    a, b, labels = (tmp_path / n for n in ("shots_a.npy", "shots_b.npy", "labels.npy"))
    assert set(T.real_paths([(a, labels), (b, labels)], "training").values()) == {a, b, labels}
    train, val = write_split_list(tmp_path / "train.txt", [(a, labels)]), write_split_list(tmp_path / "val.txt", [(b, labels)])
    assert T.cli(["--train-list", str(train), "--val-list", str(val), *BASE_RUN, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: {labels} is in both the training and the validation "
                                       "split: validation would score samples the model trained on\n")
    names = write_split_list(tmp_path / "names.txt", [("seismic_001.npy", "velocity_001.npy"), ("data1.npy", "velocity1.npy"),
                                                      ("seis2_1_0.npy", "vel2_1_0.npy")])
    assert len(T.read_split_list(str(names))) == 3
    swapped = write_split_list(tmp_path / "train.txt", [(root / "data" / "data1.npy", root / "model" / "model2.npy")])
    assert T.cli(["--train-list", str(swapped), "--val-every", "0", *BASE_RUN, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: {swapped}:1: {root / 'data' / 'data1.npy'} is paired "
                                       f"with {root / 'model' / 'model2.npy'}: a pair's files share their name after the "
                                       "prefix (data1.npy, model1.npy)\n")
    assert not (tmp_path / "o").exists()


def test_predictions_written_beside_their_inputs_are_no_training_data(tmp_path):
    """--predict writes <stem>_velocity.npy, beside the inputs if asked: --data-root pairs the files around them."""
    write_ids_dataset(tmp_path, (2, 2))
    (tmp_path / "data" / "data1_velocity.npy").touch()
    assert [os.path.basename(d) for d, _ in T.find_pairs(str(tmp_path))] == ["data1.npy", "data2.npy"]


def test_split_lists_hold_paths_with_spaces(tmp_path):
    d = tmp_path / "my data ü"
    d.mkdir()
    (d / "tab.txt").write_text(f"{d}/data/a b.npy\t{d}/model/a b.npy\n\nrel dir/x.npy\trel dir/y.npy\n")
    assert T.read_split_list(str(d / "tab.txt")) == [(f"{d}/data/a b.npy", f"{d}/model/a b.npy"),
                                                      (f"{d}/rel dir/x.npy", f"{d}/rel dir/y.npy")]
    (d / "spaces.txt").write_text("x.npy   y.npy\n")  # a list separated by spaces, as some OpenFWI lists are
    assert T.read_split_list(str(d / "spaces.txt")) == [(f"{d}/x.npy", f"{d}/y.npy")]
    (d / "loose.txt").write_text("a b.npy\t\tc.npy\nd.npy e.npy\t\n")  # doubled tabs; a stray tab after spaces
    assert T.read_split_list(str(d / "loose.txt")) == [(f"{d}/a b.npy", f"{d}/c.npy"), (f"{d}/d.npy", f"{d}/e.npy")]
    (d / "three.txt").write_text("a.npy\tb.npy\tc.npy\n")
    with pytest.raises(T.DataError, match="three.txt:1: expected 'data_path<TAB>label_path'"):
        T.read_split_list(str(d / "three.txt"))
    (d / "bom.txt").write_text("\ufeffx.npy\ty.npy\n", encoding="utf-8")  # as some editors save it
    assert T.read_split_list(str(d / "bom.txt")) == [(f"{d}/x.npy", f"{d}/y.npy")]
    with pytest.raises(T.DataError, match="rel dir/x.npy: a directory, not a .npy file"):
        (d / "rel dir" / "x.npy").mkdir(parents=True)
        T.inspect_pairs(T.read_split_list(str(d / "tab.txt"))[1:])


# ---- training behaviour ----

@pytest.mark.parametrize("speed", [dict(amp="off", channels_last=False), dict(amp="bf16", channels_last=True)],
                         ids=["fp32", "bf16-channels-last"])
def test_overfits_one_batch(speed):
    """The script's own Run and train_step drive the loss of one simulated batch down fivefold within 12 steps,
    in fp32 and on the CPU fast path (bf16 autocast, channels-last)."""
    from simulate_openfwi import flatvel, simulate
    v = torch.from_numpy(flatvel(np.random.default_rng(0), 2))
    norm = T.Normalizer(-26.95, 52.77)
    x, y = norm.data(simulate(v)), norm.label(v[:, None])
    if speed["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    # lr 5e-4 falls fastest at this length (about 7.5x by step 12); a step costs ~0.3 s of two cores
    args = small_args(device="cpu", lr=5e-4, weight_decay=0.0, lr_scheduler="none", **speed)
    run, _ = T.build_run(args, torch.device("cpu"), 12)
    assert run.amp_dtype == T.AMP_DTYPES[speed["amp"]]
    losses = [T.train_step(run, x, y).item() for _ in range(12)]
    assert run.step == 12 and min(losses[-3:]) < losses[0] / 5


def test_bf16_training_step_computes_the_convolutions_in_bf16():
    """--amp bf16 on the CPU: the script's own train_step runs the forward under bf16 autocast (the speed and
    the rounding that --fast picks), while the loss stays float32."""
    torch.manual_seed(0)
    run, _ = T.build_run(small_args(device="cpu", amp="bf16", lr_scheduler="none"), torch.device("cpu"), 1)
    loss, seen = conv_dtypes_during(lambda: T.train_step(run, torch.randn(2, 5, 1000, 70), torch.zeros(2, 1, 70, 70)))
    assert len(seen) == 25 and set(seen) == {torch.bfloat16}  # InversionNet's 25 (de)convolutions, each once
    assert loss.dtype == torch.float32 and run.step == 1


def test_lambda_l2_adds_that_weight_of_mse_to_the_l1_loss():
    """--lambda-l1 / --lambda-l2: the loss is l1 * L1 + l2 * MSE of the normalised maps, in float32 even for a
    bf16 prediction."""
    pred = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    l1, mse = (0.5 + 1 + 0 + 2) / 4, (0.25 + 1 + 0 + 4) / 4
    assert T.loss_fn(pred, target).item() == pytest.approx(l1)  # the default: pure L1, as the paper trains
    assert T.loss_fn(pred, target, 1.0, 0.5).item() == pytest.approx(l1 + 0.5 * mse)
    assert T.loss_fn(pred, target, 0.0, 2.0).item() == pytest.approx(2 * mse)
    assert T.loss_fn(pred, target, 0.5, 0.0).item() == pytest.approx(0.5 * l1)  # --lambda-l1 weighs the L1 term
    loss = T.loss_fn(pred.bfloat16(), target, 1.0, 0.5)  # these values are exact in bf16
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(l1 + 0.5 * mse)
    torch.manual_seed(0)
    run, _ = T.build_run(small_args(device="cpu", lambda_l1=0.5, lambda_l2=2.0), torch.device("cpu"), 1)
    x, y = torch.randn(2, 5, 1000, 70), torch.rand(2, 1, 70, 70) * 2 - 1
    with torch.no_grad():  # train mode, as the step sees it: BatchNorm uses this batch's statistics either way
        pred = run.model(x)
    got = T.train_step(run, x, y).item()  # the training step trains on the weighted loss, not the default L1
    assert got == pytest.approx(T.loss_fn(pred, y, 0.5, 2.0).item(), rel=1e-5)
    assert got != pytest.approx(T.loss_fn(pred, y).item(), rel=1e-2)


def test_optimizer_adam_takes_the_weight_decay_as_its_l2_term_and_adamw_is_the_default():
    """--optimizer adam: torch.optim.Adam, with --weight-decay as its L2 term (added to the gradient), not the
    decoupled decay of AdamW, the default. AdamW subclasses Adam in torch, so the exact class is checked."""
    for flags, cls in ((dict(), torch.optim.AdamW), (dict(optimizer="adam", weight_decay=0.05), torch.optim.Adam)):
        args = small_args(device="cpu", lr=2e-3, betas=[0.8, 0.95], lr_scheduler="none", **flags)
        run, _ = T.build_run(args, torch.device("cpu"), 1)
        assert type(run.optimizer) is cls
        [group] = run.optimizer.param_groups  # every parameter, one group
        assert len(group["params"]) == len(list(run.raw_model.parameters()))
        assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-3, (0.8, 0.95), flags.get("weight_decay", 1e-4))
        assert group["decoupled_weight_decay"] is (cls is torch.optim.AdamW)


def test_build_run_takes_the_optimizer_flags():
    """--grad-clip reaches the step, and --fused-adam the optimizer (the CPU's fused AdamW since torch 2.4)."""
    cpu = torch.device("cpu")
    run, _ = T.build_run(small_args(grad_clip=0.5, fused_adam=True, lr=3e-4, weight_decay=0.01), cpu, 4)
    group = run.optimizer.param_groups[0]
    assert run.grad_clip == 0.5 and group["fused"] is True and (group["lr"], group["weight_decay"]) == (3e-4, 0.01)
    run, _ = T.build_run(small_args(fused_adam=False), cpu, 4)
    assert run.grad_clip == 0 and not run.optimizer.param_groups[0]["fused"]


def test_a_step_trains_at_the_rate_the_schedule_gives_it_then_moves_the_schedule_on():
    """The rate of step k is the schedule's value at k (a warm-up's first step at its first factor): the
    scheduler steps after the optimizer. SGD makes each step's change lr x gradient."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    factors = [0.1, 0.5, 1.0]
    run = T.Run(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: factors[min(k, 2)]),
                torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    changes = []
    for _ in range(3):
        before = model.weight.item()
        T.train_step(run, torch.ones(1, 1), torch.full((1, 1), -100.0))  # L1: the gradient is 1 while w > -100
        changes.append(before - model.weight.item())
    assert changes == pytest.approx(factors) and run.step == 3


def test_a_float32_step_takes_a_reduced_precision_cache_batch():
    """--loader gpu --cache-dtype bfloat16 with --amp off: the bf16 batch meets float32 weights as float32."""
    model = torch.nn.Linear(3, 3)
    loss = T.loss_fn(T.forward(model, torch.ones(2, 3, dtype=torch.bfloat16), None), torch.zeros(2, 3))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("loss_scaling", [False, True], ids=["unscaled", "fp16-grad-scaler"])
def test_grad_clip_scales_the_gradient_norm_down_to_the_limit(loss_scaling):
    """--grad-clip: the script's own train_step rescales a gradient whose norm exceeds the limit to that norm
    (direction kept) before the optimizer step; one under the limit is applied as is. Under fp16's GradScaler
    the limit applies to the true gradient, not the scaled one. SGD with lr 1 makes the weights' change the
    applied gradient."""
    def step(clip, scale):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        run = T.Run(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0),
                    torch.amp.GradScaler("cpu", enabled=loss_scaling), torch.device("cpu"), grad_clip=clip)
        x, y = torch.randn(2, 4) * scale, torch.zeros(2, 3)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        T.loss_fn(model(x), y).backward()
        raw = torch.cat([p.grad.flatten() for p in model.parameters()])  # the gradient train_step will compute
        T.train_step(run, x, y)
        return before - torch.cat([p.detach().flatten() for p in model.parameters()]), raw

    applied, raw = step(clip=0.5, scale=100.0)
    assert raw.norm() > 10  # far above the limit
    assert applied.norm().item() == pytest.approx(0.5, rel=1e-4)
    torch.testing.assert_close(applied, raw * 0.5 / raw.norm(), rtol=1e-4, atol=1e-6)
    applied, raw = step(clip=1e3, scale=100.0)
    torch.testing.assert_close(applied, raw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])  # with --ema-decay, the average's statistics (it is kept in eval mode)
def test_precise_bn_replaces_running_statistics_by_the_batches_average(ema_decay):
    torch.manual_seed(0)
    run, _ = T.build_run(small_args(device="cpu", lr_scheduler="none", ema_decay=ema_decay), torch.device("cpu"), 1)
    x, y = torch.randn(3, 5, 1000, 70), torch.zeros(3, 1, 70, 70)
    T.precise_bn(run, T.RepeatedBatch(x, y, 5), 2)  # two passes over the same batch: its own statistics
    bn = run.eval_model.convblock1.layers[1]
    with torch.no_grad():
        h = run.eval_model.convblock1.layers[0](x)
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 and bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("kind, workers", [("map", 0), ("map", 2), ("iterable", 0), ("iterable", 2), ("gpu", 0)])
def test_loaders_start_an_epoch_at_a_given_batch(tmp_path, kind, workers):
    """A mid-epoch resume continues with exactly the batches the interrupted epoch had left."""
    pairs = write_ids_dataset(tmp_path, (5, 3, 7))
    norm = T.Normalizer(-30, 60)
    cfg = T.LoaderConfig(kind=kind, batch_size=2, num_workers=workers, seed=4)
    loader = T.build_loader(cfg, pairs, [5, 3, 7], norm, torch.device("cpu"))
    loader.set_epoch(3)
    whole = [x[:, 0, 0, 0].tolist() for x, _ in T.device_batches(loader, torch.device("cpu"), norm)]  # normalised ids
    assert len(whole) == len(loader) >= 6
    for start in (1, 4, len(whole) - 1, len(whole)):  # the last: an epoch trained whose validation a signal stopped
        loader.set_epoch(3, start=start)
        rest = [x[:, 0, 0, 0].tolist() for x, _ in T.device_batches(loader, torch.device("cpu"), norm)]
        assert len(loader) == len(whole) and rest == whole[start:], start


def test_without_workers_reader_threads_give_the_dataloaders_batches(tmp_path, monkeypatch):
    """--num-workers 0: threads read each batch straight into place; the batches, their order (seeded, from a
    given batch on), a per-sample transform and the loader-side normalisation are a worker DataLoader's."""
    pairs = write_ids_dataset(tmp_path, (5, 3, 7))
    norm = T.Normalizer(-30, 60)
    readers, read_into = set(), T.MapDataset.read_into
    monkeypatch.setattr(T.MapDataset, "read_into", lambda *a: readers.add(threading.current_thread()) or read_into(*a))

    def batches(workers, train, start=0):
        cfg = T.LoaderConfig(kind="map", batch_size=4, num_workers=workers, seed=5, normalize_in_workers=not train)
        loader = T.build_loader(cfg, pairs, [5, 3, 7], norm, torch.device("cpu"), train=train,
                                transform=lambda x, i: x + i)  # eval's perturbations are drawn per sample index too
        loader.set_epoch(2, start=start)
        return len(loader), loader.normalized, [(x.clone(), y.clone()) for x, y in loader]

    for train, start in ((True, 0), (True, 2), (False, 0)):
        threaded, dataloader = batches(0, train, start), batches(1, train, start)
        assert threaded[:2] == dataloader[:2] and len(threaded[2]) == len(dataloader[2]) > 0
        for (x, y), (x1, y1) in zip(threaded[2], dataloader[2]):
            assert torch.equal(x, x1) and torch.equal(y, y1)
    assert readers and threading.main_thread() not in readers


def test_a_loop_that_stops_early_stops_the_reads_under_way_at_their_next_sample(tmp_path, monkeypatch):
    """A stop (a signal, --precise-bn's few batches) closes the loader's iterator; waiting there for the reads
    ahead would delay the stop (a second Ctrl-C during that wait would be dropped by Python's finaliser), and
    letting them run on would read batches nobody takes."""
    pairs = write_ids_dataset(tmp_path, (5, 3, 7))
    release, started, done, copied = threading.Event(), [], [], []
    read_into, check_finite = T.MapDataset.read_into, T.check_finite

    def held(self, indices, x, y, stop):  # every read after the first waits for the test
        started.append(indices)
        if len(started) > 1:
            release.wait(10)
        read_into(self, indices, x, y, stop)
        done.append(indices)

    monkeypatch.setattr(T.MapDataset, "read_into", held)
    monkeypatch.setattr(T, "check_finite", lambda *a: copied.append(a[3]) or check_finite(*a))  # once per sample read
    loader = T.build_loader(T.LoaderConfig(kind="map", batch_size=2, num_workers=0), pairs, [5, 3, 7],
                            T.Normalizer(-30, 60), torch.device("cpu"))
    batches = iter(loader)
    next(batches)
    batches.close()
    assert len(done) == 1 and not release.is_set()  # closed while the reads ahead were still held
    release.set()
    assert wait_until(lambda: len(done) == len(started), 10)
    assert len(started) > 1 and len(copied) == 2  # the held reads, let go after the close, read nothing


def test_check_finite_names_the_first_bad_sample_its_data_before_its_label():
    pair, samples = ("d.npy", "m.npy"), range(10, 14)  # a block of rows 10-13 of its files
    x, y = np.zeros((4, 2)), np.zeros((4, 3))
    T.check_finite(x, y, pair, samples)
    y[1, 2], x[2, 0] = np.nan, np.inf
    with pytest.raises(T.DataError, match=r"^m\.npy sample 11: NaN or Inf in the label$"):
        T.check_finite(x, y, pair, samples)
    x[1, 1] = -np.inf
    with pytest.raises(T.DataError, match=r"^d\.npy sample 11: NaN or Inf in the data$"):
        T.check_finite(x, y, pair, samples)


def test_normalising_in_the_workers_trains_as_normalising_on_the_device(tmp_path):
    """--normalize workers moves the normalisation into the loader (its workers, or the loop's thread as reader
    threads hand each batch over with --num-workers 0): two steps take the same batches to the same losses and weights as the default, which
    normalises on the device; nothing is left raw or normalised twice."""
    pairs = write_ids_dataset(tmp_path, (4, 4))
    cpu, norm = torch.device("cpu"), T.Normalizer(*T.DATASETS["flatvel-a"])
    results = []
    for normalize, workers in (("device", 0), ("workers", 0), ("workers", 1)):
        args = small_args(device="cpu", normalize=normalize, num_workers=workers, batch_size=2, lr_scheduler="none")
        loader = T.build_loader(T.LoaderConfig.from_args(args, True), pairs, [4, 4], norm, cpu)
        loader.set_epoch(0)
        assert loader.normalized == (normalize == "workers")
        torch.manual_seed(0)
        run, _ = T.build_run(args, cpu, len(loader))
        losses = [T.train_step(run, x, y).item() for _, (x, y) in zip(range(2), T.device_batches(loader, cpu, norm))]
        results.append((losses, run.raw_model.state_dict()))
    (base, weights), *others = results
    for losses, w in others:
        assert losses == pytest.approx(base, rel=1e-6)
        torch.testing.assert_close(w, weights)


def test_round_robin_position_follows_the_dataloader_order():
    # workers yield 3, 1 and 2 batches: the DataLoader takes them as w0 w1 w2 w0 w2 w0
    assert T.round_robin_position([3, 1, 2], 0) == ([0, 0, 0], 0)
    assert T.round_robin_position([3, 1, 2], 1) == ([1, 0, 0], 1)
    assert T.round_robin_position([3, 1, 2], 4) == ([2, 1, 1], 2)
    assert T.round_robin_position([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert T.round_robin_position([3, 1, 2], 6) == ([3, 1, 2], 0)


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    """12 samples in files of 4: the split lists train on files 1-2 (8 samples), validate on file 3."""
    root = tmp_path_factory.mktemp("ids")
    pairs = write_ids_dataset(root, (4, 4, 4))
    lists = ["--train-list", write_split_list(root / "train.txt", pairs[:2]), "--val-list", write_split_list(root / "val.txt", pairs[2:])]
    return root, lists


COMMON = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1", "--deterministic", "--lr", "1e-3",
          "--dataset", "flatvel-a"]


@pytest.mark.slow
def test_resume_gives_identical_weights(tmp_path, ids_data):
    _, lists = ids_data
    a, b = tmp_path / "straight", tmp_path / "resumed"
    # a learning rate that ramps up over epoch 0 and drops at epoch 1: the resumed run must continue the schedule
    common = [*COMMON, "--lr-warmup-epochs", 1, "--lr-milestones", 1]
    r = run_script(TRAIN, *lists, *common, "--epochs", 2, "--output-dir", a)
    assert r.returncode == 0, r.stderr
    # each epoch's line ends with where its time went, and TensorBoard has the same three figures
    split = r"\| \d+\.\d s train, \d+\.\d s val, \d+\.\d s checkpoint"
    lines = re.findall(rf"^epoch \d train loss \S+ \| val loss .* SSIM \S+ {split}(.*)$", r.stdout, flags=re.M)
    assert len(lines) == 2 and re.fullmatch(r"; about [\d.]+ (s|min|h) left", lines[0]) and lines[1] == "", r.stdout  # the time to go
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(a / "tb"))
    events.Reload()
    for part in ("train", "val", "checkpoint"):
        assert [e.step for e in events.Scalars(f"epoch_seconds/{part}")] == [4, 8]
    for name in ("loss", "mae", "rmse", "ssim"):  # the validation curves, at the step each epoch ended
        assert [e.step for e in events.Scalars(f"val/{name}")] == [4, 8], name
    for name in ("loss", "lr", "samples_per_s", "data_wait"):  # --log-every 1: a point per step
        assert [e.step for e in events.Scalars(f"train/{name}")] == list(range(1, 9)), name
    val_loss = [float(v) for v in re.findall(r"^epoch \d train loss \S+ \| val loss (\S+) ", r.stdout, re.M)]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx(val_loss, abs=1e-4)
    r = run_script(TRAIN, *lists, *common, "--epochs", 1, "--output-dir", b)
    assert r.returncode == 0, r.stderr
    shutil.copy(b / "last.pt", tmp_path / "epoch1.pt")
    r = run_script(TRAIN, *lists, *common, "--epochs", 2, "--output-dir", b, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    # as if that start had been killed after logging steps 5-8 but before its checkpoint: resumed again, the
    # TensorBoard curves hold each step once (the killed start's points past step 4 are dropped)
    shutil.copy(tmp_path / "epoch1.pt", b / "last.pt")
    r = run_script(TRAIN, *lists, *common, "--epochs", 2, "--output-dir", b, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "start of epoch 1" in r.stdout
    events = EventAccumulator(str(b / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    sa = torch.load(a / "last.pt", weights_only=False)
    sb = torch.load(b / "last.pt", weights_only=False)
    assert sa["epoch"] == 2 and sa["step"] == 8
    assert_same_weights(sa, sb)
    for k in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_loss", "args", "rng"):
        assert k in sa
    assert (a / "best.pt").exists() and (a / "args.json").exists() and (a / "train.log").exists()
    assert list((a / "tb").glob("events.out.tfevents.*"))
    assert not list(a.glob("*.tmp-*"))


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"precious")
    assert T.cli(["--data-root", str(tmp_path / "never-read"), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err
    assert (out / "last.pt").read_bytes() == b"precious"
    (out / "last.pt").unlink()  # a start that failed before its first checkpoint (a NaN in a file, say)
    (out / "args.json").write_text("{}")
    assert T.cli(["--data-root", str(tmp_path / "never-read"), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: --output-dir {out} holds a run that has written "
                                       "no checkpoint yet (one in its first epoch, or a start that failed: its train.log "
                                       "says); pass --resume auto to start it there anew, --overwrite to replace its "
                                       "files, or choose another --output-dir\n")
    assert (out / "args.json").read_text() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--amp", "bf16"], ["--compile", "--channels-last", "--max-steps", "2"]])
def test_amp_and_compile_on_cpu(tmp_path, ids_data, extra):
    _, lists = ids_data
    out = tmp_path / "run"
    compiled = "--compile" in extra
    # dynamo's INFO log names each frame it traces: the run must compile the script's own InversionNet.forward
    r = run_script(TRAIN, *lists, "--batch-size", "2", "--num-workers", "0", "--no-progress", "--epochs", 1,
                   "--output-dir", out, "--device", "cpu", *extra, env={"TORCH_LOGS": "dynamo"} if compiled else None)
    assert r.returncode == 0, r.stderr[-3000:]
    traced = re.search(r"torchdynamo start tracing forward \S*train_inversionnet\.py:\d+", r.stderr)
    assert bool(traced) == compiled, r.stderr[-3000:]
    ck = torch.load(out / "last.pt", weights_only=False)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    m = T.InversionNet()
    m.load_state_dict(ck["model"])  # strict: loads into a plain model


@pytest.mark.parametrize("mode, passed", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                           ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_mode_reaches_torch_compile(monkeypatch, mode, passed):
    """--compile-mode is the mode torch.compile gets ("default": torch's own, no mode named)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: calls.append(mode) or model)
    run, _ = T.build_run(small_args(compile=True, compile_mode=mode), torch.device("cpu"), iters_per_epoch=10)
    assert calls == [passed] and run.model is run.raw_model
    T.build_run(small_args(compile=False, compile_mode=mode), torch.device("cpu"), iters_per_epoch=10)
    assert calls == [passed]  # without --compile nothing is compiled


@pytest.mark.slow
def test_profile_writes_a_trace(tmp_path, ids_data):
    _, lists = ids_data
    out = tmp_path / "run"
    r = run_script(TRAIN, *lists, *COMMON, "--epochs", 1, "--max-steps", 3, "--profile", "--output-dir", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / "tb").glob("*.pt.trace.json*"))



def test_the_time_left_is_the_remaining_steps_at_the_pace_of_this_processes_epochs_after_its_first(monkeypatch):
    """An epoch's line ends with the time to go: the steps left to --epochs (or --max-steps, the earlier) at the pace
    of this process's epochs after its first, which pays one-off costs (a compilation); until then, the first
    epoch's own pace, unless it compiled. A resumed run's earlier steps ran elsewhere and do not count."""
    clock = iter([0.0, 60.0, 90.0, 3690.0])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    args, run = T.get_args_parser().parse_args(["--epochs", "10"]), types.SimpleNamespace(step=400)  # resumed at 400
    left = T.TimeLeft(run, args, n_batches=100)  # t = 0
    run.step = 500
    assert left.after_epoch(run) == "; about 5 min left"  # t = 60: 500 steps at 0.6 s
    run.step = 600
    assert left.after_epoch(run) == "; about 2 min left"  # t = 90: the second epoch alone, 400 steps at 0.3 s
    run.step = 700
    assert left.after_epoch(run) == "; about 1.5 h left"  # t = 3690: 200 steps in 3630 s since the first epoch, 300 to go
    clock = iter([0.0, 60.0, 90.0, 95.0])
    args.compile, args.max_steps, run.step = True, 350, 100
    left = T.TimeLeft(run, args, n_batches=100)
    run.step = 200
    assert left.after_epoch(run) == ""  # compiled: its first epoch's pace says nothing of the rest
    run.step = 300
    assert left.after_epoch(run) == "; about 15 s left"  # to --max-steps 350, at 0.3 s a step
    run.step = 350
    assert left.after_epoch(run) == ""  # the end: nothing to go

# ---- --fast ----

def parsed(*flags):
    return T.check_args(T.get_args_parser().parse_args(list(flags)))


def test_free_memory_on_mps_is_its_budget_left_or_unknown_before_torch_has_the_query(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 10 * 2**30, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * 2**30)
    assert T.free_memory(torch.device("mps")) == 6 * 2**30
    monkeypatch.delattr(torch.mps, "recommended_max_memory")  # torch 2.3 and 2.4: no cache, not an AttributeError
    assert T.free_memory(torch.device("mps")) == 0


@pytest.mark.parametrize("free, others_short, local, needle", [
    (20e9, 1, None, "does not fit on 1 of the 2 ranks (their lines say how short); use --loader map"),  # said by rank 0
    (1e9, 0, True, "needs 1.42 GB on cpu and 0.10 GB is free"),  # this rank alone: its own [rank N] line
    (1e9, 1, False, "needs 1.42 GB on cpu and 0.10 GB is free"),  # every rank: rank 0's line, once
])
def test_a_device_cache_too_large_for_one_rank_is_said_by_that_rank_and_rank_0(monkeypatch, free, others_short, local,
                                                                               needle):
    """An explicit --loader gpu is checked on every rank, and one device may have less free than the others: the
    ranks agree, so no rank goes on to wait for one that stopped without a line."""
    monkeypatch.setattr(T, "free_memory", lambda device: free / 10)
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(T, "all_reduce_sum", lambda t: t + others_short)
    with pytest.raises(T.InputError, match=re.escape(needle)) as e:
        T.check_cache_fits(1000, "float32", torch.device("cpu"), "use --loader map")
    assert local is None or e.value.local is local


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_fast_on_cpu_picks_the_measured_best_and_given_flags_win(monkeypatch, native):
    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(T, "free_memory", lambda device: 10e9)
    cpu = torch.device("cpu")
    args = parsed("--fast")
    line = T.resolve_speed(args, cpu, cache_samples=1000)  # 0.7-1.4 GB: fits in half of 10 GB
    speed = {k: getattr(args, k) for k in T.SPEED_FLAGS}
    assert speed == dict(amp="bf16" if native else "off", channels_last=True, compile=False, fused_adam=True,
                         loader="gpu", cache_dtype="bfloat16" if native else "float32")
    assert f"--fast for cpu (native bf16: {'yes' if native else 'no'})" in line and "given" not in line
    args = parsed("--fast", "--amp", "off", "--no-channels-last", "--loader", "map")
    line = T.resolve_speed(args, cpu, cache_samples=1000)
    assert (args.amp, args.channels_last, args.loader, args.cache_dtype, args.compile) == ("off", False, "map", "float32", False)
    assert line.endswith("given: --amp --channels-last --loader")
    args = parsed("--fast", "--amp", "off")
    args.config = "runs/a/args.json"  # its speed flags arrive as if given: the line says where they may come from
    assert T.resolve_speed(args, cpu, cache_samples=1000).endswith("; --fast for cpu (native bf16: "
                                                                   f"{'yes' if native else 'no'}), given or from --config: --amp")
    args = parsed("--fast")
    T.resolve_speed(args, cpu, cache_samples=8000)  # 5.6-11.2 GB: more than half the free memory
    assert args.loader == "map"
    with pytest.raises(T.InputError, match=r"^--loader gpu: the split's cache needs 11.36 GB on cpu and 10.00 GB is "
                                           r"free; use --loader map, or a smaller --cache-dtype$"):
        T.resolve_speed(parsed("--loader", "gpu"), cpu, cache_samples=8000)  # asked for, yet it cannot fit
    line = T.resolve_speed(parsed("--amp", "fp16"), cpu, cache_samples=10)
    assert line.endswith("given: --amp; note: fp16 training on a CPU is far slower than fp32 (PyTorch's fp16 convolution "
                         "backward is a slow generic kernel there): bf16 or off trains faster")
    args = parsed()
    assert T.resolve_speed(args, cpu, cache_samples=10).endswith("; defaults")
    assert {k: getattr(args, k) for k in T.SPEED_FLAGS} == dict(amp="off", channels_last=False, compile=False,
                                                                 fused_adam=False, loader="map", cache_dtype="float32")


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-without-bf16"])
def test_fast_on_cuda(monkeypatch, bf16):
    """bf16 where the GPU has it (no loss scaling); fp16 and its GradScaler on one without (a V100, say)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(T, "free_memory", lambda device: 80e9)
    args = parsed("--fast")
    T.resolve_speed(args, torch.device("cuda", 0), cache_samples=30000)  # OpenFWI's FlatVel-A in bf16: 21 GB
    half = ("bf16", "bfloat16") if bf16 else ("fp16", "float16")
    assert {k: getattr(args, k) for k in T.SPEED_FLAGS} == dict(amp=half[0], channels_last=True, compile=True, fused_adam=True,
                                                                 loader="gpu", cache_dtype=half[1])


def test_fast_with_amp_off_trains_in_fp32_and_records_its_choice(tmp_path, ids_data, capsys):
    _, lists = ids_data
    out = tmp_path / "run"
    argv = [*map(str, lists), "--batch-size", "2", "--epochs", "1", "--no-progress", "--dataset", "flatvel-a",
            "--output-dir", str(out), "--fast", "--amp", "off", "--precise-bn", "2", "--device", "cpu"]
    code, seen = conv_dtypes_during(lambda: T.cli(argv))
    assert code == 0 and seen and set(seen) == {torch.float32}  # where bf16 is native, --fast alone would pick it
    saved = json.loads((out / "args.json").read_text())
    assert (saved["amp"], saved["channels_last"], saved["loader"], saved["cache_dtype"], saved["compile"]) == (
        "off", True, "gpu", "float32", False)
    assert "speed: amp off, channels-last on, compile off, fused adam on, loader gpu (float32 cache, 0.02 GB); " \
           "--fast for cpu" in capsys.readouterr().out
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["args"]["amp"] == "off" and ck["step"] == 4
    assert ck["model"]["convblock1.layers.1.num_batches_tracked"].item() == 2  # the statistics of --precise-bn 2


# ---- repeatable runs, provenance, guards ----

BASE_RUN = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--dataset", "flatvel-a", "--lr", "1e-3"]


@pytest.mark.slow
def test_config_repeats_a_run_bit_for_bit_and_records_provenance(tmp_path, ids_data):
    _, lists = ids_data
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_script(TRAIN, *lists, *BASE_RUN, "--epochs", 1, "--deterministic", "--seed", 5, "--output-dir", a)
    assert r.returncode == 0, r.stderr
    r = run_script(TRAIN, "--config", a / "args.json", "--output-dir", b)
    assert r.returncode == 0, r.stderr
    wa, wb = (torch.load(d / "last.pt", weights_only=False) for d in (a, b))
    assert wa["step"] == 4
    assert_same_weights(wa, wb)
    saved_a, saved_b = (json.loads((d / "args.json").read_text()) for d in (a, b))
    same = lambda saved: {k: v for k, v in saved.items() if k not in ("output_dir", "config")}
    assert same(saved_a) == same(saved_b) and saved_b["config"] == str(a / "args.json")
    prov = json.loads((b / "provenance.json").read_text())
    assert len(prov) == 1 and prov[0] == wb["provenance"]
    assert prov[0]["command"] == ["train_inversionnet.py", "--config", str(a / "args.json"), "--output-dir", str(b)]
    assert set(prov[0]) >= {"git_commit", "git_dirty", "python", "torch", "numpy", "device", "start_time"}
    assert prov[0]["torch"] == torch.__version__ and prov[0]["device"] == T.device_name(T.resolve_device("auto"))
    # flags given beside --config win; --resume and --overwrite never come from it
    c = tmp_path / "c"
    assert T.cli(["--config", str(a / "args.json"), "--output-dir", str(c), "--no-deterministic", "--max-steps", "1"]) == 0
    saved_c = json.loads((c / "args.json").read_text())
    assert (saved_c["deterministic"], saved_c["max_steps"], saved_c["seed"], saved_c["resume"]) == (False, 1, 5, None)


def test_a_data_root_given_beside_config_replaces_its_split_lists(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"train_list": "a/train.txt", "val_list": "a/val.txt", "data_root": "data/flatvel", "seed": 5}))
    args = T.parse_args(["--config", str(path), "--data-root", "other"])
    assert (args.data_root, args.train_list, args.val_list, args.seed) == ("other", None, None, 5)
    args = T.parse_args(["--config", str(path), "--val-list", "b/val.txt"])  # one list given: the other stays
    assert (args.train_list, args.val_list) == ("a/train.txt", "b/val.txt")



def test_a_normalisation_given_beside_config_replaces_the_saved_one(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"stats": "a/dataset.json", "dataset": None, "seed": 5}))
    args = T.parse_args(["--config", str(path), "--dataset", "flatvel-b"])  # else the saved --stats would win over it
    assert (args.dataset, args.stats, args.seed) == ("flatvel-b", None, 5)
    path.write_text(json.dumps({"stats": None, "dataset": "curvevel-a"}))
    assert (lambda a: (a.dataset, a.stats))(T.parse_args(["--config", str(path), "--stats", "b.json"])) == (None, "b.json")


def test_config_resume_auto_continues_its_run_from_any_directory(ids_data, tmp_path, monkeypatch):
    """args.json names the run's own directory absolutely: repeated from elsewhere with --resume auto, the run
    goes on where it is, not in a new directory of the same relative name under the working directory."""
    _, lists = ids_data
    monkeypatch.chdir(tmp_path)
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "1", "--output-dir", "runs/a"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = str(tmp_path / "runs" / "a" / "args.json")
    assert T.cli(["--config", config, "--resume", "auto", "--epochs", "2"]) == 0
    assert torch.load(tmp_path / "runs" / "a" / "last.pt", weights_only=False)["epoch"] == 2
    assert T.cli(["--config", config]) == 2  # without --resume: refused, as from the run's own directory
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_config_never_replays_resume_or_overwrite(tmp_path):
    """A saved args.json that continued or replaced a run: repeating it must not continue or delete anything."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"resume": "auto", "overwrite": True, "seed": 5}))
    args = T.parse_args(["--config", str(path)])
    assert (args.resume, args.overwrite, args.seed) == (None, False, 5)
    path.write_text(json.dumps({"resume": str(tmp_path / "last.pt"), "overwrite": False}))
    assert T.parse_args(["--config", str(path)]).resume is None


def test_a_validated_best_pt_is_kept_when_a_resume_stops_validating(ids_data, tmp_path, capsys):
    """best.pt takes every epoch's weights only in a run that never validated: a validated run resumed with
    --val-every 0 keeps the best model it measured, needs no validation split to do so (its files may be gone),
    and validates on its split again when resumed with it."""
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--output-dir", str(tmp_path / "run")]
    assert T.cli([*argv, "--epochs", "1"]) == 0
    best = (tmp_path / "run" / "best.pt").read_bytes()
    train_only = [*map(str, lists[:2]), *BASE_RUN, "--output-dir", str(tmp_path / "run")]
    assert T.cli([*train_only, "--epochs", "2", "--resume", "auto", "--val-every", "0"]) == 0
    assert (tmp_path / "run" / "best.pt").read_bytes() == best
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 2
    (d, m), = T.read_split_list(str(lists[3]))
    other = write_split_list(tmp_path / "other_val.txt", [(shutil.copy(d, tmp_path / "data9.npy"),
                                                           shutil.copy(m, tmp_path / "model9.npy"))])
    capsys.readouterr()
    assert T.cli([*argv[:3], str(other), *argv[4:], "--epochs", "3", "--resume", "auto"]) == 2  # another split: refused
    assert "error: the validation split (1 file, 4 samples) differs from the one" in capsys.readouterr().err
    assert T.cli([*argv, "--epochs", "3", "--resume", "auto"]) == 0  # the split best.pt was measured on: accepted
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 3
    assert T.cli([*map(str, lists), *BASE_RUN, "--output-dir", str(tmp_path / "never"), "--epochs", "1", "--val-every", "0"]) == 0
    assert torch.load(tmp_path / "never" / "best.pt", weights_only=False)["epoch"] == 1  # for eval to take


def test_config_lets_values_check_args_derived_follow_what_they_came_from(tmp_path):
    """args.json holds resolved values: a --val-batch-size that was --batch-size's follows a --batch-size given
    beside --config, and the one unvalidated epoch --overfit-batch imposed goes with --no-overfit-batch."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps(vars(T.check_args(T.parse_args(["--batch-size", "2"])))))
    assert T.check_args(T.parse_args(["--config", str(path), "--batch-size", "4"])).val_batch_size == 4
    assert T.check_args(T.parse_args(["--config", str(path)])).val_batch_size == 2
    path.write_text(json.dumps(vars(T.check_args(T.parse_args(["--batch-size", "2", "--val-batch-size", "8"])))))
    assert T.check_args(T.parse_args(["--config", str(path), "--batch-size", "4"])).val_batch_size == 8  # chosen
    path.write_text(json.dumps(vars(T.check_args(T.parse_args(["--overfit-batch", "--epochs", "30"])))))
    args = T.check_args(T.parse_args(["--config", str(path), "--no-overfit-batch"]))
    default = T.get_args_parser().parse_args([])
    assert (args.epochs, args.val_every) == (default.epochs, default.val_every)
    args = T.check_args(T.parse_args(["--config", str(path), "--no-overfit-batch", "--epochs", "3"]))
    assert (args.epochs, args.val_every) == (3, default.val_every)


def test_config_replays_the_resolved_speed_flags_unless_fast_is_given(tmp_path):
    """args.json holds the speed flags as resolved (a CUDA --fast run's here); --fast or --no-fast given beside
    --config chooses afresh for this device all but the speed flags given with it."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"fast": True, "amp": "bf16", "channels_last": True, "compile": True, "fused_adam": True,
                                "loader": "gpu", "cache_dtype": "bfloat16", "seed": 5}))
    speed = lambda args: tuple(getattr(args, k) for k in T.SPEED_FLAGS)
    assert speed(T.parse_args(["--config", str(path)])) == ("bf16", True, True, True, "gpu", "bfloat16")
    args = T.parse_args(["--config", str(path), "--fast", "--amp", "off"])
    assert speed(args) == ("off", None, None, None, None, None) and args.fast and args.seed == 5
    assert speed(T.parse_args(["--config", str(path), "--no-fast"])) == (None,) * 6
    path.write_text(json.dumps({"loader": "map", "cache_dtype": "float32"}))  # a cache dtype that set nothing
    assert speed(T.parse_args(["--config", str(path)]))[4:] == ("map", None)
    path.write_text(json.dumps({"amp": "bf16", "loader": "gpu", "cache_dtype": "bfloat16"}))  # the one its --amp chose
    assert speed(T.parse_args(["--config", str(path), "--amp", "off"]))[4:] == ("gpu", None)  # resolved afresh: float32
    assert speed(T.parse_args(["--config", str(path)]))[4:] == ("gpu", "bfloat16")
    path.write_text(json.dumps({"amp": "bf16", "loader": "gpu", "cache_dtype": "float32"}))  # one given: kept
    assert speed(T.parse_args(["--config", str(path), "--amp", "off"]))[4:] == ("gpu", "float32")


@pytest.mark.parametrize("content, needle", [
    ({"lr": 1e-3, "nonsense": 1}, "unknown setting 'nonsense'"),
    ({"amp": "fp64"}, "argument --amp: invalid choice: 'fp64'"),
    ("not json", "not a readable args.json"),
    ("[" * 100000 + "]" * 100000, "not a readable args.json"),  # nested beyond the JSON parser's recursion limit
    ({"fast": "yes"}, "fast must be true or false, got 'yes'"),
    (None, "no such file"),
])
def test_bad_config_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "args.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert T.cli(["--config", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_inversionnet.py: error: --config {path}: ") and needle in err and err.count("\n") == 1


def test_a_bad_value_from_config_names_the_file_unless_the_command_line_gave_it(tmp_path, capsys):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"batch_size": -1}))
    assert T.cli(["--config", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: --batch-size must be positive, got -1 (the value "
                                       f"comes from --config {path})\n")
    for given in (["--batch-size=0"], ["--batch-size", "0"]):  # as argparse reads them
        assert T.cli(["--config", str(path), "--output-dir", str(tmp_path / "o"), *given]) == 2
        assert capsys.readouterr().err == "train_inversionnet.py: error: --batch-size must be positive, got 0\n"
    assert T.cli(["--batch", "0"]) == 2  # flags are spelled out: run.sh screens them and args.json names them whole
    assert "unrecognized arguments: --batch 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, ids_data):
    """One epoch (4 steps) of a run to resume."""
    _, lists = ids_data
    with module_dir(tmp_path_factory, "short") as base:
        out = base / "run"
        assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "1", "--output-dir", str(out)]) == 0
        yield out


@pytest.mark.parametrize("change, needle", [
    (["--batch-size", "4"], "--batch-size 4 differs from the 2 that {last} was trained with: the steps per epoch of the lr "
                            "schedule would mean something else"),  # at an epoch's end: its schedule counts in steps
    (["--loader", "iterable"], "--loader iterable differs from the map that {last} was trained with: the batches of the "
                               "epochs to come would mean something else"),
    (["--train-list", "THREE"], "the training split (3 files, 12 samples) differs from the one {last} was trained on (2 "
                                "files, 8 samples; file 3 is now data4.npy model4.npy 4, was absent)"),  # a file added
    (["--val-list", "FOUR"], "the validation split (1 file, 4 samples) differs from the one {last} was validated on (1 "
                             "file, 4 samples; file 1 is now data4.npy model4.npy 4, was data3.npy model3.npy 4): the "
                             "loss that keeps best.pt would compare two sets; resume with that split"),
    (["--train-list", "OTHER"], "(2 files, 8 samples) differs from the one {last} was trained on (2 files, 8 samples; file 2 is "
                                "now data4.npy model4.npy 4, was data2.npy model2.npy 4)"),  # same counts: the names differ
    (["--overfit-batch"], "--overfit-batch differs from the --no-overfit-batch that {last} was trained with: what the steps "
                          "train on (one repeated batch, or the split) would mean something else"),
    (["--lr", "3e-4"], "--lr 0.0003 differs from the 0.001 that"),  # the restored optimizer state would keep 1e-3
    (["--betas", "0.8", "0.999"], "--betas 0.8 0.999 differs from the 0.9 0.999 that"),
    (["--optimizer", "adam"], "--optimizer adam differs from the adamw that"),
    (["--lambda-l2", "1"], "--lambda-l2 1.0 differs from the 0.0 that {last} was trained with: the validation loss that "
                           "keeps best.pt would mean something else; resume with --lambda-l2 0.0"),
    (["--dataset", "flatfault-b"], "the normalisation (data -24.86 to 50.28, velocity 1500 to 4500) differs from the one "
                                   "{last} was trained with (data -26.95 to 52.77,"),  # the weights learnt other inputs
])
def test_resume_refuses_a_changed_position_meaning(short_run, ids_data, tmp_path, capsys, change, needle):
    root, lists = ids_data
    extra = tmp_path / "extra"  # a fourth file (file 3 validates, and no file may be in both splits)
    for kind in ("data", "model"):
        (extra / kind).mkdir(parents=True)
        shutil.copy(root / kind / f"{kind}1.npy", extra / kind / f"{kind}4.npy")
    where = {1: root, 2: root, 4: extra}
    lists_of = {name: write_split_list(tmp_path / f"{name}.txt", [(where[i] / "data" / f"data{i}.npy",
                                                                  where[i] / "model" / f"model{i}.npy") for i in files])
                for name, files in (("THREE", (1, 2, 4)), ("OTHER", (1, 4)), ("FOUR", (4,)))}
    before = (short_run / "last.pt").read_bytes()
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(short_run), "--resume", "auto",
            *[str(lists_of.get(c, c)) for c in change]]
    capsys.readouterr()
    assert T.cli(argv) == 2
    err = capsys.readouterr().err
    assert needle.format(last=short_run / "last.pt") in err and "start a new run" in err and err.count("\n") == 1, err
    assert (short_run / "last.pt").read_bytes() == before


def test_validation_runs_every_n_epochs_and_after_the_last(tmp_path, ids_data, capsys):
    _, lists = ids_data
    out = tmp_path / "run"
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "3", "--val-every", "2", "--output-dir", str(out)]) == 0
    epochs = [line for line in capsys.readouterr().out.splitlines() if re.match(r"epoch \d train loss", line)]
    assert len(epochs) == 3 and ["val loss" in line for line in epochs] == [False, True, True]  # 2nd: every 2; 3rd: last
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] in (2, 3)  # judged on validation, for eval to read


def test_an_epoch_without_a_full_batch_is_refused(tmp_path, capsys):
    write_ids_dataset(tmp_path / "d", (4, 4, 4))  # 8 training samples in two files: one shard per worker, 8 workers
    argv = ["--data-root", str(tmp_path / "d"), "--output-dir", str(tmp_path / "o"), "--loader", "iterable", "--num-workers",
            "8", "--batch-size", "2", "--dataset", "flatvel-a", "--no-progress", "--train-size", "0.67"]
    assert T.cli(argv) == 2
    assert capsys.readouterr().err == ("train_inversionnet.py: error: no full batch of 2 per epoch: --loader iterable splits 8 "
                                       "samples over 1 rank(s) x 8 worker(s); lower --num-workers or --batch-size\n")


def test_resume_refuses_another_number_of_batches_per_epoch(short_run, ids_data, tmp_path, capsys):
    """What else would change an epoch's batches with the same flags and split (the GPUs DataParallel splits
    over, for the iterable loader's remainders) is caught by the count itself."""
    _, lists = ids_data
    ck = torch.load(short_run / "last.pt", weights_only=False)
    assert ck["batches_per_epoch"] == 4
    ck["batches_per_epoch"] = 5
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ck, run / "last.pt")
    capsys.readouterr()
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(run), "--resume", "auto"]) == 2
    assert capsys.readouterr().err.startswith(f"train_inversionnet.py: error: an epoch of {run / 'last.pt'} had 5 "
                                              "batches and has 4 now (--loader iterable leaves out")


def test_resume_of_the_iterable_loader_refuses_another_worker_count(tmp_path, ids_data, capsys):
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--loader", "iterable", "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    assert T.cli([*argv, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert T.cli([*argv, "--resume", "auto", "--num-workers", "1"]) == 2
    assert "--num-workers 1 differs from the 0 that" in capsys.readouterr().err


def test_init_from_on_a_resume_is_said_unused_and_not_recorded(short_run, ids_data, tmp_path, capsys):
    _, lists = ids_data
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    (tmp_path / "w.pth").write_bytes(b"not read: the weights are the checkpoint's")
    capsys.readouterr()
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "1", "--output-dir", str(run), "--resume", "auto",
                  "--init-from", str(tmp_path / "w.pth")]) == 0
    assert f"--init-from {tmp_path / 'w.pth'} not used (the weights are {run / 'last.pt'}'s)" in capsys.readouterr().out
    assert json.loads((run / "args.json").read_text())["init_from"] is None  # the run began from scratch


def test_init_from_weights_start_the_weight_ema_too(ids_data, tmp_path, capsys):
    _, lists = ids_data
    torch.manual_seed(5)
    init = T.InversionNet().state_dict()
    torch.save({"model": init}, tmp_path / "w.pth")
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "1", "--max-steps", "1", "--ema-decay", "0.5", "--init-from",
                  str(tmp_path / "w.pth"), "--output-dir", str(tmp_path / "run")]) == 0
    assert f"weights from --init-from {tmp_path / 'w.pth'}" in capsys.readouterr().out
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    d, k = 2 / 11, "convblock1.layers.0.weight"  # the decay ramped to (1 + 1) / (10 + 1) at the first step
    assert torch.allclose(ck["model"][k], d * init[k] + (1 - d) * ck["train_model"][k], atol=1e-6)


def test_a_resumed_run_keeps_its_best_pt_until_a_validation_beats_the_best_loss_it_saved(short_run, ids_data, tmp_path):
    _, lists = ids_data
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    ck = torch.load(run / "last.pt", weights_only=False)
    ck["best_loss"] = 0.0  # a loss no validation beats
    torch.save(ck, run / "last.pt")
    best = (run / "best.pt").read_bytes()
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(run), "--resume", "auto"]) == 0
    assert (run / "best.pt").read_bytes() == best and torch.load(run / "last.pt", weights_only=False)["best_loss"] == 0.0


def test_a_run_continued_into_a_new_directory_writes_its_best_pt(short_run, ids_data, tmp_path):
    _, lists = ids_data
    ck = torch.load(short_run / "last.pt", weights_only=False)
    ck["best_loss"] = 0.0  # a loss no validation beats
    torch.save(ck, tmp_path / "old.pt")
    new = tmp_path / "new"
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(new), "--resume",
                  str(tmp_path / "old.pt")]) == 0
    best = torch.load(new / "best.pt", weights_only=False)
    assert best["epoch"] == 2 and best["step"] == 8 and best["best_loss"] > 0  # validated here


@pytest.mark.slow
def test_one_process_resumes_across_the_map_and_device_loaders(ids_data, tmp_path):
    """They serve the same batches in the same order, so a run stopped inside an epoch may continue with the
    other (--fast picks the device cache only when the split fits in the memory free at the start)."""
    _, lists = ids_data
    argv = [*map(str, lists), *COMMON, "--epochs", "2"]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    assert T.cli([*argv, "--output-dir", str(tmp_path / "b"), "--max-steps", "5", "--loader", "gpu"]) == 0
    assert T.cli([*argv, "--output-dir", str(tmp_path / "b"), "--resume", "auto", "--loader", "map"]) == 0
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=False) for r in "ab")
    assert a["step"] == 8
    assert_same_weights(a, b)


def trained(ck):
    """A checkpoint's training arguments as restore() reads them."""
    return T.saved_namespace(ck["args"], "last.pt: its training arguments")


def test_resume_under_ddp_refuses_another_scale_lr_unless_the_world_size_changes(short_run):
    """At the same world size the restored optimizer keeps the scaled rate; a new world size rebases it from
    the flags."""
    ck = torch.load(short_run / "last.pt", weights_only=False)
    ck["world"] = 2  # as if trained by two ranks
    args = argparse.Namespace(**{**ck["args"], "scale_lr": False})
    check = lambda world: T.check_resumable(ck, trained(ck), "last.pt", args, ck, world, ck["normalization"])
    with pytest.raises(T.InputError, match=r"^--no-scale-lr differs from the --scale-lr that last.pt was trained with: "
                                           r"the optimizer state would mean something else; resume with --scale-lr or"):
        check(2)
    check(1)


def test_resume_inside_an_epoch_refuses_another_seed(short_run):
    """The batches already trained in an epoch are those of the saved seed's shuffle: inside an epoch another
    --seed would train some samples twice and skip others; at an epoch's end it only shuffles the next ones."""
    ck = torch.load(short_run / "last.pt", weights_only=False)
    args = argparse.Namespace(**{**ck["args"], "seed": 5})
    assert ck["batch_in_epoch"] == 0 and ck["args"]["seed"] == 0
    T.check_resumable(ck, trained(ck), "last.pt", args, ck, 1, ck["normalization"])
    ck["batch_in_epoch"] = 2
    with pytest.raises(T.InputError, match=r"^--seed 5 differs from the 0 that last.pt was trained with: the position "
                                           r"inside the epoch would mean something else; resume with --seed 0 or"):
        T.check_resumable(ck, trained(ck), "last.pt", args, ck, 1, ck["normalization"])
    T.check_resumable(ck, trained(ck), "last.pt", args, ck, 2, ck["normalization"])  # another world size restarts the epoch
    args.seed, args.batch_size = 0, 4
    with pytest.raises(T.InputError, match=r"^--batch-size 4 differs from the 2 that last.pt was trained with: the "
                                           r"position inside the epoch would mean something else"):
        T.check_resumable(ck, trained(ck), "last.pt", args, ck, 1, ck["normalization"])


def test_a_resume_steps_with_its_own_fused_adam_choice(short_run):
    """--fused-adam (or --fast's choice) holds on a resume: the saved state brings its values, not its
    implementation."""
    model = T.InversionNet()
    for fused in (True, False):
        ck = torch.load(short_run / "last.pt", weights_only=False)  # (the optimizer takes its tensors as they are)
        args = argparse.Namespace(**ck["args"])
        trained = ck["optimizer"]["param_groups"][0]["fused"]  # unfused on a CPU, fused on CUDA: one of the two switches
        saved_avg = ck["optimizer"]["state"][0]["exp_avg"].clone()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=fused)
        run = argparse.Namespace(optimizer=opt, scheduler=T.build_scheduler(opt, args, ck["batches_per_epoch"]),
                                   scaler=torch.amp.GradScaler("cpu", enabled=False))
        T.load_optimizer_state(run, ck, "last.pt", args.amp)
        first = opt.state[next(model.parameters())]
        assert opt.param_groups[0]["fused"] is fused and int(first["step"]) == ck["step"]
        assert torch.equal(first["exp_avg"], saved_avg)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # a fused step needs the step counters where the fused kernel reads them
        assert int(first["step"]) == ck["step"] + 1
        assert ck["optimizer"]["param_groups"][0]["fused"] is trained  # the checkpoint's record is left as it was


def test_ranks_that_would_start_at_different_steps_are_refused(monkeypatch):
    run = argparse.Namespace(step=40)
    monkeypatch.setattr(T, "all_reduce_sum", lambda t: t * 2)  # two ranks, both at step 40
    T.check_ranks_agree(run)
    monkeypatch.setattr(T, "all_reduce_sum", lambda t: t + torch.tensor([1.0, 0, 0], dtype=torch.float64))
    with pytest.raises(T.InputError, match=r"^the ranks would start at different steps \(this one at step 40\)"):
        T.check_ranks_agree(run)  # the other rank found no checkpoint: step 0


def test_resume_may_change_amp_and_fp16_then_starts_its_own_grad_scaler(short_run, ids_data, tmp_path, capsys):
    """A run trained without fp16 saved a disabled GradScaler, which holds nothing: an fp16 continuation starts
    its own (no traceback), and the resume line says what changed."""
    _, lists = ids_data
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(run), "--resume", "auto"]
    capsys.readouterr()
    assert T.cli([*argv, "--amp", "fp16", "--max-steps", "5"]) == 0
    assert "; --amp off -> fp16 (the fp16 GradScaler starts at its initial scale)" in capsys.readouterr().out
    ck = torch.load(run / "last.pt", weights_only=False)
    assert ck["step"] == 5 and ck["scaler"]["scale"] == 2.0 ** 16
    ck["scaler"]["scale"] = 1024.0  # as after overflows: an fp16 resume goes on from the saved scale
    torch.save(ck, run / "last.pt")
    assert T.cli([*argv, "--amp", "fp16", "--max-steps", "6"]) == 0
    ck = torch.load(run / "last.pt", weights_only=False)
    assert ck["step"] == 6 and ck["scaler"]["scale"] == 1024.0
    capsys.readouterr()
    assert T.cli([*argv, "--amp", "bf16", "--max-steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "; --amp fp16 -> bf16\n" in out or "; --amp fp16 -> bf16;" in out
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 7


def test_resume_refuses_a_checkpoint_of_another_kind(ids_data, tmp_path, capsys):
    """OpenFWI's training checkpoints (args as a Namespace, 'lr_scheduler') and bare weight files hold no state
    this script can continue from: one line pointing at --init-from, no traceback."""
    _, lists = ids_data
    model = T.InversionNet().state_dict()
    for name, ckpt in (("openfwi.pth", {"model": model, "optimizer": {}, "lr_scheduler": {}, "epoch": 3, "step": 9,
                                        "args": __import__("argparse").Namespace(lr=1e-4)}),
                       ("weights.pth", {"model": model, "optimizer": {}}),
                       ("crafted.pth", {"model": model, "optimizer": {}, "scheduler": {}, "scaler": {}, "epoch": "3",
                                        "step": 9, "best_loss": 0.5})):
        torch.save(ckpt, tmp_path / name)
        argv = [*map(str, lists), *BASE_RUN, "--epochs", "1", "--resume", str(tmp_path / name), "--output-dir", str(tmp_path / name[:-4])]
        assert T.cli(argv) == 2
        err = capsys.readouterr().err
        assert err == f"train_inversionnet.py: error: {tmp_path / name}: not a training checkpoint of this script (use --init-from for its weights)\n"


@pytest.mark.parametrize("edit, needle", [
    (lambda ck: ck.pop("args"), "not a training checkpoint of this script"),
    (lambda ck: ck["normalization"].update(data_min="a"), "not a training checkpoint of this script"),
    (lambda ck: ck.update(split="garbage"), "not a training checkpoint of this script"),
    (lambda ck: ck.update(batches_per_epoch="x"), "not a training checkpoint of this script"),
    (lambda ck: ck["rng"].pop("python"), "not a training checkpoint of this script"),
    (lambda ck: ck.update(scheduler="x"), "not a training checkpoint of this script"),
    (lambda ck: ck.update(epoch_loss=[float("nan"), 4, 0]), "not a training checkpoint of this script"),
    (lambda ck: ck.update(epoch_loss=[1.0, 0, 0]), "not a training checkpoint of this script"),
    (lambda ck: ck.update(val_due="false"), "not a training checkpoint of this script"),
    # a position past the epoch's end would train nothing, and a NaN best loss would never be beaten
    (lambda ck: ck.update(batch_in_epoch=ck["batches_per_epoch"] + 1), "not a training checkpoint of this script"),
    (lambda ck: ck.update(best_loss=float("nan")), "not a training checkpoint of this script"),
    # Adam's moments of the wrong shape pass load_state_dict and fail only at the first step
    (lambda ck: ck["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
     "its optimizer state does not fit this run (exp_avg of shape (2,) for a parameter of shape (32, 5, 7, 1))"),
    (lambda ck: ck["optimizer"]["state"][0].update(exp_avg_sq=torch.zeros(())),
     "its optimizer state does not fit this run (exp_avg_sq of shape () for a parameter of shape (32, 5, 7, 1))"),
    (lambda ck: ck["rng"].update(numpy=("MT19937",)), "its RNG record is not a generator state"),
    (lambda ck: ck["rng"].update(torch=torch.zeros(3)), "its RNG record is not a generator state"),
    (lambda ck: ck["args"].update(batch_size="abc"), "its training arguments: argument --batch-size: invalid int value: 'abc'"),
    (lambda ck: ck["model"]["convblock1.layers.0.weight"].fill_(float("nan")),
     "its weights hold NaN or Inf (convblock1.layers.0.weight); use a checkpoint saved before the run diverged"),
])
def test_resume_from_a_hand_edited_checkpoint_is_one_line(short_run, ids_data, tmp_path, capsys, edit, needle):
    _, lists = ids_data
    ck = torch.load(short_run / "last.pt", weights_only=False)
    edit(ck)
    torch.save(ck, tmp_path / "edited.pt")
    capsys.readouterr()
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(tmp_path / "run"), "--resume",
                  str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_inversionnet.py: error: {tmp_path / 'edited.pt'}: {needle}") and err.count("\n") == 1, err


def test_a_finished_run_resumed_into_another_directory_leaves_a_run_there_to_continue(short_run, ids_data, tmp_path, capsys):
    """--resume OLD/last.pt --output-dir NEW with nothing left to train: NEW gets OLD's state as its last.pt, so
    --resume auto with a larger --epochs continues OLD's training there instead of starting a new run."""
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--output-dir", str(tmp_path / "new")]
    capsys.readouterr()
    assert T.cli([*argv, "--epochs", "1", "--resume", str(short_run / "last.pt")]) == 0
    assert f"{tmp_path / 'new' / 'last.pt'} written: the resumed state" in capsys.readouterr().out
    old, new = (torch.load(d / "last.pt", weights_only=False) for d in (short_run, tmp_path / "new"))
    assert new["step"] == old["step"] == 4 and torch.equal(new["model"]["convblock1.layers.0.weight"],
                                                           old["model"]["convblock1.layers.0.weight"])
    assert T.cli([*argv, "--epochs", "2", "--resume", "auto"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(tmp_path / "new" / "last.pt", weights_only=False)["step"] == 8


def test_resume_restores_the_global_random_generators(short_run, ids_data, tmp_path, monkeypatch):
    """The loaders draw from their own seeded generators, but anything else random in a step (an augmentation
    added later, dropout) draws from Python's, NumPy's and torch's global ones: a resume continues them where
    the checkpoint left them."""
    _, lists = ids_data
    shutil.copytree(short_run, tmp_path / "run")
    ck = torch.load(short_run / "last.pt", weights_only=False)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # states that the run's own seeding cannot give
    ck["rng"] |= {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(ck, tmp_path / "run" / "last.pt")
    seen = {}

    def record(run, *rest):
        seen.update(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        return 0
    monkeypatch.setattr(T, "fit", record)
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--output-dir", str(tmp_path / "run"), "--resume", "auto"]) == 0
    assert seen["python"] == ck["rng"]["python"] and torch.equal(seen["torch"], ck["rng"]["torch"])
    assert np.array_equal(seen["numpy"][1], ck["rng"]["numpy"][1]) and seen["numpy"][2] == ck["rng"]["numpy"][2]


class Planted:
    """What a crafted checkpoint may hold: unpickling it would call os.mkdir(MARKER)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_would_run_code_is_refused_unread(short_run, ids_data, tmp_path, capsys):
    """Checkpoints load as tensors and plain values (plus OpenFWI's Namespace and the NumPy RNG state that
    ours hold, which every resume test reads): a file whose unpickling would call a function is refused,
    naming it, and nothing of it runs."""
    _, lists = ids_data
    ck = torch.load(short_run / "last.pt", weights_only=False)
    ck["note"], marker = Planted(tmp_path / "ran"), tmp_path / "ran"
    torch.save(ck, tmp_path / "crafted.pt")
    capsys.readouterr()
    assert T.cli([*map(str, lists), *BASE_RUN, "--output-dir", str(tmp_path / "run"), "--init-from",
                  str(tmp_path / "crafted.pt")]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: {tmp_path / 'crafted.pt'}: holds objects other than "
                                       f"tensors and plain values (posix.mkdir), and loading them could run code from the "
                                       f"file: not loaded (if you trust its source, re-save its state_dict alone)\n")
    assert not marker.exists()


def test_a_max_steps_stop_is_validated_and_leaves_a_best_pt(ids_data, tmp_path, capsys):
    """A run that --max-steps ends, inside an epoch or at its end, is validated there whatever --val-every says,
    so it ends with a best.pt (run.sh's eval stage reads it); the same command with a larger --max-steps goes on."""
    _, lists = ids_data
    out = tmp_path / "run"
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "3", "--val-every", "5", "--output-dir", str(out),
            "--lr-milestones", "1", "4", "--precise-bn", "9", "--compile-mode", "max-autotune", "--pin-memory",
            "--cache-dtype", "bfloat16", "--device", "cpu"]  # the notes are the CPU's
    assert T.cli([*argv, "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "note: --lr-milestones 4 not reached within --epochs 3; --precise-bn 9: an epoch has 4 batches, all of which " \
           "are averaged; --compile-mode max-autotune has no effect without --compile (--fast compiles on CUDA only); " \
           "--pin-memory has no effect on cpu (it speeds copies to a GPU)\n" in printed
    assert "given: --cache-dtype; note: --cache-dtype has no effect with --loader map (it sets the --loader gpu cache)\n" in printed
    assert re.search(r"^epoch 0 to batch 1/4 train loss [\d.]+ \| val loss [\d.]+ MAE", printed, re.M), printed
    assert "stopped at --max-steps 1 (epoch 0, batch 1); last.pt written" in printed
    best = torch.load(out / "best.pt", weights_only=False)
    assert (best["step"], best["epoch"], best["batch_in_epoch"]) == (1, 0, 1) and best["best_loss"] < math.inf
    assert T.cli([*argv, "--max-steps", "8", "--resume", "auto"]) == 0  # the end of epoch 1: not a --val-every epoch
    printed = capsys.readouterr().out
    assert re.search(r"^epoch 0 train loss [\d.]+ \| [\d.]+ s train", printed, re.M), printed  # not validated
    assert re.search(r"^epoch 1 train loss [\d.]+ \| val loss", printed, re.M), printed
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 8


def test_a_resumed_epoch_logs_the_loss_of_the_whole_epoch(ids_data, tmp_path, capsys):
    """Stopped inside an epoch and resumed, the running-mean train loss goes on from the checkpoint's sums:
    the log steps, TensorBoard's curve and the epoch's line read as in the run that was never stopped."""
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "1", "--log-every", "1", "--deterministic", "--device", "cpu"]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "straight")]) == 0
    straight = capsys.readouterr().out
    resumed = tmp_path / "resumed"
    assert T.cli([*argv, "--output-dir", str(resumed), "--max-steps", "2"]) == 0
    assert torch.load(resumed / "last.pt", weights_only=False)["epoch_loss"][1:] == [4, 0]  # 2 batches of 2, from batch 0
    assert T.cli([*argv, "--output-dir", str(resumed), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out

    def losses(text):
        return (re.findall(r"^epoch 0 step (\d) batch \d/4 loss (\S+) ", text, re.M),
                re.findall(r"^epoch 0 train loss (\S+) ", text, re.M))
    steps, epoch = losses(straight)
    assert len(steps) == 4 and len(epoch) == 1
    assert losses(printed) == (steps, epoch)  # steps 1-2 before the stop, 3-4 after it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(resumed / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [int(step) for step, _ in steps]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([float(v) for _, v in steps], abs=1e-5)


def test_one_rank_alone_carries_a_resumed_epochs_loss_sums(monkeypatch):
    """mean_loss adds the ranks' sums: were every rank to start from the checkpoint's, they would count once per
    rank. A checkpoint without sums (an older format) starts the mean at the resumed batch."""
    run = types.SimpleNamespace(epoch=0, batch_in_epoch=3, device=torch.device("cpu"),
                                scaler=torch.amp.GradScaler("cpu", enabled=False),
                                optimizer=types.SimpleNamespace(param_groups=[{"lr": 0.1}]))
    for main, record, expected in ((True, (6.0, 12, 0), (6.0, 12, 0)), (False, (6.0, 12, 0), (0.0, 0, 0)),
                                   (True, T.NO_EPOCH_LOSS, (0.0, 0, 3)), (True, (6.0, 12, 1), (6.0, 12, 1))):
        monkeypatch.setattr(T, "is_main", lambda: main)
        run.epoch_loss, monitor = record, T.Monitor()
        monitor.start_epoch(run, 4)
        assert (monitor.loss_sum.item(), monitor.samples, monitor.loss_from) == expected
        assert run.epoch_loss == T.NO_EPOCH_LOSS  # consumed: the epoch's end saves no stale sums


def test_schedule_note_says_when_the_flags_move_the_rate_of_the_steps_to_come():
    """Extending a cosine run (--epochs, --max-steps) draws the rest of its schedule out anew: a resume says so
    with the rate the next steps get; a schedule the change leaves alone (warmup-multistep) gets no note."""
    run = types.SimpleNamespace(meta={"batches_per_epoch": 10}, step=20, world=1)
    cosine = small_args(lr_scheduler="cosine", epochs=2, lr=1e-3)
    assert T.schedule_note(cosine, small_args(lr_scheduler="cosine", epochs=2, lr=1e-3), run) == ""
    note = T.schedule_note(cosine, small_args(lr_scheduler="cosine", epochs=4, lr=1e-3), run)
    assert note == ("; note: --epochs 4 (was 2) changes the learning-rate schedule: the next steps train at 0.0005, "
                    "where the run's schedule gives 0")  # (1 + cos(pi * 20/40)) / 2: from nothing back to half
    run.step = 5
    assert "--max-steps 10 (was None)" in T.schedule_note(cosine, small_args(lr_scheduler="cosine", epochs=2, lr=1e-3,
                                                                             max_steps=10), run)
    steps = small_args(lr_milestones=[1], epochs=2, lr=1e-3)
    assert T.schedule_note(steps, small_args(lr_milestones=[1], epochs=4, lr=1e-3), run) == ""


def test_a_resume_that_extends_a_cosine_run_says_what_the_rate_becomes(ids_data, tmp_path, capsys):
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--lr-scheduler", "cosine", "--output-dir", str(tmp_path), "--device", "cpu"]
    assert T.cli([*argv, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert T.cli([*argv, "--epochs", "2", "--resume", "auto", "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "; note: --epochs 2 (was 1) changes the learning-rate schedule: the next steps train at 0.0005, where " \
           "the run's schedule gives 0" in printed
    assert re.search(r"^epoch 1 step 5 batch 1/4 .* lr 5\.000e-04 ", printed, re.M), printed  # the rate the note gave


def test_the_logged_learning_rate_is_the_one_the_step_trained_at(ids_data, tmp_path, capsys):
    """A milestone at epoch 1 divides the rate from epoch 1's first step on: epoch 0's last step (logged after
    the schedule moved on) still trained at --lr, and its log line says so."""
    _, lists = ids_data
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "2", "--log-every", "1", "--lr-scheduler", "warmup-multistep",
                  "--lr-warmup-epochs", "0", "--lr-milestones", "1", "--lr-gamma", "0.1", "--val-every", "0",
                  "--output-dir", str(tmp_path / "run")]) == 0
    logged = re.findall(r"^epoch (\d) step \d batch \d/4 loss \S+ lr (\S+) ", capsys.readouterr().out, re.M)
    assert logged == [("0", "1.000e-03")] * 4 + [("1", "1.000e-04")] * 4


def test_the_log_line_counts_samples_over_every_rank_and_the_share_of_time_spent_waiting_for_data(monkeypatch, capsys):
    """Between two log steps of a two-rank run each rank trains 3 batches of 4 in 0.6 s, 0.15 s of it waiting for
    batches: the line says 2 x 12 samples / 0.6 s = 40 samples/s and a 25 % data wait, then starts counting anew."""
    clock = iter([0.0,                                 # start_epoch
                  0.0, 0.05, 0.2, 0.25, 0.4, 0.45,       # three batches, each waited for 0.05 s
                  0.6, 0.6,                            # the log step; the loader says it is done
                  0.6, 0.7, 1.0, 1.0])                 # one more batch, waited 0.1 s, logged 0.4 s after the first
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = T.Run(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
                torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), world=2)
    monitor = T.Monitor(log_every=3)
    monitor.start_epoch(run, n_batches=4)

    def train(batches):
        for _ in monitor.timed(batches):
            run.step, run.batch_in_epoch = run.step + 1, run.batch_in_epoch + 1
            monitor.after_step(run, torch.tensor(0.5), 4)
            if monitor.due(run):
                monitor.log(run)

    train(range(3))
    train(range(1))
    lines = re.findall(r"batch (\d)/4 loss 0.50000 .* samples/s (\S+) data-wait (\S+)%", capsys.readouterr().out)
    assert lines == [("3", "40.0", "25.0"), ("4", "20.0", "25.0")]


def test_a_finished_cosine_run_extended_by_epochs_steps_on_the_new_schedule(ids_data, tmp_path, capsys):
    """One epoch of cosine ends at lr 0; continued to --epochs 2, its first step trains at the new schedule's
    rate for step 4 of 8 (half of --lr), not at the 0 the checkpoint saved."""
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--log-every", "1", "--lr-scheduler", "cosine", "--lr-warmup-epochs", "0",
            "--val-every", "0", "--output-dir", str(tmp_path / "run")]
    assert T.cli([*argv, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert T.cli([*argv, "--epochs", "2", "--resume", "auto"]) == 0
    logged = re.findall(r"^epoch 1 step (\d) batch \d/4 loss \S+ lr (\S+) ", capsys.readouterr().out, re.M)
    assert logged[0] == ("5", "5.000e-04") and len(logged) == 4


def test_overfit_batch_trains_max_steps_steps_on_one_batch_and_its_loss_falls(ids_data, tmp_path, capsys, monkeypatch):
    """--overfit-batch, the sanity check of the module docstring: one fixed batch served --max-steps times in one
    epoch whatever --epochs says, never validated; the logged loss (the epoch's running mean) falls."""
    _, lists = ids_data
    seen, step = [], T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, x, y: seen.append((x.clone(), y.clone())) or step(run, x, y))
    out = tmp_path / "run"
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "3", "--max-steps", "6", "--log-every", "1",
                  "--overfit-batch", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(seen) == 6 and all(torch.equal(x, seen[0][0]) and torch.equal(y, seen[0][1]) for x, y in seen)
    logged = [float(v) for v in re.findall(r"^epoch 0 step \d batch \d/6 loss ([\d.]+) ", printed, re.M)]
    assert len(logged) == 6 and logged == sorted(logged, reverse=True) and logged[-1] < 0.9 * logged[0], printed
    epochs = re.findall(r"^epoch \d.* train loss .*$", printed, re.M)
    assert len(epochs) == 1 and "val loss" not in epochs[0], printed
    assert "stopped at --max-steps" not in printed  # its one epoch is the whole run: complete, not cut short
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["step"], ck["epoch"]) == (6, 1)
    again = [*map(str, lists), *BASE_RUN, "--overfit-batch", "--output-dir", str(out), "--resume", "auto"]
    assert T.cli([*again, "--max-steps", "6"]) == 0
    assert "the run is complete: its --overfit-batch epoch of 6 steps is trained; --overwrite runs it again\n" in capsys.readouterr().out
    assert T.cli([*again, "--max-steps", "7"]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: --max-steps 7 differs from the 6 steps of the "
                                       f"--overfit-batch epoch of {out / 'last.pt'}: resume with --max-steps 6 or start a new run\n")
    assert T.cli([*again, "--no-overfit-batch", "--epochs", "2"]) == 2  # the split's batches would follow
    assert "--no-overfit-batch differs from the --overfit-batch that" in capsys.readouterr().err
    # it validates nothing, so a training list alone is enough
    args = T.check_args(T.get_args_parser().parse_args([*map(str, lists[:2]), "--epochs", "3", "--overfit-batch"]))
    assert (args.epochs, args.val_every) == (1, 0)
    args.batch_size, args.num_workers = 2, 0
    T.resolve_speed(args, torch.device("cpu"))
    train, val = T.build_loaders(args, T.load_splits(args, 1), T.Normalizer(-30, 60), torch.device("cpu"), 0, 1)
    assert len(train) == 100 and val is None  # without --max-steps, the documented 100 steps


def test_a_split_of_exactly_one_global_batch_is_enough_and_one_sample_less_is_not(ids_data):
    _, lists = ids_data  # 8 training samples
    args = T.check_args(T.get_args_parser().parse_args([*map(str, lists), "--batch-size", "4"]))
    assert sum(T.load_splits(args, 2)[1]) == 8  # 4 per rank x 2 ranks
    args.batch_size = 3
    with pytest.raises(T.DataError, match=r"^the training split has 8 samples, fewer than one global batch \(3 x 3\)"):
        T.load_splits(args, 3)


def test_the_ends_of_each_training_flags_range_are_accepted():
    for flags in (["--lr", "10", "--ema-decay", "0.999", "--lr-gamma", "1", "--seed", str(T.MAX_SEED), "--betas", "0", "0.999"],
                  ["--ema-decay", "0", "--seed", "0", "--precise-bn", "0", "--max-steps", "1", "--train-size", "0.99"]):
        T.check_args(T.get_args_parser().parse_args(flags))


def test_every_validation_sees_batchnorm_statistics_averaged_over_ranks(ids_data, tmp_path, monkeypatch):
    """Under DDP each rank's statistics follow its own batches: the epoch's end averages those of the trained
    model before validating (the EMA's follow the ranks' mean at every step: tests/ddp_worker.py), and
    --precise-bn averages what it recomputes. In one process averaging is a no-op; here the calls are counted."""
    _, lists = ids_data
    calls, average, runs, precise_bn = [], T.average_over_ranks, [], T.precise_bn
    monkeypatch.setattr(T, "average_over_ranks", lambda tensors: calls.append(list(tensors)) or average(calls[-1]))
    monkeypatch.setattr(T, "precise_bn", lambda run, *args: runs.append(run) or precise_bn(run, *args))
    assert T.cli([*map(str, lists), *BASE_RUN, "--epochs", "1", "--output-dir", str(tmp_path / "run"),
                  "--ema-decay", "0.9", "--precise-bn", "2"]) == 0
    run = runs[0]
    assert len(calls) == 2 and run.eval_model is not run.raw_model
    for averaged, model in zip(calls, (run.raw_model, run.eval_model)):  # the trained model's, then precise_bn's (the EMA's)
        buffers = list(model.buffers())
        assert len(averaged) == len(buffers) and all(a is b for a, b in zip(averaged, buffers))


def test_weight_ema_averages_weights_and_statistics_with_a_ramped_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = T.WeightEMA(model, 0.9)
    start = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked += 3
    new = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(1000)  # past the ramp: the decay itself
    for k, v in ema.model.state_dict().items():
        want = new[k] if not v.is_floating_point() else start[k] + 0.1 * (new[k] - start[k])  # counters are copied
        assert torch.allclose(v, want), k
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.update(0)  # the ramp's start: decay (1 + 0) / (10 + 0) = 0.1, so the average mostly follows the weights
    assert torch.allclose(ema.model[0].weight, before["0.weight"] + 0.9 * (new["0.weight"] - before["0.weight"]))
    assert not any(p.requires_grad for p in ema.model.parameters()) and torch.equal(model[0].weight, new["0.weight"])


def test_ema_run_validates_saves_and_resumes_the_average_exactly(ids_data, tmp_path, capsys):
    """With --ema-decay the checkpoints' 'model' is the average (what validation measured and what eval, --predict
    and --init-from read) and 'train_model' the trained weights; a run stopped inside an epoch and resumed ends
    with the same both as one that ran straight through."""
    import eval_inversionnet as E
    _, lists = ids_data
    argv = [*map(str, lists), *COMMON, "--epochs", "2", "--ema-decay", "0.5", "--precise-bn", "2"]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    val_mae = re.findall(r"^epoch 1 train loss \S+ \| val loss \S+ MAE (\S+)", capsys.readouterr().out, re.M)
    assert T.cli([*argv, "--output-dir", str(tmp_path / "b"), "--max-steps", "5"]) == 0
    assert T.cli([*argv, "--output-dir", str(tmp_path / "b"), "--resume", "auto"]) == 0
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=False) for r in "ab")
    assert a["step"] == b["step"] == 8
    for part in ("model", "train_model"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert not torch.equal(a["model"]["convblock1.layers.0.weight"], a["train_model"]["convblock1.layers.0.weight"])
    out = tmp_path / "ev"
    assert E.cli(["--checkpoint", str(tmp_path / "a" / "last.pt"), "--output-dir", str(out), "--num-workers", "0",
                  "--no-progress", "--vis", "0", "--amp", "off"]) == 0
    assert val_mae == [f"{json.loads((out / 'metrics.json').read_text())['model']['mae']:.4f}"]
    assert f"({tmp_path / 'a' / 'last.pt'}, weights: EMA, decay 0.5, step 8: 2 epochs trained)\n" in (out / "result.txt").read_text()
    plain = [a for a in argv if a not in ("--ema-decay", "0.5")]
    capsys.readouterr()
    assert T.cli([*plain, "--epochs", "3", "--max-steps", "9", "--output-dir", str(tmp_path / "a"), "--resume", "auto"]) == 0
    assert "; its weight EMA ('model') is not continued without --ema-decay: the trained weights go on" in capsys.readouterr().out
    b["train_model"].pop("convblock1.layers.0.weight")
    torch.save(b, tmp_path / "b" / "last.pt")
    assert T.cli([*argv, "--epochs", "3", "--output-dir", str(tmp_path / "b"), "--resume", "auto"]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: {tmp_path / 'b' / 'last.pt'}: its train_model is "
                                       "incompatible with InversionNet (1 of the model's missing: convblock1.layers.0.weight)\n")


def test_overwrite_removes_the_old_run_before_writing_the_new_one(ids_data, tmp_path, capsys):
    """--overwrite replaces a run whole: its best.pt, log and TensorBoard events go, so nothing of it can be
    mistaken for the new run's; files that are not the run's stay. A new run that its checks refuse removes
    nothing."""
    _, lists = ids_data
    out = tmp_path / "run"
    for d in ("tb", "eval", "predict"):
        (out / d).mkdir(parents=True)
    old = ("best.pt", "last.pt", "args.json", "train.log", "tb/events.out.tfevents.old", "eval/metrics.json",
           "eval/sample_3_best.png", "notes.txt")
    kept = ("eval/my_notes.txt", "predict/shots.npy", "predict/shots_velocity.npy")  # not eval's results: the user's
    for name in kept:
        (out / name).write_text("mine")
    for name in old:
        (out / name).write_text("old run")
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "1", "--max-steps", "1", "--val-every", "0", "--no-tensorboard",
            "--output-dir", str(out), "--overwrite"]
    assert T.cli([*argv, "--batch-size", "16"]) == 2  # 8 training samples: refused after the output-dir checks
    assert "fewer than one global batch" in capsys.readouterr().err
    assert all((out / name).read_text() == "old run" for name in old)
    assert T.cli(argv) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert not (out / "tb").exists() and "old run" not in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["my_notes.txt"]  # the old model's results went
    assert all((out / name).read_text() == "mine" for name in kept)
    assert all(torch.load(out / f, weights_only=False)["step"] == 1 for f in ("last.pt", "best.pt"))  # the new run's
    assert json.loads((out / "args.json").read_text())["overwrite"] is True
    assert (out / "notes.txt").read_text() == "old run"


def test_resume_auto_starts_over_after_a_kill_before_the_first_checkpoint(ids_data, tmp_path, capsys):
    """What a kill during the first epoch leaves (args.json and a log, no last.pt) does not block the command
    that run.sh repeats: --resume auto starts the run again."""
    _, lists = ids_data
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "train.log").write_text("killed\n")
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "1", "--val-every", "0", "--output-dir", str(out), "--resume", "auto",
            "--device", "cpu"]  # the settings line below is the CPU's
    assert T.cli([*argv, "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"--resume auto: no {out / 'last.pt'} yet, starting a new run" in printed
    assert "stopped at --max-steps 1 (epoch 0, batch 1); last.pt written" in printed
    assert "world 1); deterministic algorithms off\n" in printed  # no cudnn or TF32 setting named on a CPU
    assert "4 batches/epoch of 2; normalisation" in printed  # 8 samples: nothing left out, nothing said
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 1
    assert T.cli(argv) == 0 and torch.load(out / "last.pt", weights_only=False)["step"] == 4  # the epoch's 3 other steps
    assert T.cli(argv) == 0 and "the run is complete: 1 of --epochs 1 trained" in capsys.readouterr().out
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4
    (out / "last.pt").unlink()  # removed to save space: best.pt alone is no run to restart over
    best = (out / "best.pt").read_bytes()
    assert T.cli(argv) == 2 and (out / "best.pt").read_bytes() == best
    err = capsys.readouterr().err
    assert "holds best.pt but no last.pt to continue from" in err
    assert err.endswith("(bash run.sh passes --resume auto: remove its --run directory to start over, or pass another --run)\n")


@pytest.mark.parametrize("missing, needle", [
    ("tensorboard", "the tensorboard package is not installed: pip install -r requirements.txt, or pass --no-tensorboard"),
    ("tqdm", "the tqdm package is not installed: pip install -r requirements.txt"),
])
def test_a_missing_package_is_named_before_anything_is_written(tmp_path, capsys, monkeypatch, missing, needle):
    """TensorBoard is imported at the first log step, after args.json is written: without it the run is refused
    at the start, leaving no directory that would block the next launch, and --no-tensorboard trains without it."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    out = tmp_path / "run"
    argv = ["--data-root", str(tmp_path / "never-read"), "--output-dir", str(out)]
    assert T.cli(argv) == 2 and capsys.readouterr().err.strip() == f"train_inversionnet.py: error: {needle}"
    assert not out.exists()
    if missing == "tensorboard":
        T.check_args(T.get_args_parser().parse_args([*argv, "--no-tensorboard"]))


def test_an_empty_val_list_is_a_run_without_validation(ids_data, tmp_path, capsys):
    """An empty --val-list (as simulate_openfwi.py --val-files 0 writes) trains with --val-every 0, and is
    refused, with the way out named, when the run would validate."""
    _, lists = ids_data
    (tmp_path / "val.txt").write_text("\n")
    argv = [*map(str, lists[:3]), str(tmp_path / "val.txt"), *BASE_RUN, "--max-steps", "1", "--output-dir", str(tmp_path / "run")]
    assert T.cli(argv) == 2
    assert capsys.readouterr().err.strip() == (f"train_inversionnet.py: error: {tmp_path / 'val.txt'}: empty split list; "
                                               f"name the validation files in it, or pass --val-every 0")
    assert T.cli([*argv, "--val-every", "0"]) == 0
    assert "stopped at --max-steps 1" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["train_inversionnet", "eval_inversionnet"])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_help_is_printed_once_under_torchrun(capsys, monkeypatch, script, rank):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).get_args_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and (out.startswith("usage: ") if rank == "0" else out == "")


@pytest.mark.parametrize("held_back", [False, True], ids=["at-once", "behind-a-peer-error"])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_ctrl_c_that_stops_at_once_is_said_once(tmp_path, capsys, monkeypatch, rank, held_back):
    """torchrun passes a Ctrl-C to every rank: rank 0 alone says that the run stopped at once; all exit 130. A
    call that holds the signal back until it fails (DDP's constructor, when a peer has gone) delivers it as its
    error is reported: the same line, not a traceback of the one inside the other."""
    def pressed(*args):
        raise RuntimeError("Connection closed by peer") if held_back else KeyboardInterrupt
    def reported(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "main", pressed)
    monkeypatch.setattr(T, "report_input_error", reported)
    monkeypatch.setattr(T, "STOPPED_AT_ONCE", threading.Event())
    monkeypatch.setenv("RANK", rank)
    try:
        assert T.cli(["--data-root", str(tmp_path), "--output-dir", str(tmp_path / "run")]) == 130
    except KeyboardInterrupt:  # (escaping, it would stop the whole pytest session)
        pytest.fail("the Ctrl-C escaped cli()")
    said = "train_inversionnet.py: interrupted: stopped at once; last.pt, if there is one, is the previous complete checkpoint\n"
    assert capsys.readouterr().err == (said if rank == "0" else "") and T.STOPPED_AT_ONCE.is_set()


def test_another_runs_checkpoint_does_not_resume_into_an_existing_run(tmp_path, capsys):
    """--resume PATH continues in --output-dir: into a directory holding another run only with --overwrite, and
    --overwrite never deletes the checkpoint it is asked to resume or to start from (--init-from), however named."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "last.pt").write_bytes(d.name.encode())
    common = ["--data-root", str(tmp_path / "never-read"), "--epochs", "1"]
    assert T.cli([*common, "--resume", str(a / "last.pt"), "--output-dir", str(b)]) == 2
    assert f"--output-dir {b} already holds a run" in capsys.readouterr().err
    assert T.cli([*common, "--resume", str(b / "last.pt"), "--output-dir", str(b), "--overwrite"]) == 2
    assert f"--overwrite would delete the run that --resume {b / 'last.pt'} continues" in capsys.readouterr().err
    (a / "link.pt").symlink_to(b / "last.pt")
    assert T.cli([*common, "--resume", str(a / "link.pt"), "--output-dir", str(b), "--overwrite"]) == 2
    assert f"--overwrite would delete the run that --resume {a / 'link.pt'} continues" in capsys.readouterr().err
    assert T.cli([*common, "--init-from", str(b / "last.pt"), "--output-dir", str(b), "--overwrite"]) == 2
    assert capsys.readouterr().err.endswith(f"--overwrite would delete the {b / 'last.pt'} that --init-from starts from: "
                                            f"copy it out of {b} first, or choose another --output-dir\n")
    assert (a / "last.pt").read_bytes() == b"a" and (b / "last.pt").read_bytes() == b"b"


def test_another_runs_checkpoint_continues_into_a_replaced_run(short_run, ids_data, tmp_path, capsys):
    _, lists = ids_data
    out = tmp_path / "b"
    out.mkdir()
    (out / "best.pt").write_text("run b")
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "2", "--resume", str(short_run / "last.pt"), "--output-dir", str(out)]
    assert T.cli([*argv, "--overwrite"]) == 0
    assert "resuming from" in capsys.readouterr().out
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["epoch"] == 2 and last["step"] == 8
    # run b's best.pt is gone; --overwrite judges the best model afresh, so the first validation wrote one
    best = torch.load(out / "best.pt", weights_only=False)
    assert (best["epoch"], best["step"]) == (2, 8)


def test_flags_a_run_could_not_honour_are_refused(monkeypatch, capsys):
    """--parallel none/dp under a multi-process torchrun would make N separate runs share one directory, and
    --sync-bn means nothing outside DDP (it is checked against a CUDA device without needing one); under DDP
    --detect-anomaly would stop one rank and leave the others waiting."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert T.cli(["--parallel", "none", "--output-dir", "never-made"]) == 2
    assert capsys.readouterr().err == ("train_inversionnet.py: error: --parallel none under torchrun would start 2 separate "
                                       "runs writing to one --output-dir: use --parallel ddp (or auto), or launch with python\n")
    with pytest.raises(T.InputError, match="--sync-bn works under DDP only"):
        T.check_device_args(small_args(sync_bn=True), torch.device("cuda"))
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")  # a restarted group re-runs the command, --overwrite included
    with pytest.raises(T.InputError, match="--overwrite in a torchrun launch that can restart"):
        small_args(overwrite=True)
    T.check_device_args(small_args(detect_anomaly=True), torch.device("cpu"))  # one process: the NaN is named
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_world_size", lambda: 2)
    with pytest.raises(T.InputError, match=r"^--detect-anomaly runs in one process \(under DDP the rank it stops"):
        T.check_device_args(small_args(detect_anomaly=True), torch.device("cpu"))


def test_settings_without_effect_in_this_run_are_noted(tmp_path):
    notes = T.settings_notes(small_args(loader="gpu", normalize="workers"), 4, torch.device("cpu"))
    assert notes == "--normalize workers has no effect with --loader gpu (the cache normalises on the device)"
    assert T.settings_notes(small_args(loader="map", normalize="workers"), 4, torch.device("cpu")) == ""
    notes = T.settings_notes(small_args(lr_scheduler="cosine", lr_gamma=0.5, lr_step_size=5), 4, torch.device("cpu"))
    assert notes == ("--lr-gamma 0.5 has no effect with --lr-scheduler cosine; --lr-step-size 5 has no effect with "
                     "--lr-scheduler cosine")  # noted, not refused: a --config of a step run may switch schedules
    assert T.settings_notes(small_args(lr_scheduler="step", lr_gamma=0.5, lr_step_size=5), 4, torch.device("cpu")) == ""
    notes = T.settings_notes(small_args(lr_scheduler="step"), 4, torch.device("cpu"))
    assert notes == "--lr-step-size 30 not reached within --epochs 10"  # the default step size: noted too
    notes = T.settings_notes(small_args(lr_scheduler="step", lr_step_size=10), 4, torch.device("cpu"))
    assert notes == "--lr-step-size 10 not reached within --epochs 10"  # (its first decay would come after the last step)
    assert T.settings_notes(small_args(lr_scheduler="step", lr_step_size=9.5), 4, torch.device("cpu")) == ""
    for schedule in ("cosine", "warmup-multistep"):
        notes = T.settings_notes(small_args(lr_scheduler=schedule, lr_warmup_epochs=12), 4, torch.device("cpu"))
        assert notes == "--lr-warmup-epochs 12 does not end within --epochs 10 (the rate rises throughout)"
        notes = T.settings_notes(small_args(lr_scheduler=schedule, lr_warmup_epochs=10), 4, torch.device("cpu"))
        assert notes == "--lr-warmup-epochs 10 does not end within --epochs 10 (the rate rises throughout)"
        assert T.settings_notes(small_args(lr_scheduler=schedule, lr_warmup_epochs=9.5), 4, torch.device("cpu")) == ""
    for name in ("t.txt", "v.txt", "s.json"):
        (tmp_path / name).write_text("")
    notes = T.settings_notes(small_args(persistent_workers=True, num_workers=0, train_list=str(tmp_path / "t.txt"),
                                        val_list=str(tmp_path / "v.txt"), train_size=0.5, dataset="curvevel-a",
                                        stats=str(tmp_path / "s.json"), prefetch_factor=4, val_batch_size=4,
                                        val_every=0, data_root="elsewhere"), 4, torch.device("cpu"))
    assert notes == ("--persistent-workers has no effect without loader workers; --prefetch-factor 4 has no effect "
                     "without loader workers; --val-batch-size 4 has no effect with --val-every 0 (nothing is "
                     "validated); --train-size 0.5 has no effect with --train-list (the lists are the split); --data-root "
                     "elsewhere has no effect with --train-list (the lists name the files); --dataset curvevel-a has no "
                     "effect beside --stats (its constants are used)")
    assert T.settings_notes(small_args(persistent_workers=True, num_workers=1, loader="map", prefetch_factor=4,
                                       val_batch_size=4), 4, torch.device("cpu")) == ""
    for unset in (dict(val_every=0), dict(overfit_batch=True)):  # what check_args fills in is not a setting given
        assert T.settings_notes(small_args(**unset), 4, torch.device("cpu")) == ""


@pytest.mark.parametrize("extra", [[], ["--overfit-batch"]])  # one fixed batch of one cannot train either
def test_batch_size_one_is_refused(capsys, extra):
    assert T.cli(["--batch-size", "1", *extra]) == 2
    assert capsys.readouterr().err == "train_inversionnet.py: error: --batch-size must be at least 2: BatchNorm cannot train on one sample\n"


def test_init_strict_no_loads_what_matches_and_says_what_it_skipped(tmp_path, ids_data, capsys):
    torch.manual_seed(1)
    src = T.InversionNet().state_dict()
    changed = dict(src)
    changed["deconv6.layers.0.weight"] = torch.zeros(2, 32, 3, 3)  # a model with two output channels
    del changed["deconv6.layers.0.bias"]
    changed["extra.head.weight"] = torch.zeros(3)
    torch.save({"model": changed}, tmp_path / "other.pth")
    model = T.InversionNet()
    note = T.load_matching(model, str(tmp_path / "other.pth"))
    assert note.startswith(f"--init-from {tmp_path / 'other.pth'}: loaded 173 of the model's 175 tensors; skipped 2: ")
    assert "deconv6.layers.0.weight (2, 32, 3, 3) vs (1, 32, 3, 3)" in note and "extra.head.weight (3,) not in the model" in note
    assert note.endswith("freshly initialised 2: deconv6.layers.0.weight, deconv6.layers.0.bias")
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in changed.items() if k in mine and mine[k].shape == v.shape)
    _, lists = ids_data
    argv = [*map(str, lists), *BASE_RUN, "--epochs", "1", "--max-steps", "1", "--init-from", str(tmp_path / "other.pth")]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "strict")]) == 2
    assert capsys.readouterr().err == (
        f"train_inversionnet.py: error: {tmp_path / 'other.pth'}: incompatible with InversionNet (2 tensors that do not "
        "fit: deconv6.layers.0.weight (2, 32, 3, 3) vs (1, 32, 3, 3), extra.head.weight (3,) not in the model; 1 of the "
        "model's missing: deconv6.layers.0.bias); --init-strict no loads the tensors that fit\n")
    for again in ([], ["--overwrite"]):  # the line is in the new run's train.log, not in the old one it removes
        assert T.cli([*argv, "--output-dir", str(tmp_path / "loose"), "--init-strict", "no", *again]) == 0
        assert "loaded 173 of the model's 175 tensors" in capsys.readouterr().out
        assert "loaded 173 of the model's 175 tensors" in (tmp_path / "loose" / "train.log").read_text()
    torch.save({"model": {"head.weight": torch.zeros(3)}}, tmp_path / "unrelated.pth")  # nothing to fine-tune from
    unrelated = ["--init-from", str(tmp_path / "unrelated.pth"), "--init-strict", "no", "--output-dir", str(tmp_path / "none")]
    assert T.cli([*argv, *unrelated]) == 2
    assert capsys.readouterr().err == (f"train_inversionnet.py: error: --init-from {tmp_path / 'unrelated.pth'}: no tensor "
                                       "matches the model's names and shapes; nothing to fine-tune from\n")
