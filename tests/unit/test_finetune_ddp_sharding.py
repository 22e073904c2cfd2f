"""What makes W processes train like one: data and noise shards of the global batch, BatchNorm
over the global batch (two real gloo processes), and the batch check at job creation."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from clinisynth_server.finetune.kinds.base import (
    CpuSyncBatchNorm,
    EpochSampler,
    TrainContext,
    sync_batchnorm,
)
from clinisynth_server.finetune.params import world_size_violations


class _Accel:
    """The three attributes of accelerate's Accelerator that TrainContext reads."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")


def _ctx(rank: int, world: int) -> TrainContext:
    none: Any = None
    return TrainContext(
        job_id="j",
        params={},
        source=none,
        report=none,
        workdir=pathlib.Path("."),
        store=none,
        catalog=none,
        model_repository="",
        accelerator=_Accel(rank, world) if world > 1 else None,
        log=print,
        save_artifact=lambda name, path: None,
        load_artifact=lambda name, path: False,
    )


@pytest.mark.parametrize("world", [2, 4])
def test_rank_shards_partition_the_one_process_batches_across_epochs(world: int) -> None:
    one = EpochSampler(10, 8, seed=3)  # 8 does not divide 10: batches straddle epochs
    ranks = [EpochSampler(10, 8, seed=3, rank=r, world=world) for r in range(world)]
    for _ in range(7):
        want = one.next()
        got = [s.next() for s in ranks]
        assert all(len(g) == 8 // world for g in got)
        # Rows r, r+W, … of the global batch: together exactly the one-process batch.
        merged = torch.stack(got, dim=1).flatten()
        assert torch.equal(merged, want)
        assert all(s.state() == one.state() for s in ranks)  # one state, whoever saves it


def test_a_two_process_position_resumes_in_one_process() -> None:
    two = [EpochSampler(10, 4, seed=9, rank=r, world=2) for r in (0, 1)]
    for _ in range(4):
        for s in two:
            s.next()
    one = EpochSampler(10, 4, seed=9)
    one.load_state(two[0].state())
    straight = EpochSampler(10, 4, seed=9)
    for _ in range(4):
        straight.next()
    for _ in range(5):
        assert torch.equal(one.next(), straight.next())


def test_noise_shards_match_the_sampler_rows() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((8, 3), generator=g)
    shards = [_ctx(r, 2).shard(noise) for r in (0, 1)]
    assert torch.equal(torch.stack(shards, dim=1).reshape(8, 3), noise)
    assert _ctx(0, 1).shard(noise) is noise


def test_batch_must_divide_among_the_processes() -> None:
    assert world_size_violations({"batch_size": 8, "nproc_per_node": 2}, 1) == []
    assert world_size_violations({"batch_size": 7, "nproc_per_node": 1}, 1) == []
    bad = world_size_violations({"batch_size": 7, "nproc_per_node": 2}, 1)
    assert [v.field for v in bad] == ["params[batch_size]"]
    # nproc_per_node 0 = the service default, which counts as well.
    assert [v.field for v in world_size_violations({"batch_size": 6, "nproc_per_node": 0}, 4)] == [
        "params[batch_size]"
    ]


def _bn_rank(rank: int, world: int, init: str, x: torch.Tensor, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
        net = sync_batchnorm(net, _ctx(rank, world))
        assert type(net[1]) is CpuSyncBatchNorm
        shard = x[rank::world].clone().requires_grad_(True)
        y = net(shard)
        # The global-batch mean of a nonlinear loss: this rank's share of it.
        loss = (y**3).mean() / world
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        dist.all_reduce(grads)  # what DDP does with the ranks' gradients
        # numpy, not tensors: torch would pass shared memory that dies with this process.
        found = (y.detach(), shard.grad, grads, net[1].running_mean, net[1].running_var)
        out.put((rank, *(t.numpy().copy() for t in found)))
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch(tmp_path: pathlib.Path) -> None:
    world = 2
    x = torch.randn(6, 2, 7, 7, generator=torch.Generator().manual_seed(1)) * 3 + 1
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref**3).mean().backward()
    grads_ref = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    assert xr.grad is not None

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_bn_rank, args=(r, world, init, x, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, *rest = queue.get()
        results[rank] = [torch.from_numpy(a) for a in rest]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # fp32 sums over the ranks in another order: a few ulps of these O(1) values.
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for rank, (y, gx, grads, mean, var) in results.items():
        torch.testing.assert_close(y, y_ref.detach()[rank::world], **tol)
        torch.testing.assert_close(gx, xr.grad[rank::world], **tol)
        torch.testing.assert_close(grads, grads_ref, **tol)
        torch.testing.assert_close(mean, ref[1].running_mean, **tol)
        torch.testing.assert_close(var, ref[1].running_var, **tol)
