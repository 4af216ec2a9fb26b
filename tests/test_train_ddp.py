"""Training-time sparsity under DDP: two gloo processes on CPU."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecraft.train import RigL, drop_and_grow

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)  # every rank sees different data
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def _setup(model):
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(ddp, 0.75, update_every=2, end=40, optimizer=opt, fraction=0.4, seed=3)
    return ddp, opt, rigl


def _train(ddp, opt, rigl, rank, start, stop, checks=None):
    for step in range(start, stop):
        x, y = _batch(rank, step)
        reference = None
        if checks is not None and rigl.schedule.is_update_step(step + 1):
            # the dense gradient each rank would compute, averaged by hand
            fresh = _model()
            fresh.load_state_dict(rigl.model.state_dict())
            F.cross_entropy(fresh(x), y).backward()
            grads = {n: p.grad.clone() for n, p in fresh.named_parameters() if n in rigl.masks}
            for g in grads.values():
                dist.all_reduce(g)
                g /= WORLD
            reference = grads
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        if reference is not None:
            old = {n: k.clone() for n, k in rigl.masks.items()}
            weights = {t.name: t.param.detach().clone() for t in rigl.targets}
            fraction = rigl.schedule.fraction_at(step + 1)
        rigl.step()
        if reference is not None:
            for n, keep in old.items():
                count = int(fraction * int(keep.sum()) + 0.5)
                expected, _ = drop_and_grow(keep, weights[n], reference[n].abs(), count)
                checks.append(bool(torch.equal(expected, rigl.masks[n])))


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        checks = []
        ddp, opt, rigl = _setup(_model())
        _train(ddp, opt, rigl, rank, 0, 6, checks)
        if rank == 0:  # rank 0 writes the checkpoint
            torch.save({"model": rigl.model.state_dict(), "opt": opt.state_dict(), "rigl": rigl.state_dict()},
                       os.path.join(out_dir, "ckpt.pt"))
        _train(ddp, opt, rigl, rank, 6, 12, checks)
        masks = {n: k.clone() for n, k in rigl.masks.items()}
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, masks)
        identical = all(torch.equal(gathered[0][n], gathered[1][n]) for n in masks)
        dist.barrier()

        # resume on both ranks from rank 0's checkpoint
        state = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
        model = _model()
        torch.manual_seed(99)
        for p in model.parameters():  # start from different weights: all must come from the file
            p.data.normal_()
        ddp2, opt2, rigl2 = _setup(model)
        model.load_state_dict(state["model"])
        opt2.load_state_dict(state["opt"])
        rigl2.load_state_dict(state["rigl"])
        _train(ddp2, opt2, rigl2, rank, 6, 12)
        resumed_equal = all(torch.equal(a, b) for a, b in zip(rigl.model.state_dict().values(),
                                                              model.state_dict().values()))
        resumed_equal &= all(torch.equal(masks[n], rigl2.masks[n]) for n in masks)
        torch.save({"identical": identical, "checks": checks, "resumed_equal": resumed_equal,
                    "sparsity": rigl.sparsity()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_rigl_under_ddp_has_identical_masks_and_resumes_from_rank0():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD)]
        try:
            mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        except mp.ProcessExitedException:
            # Seen about once in six runs on a busy machine: gloo aborts a worker while the
            # process group is torn down ("terminate called without an active exception"),
            # after the worker saved its results. Only that case is let through.
            if not all(os.path.exists(p) for p in paths):
                raise
        results = [torch.load(p, weights_only=False) for p in paths]
    for r in results:
        assert r["identical"], "ranks hold different masks"
        assert r["checks"] and all(r["checks"]), "regrowth did not follow the rank-averaged gradient"
        assert r["resumed_equal"], "resuming from rank 0's checkpoint changed the run"
        assert r["sparsity"] == pytest.approx(0.75, abs=1e-3)
