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
Everything in here computes in fp32, as in the reference. The streams are stored in the model's
activation dtype: fp32, or bf16 under bf16 autocast on a CPU (Transformer.autocast_streams), as the
reference stores them in its bf16 model dtype and flattens them to fp32 for the mix (spec 1.2);
bf16 streams are widened for every product and each result is rounded back once.

The final hyper head collapses the streams once more (only `pre`, no Sinkhorn) before the last
RMSNorm and the LM head; MTP blocks own one too.

Speed (eager, where most CPU users run): the n x n stream mixes are per-token 4 x 4 products,
and the RMS scaling and Sinkhorn leave long autograd chains. With `HyperConnection.fused = True`
(the default) the same arithmetic runs as four autograd Functions with hand-written backward
passes (`_MixRMS`, `_Sinkhorn`, `_WeightedSum`, `_StreamMix`): every big-tensor pass is either
a broadcast multiply-add over d or a per-token matmul whose shapes PyTorch's CPU kernels handle
well (measured per shape, see _StreamMix), Sinkhorn runs tokens-last and its backward walks its
saved normalisers; on the eager CPU path Sinkhorn is one C call each way instead
(`_SinkhornKernel`, model/cpu_kernels.py), and so are the stream mix and the weighted sum inside
their Functions (`HyperConnection.stream_kernels`: one pass over the streams per direction). `fused = False` is the plain reference, op by op,
that the tests compare them against (values and every gradient). Inside a compiled decode step (few tokens, no
autograd: `gemv.in_graph`) the mix, weighted sum and stream mix are written as broadcast
multiply + sum instead, which inductor fuses into single kernels (docs/model.md "Speed").
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels, gemv
from .precision import fp32_or_wider, fp32_region, wide_dtype


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Softmax over the last dim, then alternate column / row normalisation (iters-1 rounds).

    The first division is by column sums; each later round divides rows then columns, so the
    result is (approximately) doubly stochastic.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        if HyperConnection.fused and cpu_kernels.sinkhorn_applies(logits, iters):
            return cpu_kernels.sinkhorn(logits, iters, eps)  # one C call (eager CPU)
        # inference: the same arithmetic in place, tokens last (see _tokens_last)
        m = torch.softmax(_tokens_last(logits), dim=1).add_(eps)
        m.div_(m.sum(dim=0, keepdim=True).add_(eps))
        for _ in range(iters - 1):
            m.div_(m.sum(dim=1, keepdim=True).add_(eps))
            m.div_(m.sum(dim=0, keepdim=True).add_(eps))
        return _tokens_first(m, logits.shape)
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _tokens_last(x: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> contiguous [n, n, T]. Sinkhorn's ~120 ops each touch only n*n numbers per
    token; with the tokens innermost every op is one vectorised pass over T (a row or column
    sum adds n contiguous rows) instead of a strided reduction over tiny 4-element rows."""
    n = x.shape[-1]
    return x.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _tokens_first(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of _tokens_last: [n, n, T] -> contiguous tensor of `shape` ([..., n, n])."""
    return x.permute(2, 0, 1).contiguous().view(shape)  # (a reshape would keep the token stride 1)


class _Sinkhorn(torch.autograd.Function):
    """`sinkhorn` with a hand-written backward: each normalisation m' = m / s (s = m.sum(dim) +
    eps) has gradient (g - sum(g * m', dim)) / s; the backward replays them in reverse from the
    saved normalisers (n x n per token: small), instead of autograd's ~7 nodes per step.
    Both directions run tokens-last ([n, n, T], see _tokens_last): dim 0 sums columns, dim 1 rows."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        p = torch.softmax(_tokens_last(logits), dim=1)
        m = p + eps
        dims, sums = [], []
        for i in range(2 * iters - 1):
            dim = 0 if i % 2 == 0 else 1  # columns first, then rows / columns alternately
            s = m.sum(dim=dim, keepdim=True).add_(eps)
            m = m / s
            dims.append(dim)
            sums.append(s)
        ctx.dims = dims
        ctx.shape = logits.shape
        ctx.save_for_backward(p, m, *sums)
        return _tokens_first(m, logits.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, m, *sums = ctx.saved_tensors
        g = _tokens_last(g)
        for dim, s in zip(reversed(ctx.dims), reversed(sums)):
            g = (g - (g * m).sum(dim=dim, keepdim=True)) / s
            m = m * s  # this step's input (m' * s = m)
        # softmax backward (the eps shift has gradient 1)
        g = p * (g - (g * p).sum(dim=1, keepdim=True))
        return _tokens_first(g, ctx.shape), None, None


class _SinkhornKernel(torch.autograd.Function):
    """`sinkhorn` as one C call each way (model/cpu_kernels.py, kernels/sinkhorn.h): the same
    steps as _Sinkhorn, with the forward recomputed inside the backward from the saved logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters, ctx.eps = iters, eps
        return cpu_kernels.sinkhorn(logits, iters, eps)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return cpu_kernels.sinkhorn_backward(logits, g, ctx.iters, ctx.eps), None, None


def _pre(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float) -> torch.Tensor:
    """pre = sigmoid(a_pre * mix_pre + b_pre) + eps: how the streams are collapsed into one input."""
    return torch.sigmoid(mix * scale + base) + eps


def mix_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int, eps: float):
    """mix [..., 2n+n*n] -> pre [..., n], post [..., n], comb [..., n, n] (spec 1.2 step 3)."""
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = _pre(pre_w, scale[0], pre_b, eps)
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb_logits = (comb_w * scale[2] + comb_b).unflatten(-1, (n, n))
    if HyperConnection.fused and torch.is_grad_enabled() and comb_logits.requires_grad:
        kernel = _SinkhornKernel if cpu_kernels.sinkhorn_applies(comb_logits, iters) else _Sinkhorn
        comb = kernel.apply(comb_logits, iters, eps)
    else:
        comb = sinkhorn(comb_logits, iters, eps)
    return pre, post, comb


class HyperConnection(nn.Module):
    """One mHC site. Parameters are named like the official checkpoint (`hc_attn_fn` etc. are
    views of these, see `Block`)."""

    fused = True  # the fused kernels of the module docstring; False: the plain reference
    # with `fused`: the stream mix and weighted sum as C passes on the eager CPU path
    # (cpu_kernels.stream_mix / weighted_sum); False: their PyTorch products
    stream_kernels = True
    # with both: a collapse that records gradients is one autograd Function (_Collapse), for
    # fp32 / fp64 streams of at least COLLAPSE_MIN_ELEMENTS: below that its fixed cost (the mix
    # weights recomputed under autograd in the backward) outweighs the passes it saves (measured,
    # whole runs, fp32 streams: 0.8M elements, the speedrun's, 0.97x; 4M, `small`'s, 1.10x).
    # bf16 streams take it at any size: the composed path would widen them to fp32 for its GEMM
    # (a copy, saved for the backward) where _Collapse's kernels read bf16 (whole trainer steps,
    # same process, 10 rounds a run, median per-round ratio: the speedrun's 0.8M elements
    # 1.02-1.03x in four runs, depth 2's 0.5M 1.00x; `small` at 4 x 256 tokens, 2M: 1.01-1.06x
    # in three process pairs)
    collapse_function = True
    COLLAPSE_MIN_ELEMENTS = 2 << 20
    # in _Collapse: the mix's products as C passes (cpu_kernels.mix_rms, collapse_mix_backward:
    # the product with the mean square, and the streams' and fn's gradients in one pass); False:
    # MKL GEMMs around the C collapse pass
    mix_kernels = True

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

    def collapse(self, streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """streams [B,S,n,d] -> (block input [B,S,d], post [B,S,n], comb [B,S,n,n], streams): pass
        the returned streams (the same values) to `expand`; on the _Collapse path they are its
        alias output, so that their gradient from the expand joins the collapse's own in one pass."""
        if _collapse_applies(streams, self.fn, self.scale, self.base):
            def weights(mix, scale, base):
                return self.mix_weights(mix, scale, base, self.n, self.iters, self.hc_eps)
            with fp32_region(streams.device.type):  # mHC stays fp32
                return _Collapse.apply(streams, self.fn, self.scale, self.base, weights, self.norm_eps)
        mix = _normalized_mix(streams, self.fn, self.norm_eps)
        pre, post, comb = self.mix_weights(mix, self.scale, self.base, self.n, self.iters, self.hc_eps)
        x = _weighted_sum(pre, streams)
        return x, post, comb, streams

    def block_input(self, streams: torch.Tensor) -> torch.Tensor:
        """collapse()'s block input alone: no post / comb weights (no Sinkhorn)."""
        mix = _normalized_mix(streams, self.fn, self.norm_eps)
        pre = _pre(mix[..., : self.n], self.scale[0], self.base[: self.n], self.hc_eps)
        return _weighted_sum(pre, streams)

    @staticmethod
    def expand(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k * y + sum_j comb[j,k] X_j   (comb is applied transposed), in the streams'
        dtype, computed in fp32 (fp64 for a float64 model)."""
        dtype, real = streams.dtype, wide_dtype(streams)
        post, comb = post.to(real), comb.to(real)
        if gemv.in_graph(streams.shape[:-2].numel(), y, streams, post, comb):
            # a compiled decode step: one pointwise kernel instead of a per-token bmm
            wide = streams.to(real)
            mixed = (comb.unsqueeze(-1) * wide.unsqueeze(-2)).sum(-3)
            return (post.unsqueeze(-1) * y.to(real).unsqueeze(-2) + mixed).to(dtype)
        if HyperConnection.fused:
            with fp32_region(streams.device.type):  # mHC stays fp32
                return _StreamMix.apply(y.to(dtype), streams, post, comb)
        mixed = torch.matmul(comb.transpose(-1, -2), streams.to(real))
        return (post.unsqueeze(-1) * y.to(real).unsqueeze(-2) + mixed).to(dtype)


class HyperHead(nn.Module):
    """Final collapse of the n streams into one hidden state (spec 1.2, 'final hyper head')."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if _collapse_applies(streams, self.fn, self.scale, self.base):
            def weights(mix, scale, base):
                return (_pre(mix, scale, base, self.hc_eps),)
            with fp32_region(streams.device.type):
                return _Collapse.apply(streams, self.fn, self.scale, self.base, weights, self.norm_eps)[0]
        mix = _normalized_mix(streams, self.fn, self.norm_eps)
        pre = _pre(mix, self.scale, self.base, self.hc_eps)
        return _weighted_sum(pre, streams)


def _normalized_mix(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(flat @ fn^T) * rsqrt(mean(flat^2) + eps) in fp32: the RMS scaling commutes with the
    matmul, so it is applied to the few mix outputs instead of the 4d-wide input (spec 1.2.2)."""
    flat = fp32_or_wider(streams.flatten(-2))
    fn = fn.to(flat.dtype)
    with fp32_region(streams.device.type):  # mHC stays fp32
        if HyperConnection.fused and not gemv.as_reduction(flat, fn):
            return _MixRMS.apply(flat.reshape(-1, flat.shape[-1]), fn, eps).view(*flat.shape[:-1], -1)
        mix = gemv.linear(flat, fn)  # (in a compiled decode step: one fused reduction)
    return mix * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def _stream_kernels(streams: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the mHC stream arithmetic runs as C passes here (module docstring)."""
    return HyperConnection.fused and HyperConnection.stream_kernels and cpu_kernels.mhc_applies(streams, *others)


def _collapse_applies(streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether a collapse that records gradients runs as one _Collapse (eager CPU; fp32 / fp64
    streams from COLLAPSE_MIN_ELEMENTS on, bf16 streams at any size)."""
    return (HyperConnection.collapse_function and torch.is_grad_enabled()
            and (streams.requires_grad or fn.requires_grad)
            and (streams.dtype == torch.bfloat16 or streams.numel() >= HyperConnection.COLLAPSE_MIN_ELEMENTS)
            and _stream_kernels(streams, fn, scale, base))


class _Collapse(torch.autograd.Function):
    """A whole collapse with autograd on the eager CPU path, as one Function:

        mix = (flat @ fn^T) * r,  r = rsqrt(mean(flat^2) + eps)     (flat = X [T, n*d])
        pre, *rest = weights(mix, scale, base)                       (mix_weights: pre, post, comb)
        x = sum_j pre_j X_j

    -> (x, *rest, streams). Composed of _MixRMS, the mix weights and _WeightedSum, the streams'
    gradient came in two [T, n, d] tensors (the weighted sum's and the mix's) that autograd then
    added, and the mix's took a separate pass for its RMS term. Here it is written once: one C
    pass forms pre_j g + coef X_j + g_mix r fn, plus the gradient of the last output -- the
    streams themselves, which the expand after the block reads through it -- and fn's gradient
    (cpu_kernels.collapse_mix_backward; where that does not apply, cpu_kernels.collapse_backward,
    a GEMM and an add). The forward's product and mean square are one pass too (mix_rms). The
    small graph of the mix weights (sigmoids, Sinkhorn: [T, 2n + n*n] numbers) runs without
    autograd in the forward and is recomputed with it in the backward, from the saved mix; the
    same arithmetic as the composed Functions, to rounding."""

    @staticmethod
    def forward(ctx, streams, fn, scale, base, weights, eps: float):
        x = streams.contiguous()
        flat = x.view(-1, x.shape[-2] * x.shape[-1])
        ctx.kernel = HyperConnection.mix_kernels and cpu_kernels.mix_applies(flat, fn)
        if ctx.kernel:  # the product and the mean square in one pass (kernels/mhc.h)
            raw, ss = cpu_kernels.mix_rms(flat, fn)
            r = torch.rsqrt(ss.unsqueeze(-1) / flat.shape[-1] + eps)
        else:
            wide = fp32_or_wider(flat)
            raw = wide @ fn.t()
            r = torch.rsqrt(torch.linalg.vector_norm(wide, dim=-1, keepdim=True).square() / flat.shape[-1] + eps)
        pre, *rest = weights((raw * r).view(*x.shape[:-2], -1), scale, base)
        ctx.weights = weights
        # an unused output (a hyper head's alias, an unread post / comb) gets None, not a zero
        # tensor of its size: the backward treats None as zero
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, fn, scale, base, raw, r, pre)
        # the streams themselves come back as the last output (an alias): the expand after the
        # block reads them through it, so their gradient from there reaches this backward, which
        # adds it in its own pass instead of autograd adding two [T, n, d] gradients
        return (cpu_kernels.weighted_sum(pre, x), *rest, streams)

    @staticmethod
    def backward(ctx, gx, *g_rest):
        *g_rest, g_streams = g_rest
        x, fn, scale, base, raw, r, pre = ctx.saved_tensors
        lead, width = x.shape[:-2], x.shape[-2] * x.shape[-1]
        gx = x.new_zeros(*lead, x.shape[-1]) if gx is None else gx
        g_pre = cpu_kernels.weighted_sum_backward(pre, x, gx, (True, False))[0]
        with torch.enable_grad():  # the mix weights' small graph, recomputed from the saved mix
            mix = (raw * r).view(*lead, -1).requires_grad_()
            leaves = (mix, scale.detach().requires_grad_(), base.detach().requires_grad_())
            pairs = [(o, g) for o, g in zip(ctx.weights(*leaves), (g_pre, *g_rest)) if g is not None]
            g_mix, g_scale, g_base = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                                         allow_unused=True)
        g_mix = g_mix.reshape(raw.shape)
        gr = g_mix * r
        coef = ((g_mix * raw).sum(-1) * r.squeeze(-1).pow(3) * (-1.0 / width)).view(lead)
        grad_x, grad_fn = _collapse_grads(ctx, pre, x, gx, coef, gr, fn, g_streams)
        return grad_x, grad_fn, g_scale, g_base, None, None


def _collapse_grads(ctx, pre, x, gx, coef, gr, fn, g_streams):
    """_Collapse's (d streams, d fn): pre_j gx + coef X_j + gr fn (+ g_streams) and gr^T X, one
    C pass where the mix kernels apply, else the C collapse pass, two GEMMs and an add."""
    need_x, need_fn = ctx.needs_input_grad[:2]
    if not (need_x or need_fn):
        return None, None
    width = x.shape[-2] * x.shape[-1]
    if ctx.kernel:
        return cpu_kernels.collapse_mix_backward(pre, x, gx, coef, gr.view(*coef.shape, -1), fn, g_streams,
                                                 (need_x, need_fn))
    grad_x = grad_fn = None
    if need_x:  # (bf16 streams: the sum in fp32, rounded to bf16 at the end)
        grad_x = fp32_or_wider(cpu_kernels.collapse_backward(pre, x, gx, coef))
        grad_x.view(-1, width).addmm_(gr, fn)
        if g_streams is not None:
            grad_x += g_streams
        grad_x = grad_x.to(x.dtype)
    if need_fn:
        grad_fn = _fn_grad(fp32_or_wider(x).view(-1, width), gr)
    return grad_x, grad_fn


def _fn_grad(flat: torch.Tensor, gr: torch.Tensor) -> torch.Tensor:
    """d fn = gr^T flat for flat [T, n*d], gr [T, M]: a product with a narrow output, whose speed
    in MKL depends on which operand it reads transposed. Measured on 2 cores, fp32, flat out of
    cache: for the sites' M = 2n + n*n = 24, (flat^T gr)^T is the faster at the speedrun's
    [1024, 768] (0.34 vs 0.45-0.50 ms) and within ~15% either way at `small`'s [2048, 2048]; for
    the hyper heads' M = n = 4 it is 1.8x slower at [1024, 768] and 4.5x at [2048, 2048] (10.9
    vs 2.4 ms), so those take gr^T flat."""
    return gr.t() @ flat if gr.shape[-1] <= 8 else (flat.t() @ gr).t()


def _weighted_sum(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_j w_j X_j: weights [...,n], streams [...,n,d] -> [...,d] in the streams' dtype (computed
    in fp32; the C passes read bf16 streams as they are)."""
    wide = streams if _stream_kernels(streams, weights) else fp32_or_wider(streams)
    with fp32_region(streams.device.type):
        if HyperConnection.fused and torch.is_grad_enabled() and (streams.requires_grad or weights.requires_grad):
            out = _WeightedSum.apply(weights, wide)  # no per-token GEMMs, no [.., n, d] temporary
        elif gemv.in_graph(streams.shape[:-2].numel(), weights, streams):  # compiled decode step
            out = (weights.unsqueeze(-1) * wide).sum(-2)
        elif _stream_kernels(wide, weights):
            out = cpu_kernels.weighted_sum(weights, wide)  # one C pass (eager CPU)
        else:  # inference: one small batched product per call (a decode step has few tokens)
            out = torch.matmul(weights.unsqueeze(-2).to(wide.dtype), wide).squeeze(-2)
    return out.to(streams.dtype)


class _WeightedSum(torch.autograd.Function):
    """out = sum_j w_j X_j as n multiply-adds into a [..., d] result; the backward writes grad X
    = w g once and takes grad w = <X_j, g> through the same buffer (one [..., n, d] allocation).
    On the eager CPU path each direction is one C pass instead (cpu_kernels.weighted_sum)."""

    @staticmethod
    def forward(ctx, weights, streams):
        ctx.save_for_backward(weights, streams)
        if _stream_kernels(streams, weights):
            return cpu_kernels.weighted_sum(weights, streams)
        out = streams[..., 0, :] * weights[..., 0:1]
        for j in range(1, streams.shape[-2]):
            out.addcmul_(streams[..., j, :], weights[..., j : j + 1])
        return out

    @staticmethod
    def backward(ctx, g):
        weights, streams = ctx.saved_tensors
        if _stream_kernels(streams, weights, g):
            return cpu_kernels.weighted_sum_backward(weights, streams, g, ctx.needs_input_grad[:2])
        buf = torch.empty_like(streams)
        grad_w = torch.mul(streams, g.unsqueeze(-2), out=buf).sum(-1) if ctx.needs_input_grad[0] else None
        grad_x = torch.mul(weights.unsqueeze(-1), g.unsqueeze(-2), out=buf) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x


class _MixRMS(torch.autograd.Function):
    """mix = (flat @ fn^T) * r, r = rsqrt(mean(flat^2) + eps), for flat [T, n*d], fn [M, n*d].

    Backward: d mix / d flat = g r fn + flat * (-r^3 / (n d)) sum_m g_m raw_m, i.e. one addmm
    over the wide input; the mean square is one norm pass (no squared copy saved)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
        raw = flat @ fn.t()
        r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1] + eps)
        ctx.save_for_backward(flat, fn, raw, r)
        return raw * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        flat, fn, raw, r = ctx.saved_tensors
        gr = g * r
        coef = (g * raw).sum(-1, keepdim=True) * r.pow(3) * (-1.0 / flat.shape[-1])
        grad_flat = (flat * coef).addmm_(gr, fn) if ctx.needs_input_grad[0] else None
        grad_fn = _fn_grad(flat, gr) if ctx.needs_input_grad[1] else None
        return grad_flat, grad_fn, None


class _StreamMix(torch.autograd.Function):
    """out[..., k, :] = post_k * y + sum_j comb[j, k] X_j.

    y [...,d], X [...,n,d], post [...,n], comb [...,n,n]. The stream mix is comb^T @ X per token
    (a batched matmul whose inner dimension is n = 4) plus one broadcast multiply-add; the
    backward is grad X = comb @ g, grad comb = X @ g^T (inner dimension d: per-token GEMMs that
    run near memory speed, 3x faster here than n broadcast passes over [..., n, d]), grad y =
    post @ g, and grad post = <g_k, y> over d. (Measured on [4, 512, 4, 512] fp32, 2 cores:
    backward 8.5 -> 4.0 ms, forward 2.0 -> 1.7 ms.) On the eager CPU path each direction is one C
    pass over the streams instead (cpu_kernels.stream_mix: all four gradients from one read of
    g and X per token)."""

    @staticmethod
    def forward(ctx, y, streams, post, comb):
        """y and streams in the streams' dtype, post and comb in fp32 (fp64 for fp64 streams)."""
        ctx.save_for_backward(y, streams, post, comb)
        if _stream_kernels(streams, y, post, comb):
            return cpu_kernels.stream_mix(y, streams, post, comb)
        y_, x_ = fp32_or_wider(y), fp32_or_wider(streams)   # (bf16 streams: computed in fp32)
        return torch.matmul(comb.transpose(-1, -2), x_).addcmul_(post.unsqueeze(-1), y_.unsqueeze(-2)).to(streams.dtype)

    @staticmethod
    def backward(ctx, g):
        y, streams, post, comb = ctx.saved_tensors
        if _stream_kernels(streams, y, post, comb, g):
            return cpu_kernels.stream_mix_backward(y, streams, post, comb, g, ctx.needs_input_grad)
        g, y_, x_ = fp32_or_wider(g), fp32_or_wider(y), fp32_or_wider(streams)
        grad_y = grad_x = grad_post = grad_comb = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.matmul(post.unsqueeze(-2), g).squeeze(-2).to(y.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = torch.matmul(comb, g).to(streams.dtype)
        if ctx.needs_input_grad[2]:  # (a matmul with a 1-column right side is slower than this)
            grad_post = (g * y_.unsqueeze(-2)).sum(-1)
        if ctx.needs_input_grad[3]:
            grad_comb = torch.matmul(x_, g.transpose(-1, -2))
        return grad_y, grad_x, grad_post, grad_comb
