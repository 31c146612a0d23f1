"""Lightning indexer of CSA: scores compressed entries per query, deterministic top-k, KL loss.

Spec 1.5; V4 report eqs. 13-17; DeepSeek-V3.2 DSA training recipe for the loss.

    q^I[t,h] = RoPE(c_t W_Iq)                      (c = the normalised query latent of attention)
    K^I[s]   = overlapping compressor at index_head_dim over the same windows as CSA
    w[t,h]   = (x_t W_w) / sqrt(n_heads)
    I[t,s]   = sum_h w[t,h] * ReLU(q^I[t,h] . K^I[s]) / sqrt(index_head_dim)

Each query keeps the `index_topk` highest-scoring *complete* entries. Ties are broken toward the
most recent entry (`select_topk`: what a stable sort over the reversed entry axis picks), so a
cached decode, which scores one query at a time, selects exactly what the full forward selects;
about a quarter of the scores are exactly 0 at random init because of the ReLU, so ties are
common.

Training (the part transformers leaves out): the indexer's inputs are detached and it is trained
by `indexer_kl`, KL(p || softmax(I)) where p is the main attention's probability mass on the
compressed entries, summed over heads and L1-normalised (detached target). In the dense warm-up
phase p covers all complete entries; in the sparse phase only the selected ones.
(The Hadamard rotation and FP4 fake-quantisation of the reference are QAT details; in full
precision the rotation is exactly orthogonal and cancels in q.k, so it is omitted.)
"""

from __future__ import annotations

import torch
from torch import nn

from .compressor import Compressor
from .gemv import Linear
from .rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rate: int,
                 rope_dim: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.wq_b = Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = Linear(hidden_size, n_heads, bias=False)
        self.compressor = Compressor(hidden_size, head_dim, rate, overlap=True, rope_dim=rope_dim, eps=eps)

    def scores(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, S, N] in fp32 for queries (x, qr) against entry keys [B, N, dI]."""
        b, s, _ = x.shape
        q = apply_rope(self.wq_b(qr).view(b, s, self.n_heads, self.head_dim), cos, sin)
        dots = torch.matmul(q.float().flatten(1, 2), keys.float().transpose(1, 2))  # [B, S*H, N]
        # ReLU in place and both scales on the head weights [B, S, H] rather than on the [B, S, H, N]
        # products: an 8K-token prefill's [1, 32768, 2048] products are 268 MB a CSA layer
        dots = dots.relu_().unflatten(1, (s, self.n_heads))
        w = self.weights_proj(x).float() * (self.n_heads * self.head_dim) ** -0.5  # [B, S, H]
        return torch.einsum("bshn,bsh->bsn", dots, w)


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean selection mask [B, S, N]: the k best visible entries per query.

    Ties go to the most recent entry. When a query sees at most k entries, all are selected
    (no selection needed). A NaN score counts as +inf (where a descending sort puts it)."""
    if scores.shape[-1] <= k:
        return visible
    picked, valid = topk_indices(scores, visible, k)
    return torch.zeros_like(visible).scatter_(-1, picked, valid)


def topk_indices(scores: torch.Tensor, visible: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(picked [..., k] int64, valid [..., k] bool): the entries `select_topk` selects, as indices
    in no particular order, and whether each is visible (a query that sees fewer than k entries
    also gets invisible ones, marked False). Needs N >= k entries.

    One `topk` of k + 1 over the scores: where the k-th and (k+1)-th differ, the k best are the
    same whatever the tie rule. The rows where they are equal (a tie across the cut: zero scores
    are common, from the ReLU) are selected again with the rule (`unique_key_topk`), as is every
    row inside a compiled graph (no data-dependent branch there). A stable sort of each whole
    row did the same in O(N log N); against it (`python benchmarks/bench_indexer.py`, 2 cores): a
    decode step over 16K entries (a 64K-token context), k = 512: 0.81 -> 0.12 ms a CSA layer;
    2,048 prefill queries over 4K entries, k = 512: 229 -> 86 ms; `small`'s 8K prefill, k = 32:
    373 -> 113 ms; `small`'s training step, [4, 512, 128]: 3.4 ms either way."""
    n = scores.shape[-1]
    inf = float("inf")
    masked = scores.float().masked_fill(~visible, -inf).nan_to_num_(nan=inf, posinf=inf, neginf=-inf)
    if n == k or torch.compiler.is_compiling():
        picked = unique_key_topk(masked, k)
    else:
        top, picked = masked.topk(k + 1, dim=-1)
        cut = top[..., k - 1]
        tied = (cut == top[..., k]) & (cut > -inf)   # (below -inf: only invisible entries are tied)
        picked = picked[..., :k]
        if tied.any():
            rows = tied.nonzero(as_tuple=True)
            picked = picked.clone()
            picked[rows] = unique_key_topk(masked[rows], k)
    return picked, visible.gather(-1, picked)


def unique_key_topk(masked: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k best of `masked` (fp32, no NaN) under the tie rule (equal scores:
    the latest entry first): one `topk` over int64 keys no two entries share, each score's bits
    mapped to an integer of the same order in the high half, its index in the low half."""
    bits = masked.view(torch.int32)
    # a negative float's bits, read as an int, are the sign bit + its magnitude: -magnitude
    # orders it (and makes -0.0 equal +0.0, as float comparison does: zero scores are common)
    order = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    key = torch.add(torch.arange(masked.shape[-1], device=masked.device), order.to(torch.int64), alpha=1 << 32)
    return key.topk(k, dim=-1, sorted=False).indices


def indexer_kl(index_scores: torch.Tensor, attn_probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) over the allowed entries, averaged over queries that have any.

    index_scores [B,S,N] (with grad); attn_probs [B,S,H,N] (detached); allowed [B,S,N] bool."""
    p = attn_probs.detach().float().sum(dim=2).masked_fill(~allowed, 0.0)
    total = p.sum(-1, keepdim=True)
    has = (allowed.any(-1)) & (total[..., 0] > 0)
    p = p / total.clamp_min(1e-30)
    logq = torch.log_softmax(index_scores.float().masked_fill(~allowed, float("-inf")), dim=-1)
    logq = logq.masked_fill(~allowed, 0.0)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - logq)).masked_fill(~allowed, 0.0).sum(-1)
    # a masked mean (0 when no query has entries) instead of kl[has].mean(): no data-dependent
    # shape or branch, so torch.compile keeps it in the graph
    return kl.masked_fill(~has, 0.0).sum() / has.sum().clamp(min=1)


@torch.no_grad()
def indexer_recall(raw_logits: torch.Tensor, visible: torch.Tensor, picked: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the true top-k entries (by the main attention's head-summed probability over all
    visible entries) that the indexer picked, averaged over queries that see any entry; a query
    that sees at most k entries has recall 1. raw_logits [B,S,H,N] (scaled q.k, no mask)."""
    p = torch.softmax(raw_logits.masked_fill(~visible.unsqueeze(2), float("-inf")), dim=-1)
    mass = torch.nan_to_num(p).sum(dim=2).masked_fill(~visible, -1.0)  # [B,S,N]
    has = visible.any(-1)
    kk = min(k, mass.shape[-1])
    if kk == 0:
        return raw_logits.new_ones(())
    top = torch.zeros_like(visible).scatter_(-1, mass.topk(kk, dim=-1).indices, True) & visible
    recall = (top & picked).sum(-1).float() / top.sum(-1).clamp(min=1)
    # masked mean, 1 when no query sees an entry (no data-dependent branch: see indexer_kl)
    n_has = has.sum()
    return torch.where(n_has > 0, recall.masked_fill(~has, 0.0).sum() / n_has.clamp(min=1), 1.0)
