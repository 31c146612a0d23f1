"""Benchmark: Muon's distributed Newton-Schulz -- per-rank Newton-Schulz time at 1 vs 2 processes.

One Muon step over every Muon matrix of a model (fixed random gradients, identical on every
rank, lr 0 so the weights stay put), in gloo processes on CPU, one intra-op thread each:

  world 1     one process: it orthogonalises every matrix;
  world 2     two processes, timed in interleaved rounds:
                alone  rank 0 orthogonalises every matrix while rank 1 waits: world 1's
                       work under this run's conditions;
                all    process_group=None: each rank orthogonalises every matrix (what every
                       rank did under DDP / FSDP before the split);
                ddp    replicated parameters: each rank its share, one all_gather per bucket;
                fsdp   FSDP2 fully_shard: experts where their shards are, 2-D matrices at their
                       owner (two all_to_alls per bucket).

Per rank it prints the median Newton-Schulz time (the orthogonalize_batch calls only), the
whole Muon step (with the collectives and the momentum / update arithmetic), and the
matrices and Newton-Schulz GFLOP it ran; then the ratios. The target: per-rank Newton-Schulz
time halves at 2 processes. Use the ratios measured in one run; on a shared machine the two
processes compete with other jobs for the cores.

    python benchmarks/bench_muon.py                    # speedrun model (depth 3), ~1 minute
    python benchmarks/bench_muon.py --config small     # `small` preset (larger matrices)
    python benchmarks/bench_muon.py --ns-dtype float32 # default: "auto" (bf16 where fast)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from nanoseek import ModelConfig, Transformer
from nanoseek.train import optim as optim_mod


def model_config(name: str) -> ModelConfig:
    if name == "speedrun":
        from nanoseek.train.presets import scaled_model_config

        return scaled_model_config(depth=3, vocab_size=4096, seq_len=256)
    return ModelConfig.from_preset(name)


class NSTimer:
    """Wraps optim.orthogonalize_batch to sum the seconds spent in Newton-Schulz."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = optim_mod.orthogonalize_batch

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out


def make_steps(config: ModelConfig, modes: list[str], ns_dtype: str, world: int) -> dict:
    """mode -> a function running one timed Muon step, returning (NS seconds, step seconds, matrices, FLOPs)."""
    torch.manual_seed(0)
    shapes = [p.shape for _, p in optim_mod.group_parameters(Transformer(config))["muon"]]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    timer = NSTimer()
    optim_mod.orthogonalize_batch = timer
    steps = {}
    for mode in modes:
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Shard, distribute_tensor

            module = torch.nn.Module()
            for i, w in enumerate(weights):
                module.register_parameter(f"p{i}", torch.nn.Parameter(w.clone()))
            mesh = init_device_mesh("cpu", (world,))
            fully_shard(module, mesh=mesh)
            params = list(module.parameters())
            g = [distribute_tensor(x, mesh, [Shard(0)]) for x in grads]
        else:
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            g = grads
        opt = optim_mod.Muon(params, lr=0.0, weight_decay=0.0, ns_dtype=ns_dtype,
                             process_group=None if mode in ("all", "alone") else "auto")
        idle = mode == "alone" and torch.distributed.get_rank() > 0

        def step(params=params, g=g, opt=opt, idle=idle):
            for p, x in zip(params, g):
                p.grad = x
            timer.seconds = 0.0
            if world > 1:
                torch.distributed.barrier()    # every rank starts the step together
            t = time.perf_counter()
            if not idle:
                opt.step()
            return timer.seconds, time.perf_counter() - t, opt.ns_matrices, opt.ns_flops

        steps[mode] = step
    return steps


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    modes = ["all"] if world == 1 else ["alone", "all", "ddp", "fsdp"]
    steps = make_steps(model_config(args.config), modes, args.ns_dtype, world)
    for fn in steps.values():              # warm-up (momentum buffers, caches)
        fn()
    rows = {m: [] for m in modes}
    for _ in range(args.reps):             # interleaved rounds: load hits every mode alike
        for m, fn in steps.items():
            rows[m].append(fn())
    result = {m: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), v[0][2], v[0][3])
              for m, v in rows.items()}
    torch.save(result, os.path.join(out, f"w{world}_rank{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world: int, args, out: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"w{world}_rank{r}.pt")) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="speedrun", help="speedrun (depth-3 dial model) or a preset name")
    ap.add_argument("--ns-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (medians)")
    args = ap.parse_args()
    dtype = optim_mod.ns_compute_dtype(args.ns_dtype, torch.device("cpu"))
    print(f"{args.config}: one Muon step over every Muon matrix, Newton-Schulz in {str(dtype).removeprefix('torch.')}, "
          f"gloo on CPU, 1 thread per process, medians of {args.reps}")
    with tempfile.TemporaryDirectory() as out:
        one = run(1, args, out)[0]
        two = run(2, args, out)
    print(f"\n{'':28}{'rank':>5}{'NS s':>9}{'step s':>9}{'matrices':>10}{'NS GFLOP':>10}")

    def line(label: str, rank: int, r: tuple) -> None:
        print(f"{label:<28}{rank:>5}{r[0]:9.3f}{r[1]:9.3f}{r[2]:10d}{r[3] / 1e9:10.2f}")

    line("world 1", 0, one["all"])
    line("world 2, rank 0 alone", 0, two[0]["alone"])
    for mode, label in (("all", "world 2, every rank all"), ("ddp", "world 2, DDP split"), ("fsdp", "world 2, FSDP split")):
        for rank, res in enumerate(two):
            line(label, rank, res[mode])
    print()
    for mode in ("ddp", "fsdp"):
        worst = max(res[mode][0] for res in two)     # the slowest rank sets the step time
        share = max(res[mode][3] for res in two) / one["all"][3]
        print(f"{mode}: per-rank Newton-Schulz time, 2 processes / 1: {worst / two[0]['alone'][0]:.2f} vs rank 0 alone "
              f"in the same processes, {worst / one['all'][0]:.2f} vs the 1-process run, "
              f"{worst / max(res['all'][0] for res in two):.2f} vs every rank doing all; largest share of the "
              f"FLOPs {share:.2f}; Muon step {max(res[mode][1] for res in two) / two[0]['alone'][1]:.2f}x rank 0 alone's")


if __name__ == "__main__":
    main()
