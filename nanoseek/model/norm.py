"""RMSNorm (weighted, weights kept in fp32) and the unweighted per-head variant.

    y = w * x / sqrt(mean(x^2) + eps)

The statistic is computed in fp32 whatever the activation dtype; DeepSeek-V4 keeps norm weights
in fp32 and multiplies before casting back (spec 1.3, [O] RMSNorm).

Speed (eager training, where most CPU users run): autograd records the plain formula as six nodes
(square, mean, add, rsqrt and two products), whose backward makes about fifteen passes over the
input. `_RMSNorm` is the same arithmetic as one autograd Function with the textbook backward,

    grad_x = r * (g w - xhat * mean(g w * xhat)),   grad_w = sum over tokens of g * xhat,

with xhat = x r and r = 1/rms(x) saved from the forward (about half the time of the plain
version, forward + backward, at the `[tokens, 192]` shapes of the speedrun model; ~40% of it on
`[tokens, 4, 192]` mHC streams). Its forward is the plain formula's ops, bit for bit. It is used
only when a gradient is wanted (inference has no autograd to save); `RMSNorm.fused = False`
selects the plain formula everywhere, which the tests compare it against.
"""

from __future__ import annotations

import torch
from torch import nn

from .precision import fp32_or_wider


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in fp32 (float64 stays float64), returned so."""
    if _use_function(x):
        return _RMSNorm.apply(x, None, eps)
    x = fp32_or_wider(x)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    fused = True  # the autograd Function of the module docstring; False: the plain formula

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_function(x, self.weight):
            return _RMSNorm.apply(x, self.weight, self.eps).to(x.dtype)
        return (self.weight * rms_normalize(x, self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _use_function(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    # also under torch.compile (dynamo traces the Function; Inductor fuses its forward and
    # backward): a compiled training step then computes the eager step's gradients
    return (RMSNorm.fused and torch.is_grad_enabled()
            and (x.requires_grad or (weight is not None and weight.requires_grad)))


class _RMSNorm(torch.autograd.Function):
    """fp32 y = xhat * w (or xhat when w is None), xhat = x * r, r = rsqrt(mean(x^2) + eps)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        xf = fp32_or_wider(x)
        # the plain formula's exact ops: the forward is bit-identical to it (a no-grad pass, e.g.
        # GRPO's old log-probs, sees the same numbers as the training pass)
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        xhat = xf * r
        ctx.in_dtype = x.dtype
        ctx.save_for_backward(xhat, r, weight)
        return xhat if weight is None else xhat * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, r, weight = ctx.saved_tensors
        g = g.to(xhat.dtype)
        grad_w = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = g * weight if weight is not None else g.clone()
            dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(xhat.shape[-1])
            grad_x = gw.sub_(xhat * dot).mul_(r).to(ctx.in_dtype)
        return grad_x, grad_w, None

