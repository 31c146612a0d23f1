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

Why not `torch.optim.Muon` (torch 2.13)? Its update rule is the same family (Nesterov momentum --
it keeps an EMA buffer, which only rescales M by (1 - mu) and is undone by the Frobenius
normalisation --, decoupled weight decay, an "match_rms_adamw" rescale), but:
  * it accepts only 2-D parameters: our experts are stacked 3-D tensors and must be
    orthogonalised per expert (batched here over E in one set of bmm calls);
  * it runs a single coefficient set for `ns_steps` steps: V4 uses the 8 + 2 hybrid schedule;
  * it always runs Newton-Schulz in bf16: on CPUs without bf16 matmul units that is ~100x
    slower than fp32, so we use bf16 only on CUDA (`ns_dtype="auto"`);
  * its RMS constant is fixed at 0.2; V4 uses 0.18.
So Muon below is our own small implementation of the V4 variant; the AdamW half is
`torch.optim.AdamW` unchanged.
"""

from __future__ import annotations

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


def orthogonalize_batch(mats: torch.Tensor, chunk: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """newton_schulz over a stack [k, n, m] of independent matrices, `chunk` at a time (None: all)."""
    if chunk is None or chunk >= mats.shape[0]:
        return newton_schulz(mats, dtype=dtype)
    out = torch.empty_like(mats)
    for i in range(0, mats.shape[0], chunk):
        out[i:i + chunk] = newton_schulz(mats[i:i + chunk], dtype=dtype)
    return out


class Muon(torch.optim.Optimizer):
    """Muon (V4 variant) for 2-D matrices and stacked [E, n, m] expert tensors (see module doc).

    Group options: lr, momentum (0.95), nesterov (True), weight_decay (0.1), rms_scale (0.18),
    ns_dtype ("auto": bf16 on CUDA, fp32 elsewhere; or "float32"/"bfloat16")."""

    def __init__(self, params, lr: float = 2e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, rms_scale: float = 0.18, ns_dtype: str = "auto"):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      rms_scale=rms_scale, ns_dtype=ns_dtype))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or stacked [E, n, m] experts, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            nd = group["ns_dtype"]
            # matrices of equal shape (up to a transpose: a tall n x m matrix is orthogonalised as
            # its wide transpose, which Newton-Schulz does anyway) go through one batched call
            # (a model has many same-shaped projections; one bmm beats dozens of small mm calls)
            buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)                                   # M_t = mu M_{t-1} + G_t
                u = g.add(buf, alpha=mu) if group["nesterov"] else buf  # mu M_t + G_t
                n, m = p.shape[-2:]
                buckets.setdefault(((min(n, m), max(n, m)), p.device, p.dtype), []).append((p, u, n > m))
            for (shape, device, _), items in buckets.items():
                dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if nd == "auto" \
                    else getattr(torch, nd)
                # FSDP2 shards are DTensors: Newton-Schulz needs the whole matrix, so gather the
                # update (momentum stays sharded), orthogonalise, keep this rank's slice.
                # Experts [E, n, m] contribute E matrices each: every expert is its own matrix.
                mats = []
                for p, u, tall in items:
                    u = _full(u).reshape(-1, *p.shape[-2:])
                    mats.append(u.mT if tall else u)
                stacked = torch.cat(mats)
                ortho = orthogonalize_batch(stacked, _ns_chunk(shape, device, dtype), dtype)
                scale = math.sqrt(shape[1]) * group["rms_scale"]      # sqrt(max(n, m)) * gamma
                i = 0
                for p, _, tall in items:
                    k = p.numel() // (shape[0] * shape[1])
                    o = ortho[i:i + k]
                    i += k
                    o = _like((o.mT if tall else o).reshape(p.shape), p)
                    if wd:
                        p.mul_(1 - lr * wd)                            # decoupled weight decay
                    p.add_(o, alpha=-lr * scale)
        return loss


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
                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, rms_scale=cfg.rms_scale))
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
