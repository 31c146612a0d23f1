"""Optimizers and learning-rate schedules of the DeepSeek-V4 pre-training recipe.

Spec section 3 (V4 report section 2.4 / Algorithm 1; "Muon is Scalable for LLM Training",
arXiv:2502.16982, for the RMS-matching rescale; Keller Jordan's Muon post for Newton-Schulz).

    opt = build_optimizer(model, TrainHParams-like kwargs)    # Muon for matrices, AdamW for the rest
    lr_mult = lr_schedule(step, total_steps, warmup_steps=..., decay_frac=..., shape="cosine")

Muon, per logically independent matrix W in R^{n x m} (every routed expert's w1/w2/w3 is its own
matrix even though the model stores them stacked [E, out, in]):

    M_t = mu * M_{t-1} + G_t                      momentum (mu = 0.95)
    O'  = NS(mu * M_t + G_t)                      Nesterov look-ahead, orthogonalised
    O   = O' * sqrt(max(n, m)) * gamma            update RMS ~ gamma = 0.18, so AdamW LRs transfer
    W  <- W * (1 - lr * lambda) - lr * O          decoupled weight decay (lambda = 0.1)

NS (Newton-Schulz) starts from X = M / ||M||_F and applies X <- aX + b(XX^T)X + c(XX^T)^2 X
8 times with (3.4445, -4.7750, 2.0315) -- fast growth of small singular values -- and then 2
times with (2, -1.5, 0.5), the classic cubic-convergent quintic that pulls every singular value
to ~1. The result is approximately U V^T of the SVD (singular values within a few % of 1).

Newton-Schulz precision. `ns_dtype="auto"` iterates in bf16 where bf16 matmuls are fast (CUDA
GPUs with bf16 tensor cores; CPUs with AMX or AVX512-BF16 -- `fast_bf16_matmul`), else in
fp32; V4 runs it in bf16 and reports it stable. Against the same iteration in float64
(tests/train/test_optim.py, matrices up to 64 x 192 and expert stacks), per matrix:
  bf16: relative Frobenius error <= 1.5e-2 (observed ~6e-3, about 1.5 bf16 ulps), singular
        values within 1.5% of 1 (observed 0.6%; float64 itself: 0.05%), every entry within
        10% of the entries' RMS (observed <= 5%);
  fp32: relative Frobenius error <= 1e-5 (observed ~1e-6).
So a bf16 iteration changes a Muon update by ~0.6% of its own size.

Distributed Newton-Schulz (as Moonlight's distributed Muon, arXiv:2502.16982, and the DistMuon
optimizers issue 12 cites). Each logical matrix is orthogonalised by exactly one rank
and the results are shared, so a rank does ~1/W of the Newton-Schulz FLOPs instead of all:
  * DDP (plain tensors, replicated gradients after the all-reduce): each bucket's matrices
    are split into contiguous per-rank ranges (`split_counts`: greedy by FLOPs over all
    buckets); a rank orthogonalises its range and one all_gather per bucket (in the
    Newton-Schulz dtype, which holds the results exactly) gives every rank every result.
  * FSDP2 (DTensor dim-0 shards): a stacked expert tensor is sharded along E, so each rank
    holds whole expert matrices and orthogonalises them where they are (no communication);
    a 2-D matrix's rows are spread over the ranks, so an all_to_all sends every rank's rows
    to the matrix's owner, the owner orthogonalises it whole, and a second all_to_all sends
    each rank its rows of the result. Momentum and parameters stay sharded throughout.
Every rank then applies the same update it would apply alone: one process's step and W
processes' steps agree (tests/train/test_muon_dist.py: bitwise in bf16, within 1e-6 in fp32,
where MKL picks batch-size-dependent GEMM kernels). One bucket's
results travel while the next bucket is orthogonalised (async collectives).

Why not `torch.optim.Muon` (torch 2.13)? Its update rule is the same family (Nesterov momentum --
it keeps an EMA buffer, which only rescales M by (1 - mu) and is undone by the Frobenius
normalisation --, decoupled weight decay, an "match_rms_adamw" rescale), but:
  * it accepts only 2-D parameters: our experts are stacked 3-D tensors and must be
    orthogonalised per expert (batched here over E in one set of bmm calls);
  * it runs a single coefficient set for `ns_steps` steps: V4 uses the 8 + 2 hybrid schedule;
  * it always runs Newton-Schulz in bf16: on CPUs without bf16 matmul units that is ~100x
    slower than fp32, so "auto" uses bf16 only where it is fast (see above);
  * it has no distributed Newton-Schulz split (above);
  * its RMS constant is fixed at 0.2; V4 uses 0.18.
So Muon below is our own small implementation of the V4 variant; the AdamW half is
`torch.optim.AdamW` unchanged.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

NS_SCHEDULE: tuple[tuple[tuple[float, float, float], int], ...] = (
    ((3.4445, -4.7750, 2.0315), 8),
    ((2.0, -1.5, 0.5), 2),
)


def newton_schulz(g: torch.Tensor, schedule=NS_SCHEDULE, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of g ([..., n, m], batched over leading dims)."""
    x = g.to(dtype or torch.float32)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        x = x.mT
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    for (a, b, c), steps in schedule:
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            # b G + c G G and a X + (...) X as two fused multiply-adds: mathematically the same as
            # a*x + (b*gram + c*gram@gram) @ x (one rounding instead of two per fused op) without four extra passes over the operands
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(*lead, *x.shape[-2:])
    if transpose:
        x = x.mT
    return x.to(g.dtype)


# Newton-Schulz batch size. On CPUs, one 256 x 512 fp32 matrix (512 KiB) plus its Gram
# matrices fits in L2; a batch of hundreds streams every iteration through memory and ran
# 1.3-1.5x slower on the 2-core development machine (benchmarks/bench_train.py --muon-ab).
# So the CPU path orthogonalises chunks of about NS_CPU_CHUNK_BYTES; GPUs take the
# whole bucket in one batched call (kernel launches, not caches, are their bottleneck).
NS_CPU_CHUNK_BYTES = 1 << 20


def _ns_chunk(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> int | None:
    if device.type != "cpu":
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, NS_CPU_CHUNK_BYTES // (shape[0] * shape[1] * itemsize))


def ns_flops(shape: tuple[int, int], schedule=NS_SCHEDULE) -> int:
    """FLOPs of newton_schulz on one n x m matrix (n <= m): per iteration X X^T (2 n^2 m),
    G G (2 n^3) and (...) X (2 n^2 m)."""
    n, m = shape
    return sum(steps for _, steps in schedule) * 2 * n * n * (2 * m + n)


def orthogonalize_batch(mats: torch.Tensor, chunk: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """newton_schulz over a stack [k, n, m] of independent matrices, `chunk` at a time (None: all)."""
    if chunk is None or chunk >= mats.shape[0]:
        return newton_schulz(mats, dtype=dtype)
    out = torch.empty_like(mats)
    for i in range(0, mats.shape[0], chunk):
        out[i:i + chunk] = newton_schulz(mats[i:i + chunk], dtype=dtype)
    return out


@functools.lru_cache(maxsize=None)
def fast_bf16_matmul(device_type: str) -> bool:
    """Whether this machine multiplies bf16 matrices natively (faster than fp32): CUDA GPUs with
    bf16 tensor cores (Ampere and later), CPUs with AMX or AVX512-BF16 (oneDNN's bf16 GEMM: a
    batched 256 x 512 product 2.6x faster than fp32, a Muon step of the speedrun model 1.85x, on
    the 2-core AVX512-BF16 development machine). Elsewhere (AVX2-only CPUs, pre-Ampere GPUs)
    bf16 matmuls are emulated and slower than fp32 (~100x on an AVX2 CPU, earlier notes)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def ns_compute_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype of a Muon group option: "auto" is bf16 where bf16 matmuls are fast."""
    if ns_dtype == "auto":
        return torch.bfloat16 if fast_bf16_matmul(device.type) else torch.float32
    return getattr(torch, ns_dtype)


class Muon(torch.optim.Optimizer):
    """Muon (V4 variant) for 2-D matrices and stacked [E, n, m] expert tensors (see module doc).

    Group options: lr, momentum (0.95), nesterov (True), weight_decay (0.1), rms_scale (0.18),
    ns_dtype ("auto": bf16 where bf16 matmuls are fast -- see fast_bf16_matmul --, else fp32;
    or "float32" / "bfloat16").

    process_group: "auto" splits the Newton-Schulz work over the ranks of torch.distributed's
    default group when it has several (DDP: the parameters and their all-reduced gradients
    are replicated, which Muon then assumes of its plain-tensor parameters); None never
    splits plain tensors; or a ProcessGroup. FSDP2 parameters (DTensors) are split over their
    own mesh. See "Distributed Newton-Schulz" in the module doc. `ns_matrices` and `ns_flops`
    count the matrices this rank orthogonalised in its last step and their iterations' FLOPs."""

    def __init__(self, params, lr: float = 2e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, rms_scale: float = 0.18, ns_dtype: str = "auto",
                 process_group="auto"):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      rms_scale=rms_scale, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or stacked [E, n, m] experts, got shape {tuple(p.shape)}")
        self.process_group = process_group
        self.ns_matrices = self.ns_flops = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ns_matrices = self.ns_flops = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = self._nesterov_updates(group, params)
            mode, pg = self._layout(params)
            # matrices of equal shape (up to a transpose: a tall n x m matrix is orthogonalised as
            # its wide transpose, which Newton-Schulz does anyway) go through one batched call
            # (a model has many same-shaped projections; one bmm beats dozens of small mm calls)
            buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
            for p, u in zip(params, updates):
                n, m = p.shape[-2:]
                buckets.setdefault(((min(n, m), max(n, m)), p.device, p.dtype), []).append((p, u, n > m))
            if mode in ("local", "gather"):
                for key, items in buckets.items():
                    self._bucket_local(group, key, items)
            else:
                self._step_distributed(group, buckets, mode, pg)
        return loss

    def _nesterov_updates(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """mu M_t + G_t per parameter after M_t = mu M_{t-1} + G_t, as this rank's local tensors
        (an FSDP2 DTensor's shard: the arithmetic is elementwise, so no communication)."""
        mu = group["momentum"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(_local(state["momentum_buffer"]))
        grads = [_local(p.grad) for p in params]
        # foreach: one dispatch for all tensors (fused kernels on GPU); the same elementwise ops
        torch._foreach_mul_(bufs, mu)                                       # M_t = mu M_{t-1} + G_t
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs  # mu M_t + G_t

    def _layout(self, params: list[torch.Tensor]):
        """("local" | "replicated" | "sharded" | "gather", process group): how this group's
        Newton-Schulz work is laid out over ranks."""
        dts = [p for p in params if hasattr(p, "device_mesh")]
        if dts:
            from torch.distributed.tensor import Shard

            mesh = dts[0].device_mesh
            if (len(dts) == len(params) and mesh.ndim == 1 and mesh.size() > 1
                    and all(p.device_mesh == mesh and tuple(p.placements) == (Shard(0),) for p in dts)):
                return "sharded", mesh.get_group()
            return "gather", None        # other layouts (HSDP, tensor parallel): gather, orthogonalise all
        pg = self.process_group
        if isinstance(pg, str):
            dist = torch.distributed
            pg = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        if pg is not None and torch.distributed.get_world_size(pg) > 1:
            return "replicated", pg
        return "local", None

    def _bucket_local(self, group: dict, key: tuple, items: list) -> None:
        """One process's bucket: every matrix orthogonalised here (also the "gather" layout:
        each DTensor update gathered whole, its slice of the result kept)."""
        shape, device, _ = key
        dtype = ns_compute_dtype(group["ns_dtype"], device)
        # Experts [E, n, m] contribute E matrices each: every expert is its own matrix. The stack
        # is built in the Newton-Schulz dtype (its first step casts to it anyway): one pass
        # over the updates instead of a concatenation plus a cast per chunk.
        stacked = torch.empty(sum(p.numel() for p, _, _ in items) // (shape[0] * shape[1]), *shape,
                              dtype=dtype, device=device)
        i = 0
        for p, u, tall in items:
            if hasattr(p, "device_mesh"):
                u = _from_local(u, p)
            u = _full(u).reshape(-1, *p.shape[-2:])
            stacked[i:i + u.shape[0]] = u.mT if tall else u
            i += u.shape[0]
        ortho = orthogonalize_batch(stacked, _ns_chunk(shape, device, dtype), dtype)
        self._count(stacked.shape[0], shape)
        i = 0
        for p, _, tall in items:
            k = p.numel() // (shape[0] * shape[1])
            o = ortho[i:i + k]
            i += k
            self._apply(group, p, _local(_like((o.mT if tall else o).reshape(p.shape), p)), shape)

    def _count(self, k: int, shape: tuple[int, int]) -> None:
        self.ns_matrices += k
        self.ns_flops += k * ns_flops(shape)

    @staticmethod
    def _apply(group: dict, p: torch.Tensor, o: torch.Tensor, shape: tuple[int, int]) -> None:
        """W <- W (1 - lr lambda) - lr sqrt(max(n, m)) gamma O on this rank's part of p."""
        lr, wd = group["lr"], group["weight_decay"]
        w = _local(p)
        if wd:
            w.mul_(1 - lr * wd)                                        # decoupled weight decay
        scale = math.sqrt(shape[1]) * group["rms_scale"]              # sqrt(max(n, m)) * gamma
        w.add_(o.to(w.dtype), alpha=-lr * scale)

    # ----------------------------------------------------------------------------------------
    # Distributed Newton-Schulz

    def _step_distributed(self, group: dict, buckets: dict, mode: str, pg) -> None:
        """Every logical matrix orthogonalised by exactly one rank (split_counts), the results
        shared with torch.distributed collectives; the updates are applied once all arrived, so
        one bucket's communication overlaps the next bucket's Newton-Schulz. mode: "replicated"
        (DDP) or "sharded" (FSDP2)."""
        world, rank = torch.distributed.get_world_size(pg), torch.distributed.get_rank(pg)
        plan = []   # per bucket: (free matrices, cost per matrix, per-rank fixed matrices)
        for (shape, _, _), items in buckets.items():
            cost = ns_flops(shape)
            if mode == "replicated":
                k = sum(p.numel() // (shape[0] * shape[1]) for p, _, _ in items)
                plan.append((k, cost, [0] * world))
            else:   # FSDP: experts are sharded along E, so each rank holds whole expert matrices
                fixed = [sum(_rows(p.shape[0], world, r) for p, _, _ in items if p.ndim == 3) for r in range(world)]
                plan.append((sum(p.ndim == 2 for p, _, _ in items), cost, fixed))
        pending = []
        for (key, items), counts in zip(buckets.items(), split_counts(plan, world)):
            run = self._bucket_replicated if mode == "replicated" else self._bucket_sharded
            pending.append(run(group, key, items, counts, rank, world, pg))
        for finish in pending:
            finish()

    def _bucket_replicated(self, group, key, items, counts, rank, world, pg):
        """DDP: every rank holds every update; rank r orthogonalises the bucket's matrices
        [start_r, start_r + counts[r]) and one all-gather hands every rank all results."""
        shape, device, _ = key
        dtype = ns_compute_dtype(group["ns_dtype"], device)
        starts = [sum(counts[:r]) for r in range(world)]
        kmax, a, k = max(counts), starts[rank], counts[rank]
        mshape = (shape[0], shape[1])
        # the exchange runs in the Newton-Schulz dtype: its output is exactly representable there
        send = torch.empty(kmax, *mshape, dtype=dtype, device=device)
        off = 0
        for p, u, tall in items:
            mats = u.reshape(-1, *p.shape[-2:])
            lo, hi = max(a, off), min(a + k, off + mats.shape[0])
            if lo < hi:
                send[lo - a:hi - a] = (mats.mT if tall else mats)[lo - off:hi - off]
            off += mats.shape[0]
        if k:
            send[:k] = orthogonalize_batch(send[:k], _ns_chunk(shape, device, dtype), dtype)
            self._count(k, shape)
        recv = torch.empty(world * kmax, *mshape, dtype=dtype, device=device)
        work = torch.distributed.all_gather_single(recv, send, group=pg, async_op=True)

        def finish():
            work.wait()
            ortho = recv if kmax * world == off else torch.cat([recv[r * kmax:r * kmax + counts[r]] for r in range(world)])
            i = 0
            for p, _, tall in items:
                kp = p.numel() // (shape[0] * shape[1])
                o = ortho[i:i + kp]
                i += kp
                self._apply(group, p, (o.mT if tall else o).reshape(p.shape), shape)
        return finish

    def _bucket_sharded(self, group, key, items, counts, rank, world, pg):
        """FSDP2 (dim-0 shards): a stacked expert tensor's shard holds whole matrices, which this
        rank orthogonalises in place; a 2-D matrix's rows are spread over the ranks, so its shards
        go to its owner (all-to-all), the owner orthogonalises the whole matrix and sends every
        rank its rows of the result back (all-to-all)."""
        shape, device, _ = key
        dtype = ns_compute_dtype(group["ns_dtype"], device)
        flat = [(p, u, tall) for p, u, tall in items if p.ndim == 2]
        experts = [(p, u.reshape(-1, *p.shape[-2:]), tall) for p, u, tall in items if p.ndim == 3]
        owner = [r for r in range(world) for _ in range(counts[r])]      # of flat[j], ascending
        mine = [j for j, o in enumerate(owner) if o == rank]
        ex = _ShardExchange([p.shape for p, _, _ in flat], owner, rank, world, pg, dtype, device)
        for p, u, _ in flat:
            if u.shape[0] != _rows(p.shape[0], world, rank):
                raise RuntimeError(f"Muon: unexpected FSDP shard {tuple(u.shape)} of a {tuple(p.shape)} matrix")
        stack = torch.empty(len(mine) + sum(x.shape[0] for _, x, _ in experts), *shape, dtype=dtype, device=device)
        whole = [stack[i].mT if flat[j][2] else stack[i] for i, j in enumerate(mine)]   # [n, m] views
        ex.to_owners([u for _, u, _ in flat], whole)                     # 1. shards -> owners
        i = len(mine)
        for _, x, tall in experts:
            stack[i:i + x.shape[0]] = x.mT if tall else x
            i += x.shape[0]
        if stack.shape[0]:
            stack = orthogonalize_batch(stack, _ns_chunk(shape, device, dtype), dtype)
            self._count(stack.shape[0], shape)
        i = len(mine)
        for p, x, tall in experts:
            o = stack[i:i + x.shape[0]]
            i += x.shape[0]
            self._apply(group, p, (o.mT if tall else o).reshape(_local(p).shape), shape)
        whole = [stack[i].mT if flat[j][2] else stack[i] for i, j in enumerate(mine)]
        wait = ex.from_owners(whole)                                       # 2. owners -> shards

        def finish():
            for (p, _, _), o in zip(flat, wait()):
                self._apply(group, p, o, shape)
        return finish


class _ShardExchange:
    """The two all-to-alls of one bucket's row-sharded 2-D matrices under FSDP2: every rank's
    rows of matrix j to its owner, owner[j]; then the owner's result rows back to every rank.
    Row layout: torch.chunk's (see _rows); buffers ordered by peer rank, then by matrix."""

    def __init__(self, shapes, owner, rank, world, pg, dtype, device):
        self.shapes, self.owner, self.rank, self.world, self.pg = shapes, owner, rank, world, pg
        self.dtype, self.device = dtype, device
        self.mine = [j for j, o in enumerate(owner) if o == rank]

    def _size(self, j: int, r: int) -> int:
        """Elements of matrix j's shard on rank r."""
        n, m = self.shapes[j]
        return _rows(n, self.world, r) * m

    def _piece(self, t: torch.Tensor, j: int, r: int) -> torch.Tensor:
        """Rank r's rows of the whole matrix j (t: [n, m])."""
        n = self.shapes[j][0]
        return t[r * _chunk(n, self.world):][:_rows(n, self.world, r)]

    def _exchange(self, send: list[list[torch.Tensor]], recv_sizes: list[int], async_op: bool = False):
        """all_to_all_single of send[d] (tensors for rank d) into a buffer of recv_sizes[r]
        elements from each rank r, in the Newton-Schulz dtype."""
        flat = torch.cat([x.reshape(-1).to(self.dtype) for parts in send for x in parts] or [self._empty(0)])
        recv = self._empty(sum(recv_sizes))
        work = torch.distributed.all_to_all_single(recv, flat, recv_sizes, [sum(x.numel() for x in parts) for parts in send],
                                                   group=self.pg, async_op=async_op)
        return recv, work

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=self.dtype, device=self.device)

    def to_owners(self, shards: list[torch.Tensor], whole: list[torch.Tensor]) -> None:
        """Send this rank's shard of every matrix to its owner; fill `whole` (this rank's own
        matrices, [n, m] views) with the shards received."""
        if not self.shapes:
            return
        send = [[shards[j] for j in range(len(self.shapes)) if self.owner[j] == d] for d in range(self.world)]
        recv, _ = self._exchange(send, [sum(self._size(j, r) for j in self.mine) for r in range(self.world)])
        pos = 0
        for r in range(self.world):
            for i, j in enumerate(self.mine):
                piece = self._piece(whole[i], j, r)
                piece.copy_(recv[pos:pos + piece.numel()].view(piece.shape))
                pos += piece.numel()

    def from_owners(self, whole: list[torch.Tensor]):
        """Send every rank its rows of this rank's results (asynchronously); returns a function
        that waits and returns this rank's rows of every matrix, in matrix order."""
        if not self.shapes:
            return lambda: []
        send = [[self._piece(whole[i], j, d) for i, j in enumerate(self.mine)] for d in range(self.world)]
        recv_sizes = [sum(self._size(j, self.rank) for j in range(len(self.shapes)) if self.owner[j] == r)
                      for r in range(self.world)]
        recv, work = self._exchange(send, recv_sizes, async_op=True)

        def wait() -> list[torch.Tensor]:
            work.wait()
            out, pos = [None] * len(self.shapes), 0
            for r in range(self.world):
                for j in range(len(self.shapes)):
                    if self.owner[j] == r:
                        rows = _rows(self.shapes[j][0], self.world, self.rank)
                        out[j] = recv[pos:pos + rows * self.shapes[j][1]].view(rows, self.shapes[j][1])
                        pos += rows * self.shapes[j][1]
            return out
        return wait


def split_counts(plan: list[tuple[int, float, list[int]]], world: int) -> list[list[int]]:
    """How many of each bucket's free matrices every rank orthogonalises. plan: per bucket
    (free matrices k, cost of one, matrices each rank must do anyway, e.g. its FSDP expert
    shards). Greedy longest-processing-time: buckets from the most expensive matrix down, each
    matrix to the rank with the least work so far (fixed work included), so per-rank work ends
    within about one matrix of the others. Deterministic: every rank computes the same split."""
    load = [0.0] * world
    for _, cost, fixed in plan:
        for r in range(world):
            load[r] += fixed[r] * cost
    out: list[list[int]] = [[] for _ in plan]
    for b in sorted(range(len(plan)), key=lambda b: -plan[b][1]):
        k, cost, _ = plan[b]
        out[b] = _water_fill(load, k, cost)
        for r in range(world):
            load[r] += out[b][r] * cost
    return out


def _water_fill(load: list[float], k: int, cost: float) -> list[int]:
    """k matrices of one cost to the least-loaded ranks: the counts of a one-at-a-time greedy
    assignment, computed from the final water level (O(world), not O(k): buckets of experts
    hold thousands of matrices). Ties go to the lowest rank."""
    world = len(load)
    order = sorted(range(world), key=lambda r: (load[r], r))
    acc = 0.0
    for p in range(1, world + 1):          # the level when the p least-loaded ranks share the k matrices
        acc += load[order[p - 1]]
        level = (acc + k * cost) / p
        if p == world or level <= load[order[p]]:
            break
    counts = [max(0, int((level - load[r]) // cost)) for r in range(world)]

    def after(r: int) -> tuple[float, int]:
        return load[r] + counts[r] * cost, r
    while sum(counts) > k:                 # float rounding of the level: trim / top up one at a time
        counts[max((r for r in range(world) if counts[r]), key=after)] -= 1
    while sum(counts) < k:
        counts[min(range(world), key=after)] += 1
    return counts


def _chunk(n: int, world: int) -> int:
    return -(-n // world)


def _rows(n: int, world: int, rank: int) -> int:
    """Rows of an n-row tensor on `rank` under FSDP2 / DTensor Shard(0) (torch.chunk's split:
    ceil(n / world) per rank, the last ranks short or empty)."""
    c = _chunk(n, world)
    return max(0, min(c, n - rank * c))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops on it update the DTensor); else t."""
    return t.to_local() if hasattr(t, "to_local") else t


def _from_local(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` laid out like parameter p (this rank's shard when p is a DTensor; no communication)."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full

# ---------------------------------------------------------------------------------------------
# Parameter grouping

# AdamW, per spec 3: embedding, prediction head, mHC static biases ("base") and gates ("scale"),
# RMSNorm weights. Also AdamW (the spec is silent): attention sinks and the compressors'
# learned position bias "ape" -- both are additive biases, not linear maps, so orthogonalising
# them has no meaning. Everything else that is a matrix goes to Muon: attention/compressor/
# indexer projections, the router weight, shared and routed experts, the mHC `fn` maps, the MTP
# projections.
_ADAMW_MATRIX = re.compile(r"(^|\.)(embed|head)\.weight$|(^|\.)ape$")


def param_group_name(name: str, p: torch.Tensor) -> str:
    """'muon', 'adamw_matrix' (embedding, head, ape) or 'adamw_vector' (norms, mHC base/scale, sinks)."""
    if _ADAMW_MATRIX.search(name):
        return "adamw_matrix"
    if p.ndim < 2:
        return "adamw_vector"
    return "muon"


def group_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter in exactly one group (shared tensors are listed once)."""
    groups: dict[str, list] = {"muon": [], "adamw_matrix": [], "adamw_vector": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        groups[param_group_name(name, p)].append((name, p))
    return groups


@dataclass
class OptimConfig:
    lr: float = 2e-3                  # peak LR of both Muon (thanks to the 0.18 RMS rescale) and AdamW
    adamw_lr: float | None = None     # None: same as lr
    weight_decay: float = 0.1         # Muon and AdamW matrices (spec: lambda = 0.1)
    vector_weight_decay: float = 0.0  # norms / mHC biases and gates / sinks: decaying a gain toward 0
    #                                   only fights the normalisation, so 0 by default (spec says 0.1)
    momentum: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-20                # spec value; fine in fp32 (v = 0 only where m = 0 too)
    rms_scale: float = 0.18
    ns_dtype: str = "auto"            # Muon's Newton-Schulz: "auto" (bf16 where fast), "float32", "bfloat16"


class CombinedOptimizer:
    """Muon + AdamW behind one step/zero_grad/state_dict; `param_groups` lists all groups,
    each with a 'name' and its 'initial_lr' (the schedule multiplies it)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_lr_mult(self, mult: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["initial_lr"] * mult

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match (different number of optimizers)")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def build_optimizer(model: nn.Module, cfg: OptimConfig | None = None) -> CombinedOptimizer:
    cfg = cfg or OptimConfig()
    groups = group_parameters(model)
    adamw_lr = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr
    opts: list[torch.optim.Optimizer] = []
    if groups["muon"]:
        opts.append(Muon([{"params": [p for _, p in groups["muon"]], "name": "muon", "initial_lr": cfg.lr}],
                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, rms_scale=cfg.rms_scale,
                         ns_dtype=cfg.ns_dtype))
    adam_groups = []
    if groups["adamw_matrix"]:
        adam_groups.append({"params": [p for _, p in groups["adamw_matrix"]], "name": "adamw_matrix",
                            "weight_decay": cfg.weight_decay, "initial_lr": adamw_lr})
    if groups["adamw_vector"]:
        adam_groups.append({"params": [p for _, p in groups["adamw_vector"]], "name": "adamw_vector",
                            "weight_decay": cfg.vector_weight_decay, "initial_lr": adamw_lr})
    if adam_groups:
        opts.append(torch.optim.AdamW(adam_groups, lr=adamw_lr, betas=cfg.betas, eps=cfg.eps, foreach=True))
    return CombinedOptimizer(opts)


# ---------------------------------------------------------------------------------------------
# Schedules

def lr_schedule(step: int, total_steps: int, *, warmup_steps: int = 0, decay_frac: float = 0.2,
                shape: str = "cosine", final_frac: float = 0.1) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warm-up, constant, then a decay
    over the last `decay_frac` of training to `final_frac` of the peak (V4: cosine to 10%).

    shape "cosine" or "linear" (WSD's usual linear cool-down). decay_frac=1 with shape
    "cosine" is plain warm-up + cosine-to-10% over the whole run."""
    if shape not in ("cosine", "linear"):
        raise ValueError(f"unknown decay shape {shape!r} (cosine or linear)")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = decay_start(total_steps, decay_frac)
    if step < start or total_steps <= start:
        return 1.0
    t = min(1.0, (step - start + 1) / (total_steps - start))
    if shape == "linear":
        return 1.0 - (1.0 - final_frac) * t
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def decay_start(total_steps: int, decay_frac: float) -> int:
    """First step of the decay phase (also where the MTP weight drops, spec 3)."""
    return int(round(total_steps * (1.0 - decay_frac)))
