"""The DeepSeek-V4 transformer: embedding -> mHC blocks -> hyper head -> RMSNorm -> LM head, + MTP.

Spec section 1; V4 report section 2.

    X0 = Emb(ids) repeated into hc_mult streams            [B, S, n, d]
    for each block:  X = HC_attn(X, Attention(RMSNorm(.)));  X = HC_ffn(X, MoE(RMSNorm(.)))
    logits = Head(RMSNorm(HyperHead(X)))                   (untied head)
    MTP k:  X^k = Block_k( W_e RMSNorm(Emb(t_{i+k})) + W_h RMSNorm(X^{k-1}_i) ) -> predicts t_{i+k+1}
            through its own hyper head and norm and the shared head.

Usage:
    model = Transformer(ModelConfig.from_preset("tiny"))
    logits = model(input_ids)                                   # [B, S, vocab]
    terms = model.loss(input_ids, labels)                       # LossTerms: .loss, .ce, .mtp, ...
    cache = model.new_cache(batch_size=2, max_len=4096)
    logits = model(prompt_ids, cache=cache)                     # prefill (any length)
    logits = model(next_ids[:, None], cache=cache)              # decode, one token per row
    model.save_pretrained("out/"); Transformer.from_pretrained("out/")
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..config import ModelConfig
from .attention import Attention
from .cache import DecodeCache, cache_nbytes
from . import dispatch, gemv
from .context import AuxTerms, ForwardContext
from .hyper_connections import HyperConnection, HyperHead
from .loss import linear_cross_entropy
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, mlp_type: str):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, layer_type)
        self.ffn = MoE(c, mlp_type)
        self.hc_attn = HyperConnection(c.hidden_size, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        self.hc_ffn = HyperConnection(c.hidden_size, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams: torch.Tensor, ctx: ForwardContext, cache=None, *, halves=None) -> torch.Tensor:
        """halves: (front, back) called as front(self, ...) / back(self, ...) -- the compiled halves
        of compile_blocks, run inside this call so that module hooks (FSDP2's parameter gathering)
        wrap them; None: self.front / self.back."""
        front, back = halves or (_block_front, _block_back)
        *state, flat, w, idx = front(self, streams, ctx, cache)
        return back(self, *state, flat, self.ffn.experts(flat, idx, w))

    def forward_last(self, streams: torch.Tensor, ctx: ForwardContext, cache, keep: int) -> torch.Tensor:
        """forward() of a prefill chunk (`ctx.start` set) when only the output's last `keep` rows
        are read (the last block, Transformer.forward with logits_to_keep) -> those rows' streams.
        The earlier rows still enter the cache (Attention.write_cache: window ring, compressor and
        indexer state); their queries, attention, FFN and mHC mixing are skipped. The kept rows
        then run as a chunk of their own, which reads what the earlier rows wrote."""
        s = streams.shape[1]
        if s <= keep:
            return self.forward(streams, ctx, cache)
        head, tail = _split_context(ctx, s - keep)
        self.attn.write_cache(self.attn_norm(self.hc_attn.block_input(streams[:, : s - keep])), head, cache)
        return self.forward(streams[:, s - keep :], tail, cache)

    # front -> routed experts -> back: regional torch.compile (Transformer.compile_blocks) compiles
    # front and back as two graphs and runs the data-dependent grouped expert pass between them
    def front(self, streams: torch.Tensor, ctx: ForwardContext, cache=None):
        """Attention sub-block, then the FFN's mHC collapse, norm and routing."""
        x, post, comb, streams = self.hc_attn.collapse(streams)
        streams = self.hc_attn.expand(self.attn(self.attn_norm(x), ctx, cache), streams, post, comb)
        x, post, comb, streams = self.hc_ffn.collapse(streams)
        x = self.ffn_norm(x)
        return (streams, post, comb, x, *self.ffn.route(x, ctx))

    def back(self, streams, post, comb, x, flat, routed) -> torch.Tensor:
        """Shared expert + routed output, then the FFN's mHC expansion."""
        return self.hc_ffn.expand(self.ffn.combine(x, flat, routed), streams, post, comb)


class MTPBlock(Block):
    """One multi-token-prediction module (spec 1.7): embeds the next token, mixes it with the
    previous depth's streams, runs one full block, and predicts one token further."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__(config, layer_type, "moe")
        c = config
        self.e_proj = gemv.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.h_proj = gemv.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)

    def forward(self, streams: torch.Tensor, next_embeds: torch.Tensor, ctx: ForwardContext, cache=None, *,
                halves=None):
        """streams [B,S,n,d] (previous depth), next_embeds [B,S,d] -> (new streams, final hidden [B,S,d]);
        halves: as Block.forward."""
        front, back = halves or (_block_front, _block_back)
        *state, flat, w, idx = front(self, streams, next_embeds, ctx, cache)
        return back(self, *state, flat, self.ffn.experts(flat, idx, w))

    def front(self, streams, next_embeds, ctx: ForwardContext, cache=None):
        x = self.e_proj(self.enorm(next_embeds)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        return super().front(x, ctx, cache)

    def back(self, *state):
        streams = super().back(*state)
        return streams, self.norm(self.hc_head(streams))


@dataclass
class LossTerms:
    """Training objective, each term reported separately (floats via .item() are the caller's)."""

    loss: torch.Tensor  # weighted total: ce + mtp_weight*mtp + balance_alpha*balance + indexer_weight*indexer
    ce: torch.Tensor  # main next-token cross-entropy (nats / token)
    mtp: torch.Tensor  # mean MTP cross-entropy over depths
    balance: torch.Tensor  # sequence-wise balance term sum_i f_i P_i (mean over routed layers)
    indexer: torch.Tensor  # indexer KL (mean over CSA layers)
    n_tokens: int  # supervised tokens of the main loss
    logits: torch.Tensor | None = None
    indexer_recall: torch.Tensor | None = None  # mean share of the true top-k entries the indexer picks


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            Block(c, lt, mt) for lt, mt in zip(c.layer_types, c.mlp_layer_types)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(c, lt) for lt in c.mtp_layer_types)
        self.dense_csa = False  # indexer warm-up switch (trainer sets it); see Attention
        # The LM head + CE of `loss()` in this dtype outside autocast (None: the model's dtype).
        # The trainer's "head" precision sets bf16 on CPUs with native bf16 matmuls for models too
        # narrow for whole-model autocast: there the head is the biggest matmul of a step.
        self.head_dtype: torch.dtype | None = None
        self.reset_parameters()

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Our own initialisation (the paper leaves it open): N(0, 0.02) for projections, with
        output projections scaled by 1/sqrt(2*layers) (GPT-2 style) so the residual streams
        start at a stable scale; norms at 1, sinks / position biases / mHC biases at 0, mHC
        gates at 1, balancing bias at 0. No-op for parameters on the meta device."""
        if any(p.is_meta for p in self.parameters()):
            return
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * max(1, self.config.num_hidden_layers))

        def normal_(t, s):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(s).to(t.dtype))

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("attn_sink", "ape", "base"):
                p.zero_()
            elif leaf == "scale":
                p.fill_(1.0)
            elif any(k in name for k in ("wo_b", "experts.w2", "shared_experts.w2")):
                normal_(p, out_std)
            else:
                normal_(p, std)
        for m in self.modules():
            if isinstance(m, MoE) and m.gate.bias is not None:
                m.gate.bias.zero_()

    # --------------------------------------------------------- forward
    def _context(self, input_ids, cache: DecodeCache | None, pos: torch.Tensor | None = None, **kw) -> ForwardContext:
        """Positions and cache mode for a call: uncached (from 0), a multi-token chunk (all rows at
        the same start) or a one-token step (per-row positions). `pos` defaults to cache.pos."""
        b, s = input_ids.shape
        dev = input_ids.device
        common = dict(input_ids=input_ids, cache=cache, dense_csa=self.dense_csa, **kw)
        if cache is None:
            doc_ids = kw.get("doc_ids")
            if doc_ids is not None:
                return ForwardContext(positions=document_positions(doc_ids), start=0, **common)
            return ForwardContext(positions=torch.arange(s, device=dev).expand(b, s), start=0, **common)
        if kw.get("doc_ids") is not None:
            raise ValueError("doc_ids (packed documents) is a training feature: not supported with a cache")
        pos = cache.pos if pos is None else pos
        if pos.shape[0] != b:
            raise ValueError(f"cache was allocated for batch {pos.shape[0]}, got batch {b}")
        if pos.numel() and int(pos.max()) + s > cache.max_len:
            raise ValueError(f"cache max_len={cache.max_len} too small for {int(pos.max()) + s} tokens (cache is full)")
        if s == 1:
            # contiguous ids: a compiled decode step guards on strides, and a sliced [B,1] id
            # tensor (a prompt's last column) would otherwise compile a second graph
            common["input_ids"] = input_ids.contiguous()
            return ForwardContext(positions=pos.unsqueeze(1), start=None, **common)
        if pos.numel() and bool((pos != pos[0]).any()):
            raise ValueError(
                "multi-token forward with a cache needs all rows at the same position "
                f"(got positions {pos.tolist()}); feed tokens one at a time or prefill rows separately"
            )
        start = int(pos[0]) if pos.numel() else 0
        return ForwardContext(positions=(torch.arange(s, device=dev) + start).expand(b, s), start=start, **common)

    def hidden_streams(self, input_ids: torch.Tensor, ctx: ForwardContext, keep: int = 0) -> torch.Tensor:
        """Final residual streams [B,S,n,d] before the hyper head. `keep` > 0 with a prefill
        chunk: only the last `keep` rows are wanted, so the last block computes only those
        (Block.forward_last; the cache still takes every row) -> [B, keep, n, d]."""
        streams = self._input_streams(input_ids)
        run = self._block_runner(ctx)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            cache = ctx.cache.layers[i] if ctx.cache is not None else None
            # (a block with hooks -- FSDP's parameter gathering, a user's probe -- runs whole)
            if (i == last and keep > 0 and cache is not None and ctx.start is not None
                    and not (layer._forward_pre_hooks or layer._forward_hooks)):
                return layer.forward_last(streams, ctx, cache, keep)
            streams = run(layer, streams, ctx, cache)
        return streams

    # Under bf16 autocast on a CPU the residual streams are stored in bf16, as the reference stores
    # them in its bf16 model dtype (spec 1.2: X flattened to fp32 for the mix, the block input cast
    # back to bf16); the mixes, weighted sums and stream mixes still compute in fp32 and round each result
    # once (hyper_connections, kernels/mhc.h). Half the bytes for mHC's passes over the 4x-wide
    # streams and for what a training step keeps of them: `small`'s bf16 step 1.05-1.16x, with
    # the same loss curve in a 300-step study (docs/model.md "Speed", "bf16 residual streams").
    # CPU only: there the C stream kernels read bf16 as it is; elsewhere the PyTorch paths would
    # widen the streams into fp32 temporaries around every mix, unmeasured on a GPU, so GPUs keep
    # fp32 streams. False: fp32 streams under autocast on a CPU too (a benchmark switch).
    autocast_streams = True

    def _input_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if (self.autocast_streams and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            x = x.to(torch.bfloat16)
        return x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()

    def _block_runner(self, ctx: ForwardContext):
        """The compiled block call (see compile_blocks) for uncached calls; cached calls run
        eagerly here: multi-token chunks (prefill) because their start position is a Python int
        that would recompile the graphs for every chunk (and prefill is not launch-bound), and
        a compiled one-token step takes `_compiled_step` instead."""
        compiled = self.__dict__.get("_compiled_blocks")
        if compiled is None or ctx.cache is not None or self.__dict__.get("_compiled_decode_only"):
            return _call_block
        collect = ctx.collect_balance or ctx.collect_indexer

        def run(block, *args):
            # (a block with hooks -- FSDP2's -- gets its streams back as a tensor of its own)
            hooked = bool(block._forward_pre_hooks or block._forward_hooks)
            halves = compiled(_block_front, block), compiled(_block_back_fresh if hooked else _block_back, block)
            aux = None
            if collect:
                # each compiled call gets an empty aux collector: dynamo guards on the lengths of
                # lists a graph appends to, so a shared one would recompile for every layer
                aux = AuxTerms()
                args = tuple(dataclasses.replace(a, aux=aux) if a is ctx else a for a in args)
            # through the module call, so its hooks (FSDP2 gathers the block's parameters) wrap the
            # compiled front and back; the experts run eagerly between them (Block.forward)
            out = block(*args, halves=halves)
            if aux is not None:
                ctx.aux.balance += aux.balance
                ctx.aux.indexer += aux.indexer
                ctx.aux.indexer_recall += aux.indexer_recall
            return out

        return run

    def _runs_compiled_step(self, ctx: ForwardContext) -> bool:
        """Whether this call is a one-token decode step of a compiled model (`_compiled_step`)."""
        return "_compiled_blocks" in self.__dict__ and ctx.cache is not None and ctx.start is None

    def _compiled_step(self, input_ids: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-token decode step of a compiled model -> (logits, final streams).

        The blocks run as a few graphs of consecutive blocks (`decode_groups`: `small`'s eight
        blocks as 1 + 2 + 2 + 2 + 1), the first one with the step's head (the embedding and the
        streams' expansion), the last one with its tail (hyper head, final norm, LM head): each
        graph entry costs ~0.1 ms of guards, wrappers and argument handling on a 2-core CPU,
        which one graph per block paid nine times a step, and every eager op between the graphs
        runs on caches the graphs have just filled with weights (~4 eager ops of the head cost
        ~65 us there). Should a graph fail to compile, that group and everything after it run
        eagerly (`_compiled_call`).

        Once a step has run with dynamo's guards checked, later steps with the same cache, batch
        and state call the graphs' compiled code directly (model/dispatch.py: ~0.15 ms less per
        graph entry)."""
        steps = self.__dict__["_dispatch"]
        key = self._step_key(input_ids, ctx)
        state = [ctx.positions, *(t for lc in ctx.cache.layers for t in lc.tensors())]
        direct = steps.calls(ctx.cache, key, state)
        learned = []
        x = ctx.input_ids  # the first graph's input (contiguous: see _context); then each graph's streams
        for n, (group, blocks, entry, fn, raw) in enumerate(self.__dict__["_decode_plan"]):
            caches = tuple(ctx.cache.layers[i] for i in group)
            last = entry is _decode_last or entry is _decode_only
            args = (blocks, x, ctx, caches) if entry is _decode_group else (self, blocks, x, ctx, caches)
            if direct is not None:
                out = direct[n](*args)
            else:
                # (a group that fails to compile uncompiles the model: the rest of the step is eager)
                out = self._compiled_call(fn, *args) if "_compiled_blocks" in self.__dict__ else None
                if out is None:
                    out, raw = entry(*args), None
                learned.append(dispatch.compiled_code_for(raw, args) if raw is not None and key is not None else None)
            if last:
                if direct is None and "_compiled_blocks" in self.__dict__:
                    steps.learn(ctx.cache, key, state, self._step_tensors(), learned)
                return out
            x = out
        raise AssertionError("unreachable: decode_groups covers every layer")

    def _step_key(self, input_ids: torch.Tensor, ctx: ForwardContext) -> tuple | None:
        """What a compiled decode step's guards depend on, besides the tensors' dtypes and devices
        (`_step_tensors`), that may change between steps (model/dispatch.py). None: always check
        the guards (a step recording gradients)."""
        if torch.is_grad_enabled() or not dispatch.enabled:
            return None
        dev = input_ids.device.type
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        switches = (gemv.reduction_in_graphs, HyperConnection.fused, Attention.use_sdpa, Attention.decode_reductions,
                    RMSNorm.fused)
        # (dynamo's global-state guard also covers the thread count, deterministic algorithms and
        # the torch-function mode stack, e.g. a FlopCounterMode entered mid-loop)
        state = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.backends.cuda.matmul.allow_tf32, dispatch.mode_stack_depth(),
                 torch.get_default_dtype(), torch.is_inference_mode_enabled(), autocast)
        return (tuple(input_ids.shape), input_ids.device, input_ids.dtype, state, self.training, ctx.dense_csa,
                ctx.collect_balance, ctx.collect_indexer, switches)

    def _step_tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers a compiled decode step's graphs read."""
        mods = [self.embed, *self.layers, self.hc_head, self.norm, self.head]
        return [t for m in mods for t in (*m.parameters(), *m.buffers())]

    def logits_from_streams(self, streams: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.hc_head(streams))
        return self._head(h).float()

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """self.head(h); a decode step's few rows go through gemv.rows_linear (the head is the
        one weight big enough for oneDNN's faster matrix-vector product to pay, see gemv.py),
        or, in a compiled decode graph, through gemv.linear's reduction."""
        if type(self.head) is not nn.Linear:
            return self.head(h)
        if gemv.applies(h, self.head.weight):
            return gemv.onednn_linear(h, self.head.weight)
        return gemv.linear(h, self.head.weight, self.head.bias)

    def forward(self, input_ids: torch.Tensor, cache: DecodeCache | None = None, return_streams: bool = False,
                doc_ids: torch.Tensor | None = None, logits_to_keep: int = 0):
        """Logits [B, S, vocab] in fp32 (and the final residual streams [B,S,n,d] if asked, the MTP
        module's input). With a cache, consumes the tokens and advances it. `doc_ids` [B,S]
        (uncached): packed documents attend and compress only within themselves.
        `logits_to_keep` > 0 (transformers' name): logits of the last that many positions only
        -- a prefill needs one row, and the head over every prompt position is ~8% of it."""
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        ctx = self._context(input_ids, cache, doc_ids=doc_ids)
        if self._runs_compiled_step(ctx):
            logits, streams = self._compiled_step(input_ids, ctx)
        else:
            # the last block computes only the rows whose logits are kept, unless the caller
            # wants every row's streams (speculative decoding's MTP input)
            streams = self.hidden_streams(input_ids, ctx, keep=0 if return_streams else logits_to_keep)
            logits = self.logits_from_streams(streams[:, -logits_to_keep:] if logits_to_keep > 0 else streams)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return (logits, streams) if return_streams else logits

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, cache: DecodeCache | None = None,
                    depth: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module: streams [B,S,n,d] of positions p..p+S-1 and the tokens at p+1..p+S ->
        (logits [B,S,vocab] predicting the tokens at p+2..p+S+1, the module's output streams).

        With a cache (allocated with `with_mtp=True`) the module keeps its own sliding-window ring
        and position (`cache.mtp_pos[depth]`), like a main layer. For speculative decoding the same
        module can be applied recursively, feeding its output streams back (as vLLM does)."""
        block = self.mtp[depth]
        if cache is None:
            ctx = self._context(next_ids, None)
            layer_cache = None
        else:
            if not cache.mtp_layers:
                raise ValueError("this cache has no MTP state: allocate it with new_cache(..., with_mtp=True)")
            ctx = self._context(next_ids, cache, pos=cache.mtp_pos[depth])
            layer_cache = cache.mtp_layers[depth]
        new_streams, h = block(streams, self.embed(next_ids), ctx, layer_cache)
        if cache is not None:
            cache.mtp_pos[depth] += next_ids.shape[1]
        return self._head(h).float(), new_streams

    @torch.no_grad()
    def rollback(self, cache: DecodeCache, snapshot: dict, keep: int) -> None:
        """Undo a multi-token call made after `snapshot = cache.snapshot()`, keeping only its first
        `keep` tokens (speculative decoding: the accepted prefix of a verified draft).

        Compressor buffers are restored and the kept tokens' projections re-absorbed (exact);
        window rings need no restore because new_cache(spec_tokens=K) leaves K spare slots."""
        start = snapshot["pos"]
        if bool((cache.pos != cache.pos[0]).any()) or bool((start != start[0]).any()):
            raise ValueError("rollback needs all rows at the same position")
        consumed = int(cache.pos[0] - start[0])
        if not 0 <= keep <= consumed:
            raise ValueError(f"keep={keep} outside [0, {consumed}]")
        if consumed - keep > cache.spec_tokens:
            raise ValueError(f"rolling back {consumed - keep} tokens needs new_cache(spec_tokens>={consumed - keep})")
        s0 = int(start[0])
        states = cache.states()
        modules = [c for layer in self.layers for c in (layer.attn.compressor,
                   layer.attn.indexer.compressor if layer.attn.indexer is not None else None) if c is not None]
        inv = [layer.attn.inv_freq for layer in self.layers for c in (layer.attn.compressor,
               layer.attn.indexer) if c is not None]
        for state, module, inv_freq, (kv0, gate0) in zip(states, modules, inv, snapshot["states"]):
            chunk = state.last_chunk
            if consumed and (chunk is None or chunk[0] != s0 or chunk[1].shape[1] != consumed):
                raise ValueError("rollback must directly follow one multi-token call made after the snapshot")
            state.kv.copy_(kv0)
            state.gate.copy_(gate0)
            if keep:
                module.absorb(chunk[1][:, :keep], chunk[2][:, :keep], state, s0, inv_freq, state.entries.dtype)
        cache.pos.copy_(start + keep)
        for p, p0 in zip(cache.mtp_pos, snapshot["mtp_pos"]):
            p.copy_(torch.minimum(p, p0 + keep))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, doc_ids: torch.Tensor | None = None,
             mtp_weight: float = 0.3, balance_alpha: float = 1e-4, indexer_weight: float = 1.0,
             return_logits: bool = False, ignore_index: int = -100,
             token_mask: torch.Tensor | None = None) -> LossTerms:
        """The training objective with every term reported separately.

        labels[b, t] is the target for position t (next token), `ignore_index` to skip; by default
        labels = input_ids shifted left. MTP depth k at position t predicts labels[b, t+k].
        The indexer KL is computed in every CSA layer (its gradient reaches only the indexer).
        `doc_ids` [B,S]: packed documents (per-document attention, compression and positions;
        MTP targets that cross a document boundary are ignored). `token_mask` [B,S] bool: the
        real tokens of padded rows; padding stays out of the experts' load and balance loss (its
        labels should be `ignore_index`)."""
        if labels is None:
            labels = F.pad(input_ids[:, 1:], (0, 1), value=ignore_index)
        want_idx = indexer_weight > 0 and any(l.attn.indexer is not None for l in self.layers)
        ctx = self._context(input_ids, None, doc_ids=doc_ids, collect_balance=balance_alpha > 0,
                            collect_indexer=want_idx, token_mask=token_mask)
        streams = self.hidden_streams(input_ids, ctx)
        logits = None
        if return_logits:
            logits = self.logits_from_streams(streams)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
        else:  # the fused head + CE (model/loss.py): no [tokens, vocab] tensors kept
            ce = self._head_loss(self.norm(self.hc_head(streams)), labels, ignore_index)
        n_tokens = int((labels != ignore_index).sum())
        zero = ce.new_zeros(())
        mtp_losses = []
        if mtp_weight > 0 and len(self.mtp):
            mtp_losses = self._mtp_losses(input_ids, labels, streams, ctx, ignore_index)
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else zero
        bal = ctx.aux.balance
        balance = torch.stack(bal).mean() if bal else zero
        idx_terms = ctx.aux.indexer
        indexer = torch.stack(idx_terms).mean() if idx_terms else zero
        total = ce + mtp_weight * mtp + balance_alpha * balance + indexer_weight * indexer
        recall = torch.stack(ctx.aux.indexer_recall).mean() if ctx.aux.indexer_recall else None
        return LossTerms(total, ce, mtp, balance, indexer, n_tokens, logits, recall)

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mean CE of head(h) against labels (linear_cross_entropy; autocast as `self.head` would,
        else `head_dtype` when set). The log-softmax stays fp32 either way."""
        w = self.head.weight
        dt = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else self.head_dtype
        if dt is not None:
            h, w = h.to(dt), w.to(dt)
        return linear_cross_entropy(h, w, labels, ignore_index)

    def _mtp_losses(self, input_ids, labels, streams, ctx: ForwardContext, ignore_index: int):
        """Depth k (1-based) sees streams of positions 0..S-1-k and the embeddings of tokens
        t+k, and predicts labels[t+k] (= token t+k+1)."""
        losses = []
        s = input_ids.shape[1]
        for k, block in enumerate(self.mtp, start=1):
            if s - k <= 0:
                break
            nxt = self.embed(input_ids[:, k:])
            doc = ctx.doc_ids
            mask = ctx.token_mask  # (position t of depth k reads tokens t and t + k)
            sub = ForwardContext(positions=ctx.positions[:, : s - k], input_ids=input_ids[:, k:], cache=None,
                                 start=0, dense_csa=ctx.dense_csa, collect_balance=ctx.collect_balance,
                                 collect_indexer=ctx.collect_indexer, aux=ctx.aux,
                                 doc_ids=None if doc is None else doc[:, : s - k],
                                 token_mask=None if mask is None else mask[:, : s - k] & mask[:, k:])
            streams, h = self._block_runner(sub)(block, streams[:, : s - k], nxt, sub)
            target = labels[:, k:]
            if doc is not None:  # the module at t must not predict across a document boundary
                target = target.masked_fill(doc[:, : s - k] != doc[:, k:], ignore_index)
            if bool((target != ignore_index).any()):
                losses.append(self._head_loss(h, target, ignore_index))
        return losses

    # ---------------------------------------------------- cache & balance
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, spec_tokens: int = 0,
                  with_mtp: bool = False) -> DecodeCache:
        """Preallocated decode state for `batch_size` rows of up to `max_len` tokens.
        spec_tokens: how many rejected draft tokens `rollback` must be able to undo;
        with_mtp: also keep state for the MTP modules (speculative drafting)."""
        p = self.embed.weight
        return DecodeCache.allocate(self.config, self.config.layer_types, batch_size, max_len,
                                    dtype=dtype or p.dtype, device=device or p.device, spec_tokens=spec_tokens,
                                    mtp_layer_types=self.config.mtp_layer_types if with_mtp else ())

    def cache_nbytes(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, spec_tokens: int = 0,
                     with_mtp: bool = False) -> int:
        """The bytes new_cache(...) with these arguments would allocate (model/cache.py)."""
        dtype = dtype or self.embed.weight.dtype
        return cache_nbytes(self.config, self.config.layer_types, batch_size, max_len, dtype.itemsize, spec_tokens,
                            self.config.mtp_layer_types if with_mtp else ())

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_bias(self, speed: float = 1e-3) -> None:
        """Aux-loss-free balancing: apply the sign rule to every routed layer with the load observed
        since the last call (sum the `load` buffers across data-parallel ranks before calling)."""
        for m in self.moe_layers():
            m.update_bias(speed)

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                       decode_only: bool = False, decode_group_size: int = 2, **options) -> "Transformer":
        """Regional torch.compile (torchtitan-style, per block): blocks of the same kind (class,
        layer type, MoE routing; see block_kind) share compiled functions (parameters are graph
        inputs), so compile time grows with the number of block kinds (x grad mode), not with
        depth; the embedding, head and loss stay eager. Each kind gets its own copy of the entry
        points (its own dynamo cache), so a call checks one guard set, not every kind's graphs.

        * Uncached calls (training, scoring): each block is two graphs, `Block.front` (attention
          sub-block, mHC, norms, routing, load counter, balance / indexer terms) and `Block.back`
          (shared expert, combine, mHC expansion), with static shapes (`dynamic=False`; the MTP
          block's S-1 rows are one more static graph). Between them the MoE's grouped expert pass
          runs eagerly: its shapes depend on the routing (tokens per expert).
        * One-token decode steps: runs of consecutive blocks are one graph each (experts gathered
          per token, static shapes, cache writes in the graph; `decode_groups` picks the runs so
          that repeated runs share a graph), the last run with the hyper head, final norm and LM
          head (`_compiled_step`), with automatic dynamic shapes (a second batch size compiles
          one batch-generic graph per run kind instead of one per size).
        * Prefill chunks (multi-token calls with a cache) stay eager.

        decode_group_size: blocks per decode graph (`decode_groups`; 1 = one graph per block).
        decode_only=True compiles the one-token decode step only (uncached calls stay eager: what
        the engine's default does, so a model compiled for serving trains and scores as before).
        If the first compiled call fails to compile (no C++ toolchain, an unsupported op), a
        one-line warning is issued and the model runs eagerly from then on (uncompile_blocks);
        once a compiled call has succeeded, errors propagate.

        `options` (e.g. fullgraph=True) go to torch.compile. Returns self; `uncompile_blocks()`
        undoes it."""
        if decode_group_size < 1:
            raise ValueError(f"decode_group_size must be >= 1, got {decode_group_size}")
        raise_recompile_limits()
        kw = dict(backend=backend, mode=mode, fullgraph=fullgraph, **options)
        fns: dict = {}

        def compiled(entry, blocks):
            # one compiled copy of each entry point per block kind (a tuple of kinds for a decode
            # group), each with its own code object: dynamo keeps its graph cache and guards per
            # code object, so a call checks one guard set instead of scanning every kind's graphs
            grouped = isinstance(blocks, tuple)
            key = (entry.__name__, tuple(map(block_kind, blocks)) if grouped else block_kind(blocks))
            if key not in fns:
                code = entry.__code__.replace(co_name=f"{entry.__name__}_{len(fns)}")
                fn = types.FunctionType(code, entry.__globals__, code.co_name)
                fns[key] = (torch.compile(fn, dynamic=None if grouped else False, **kw), fn)
            return fns[key]

        self.__dict__["_compiled_blocks"] = lambda entry, blocks: compiled(entry, blocks)[0]
        groups = decode_groups([block_kind(b) for b in self.layers], decode_group_size)
        # each step's (layer indices, blocks, entry point, compiled entry, the function it
        # compiles), resolved once here rather than on every step
        plan = []
        for n, group in enumerate(groups):
            blocks = tuple(self.layers[i] for i in group)
            first, last = n == 0, n == len(groups) - 1
            entry = (_decode_only if last else _decode_first) if first else (_decode_last if last else _decode_group)
            plan.append((group, blocks, entry, *compiled(entry, blocks)))
        self.__dict__["_decode_plan"] = plan
        self.__dict__["_dispatch"] = dispatch.StepDispatch()  # steady-state steps skip dynamo's guards
        self.__dict__["_compiled_decode_only"] = decode_only
        self.__dict__["_compiled_ok"] = set()  # entry points whose first compiled call succeeded
        return self

    def uncompile_blocks(self) -> "Transformer":
        for key in ("_compiled_blocks", "_decode_plan", "_dispatch", "_compiled_decode_only", "_compiled_ok"):
            self.__dict__.pop(key, None)
        return self

    def _compiled_call(self, fn, *args):
        """Call a compiled entry point; its first call returns None (and uncompiles the model)
        if compilation fails, so the caller runs the block eagerly."""
        ok = self.__dict__["_compiled_ok"]
        if fn in ok:
            return fn(*args)
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure; eager is always correct
            warnings.warn(f"torch.compile of the model failed ({compile_failure(e)}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self.uncompile_blocks()
            return None
        ok.add(fn)
        return out

    @property
    def blocks_compiled(self) -> bool:
        return "_compiled_blocks" in self.__dict__

    def compile_kernels(self) -> "Transformer":
        """torch.compile the mHC weight computation (Sinkhorn: ~40% of the kernels a decode step
        launches) into fused kernels, for inference: calls that record gradients keep the eager
        autograd Functions (compiling the 20-iteration Sinkhorn's backward kept inductor's C++
        compiler busy for over 14 minutes on the 2-core machine). Costs ~30 s of compilation on
        first use per process; worth it for serving, not for short scripts or tests."""
        from .hyper_connections import HyperConnection, mix_weights

        compiled = torch.compile(mix_weights, dynamic=True)

        def pick(*args):
            return mix_weights(*args) if torch.is_grad_enabled() else compiled(*args)

        for m in self.modules():
            if isinstance(m, HyperConnection):
                m.mix_weights = pick
        return self

    # ---------------------------------------------------- parameters
    def num_parameters(self, activated: bool = False, include_mtp: bool | None = None) -> int:
        return count_parameters(self.config, activated=activated, include_mtp=include_mtp)

    # ---------------------------------------------------- checkpoints
    def save_pretrained(self, path: str | os.PathLike, **kw) -> None:
        checkpoint.save_pretrained(self, path, **kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device=None,
                        strict_mtp: bool = False) -> "Transformer":
        """Load a model directory (config.json + safetensors, ours / transformers' / the official
        release's names, FP8 and FP4 dequantised). The config is checked against the weights' headers on
        the meta device first, so an untrusted config.json cannot make us allocate what the
        checkpoint does not hold."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a checkpoint directory")
        config = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            skeleton = cls(config)
        expected = skeleton.state_dict()
        missing = checkpoint.check_shapes(path, {k: tuple(v.shape) for k, v in expected.items()}, strict_mtp)
        if missing:
            warnings.warn(f"{path}: checkpoint has no MTP weights ({len(missing)} tensors); MTP is randomly "
                          f"initialised", stacklevel=2)
        sd = checkpoint.read_state_dict(path)
        model = cls(config)
        for k, v in sd.items():
            sd[k] = v.to(expected[k].dtype)
        model.load_state_dict(sd, strict=False)
        if dtype is not None:
            checkpoint.cast_model(model, dtype)
        if device is not None:
            model.to(device)
        return model


def block_kind(block: nn.Module) -> tuple:
    """What distinguishes the code paths of two blocks: class, attention type, MoE routing."""
    return type(block).__name__, block.attn.layer_type, block.ffn.is_hash


def _call_block(block: nn.Module, *args):
    return block(*args)


def _split_context(ctx: ForwardContext, at: int) -> tuple[ForwardContext, ForwardContext]:
    """A prefill chunk's context cut into rows [0, at) and [at, S): two consecutive chunks."""
    def rows(lo: int, hi: int | None) -> ForwardContext:
        ids = ctx.input_ids[:, lo:hi] if ctx.input_ids is not None else None
        return dataclasses.replace(ctx, positions=ctx.positions[:, lo:hi], input_ids=ids, start=ctx.start + lo)

    return rows(0, at), rows(at, None)


# The compiled entry points (compile_blocks makes one copy with its own code object per block
# kind: dynamo keeps its graph cache per code object).
def _block_front(block: nn.Module, *args):
    return block.front(*args)


def compile_failure(e: BaseException) -> str:
    """Why a torch.compile call failed, in one line: the innermost exception of the chain (dynamo
    wraps a backend's error in BackendCompilerFailed, whose own first line names only the
    backend), and of a C++ compiler's output its first `error:` line (the command line and the
    generated file's path come before it)."""
    inner, seen = e, {id(e)}
    while (nxt := getattr(inner, "inner_exception", None) or inner.__cause__) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(nxt))
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    detail = next((line[line.index("error:"):] for line in lines if "error:" in line), lines[0] if lines else "")
    names = type(e).__name__ if inner is e else f"{type(e).__name__} <- {type(inner).__name__}"
    return f"{names}: {detail[:300]}"


def _block_back(block: nn.Module, *args):
    return block.back(*args)


def _block_back_fresh(block: nn.Module, *args):
    """_block_back as a compiled graph's entry, its streams output a tensor of its own. Traced, the
    stream mix's batched product ends in a reshape, and an output that is a view of a graph
    intermediate is returned as a view; FSDP2 warns for a module returning one (an in-place op
    on it would bypass its pre-backward hook). Used for blocks with hooks only."""
    out = block.back(*args)
    return (out[0].clone(), *out[1:]) if isinstance(out, tuple) else out.clone()


def _decode_group(blocks: tuple, streams: torch.Tensor, ctx: ForwardContext, caches: tuple) -> torch.Tensor:
    for block, cache in zip(blocks, caches):
        streams = block(streams, ctx, cache)
    return streams


def _decode_first(model: Transformer, blocks: tuple, input_ids: torch.Tensor, ctx: ForwardContext, caches: tuple):
    return _decode_group(blocks, model._input_streams(input_ids), ctx, caches)


def _decode_last(model: Transformer, blocks: tuple, streams: torch.Tensor, ctx: ForwardContext, caches: tuple):
    streams = _decode_group(blocks, streams, ctx, caches)
    return model.logits_from_streams(streams), streams


def _decode_only(model: Transformer, blocks: tuple, input_ids: torch.Tensor, ctx: ForwardContext, caches: tuple):
    return _decode_last(model, blocks, model._input_streams(input_ids), ctx, caches)


def decode_groups(kinds: list, size: int = 2) -> list[tuple[int, ...]]:
    """How a compiled decode step splits the blocks into graphs: runs of `size` consecutive
    blocks, the first run possibly shorter. Of the `size` possible alignments it takes the one
    whose distinct runs hold the fewest blocks (what inductor compiles; the first run, which also
    computes the step's head, and the last, which computes its tail, always count as distinct),
    then the one with fewer runs.

    `small` ([sliding, CSA, HCA, CSA, HCA, CSA, HCA, CSA]): [0], [1, 2], [3, 4], [5, 6], [7]: five
    graph entries a step instead of nine (eight blocks + the tail), and four blocks' worth of
    graphs to compile (head + sliding, CSA + HCA, CSA + tail) instead of three."""
    n = len(kinds)
    best = None
    for offset in range(min(size, n)):
        starts = sorted({0, *range(offset, n, size)})
        groups = [tuple(range(a, b)) for a, b in zip(starts, starts[1:] + [n])]
        distinct = {(tuple(kinds[i] for i in g), i == 0, i == len(groups) - 1) for i, g in enumerate(groups)}
        cost = (sum(len(k) for k, _, _ in distinct), len(groups))
        if best is None or cost < best[0]:
            best = (cost, groups)
    return best[1]


def raise_recompile_limits(limit: int = 64) -> None:
    """Dynamo keeps at most `recompile_limit` (default 8) graphs per code object and silently falls
    back to eager beyond it; grad modes, batch sizes and eval/train switches each add graphs to a
    block kind's entry points, so raise the limit rather than risk a silent fallback."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dcfg, name, limit) < limit:
            setattr(dcfg, name, limit)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its document ([B,S] doc ids -> [B,S], 0 at each doc start)."""
    b, s = doc_ids.shape
    t = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values


def count_parameters(config: ModelConfig, activated: bool = False, include_mtp: bool | None = None,
                     model: "Transformer | None" = None) -> int:
    """Parameter count from the config alone (meta device: no memory). `activated` counts the
    parameters one token uses: top-k routed experts + the shared one, without the embedding
    table (a lookup) and -- unless include_mtp=True -- without the MTP module, which is the
    convention under which the V4 release reports 284B/13B (Flash) and 1.6T/49B (Pro).
    include_mtp=None: the convention (totals with MTP, activated counts without); a training
    step computes the MTP block too, so its FLOPs use activated=True, include_mtp=True.
    Pass `model` to reuse a built one."""
    if include_mtp is None:
        include_mtp = not activated
    if model is None:
        with torch.device("meta"):
            model = Transformer(config)
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") and not include_mtp:
            continue
        n = p.numel()
        if activated and ".experts.w" in name:
            n = n // config.n_routed_experts * config.num_experts_per_tok
        if activated and name == "embed.weight":
            continue
        total += n
    return total
