"""Cross-entropy over the LM head without materialising the [tokens, vocab] logits twice.

    loss = linear_cross_entropy(h [N, D], weight [V, D], labels [N], ignore_index=-100)
         == F.cross_entropy(h @ weight.T (in fp32), labels, ignore_index=ignore_index)

Why: the plain path keeps fp32 logits, their log-softmax and, in the backward, a zero-filled
gradient of the same size (three [N, V] tensors: 200 MB at 4 x 512 tokens and a 8K vocabulary,
and about as long as the head's own matmuls on a CPU). Here the tokens are processed in chunks
that stay in cache: each chunk's logits, log-normaliser and gradient (softmax - one-hot, the
standard CE derivative) are computed together in the forward, and the backward only scales the
saved input/weight gradients by the incoming gradient. No [N, V] tensor outlives its chunk.
(The same idea as the "fused linear cross-entropy" kernels of Liger and Apple's CCE, in plain
PyTorch ops.) On the eager CPU path the per-chunk softmax, target and gradient -- nine passes over
the chunk in PyTorch, two of them casts under bf16 autocast -- are one C call
(cpu_kernels.cross_entropy_rows, kernels/ce.h); `_chunk`'s PyTorch ops are the reference.

`F.cross_entropy`'s semantics are kept: the mean over non-ignored labels (NaN when there are
none), fp32 log-softmax whatever the matmul dtype. Under autocast the caller casts h / weight
(see Transformer.loss); the tests compare this against F.cross_entropy and its gradients.
"""

from __future__ import annotations

import torch

from . import cpu_kernels

# rows per chunk: ~16 MB of fp32 logits, which stay in L3 while the chunk's products run as
# GEMMs big enough to be efficient (512 rows at an 8K vocab: fp32 forward + backward of the
# `small` head at 4 x 512 tokens 360 -> 316 ms vs 128-row chunks, bf16 177 -> 161 ms)
_CHUNK_ELEMENTS = 1 << 22

# each chunk's softmax / target / gradient as one C call where it applies (False: `_chunk`'s
# PyTorch ops everywhere; a benchmark switch, benchmarks/profile_model.py --switch loss.use_kernel)
use_kernel = True


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = h.shape[0], weight.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // v)
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for s in range(0, n, chunk):
            hc, lab, ok = h[s : s + chunk], safe[s : s + chunk], valid[s : s + chunk]
            logits = hc @ weight.t()
            loss_sum, g = _chunk(logits, lab, ok, want_h or want_w, h.dtype)
            total += loss_sum
            if want_h:
                torch.mm(g, weight, out=grad_h[s : s + chunk])
            if want_w:
                grad_w.addmm_(g.t(), hc)
        count = valid.sum()
        ctx.save_for_backward(grad_h, grad_w, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * scale.to(grad_w.dtype) if grad_w is not None else None, None, None)


def _chunk(logits: torch.Tensor, lab: torch.Tensor, ok: torch.Tensor, want_grad: bool, dtype: torch.dtype):
    """One chunk's summed CE (fp32) and, with want_grad, d(sum of CE)/d logits in `dtype`
    (softmax - one-hot, zero on ignored rows): on the eager CPU path one C call over the logits
    (cpu_kernels.cross_entropy_rows, which writes the gradient in place), else the PyTorch ops."""
    # (fp64 logits, a float64 model's, take the PyTorch path: it rounds them to fp32 like every
    # other dtype, which the kernel would not)
    if use_kernel and logits.dtype == dtype != torch.float64 and cpu_kernels.ce_applies(logits):
        lse, target = cpu_kernels.cross_entropy_rows(logits, lab, ok, grad=want_grad)
        return ((lse - target) * ok).sum(), logits
    logits = logits.float()
    target = logits.gather(1, lab.unsqueeze(1)).squeeze(1)
    # log-sum-exp by hand, in place: exp(logits - max) is computed once and serves both the
    # normaliser and the gradient (torch.logsumexp would allocate its own [rows, vocab]
    # temporaries, and the softmax would need a second exp pass)
    mx = logits.amax(dim=-1, keepdim=True)
    p = logits.sub_(mx).exp_()
    z = p.sum(dim=-1)
    lse = z.log() + mx.squeeze(1)
    loss_sum = ((lse - target) * ok).sum()
    if not want_grad:
        return loss_sum, None
    g = p.div_(z.unsqueeze(1))
    g.scatter_add_(1, lab.unsqueeze(1), torch.full_like(target, -1.0).unsqueeze(1))
    if not bool(ok.all()):
        g.mul_(ok.unsqueeze(1))
    return loss_sum, g.to(dtype)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean CE of logits h @ weight.T (fp32) against labels; h [..., D], labels [...]."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index)
