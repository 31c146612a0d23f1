"""The LM head of a decode step on CPU: a few rows times a weight far bigger than the caches.

    from nanoseek.model.gemv import rows_linear
    logits = rows_linear(h, head.weight)        # == F.linear(h, head.weight), faster when it applies

A batch-1 decode step multiplies one row by every weight matrix, so it is bound by how fast
the weights stream from memory. For the head (vocab x hidden, 16 MB in fp32 on `small`, far
more than the L3 cache) PyTorch's `F.linear` goes to MKL's sgemv, which reads it at about
11 GB/s on the 2-core EPYC we measure on; oneDNN's inner product (`mkldnn._linear_pointwise`,
the kernel inductor's frozen CPU graphs call) reads the same matrix at about 21 GB/s -- the head
takes 0.7 ms instead of 1.4 ms of a ~10 ms step. For the small matrices inside the blocks
(<= 1 MB) oneDNN's per-call setup (~30 us) eats the gain, so only big weights take this path
(`MIN_BYTES`); the blocks' products stay in their compiled graphs.

Numerically it is the same fp32 (or bf16) product with another summation order (~1e-6
relative). It applies only without autograd, on CPU, outside autocast and outside a compiled
graph; anything else -- or a oneDNN error, after which the process stops trying -- is F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MIN_BYTES = 4 << 20  # weights below this stay with F.linear (see the docstring)
MAX_ROWS = 16  # a decode step's rows (batch x new tokens); prefill is a GEMM, not bandwidth-bound

_usable = torch.backends.mkldnn.is_available()


@functools.cache
def _bf16_supported() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _usable or x.device.type != "cpu" or x.dtype != weight.dtype:
        return False
    if x.dtype is not torch.float32 and not (x.dtype is torch.bfloat16 and _bf16_supported()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    return x.numel() // max(x.shape[-1], 1) <= MAX_ROWS and weight.numel() * weight.element_size() >= MIN_BYTES


def rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T (no bias), through oneDNN where `applies`."""
    return onednn_linear(x, weight) if applies(x, weight) else F.linear(x, weight)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN product for a caller that has checked `applies` (F.linear if oneDNN refuses)."""
    global _usable
    try:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), None, "none", [], "")
    except RuntimeError:  # an oneDNN build that refuses the shape or dtype: stop trying
        _usable = False
        return F.linear(x, weight)
