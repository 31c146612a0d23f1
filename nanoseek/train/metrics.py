"""Training metrics: FLOPs per token and MFU, the loss-term bookkeeping across accumulation
micro-steps and ranks, expert-load statistics, and the JSONL (+ TensorBoard) log.

    >>> flops = training_flops_per_token(model, seq_len=512)      # from the model's own counts
    >>> mfu = flops * tokens_per_second / measure_peak_flops(torch.device("cpu"))
    >>> meter = TermMeter(); meter.add(terms, divisor=accum); meter.reduce(dist)  # -> {name: float}

FLOPs per token (Kaplan et al. 2020, sec. 2.1; the nanochat / PaLM MFU convention): 6 x the
parameters a token activates in a training step -- top-k routed + shared experts, attention,
head and the MTP block, without the embedding lookup (`count_parameters(..., activated=True,
include_mtp=True)`, the model's own count) -- plus 12 L h d_h T/2 for the attention scores.
V4 layers attend to a sliding window and compressed entries, so T is taken as the window: a
lower bound.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from nanoseek.jsonl import read_jsonl

from nanoseek.train.parallelize import Dist, all_reduce


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s on this device (the MFU denominator when none is configured)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    iters, t0 = 0, time.perf_counter()
    while True:
        c = a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt > seconds:
            break
    del c
    return 2 * n**3 * iters / dt


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 x activated parameters of a training step (MTP included, embedding not) + attention
    scores over the sliding window (module docstring)."""
    from nanoseek.model import count_parameters

    c = model.config
    n = count_parameters(c, activated=True, include_mtp=True, model=model)
    layers = c.num_hidden_layers + len(c.mtp_layer_types)
    attn = 12 * layers * c.num_attention_heads * c.head_dim * min(seq_len, c.sliding_window) / 2
    return 6 * n + attn


class TermMeter:
    """Sums an objective's terms (dicts of scalar tensors) over accumulation micro-steps, then
    averages them over data-parallel ranks in one all-reduce."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, terms: dict[str, torch.Tensor], divisor: float = 1.0) -> None:
        for n, v in terms.items():
            v = torch.as_tensor(v).detach().float().reshape(())
            self.sums[n] = self.sums.get(n, 0.0) + v / divisor

    def reduce(self, d: Dist) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        vec = torch.stack([self.sums[n] for n in names]).cpu().double()
        all_reduce(vec, d)
        vec /= d.world
        return {n: float(v) for n, v in zip(names, vec)}


def expert_load_metrics(loads: torch.Tensor | None) -> dict:
    """Per learned-routing layer: max/mean load (1 = perfectly balanced) and the raw counts."""
    if loads is None:
        return {}
    mean_l = loads.mean(dim=1).clamp_min(1e-9)
    return {"expert_imbalance": [round(float(x), 4) for x in loads.max(dim=1).values / mean_l],
            "expert_load": [[int(x) for x in row] for row in loads.tolist()]}


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when available); main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # drop records written after the checkpoint we resume from: the curve stays one curve
            # (a line torn by a kill is dropped, as the reader of the log does)
            keep = [r for r in read_jsonl(self.path, skip_invalid=True) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is an optional extra
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
