"""DeepSeek-V4 mixture of experts: sqrt-softplus router with aux-loss-free bias, hash routing.

Spec 1.6; V4 report section 2.1; DeepSeek-V3 (arXiv:2412.19437) section 2.1.2 for balancing.

    s   = sqrt(softplus(x W_g^T))                       fp32 affinity per expert
    idx = topk(s + b)           (learned routing)       b: balancing bias, NOT trained by gradients
    idx = tid2eid[token_id]     (hash layers)           a fixed, balanced token -> experts table
    w   = s[idx] / sum(s[idx]) * route_scale
    y   = sum_k w_k E_k(x) + Shared(x),   E(x) = W2( silu(min(W1 x, L)) * clamp(W3 x, -L, L) )

Balancing without an auxiliary loss: after each optimizer step the trainer calls
`update_bias(load)` which moves b_i by `speed * sign(mean_load - load_i)` (under-loaded experts
become more attractive). A small sequence-wise balance loss alpha * sum_i f_i P_i is available
through the forward context (spec 1.6).

Experts are stored stacked ([E, out, in]) so they can be computed as a grouped matmul: the
token->expert assignments are sorted by expert once, each expert multiplies one contiguous slice
(a loop over experts, never over tokens), and results are scattered back with index_add.
On disk each expert is still `experts.{i}.w1/w2/w3` (see checkpoint.py). In training the grouped
pass is one autograd Function (`_GroupedExperts`: one cast per stacked matrix, products into
preallocated buffers, stacked weight gradients written in place, and under bf16 on a CPU each
expert's rows padded to a multiple of 32, as oneDNN builds a kernel per new matmul shape;
`per_expert` is the loop it replaces). On the eager CPU path the clamped SwiGLU between the products is one C call each way
(`_SwiGLU`, cpu_kernels.py); `swiglu`'s PyTorch formula is the reference the tests compare it
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HASH_MOE, ModelConfig
from . import cpu_kernels
from .context import ForwardContext
from .gemv import Linear, linear
from .grouped_mm import mm_many
from .precision import fp32_region


def balanced_hash_table(vocab_size: int, n_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """tid2eid [vocab, k]: k distinct experts per token, every expert used equally often.

    Tokens are visited in a seeded random order; the r-th token gets experts
    (r*k + j) mod E for j < k, so expert loads over the vocabulary differ by at most one and
    neighbouring token ids do not share experts systematically."""
    if top_k > n_experts:
        raise ValueError("top_k > n_experts")
    g = torch.Generator().manual_seed(seed)
    rank = torch.empty(vocab_size, dtype=torch.long)
    rank[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size)
    return (rank.unsqueeze(1) * top_k + torch.arange(top_k)) % n_experts


def score_fn(logits: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if kind == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, is_hash: bool):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.scoring, self.route_scale, self.is_hash = config.scoring_func, config.routed_scaling_factor, is_hash
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if is_hash:
            self.register_buffer("tid2eid", balanced_hash_table(config.vocab_size, self.n_experts, self.top_k))
            self.bias = None
        else:
            # the aux-loss-free balancing bias: a buffer, so no optimizer ever touches it
            self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None):
        """x [N, D] -> (weights [N,k] fp32, indices [N,k], scores [N,E] fp32)."""
        with fp32_region(x.device.type):
            scores = score_fn(linear(x.float(), self.weight.float()), self.scoring)
        if self.is_hash:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the input token ids")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            idx = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.scoring != "softmax":
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.route_scale, idx, scores


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, bias=False)
        self.w2 = Linear(inter, dim, bias=False)
        self.w3 = Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, L)) * clamp(up, -L, L) (no clamps for L <= 0). On the eager CPU path one C
    call each way (cpu_kernels; `_SwiGLU`); below, the PyTorch reference."""
    if cpu_kernels.swiglu_applies(gate, up):
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return _SwiGLU.apply(gate, up, limit)
        return cpu_kernels.swiglu(gate, up, limit)
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """swiglu through cpu_kernels: the forward saves its two inputs, the backward recomputes
    the activation from them in the same pass that forms both gradients."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.limit = limit
        return cpu_kernels.swiglu(gate, up, limit)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return *cpu_kernels.swiglu_backward(gate, up, grad, ctx.limit), None


class Experts(nn.Module):
    """E routed experts as stacked weights w1/w3 [E, I, D], w2 [E, D, I]."""

    fused = True  # the grouped pass (training, prefill) as one autograd Function (_GroupedExperts); False: per_expert
    bucket_rows = True  # in it, bf16/fp16 on a CPU: rows padded to _GroupedExperts.row_bucket (see there)

    def __init__(self, n: int, dim: int, inter: int, limit: float):
        super().__init__()
        self.n, self.limit = n, limit
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and idx.numel() <= self.gather_max:
            return self.gathered(x, idx, weights)
        return self.grouped(x, idx, weights)

    # Under torch.compile, a decode step (a few tokens) takes a static-shape path: each token's k
    # expert matrices are gathered and applied as batched matmuls, so the whole block stays one
    # graph. Past `gather_max` token-expert pairs, copying N*k weight matrices costs more than
    # the grouped pass reads, and the grouped pass runs eagerly (its shapes depend on the data;
    # Transformer.compile_blocks calls it between two graphs in training).
    gather_max = 16
    # Without gradients, the grouped Function from this many token-expert pairs on (a prefill,
    # where its grouped GEMMs pay: grouped_mm); fewer (an eager decode step) take the per-expert
    # loop, whose set-up is cheaper (the Function measured 0.93x on an eager `small` step)
    grouped_min_pairs = 64

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Static shapes: sum_k w_k E_{idx_k}(x) with the chosen experts' weights gathered."""
        n_tok, k = idx.shape
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N*k, D, 1]
        h = swiglu(torch.bmm(self.w1[flat], xs), torch.bmm(self.w3[flat], xs), self.limit)
        ys = torch.bmm(self.w2[flat], h).squeeze(-1) * weights.reshape(-1, 1).to(x.dtype)
        return ys.view(n_tok, k, -1).sum(dim=1)

    # the grouped pass has data-dependent shapes (tokens per expert): it stays out of compiled
    # graphs (one graph break per MoE layer) instead of recompiling for every routing pattern
    @torch.compiler.disable
    def grouped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, one matmul per expert over its contiguous slice."""
        n_tok, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.n).tolist()
        # tokens sorted by expert: each expert reads one contiguous slice (index_select, not
        # x[token]: its backward is one index_add instead of an accumulating index_put, ~5%
        # of the layer's forward + backward)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.w1, self.w2, self.w3))
        if Experts.fused and (recording or flat.numel() >= Experts.grouped_min_pairs):
            # (the Function gathers the rows itself: after its cast, into its padded layout; with
            # no gradient to record -- a prefill -- it is the same grouped forward, nothing kept)
            ys = _GroupedExperts.apply(x, self.w1, self.w2, self.w3, counts, self.limit, token)
        else:
            ys = per_expert(x.index_select(0, token), self.w1, self.w2, self.w3, counts, self.limit)
        ys = ys * weights.reshape(-1)[order].unsqueeze(1).to(ys.dtype)
        return torch.zeros(n_tok, x.shape[1], dtype=ys.dtype, device=x.device).index_add_(0, token, ys)


def per_expert(xs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int],
               limit: float) -> torch.Tensor:
    """Expert-sorted tokens xs [M, D] -> [M, D], one F.linear per expert and matrix: the plain
    path (`Experts.fused = False`), which _GroupedExperts is tested against."""
    outs = []
    # unbind / split once: indexing w[e] or slicing xs per expert would make autograd build a
    # full-size zero gradient for every expert (O(E^2) memory traffic); the backward of
    # unbind is one stack and that of split one cat
    w1, w2, w3 = w1.unbind(0), w2.unbind(0), w3.unbind(0)
    for e, xe in enumerate(xs.split(counts)):
        if xe.shape[0] == 0:
            continue
        h = swiglu(F.linear(xe, w1[e]), F.linear(xe, w3[e]), limit)
        outs.append(F.linear(h, w2[e]))
    return torch.cat(outs) if outs else xs


class _GroupedExperts(torch.autograd.Function):
    """The routed experts over expert-sorted tokens, with autograd, as one Function.

        xs [M, D] (the rows of expert e are the e-th slice of `counts`) -> ys [M, D],
        ys_e = swiglu(xs_e W1_e^T, xs_e W3_e^T) W2_e^T

    Built from per-expert F.linear calls, a step recorded ~10 autograd nodes per expert and
    layer, autocast cast every expert's three matrices separately (and kept the copies), and the
    weight gradients came back per expert and were stacked by unbind's backward (an [E, out, in]
    copy per matrix). Here the stacked weights are cast once (to the autocast dtype, if any),
    each product writes into one preallocated buffer (the outputs, the gate and up activations,
    and in the backward the input gradient and the stacked weight gradients, cast back once), and
    the backward forms the SwiGLU's gradients from the saved gate and up activations and W2's
    from the saved SwiGLU output; the SwiGLU runs once over all experts' rows each way (one C
    pass). The arithmetic is the per-expert code's, product by product."""

    # Row buckets: oneDNN, which runs bf16/fp16 matmuls on a CPU, builds a kernel for every new
    # shape (~0.6 ms on this kind of machine) and keeps the last 1024. The experts' row counts
    # change every step, so unpadded, a step met hundreds of new shapes (nine products per expert
    # and layer): bf16 steps settled slowly and never fully. Each expert's rows are therefore
    # padded with zero rows to a multiple of `row_bucket`: a zero row's gate, up and SwiGLU are
    # zero, so it adds exactly zero to every weight gradient (its output gradient is set to zero
    # as well, so nothing non-finite can enter), and its output is dropped.
    # fp32 (MKL) and GPUs build nothing per shape and keep the exact row counts.
    row_bucket = 32

    @staticmethod
    def bucket(x: torch.Tensor) -> int:
        """Row multiple each expert's slice is padded to for products in x's dtype and device."""
        reduced = x.dtype in (torch.bfloat16, torch.float16)
        on = Experts.bucket_rows and reduced and x.device.type == "cpu"
        return _GroupedExperts.row_bucket if on else 1

    @staticmethod
    def forward(ctx, xs, w1, w2, w3, counts: list[int], limit: float, token: torch.Tensor | None = None):
        """xs: the expert-sorted rows, or with `token` the tokens' rows [N, D], row i of the
        sorted order being xs[token[i]]: then they are cast before the gather (N rows, not N * k)
        and gathered straight into the padded layout."""
        dev = xs.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs.dtype
        with fp32_region(dev):  # (autocast off: the casts are explicit, once per matrix stack)
            x, w1c, w2c, w3c = (t.to(dtype) for t in (xs, w1, w2, w3))
            sorted_rows = len(token) if token is not None else x.shape[0]
            rows, counts = _bucketed(counts, _GroupedExperts.bucket(x), x.device)
            gather, pad = _gather_index(token, rows, sum(counts), sorted_rows, x.device)
            if gather is not None:
                x = x.index_select(0, gather)
            if pad is not None:  # expert slices padded with zero rows
                x.index_fill_(0, pad, 0)
            m, inter = x.shape[0], w1.shape[1]
            gate, up = x.new_empty(m, inter), x.new_empty(m, inter)
            ys = x.new_empty(m, w2.shape[1])
            # every expert's products as one grouped GEMM (grouped_mm: MKL's batch call in fp32)
            sl = list(_slices(counts))
            mm_many([(x[a:b], w.t(), out[a:b]) for e, (a, b) in sl for w, out in ((w1c[e], gate), (w3c[e], up))])
            # elementwise: one call over every expert's rows (the slices tile the buffers) instead
            # of one per expert and layer, each with its checks and views
            act = swiglu(gate, up, limit)
            mm_many([(act[a:b], w2c[e].t(), ys[a:b]) for e, (a, b) in sl])
        # the activation is kept (one more [rows, inter] tensor) for W2's gradient: recomputing
        # it in the backward cost a SwiGLU pass
        ctx.save_for_backward(x, w1c, w2c, w3c, gate, up, act, rows, gather, pad)
        ctx.counts, ctx.limit, ctx.param_dtypes = counts, limit, (w1.dtype, w2.dtype, w3.dtype)
        ctx.x_shape, ctx.x_dtype = xs.shape, xs.dtype
        return ys if rows is None else ys.index_select(0, rows)

    @staticmethod
    def backward(ctx, gy):
        x, w1c, w2c, w3c, gate, up, act, rows, gather, pad = ctx.saved_tensors
        need_x, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:4]
        with fp32_region(x.device.type):
            gy = gy.to(x.dtype)
            if rows is not None:  # the padded rows' gradients are exact zeros
                gy = gy.new_zeros(x.shape[0], gy.shape[1]).index_copy_(0, rows, gy)
            gx = torch.empty_like(x) if need_x else None
            gw = [torch.empty_like(w) if need else None for w, need in ((w1c, need_w1), (w2c, need_w2), (w3c, need_w3))]
            idle = [e for e, c in enumerate(ctx.counts) if c == 0]  # experts without tokens: zero gradients
            for g in gw:
                if g is not None and idle:
                    g[idle] = 0
            d_act = gy.new_empty(gate.shape)
            sl = list(_slices(ctx.counts))
            # each list holds independent products: grouped_mm runs it as one grouped GEMM
            products = [(gy[a:b], w2c[e], d_act[a:b]) for e, (a, b) in sl]
            if gw[1] is not None:
                products += [(gy[a:b].t(), act[a:b], gw[1][e]) for e, (a, b) in sl]
            mm_many(products)
            d_gate, d_up = swiglu_backward(gate, up, d_act, ctx.limit)   # (one call, as the forward's)
            products = [(d[a:b].t(), x[a:b], g[e]) for d, g in ((d_gate, gw[0]), (d_up, gw[2])) if g is not None
                        for e, (a, b) in sl]
            if gx is not None:
                products += [(d_gate[a:b], w1c[e], gx[a:b]) for e, (a, b) in sl]
            mm_many(products)
            if gx is not None:  # gx = d_gate W1 + d_up W3, the second product added as before
                mm_many([(d_up[a:b], w3c[e], gx[a:b]) for e, (a, b) in sl], accumulate=True)
        grads = [None if g is None else g.to(dt) for g, dt in zip(gw, ctx.param_dtypes)]
        return _input_grad(gx, rows, gather, pad, ctx.x_shape, ctx.x_dtype), *grads, None, None, None


def _gather_index(token: torch.Tensor | None, rows: torch.Tensor | None, padded: int, n_sorted: int, device):
    """(gather, pad): the row of the input each padded-layout row reads (None: the input as it
    is) and the padded layout's filler rows (None: none), which read row 0 and are then zeroed."""
    if rows is None:
        return token, None
    src = token if token is not None else torch.arange(n_sorted, device=device)
    gather = torch.zeros(padded, dtype=torch.long, device=device).index_copy_(0, rows, src)
    filler = torch.ones(padded, dtype=torch.bool, device=device).index_fill_(0, rows, False)
    return gather, filler.nonzero().squeeze(1)


def _input_grad(gx, rows, gather, pad, x_shape, x_dtype):
    """The gradient of _GroupedExperts' input from that of its padded-layout rows gx: the filler
    rows' (exact zeros, set so whatever the weights hold) dropped, the gathered rows added back
    to the rows they read, in the input's dtype."""
    if gx is None:
        return None
    if gather is None:   # the sorted rows themselves, unpadded
        return gx.to(x_dtype)
    if pad is not None:
        gx.index_fill_(0, pad, 0)
    return gx.new_zeros(x_shape, dtype=x_dtype).index_add_(0, gather, gx.to(x_dtype))


def _bucketed(counts: list[int], bucket: int, device) -> tuple[torch.Tensor | None, list[int]]:
    """(row of each expert-sorted row in the padded layout, padded counts); (None, counts)
    where nothing is padded."""
    padded = [-(-c // bucket) * bucket for c in counts]
    if padded == counts:
        return None, counts
    # sorted row i of expert e moves by (padded start of e) - (start of e)
    shift, start, start_p = [], 0, 0
    for c, p in zip(counts, padded):
        shift.append(start_p - start)
        start, start_p = start + c, start_p + p
    shift = torch.tensor(shift, device=device).repeat_interleave(torch.tensor(counts, device=device))
    return torch.arange(sum(counts), device=device) + shift, padded


def _slices(counts: list[int]):
    """(expert, (start, end)) of each expert with rows, in the expert-sorted order."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, (start, start + c)
        start += c


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, limit: float):
    """(d gate, d up) of sum(grad * swiglu(gate, up, limit)): one C pass where it applies, else
    autograd through the PyTorch formula."""
    if cpu_kernels.swiglu_applies(gate, up):
        return cpu_kernels.swiglu_backward(gate, up, grad, limit)
    with torch.enable_grad():
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        return torch.autograd.grad(swiglu(g, u, limit), (g, u), grad)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, mlp_type: str):
        super().__init__()
        self.is_hash = mlp_type == HASH_MOE
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.gate = Gate(config, self.is_hash)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                               config.swiglu_limit)
        self.shared_experts = SharedExpert(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit)
        # expert load observed since the last bias update (tokens routed to each expert)
        self.register_buffer("load", torch.zeros(config.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        flat, w, idx = self.route(x, ctx)
        return self.combine(x, flat, self.experts(flat, idx, w))

    # route -> experts -> combine: the block calls the three separately under regional torch.compile
    # (Transformer.compile_blocks), so the data-dependent grouped expert pass sits between two graphs
    def route(self, x: torch.Tensor, ctx: ForwardContext):
        """x [B,S,D] -> (flat [N,D], weights [N,k], expert ids [N,k]); counts load, records balance."""
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        w, idx, scores = self.gate(flat, ctx.input_ids)
        if self.training and not self.is_hash:
            # a scatter into the fixed-size counter (bincount's output size is data-dependent
            # to torch.compile; counts are exact in fp32 either way); padding counts 0
            flat_idx = idx.reshape(-1)
            if ctx.token_mask is None:
                count = torch.ones_like(flat_idx, dtype=self.load.dtype)
            else:
                count = ctx.token_mask.reshape(-1, 1).expand(-1, idx.shape[-1]).reshape(-1).to(self.load.dtype)
            self.load.index_add_(0, flat_idx, count)
        if ctx.collect_balance and not self.is_hash:
            ctx.aux.balance.append(sequence_balance_loss(idx.view(b, s, -1), scores.view(b, s, -1), ctx.token_mask))
        return flat, w, idx

    def combine(self, x: torch.Tensor, flat: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Routed output + shared expert, back to x's shape [B,S,D]."""
        return (routed.to(x.dtype) + self.shared_experts(flat)).view(x.shape)

    @torch.no_grad()
    def update_bias(self, speed: float, load: torch.Tensor | None = None) -> None:
        """b_i += speed * sign(mean(load) - load_i); resets the accumulated load."""
        if self.is_hash:
            return
        load = self.load if load is None else load
        if float(load.sum()) > 0:
            self.gate.bias += speed * torch.sign(load.mean() - load)
        self.load.zero_()


def sequence_balance_loss(idx: torch.Tensor, scores: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i f_i P_i per sequence, averaged over the batch (the caller multiplies by alpha).

    idx [B,S,k] selected experts, scores [B,S,E] affinities, token_mask [B,S] the real tokens
    (None: all). Over the n real tokens of a sequence:
    f_i = E/(k*n) * #tokens routed to i;  P_i = mean_t s_{i,t} / sum_j s_{j,t}."""
    b, s, k = idx.shape
    e = scores.shape[-1]
    w = torch.ones(b, s, device=idx.device) if token_mask is None else token_mask.to(torch.float32)
    n = w.sum(1, keepdim=True).clamp(min=1)
    counts = torch.zeros(b, e, device=idx.device, dtype=torch.float32).scatter_add_(
        1, idx.reshape(b, -1), w.unsqueeze(-1).expand(b, s, k).reshape(b, -1)
    )
    f = counts * (e / (k * n))
    p = ((scores / scores.sum(-1, keepdim=True)) * w.unsqueeze(-1)).sum(dim=1) / n
    return (f * p).sum(-1).mean()
