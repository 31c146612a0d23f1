"""Matrix-vector products of a decode step on CPU: a few rows times every weight of the model.

    from nanoseek.model.gemv import Linear, linear, rows_linear
    self.wq_a = Linear(512, 256, bias=False)   # an nn.Linear (same parameters and names) ...
    y = linear(x, w)                            # ... whose product is this: == F.linear(x, w)
    logits = rows_linear(h, head.weight)        # the eager decode head: == F.linear(h, head.weight)

A batch-1 decode step multiplies one row by every weight matrix, so it is bound by how fast
the weights stream from memory. PyTorch's `F.linear` goes to MKL's sgemv, which reads them at
about 11-13 GB/s on the 2-core EPYC we measure on; two faster routes, each where it pays:

* **Inside a compiled decode graph** (`linear`, used by every `Linear` of the blocks): the
  product is written as a broadcast multiply + sum over the input dimension, which inductor
  turns into one vectorised reduction loop that streams the weight once, with no [rows, out,
  in] tensor ever made. 96 `small`-sized matrices (126 MB of fp32) in one compiled graph, 2
  threads: 11.5 ms as `F.linear` (inductor calls MKL) vs 5.0-5.8 ms as the reduction, and it
  stays ahead up to 16 rows (1 row 10.9 vs 4.7 ms, 8 rows 14.5 vs 11.0 ms, 16 rows 21.7 vs 17.2
  ms). Eagerly the same expression would materialise the product, so outside a graph, with
  autograd, or past `MAX_ROWS` rows, `linear` is `F.linear`.
* **The eager decode head** (`rows_linear`; vocab x hidden, 16 MB in fp32 on `small`, far more
  than the L3 cache, computed outside the blocks' graphs): oneDNN's inner product
  (`mkldnn._linear_pointwise`) reads it at about 21 GB/s -- 0.7 ms instead of 1.4 ms of a
  step. For small matrices oneDNN's per-call setup (~30 us) eats the gain, so only weights of
  `MIN_BYTES` and more take it.

Numerically both are the same fp32 (or bf16) product with another summation order (~1e-6
relative; tests/model/test_fast_paths.py compares them with F.linear). oneDNN applies only
without autograd, on CPU, outside autocast and outside a compiled graph; anything else -- or a
oneDNN error, after which the process stops trying -- is F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

MIN_BYTES = 4 << 20  # weights below this stay with F.linear (see the docstring)
MAX_ROWS = 16  # a decode step's rows (batch x new tokens); prefill is a GEMM, not bandwidth-bound

_usable = torch.backends.mkldnn.is_available()

reduction_in_graphs = True  # the compiled decode graphs' multiply + sum (False: F.linear there too)


@functools.cache
def _bf16_supported() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # (compiling first: the bf16 capability query below would break a compiled graph)
    if torch.compiler.is_compiling() or not _usable or x.device.type != "cpu" or x.dtype != weight.dtype:
        return False
    if x.dtype is not torch.float32 and not (x.dtype is torch.bfloat16 and _bf16_supported()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):
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


def in_graph(rows, *tensors: torch.Tensor) -> bool:
    """Whether a product over `rows` rows of `tensors` is one for a multiply + sum: inside a
    compiled CPU graph, at most MAX_ROWS rows, no autograd (under dynamic shapes, a guard)."""
    if not (reduction_in_graphs and torch.compiler.is_compiling()) or tensors[0].device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return rows <= MAX_ROWS


def as_reduction(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` writes x @ weight^T as a multiply + sum (see in_graph)."""
    return x.dtype == weight.dtype and in_graph(x.shape[:-1].numel(), x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); in a compiled decode graph, one streaming reduction (see top)."""
    if not as_reduction(x, weight):
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(-1)  # [..., 1, in] * [out, in] -> [..., out]: never materialised
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear with `linear` as its product: the same parameters, names and checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
