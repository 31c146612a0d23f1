"""Data parallelism for the trainer: torchrun's environment, DDP / FSDP2 wrapping, and the
gathered save / load of sharded state. The model and the training loop know nothing of it.

    torchrun --nproc-per-node 2 -m nanoseek.cli train ...          # DDP (gloo on CPU, nccl + gloo on GPU)
    torchrun --nproc-per-node 2 -m nanoseek.cli train ... --fsdp   # FSDP2 fully_shard per block

    >>> d = setup_distributed("auto")                 # Dist(rank, world, local_rank, device)
    >>> module = parallelize(model, ObjectiveModule(model, objective), d, fsdp=False)

FSDP2 (`fully_shard`) puts one unit on every block (main and MTP) plus one on the root, so only
one block's parameters are gathered at a time. Checkpoints gather full tensors (a collective on
every rank, rank 0 writes), so a sharded run writes the same files as an unsharded one and they
load at any world size, with or without FSDP. Muon splits its Newton-Schulz work over the ranks
itself, under DDP and FSDP2 alike (optim.py, "Distributed Newton-Schulz").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group (process_group_backend: nccl for CUDA
    tensors, gloo for CPU ones)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    global _owned_group
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(process_group_backend(dev))
        _owned_group = True
    return Dist(rank, world, local, dev)


_owned_group = False  # setup_distributed made the process group (not the caller)
_ended_group = False  # shutdown_distributed tore that group down (exit_after_distributed applies)


def process_group_backend(dev: torch.device) -> str:
    """gloo on a CPU; on GPUs NCCL for CUDA tensors and gloo for CPU ones: the run's bookkeeping
    collectives (the metrics' all-reduce, the time budget's max, rollout counts) reduce small
    CPU tensors, which an NCCL-only group refuses."""
    return "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"


def shutdown_distributed() -> None:
    """End of a torchrun command: wait for every rank, then tear down the process group if
    setup_distributed made it (a caller's own group is left alone), so no rank exits while a
    peer's communication threads still talk to it. For the process's owner (the `nanoseek`
    commands) only: gloo cannot re-initialise a group in the same process, so `train()` itself
    leaves the group up for a caller that trains twice. The command then ends through
    exit_after_distributed."""
    global _owned_group, _ended_group
    if _owned_group and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        _ended_group = True
    _owned_group = False


def exit_after_distributed(code: int) -> None:
    """End the process now, with `code`, if this process's command ran (and shut down) its own
    torchrun group; otherwise return. Called by the `nanoseek` program once its command is done
    and has closed what it opened (files, progress bars, reward workers).

    Why not a normal interpreter exit: a gloo worker thread (PyTorch's C++ ProcessGroupGloo)
    releases a finished collective's tensors after the waiting rank has moved on, and when that
    happens after interpreter finalization has begun, releasing a tensor that has a Python object
    needs the GIL, the thread is torn down instead and the C++ runtime aborts the process
    ("terminate called without an active exception", SIGABRT) after the run itself succeeded.
    Seen in 1 of ~30 CI runs of the 2-process FSDP RL test and 1 of 23 runs of that command with
    two CPU hogs beside it (core dump: the abort in ProcessGroupGloo::runLoop destroying an
    AsyncWork while the main thread was in Py_FinalizeEx; the same PyTorch issue as
    pytorch/pytorch#179291, whose atexit fix was abandoned, and destroy_process_group does not
    stop those threads). Skipping finalization leaves the threads nothing to race with; what it
    would have done for a finished command is flushing output, done here."""
    if not _ended_group:
        return
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be written
            pass
    os._exit(code)


def all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM by default) over the data-parallel ranks; a no-op alone."""
    if d.enabled:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(x: float, d: Dist) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    all_reduce(t, d, torch.distributed.ReduceOp.MAX if d.enabled else None)
    return float(t.item())


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Wrapping

def parallelize(model: nn.Module, module: nn.Module, d: Dist, *, fsdp: bool = False,
                find_unused_parameters: bool = False) -> nn.Module:
    """Wrap `module` (the model + objective, whose forward computes the loss) for data
    parallelism: FSDP2 per block + root when `fsdp`, else DDP when there are several ranks."""
    if fsdp and d.enabled:
        from torch.distributed.fsdp import fully_shard

        # The auxiliary loss terms travel in ForwardContext.aux, an opaque object that FSDP's
        # argument rebuilding passes by reference, so every block's terms reach the loss.
        for block in list(model.layers) + list(model.mtp):
            fully_shard(block)
        fully_shard(module)
        return module
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: gate.bias is a buffer kept identical by the all-reduced
        # load (every rank applies the same update), and `load` itself must stay per rank
        return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
    return module


def no_sync(module: nn.Module, d: Dist, fsdp: bool, last_micro_step: bool):
    """Context for one accumulation micro-step: gradients are synchronised on the last only."""
    import contextlib

    if fsdp and d.enabled:
        module.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()
    if not d.enabled or last_micro_step:
        return contextlib.nullcontext()
    return module.no_sync()


# ---------------------------------------------------------------------------------------------
# Sharded <-> full tensors

def unshard(t: torch.Tensor, p=None) -> torch.Tensor:
    """The full tensor of a DTensor (a collective under FSDP: call on every rank); else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A full tensor re-sharded like parameter p (for loading optimizer state under FSDP)."""
    if hasattr(p, "device_mesh") and tuple(t.shape) == tuple(p.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
    return t


def _optimizer_params(opt) -> list[list[torch.Tensor]]:
    """Per optimizer, its parameters in state_dict index order."""
    return [[p for g in o.param_groups for p in g["params"]] for o in opt.optimizers]


def map_optimizer_tensors(states: list[dict], opt, fn) -> list[dict]:
    """Apply fn(tensor, param) to every per-parameter state tensor of CombinedOptimizer states."""
    out = []
    for sd, params in zip(states, _optimizer_params(opt)):
        new_state = {i: {k: fn(v, params[i]) if isinstance(v, torch.Tensor) else v for k, v in ps.items()}
                     for i, ps in sd["state"].items()}
        out.append({**sd, "state": new_state})
    return out


class FullModelView:
    """What save_pretrained needs of a model (config, dtype, state_dict) built from a full
    state dict: lets rank 0 save an FSDP-sharded model without materialising a second copy
    of the module."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state
        self.embed = type("E", (), {"weight": state["embed.weight"]})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def save_pretrained(self, path) -> None:
        from nanoseek.checkpoint import save_pretrained

        save_pretrained(self, path)


def gathered_state(model: nn.Module, opt, fsdp: bool):
    """(something with save_pretrained, full optimizer state) for writing a checkpoint.
    Under FSDP this is a collective: every rank must call it; rank 0 writes the result."""
    optim_state = opt.state_dict()
    if not fsdp:
        return model, optim_state
    optim_state = map_optimizer_tensors(optim_state, opt, unshard)
    full = {k: unshard(v) for k, v in model.state_dict().items()}
    return FullModelView(model.config, full), optim_state


def load_optimizer_state(opt, state: list[dict], fsdp: bool) -> None:
    opt.load_state_dict(map_optimizer_tensors(state, opt, shard_like) if fsdp else state)
