"""Manifold-constrained hyper-connections (mHC) and the final hyper head.

Spec 1.2; DeepSeek-V4 report section 2.2; mHC paper arXiv:2512.24880.

The residual stream is widened to `hc_mult` parallel streams X [B, S, n, d]. Around each
sub-block F (attention or MoE) a hyper-connection computes, from the streams themselves:
  mix  = (flatten(X) / rms(flatten(X))) @ fn^T            -> 2n + n*n numbers per token
  pre  = sigmoid(a_pre  * mix_pre  + b_pre) + eps           (how streams are collapsed into F's input)
  post = 2 * sigmoid(a_post * mix_post + b_post)            (how F's output is spread over the streams)
  comb = Sinkhorn(softmax(a_res * mix_res + b_res) + eps)   (a doubly-stochastic stream mixer)
and the block output is  X'_k = post_k * F(sum_j pre_j X_j) + sum_j comb[j, k] X_j.
Projecting `comb` onto doubly-stochastic matrices keeps the residual mapping non-expansive
across depth; gradients flow through all Sinkhorn iterations (the matrices are n x n).
Everything in here runs in fp32, as in the reference.

The final hyper head collapses the streams once more (only `pre`, no Sinkhorn) before the last
RMSNorm and the LM head; MTP blocks own one too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Softmax over the last dim, then alternate column / row normalisation (iters-1 rounds).

    The first division is by column sums; each later round divides rows then columns, so the
    result is (approximately) doubly stochastic.
    """
    m = torch.softmax(logits, dim=-1) + eps
    if not (torch.is_grad_enabled() and m.requires_grad):
        # inference: the same arithmetic in place (half the kernel launches, no allocations)
        m.div_(m.sum(dim=-2, keepdim=True).add_(eps))
        for _ in range(iters - 1):
            m.div_(m.sum(dim=-1, keepdim=True).add_(eps))
            m.div_(m.sum(dim=-2, keepdim=True).add_(eps))
        return m
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def mix_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int, eps: float):
    """mix [..., 2n+n*n] -> pre [..., n], post [..., n], comb [..., n, n] (spec 1.2 step 3)."""
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = sinkhorn((comb_w * scale[2] + comb_b).unflatten(-1, (n, n)), iters, eps)
    return pre, post, comb


class HyperConnection(nn.Module):
    """One mHC site. Parameters are named like the official checkpoint (`hc_attn_fn` etc. are
    views of these, see `Block`)."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        mix = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(mix, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    # the elementwise part (about 120 tiny kernels, mostly Sinkhorn); Transformer.compile_kernels()
    # replaces it per instance with a torch.compile'd version that fuses them into a few
    mix_weights = staticmethod(lambda *a: mix_weights(*a))

    def collapse(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B,S,n,d] -> (block input [B,S,d], post [B,S,n], comb [B,S,n,n])."""
        mix = _normalized_mix(streams, self.fn, self.norm_eps)
        pre, post, comb = self.mix_weights(mix, self.scale, self.base, self.n, self.iters, self.hc_eps)
        x = _weighted_sum(pre, streams)
        return x, post, comb

    @staticmethod
    def expand(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k * y + sum_j comb[j,k] X_j   (comb is applied transposed)."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """Final collapse of the n streams into one hidden state (spec 1.2, 'final hyper head')."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mix = _normalized_mix(streams, self.fn, self.norm_eps)
        pre = torch.sigmoid(mix * self.scale + self.base) + self.hc_eps
        return _weighted_sum(pre, streams)


def _normalized_mix(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(flat @ fn^T) * rsqrt(mean(flat^2) + eps) in fp32: the RMS scaling commutes with the
    matmul, so it is applied to the few mix outputs instead of the 4d-wide input (spec 1.2.2)."""
    flat = streams.flatten(-2).float()
    with torch.autocast(device_type=streams.device.type, enabled=False):  # mHC stays fp32
        mix = F.linear(flat, fn.float())
    return mix * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def _weighted_sum(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_j w_j X_j as one batched [1,n] @ [n,d] product: weights [...,n], streams [...,n,d]."""
    with torch.autocast(device_type=streams.device.type, enabled=False):
        out = torch.matmul(weights.unsqueeze(-2), streams.float()).squeeze(-2)
    return out.to(streams.dtype)
