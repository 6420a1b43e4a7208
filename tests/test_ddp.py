"""A real two-process torchrun DDP run on CPU (Gloo)."""
import os
import re

import numpy as np
import pytest
import torch

import train_inversionnet as T
from helpers import ROOT, TRAIN, run_script, write_ids_dataset, write_split_list

pytestmark = pytest.mark.slow


def test_ddp_ranks_agree_and_first_update_matches_mean_gradient(tmp_path):
    out = tmp_path / "ddp.pt"
    r = run_script(os.path.join(ROOT, "tests", "ddp_worker.py"), out, ROOT, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: ranks identical" in r.stdout and "step 1: ranks identical" in r.stdout
    assert "BatchNorm statistics averaged over ranks" in r.stdout and "--fast: the ranks agree on the loader" in r.stdout
    saved = torch.load(out, weights_only=False)
    model = T.InversionNet()
    model.load_state_dict(saved["init"])
    grads = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (torchrun's OMP_NUM_THREADS=1): other thread counts round differently
    try:
        for x, y in saved["batches"]:  # BatchNorm statistics are per rank, so each batch runs alone
            model.zero_grad()
            T.loss_fn(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    model.load_state_dict(saved["init"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    mean_grads = {}
    for (name, p), *gs in zip(model.named_parameters(), *grads):
        p.grad = mean_grads[name] = sum(gs) / len(gs)
    opt.step()
    compared = total = 0
    for name, p in model.named_parameters():
        ddp_p = saved["after_first"][name]
        # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): where |g| is near rounding level
        # (float32 sums that cancel; conv biases feeding BatchNorm are exactly 0) either sign is right
        assert (ddp_p - saved["init"][name]).abs().max() <= 1.01e-3  # no element moves more than lr
        if name.endswith("layers.0.bias"):
            continue
        live = mean_grads[name].abs() > 1e-6
        torch.testing.assert_close(p.detach()[live], ddp_p[live], rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
        compared += int(live.sum())
        total += p.numel()
    assert compared > 0.7 * total  # about 76% of all weights carry gradients above 1e-6 here


def test_train_script_under_torchrun(tmp_path):
    pairs = write_ids_dataset(tmp_path / "d", (4, 4, 4, 1))
    out = tmp_path / "run"
    # one validation sample: rank 1's share of the split is empty, and validation still runs and reports it
    r = run_script(TRAIN, "--train-list", write_split_list(tmp_path / "train.txt", pairs[:3]), "--val-list",
                   write_split_list(tmp_path / "val.txt", pairs[3:]), "--output-dir", out, "--batch-size", 2, "--epochs", 1,
                   "--num-workers", 0, "--no-progress", "--log-every", 1, "--dataset", "flatvel-a", "--loader", "iterable",
                   "--device", "cpu", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(ddp, world 2)" in r.stdout and r.stdout.count("InversionNet") == 1  # only rank 0 prints
    assert re.search(r"epoch 0 train loss [\d.]+ \| val loss [\d.]+ MAE", r.stdout), r.stdout[-2000:]
    # the last step's line and the epoch's line give the same mean, over both ranks' samples
    last_step = re.findall(r"^epoch 0 step 3 batch 3/3 loss ([\d.]+) ", r.stdout, re.M)
    assert last_step == re.findall(r"^epoch 0 train loss ([\d.]+) ", r.stdout, re.M) and len(last_step) == 1, r.stdout
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 3  # 12 train samples / (2 per rank x 2 ranks)
    assert ck["args"]["scale_lr"] and ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("flags, needle", [
    (["--data-root", "NOWHERE"], "--data-root NOWHERE: no such directory"),
    (["--amp", "fp64"], "argument --amp: invalid choice: 'fp64'"),  # argparse's own errors too
    # rank 0 alone makes the directory; the other ranks learn that it failed instead of dying in a collective
    (["--data-root", "DATA", "--output-dir", "AFILE/run"], "--output-dir AFILE/run is not writable: Not a directory"),
    # an OSError in what rank 0 alone writes (the run's records) ends the other rank as quietly
    (["--data-root", "DATA", "--output-dir", "PROVDIR"], "[rank 0] PROVDIR/provenance.json: exists and is not a regular file"),
])
def test_bad_input_under_torchrun_is_printed_once(tmp_path, flags, needle):
    write_ids_dataset(tmp_path / "data", (4, 4, 4, 3))
    (tmp_path / "afile").touch()
    (tmp_path / "provdir" / "provenance.json").mkdir(parents=True)
    paths = {"NOWHERE": tmp_path / "nowhere", "DATA": tmp_path / "data", "AFILE": tmp_path / "afile", "PROVDIR": tmp_path / "provdir"}

    def real(text):
        for key, path in paths.items():
            text = text.replace(key, str(path))
        return text
    r = run_script(TRAIN, "--output-dir", tmp_path / "run", *map(real, flags), "--device", "cpu", "--batch-size", 2,
                   "--dataset", "flatvel-a", nproc=2)
    assert r.returncode != 0
    assert r.stderr.count("train_inversionnet.py: error:") == 1, r.stderr[-3000:]
    assert "train_inversionnet.py: error: " + real(needle) in r.stderr
    # no usage text, and no traceback but torchrun's own (ChildFailedError)
    assert "usage:" not in r.stderr and r.stderr.count("Traceback (most recent call last)") <= 1, r.stderr[-3000:]


def test_a_bad_sample_under_torchrun_is_named_by_the_rank_that_read_it(tmp_path):
    pairs = write_ids_dataset(tmp_path / "data", (4, 4, 4))
    x = np.load(pairs[0][0])
    x[:, 2, 100, 10] = np.nan  # every sample of the file: whichever rank reads one
    np.save(pairs[0][0], x)
    r = run_script(TRAIN, "--data-root", tmp_path / "data", "--output-dir", tmp_path / "run", "--device", "cpu",
                   "--batch-size", 2, "--dataset", "flatvel-a", "--num-workers", 1, "--train-size", 0.67, "--seed", 0,
                   "--no-progress", nproc=2)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("train_inversionnet.py: error: ")]
    bad = re.escape(f"{pairs[0][0]} sample ") + r"\d: NaN or Inf in the data"
    assert lines and all(re.fullmatch(rf"train_inversionnet\.py: error: \[rank \d\] ({bad}|stopped: another rank left the run "
                                      r"\(its own line, if it printed one, says why\))", line) for line in lines), r.stderr[-3000:]
    assert any(re.search(bad, line) for line in lines)
    assert r.stderr.count("Traceback (most recent call last)") <= 1, r.stderr[-3000:]  # torchrun's own only


def test_resume_with_another_world_size_restarts_the_epoch(tmp_path, capsys):
    data = tmp_path / "d"
    write_ids_dataset(data, (4, 4, 4, 4, 4))  # 16 train samples: 4 steps per epoch on 2 ranks of 2, 8 on one process
    out = tmp_path / "run"
    common = ["--data-root", data, "--output-dir", out, "--batch-size", 2, "--num-workers", 0, "--no-progress",
              "--dataset", "flatvel-a", "--lr-scheduler", "cosine", "--epochs", 2, "--device", "cpu"]
    r = run_script(TRAIN, *common, "--max-steps", 3, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["world"], ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (2, 0, 3, 3)
    assert T.cli([*map(str, common), "--resume", "auto"]) == 0
    assert ("resuming from " + str(out / "last.pt") + ": step 0, continuing at the start of epoch 0; world size 2 -> 1: "
            "epoch 0 restarts from its first batch") in capsys.readouterr().out
    ck = torch.load(out / "last.pt", weights_only=False)
    assert (ck["world"], ck["epoch"], ck["step"]) == (1, 2, 16)
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-4)  # --scale-lr on one process
    assert ck["scheduler"]["last_epoch"] == 16


def test_more_processes_than_gpus_is_refused_before_the_group_forms(monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: one line saying what to do, not NCCL's 'invalid device ordinal'."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(T.InputError, match=r"started 2 processes on this node, which has 1 CUDA device\(s\): "
                                           r"use --nproc_per_node=1, or --device cpu"):
        T.setup_distributed("auto", "auto")
    assert not torch.distributed.is_initialized()


def test_a_final_validation_resumed_into_another_directory_ends_with_the_ranks_agreed(tmp_path):
    """A run stopped during its final validation (its last.pt says one is due) resumed into a new directory:
    the ranks validate, rank 0's writer writes last.pt there, and the ranks agree that it exists (the other
    ranks' writers wait for nothing) instead of some starting a checkpoint collective rank 0 never joins."""
    data, a, b = tmp_path / "d", tmp_path / "a", tmp_path / "b"
    write_ids_dataset(data, (4, 4, 4, 4, 4))
    common = ["--data-root", data, "--batch-size", 2, "--num-workers", 0, "--no-progress", "--dataset", "flatvel-a",
              "--max-steps", 2, "--device", "cpu"]
    assert run_script(TRAIN, *common, "--output-dir", a, nproc=2).returncode == 0
    ck = torch.load(a / "last.pt", weights_only=False)
    torch.save({**ck, "val_due": True}, tmp_path / "due.pt")
    r = run_script(TRAIN, *common, "--output-dir", b, "--resume", tmp_path / "due.pt", nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^epoch 0 to batch 2/\d+ train loss [\d.]+ \| val loss", r.stdout, re.M), r.stdout[-2000:]
    assert torch.load(b / "last.pt", weights_only=False)["step"] == 2 and "written: the resumed state" not in r.stdout
