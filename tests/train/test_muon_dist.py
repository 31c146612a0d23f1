"""Distributed Newton-Schulz in Muon (nanoseek/train/optim.py): two gloo processes on CPU, under
DDP-style replicated gradients and under FSDP2 shards, give every rank the update of one
process, and each rank orthogonalises only its share of the matrices."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanoseek.train.optim import Muon, ns_flops, split_counts

# 2-D and stacked-expert shapes with uneven splits: 3 experts over 2 ranks, 5 / 3 / 1 rows
# (FSDP2 gives rank 1 fewer rows, or none), tall and wide matrices sharing a bucket.
SHAPES = [(3, 12, 20), (20, 12), (12, 20), (2, 20, 12), (16, 16), (5, 20), (3, 16), (1, 16), (8, 20)]
STEPS = 2
DTYPES = ("float32", "bfloat16")


def _problem():
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(*s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(*s, generator=gen) * (1 + i) for i, s in enumerate(SHAPES)] for _ in range(STEPS)]
    return w0, grads


def _single(ns_dtype: str):
    """The reference: one process, no process group."""
    w0, grads = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype, process_group=None)
    for g in grads:
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()
    return [p.detach() for p in params], (opt.ns_matrices, opt.ns_flops)


def _ddp(ns_dtype: str):
    """Replicated parameters and (already all-reduced) gradients, as DDP leaves them."""
    w0, grads = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)      # process_group "auto": WORLD
    for g in grads:
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()
    return [p.detach().clone() for p in params], (opt.ns_matrices, opt.ns_flops)


def _fsdp(ns_dtype: str, world: int):
    """FSDP2 fully_shard: parameters, gradients and momentum are dim-0 DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    w0, grads = _problem()
    module = torch.nn.Module()
    for i, w in enumerate(w0):
        module.register_parameter(f"p{i}", torch.nn.Parameter(w.clone()))
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(module, mesh=mesh)
    params = list(module.parameters())
    assert all(tuple(p.placements) == (Shard(0),) for p in params)
    opt = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
    for g in grads:
        for p, x in zip(params, g):
            p.grad = distribute_tensor(x, mesh, [Shard(0)])
        opt.step()
    momentum = [opt.state[p]["momentum_buffer"].full_tensor() for p in params]
    return [p.detach().full_tensor() for p in params], (opt.ns_matrices, opt.ns_flops), momentum


def _other_layout(ns_dtype: str, world: int):
    """DTensors sharded along dim 1 (not FSDP2's layout): Muon falls back to gathering every
    update and orthogonalising all of them on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    w0, grads = _problem()
    mesh = init_device_mesh("cpu", (world,))
    params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(1)])) for w in w0]
    opt = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
    for g in grads:
        for p, x in zip(params, g):
            p.grad = distribute_tensor(x, mesh, [Shard(1)])
        opt.step()
    return [p.detach().full_tensor() for p in params], (opt.ns_matrices, opt.ns_flops)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for nd in DTYPES:
            res[("ddp", nd)] = _ddp(nd)
            res[("fsdp", nd)] = _fsdp(nd, world)
        res[("other", "float32")] = _other_layout("float32", world)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon_dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _matrices() -> list[tuple[int, int]]:
    """Every logical matrix of SHAPES as (min, max) of its two sides."""
    return [tuple(sorted(s[-2:])) for s in SHAPES for _ in range(s[0] if len(s) == 3 else 1)]


@pytest.mark.parametrize("ns_dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_give_the_single_process_update(two_ranks, mode, ns_dtype):
    ref, (ref_count, ref_flops) = _single(ns_dtype)
    mats = _matrices()
    assert ref_count == len(mats) == 12 and ref_flops == sum(ns_flops(s) for s in mats)
    counts, flops = [], []
    for res in two_ranks:
        params, (count, fl) = res[(mode, ns_dtype)][:2]
        counts.append(count)
        flops.append(fl)
        for i, (got, want) in enumerate(zip(params, ref)):
            # every matrix is orthogonalised once, by one rank, in the same dtype: the same
            # values (observed bitwise in bf16; in fp32 MKL's GEMM kernels depend on the batch
            # size, which differs between one rank's share and the whole bucket)
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (mode, ns_dtype, SHAPES[i])
    for i in range(len(ref)):   # and all ranks end with the same parameters
        assert torch.equal(two_ranks[0][(mode, ns_dtype)][0][i], two_ranks[1][(mode, ns_dtype)][0][i])
    # each rank ran Newton-Schulz on its share only: every matrix once over the two ranks, and
    # the work balanced by FLOPs to within the largest single matrix (under FSDP the 3 experts
    # of the first tensor sit 2 / 1 on the ranks, which the 2-D matrices even out)
    assert sum(counts) == len(mats) and all(0 < c < len(mats) for c in counts), counts
    assert sum(flops) == ref_flops
    assert abs(flops[0] - flops[1]) <= max(ns_flops(s) for s in mats), (counts, flops)


def test_other_dtensor_layouts_gather_and_match(two_ranks):
    ref, (count, _) = _single("float32")
    for res in two_ranks:
        params, (c, _) = res[("other", "float32")]
        assert c == count                      # no split: every rank orthogonalised every matrix
        for got, want in zip(params, ref):
            assert torch.allclose(got, want, rtol=0, atol=1e-6)


def test_fsdp_momentum_stays_sharded_and_matches(two_ranks):
    w0, grads = _problem()
    for res in two_ranks:
        momentum = res[("fsdp", "float32")][2]
        for i, m in enumerate(momentum):   # M_2 = mu G_1 + G_2, gathered from the shards
            assert torch.allclose(m, 0.95 * grads[0][i] + grads[1][i], atol=1e-6)


def test_split_counts_balances_cost():
    # one bucket of 5 free matrices, one expensive bucket of 3, one with fixed work on rank 0
    plan = [(5, 1.0, [0, 0]), (3, 10.0, [0, 0]), (2, 1.0, [3, 0])]
    counts = split_counts(plan, 2)
    assert [sum(c) for c in counts] == [5, 3, 2]
    load = [sum(c[r] * b[1] + b[2][r] * b[1] for c, b in zip(counts, plan)) for r in range(2)]
    assert abs(load[0] - load[1]) <= 1.0, (counts, load)   # within one cheapest matrix
    assert split_counts(plan, 2) == counts                  # deterministic: every rank agrees
    assert split_counts([(4, 1.0, [0])], 1) == [[4]]
    # thousands of equal experts (one bucket) over 3 ranks with uneven fixed work
    counts = split_counts([(3000, 2.0, [5, 0, 1])], 3)[0]
    assert sum(counts) == 3000 and max(c + f for c, f in zip(counts, [5, 0, 1])) - \
        min(c + f for c, f in zip(counts, [5, 0, 1])) <= 1, counts
