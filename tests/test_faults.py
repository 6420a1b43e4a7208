"""Faults and bad input, triggered for real: signals, kills, non-finite losses, bad files, failing storage."""
import argparse
import collections
import errno
import fcntl
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import train_inversionnet as T
from helpers import (EVAL, ROOT, SIMULATE, TRAIN, assert_same_weights, module_dir, run_script, start, wait_until, write_ids_dataset,
                     write_negative_shape_npy, write_split_list)

pytestmark = pytest.mark.slow
BASE = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--log-every", "1", "--dataset", "flatvel-a", "--device", "cpu"]
EXACT = [*BASE, "--deterministic", "--seed", "3"]  # the runs whose weights are compared bit for bit


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 samples in files of 6, 6, 4: the default split trains on 10 (5 batches of 2) and validates on 6."""
    d = tmp_path_factory.mktemp("faults") / "d"
    write_ids_dataset(d, (6, 6, 4))
    return d


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted two-epoch run that interrupted-and-resumed runs must reproduce exactly."""
    with module_dir(tmp_path_factory, "straight") as base:
        r = run_script(TRAIN, "--data-root", data, "--output-dir", base / "run", "--epochs", 2, *EXACT)
        assert r.returncode == 0, r.stderr
        return torch.load(base / "run" / "last.pt", weights_only=False)


def read_until(proc, pattern, timeout=300):
    """Read the child's stdout line by line until a line matches; returns everything read. A child that
    prints nothing more for TIMEOUT seconds is killed and the test fails (a blocked read would hang the suite)."""
    seen, found = [], threading.Event()

    def reader():  # ends at the matching line, so that the test reads the rest itself
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                found.set()
                return
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        proc.kill()
        thread.join()
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(seen)}")
    if not found.is_set():
        raise AssertionError(f"exited ({proc.wait()}) before printing {pattern!r}:\n{''.join(seen)}\n{proc.stderr.read()}")
    return "".join(seen)


def load(path):
    return torch.load(path, weights_only=False)


def wait_for_file(path, timeout=120):
    """Until PATH exists: checkpoints are written on a background thread, shortly after the epoch's line."""
    assert wait_until(lambda: os.path.exists(path), timeout), f"{path} was not written"


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---- interruption ----

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_mid_epoch_writes_last_and_resume_matches_straight_run(data, straight, tmp_path, sig, code):
    out = tmp_path / "run"
    p = start(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, *EXACT)
    read_until(p, r"epoch 0 step 2 ")
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == code, stderr
    assert f"stopped by signal {int(sig)}" in stdout and "last.pt written" in stdout
    ck = load(out / "last.pt")
    k = ck["batch_in_epoch"]
    assert ck["epoch"] == 0 and 2 <= k < 5 and ck["step"] == k  # the step under way was finished, not dropped
    assert not list(out.glob("*.tmp-*"))
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, "--resume", "auto", *EXACT)
    assert r.returncode == 0, r.stderr
    assert f"continuing at epoch 0 after batch {k}/5" in r.stdout
    assert f"epoch 0 step {k + 1} batch {k + 1}/5" in r.stdout  # the batches already trained are skipped
    assert_same_weights(load(out / "last.pt"), straight)


def epoch_lines(text, epoch):
    """EPOCH's lines of a run's output without their timings: what a resumed run must print as the straight one did."""
    return [line.rsplit(" | ", 1)[0] for line in text.splitlines() if line.startswith(f"epoch {epoch} ") and " train loss " in line]


@pytest.mark.parametrize("until, last_at", [((), (1, 4, 8)), (("--max-steps", "6"), (1, 2, 6))],
                         ids=["last-epoch", "max-steps"])
def test_a_signal_during_validation_stops_it_and_a_resume_validates_first(tmp_path, capsys, monkeypatch, until, last_at):
    """Ctrl-C does not wait for a validation to end (minutes on a CPU): last.pt keeps the training but not its
    validation, best.pt stays the earlier epoch's, and the resume validates first, without training on, to
    the figures and weights of the run that was never stopped. The validation stopped is the run's final one,
    after the last epoch or at --max-steps inside it."""
    write_ids_dataset(tmp_path / "d", (4, 4, 4))  # trains on 8 samples (4 batches), validates on 4 (2 batches)
    argv = ["--data-root", str(tmp_path / "d"), *EXACT, "--epochs", "2", *until]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "straight")]) == 0
    straight = epoch_lines(capsys.readouterr().out, 1)
    assert len(straight) == 1 and " | val loss " in straight[0]
    metrics, calls = T.per_sample_metrics, []

    def ctrl_c_in_the_second_validation(pred, target):
        calls.append(len(pred))
        if len(calls) == 3:  # epoch 1's first validation batch
            os.kill(os.getpid(), signal.SIGINT)
        return metrics(pred, target)
    monkeypatch.setattr(T, "per_sample_metrics", ctrl_c_in_the_second_validation)
    out = tmp_path / "run"
    assert T.cli([*argv, "--output-dir", str(out)]) == 130
    printed = capsys.readouterr().out
    assert calls == [2, 2, 2]  # the batch under way, and no other
    assert "train loss" in printed and "| validation stopped by the signal; a resume runs it" in printed
    assert f"stopped by signal 2 at step {last_at[2]}; last.pt written" in printed
    last, best = load(out / "last.pt"), load(out / "best.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["step"], best["step"]) == (*last_at, 4)
    monkeypatch.setattr(T, "per_sample_metrics", metrics)
    if until:  # a resume without validation leaves the one due to the next resume that validates
        assert T.cli([*argv, "--output-dir", str(out), "--resume", "auto", "--val-every", "0"]) == 0
        assert "the run has reached --max-steps 6" in capsys.readouterr().out and load(out / "last.pt")["val_due"]
    assert T.cli([*argv, "--output-dir", str(out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert f"continuing at epoch 1 after batch {last_at[1]}/4" in printed and "reached --max-steps" not in printed
    assert epoch_lines(printed, 1) == straight  # the train loss of the steps before it, then the validation
    assert_same_weights(load(out / "last.pt"), load(tmp_path / "straight" / "last.pt"))
    assert load(out / "best.pt")["step"] == load(tmp_path / "straight" / "best.pt")["step"]
    assert T.cli([*argv, "--output-dir", str(out), "--resume", "auto"]) == 0  # and nothing is left to do
    assert " | val loss " not in capsys.readouterr().out


@pytest.mark.parametrize("until, in_call, stops", [((), 1, True), (("--max-steps", "6", "--val-every", "0"), 2, False)],
                         ids=["epoch-end", "max-steps-without-validation"])
def test_a_signal_during_precise_bn_stops_it_where_a_resume_redoes_it(tmp_path, capsys, monkeypatch, until, in_call, stops):
    """Ctrl-C does not wait for --precise-bn's batches either: the statistics go back to the running averages
    they were replacing, so last.pt holds no partial average, and the resume recomputes them and validates, to
    the weights of the run that was never stopped. At --max-steps without a validation split no resume comes
    back to them: there the batches are finished and saved first."""
    write_ids_dataset(tmp_path / "d", (4, 4, 4))  # 4 training batches an epoch
    argv = ["--data-root", str(tmp_path / "d"), *EXACT, "--epochs", "2", "--precise-bn", "2", *until]
    assert T.cli([*argv, "--output-dir", str(tmp_path / "straight")]) == 0
    straight = epoch_lines(capsys.readouterr().out, 0)
    precise_bn, forward, seen = T.precise_bn, T.forward, {"calls": 0}

    def counted_precise_bn(run, loader, n_batches, stop=None):
        seen["calls"] += 1
        seen["before"] = {k: v.clone() for k, v in run.eval_model.state_dict().items()}
        seen["forwards"] = 0
        return precise_bn(run, loader, n_batches, stop)

    def ctrl_c_in_its_first_batch(model, x, amp_dtype):
        if seen["calls"] == in_call and "forwards" in seen:
            seen["forwards"] += 1
            if seen["forwards"] == 1:
                os.kill(os.getpid(), signal.SIGINT)
        return forward(model, x, amp_dtype)
    monkeypatch.setattr(T, "precise_bn", counted_precise_bn)
    monkeypatch.setattr(T, "forward", ctrl_c_in_its_first_batch)
    out = tmp_path / "run"
    assert T.cli([*argv, "--output-dir", str(out)]) == 130
    printed, last = capsys.readouterr().out, load(out / "last.pt")
    assert ("| --precise-bn stopped by the signal; a resume runs it" in printed) == stops
    assert seen["forwards"] == (1 if stops else 2)  # the batch under way, and no other; or all of them
    recomputed = [k for k in seen["before"] if not torch.equal(last["model"][k], seen["before"][k])]
    assert (recomputed == []) == stops and (last["epoch"], last["step"]) == ((0, 4) if stops else (1, 6))
    monkeypatch.setattr(T, "precise_bn", precise_bn)
    monkeypatch.setattr(T, "forward", forward)
    assert T.cli([*argv, "--output-dir", str(out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert epoch_lines(printed, 0) == (straight if stops else [])
    assert ("the run has reached --max-steps 6" in printed) != stops
    assert_same_weights(load(out / "last.pt"), load(tmp_path / "straight" / "last.pt"))


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_terminal_that_hangs_up_ends_the_run_with_its_checkpoint(data, tmp_path):
    """An ssh session dropped: the terminal goes (its writes then fail with EIO) and SIGHUP arrives. The run,
    progress bar and all, saves last.pt as SIGTERM would and says why in train.log."""
    import pty
    import select
    primary, secondary = pty.openpty()
    out = tmp_path / "run"
    argv = ["--data-root", data, "--output-dir", out, "--epochs", 2, "--progress", *EXACT]
    p = subprocess.Popen([sys.executable, TRAIN, *map(str, argv)], stdout=secondary, stderr=secondary, cwd=ROOT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2"))
    os.close(secondary)
    seen, deadline = b"", time.monotonic() + 300
    while b"epoch 0" not in seen and time.monotonic() < deadline and p.poll() is None:  # the bar is drawn
        if select.select([primary], [], [], 1)[0]:
            seen += os.read(primary, 65536)
    assert b"epoch 0" in seen, seen.decode(errors="replace")
    os.close(primary)  # the terminal is gone
    p.send_signal(signal.SIGHUP)
    assert p.wait(timeout=300) == 128 + signal.SIGHUP
    assert (out / "train.log").read_text().splitlines()[-1].startswith(f"stopped by signal {int(signal.SIGHUP)} at step")
    assert load(out / "last.pt")["step"] >= 1


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_launch_under_nohup_keeps_ignoring_sighup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = T.Stop()
        stop.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        stop.restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a plain launch: the run handles it
        stop.install()
        assert signal.getsignal(signal.SIGHUP) == stop._handle
        stop.restore()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_under_run_sh_stops_with_a_resume_hint_and_the_same_command_continues(tmp_path, sig):
    """Ctrl-C, or a SIGTERM to the process group (timeout, a scheduler), signals run.sh and the
    trainer alike: the trainer saves last.pt, run.sh says how to go on (not "training failed") and exits
    with the trainer's 130 / 143; the same command then resumes, finishes and evaluates."""
    cmd = ["bash", os.path.join(ROOT, "run.sh"), "--profile", "cpu", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"),
           "--sim-args", "--files 3 --samples-per-file 4 --val-files 1",
           "--train-args", "--epochs 2 --batch-size 2 --log-every 1 --precise-bn 1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", PYTHON=sys.executable)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    read_until(p, r"epoch 0 step 1 ")
    os.killpg(p.pid, sig)  # the whole process group, as a terminal's Ctrl-C or a scheduler's stop does
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, stdout + stderr
    assert f"stopped by signal {int(sig)}" in stdout and "training failed" not in stderr
    assert stderr.strip().endswith(f"run.sh: training stopped by a signal; the same bash run.sh command continues it from "
                                   f"{tmp_path / 'r'}/last.pt"), stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from" in r.stdout and "== done" in r.stdout
    assert load(tmp_path / "r" / "last.pt")["epoch"] == 2 and (tmp_path / "r" / "eval" / "metrics.json").exists()


def stand_in_python(tmp_path, *cases):
    """A bash script to pass run.sh as PYTHON: CASES, lines that handle some calls and exit, then the real
    interpreter for every other call. Returns its path."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n" + "".join(f"{c}\n" for c in cases) + f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("stage", ["-m pip", "simulate_openfwi.py", "eval_inversionnet.py"],
                         ids=["install", "simulation", "evaluation"])
def test_sigterm_to_run_sh_alone_lets_the_stage_finish_and_starts_no_other(tmp_path, stage):
    """kill PID of run.sh (docker stop of a container it heads): the install or stage under way is not
    signalled twice when the group gets the signal too, so it finishes; no later stage starts, and run.sh
    says so, exit 143. Signalled during the evaluation, the last stage, the job is done: summary, exit 0."""
    began, later = tmp_path / "began", tmp_path / "later"
    nxt = {"-m pip": "simulate_openfwi.py", "simulate_openfwi.py": "train_inversionnet.py"}.get(stage, "no-such-stage")
    fake = stand_in_python(tmp_path, f'if [[ "$1" == "{stage}" || "$1 $2" == "{stage}" ]]; then touch {began}; sleep 3; exit 0; fi',
                           f'if [[ "$1" == {nxt} ]]; then touch {later}; exit 0; fi',
                           'if [[ "$1" == simulate_openfwi.py || "$1" == train_inversionnet.py ]]; then exit 0; fi')
    p = subprocess.Popen(["bash", os.path.join(ROOT, "run.sh"), "--profile", "cpu", "--data", str(tmp_path / "d"), "--run",
                          str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHON=str(fake)))
    assert wait_until(began.exists, 120)
    p.send_signal(signal.SIGTERM)  # to run.sh's process only
    stdout, stderr = p.communicate(timeout=60)
    last = stderr.splitlines()[-1] if stderr.strip() else ""
    if stage == "-m pip":
        assert p.returncode == 143 and last == "run.sh: stopped by SIGTERM during the install; the same command goes on"
    elif stage == "simulate_openfwi.py":
        assert p.returncode == 143 and last == (f"run.sh: stopped by SIGTERM before 2/3 train -> {tmp_path / 'r'}; the same "
                                                f"bash run.sh command goes on")
    else:
        assert p.returncode == 0 and "== done" in stdout, stdout + stderr
    assert not later.exists()


def test_second_sigint_stops_at_once_with_one_line(data, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        p = start(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, *BASE)
        read_until(p, r"epoch 0 step 1 ")
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)
        p.send_signal(signal.SIGINT)  # inside the step the first one asked to finish
        stdout, stderr = p.communicate(timeout=300)
        # both arriving inside one C++ call (a stalled test process) run Python's handler once: one Ctrl-C,
        # stopped gracefully; then try again
        if not (p.returncode == 130 and not stderr and "stopped by signal 2 at step" in stdout):
            break
    assert p.returncode == 130, stderr
    assert stderr.strip() == ("train_inversionnet.py: interrupted: stopped at once; last.pt, if there is one, "
                              "is the previous complete checkpoint")
    assert not list(out.glob("*.tmp-*"))
    if (out / "last.pt").exists():
        load(out / "last.pt")


def test_leaving_at_once_waits_for_a_checkpoint_write_and_for_nothing_else(tmp_path):
    """After a second Ctrl-C: a write under way lands; an idle worker pool (torch.compile leaves one, and a
    normal exit joins it) does not hold the process."""
    code = ("import concurrent.futures, threading, time, train_inversionnet as T\n"
            "pool = concurrent.futures.ThreadPoolExecutor(1); pool.submit(int).result()\n"
            f"write = lambda: (time.sleep(1), open({str(tmp_path / 'landed')!r}, 'w').close())\n"
            "threading.Thread(target=write, name=T.CheckpointWriter.THREAD).start()\n"
            "T.exit_at_once(130)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and (tmp_path / "landed").exists(), r.stderr


def test_a_second_ctrl_c_is_raised_outside_finalisers_only():
    """Raised inside a __del__ (a DataLoader iterator joining its workers as an epoch ends, where a stress run
    with --num-workers 2 met it in about 1 of 10 double Ctrl-Cs), a KeyboardInterrupt is printed by Python as
    'Exception ignored' with its traceback and then lost; the handler leaves it for the next press there."""
    stop, seen = T.Stop(), []
    stop._handle(signal.SIGINT, sys._getframe())  # the first: a graceful stop, recorded
    assert stop.received == signal.SIGINT

    class Finalised:
        def __del__(self):
            stop._handle(signal.SIGINT, sys._getframe())
            seen.append("went on")

    Finalised()  # no reference: __del__ runs here
    assert seen == ["went on"]
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, sys._getframe())


def test_ddp_ranks_check_for_a_signal_every_few_seconds_of_training(monkeypatch):
    """Between log steps, the ranks agree on a signal about every STOP_CHECK_SECONDS: torchrun kills them 30 s
    after it forwards a Ctrl-C, and the bare CPU launch takes 8 s a step with a log line every 10 steps. The
    cadence is the smallest any rank asks for, so all check at the same steps."""
    other_rank_every = [1000]

    def all_reduce(t, op):  # this rank's values against another rank's: signal 0, cadence other_rank_every
        reduce = {T.dist.ReduceOp.MAX: torch.maximum, T.dist.ReduceOp.MIN: torch.minimum}.get(op, torch.add)
        t.copy_(reduce(t, torch.tensor([0, -other_rank_every[0]])))

    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(T.dist, "all_reduce", all_reduce)
    clock = iter([100.0, 108.0, 108.5, 113.5])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    stop, run = T.Stop(), argparse.Namespace(step=1, device=torch.device("cpu"))
    assert stop.pending(run) and not stop.check(run) and stop.every == 1  # nothing measured yet: every step
    run.step = 2
    assert stop.pending(run) and not stop.check(run) and stop.every == 1  # 8 s a step
    run.step = 12
    assert stop.pending(run) and not stop.check(run) and stop.every == 100  # 0.05 s a step
    other_rank_every[0] = 40
    run.step = 100
    stop.received = signal.SIGTERM
    assert stop.pending(run) and stop.check(run) and stop.signum == signal.SIGTERM and stop.every == 40
    assert [s for s in range(101, 200) if T.Stop.pending(stop, argparse.Namespace(step=s))] == [120, 160]


@pytest.mark.parametrize("began", [True, False])
def test_a_second_ctrl_c_inside_the_writer_threads_start_still_stops_at_once(tmp_path, began):
    """The second Ctrl-C's KeyboardInterrupt can land inside Thread.start() of the checkpoint writer: close()
    must not join what start() left (join() refuses a thread not known to have started), and leaving at
    once lands a write that began and skips one that never will."""
    ck = tmp_path / "last.pt"
    code = ("import threading, torch, train_inversionnet as T\n"
            "start = threading.Thread.start\n"
            "def cut(self):\n"
            + ("    start(self)\n" if began else  # else registered, as start() does first, but never run
               "    with threading._active_limbo_lock:\n        threading._limbo[self] = self\n")
            + "    raise KeyboardInterrupt\n"
            "threading.Thread.start = cut\n"
            "writer = T.CheckpointWriter()\n"
            "try:\n"
            f"    writer.save({{'w': torch.ones(3)}}, {str(ck)!r})\n"
            "except KeyboardInterrupt:\n"
            "    writer.close()\n"
            "    T.exit_at_once(130)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr == "", r.stderr
    assert ck.exists() == began and not list(tmp_path.glob("*.tmp-*"))
    if began:
        assert torch.equal(load(ck)["w"], torch.ones(3))


def test_sigkill_leaves_a_loadable_last_and_resume_matches_straight_run(data, straight, tmp_path):
    out = tmp_path / "run"
    p = start(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, *EXACT)
    read_until(p, r"epoch 1 step 7 ")  # epoch 1 is two steps in
    wait_for_file(out / "last.pt")  # epoch 0's, written in the background
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    ck = load(out / "last.pt")
    assert ck["epoch"] == 1 and ck["step"] == 5 and ck["batch_in_epoch"] == 0
    stale = out / f"last.pt.tmp-{p.pid}"  # what a kill during a checkpoint write leaves next to the intact last.pt
    stale.write_bytes(b"half a checkpoint")
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, "--resume", "auto", *EXACT)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "continuing at the start of epoch 1" in r.stdout
    assert f"removed {stale.name}" in r.stdout and not stale.exists()
    assert_same_weights(load(out / "last.pt"), straight)


# ---- elastic DDP ----

def test_torchrun_restarts_the_group_after_a_worker_is_killed_and_resumes(tmp_path):
    data = tmp_path / "d"
    write_ids_dataset(data, (4, 4, 4, 4, 4))  # 16 train samples: 4 steps per epoch at 2 per rank x 2 ranks
    out = tmp_path / "run"
    p = start(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 3, "--loader", "iterable", *BASE,
              nproc=2, torchrun=("--max-restarts=1", "--monitor-interval=0.5"))
    read_until(p, r"epoch 1 step 5 ")  # one epoch done
    wait_for_file(out / "last.pt")  # and saved
    workers = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "train_inversionnet.py"], capture_output=True, text=True)
    pids = [int(x) for x in workers.stdout.split()]
    assert len(pids) == 2, workers
    os.kill(pids[-1], signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout and "continuing at" in stdout, stdout
    ck = load(out / "last.pt")
    assert ck["epoch"] == 3 and ck["step"] == 12


def test_a_restarted_group_continues_its_own_run_only(tmp_path, monkeypatch):
    """A restart continues the run its first start made (known by the launcher in provenance.json), from its
    last.pt once written (--overwrite cannot come back with it: check_args refuses it in a launch that can
    restart); a directory another launch made is checked as on a first start, so a start it refused is refused
    again instead of taking that run over."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    out, other = tmp_path / "run", tmp_path / "other" / "last.pt"
    out.mkdir()
    other.parent.mkdir()
    other.touch()
    (out / "args.json").write_text("{}")
    prov = out / "provenance.json"
    prov.write_text(json.dumps([{"launcher": "elsewhere:1"}]))
    args = argparse.Namespace(output_dir=str(out), resume=None, overwrite=False)
    assert not T.continue_elastic_run(args, 0) and args.resume is None
    with pytest.raises(T.InputError, match="holds a run that has written no checkpoint yet"):
        T.check_output_dir(args)
    prov.write_text(json.dumps([{"launcher": "elsewhere:1"}, {"launcher": T.launcher()}]))
    args = argparse.Namespace(output_dir=str(out), resume=None, overwrite=False)
    assert T.continue_elastic_run(args, 0) and args.resume == "auto"
    args = argparse.Namespace(output_dir=str(out), resume=str(other), overwrite=False)
    assert T.continue_elastic_run(args, 0) and args.resume == str(other)  # no last.pt of its own yet
    T.check_output_dir(args, own_restart=True)
    (out / "last.pt").touch()
    assert T.continue_elastic_run(args, 0) and args.resume == "auto"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a first start is checked as any
    assert not T.continue_elastic_run(argparse.Namespace(output_dir=str(out), resume=None, overwrite=False), 0)


def test_sigterm_to_torchrun_stops_all_ranks_at_one_step_and_the_group_resumes(tmp_path):
    """Cluster pre-emption: the launcher signals each rank's process group, loader workers included; the
    ranks agree on a step, rank 0 saves, all exit."""
    data = tmp_path / "d"
    write_ids_dataset(data, (4, 4, 4, 4, 4))
    out = tmp_path / "run"
    args = [TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, "--loader", "iterable", *BASE,
            "--num-workers", 1]
    p = start(*args, nproc=2)
    read_until(p, r"epoch 0 step 2 ")
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode != 0 and "stopped by signal 15" in stdout, stdout + stderr[-2000:]
    # torchrun prints its own SignalException traceback; the ranks print none
    assert not re.search(r"\[rank\d\]: Traceback", stderr) and "killed by signal" not in stderr, stderr[-3000:]
    ck = load(out / "last.pt")
    assert ck["epoch"] == 0 and 2 <= ck["batch_in_epoch"] < 4 and ck["step"] == ck["batch_in_epoch"]
    assert ck["epoch_loss"][1] == 4 * ck["batch_in_epoch"]  # the resumed epoch's loss sums are over both ranks
    p = start(*args, "--resume", "auto", nproc=2)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert f"continuing at epoch 0 after batch {ck['batch_in_epoch']}/4" in stdout
    assert re.search(r"^epoch 0 train loss ", stdout, re.M), stdout  # the whole epoch's, as the sums were saved
    assert load(out / "last.pt")["step"] == 8


# ---- numerical faults ----

def test_non_finite_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(tmp_path):
    root = tmp_path / "d"
    write_ids_dataset(root, (6, 6, 4))
    out = tmp_path / "run"
    r = run_script(TRAIN, "--data-root", root, "--output-dir", out, "--epochs", 1, *BASE)
    assert r.returncode == 0, r.stderr
    before = digest(out / "last.pt")
    for f in ("model1.npy", "model2.npy", "model3.npy"):  # a finite but absurd velocity: the L1 sum overflows
        m = np.load(root / "model" / f)
        m[0] = 3.4e38
        np.save(root / "model" / f, m)
    r = run_script(TRAIN, "--data-root", root, "--output-dir", out, "--epochs", 2, "--resume", "auto", *BASE)
    assert r.returncode == 3, r.stdout + r.stderr
    m = re.search(r"error: non-finite loss at epoch 1, batch (\d)/5 \(step (\d+)\); \S*last.pt keeps the last good state",
                  r.stderr)
    assert m and int(m.group(2)) == 5 + int(m.group(1)), r.stderr  # epoch 0 took steps 1-5
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert digest(out / "last.pt") == before and load(out / "last.pt")["epoch"] == 1
    assert "non-finite loss" in (out / "train.log").read_text()


@pytest.mark.parametrize("flags, error", [
    # lr x decay = 1e39: the decoupled decay multiplies every weight by -1e39, beyond float32
    (["--lr", "10", "--val-every", "0"], r"the model [\w.]+ holds NaN or Inf after step 1: an update diverged"),
    # 1e34: finite weights whose forward pass overflows, seen by the validation
    ([], r"non-finite validation loss at epoch 0 \(step 1\): the weights diverged"),
], ids=["weights", "validation"])
def test_an_update_that_diverges_is_never_saved(data, tmp_path, capsys, flags, error):
    """A finite loss, then a step that ruins the weights: exit 3 before any checkpoint holds them (a resume from
    one would fail the same way every time)."""
    out = tmp_path / "run"
    argv = ["--data-root", data, "--output-dir", out, "--weight-decay", "1e38", "--max-steps", "1", *BASE, *flags]
    assert T.cli(list(map(str, argv))) == 3
    err = capsys.readouterr().err
    assert re.fullmatch(rf"train_inversionnet\.py: error: {error}; no checkpoint was written before it\n", err), err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def interrupt_while_importing_torch(p):
    """SIGINT to process P once torch's library is mapped into it (inside `import torch`, a second or more
    before the import ends); its (stdout, stderr)."""
    def importing_torch():
        with open(f"/proc/{p.pid}/maps") as f:
            return "libtorch" in f.read()
    try:
        assert wait_until(lambda: p.poll() is not None or importing_torch(), 60)
        p.send_signal(signal.SIGINT)
        return p.communicate(timeout=60)
    finally:
        p.kill()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches /proc/PID/maps for torch's library")
@pytest.mark.parametrize("script", [TRAIN, EVAL, SIMULATE], ids=os.path.basename)
def test_a_ctrl_c_while_torch_imports_exits_130_without_a_traceback(script):
    """torch takes seconds to import, and a Ctrl-C then (under torchrun, to every rank) once printed a traceback
    per process. The signal goes once torch's library is mapped, inside `import torch`: a signal that came after
    the imports would let --help print its page."""
    p = start(script, "--help", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (pytest run with `&`)
    out, err = interrupt_while_importing_torch(p)
    assert (p.returncode, out, err) == (130, "", "")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches /proc/PID/maps for torch's library")
def test_a_launch_that_ignores_ctrl_c_keeps_ignoring_it():
    """A shell script's `cmd &` starts cmd with SIGINT ignored: the import-time handler above must not undo that."""
    p = start(TRAIN, "--help", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    out, err = interrupt_while_importing_torch(p)
    assert p.returncode == 0 and out.startswith("usage: train_inversionnet.py"), err


def test_a_peer_lost_at_the_last_barrier_leaves_a_signal_stops_exit_code(monkeypatch):
    """After a stop by signal torchrun's next signal may kill a peer while this rank waits at the last barrier:
    the stop's code stands (its checkpoint is written), where once the peer's loss turned it into a false line
    and exit 2. After a run that ended well, a peer lost there is still an error."""
    def barrier():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40000")
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "barrier", barrier)
    T.wait_for_ranks(128 + signal.SIGINT)
    T.wait_for_ranks(128 + signal.SIGTERM)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        T.wait_for_ranks(0)


def test_non_finite_loss_under_torchrun_stops_every_rank(tmp_path):
    """One poisoned sample reaches one rank only: both ranks must stop at that step with exit 3, not
    the other one carry on into a collective its peer never joins."""
    pairs = write_ids_dataset(tmp_path / "d", (4, 4, 4, 4))
    m = np.load(pairs[0][1])
    m[1] = 3.4e38
    np.save(pairs[0][1], m)
    p = start(TRAIN, "--train-list", write_split_list(tmp_path / "train.txt", pairs), "--val-every", 0, "--output-dir",
              tmp_path / "run", "--epochs", 1, "--loader", "iterable", *BASE, nproc=2)
    stdout, stderr = p.communicate(timeout=300)
    # torchrun may SIGTERM the second rank while it is already on its way out with 3
    assert p.returncode != 0 and "exitcode  : 3" in stderr and "exitcode  : 1 " not in stderr, stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", stderr) and "Connection closed" not in stderr, stderr[-3000:]
    found = re.findall(r"error: non-finite loss at epoch 0, batch (\d)/\d \(step (\d)\); no checkpoint was written", stderr)
    assert len(found) == 1 and found[0][1] == found[0][0], stderr[-3000:]  # printed once, by rank 0
    assert not (tmp_path / "run" / "last.pt").exists()


def toy_run(model, scaler, epoch=0, amp_dtype=None):
    """A Run around a tiny model: train_one_epoch then runs the script's own step, log step and checks."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return T.Run(model, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0), scaler,
                 torch.device("cpu"), amp_dtype=amp_dtype, epoch=epoch)


def test_ddp_epoch_with_slow_steps_checks_each_step_and_logs_only_its_log_steps_and_the_stop(monkeypatch, capsys):
    """train_one_epoch under (a one-rank stand-in for) DDP with steps of 10 s: the ranks agree on a signal at
    the end of the step it arrives in, not at the next log step, and the checks between log steps print nothing."""
    reduced = []
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(T.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(T.dist, "all_reduce", lambda t, op=None: reduced.append(t.numel()))  # one rank: as it is
    clock = iter(range(0, 10 ** 6, 10))
    monkeypatch.setattr(T.time, "perf_counter", lambda: float(next(clock)))  # every reading 10 s later
    stop, step = T.Stop(), T.train_step

    def step_then_signal(run, x, y):
        loss = step(run, x, y)
        if run.step == 2:
            stop.received = signal.SIGTERM
        return loss

    monkeypatch.setattr(T, "train_step", step_then_signal)
    run = toy_run(torch.nn.Linear(3, 3), torch.amp.GradScaler("cpu", enabled=False))
    capsys.readouterr()
    T.train_one_epoch(run, T.RepeatedBatch(torch.ones(4, 3), torch.zeros(4, 3), 20), T.Monitor(log_every=10), stop)
    assert run.step == 2 and stop.signum == signal.SIGTERM  # the check after the step it arrived in
    assert re.findall(r"^epoch 0 step (\d+) ", capsys.readouterr().out, flags=re.M) == ["2"]  # the stop's line only
    assert reduced == [2, 2, 1, 2, 2]  # checks at steps 1 and 2; at the stop the NaN check and the logged loss; the epoch's loss


def test_under_ddp_a_non_finite_loss_is_named_by_the_earliest_batch_of_any_rank(monkeypatch):
    """(A one-rank stand-in for) two ranks: this one's loss turns NaN at batch 3, the other's at batch 1 (a NaN
    in one rank's gradients reaches every rank's weights at the next step): the error names batch 1."""
    def all_reduce(t, op=None):
        if op == T.dist.ReduceOp.MIN:  # the other rank's first non-finite batch
            t.copy_(torch.minimum(t, torch.tensor(1)))
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(T.dist, "all_reduce", all_reduce)
    step = T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, x, y: step(run, x, y) * (math.nan if run.batch_in_epoch >= 3 else 1))
    run = toy_run(torch.nn.Linear(3, 3), torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(T.NonFiniteLoss, match=r"^non-finite loss at epoch 0, batch 2/5 \(step 2\)$"):
        T.train_one_epoch(run, T.RepeatedBatch(torch.ones(4, 3), torch.zeros(4, 3), 5), T.Monitor(log_every=5), T.Stop())


def test_out_of_memory_is_one_line_naming_the_flags_that_lower_it(data, tmp_path, monkeypatch, capsys):
    """A batch the device cannot hold: the allocator's refusal, raised for real inside a training step (4 PB, past any
    address space, from the CPU allocator), ends the run with one line and exit 2, in train.log too."""
    def greedy_forward(model, x, amp_dtype):
        return torch.empty(10**15, device=x.device)
    monkeypatch.setattr(T, "forward", greedy_forward)
    out = tmp_path / "run"
    assert T.cli(["--data-root", str(data), "--output-dir", str(out), "--epochs", "1", *BASE]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["train_inversionnet.py: error: CPU out of memory allocating 3725290.30 GiB; lower "
                                        "--batch-size (--val-batch-size for validation), or --loader map in place of "
                                        "the device cache"], err
    assert "error: CPU out of memory" in (out / "train.log").read_text()
    # CUDA's and MPS's wording, as torch 2.13 raises them (torch.OutOfMemoryError on CUDA), for eval too
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.11 GiB of which 3.20 GiB is free. Including non-PyTorch memory, this process has ...")
    mps = RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: "
                       "18.13 GB). Tried to allocate 512.00 MB on private pool. Use ...")
    assert T.report_input_error("eval_inversionnet.py", cuda) and T.report_input_error("eval_inversionnet.py", mps)
    assert capsys.readouterr().err.splitlines() == [
        "eval_inversionnet.py: error: CUDA out of memory allocating 20.00 GiB; lower --batch-size, or --loader map in "
        "place of the device cache",
        "eval_inversionnet.py: error: MPS out of memory allocating 512.00 MB; lower --batch-size, or --loader map in "
        "place of the device cache"]
    assert not T.report_input_error("train_inversionnet.py", RuntimeError("a bug"))  # other errors keep their traceback


SIGBUS_LINE = ("train_inversionnet.py: error: a DataLoader worker died of SIGBUS: a data file shrank while the run read "
               "it through a memory map (rewritten in place?), or the shared memory (/dev/shm) is full\n")


def worker_died_line(signal_name=""):
    return (f"train_inversionnet.py: error: a DataLoader worker died{signal_name}: after a bus error printed above, a "
            f"data file shrank under its memory map (rewritten in place?) or /dev/shm is full; with no such line, often "
            f"the out-of-memory killer (lower --num-workers or --batch-size)\n")


# run apart: until its loader is gone, torch's SIGCHLD handler would raise the dead worker's error again at
# any later child's exit, inside whatever this process then runs
BUS_ERROR_IN_A_WORKER = """
import os, signal, sys, torch
import train_inversionnet as T
class BusErrorAt(torch.utils.data.Dataset):  # what reading a truncated memory-mapped file does to a worker
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGBUS)
        return torch.zeros(2)
try:
    for _ in torch.utils.data.DataLoader(BusErrorAt(), batch_size=1, num_workers=1, multiprocessing_context="fork"):
        pass
except Exception as e:
    sys.exit(2 if T.report_input_error("train_inversionnet.py", e) else 1)
"""


def test_a_loader_worker_killed_by_sigbus_is_one_line_with_both_causes(capsys):
    """A data file truncated under a worker's memory map kills the worker with SIGBUS, which torch reports as a
    shared-memory shortage only, often wrapped in "exited unexpectedly"; the line names the other cause too."""
    r = subprocess.run([sys.executable, "-c", BUS_ERROR_IN_A_WORKER], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ours = [line for line in r.stderr.replace("\0", "").splitlines() if line.startswith("train_inversionnet.py:")]
    assert r.returncode == 2 and len(ours) == 1 and ours[0] + "\n" in (SIGBUS_LINE, worker_died_line()), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    died = RuntimeError("DataLoader worker (pid 303) is killed by signal: Bus error. It is possible that dataloader's "
                        "workers are out of shared memory. Please try to raise your shared memory limit.")
    assert T.report_input_error("train_inversionnet.py", died)  # torch's SIGCHLD handler, seen first
    assert capsys.readouterr().err == SIGBUS_LINE


def test_a_loader_worker_that_died_otherwise_is_one_line(capsys):
    killed = RuntimeError("DataLoader worker (pid 77) is killed by signal: Killed. ")
    lost = RuntimeError("DataLoader worker (pid(s) 77, 78) exited unexpectedly")
    lost.__cause__ = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    for e, signal_name in ((killed, " (signal: Killed)"), (lost, "")):
        assert T.report_input_error("train_inversionnet.py", e)
        assert capsys.readouterr().err == worker_died_line(signal_name)
    assert not T.report_input_error("train_inversionnet.py", ConnectionResetError(errno.ECONNRESET, "elsewhere"))


SHM_FULL_LINE = ("train_inversionnet.py: error: the DataLoader workers cannot hand batches over: the shared memory "
                 "/dev/shm is full ({} MB here); lower --num-workers or --batch-size, use --loader gpu (no workers), or "
                 "give /dev/shm more room (docker run --shm-size 8g)\n")

# a worker whose batch is larger than the /dev/shm it hands it over through (a container's is 64 MB by default)
BATCH_LARGER_THAN_SHM = """
import sys, torch
import train_inversionnet as T
class Big(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return torch.zeros(4 * 2**20)  # 16 MB
try:
    for _ in torch.utils.data.DataLoader(Big(), batch_size=2, num_workers=1):
        pass
except Exception as e:
    sys.exit(2 if T.report_input_error("train_inversionnet.py", e) else 1)
"""


def test_a_full_dev_shm_is_one_line_naming_its_size_and_the_flags(capsys):
    """Docker gives a container 64 MB of /dev/shm, through which loader workers hand over their batches (1.4 MB a
    sample): torch's error, raised in the worker, becomes one line; run for real where a private mount can shrink it."""
    caught = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\nRuntimeError: unable to allocate shared memory(shm) for file </torch_29632_3254_2>: "
                          "No space left on device (28)\n")
    assert T.report_input_error("train_inversionnet.py", caught)
    st = os.statvfs("/dev/shm")
    assert capsys.readouterr().err == SHM_FULL_LINE.format(f"{st.f_blocks * st.f_frsize / 2**20:.0f}")
    private = ("mount -t tmpfs -o size=16m tmpfs /dev/shm && exec " + shlex.quote(sys.executable) + " -c "
               + shlex.quote(BATCH_LARGER_THAN_SHM))
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (needs root and unshare): the real case is not run")
    r = subprocess.run(["unshare", "-m", "sh", "-c", private], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == SHM_FULL_LINE.format(16), r.stderr[-3000:]


def test_simulator_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    import simulate_openfwi as S
    def greedy_simulate(velocity, **kw):
        return torch.empty(10**15, device=velocity.device)
    monkeypatch.setattr(S, "simulate", greedy_simulate)
    assert S.cli(["--out", str(tmp_path / "d"), "--files", "1", "--samples-per-file", "2", "--val-files", "0",
                  "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "simulate_openfwi.py: error: out of memory simulating --batch-size 16 velocity models at once; lower --batch-size"]


def test_detect_anomaly_names_the_batch_whose_backward_made_nan():
    class SqrtOfZero(torch.nn.Module):  # d/dx sqrt(x) at 0 is inf; times the zero upstream gradient: NaN
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.sqrt(self.w * x * 0) * 0 + self.w * x

    batches = T.RepeatedBatch(torch.ones(2, 3), torch.zeros(2, 3), 3)
    run = toy_run(SqrtOfZero(), torch.amp.GradScaler("cpu", enabled=False), epoch=4)
    with torch.autograd.set_detect_anomaly(True), pytest.warns(UserWarning):
        with pytest.raises(T.NonFiniteLoss, match=r"autograd anomaly at epoch 4, batch 1 \(step 1\): .*Sqrt.*nan"):
            T.train_one_epoch(run, batches, T.Monitor(log_every=10), T.Stop())
    # without it the NaN gradient is applied and only the next loss shows it, at the next log step
    run = toy_run(SqrtOfZero(), torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(T.NonFiniteLoss, match=r"non-finite loss at epoch 0, batch 2/3 \(step 2\)"):
        T.train_one_epoch(run, batches, T.Monitor(log_every=10), T.Stop())


def test_detect_anomaly_flag_turns_on_anomaly_detection_for_the_run(data, tmp_path, monkeypatch):
    """--detect-anomaly on the command line reaches autograd: the run's steps run with anomaly detection on (what
    the test above sets by hand), and without the flag off."""
    enabled, step = [], T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, x, y: enabled.append(torch.is_anomaly_enabled()) or step(run, x, y))
    argv = ["--data-root", str(data), "--epochs", "1", "--max-steps", "1", "--val-every", "0", "--no-tensorboard", *BASE]
    try:
        assert T.cli([*argv, "--output-dir", str(tmp_path / "off")]) == 0
        with warnings.catch_warnings():  # torch warns that anomaly detection slows the run
            warnings.simplefilter("ignore")
            assert T.cli([*argv, "--output-dir", str(tmp_path / "on"), "--detect-anomaly"]) == 0
    finally:
        torch.autograd.set_detect_anomaly(False)  # the script turns it on for its whole process
    assert enabled == [False, True]


def test_fp16_grad_scaler_skipped_steps_are_logged_not_fatal(capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    w0 = model.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # fp16 gradients overflow at this scale
    run = toy_run(model, scaler, amp_dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, warnings shown afresh
        T.quiet_schedule_order_warning()  # as main() does
        T.train_one_epoch(run, T.RepeatedBatch(torch.ones(4, 3), torch.zeros(4, 3), 2), T.Monitor(log_every=1), T.Stop())
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]  # the skip is the log's to say
    out = capsys.readouterr().out
    assert "step 1: fp16 GradScaler skipped a step (overflow); scale now 6.33825e+29" in out
    assert torch.equal(model.weight.detach(), w0)  # both steps skipped: the weights are untouched
    assert run.step == 2 and scaler.get_scale() == 2.0 ** 98


def test_epoch_loss_is_a_mean_per_sample_and_step_lines_reach_train_log_under_a_progress_bar(tmp_path, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    model = torch.nn.Linear(3, 3)
    run = toy_run(model, torch.amp.GradScaler("cpu", enabled=False))
    monitor = T.Monitor(log_every=1, progress=True)
    monitor.start_epoch(run, 2)
    monitor.after_step(run, torch.tensor(1.0), 4)
    monitor.after_step(run, torch.tensor(4.0), 2)  # a short last batch weighs what its samples weigh
    assert monitor.end_epoch() == pytest.approx(2.0)  # (4 * 1 + 2 * 4) / 6, not the batches' mean 2.5
    T.set_log_file(str(tmp_path / "train.log"))
    try:
        with monkeypatch.context() as m:
            m.setattr(sys, "stderr", Terminal())  # where the bar is drawn
            T.train_one_epoch(run, T.RepeatedBatch(torch.ones(4, 3), torch.zeros(4, 3), 2), monitor, T.Stop())
        logged = (tmp_path / "train.log").read_text()
        assert re.findall(r"^epoch 0 step (\d) batch \d/2 loss", logged, flags=re.M) == ["1", "2"], logged
        assert "step 1 batch" not in capsys.readouterr().out  # on the console the bar shows them
        run.epoch, run.batch_in_epoch = 1, 0  # stderr a pipe or a log file: no bar, the lines themselves
        T.train_one_epoch(run, T.RepeatedBatch(torch.ones(4, 3), torch.zeros(4, 3), 2), monitor, T.Stop())
        assert re.findall(r"^epoch 1 step (\d) batch", capsys.readouterr().out, flags=re.M) == ["3", "4"]
    finally:
        T.set_log_file(None)


# ---- storage ----

def limit_file_size(mb):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (mb << 20, mb << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    return apply


def test_failing_checkpoint_write_is_one_line_and_keeps_previous_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 1, *BASE)
    assert r.returncode == 0, r.stderr
    last, best = digest(out / "last.pt"), digest(out / "best.pt")
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, "--resume", "auto", *BASE,
                   preexec_fn=limit_file_size(50))  # a checkpoint is ~290 MB
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(r"^train_inversionnet.py: error: cannot write checkpoint \S*(best|last).pt: File too large; the previous one is "
                     r"intact$", r.stderr.strip()), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert digest(out / "last.pt") == last and digest(out / "best.pt") == best
    assert load(out / "last.pt")["epoch"] == 1
    assert not list(out.glob("*.tmp-*"))


def test_a_write_cut_between_best_and_last_leaves_no_claim_on_a_best_pt_not_written(data, tmp_path, monkeypatch, capsys):
    """A kill or a full disk between the epoch's two checkpoint files: last.pt's best_loss must never be one
    that best.pt does not hold, or the resumed run would keep a worse best.pt for good."""
    out = tmp_path / "run"
    argv = ["--data-root", str(data), "--output-dir", str(out), *map(str, BASE)]
    assert T.cli([*argv, "--epochs", "1"]) == 0
    ck = load(out / "last.pt")
    ck["best_loss"] = float("inf")  # so that epoch 1's validation surely improves on it
    torch.save(ck, out / "last.pt")
    real, written = T.write_atomic, []

    def second_fails(path, data):
        if path.endswith(".pt") and written:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, data)
        written.extend([path] if path.endswith(".pt") else [])
    monkeypatch.setattr(T, "write_atomic", second_fails)
    assert T.cli([*argv, "--epochs", "2", "--resume", "auto"]) == 2
    assert [os.path.basename(p) for p in written] == ["best.pt"]
    assert load(out / "best.pt")["epoch"] == 2 and load(out / "last.pt")["epoch"] == 1  # last.pt retrains epoch 1
    assert load(out / "last.pt")["best_loss"] == float("inf")
    # resumed, the retrained epoch must beat best.pt's loss, not last.pt's older figure: the same loss again
    # (the same weights) does not, so best.pt is left as it is
    monkeypatch.undo()
    best = (out / "best.pt").read_bytes()
    assert T.cli([*argv, "--epochs", "2", "--resume", "auto"]) == 0
    assert (out / "best.pt").read_bytes() == best
    assert load(out / "last.pt")["best_loss"] == load(out / "best.pt")["best_loss"] < float("inf")


def save_now(obj, *paths):
    writer = T.CheckpointWriter()
    writer.save(obj, *map(str, paths))
    writer.wait()


def test_one_serialisation_writes_last_and_best_alike(tmp_path, monkeypatch):
    calls = []
    real_save = torch.save
    monkeypatch.setattr(T.torch, "save", lambda *a: calls.append(1) or real_save(*a))
    save_now({"w": torch.arange(5.0)}, tmp_path / "last.pt", tmp_path / "best.pt")
    assert len(calls) == 1 and digest(tmp_path / "last.pt") == digest(tmp_path / "best.pt")
    assert torch.equal(torch.load(tmp_path / "best.pt")["w"], torch.arange(5.0))


def test_checkpoint_writes_go_on_behind_training_and_report_their_errors(tmp_path, monkeypatch):
    """save() returns once the checkpoint is copied: later changes to the tensors do not reach the file,
    it is serialised and written on its own thread, and a failed write raises at the next save() or
    wait(), which then starts no write of its own."""
    gate, real_save = threading.Event(), torch.save
    monkeypatch.setattr(T.torch, "save", lambda obj, f: gate.wait(30) and real_save(obj, f))
    w, writer = torch.zeros(4), T.CheckpointWriter()
    writer.save({"w": w}, str(tmp_path / "last.pt"))
    w += 1  # the next training step, before the thread has serialised anything
    assert not (tmp_path / "last.pt").exists()
    gate.set()
    writer.wait()
    assert torch.equal(load(tmp_path / "last.pt")["w"], torch.zeros(4))
    writer.save({"w": w}, str(tmp_path / "no-such-dir" / "last.pt"))  # fails on the thread, reported later
    with pytest.raises(T.InputError, match=r"cannot write checkpoint \S*no-such-dir/last.pt: No such file or directory$"):
        writer.save({"w": w}, str(tmp_path / "last.pt"))
    writer.wait()  # raised once
    assert torch.equal(load(tmp_path / "last.pt")["w"], torch.zeros(4))  # the save that raised wrote nothing


Pair = collections.namedtuple("Pair", "a b")


def test_the_written_snapshot_keeps_the_checkpoint_structure(tmp_path):
    """save() copies the tensors before the thread serialises them (cpu_copy); dict types and a
    state_dict's _metadata (module versions, which load_state_dict reads) survive the copy."""
    sd = T.InversionNet().state_dict()
    copied = T.cpu_copy({"rng": (1, [torch.ones(2)], Pair(torch.zeros(1), "x"))})["rng"]
    assert copied[0] == 1 and torch.equal(copied[1][0], torch.ones(2))
    assert type(copied[2]) is Pair and copied[2].b == "x" and torch.equal(copied[2].a, torch.zeros(1))
    save_now({"model": sd}, tmp_path / "last.pt")
    saved = load(tmp_path / "last.pt")["model"]
    assert type(saved) is type(sd) and saved._metadata == sd._metadata
    assert saved.keys() == sd.keys() and all(torch.equal(saved[k], v) for k, v in sd.items())


def test_a_failed_write_found_on_the_way_out_is_one_more_line_not_a_replacement(tmp_path, capsys):
    """close(), which fit() calls whatever ends the loop, reports a failed background write as a line of its
    own instead of raising over the error that is ending the run."""
    writer = T.CheckpointWriter()
    writer.save({"w": torch.zeros(2)}, str(tmp_path / "missing" / "last.pt"))
    writer.close()
    assert capsys.readouterr().err.strip() == (f"train_inversionnet.py: error: cannot write checkpoint "
                                                f"{tmp_path / 'missing' / 'last.pt'}: No such file or directory")
    writer.close()  # reported once


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() reaches torch's deprecated aliases
def test_the_copy_is_freed_once_serialised(tmp_path, monkeypatch):
    """While the file is written only the serialised bytes are held, not the CPU copy beside them."""
    alive, real_write, n = [], T.write_atomic, 123457
    def write(path, data):
        gc.collect()
        alive.append(sum(isinstance(o, torch.Tensor) and o.numel() == n for o in gc.get_objects()))
        real_write(path, data)
    monkeypatch.setattr(T, "write_atomic", write)
    w = torch.zeros(n)
    save_now({"w": w}, tmp_path / "last.pt")
    assert alive == [1]  # w itself


def test_a_checkpoint_that_cannot_be_serialised_is_one_line(tmp_path, monkeypatch, capsys):
    def no_memory(obj, f):
        raise MemoryError("cannot allocate 293 MB")
    monkeypatch.setattr(T.torch, "save", no_memory)
    writer = T.CheckpointWriter()
    writer.save({"w": torch.zeros(2)}, str(tmp_path / "best.pt"), str(tmp_path / "last.pt"))
    writer.close()
    assert capsys.readouterr().err.strip() == (f"train_inversionnet.py: error: cannot serialise checkpoint "
                                                f"{tmp_path / 'best.pt'} and {tmp_path / 'last.pt'}: MemoryError: "
                                                f"cannot allocate 293 MB")
    assert not list(tmp_path.iterdir())


def test_interrupt_inside_a_checkpoint_write_is_an_interrupt_not_a_storage_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_now({"w": torch.zeros(10)}, path)
    before = digest(path)
    real_open = open

    class CtrlCDuringWrite:
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(T, "open", lambda p, mode: CtrlCDuringWrite(real_open(p, mode)), raising=False)
    with pytest.raises(KeyboardInterrupt):  # not "cannot write checkpoint": the cli turns it into exit 130
        save_now({"w": torch.ones(10)}, path)
    assert digest(path) == before and not list(tmp_path.glob("*.tmp-*"))


def test_a_lock_file_removed_as_its_holder_let_go_is_not_the_one_held(tmp_path, monkeypatch):
    """An evaluation removes its .lock as it lets go: a process that opened the old file just before and locks
    it just after must lock the file at the path now, or two jobs would each hold a lock."""
    real_flock, calls = fcntl.flock, []

    def holder_lets_go_meanwhile(fh, op):
        calls.append(os.fstat(fh.fileno()).st_ino)
        if len(calls) == 1:
            os.remove(tmp_path / ".lock")
        real_flock(fh, op)
    monkeypatch.setattr(T.fcntl, "flock", holder_lets_go_meanwhile)
    try:
        T.lock_run(str(tmp_path))
        monkeypatch.undo()
        assert len(calls) == 2 and calls[1] == os.stat(tmp_path / ".lock").st_ino
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: the file at the path is the locked one
    finally:
        T.unlock_run(remove=True)
    assert not (tmp_path / ".lock").exists()


def test_a_lock_file_replaced_by_hand_is_not_removed_by_the_holder_it_no_longer_is(tmp_path):
    """The refusal names .lock; one removed by hand while held, then made and held by a second job, stays
    when the first one lets go, or a third job could lock a fresh file and run beside the second."""
    T.lock_run(str(tmp_path))
    try:
        os.remove(tmp_path / ".lock")
        with open(tmp_path / ".lock", "a+") as second:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            T.unlock_run(remove=True)
            assert os.path.samestat(os.stat(tmp_path / ".lock"), os.fstat(second.fileno()))
    finally:
        T.unlock_run(remove=True)


def test_a_lock_file_that_never_stays_put_runs_unguarded_rather_than_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(T.os.path, "samestat", lambda a, b: False)  # e.g. a file system whose inode numbers shift
    T.lock_run(str(tmp_path))
    assert T._RUN_LOCK is None


def test_a_run_that_ended_while_this_one_read_its_data_is_refused_not_replaced(data, tmp_path, monkeypatch, capsys):
    """The output directory is checked before the data is read, and again once locked: a short run that began
    and ended in another process meanwhile keeps its checkpoints."""
    out, real_load = tmp_path / "run", T.load_splits

    def another_run_meanwhile(*a):
        loaded = real_load(*a)
        out.mkdir()
        for name in ("args.json", "last.pt"):
            (out / name).write_text("theirs")
        return loaded
    monkeypatch.setattr(T, "load_splits", another_run_meanwhile)
    assert T.cli(["--data-root", str(data), "--output-dir", str(out), "--epochs", "1", *BASE]) == 2
    assert f"--output-dir {out} already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").read_text() == "theirs" and not (out / "train.log").exists()


def test_unwritable_output_dir_fails_before_training(data, tmp_path):
    out = tmp_path / "run"
    r = run_script(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 1, *BASE, preexec_fn=limit_file_size(0))
    assert r.returncode == 2 and r.stderr.strip() == f"train_inversionnet.py: error: --output-dir {out} is not writable: File too large"
    assert "epoch" not in r.stdout and os.listdir(out) == []


def test_a_second_training_in_a_directory_in_use_is_refused(data, tmp_path, capsys):
    """While one training holds OUTPUT_DIR/.lock, another started there is refused before it writes or removes
    anything (a live run's checkpoint write in flight included); the lock goes with the process that held it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt.tmp-4242", "args.json.tmp-4242"):
        (out / name).write_bytes(b"a write under way")
    argv = ["--data-root", str(data), "--output-dir", str(out), "--epochs", "1", "--resume", "auto", *BASE]
    with open(out / ".lock", "a+") as held:  # flock locks open files, so this process's own cli() competes too
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("eval_inversionnet.py PID 4242 on elsewhere\n")  # the holder, as the lock names it
        held.flush()
        assert T.cli(argv) == 2
        assert one_line_error(capsys.readouterr().err) == (
            f"train_inversionnet.py: error: --output-dir {out} is in use by another process (eval_inversionnet.py PID 4242 on elsewhere, "
            f"which holds {out / '.lock'}); wait for it to end, or choose another --output-dir\n")
        assert sorted(os.listdir(out)) == [".lock", "args.json.tmp-4242", "last.pt.tmp-4242"]
    assert T.cli(argv) == 0  # the holder gone, the run starts (and clears what a killed write left)
    assert "removed args.json.tmp-4242 (the partial write of a run killed while saving)\n" in capsys.readouterr().out
    assert (out / ".lock").read_text() == f"{os.path.basename(sys.argv[0])} PID {os.getpid()} on {platform.node()}\n"
    assert not list(out.glob("*.tmp-*")) and (out / "last.pt").is_file()
    (out / "last.pt.tmp-4242").write_bytes(b"a write under way")
    assert T.cli(argv) == 0  # released when cli() returned
    printed = capsys.readouterr().out
    assert "removed last.pt.tmp-4242 (the partial write of a run killed while saving; last.pt itself is intact)" in printed
    assert "the run is complete" in printed


def test_training_outlives_a_console_reader_that_goes_away(data, tmp_path):
    """`train_inversionnet.py ... | head -1`: the pipe's reader leaves at the first line, and the run trains on to
    its end, every line in train.log, no traceback."""
    out = tmp_path / "run"
    p = start(TRAIN, "--data-root", data, "--output-dir", out, "--epochs", 2, *BASE)
    p.stdout.readline()
    p.stdout.close()  # the epochs' lines, seconds later, meet a closed pipe
    err = p.stderr.read()
    assert p.wait(timeout=600) == 0 and "Error" not in err, err
    assert load(out / "last.pt")["epoch"] == 2
    assert re.search(r"^epoch 1 .*\| .* s checkpoint$", (out / "train.log").read_text(), re.M)


# ---- bad input ----

def corrupt(root, case):
    d, m = root / "data" / "data1.npy", root / "model" / "model1.npy"
    if case == "truncated":
        d.write_bytes(d.read_bytes()[:5000])
        return "data1.npy", "truncated"
    if case == "wrong_dtype":
        np.save(d, np.load(d).astype(np.float64))
        return "data1.npy", "dtype <f8 (float64), expected float32 in this machine's byte order (<f4; "
    if case == "big_endian":  # float32 still, which the message must not seem to deny
        np.save(d, np.load(d).astype(">f4"))
        return "data1.npy", "dtype >f4 (float32 in the other byte order), expected float32 in this machine's byte order"
    if case == "wrong_shape":
        np.save(d, np.load(d)[:, :, :500])
        return "data1.npy", "expected (N, 5, 1000, 70)"
    if case == "unpaired":
        os.remove(m)
        return "data1.npy", "no matching model"
    if case == "count_mismatch":
        np.save(m, np.load(m)[:3])
        return "data1.npy", "but"
    if case == "npz":  # an archive saved under the .npy name: np.load hands back a zip reader
        np.savez(d.with_suffix(".npz"), np.load(d))
        d.with_suffix(".npz").replace(d)
        return "data1.npy", "an .npz archive, not a .npy array"
    if case == "nan_label":
        y = np.load(m)
        y[2, 0, 5, 5] = np.inf
        np.save(m, y)
        return "model1.npy sample 2", "NaN or Inf in the label"
    if case == "km_per_s":  # a unit that would train a model on maps its tanh output can never reach
        np.save(m, np.load(m) / 1000)
        return "model1.npy: velocities around 3.0", ("(the file's median), far outside the normalisation's 1500 to "
                                                     "4500 m/s (--dataset flatvel-a): labels are velocities in m/s, "
                                                     "not km/s or normalised")
    if case == "km_per_s_later":  # every file is checked: with a third pair, model2 is the training split's second
        shutil.copy(d, d.with_name("data3.npy")), shutil.copy(m, m.with_name("model3.npy"))
        np.save(m.with_name("model2.npy"), np.load(m.with_name("model2.npy")) / 1000)
        return "model2.npy: velocities around 3.0", "(the file's median), far outside the normalisation's"
    if case == "two_arrays":  # np.save twice into one open file: np.load would read the first array alone
        x = np.load(d)
        with open(d, "wb") as fh:
            np.save(fh, x[:2]), np.save(fh, x[2:])
        return "data1.npy", "bytes after its array of 2 samples (two arrays saved into one file?)"
    if case == "negative_shape":  # a hand-made header numpy's memory map overflows on
        write_negative_shape_npy(d)
        return "data1.npy", "unreadable or truncated .npy"
    if case == "mixed_naming":  # OpenFWI's two namings in one folder: seis1 would silently replace data1
        shutil.copy(d, d.with_name("seis1.npy"))
        return "data1.npy and seis1.npy", "two files of pair '1' in one folder; keep one naming (data or seis)"
    if case == "normalised_labels":
        np.save(m, (np.load(m) - 1500) / 1500 - 1)
        return "model1.npy", "(the file's median), far outside the normalisation's"
    if case in ("nan_gpu", "nan_map", "nan_iterable"):
        x = np.load(d)
        x[:, 1, 10, 10] = np.nan
        np.save(d, x)
        return "data1.npy sample 0" if case == "nan_gpu" else "data1.npy sample", "NaN"
    raise AssertionError(case)


def one_line_error(err):
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", ["truncated", "wrong_dtype", "big_endian", "wrong_shape", "unpaired", "count_mismatch", "npz", "nan_label",
                                  "nan_gpu", "nan_map", "nan_iterable", "km_per_s", "km_per_s_later", "two_arrays",
                                  "negative_shape", "mixed_naming", "normalised_labels"])
def test_bad_data_one_line_exit_2(tmp_path, capsys, case):
    root = tmp_path / "d"
    write_ids_dataset(root, (4, 4))
    name, needle = corrupt(root, case)
    extra = {"nan_gpu": ["--loader", "gpu"], "nan_map": ["--num-workers", "1"],
             "nan_iterable": ["--loader", "iterable", "--num-workers", "1"]}.get(case, [])
    argv = ["--data-root", root, "--output-dir", tmp_path / "o", "--epochs", 1, "--train-size", 0.5, "--seed", 1, *BASE, *extra]
    if case == "nan_iterable":  # the whole process path: an error raised in a loader worker of a real run
        r = run_script(TRAIN, *argv)
        code, err = r.returncode, r.stderr
    else:
        code, err = T.cli([str(a) for a in argv]), capsys.readouterr().err
    assert code == 2 and name in one_line_error(err) and needle in err, err
    if case.startswith("nan"):  # met as a batch is read, in a run that has its log by then: the log says why it ended
        line = err.strip().removeprefix("train_inversionnet.py: ")
        assert (tmp_path / "o" / "train.log").read_text().splitlines()[-1] == line
    else:  # met while the files are inspected, before the run directory is made
        assert not (tmp_path / "o").exists()


def make(tmp_path, token):
    """The file or directory a bad-argument case names, made only for the case that needs it."""
    path = tmp_path / token.lower()
    if token == "EMPTY":
        path.mkdir()
    elif token == "GARBAGE":
        path.write_bytes(b"not a checkpoint")
    elif token == "AFILE":
        path.write_text("x")
    elif token == "FIFOROOT":  # a named pipe where a data file should be: reading it would block for ever
        write_ids_dataset(path, (4, 4, 4))
        os.remove(path / "data" / "data2.npy")
        os.mkfifo(path / "data" / "data2.npy")
    elif token == "ONEFILE":
        write_ids_dataset(path, (4,))
    elif token == "INFSTATS":
        path.write_text('{"data_min": -1, "data_max": Infinity}')
    elif token == "BOOLSTATS":  # float() would read true as 1.0
        path.write_text('{"data_min": -1, "data_max": true}')
    elif token == "HUGESTATS":  # an integer no float holds
        path.write_text('{"data_min": 1%s, "data_max": 52.77}' % ("0" * 400))
    elif token == "TINYSTATS":  # finite, but 2 / span overflows float32: every normalised value would be inf
        path.write_text('{"data_min": 0, "data_max": 1e-300}')
    elif token == "EQSTATS":  # normalising would divide by zero
        path.write_text('{"data_min": 3, "data_max": 3}')
    elif token == "LISTSTATS":  # valid JSON, not an object
        path.write_text('[-26.95, 52.77]')
    elif token == "DEEPSTATS":  # nested beyond the JSON parser's recursion limit
        path.write_text("[" * 100000 + "]" * 100000)
    elif token == "NOMAXSTATS":
        path.write_text('{"data_min": -26.95}')
    else:
        return token
    return str(path)


@pytest.mark.parametrize("args, needle", [
    (["--profile", "tpu"], "--profile must be auto, cpu or gpu, got tpu"),
    (["--family", "flatvell"], "--family must be flatvel, curvevel, flatfault or curvefault, got flatvell"),
    (["--famly", "flatvel"], "unknown option --famly"),
    (["--run"], "--run needs a value"),
    (["--eval-args", "--export m.pt2"], "--eval-args evaluates the run; --export and --predict are jobs of"),
    (["--data", ""], "--data needs a directory, got an empty value"),
    (["--run", "--data", "d"], "--run needs a directory, got the option --data (write ./--data for a folder of that name)"),
    (["--profile=tpu"], "--profile must be auto, cpu or gpu, got tpu"),  # the --opt=value form
    (["--profile=tp=u"], "--profile must be auto, cpu or gpu, got tp=u"),  # split at the first '=' only
    # the paths one stage hands to the next: elsewhere, the next stage would read (and eval's --overwrite replace) other files
    (["--train-args", "--epochs 2 --output-dir=runs/x"], "--train-args: --output-dir is run.sh's to set (from its --run)"),
    (["--train-args", "--epochs 2\t--output-dir\nruns/x"], "--train-args: --output-dir is run.sh's to set"),  # split there too
    (["--train-args=--resume last.pt"], "--train-args: --resume is run.sh's to set (from its --run, whose run it continues)"),
    (["--eval-args", "--noise-std 0.2 --checkpoint a.pt"], "--eval-args: --checkpoint is run.sh's to set (from its --run)"),
    (["--sim-args", "--family curvevel"], "--sim-args: --family is run.sh's to set (from its --family)"),
    (["--sim-args", "--out=elsewhere"], "--sim-args: --out is run.sh's to set (from its --data)"),
    (["--train-args", "--train-list a.txt"], "--train-args: --train-list is run.sh's to set (from its --data)"),
    (["--train-args", "--val-list a.txt"], "--train-args: --val-list is run.sh's to set (from its --data)"),
    (["--train-args", "--data-root d"], "--train-args: --data-root is run.sh's to set (from its --data)"),
    (["--eval-args", "--output-dir o"], "--eval-args: --output-dir is run.sh's to set (from its --run)"),
    (["--eval-args", "--predict shots.npy"], "--eval-args evaluates the run; --export and --predict are jobs of"),
    (["--eval-args", "--vis 0\t--export m.pt2"], "--eval-args evaluates the run; --export and --predict are jobs of"),
    # a stage's help would end that stage with exit 0 and start the next
    (["--sim-args", "--files 2 --help"], "--sim-args cannot hold --help: run python simulate_openfwi.py --help"),
    (["--train-args=-h"], "--train-args cannot hold --help: run python train_inversionnet.py --help"),
    (["--eval-args", "--help"], "--eval-args cannot hold --help: run python eval_inversionnet.py --help"),
])
def test_run_sh_bad_options_one_line_exit_2_before_installing_anything(args, needle):
    # an interpreter that fails at once: an option let through would end here (exit 1), installing and running nothing
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *args], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON="false"))
    assert r.returncode == 2 and r.stdout == "" and needle in one_line_error(r.stderr)


def test_a_run_file_name_taken_by_a_directory_is_one_line(data, tmp_path, capsys):
    (tmp_path / "o" / "provenance.json").mkdir(parents=True)  # renaming onto it would fail only after the write
    assert T.cli(["--data-root", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "1", *BASE]) == 2
    assert one_line_error(capsys.readouterr().err) == (f"train_inversionnet.py: error: {tmp_path / 'o' / 'provenance.json'}: "
                                                       "exists and is not a regular file\n")
    assert not (tmp_path / "o" / "args.json").exists()  # so the same command, once the path is free, starts the run
    (tmp_path / "o" / "provenance.json").rmdir()
    (tmp_path / "o" / "last.pt").mkdir()  # refused before training: the first checkpoint would fail only after an epoch
    assert T.cli(["--data-root", str(data), "--output-dir", str(tmp_path / "o"), "--resume", "auto", *BASE]) == 2
    assert one_line_error(capsys.readouterr().err) == (f"train_inversionnet.py: error: {tmp_path / 'o' / 'last.pt'}: "
                                                       "exists and is not a regular file\n")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_run_sh_simulation_says_how_to_go_on(tmp_path, sig):
    cmd = ["bash", os.path.join(ROOT, "run.sh"), "--profile", "cpu", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"),
           "--sim-args", "--files 40 --samples-per-file 4 --val-files 1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable))
    assert wait_until(lambda: (tmp_path / "d" / "data" / "data2.npy").exists(), 180)
    os.killpg(p.pid, sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and "failed" not in stderr, stderr
    assert stderr.splitlines()[-2:] == [f"simulate_openfwi.py: {'interrupted' if sig == signal.SIGINT else 'terminated'}; "
                                        "complete files are kept, re-run to resume",
                                        "run.sh: simulation stopped by a signal; the same bash run.sh command goes on"]


def test_run_sh_passes_a_stage_input_error_through_as_its_one_line_and_exit_code(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "--data", tmp_path / "d", "--run", tmp_path / "r",
                        "--sim-args", "--files 0"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHON=sys.executable))
    # the stage's one line and nothing of run.sh's own (pip may add warnings of its own before it)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == "simulate_openfwi.py: error: --files must be positive, got 0"
    assert "run.sh" not in r.stderr
    # the simulation stage passes at once: the training stage's error is the one passed on
    fake = stand_in_python(tmp_path, 'if [[ "$1" == simulate_openfwi.py ]]; then exit 0; fi')
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "--data", tmp_path / "d", "--run", tmp_path / "r",
                        "--train-args", "--batch-size 1"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHON=str(fake)))
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == ("train_inversionnet.py: error: --batch-size must be at least "
                                                               "2: BatchNorm cannot train on one sample")
    assert "run.sh" not in r.stderr


def run_sh_stages(tmp_path, *args, cwd=None):
    """run.sh ARGS, started in CWD, with a stand-in interpreter that records each stage's command line instead
    of running it: (run.sh's stdout, [simulate, train, evaluate] command lines)."""
    log = tmp_path / "stages.log"
    fake = stand_in_python(tmp_path, f'case "$1" in *_openfwi.py|*_inversionnet.py) echo "$*" >> {log}; exit 0 ;; esac')
    done = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHON=str(fake)), cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout, log.read_text().splitlines()


@pytest.mark.parametrize("profile", ["cpu", "gpu", "auto"])
def test_run_sh_gives_each_stage_its_profiles_flags_then_the_users(tmp_path, profile):
    """The stages' command lines as run.sh builds them: the profile asked for, or with auto the one this
    machine's torch sees CUDA for, and the user's --*-args after its flags."""
    d, r = tmp_path / "d", tmp_path / "r"
    stdout, (sim, train, ev) = run_sh_stages(tmp_path, "--profile", profile, "--data", d, "--run", r, "--sim-args", "--seed 5",
                                             "--train-args", "--seed 6", "--eval-args", "--seed 7")
    chosen = ("gpu" if torch.cuda.is_available() else "cpu") if profile == "auto" else profile
    assert f"== 1/3 simulate (flatvel, profile {chosen}) -> {d}\n" in stdout
    files = "--files 150 --samples-per-file 100 --val-files 30" if chosen == "gpu" else "--files 8 --samples-per-file 100 --val-files 1"
    assert sim == f"simulate_openfwi.py --family flatvel --out {d} {files} --seed 5"
    recipe = "--epochs 170 --batch-size 256 --lr 1e-3" if chosen == "gpu" else "--epochs 13 --batch-size 16 --lr 5e-4"
    assert train.startswith(f"train_inversionnet.py --train-list {d}/train.txt --val-list {d}/val.txt --output-dir {r} "
                            f"--fast {recipe} ") and train.endswith(" --resume auto --seed 6")
    assert ev == f"eval_inversionnet.py --checkpoint {r}/best.pt --vis 3 --overwrite --seed 7"


def test_run_sh_keeps_each_family_in_folders_of_its_own(tmp_path):
    """Without --data and --run: data/FAMILY and runs/FAMILY-PROFILE (in the repository, where run.sh works)."""
    stdout, (sim, train, ev) = run_sh_stages(tmp_path, "--profile", "cpu", "--family", "curvevel")
    assert sim.startswith("simulate_openfwi.py --family curvevel --out data/curvevel --files 8 ")
    assert train.startswith("train_inversionnet.py --train-list data/curvevel/train.txt --val-list data/curvevel/val.txt "
                            "--output-dir runs/curvevel-cpu ")
    assert ev.startswith("eval_inversionnet.py --checkpoint runs/curvevel-cpu/best.pt ")
    nproc = torch.cuda.device_count() or 2  # where the line's --device auto trains, whatever the profile
    assert (f"(next: torchrun --nproc_per_node={nproc} train_inversionnet.py --data-root data/curvevel --output-dir "
            "runs/curvevel-torchrun --resume auto)") in stdout


def test_run_sh_takes_relative_paths_from_where_it_starts_and_passes_args_unexpanded(tmp_path):
    """Started outside the repository, `--data d` is the caller's d; a * in --*-args reaches the stage as
    typed (the repository has */*.md to expand it to); the summary's lines paste as printed."""
    (tmp_path / "my data").mkdir()
    stdout, (sim, train, ev) = run_sh_stages(tmp_path, "--profile", "cpu", "--data", "my data/d", "--run", "r",
                                             "--eval-args", "--stats */*.md", cwd=tmp_path)
    d, r = tmp_path / "my data" / "d", tmp_path / "r"
    assert sim.startswith(f"simulate_openfwi.py --family flatvel --out {d} ")
    assert f"--output-dir {r} " in train and ev.endswith("--overwrite --stats */*.md")
    quoted = str(d).replace(" ", "\\ ")
    nproc = torch.cuda.device_count() or 2  # where the line's --device auto trains, whatever the profile
    assert (f"data          {quoted} (next: cd {ROOT} && torchrun --nproc_per_node={nproc} train_inversionnet.py --data-root "
            f"{quoted} " in stdout)
    assert f"TensorBoard   tensorboard --logdir {r}/tb" in stdout


@pytest.mark.parametrize("how", ["relative PYTHON", "from a symlinked folder"])
def test_run_sh_finds_its_stages_and_the_callers_python(tmp_path, how):
    """A relative PYTHON is the caller's (`PYTHON=./python bash /repo/run.sh`), and `bash ../run.sh` inside a
    symlink to one of the repository's folders works in the repository itself, not the link's parent: each
    stage's script is there to run."""
    log = tmp_path / "stages.log"
    fake = stand_in_python(tmp_path, f'case "$1" in *_openfwi.py|*_inversionnet.py) [[ -f "$1" ]] || exit 9; '
                                     f'echo "$1" >> {log}; exit 0 ;; esac')
    if how == "relative PYTHON":
        script, cwd, python = os.path.join(ROOT, "run.sh"), tmp_path, "./python"
    else:
        (tmp_path / "link").symlink_to(os.path.join(ROOT, "tests"))
        script, cwd, python = "../run.sh", tmp_path / "link", str(fake)
    done = subprocess.run(["bash", script, "--profile", "cpu", "--data", tmp_path / "d", "--run", tmp_path / "r"],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, PYTHON=python, PWD=str(cwd)))  # PWD: the path a shell that cd'ed there keeps
    assert done.returncode == 0, done.stderr
    assert log.read_text().split() == ["simulate_openfwi.py", "train_inversionnet.py", "eval_inversionnet.py"]


@pytest.mark.parametrize("importable", [True, False])
def test_run_sh_goes_on_offline_when_what_the_job_imports_is_there(tmp_path, importable):
    """pip fails (an offline node lacking, say, torch-tb-profiler): run.sh says so and goes on when the
    pipeline's modules import, and stops with one line when they do not."""
    fake = stand_in_python(tmp_path, 'if [[ "$1 $2" == "-m pip" ]]; then echo "ERROR: No matching distribution found" >&2; exit 1; fi',
                           f'if [[ "$1" == -c && "$2" == "import numpy"* && -z "{"x" if importable else ""}" ]]; then exit 1; fi')
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "--data", tmp_path / "d", "--run", tmp_path / "r",
                        "--sim-args", "--files 0"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHON=str(fake)))
    lines = r.stderr.splitlines()
    if importable:
        assert r.returncode == 2 and lines[-2:] == [
            "run.sh: note: pip could not install all of requirements.txt (offline?); numpy, tqdm, matplotlib, tensorboard "
            "import, so the job goes on", "simulate_openfwi.py: error: --files must be positive, got 0"]
    else:
        assert r.returncode == 1 and lines[-1] == ("run.sh: error: pip could not install requirements.txt (above) and "
                                                   "numpy, tqdm, matplotlib, tensorboard do not all import")


def test_run_sh_asks_for_the_cpu_build_of_torch_without_an_nvidia_driver(tmp_path):
    """Where torch is missing: on an x86-64 Linux machine without an NVIDIA driver the CPU build by name,
    which PyPI (whose build is CUDA's) cannot serve; a failed install is one line, exit 1."""
    log = tmp_path / "pip.log"
    fake = stand_in_python(tmp_path, f'if [[ "$1 $2" == "-m pip" ]]; then echo "$@" >> {log}; exit 1; fi',
                           'if [[ "$1" == -c && "$2" == *"import sys, torch"* ]]; then exit 1; fi')  # no torch here
    r = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "test"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON=str(fake)))
    driver = os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi")
    spec = "torch==2.13.0" if driver or (platform.system(), platform.machine()) != ("Linux", "x86_64") else "torch==2.13.0+cpu"
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (f"run.sh: error: pip could not install {spec} (above); "
                                                               f"install torch 2.3 or later and run again")
    assert log.read_text().split()[-1] == spec and ("whl/cpu" in log.read_text()) == (not driver)


def test_run_sh_ctrl_c_during_the_install_stops_it(tmp_path):
    """pip ends a Ctrl-C with exit 1, as it ends a failed download: run.sh stops (130, one line) rather than
    reading it as an offline machine and going on."""
    began = tmp_path / "began"
    fake = stand_in_python(tmp_path, f'if [[ "$1 $2" == "-m pip" ]]; then touch {began}; sleep 30; exit 1; fi')
    p = subprocess.Popen(["bash", os.path.join(ROOT, "run.sh"), "--data", str(tmp_path / "d")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHON=str(fake)), start_new_session=True)
    assert wait_until(began.exists, 60)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and stderr.splitlines()[-1] == "run.sh: interrupted during the install", stderr
    assert "== 1/3" not in stdout


@pytest.mark.parametrize("args, needle", [
    (["--data-root", "/nonexistent/fwi"], "no such directory"),
    (["--data-root", "EMPTY"], "expected subdirectories"),
    (["--resume", "/nonexistent.pt"], "--resume /nonexistent.pt: no such file"),
    (["--init-from", "/dev/null"], "--init-from /dev/null: not a regular file"),  # there, but no file to load
    (["--init-from", "GARBAGE"], "not a readable checkpoint"),
    (["--output-dir", "AFILE"], "not a directory"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--lr", "1e38"], "--lr must be in (0, 10], got 1e+38"),
    (["--val-batch-size", "0"], "--val-batch-size must be positive, got 0"),
    (["--lr-scheduler", "step", "--lr-step-size", "0"], "--lr-step-size must be positive, got 0.0"),
    (["--lr-scheduler", "cosine", "--lr-milestones", "5"], "--lr-milestones apply to --lr-scheduler warmup-multistep, not cosine"),
    (["--lr-scheduler", "step", "--lr-warmup-epochs", "1"], "--lr-warmup-epochs applies to --lr-scheduler warmup-multistep and cosine"),
    (["--init-strict", "no"], "--init-strict no applies to the weights of --init-from, and none is given"),
    (["--betas", "1.5", "0.9"], "--betas must both be in [0, 1), got 1.5 0.9"),
    (["--weight-decay", "nan"], "--weight-decay must be >= 0, got nan"),
    (["--lambda-l2", "inf"], "--lambda-l2 must be >= 0, got inf"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", "99999999999"], "--seed must be at most 2147483647, got 99999999999"),
    (["--lr-gamma", "1e200"], "--lr-gamma must be in (0, 1] (the factor of each decay), got 1e+200"),
    (["--stats", "INFSTATS"], "the constants must be finite numbers, got -1.0, inf, 1500.0, 4500.0"),
    (["--stats", "BOOLSTATS"], "the constants must be numbers (true, false and text are not numbers)"),
    (["--config", ""], "argument --config: an empty path"),
    (["--num-workers", "100000"], "--num-workers 100000 is more than 4 per CPU of this machine"),  # an unset shell variable must not mean "not given"
    (["--resume", "auto", "--overwrite"], "--overwrite replaces the run in --output-dir and --resume auto continues it"),
    (["--train-size", "1.0"], "--train-size must be in (0, 1), got 1.0"),
    (["--train-size", "0"], "--train-size must be in (0, 1), got 0.0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),  # an average that never moves
    (["--betas", "1", "0.9"], "--betas must both be in [0, 1), got 1.0 0.9"),
    (["--lambda-l1", "0", "--lambda-l2", "0"], "--lambda-l1 and --lambda-l2 must not both be 0"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--precise-bn", "-1"], "--precise-bn must be >= 0, got -1"),
    (["--stats", "EQSTATS"], "min must be below max"),
    (["--stats", "HUGESTATS"], "hugestats: the constants must be numbers (int too large to convert to float)"),
    (["--stats", "TINYSTATS"], "tinystats: a range too narrow or too wide to normalise in float32 (data 0 to 1e-300, "
                               "velocity 1500 to 4500)"),
    (["--stats", "LISTSTATS"], "liststats: not a usable stats file (expected a JSON object with data_min and data_max"),
    (["--stats", "DEEPSTATS"], "deepstats: not a usable stats file (maximum recursion depth exceeded"),
    (["--val-batch-size", "100000000000000000000"], "--val-batch-size must be at most 2147483647, got 100000000000000000000"),
    (["--stats", "NOMAXSTATS"], "nomaxstats: not a usable stats file (expected a JSON object with data_min and data_max"),
    (["--batch-size", "16"], "the training split has 10 samples, fewer than one global batch (16 x 1)"),
    (["--data-root", "FIFOROOT"], "fiforoot/data/data2.npy: not a regular file"),
    (["--data-root", "ONEFILE"], "the validation split is empty: the split is by file and --data-root holds one"),
    (["--data-root", "AFILE"], "is a file: a split list goes to --train-list / --val-list"),
    (["--stats", "EMPTY"], "empty: a directory, not a file"),
    (["--val-list", "AFILE"], "--val-list needs --train-list"),
    (["--train-list", "AFILE"], "--train-list needs --val-list (or --val-every 0"),
    # argparse's own errors: one line too, not the page of usage text argparse prints by default
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x' (--help lists the flags)"),
    (["--amp", "fp64"], "argument --amp: invalid choice: 'fp64'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_one_line_exit_2(data, tmp_path, capsys, args, needle):
    defaults = ["--data-root", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "1", *BASE]
    code = T.cli(defaults + [make(tmp_path, a) for a in args])  # the case's flags come last, so they win
    assert code == 2 and needle in one_line_error(capsys.readouterr().err)
    if "--init-from" not in args:  # refused before the output directory is made (a checkpoint is read after)
        assert not (tmp_path / "o").exists()
