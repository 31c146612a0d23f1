"""RMSNorm (weighted, weights kept in fp32) and the unweighted per-head variant.

    y = w * x / sqrt(mean(x^2) + eps)

The statistic is computed in fp32 whatever the activation dtype; DeepSeek-V4 keeps norm weights
in fp32 and multiplies before casting back (spec 1.3, [O] RMSNorm).

Speed (eager training, where most CPU users run): autograd records the plain formula as six nodes
(square, mean, add, rsqrt and two products), whose backward makes about fifteen passes over the
input. `_RMSNorm` is the same arithmetic as one autograd Function with the textbook backward,

    grad_x = r * (g w - xhat * mean(g w * xhat)),   grad_w = sum over tokens of g * xhat,

with xhat = x r and r = 1/rms(x). On the CPU (fp32, fp64 and bf16 activations, eager) both
directions are one C pass each (cpu_kernels.rms_norm, kernels/norm.h): the output comes out in
x's dtype (bf16: computed in fp32, rounded once), and only x (in its own dtype) and r are saved,
xhat being recomputed in the backward: half the saved memory of an fp32 xhat for bf16 input, and
no fp32 copy of it. Measured (2 shared cores, median of 20, forward + backward against the
PyTorch Function): [4, 512, 512] fp32 3.5-4.8 -> 1.2-1.5 ms (attn_norm / ffn_norm of `small`),
[4, 512, 256] bf16 1.1 -> 0.6 ms (q_norm), the per-head [4, 512, 8, 64] bf16 queries 3.4-3.8 ->
1.0 ms; in a bf16 `small` training step, the attn / ffn / q / kv norms ~40 -> ~18 ms.
Elsewhere (CUDA, compiled graphs, kernels unavailable) the Function runs PyTorch ops: the plain
formula's, bit for bit, saving xhat and r (about half the plain formula's time).

Grad and no-grad forwards give the same bits (a no-grad pass, e.g. GRPO's old log-probs, sees
the training pass's numbers): without a gradient the kernel runs directly where it applies, and
the plain formula where it does not, which is what the Function's forward computes there.
`RMSNorm.fused = False` selects the plain formula everywhere (the tests' reference);
`cpu_kernels.enabled = False` the PyTorch path (the Function when a gradient is wanted, the plain
formula otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .precision import fp32_or_wider


def rms_normalize(x: torch.Tensor, eps: float, keep_dtype: bool = False) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in fp32 (float64 stays float64), returned so, or,
    with keep_dtype, rounded once to x's dtype (`.to(x.dtype)` of that, without the fp32 copy)."""
    xk = x if keep_dtype else fp32_or_wider(x)
    if _kernel_applies(xk, None):
        return _kernel_forward(xk, None, eps)
    y = _RMSNorm.apply(xk, None, eps) if _use_function(xk) else _plain(xk, eps)
    return y.to(x.dtype) if keep_dtype else y


class RMSNorm(nn.Module):
    fused = True  # the autograd Function / C kernel of the module docstring; False: the plain formula

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_applies(x, self.weight):
            return _kernel_forward(x, self.weight, self.eps)
        if _use_function(x, self.weight):
            return _RMSNorm.apply(x, self.weight, self.eps).to(x.dtype)
        return (self.weight * _plain(x, self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _plain(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = fp32_or_wider(x)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _wants_grad(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))


def _use_function(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    # also under torch.compile (dynamo traces the Function; Inductor fuses its forward and
    # backward): a compiled training step then computes the eager step's gradients
    return RMSNorm.fused and _wants_grad(x, weight)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return RMSNorm.fused and cpu_kernels.rms_norm_applies(x, weight)


def _kernel_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The kernel's y in x's dtype: through the Function when a gradient is wanted, else the
    same call without autograd (the same bits)."""
    if _wants_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return cpu_kernels.rms_norm(x, weight, eps)[0]


class _RMSNorm(torch.autograd.Function):
    """y = xhat * w (or xhat when w is None), xhat = x * r, r = rsqrt(mean(x^2) + eps): in x's dtype
    from the C kernel where cpu_kernels.rms_norm_applies, else in fp32 (or wider) from PyTorch ops."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        ctx.in_dtype = x.dtype
        ctx.kernel = cpu_kernels.rms_norm_applies(x, weight)
        if ctx.kernel:
            y, r = cpu_kernels.rms_norm(x, weight, eps)
            ctx.save_for_backward(x, r, weight)   # xhat is recomputed from x in the backward
            return y
        xf = fp32_or_wider(x)
        # the plain formula's exact ops: the forward is bit-identical to it (a no-grad pass, e.g.
        # GRPO's old log-probs, sees the same numbers as the training pass)
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        xhat = xf * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat if weight is None else xhat * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.kernel:
            x, r, weight = ctx.saved_tensors
            grad_x, grad_w = cpu_kernels.rms_norm_backward(x, r, weight, g, ctx.needs_input_grad[:2])
            return grad_x, grad_w, None
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
