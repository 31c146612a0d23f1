"""KV compressors of CSA (overlapping, m=4) and HCA (m'=128): learned softmax pooling of windows.

Spec 1.4; V4 report eqs. 9-12 (CSA) and 20-23 (HCA).

For every token the compressor projects the hidden state to a value C and a gate Z (both in
fp32, as the reference does). A window of m tokens becomes one compressed KV entry

    entry_i = RMSNorm( sum_j softmax_j(Z_j + B_j) * C_j ),   RoPE at position m*i,

with the softmax taken over the window, per channel, and B a learned position bias ("ape").
CSA uses *overlapping* windows: projections are 2d wide; entry i pools 2m slots, the first
half of window i-1's channels (`[:d]`) and the second half of window i's channels (`[d:]`), so
each entry sees 2m tokens with stride m. Window -1 contributes nothing (gate -inf).

Three ways to run it, all producing bit-compatible entries:
* `full`: a whole sequence at once (training / uncached forward); incomplete tail dropped.
* `chunk`: a multi-token chunk appended to a decode cache (prefill, chunked prefill); all rows
  start at the same position.
* `step`: one token per row, rows at different positions (batched decode), like the official
  state machine: the partial window lives in `state.kv/gate[:, m:]` (overlap) and the previous
  full window in `state.kv/gate[:, :m]`.
"""

from __future__ import annotations

import torch
from torch import nn

from .gemv import Linear, linear
from .norm import RMSNorm
from .precision import fp32_region
from .rope import apply_rope, rope_angles


class Compressor(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int, rate: int, overlap: bool, rope_dim: int, eps: float):
        super().__init__()
        self.d, self.m, self.overlap, self.rope_dim = head_dim, rate, overlap, rope_dim
        coff = 2 if overlap else 1
        self.wkv = Linear(hidden_size, coff * head_dim, bias=False, dtype=torch.float32)
        self.wgate = Linear(hidden_size, coff * head_dim, bias=False, dtype=torch.float32)
        self.ape = nn.Parameter(torch.zeros(rate, coff * head_dim, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, eps)

    # ----------------------------------------------------------------- pieces
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 value and gate projections [B, S, coff*d] (autocast off: the reference runs in fp32)."""
        with fp32_region(x.device.type):
            xf = x.float()
            return linear(xf, self.wkv.weight.float()), linear(xf, self.wgate.weight.float())

    def pool(self, kv: torch.Tensor, gate: torch.Tensor, prev_kv=None, prev_gate=None) -> torch.Tensor:
        """kv/gate [B, n, m, coff*d] (gate already includes ape) -> pooled [B, n, d] fp32.

        prev_kv/prev_gate [B, m, coff*d]: the window before the first one (overlap only)."""
        if not self.overlap:
            return (kv * gate.softmax(dim=2)).sum(dim=2)
        d, m = self.d, self.m
        b, n = kv.shape[:2]
        first_kv = kv.new_zeros(b, 1, m, d) if prev_kv is None else prev_kv[:, None, :, :d]
        first_gate = gate.new_full((b, 1, m, d), float("-inf")) if prev_gate is None else prev_gate[:, None, :, :d]
        # slots 0..m-1: previous window's first half; slots m..2m-1: this window's second half
        kv2 = torch.cat([torch.cat([first_kv, kv[:, :-1, :, :d]], dim=1), kv[..., d:]], dim=2)
        gate2 = torch.cat([torch.cat([first_gate, gate[:, :-1, :, :d]], dim=1), gate[..., d:]], dim=2)
        return (kv2 * gate2.softmax(dim=2)).sum(dim=2)

    def finish(self, pooled: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> torch.Tensor:
        """RMSNorm + RoPE at each entry's window-start position. pooled [B,n,d], positions [B,n]."""
        entries = self.norm(pooled.to(dtype))
        cos, sin = rope_angles(positions, inv_freq)
        return apply_rope(entries, cos, sin)

    # ------------------------------------------------------------------ modes
    def full(self, x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """Whole sequence from position 0 -> entries [B, S // m, d]."""
        b, s, _ = x.shape
        n = s // self.m
        if n == 0:
            return x.new_zeros(b, 0, self.d)
        kv, gate = self.project(x[:, : n * self.m])
        kv = kv.unflatten(1, (n, self.m))
        gate = gate.unflatten(1, (n, self.m)) + self.ape
        positions = (torch.arange(n, device=x.device) * self.m).expand(b, n)
        return self.finish(self.pool(kv, gate), positions, inv_freq, x.dtype)

    def packed(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor, inv_freq: torch.Tensor):
        """Per-document compression of packed rows (V4 report 3.5.3): windows start at each
        document's first token, a document's incomplete tail is dropped, the overlap never reaches
        into the previous document. positions [B,S] are document-relative.

        Returns entries [B,N,d] (N = most complete windows in a row), ends [B,N] (row index of
        each window's last token; S for padding) and valid [B,N]."""
        b, s, _ = x.shape
        m, d = self.m, self.d
        t = torch.arange(s, device=x.device).expand(b, s)
        is_end = positions % m == m - 1
        # N = s // m bounds every row's count of complete windows; extra slots are padding
        # (valid=False, never visible), so N is static: no host sync, no dynamic shape
        n = s // m
        if n == 0:
            return x.new_zeros(b, 0, d), t.new_full((b, 0), s), is_end.new_zeros(b, 0)
        ends = torch.where(is_end, t, s).sort(dim=1).values[:, :n]
        valid = ends < s
        ends_c = ends.clamp(max=s - 1)
        kv, gate = self.project(x)
        rows = torch.arange(b, device=x.device)[:, None, None]
        idx = (ends_c.unsqueeze(-1) - (m - 1) + torch.arange(m, device=x.device)).clamp(min=0)  # [B,N,m]
        w_kv, w_gate = kv[rows, idx], gate[rows, idx] + self.ape
        end_pos = positions.gather(1, ends_c)
        if self.overlap:
            has_prev = (valid & (end_pos >= 2 * m - 1))[..., None, None]  # previous window in the same doc
            pidx = (idx - m).clamp(min=0)
            p_kv = kv[rows, pidx][..., :d].masked_fill(~has_prev, 0.0)
            p_gate = (gate[rows, pidx] + self.ape)[..., :d].masked_fill(~has_prev, float("-inf"))
            kv2 = torch.cat([p_kv, w_kv[..., d:]], dim=2)
            gate2 = torch.cat([p_gate, w_gate[..., d:]], dim=2)
            pooled = (kv2 * gate2.softmax(dim=2)).sum(dim=2)
        else:
            pooled = (w_kv * w_gate.softmax(dim=2)).sum(dim=2)
        entries = self.finish(pooled, end_pos - (m - 1), inv_freq, x.dtype)
        return entries, ends, valid

    def chunk(self, x: torch.Tensor, state, start: int, inv_freq: torch.Tensor) -> tuple[int, int]:
        """Append a chunk starting at absolute position `start` (same for all rows) to `state`.

        Writes the newly completed entries into state.entries and returns (first, count). The
        chunk's projections are remembered in `state.last_chunk` so that a speculative-decoding
        rollback can re-absorb only the accepted prefix (see DecodeCache.rollback)."""
        kv, gate = self.project(x)
        gate = gate + self.ape[(torch.arange(x.shape[1], device=x.device) + start) % self.m]
        state.last_chunk = (start, kv, gate)
        return self.absorb(kv, gate, state, start, inv_freq, x.dtype)

    def absorb(self, kv: torch.Tensor, gate: torch.Tensor, state, start: int, inv_freq: torch.Tensor, dtype):
        """Feed projected tokens (gate already includes ape) into the state; pool completed windows."""
        b, s = kv.shape[:2]
        m = self.m
        off = m if self.overlap else 0
        r = start % m  # tokens of the current window already buffered
        seq_kv = torch.cat([state.kv[:b, off : off + r], kv], dim=1)
        seq_gate = torch.cat([state.gate[:b, off : off + r], gate], dim=1)
        n = (r + s) // m
        first = start // m
        if n:
            usable = n * m
            w_kv = seq_kv[:, :usable].unflatten(1, (n, m))
            w_gate = seq_gate[:, :usable].unflatten(1, (n, m))
            prev_kv = prev_gate = None
            if self.overlap and first > 0:
                prev_kv, prev_gate = state.kv[:b, :m], state.gate[:b, :m]
            pooled = self.pool(w_kv, w_gate, prev_kv, prev_gate)
            positions = ((torch.arange(n, device=kv.device) + first) * m).expand(b, n)
            state.entries[:b, first : first + n] = self.finish(pooled, positions, inv_freq, dtype).to(
                state.entries.dtype
            )
            if self.overlap:  # the last complete window becomes the overlap state
                state.kv[:b, :m] = seq_kv[:, usable - m : usable]
                state.gate[:b, :m] = seq_gate[:, usable - m : usable]
            seq_kv, seq_gate = seq_kv[:, usable:], seq_gate[:, usable:]
        rem = seq_kv.shape[1]
        state.kv[:b, off : off + rem] = seq_kv
        state.gate[:b, off : off + rem] = seq_gate
        return first, n

    def step(self, x: torch.Tensor, state, pos: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """One token per row at per-row positions `pos` [B]; completes an entry where (pos+1) % m == 0."""
        b = x.shape[0]
        m = self.m
        off = m if self.overlap else 0
        rows = torch.arange(b, device=x.device)
        slot = pos % m
        kv, gate = self.project(x[:, 0])
        state.kv[rows, off + slot] = kv
        state.gate[rows, off + slot] = gate + self.ape[slot]
        closing = (pos + 1) % m == 0
        compiling = torch.compiler.is_compiling()
        if not compiling and not bool(closing.any()):  # eager: skip the pooling on 3 of 4 steps
            return
        cur_kv, cur_gate = state.kv[:b, off:].unsqueeze(1), state.gate[:b, off:].unsqueeze(1)
        if self.overlap:
            pooled = self.pool(cur_kv, cur_gate, state.kv[:b, :m], state.gate[:b, :m])
        else:
            pooled = self.pool(cur_kv, cur_gate)
        entry_idx = pos // m
        entries = self.finish(pooled, (entry_idx * m).unsqueeze(1), inv_freq, x.dtype)[:, 0]
        if compiling:
            # torch.compile: no data-dependent branch or row selection; every row computes the
            # entry and only closing rows write it (the others write back what they hold), so
            # the step is one static-shape graph with the same results
            keep = closing.unsqueeze(1)
            if state.entries.shape[1]:  # (a cache shorter than m tokens has no entry slot to write)
                entry_idx = entry_idx.clamp(max=state.entries.shape[1] - 1)
                old = state.entries[rows, entry_idx]
                state.entries[rows, entry_idx] = torch.where(keep, entries.to(state.entries.dtype), old)
            if self.overlap:
                keep = keep.unsqueeze(2)
                state.kv[:b, :m] = torch.where(keep, state.kv[:b, m:], state.kv[:b, :m])
                state.gate[:b, :m] = torch.where(keep, state.gate[:b, m:], state.gate[:b, :m])
            return
        sel = rows[closing]
        state.entries[sel, entry_idx[closing]] = entries[closing].to(state.entries.dtype)
        if self.overlap:
            state.kv[sel, :m] = state.kv[sel, m:]
            state.gate[sel, :m] = state.gate[sel, m:]
