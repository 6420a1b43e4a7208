"""Run under torchrun by tests/test_ddp.py: two CPU ranks train InversionNet through DDP (Gloo) with the
training script's own Run and train_step, checking after each step that all ranks hold the same weights
and the same weight average (--ema-decay; its BatchNorm statistics follow the ranks' mean), and that
average_over_ranks gives them the same BatchNorm statistics; rank 0 saves what the test needs to recompute
the first update in one process."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])
import train_inversionnet as T  # noqa: E402
from helpers import resolved_args  # noqa: E402  (beside this file)

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
args = resolved_args(torch.device("cpu"), "--parallel", "ddp", "--lr", "1e-3", "--no-scale-lr", "--lr-scheduler", "none", "--ema-decay", "0.9")
run, parallel = T.build_run(args, torch.device("cpu"), iters_per_epoch=2, world=world)
assert parallel == "ddp"
init = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
batches = [(torch.randn(2, 5, 1000, 70, generator=g), torch.rand(2, 1, 70, 70, generator=g) * 2 - 1) for _ in range(2)]
def gathered(tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors if t.is_floating_point()])
    out = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(out, flat)
    return out


ema_stats_init = torch.cat([t.flatten() for t in run.ema.stats[0]])
for step, (x, y) in enumerate(batches):
    T.train_step(run, x, y)
    if step == 0:  # the average's BatchNorm statistics follow the ranks' mean, at the ramped decay of step 1
        live, w = gathered(run.ema.stats[1]), 1 - min(0.9, 2 / 11)
        mean = sum(live) / world
        if rank == 0:
            assert not torch.equal(live[0], live[1])
            torch.testing.assert_close(torch.cat([t.flatten() for t in run.ema.stats[0]]),
                                       ema_stats_init + w * (mean - ema_stats_init))
    weights, ema = gathered(run.raw_model.parameters()), gathered(run.ema.model.state_dict().values())
    if rank == 0:
        assert all(torch.equal(weights[0], t) for t in weights[1:]), f"ranks differ after step {step}"
        # the average (BatchNorm statistics included) too, so rank 0's checkpoint holds all of it at any step
        assert all(torch.equal(ema[0], t) for t in ema[1:]), f"the ranks' weight averages differ after step {step}"
        print(f"step {step}: ranks identical", flush=True)
    if step == 0:
        after_first = {k: v.clone() for k, v in run.raw_model.state_dict().items()}


before = gathered(run.raw_model.buffers())  # each rank's BatchNorm statistics followed its own batches
T.average_over_ranks(run.raw_model.buffers())
after = gathered(run.raw_model.buffers())
if rank == 0:
    assert not torch.equal(before[0], before[1])
    assert all(torch.equal(after[0], t) for t in after[1:])
    torch.testing.assert_close(after[0], sum(before) / world)
    print("BatchNorm statistics averaged over ranks", flush=True)
T.free_memory = lambda device: 10**12 if rank == 0 else 0  # only rank 0 has room for the device cache
fast = T.check_args(T.get_args_parser().parse_args(["--device", "cpu", "--fast"]))
T.resolve_speed(fast, torch.device("cpu"), cache_samples=10)
loaders = [None] * world
dist.all_gather_object(loaders, fast.loader)
if rank == 0:
    assert loaders == ["map"] * world, loaders
    print("--fast: the ranks agree on the loader", flush=True)
all_batches = [None] * world
dist.all_gather_object(all_batches, batches[0])
if rank == 0:
    torch.save({"init": init, "after_first": after_first, "batches": all_batches}, sys.argv[1])
T.wait_for_ranks(0)  # as the scripts do before the group goes
dist.destroy_process_group()
