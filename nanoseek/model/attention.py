"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries, with sinks.

Spec 1.3-1.5; V4 report section 2.3.

    c  = RMSNorm(x W_qa)                     query latent (also feeds the lightning indexer)
    q  = RoPE(rmsnorm_per_head(c W_qb))      [B,S,H,D], RoPE on the last rd channels
    kv = RoPE(RMSNorm(x W_kv))               [B,S,D], ONE vector per token, used as key and value
    keys(t) = window {t-W+1..t}  U  compressed entries: all complete ones (HCA, or CSA in the
              dense warm-up) or the indexer's top-k of the complete ones (CSA)
    p = softmax over keys(t) with a learnable per-head sink logit in the denominator
    o = RoPE^{-1}_t( sum p * kv )            inverse rotation at the query position
    y = W_ob [ W_oa[g] o_g ]_g               grouped low-rank output projection

Implementation notes (why it looks like this):
* MQA with K == V lets every head share one key matrix, so heads fold into the matmul's row
  dimension ([B, S*H, D] @ [B, D, keys]) instead of materialising per-head keys.
* The window part is computed blockwise: queries in blocks of W attend to a 2W key span (the
  previous block and their own), so cost is O(S*W) rather than O(S^2). The same code serves
  training (the span before position 0 is masked) and cached prefill (the span before the chunk
  is the ring buffer, reordered chronologically).
* The window and compressed parts are two partial softmaxes sharing one log-normaliser (with
  the sink), so nothing is concatenated along the key axis.
* CSA top-k is applied as a mask over all compressed entries (dense scores, exact) where that is
  the faster choice: training, and contexts of up to a few times k entries. Past that, without
  autograd (prefill, decode, scoring), each query's k entries are gathered instead
  (`Attention._attend_sparse`), so the attention's cost per query stops growing with the context.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CSA, HCA, ModelConfig
from . import cpu_kernels
from .cache import LayerCache
from .compressor import Compressor
from .context import ForwardContext
from .gemv import Linear
from .indexer import Indexer, indexer_kl, indexer_recall, select_topk, topk_indices
from .norm import RMSNorm, rms_normalize
from .precision import fp32_or_wider, fp32_region, wide_dtype
from .rope import apply_rope, inv_frequencies, rope_angles

NEG = -1e30  # finite "minus infinity" for masks: keeps logsumexp gradients NaN-free


class Picked(NamedTuple):
    """A CSA layer's selected compressed entries per query, for the gathered (sparse) path:
    index [B, S, k] into the entries, valid [B, S, k] (False: an entry the query cannot see)."""

    index: torch.Tensor
    valid: torch.Tensor


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.h, self.d, self.rd, self.w = c.num_attention_heads, c.head_dim, c.qk_rope_head_dim, c.sliding_window
        self.groups, self.o_rank, self.eps = c.o_groups, c.o_lora_rank, c.rms_norm_eps
        self.rate = c.compress_rate(layer_type)
        self.index_topk = c.index_topk
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, self.h * self.d, bias=False)
        self.wkv = Linear(c.hidden_size, self.d, bias=False)
        self.kv_norm = RMSNorm(self.d, c.rms_norm_eps)
        self.wo_a = Linear(self.h * self.d // self.groups, self.groups * self.o_rank, bias=False)
        self.wo_b = Linear(self.groups * self.o_rank, c.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(self.h, dtype=torch.float32))
        self.compressor = self.indexer = None
        if layer_type in (CSA, HCA):
            self.compressor = Compressor(c.hidden_size, self.d, self.rate, layer_type == CSA, self.rd, c.rms_norm_eps)
        if layer_type == CSA:
            self.indexer = Indexer(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim, self.rate,
                                   self.rd, c.rms_norm_eps)
        # sliding-window-only layers use the main RoPE; compressed layers the YaRN-scaled one
        if layer_type in (CSA, HCA):
            inv = inv_frequencies(self.rd, c.compress_rope_theta, c.yarn)
        else:
            inv = inv_frequencies(self.rd, c.rope_theta, None)
        self.register_buffer("inv_freq", inv, persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: LayerCache | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        cos, sin = rope_angles(ctx.positions, self.inv_freq)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(b, s, self.h, self.d)
        q = apply_rope(rms_normalize(q, self.eps, keep_dtype=True), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)

        if cache is not None and ctx.start is None:
            q_blocks, keys_t, win_bias = self._window_step(q, kv, ctx.positions[:, 0], cache)
        else:
            q_blocks, keys_t, win_bias = self._window_blocks(q, kv, ctx, cache)
        comp, comp_bias, index_info = (None, None, None)
        if self.compressor is not None:
            comp, comp_bias, index_info = self._compressed(x, qr, cos, sin, ctx, cache)
        want = index_info is not None and ctx.collect_indexer
        out, p_comp, raw_comp = self._attend(q_blocks, keys_t, win_bias, comp, comp_bias, s, want)
        if index_info is not None and ctx.collect_indexer:
            scores, allowed, visible = index_info
            ctx.aux.indexer.append(indexer_kl(scores, p_comp, allowed))
            picked = allowed if not ctx.dense_csa else select_topk(scores.detach(), visible, self.index_topk)
            ctx.aux.indexer_recall.append(indexer_recall(raw_comp, visible, picked, self.index_topk))

        o = apply_rope(out, cos, sin, inverse=True)  # [B,S,H,D]
        wo_a = self.wo_a.weight.view(self.groups, self.o_rank, -1)
        return self.wo_b(grouped_projection(o.reshape(b, s, self.groups, -1), wo_a))

    def write_cache(self, x: torch.Tensor, ctx: ForwardContext, cache: LayerCache) -> None:
        """What a prefill chunk (`ctx.start` set) writes into the cache -- the window ring, the
        compressor's and the indexer's state and entries -- without attending: for rows whose
        attention output nothing reads (Block.forward_last). Leaves the cache as forward() would."""
        cos, sin = rope_angles(ctx.positions, self.inv_freq)
        _write_ring(cache, apply_rope(self.kv_norm(self.wkv(x)), cos, sin), ctx.start)
        if self.compressor is not None:
            self.compressor.chunk(x, cache.compressor, ctx.start, self.inv_freq)
        if self.indexer is not None:
            self.indexer.compressor.chunk(x, cache.indexer, ctx.start, self.inv_freq)

    # ------------------------------------------------------------ window part
    def _window_blocks(self, q, kv, ctx: ForwardContext, cache: LayerCache | None):
        """Blockwise window attention layout for a chunk starting at ctx.start (same for all rows).

        Returns q blocks [B, nb, Bq*H, D], key blocks transposed [B, nb, D, Bq+W] and the additive
        mask [B|1, nb, Bq, Bq+W]."""
        b, s = kv.shape[:2]
        w, start = self.w, ctx.start or 0
        bq = min(w, s)
        nb = -(-s // bq)
        pad = nb * bq - s
        if cache is not None:
            # the W positions before the chunk, oldest first; ring slot of position p is p % R
            ring_size = cache.window.shape[1]
            order = (torch.arange(w, device=kv.device) + start - w) % ring_size
            ring = cache.window[:b, order].to(kv.dtype)
            key_valid = torch.arange(w, device=kv.device) + start - w >= 0
        else:
            ring = kv.new_zeros(b, w, self.d)
            key_valid = torch.zeros(w, dtype=torch.bool, device=kv.device)
        keys = torch.cat([ring, kv, kv.new_zeros(b, pad, self.d)], dim=1)  # [B, W + nb*bq, D]
        key_valid = torch.cat([key_valid, torch.ones(s + pad, dtype=torch.bool, device=kv.device)])
        keys_t = keys.unfold(1, bq + w, bq)  # [B, nb, D, bq+W]
        valid_blocks = key_valid.unfold(0, bq + w, bq)  # [nb, bq+W]
        u = torch.arange(bq, device=kv.device).unsqueeze(1)
        v = torch.arange(bq + w, device=kv.device).unsqueeze(0)
        in_window = (v >= u + 1) & (v <= u + w)  # relative distance u - v + W in [0, W-1]
        allowed = in_window.unsqueeze(0) & valid_blocks.unsqueeze(1)  # [nb, bq, bq+W]
        if ctx.doc_ids is not None:  # per-document attention for packed rows
            doc = ctx.doc_ids
            key_doc = torch.cat([doc.new_full((b, w), -1), doc, doc.new_full((b, pad), -2)], dim=1)
            query_doc = F.pad(doc, (0, pad), value=-3).view(b, nb, bq)
            same = query_doc.unsqueeze(-1) == key_doc.unfold(1, bq + w, bq).unsqueeze(2)
            allowed = allowed.unsqueeze(0) & same  # [B, nb, bq, bq+W]
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=kv.device).masked_fill(~allowed, NEG)
        qp = F.pad(q, (0, 0, 0, 0, 0, pad)) if pad else q
        q_blocks = qp.reshape(b, nb, bq * self.h, self.d)
        if cache is not None:
            _write_ring(cache, kv, start)
        return q_blocks, keys_t, bias if bias.dim() == 4 else bias.unsqueeze(0)

    def _window_step(self, q, kv, pos, cache: LayerCache):
        """One token per row at per-row positions: the ring itself is the key set."""
        b, w = kv.shape[0], self.w
        ring_size = cache.window.shape[1]
        rows = torch.arange(b, device=kv.device)
        cache.window[rows, pos % ring_size] = kv[:, 0].to(cache.window.dtype)
        j = torch.arange(ring_size, device=kv.device)
        slot_pos = pos.unsqueeze(1) - ((pos.unsqueeze(1) - j) % ring_size)  # latest position held by slot j
        visible = (slot_pos >= 0) & (slot_pos > pos.unsqueeze(1) - w)
        bias = torch.zeros(b, ring_size, dtype=torch.float32, device=kv.device).masked_fill(~visible, NEG)
        keys_t = cache.window[:b].to(kv.dtype).transpose(1, 2).unsqueeze(1)  # [B,1,D,R]
        return q.reshape(b, 1, self.h, self.d), keys_t, bias[:, None, None, :]

    # -------------------------------------------------------- compressed part
    def _compressed(self, x, qr, cos, sin, ctx: ForwardContext, cache: LayerCache | None):
        """Compressed entries [B,N,D] and their additive mask [B,S,N] (plus indexer info)."""
        b, s = x.shape[:2]
        m = self.rate
        comp_inv = self.inv_freq
        if cache is None and ctx.doc_ids is not None:
            return self._compressed_packed(x, qr, cos, sin, ctx)
        if cache is None:
            entries = self.compressor.full(x, comp_inv)
        elif ctx.start is not None:
            self.compressor.chunk(x, cache.compressor, ctx.start, comp_inv)
            entries = cache.compressor.entries[:b, : (ctx.start + s) // m]
        else:
            pos = ctx.positions[:, 0]
            self.compressor.step(x, cache.compressor, pos, comp_inv)
            if torch.compiler.is_compiling():
                # static shape: every entry slot, the ones not written yet are masked below
                # (exactly zero weight); slicing to the longest row would need a host sync
                entries = cache.compressor.entries[:b]
            else:
                entries = cache.compressor.entries[:b, : int((pos + 1).max()) // m]
        n = entries.shape[1]
        e = torch.arange(n, device=x.device)
        visible = (e + 1) * m <= ctx.positions.unsqueeze(-1) + 1  # [B,S,N]
        keys = None
        if self.indexer is not None:
            keys = self._index_keys(x, ctx, cache, n)  # always: the cached indexer state must advance
        return (entries, *self._select(x, qr, cos, sin, ctx, visible, keys if n else None))

    def _select(self, x, qr, cos, sin, ctx: ForwardContext, visible, index_keys):
        """Which visible entries each query attends to -> (additive mask [B,S,N], indexer info).
        HCA (and CSA in the dense warm-up) attend to all visible entries; CSA to the indexer's top-k."""
        allowed, index_info = visible, None
        if index_keys is not None:
            # the indexer never back-propagates into the trunk: it is trained by its own KL loss
            scores = self.indexer.scores(x.detach(), qr.detach(), cos, sin, index_keys)
            if self._gathers(ctx, scores.shape[-1]):
                return Picked(*topk_indices(scores, visible, self.index_topk)), None
            if not ctx.dense_csa:
                allowed = select_topk(scores.detach(), visible, self.index_topk)
            index_info = (scores, allowed, visible)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device).masked_fill(~allowed, NEG)
        return bias, index_info

    # Gathered CSA (inference): with N compressed entries and the indexer's top k, the masked
    # dense path reads all N entries for every query (a flash-attention key set of window + N
    # per query block) where only k count. Without autograd, each query's k entries are gathered
    # instead and attended with the window in one joint softmax (_attend_sparse): the same
    # arithmetic (fp32), another summation order. Multi-token chunks (prefill, scoring) gather
    # from N >= sparse_min_ratio * k on (`small`, k = 32: neutral at 1K tokens, N = 8k; an 8K
    # prefill 1.27x). A decode step's dense part is one query against N entries, so it waits for
    # N >= sparse_min_decode_entries: at N = 144 the gathered graph's extra kernels cost a
    # compiled `small` step ~0.5 ms (default `generate` 4.47x / 4.60x -> 4.27x / 4.17x of
    # transformers in A/B process pairs); at N = 4096 (a 16K context) gathering makes the
    # compiled step 8.6 -> 7.1 ms, the eager one 46 -> 39 ms. Training keeps the dense path (its
    # sequences are short, and it needs the gradients and the indexer's target).
    sparse_gather = True
    sparse_min_ratio = 8
    sparse_min_decode_entries = 4096

    def _gathers(self, ctx: ForwardContext, n: int) -> bool:
        """Whether this CSA call attends to gathered entries (see above)."""
        if not (self.sparse_gather and self.use_sdpa) or ctx.dense_csa or ctx.collect_indexer:
            return False
        least = self.sparse_min_ratio * self.index_topk if ctx.start is not None else self.sparse_min_decode_entries
        return n >= max(least, self.index_topk) and not torch.is_grad_enabled()

    def _compressed_packed(self, x, qr, cos, sin, ctx: ForwardContext):
        """The uncached compressed part for packed rows: entries of a document are visible only to
        later queries of the same document."""
        entries, ends, valid = self.compressor.packed(x, ctx.positions, ctx.doc_ids, self.inv_freq)
        s = x.shape[1]
        entry_doc = ctx.doc_ids.gather(1, ends.clamp(max=max(s - 1, 0)))
        t = torch.arange(s, device=x.device)
        visible = (valid.unsqueeze(1) & (ends.unsqueeze(1) <= t.view(1, -1, 1))
                   & (ctx.doc_ids.unsqueeze(-1) == entry_doc.unsqueeze(1)))  # [B,S,N]
        keys = None
        if self.indexer is not None and entries.shape[1]:
            keys = self.indexer.compressor.packed(x.detach(), ctx.positions, ctx.doc_ids, self.inv_freq)[0]
        return (entries, *self._select(x, qr, cos, sin, ctx, visible, keys))

    def _index_keys(self, x, ctx: ForwardContext, cache: LayerCache | None, n: int) -> torch.Tensor:
        comp = self.indexer.compressor
        if cache is None:
            return comp.full(x.detach(), self.inv_freq)
        if ctx.start is not None:
            comp.chunk(x, cache.indexer, ctx.start, self.inv_freq)
        else:
            comp.step(x, cache.indexer, ctx.positions[:, 0], self.inv_freq)
        return cache.indexer.entries[: x.shape[0], :n]

    # ------------------------------------------------------------- the math
    # The fused path (default) runs the joint softmax as ONE scaled_dot_product_attention call
    # (a flash kernel on CPU and GPU: no [.., keys] probability tensors in memory, forward or
    # backward); `use_sdpa = False` selects the plain reference below, which the tests compare
    # it against.
    use_sdpa = True

    def _attend(self, q_blocks, keys_t, win_bias, comp, comp_bias, s, want_probs: bool = False):
        """Joint sink-softmax over the window blocks and the compressed entries -> (out [B,S,H,D],
        p_comp [B,S,H,N] | None, raw_comp [B,S,H,N] | None); the two last only when `want_probs`
        (the indexer's KL target and recall) or on the reference path.

        q_blocks: [B, nb, Bq*H, D] (the decode step is nb = Bq = 1); keys_t: [B, nb, D, Kw];
        win_bias: broadcastable to [B, nb, Bq, Kw]; comp: [B, N, D]; comp_bias: [B, S, N]."""
        if not self.use_sdpa:
            return self._attend_reference(q_blocks, keys_t, win_bias, comp, comp_bias, s)
        if isinstance(comp_bias, Picked):
            return self._attend_sparse(q_blocks, keys_t, win_bias, comp, comp_bias, s), None, None
        out, lse = self._attend_sdpa(q_blocks, keys_t, win_bias, comp, comp_bias, s)
        if not want_probs or comp is None or not comp.shape[1]:
            return out, None, None
        with torch.no_grad():  # the indexer's target is detached: forward only
            if lse is None or not self.reuse_lse:  # the logits again, for the joint normaliser
                logits_w, logits_c, raw_c, lse = self._logits(q_blocks, keys_t, win_bias, comp, comp_bias, s)
            else:
                logits_c, raw_c = self._comp_logits(q_blocks, comp, comp_bias, s)
            # arguments clamped at -80 (e^-80 ~ 2e-35, above fp32's denormals): PyTorch's exp
            # takes a slow path for the masked entries' ~-1e30 and for denormal results (this
            # [4, 512, 8, 128] call of `small`: 11 -> 2 ms); the KL normalises the target over
            # the allowed entries and zeroes the others, so nothing it reads changes measurably
            p_c = (logits_c - lse.unsqueeze(-1)).clamp_(min=-80.0).exp_()
        return out, p_c, raw_c

    # The indexer's KL target needs the main attention's probabilities of the compressed entries,
    # exp(logit - lse) with lse the joint log-normaliser (window, compressed entries, sink). The
    # folded attention (bf16 autocast on a CPU, the trainer's setting from width 128) returns
    # the lse its softmax formed anyway, so only the compressed entries' logits are formed again;
    # elsewhere (and with this off) the window logits and both log-sum-exps are recomputed
    # (`small`'s V4 step under bf16: ~150 ms of logsumexp alone, docs/model.md "Speed").
    reuse_lse = True

    # One query per row inside a compiled CPU graph (a decode step): the joint sink-softmax as
    # reductions that inductor fuses into its own loops (`one_query_attention`), instead of an
    # external call to the CPU flash kernel -- whose per-call set-up, the sink channel's copies
    # of the query, keys and mask, and its blocks sized for many queries dominate at one query
    # (~25-50 us a layer). A compiled `small` decode step 1.04-1.08x faster, same greedy tokens
    # (docs/model.md "Speed"). GPUs keep the fused kernel (unmeasured there); False: the flash
    # kernel everywhere (a benchmark switch: bench_compile.py decode --flash-decode).
    decode_reductions = True

    def _one_query_in_graph(self, q_blocks: torch.Tensor) -> bool:
        return (self.decode_reductions and q_blocks.shape[1] == 1 and q_blocks.shape[2] == self.h
                and q_blocks.device.type == "cpu" and torch.compiler.is_compiling())

    def _attend_sdpa(self, q_blocks, keys_t, win_bias, comp, comp_bias, s):
        """The same joint softmax as `_attend_reference` in one fused attention call.

        Every query block gets one key set: its window span, all compressed entries (masked per
        query) and a "sink key". The sink enters through one extra channel: queries carry
        sink_h / scale there, the sink key carries 1 and every real key 0, so the sink key's
        logit is exactly sink_h and its gradient reaches `attn_sink` through the query. Keys
        double as values (K == V in V4): the sink's value is 0 on the D real channels, so it
        only adds to the denominator; the extra output channel is dropped."""
        dev = q_blocks.device.type
        if self._one_query_in_graph(q_blocks):
            with fp32_region(dev):
                out = one_query_attention(fp32_or_wider(q_blocks), keys_t, win_bias, comp, comp_bias,
                                          fp32_or_wider(self.attn_sink), self.d**-0.5)
            return out.to(q_blocks.dtype), None
        # The kernel's inputs are fp32 (the reference keeps the softmax in fp32), except under
        # autocast on a CPU, for blocks of several queries: there the heads are folded (below)
        # and the kernel takes the autocast dtype, which is then the faster one (CPU flash
        # attention keeps its softmax statistics and accumulations in fp32 whatever the input
        # dtype). Unfolded, the bf16 kernel is slower than the fp32 one; folded fp32 measured
        # no faster than unfolded fp32 in whole steps (docs/model.md "Speed").
        dtype = wide_dtype(q_blocks)
        folded = (self.fold_heads and _HAS_CPU_FLASH and dev == "cpu" and q_blocks.shape[2] > self.h
                  and torch.is_autocast_enabled(dev))
        if folded:
            dtype = torch.get_autocast_dtype(dev)
        with fp32_region(dev):
            out, lse = self._sdpa(q_blocks.to(dtype), keys_t, win_bias, comp, comp_bias, s, folded)
        return out.to(q_blocks.dtype), lse

    # Folded heads (bf16 autocast on a CPU, blocks of more than one query): V4's heads share one
    # key/value set (MQA), so the H heads of a query block can enter the kernel as ONE head with
    # H x Bq query rows instead of H heads of Bq rows. The kernel then runs bigger blocks against
    # each key block: forward + backward of a `small` CSA layer's call 61 ms (fp32, per head) ->
    # 40 ms (bf16, folded; 74 ms bf16 per head). The price is the mask, whose rows repeat per
    # head: the blocks go through the kernel in slices whose repeated mask stays under
    # FOLD_MASK_BYTES. Since the mask is then per row anyway, it also carries the sink (see
    # _FoldedSinkAttention), which keeps the head dim at D instead of D + 1 (a `small` CSA
    # call's forward + backward 39.2 -> 35.3 ms). fp32, decode steps (one query per block) and
    # GPUs keep the per-head layout (`enable_gqa`) and the sink channel.
    fold_heads = True
    FOLD_MASK_BYTES = 32 << 20
    # Folded bf16 blocks as batched bf16 products around one C pass for the sink softmax
    # (_BmmSinkAttention) instead of the CPU flash kernel, where the C kernels are built: a switch
    # for the benchmarks (benchmarks/profile_model.py --switch Attention.bmm_softmax).
    bmm_softmax = True

    def _sdpa(self, q_blocks, keys_t, win_bias, comp, comp_bias, s, folded: bool = False):
        """-> (out [B,S,H,D], the joint log-normaliser [B,S,H] (fp32, detached) or None): the
        folded kernels return theirs, the per-head layout none."""
        h, d = self.h, self.d
        scale = d**-0.5
        b, nb = q_blocks.shape[:2]
        bq = q_blocks.shape[2] // h
        dtype = q_blocks.dtype
        keys = [keys_t.transpose(-1, -2).to(dtype)]  # [B, nb, Kw, D]
        masks = [win_bias.expand(b, nb, bq, -1)]
        if comp is not None and comp.shape[1]:
            n = comp.shape[1]
            keys.append(comp.to(dtype).unsqueeze(1).expand(b, nb, n, d))
            pad = nb * bq - s  # padded query rows see every entry: their outputs are dropped
            masks.append((F.pad(comp_bias, (0, 0, 0, pad)) if pad else comp_bias).view(b, nb, bq, n))
        if folded:  # q_blocks' rows are (query, head) ordered: one head of Bq*H rows as they come
            kv = torch.cat(keys, dim=2).flatten(0, 1).unsqueeze(1)  # [B*nb, 1, K, D]
            mask = torch.cat(masks, dim=-1).flatten(0, 1).to(dtype)  # [B*nb, bq, K]
            q_rows, sink = q_blocks.flatten(0, 1).unsqueeze(1), fp32_or_wider(self.attn_sink)
            if self.bmm_softmax and dtype == torch.bfloat16 and cpu_kernels.attn_applies(kv[:, 0]):
                out, lse = _BmmSinkAttention.apply(q_rows, kv, mask, sink, scale)
            else:
                k = mask.shape[-1] + 1
                step = max(1, self.FOLD_MASK_BYTES // (bq * h * k * mask.element_size()))
                out, lse = _FoldedSinkAttention.apply(q_rows, kv, mask, sink, scale, step)
            return out.reshape(b, nb * bq, h, d)[:, :s], lse.reshape(b, nb * bq, h)[:, :s]
        sink = (fp32_or_wider(self.attn_sink) / scale).to(dtype)
        q = q_blocks.view(b, nb, bq, h, d).transpose(2, 3)  # [B, nb, H, bq, D]
        q = torch.cat([q, sink.view(1, 1, h, 1, 1).expand(b, nb, h, bq, 1)], dim=-1).flatten(0, 1)
        sink_key = F.pad(q.new_ones(1, 1, 1, 1), (d, 0)).expand(b, nb, 1, d + 1)
        kv = torch.cat([F.pad(torch.cat(keys, dim=2), (0, 1)), sink_key], dim=2).flatten(0, 1).unsqueeze(1)
        masks.append(win_bias.new_zeros(1, 1, 1, 1).expand(b, nb, bq, 1))
        mask = torch.cat(masks, dim=-1).flatten(0, 1).unsqueeze(1).to(dtype)  # [B*nb, 1, bq, K]
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=scale, enable_gqa=True)
        out = out[..., :d].unflatten(0, (b, nb)).transpose(2, 3)  # [B, nb, bq, H, D]
        return out.reshape(b, nb * bq, h, d)[:, :s], None

    SPARSE_CHUNK_BYTES = 64 << 20   # _attend_sparse: per chunk of query blocks, its biggest tensors' bound

    def _attend_sparse(self, q_blocks, keys_t, win_bias, comp, picked: Picked, s):
        """The joint sink-softmax over each query's window and its k gathered compressed entries
        -> out [B,S,H,D] (no autograd; fp32 arithmetic). Query blocks go in chunks whose window
        logits and gathered entries stay under SPARSE_CHUNK_BYTES each (at least one block)."""
        h, d = self.h, self.d
        scale = d**-0.5
        b, nb = q_blocks.shape[:2]
        bq = q_blocks.shape[2] // h
        k = picked.index.shape[-1]
        f32 = wide_dtype(q_blocks)
        sink = fp32_or_wider(self.attn_sink).to(f32)
        bias = torch.zeros(picked.valid.shape, dtype=f32, device=comp.device).masked_fill_(~picked.valid, NEG)
        pad = nb * bq - s   # the last block's padded query rows: entry 0, masked; their outputs are dropped
        index = F.pad(picked.index, (0, 0, 0, pad)) if pad else picked.index
        bias = F.pad(bias, (0, 0, 0, pad), value=NEG) if pad else bias
        row_bytes = 4 * max(h * keys_t.shape[-1], k * d)
        step = max(1, self.SPARSE_CHUNK_BYTES // (row_bytes * bq * b))
        batch = torch.arange(b, device=comp.device).view(b, 1, 1)
        out = q_blocks.new_empty(b, nb * bq, h, d)
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            r0, r1 = i0 * bq, i1 * bq
            keys = keys_t[:, i0:i1].to(f32)  # [B, c, D, Kw]
            qb = q_blocks[:, i0:i1].to(f32)  # [B, c, bq*H, D]
            lw = torch.matmul(qb, keys).mul_(scale).unflatten(2, (bq, h))
            lw = lw.add_(win_bias[:, i0:i1].unsqueeze(-2)).flatten(1, 2)  # [B, rows, H, Kw]
            sel = comp[batch, index[:, r0:r1]].to(f32)  # [B, rows, k, D]
            lc = torch.matmul(qb.reshape(b, r1 - r0, h, d), sel.transpose(-1, -2)).mul_(scale)
            lc = lc.add_(bias[:, r0:r1].unsqueeze(2))  # [B, rows, H, k]
            m = torch.maximum(lw.amax(-1), lc.amax(-1)).maximum(sink)  # [B, rows, H]
            # (exponents clamped at -80: PyTorch's exp takes a slow path for the masked keys'
            # ~-1e30, ~3x slower here; e^-80 ~ 2e-35 of weight is far below fp32's resolution)
            pw = lw.sub_(m.unsqueeze(-1)).clamp_(min=-80.0).exp_()
            pc = lc.sub_(m.unsqueeze(-1)).clamp_(min=-80.0).exp_()
            den = pw.sum(-1).add_(pc.sum(-1)).add_((sink - m).exp())
            o = torch.matmul(pw.view(b, i1 - i0, bq * h, -1), keys.transpose(-1, -2)).view(b, r1 - r0, h, d)
            out[:, r0:r1] = o.add_(torch.matmul(pc, sel)).div_(den.unsqueeze(-1))
        return out[:, :s]

    def _logits(self, q_blocks, keys_t, win_bias, comp, comp_bias, s):
        """Scaled, masked logits of the window blocks [B,nb,bq,H,Kw] and of the compressed entries
        [B,S,H,N] (and without the mask), and the joint log-normaliser with the sink [B,S,H]."""
        h, d = self.h, self.d
        scale = d**-0.5
        b, nb = q_blocks.shape[:2]
        bq = q_blocks.shape[2] // h
        logits_w = fp32_or_wider(torch.matmul(q_blocks, keys_t)) * scale  # [B, nb, bq*H, Kw]
        logits_w = logits_w.unflatten(2, (bq, h)) + win_bias.unsqueeze(-2)  # [B,nb,bq,H,Kw]
        lse = torch.logsumexp(logits_w, dim=-1).flatten(1, 2)[:, :s]  # [B,S,H]
        lse = torch.logaddexp(lse, fp32_or_wider(self.attn_sink))
        if comp is not None and comp.shape[1]:
            logits_c, raw_c = self._comp_logits(q_blocks, comp, comp_bias, s)
            lse = torch.logaddexp(lse, torch.logsumexp(logits_c, dim=-1))
        else:
            logits_c = raw_c = None
        return logits_w, logits_c, raw_c, lse

    def _comp_logits(self, q_blocks, comp, comp_bias, s):
        """The compressed entries' scaled logits with the mask and without it, [B,S,H,N] each."""
        h, d = self.h, self.d
        b, nb = q_blocks.shape[:2]
        bq = q_blocks.shape[2] // h
        q_flat = q_blocks.flatten(1, 2)[:, : s * h] if nb * bq != s else q_blocks.reshape(b, s * h, d)
        raw_c = fp32_or_wider(torch.matmul(q_flat, comp.transpose(1, 2).to(q_flat.dtype))).unflatten(1, (s, h)) * d**-0.5
        return raw_c + comp_bias.unsqueeze(2), raw_c

    def _attend_reference(self, q_blocks, keys_t, win_bias, comp, comp_bias, s):
        """Two partial softmaxes sharing one log-normaliser, written out op by op."""
        h = self.h
        b, nb = q_blocks.shape[:2]
        bq = q_blocks.shape[2] // h
        logits_w, logits_c, raw_c, lse = self._logits(q_blocks, keys_t, win_bias, comp, comp_bias, s)
        lse_blocks = F.pad(lse, (0, 0, 0, nb * bq - s)).unflatten(1, (nb, bq)) if nb * bq != s else lse.unflatten(1, (nb, bq))
        p_w = torch.exp(logits_w - lse_blocks.unsqueeze(-1))  # [B,nb,bq,H,Kw]
        out = torch.matmul(p_w.flatten(2, 3).to(keys_t.dtype), keys_t.transpose(-1, -2))  # [B,nb,bq*H,D]
        out = out.flatten(1, 2)[:, : s * h].unflatten(1, (s, h))  # [B,S,H,D]
        p_c = None
        if logits_c is not None:
            p_c = torch.exp(logits_c - lse.unsqueeze(-1))
            out = out + torch.matmul(p_c.flatten(1, 2).to(comp.dtype), comp).unflatten(1, (s, h)).to(out.dtype)
        return out, p_c, raw_c


def one_query_attention(q, keys_t, win_bias, comp, comp_bias, sink, scale: float) -> torch.Tensor:
    """The joint sink-softmax of `Attention._attend_reference` for one query per row, written as
    broadcast products and sums (what inductor fuses into reduction loops) -> out [B, 1, H, D].

    q [B, 1, H, D] (the softmax's dtype); keys_t [B, 1, D, Kw] (the window, K == V);
    win_bias [B|1, 1, 1, Kw]; comp [B, N, D] or None; comp_bias [B, 1, N]; sink [H]:

        m = max(window logits, compressed logits, sink)
        out = (sum_w e^(l_w - m) k_w + sum_c e^(l_c - m) c) / (sum_w e^(l_w - m) + sum_c e^(l_c - m) + e^(sink - m))
    """
    b, _, h, _ = q.shape
    q = q[:, 0]  # [B, H, D]
    keys = keys_t[:, 0].to(q.dtype)  # [B, D, Kw]
    logits_w = (q.unsqueeze(-1) * keys.unsqueeze(1)).sum(2) * scale + win_bias.reshape(win_bias.shape[0], 1, -1)
    sink = sink.to(q.dtype).view(1, h, 1)
    m = torch.maximum(logits_w.amax(-1, keepdim=True), sink)  # [B, H, 1]
    has_comp = comp is not None and comp.shape[1] > 0
    if has_comp:
        comp = comp.to(q.dtype)
        logits_c = (q.unsqueeze(2) * comp.unsqueeze(1)).sum(-1) * scale + comp_bias.reshape(comp_bias.shape[0], 1, -1)
        m = torch.maximum(m, logits_c.amax(-1, keepdim=True))
    p_w = torch.exp(logits_w - m)  # [B, H, Kw]
    denom = p_w.sum(-1, keepdim=True) + torch.exp(sink - m)
    out = (p_w.unsqueeze(2) * keys.unsqueeze(1)).sum(-1)  # [B, H, D]
    if has_comp:
        p_c = torch.exp(logits_c - m)  # [B, H, N]
        denom = denom + p_c.sum(-1, keepdim=True)
        out = out + (p_c.unsqueeze(-1) * comp.unsqueeze(1)).sum(2)
    return (out / denom).unsqueeze(1)


# the folded path calls PyTorch's CPU flash-attention ops directly (private, stable over the torch
# range pyproject.toml allows); without them it is not taken and the per-head layout runs
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash(q, kv, mask, scale):
    """PyTorch's CPU flash-attention kernel (K == V): (out, log-sum-exp of each row's scaled,
    masked logits, fp32); the op F.scaled_dot_product_attention dispatches to on a CPU."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, attn_mask=mask, scale=scale)


def _flash_backward(g, q, kv, out, lse, mask, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, kv, kv, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    return dq, dk + dv


class _FoldedSinkAttention(torch.autograd.Function):
    """The folded kernel call (Attention._sdpa) with the sink in the mask.

        q [G, 1, Bq*H, D] (rows query-major, head-minor), kv [G, 1, K, D], mask [G, Bq, K]
        (additive, q's dtype), sink [H] -> out [G, 1, Bq*H, D]

    One zero key is appended to kv, and each row's mask gets one more entry, the row's head's
    sink logit: the zero key's logit q.0 * scale + sink_h is exactly sink_h, and its value 0 only
    adds to the denominator, which is the sink softmax. The kernel does not return a gradient for
    the mask, so the sink's is formed here from what it returns: a logit s whose value is 0 has
    d loss / d s = p_s * (g . (0 - out)) with p_s = exp(s - lse), summed over each head's rows.
    The blocks run in slices of `step` (Attention.FOLD_MASK_BYTES), each slice's mask rows
    repeated per head, as in the forward so in the backward (the masks are kept, as autograd
    would keep them for F.scaled_dot_product_attention)."""

    @staticmethod
    def forward(ctx, q, kv, mask, sink, scale: float, step: int):
        g_count, h = q.shape[0], sink.numel()
        kv = torch.cat([kv, kv.new_zeros(g_count, 1, 1, kv.shape[-1])], dim=2)
        sink_row = sink.to(q.dtype).view(1, 1, h, 1)  # (rounded as the kernel will read it)
        outs, lses, masks = [], [], []
        for i in range(0, g_count, step):
            m = mask[i : i + step]
            rows = m.unsqueeze(2).expand(-1, -1, h, -1)  # [g, Bq, H, K]
            full = torch.cat([rows, sink_row.expand(m.shape[0], m.shape[1], h, 1)], dim=-1)
            masks.append(full.flatten(1, 2).unsqueeze(1))  # [g, 1, Bq*H, K+1]
            out, lse = _flash(q[i : i + step], kv[i : i + step], masks[-1], scale)
            outs.append(out)
            lses.append(lse)
        out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
        ctx.save_for_backward(q, kv, out, lse, sink_row, *masks)
        ctx.scale, ctx.step = scale, step
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, g, _g_lse):
        q, kv, out, lse, sink_row, *masks = ctx.saved_tensors
        g = g.contiguous()
        dq, dkv = torch.empty_like(q), torch.empty_like(kv)
        for j, i in enumerate(range(0, q.shape[0], ctx.step)):
            sl = slice(i, i + ctx.step)
            dq[sl], dkv[sl] = _flash_backward(g[sl], q[sl], kv[sl], out[sl], lse[sl], masks[j], ctx.scale)
        h, wide = sink_row.numel(), lse.dtype  # (fp32, fp64 for fp64 inputs)
        p_sink = torch.exp(sink_row.to(wide).view(1, 1, 1, h) - lse.view(*lse.shape[:2], -1, h))  # [G, 1, Bq, H]
        dot = (g.to(wide) * out.to(wide)).sum(-1).view_as(p_sink)
        d_sink = -(p_sink * dot).sum((0, 1, 2))
        return dq, dkv[:, :, :-1], None, d_sink, None, None


class _BmmSinkAttention(torch.autograd.Function):
    """The folded blocks (q [G, 1, Bq*H, D], kv [G, 1, K, D], mask [G, Bq, K], sink [H], as
    _FoldedSinkAttention) as batched products around the sink softmax:

        p = sink_softmax(q kv^T * scale + mask)          [G, Bq*H, K]   (kernels/attn.h)
        out = p kv
        backward: dp = g kv^T, ds = p (dp - g.out) scale, dq = ds kv, dkv = p^T g + ds^T q,
                  d sink_h = -sum over h's rows of exp(sink_h - lse) (g.out)

    Why: PyTorch's CPU flash kernel ran these shapes at ~30% of the bf16 matmul peak (small
    per-block products, fp32 statistics, the scores recomputed in the backward); the same six
    products as oneDNN bf16 batched GEMMs take about half its time, and the softmax is one C pass
    each way (a `small` CSA call, [16, 1024, 385]: forward + backward ~40 -> ~27 ms). The price is the flash kernel's extra precision:
    the scores and probabilities are rounded to bf16 between the products, as in any eager
    attention under autocast (the error of bf16 q and k is already of that order). Memory: the
    probabilities are kept for the backward, [G, Bq*H, K] bf16 (12.6 MB for that call), where
    the flash kernel keeps only its log-sum-exp. The softmax is the C kernel's for bf16 and
    PyTorch's formula otherwise (the float64 tests run that against the flash path)."""

    @staticmethod
    def forward(ctx, q, kv, mask, sink, scale: float):
        q2, kv2 = q[:, 0], kv[:, 0]
        p = torch.bmm(q2, kv2.transpose(1, 2))       # raw scores, made the probabilities in place
        lse = _sink_softmax(p, mask, sink, scale)
        out = torch.bmm(p, kv2)
        ctx.save_for_backward(q2, kv2, p, out, lse, sink)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out.unsqueeze(1), lse

    @staticmethod
    def backward(ctx, g, _g_lse):
        q2, kv2, p, out, lse, sink = ctx.saved_tensors
        g = g[:, 0].contiguous()
        wide = lse.dtype
        delta = (g.to(wide) * out.to(wide)).sum(-1)  # [G, R]: g . out = sum_j p_j dp_j
        ds = torch.bmm(g, kv2.transpose(1, 2))
        _sink_softmax_backward(ds, p, delta, ctx.scale)
        dq = torch.bmm(ds, kv2)
        dkv = torch.bmm(p.transpose(1, 2), g).baddbmm_(ds.transpose(1, 2), q2)   # value + key parts
        h = sink.numel()
        p_sink = torch.exp(sink.to(wide).view(1, 1, h) - lse.view(lse.shape[0], -1, h))
        d_sink = -(p_sink * delta.view_as(p_sink)).sum((0, 1))
        return dq.unsqueeze(1), dkv.unsqueeze(1), None, d_sink.to(sink.dtype), None


def grouped_projection(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The grouped output projection's first half: o [B, S, G, I], w [G, R, I] -> [B, S, G * R],
    group g's outputs o_g w_g^T. One batched product over the groups with o moved groups-first
    and made contiguous: einsum("bsgi,gri->bsgr") picked a layout whose backward ran the weight
    gradient at ~140 GFLOP/s in bf16 (the same arithmetic; forward + backward at `small`'s
    [4, 512, 4, 128] x [4, 128, 128] in bf16: 4.75 -> 2.80 ms)."""
    b, s, g, i = o.shape
    groups_first = o.reshape(b * s, g, i).transpose(0, 1).contiguous()
    return torch.bmm(groups_first, w.transpose(1, 2)).transpose(0, 1).reshape(b, s, -1)


def _sink_softmax(s: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """In place over raw scores s [G, R, K]: the sink softmax (see _BmmSinkAttention); returns
    the rows' log-normalisers [G, R] (fp32; fp64 for fp64 scores)."""
    h = sink.numel()
    if cpu_kernels.attn_applies(s):
        return cpu_kernels.attn_softmax(s, mask, sink, h, scale)
    wide = torch.float64 if s.dtype == torch.float64 else torch.float32
    z = s.to(wide) * scale + mask.to(wide).repeat_interleave(h, dim=1)
    sk = sink.to(wide).repeat(s.shape[1] // h).view(1, -1, 1)       # row r: head r % h
    m = torch.maximum(z.amax(-1, keepdim=True), sk)
    e = torch.exp(z - m)
    d = e.sum(-1, keepdim=True) + torch.exp(sk - m)
    s.copy_(e / d)
    return (m + torch.log(d)).squeeze(-1)


def _sink_softmax_backward(ds: torch.Tensor, p: torch.Tensor, delta: torch.Tensor, scale: float) -> None:
    """In place over ds = g kv^T: p (ds - delta) scale."""
    if cpu_kernels.attn_applies(ds):
        cpu_kernels.attn_softmax_backward(ds, p, delta, scale)
        return
    wide = delta.dtype
    ds.copy_(p.to(wide) * (ds.to(wide) - delta.unsqueeze(-1)) * scale)


def _write_ring(cache: LayerCache, kv: torch.Tensor, start: int) -> None:
    """Remember a chunk's last R tokens in the window ring (slot of position p: p % R; R > W
    leaves room for a speculative rollback)."""
    b, s = kv.shape[:2]
    ring_size = cache.window.shape[1]
    keep = min(s, ring_size)
    slots = (torch.arange(s - keep, s, device=kv.device) + start) % ring_size
    cache.window[:b, slots] = kv[:, s - keep :].to(cache.window.dtype)

