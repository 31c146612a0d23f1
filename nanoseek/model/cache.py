"""Decode-time state of a DeepSeek-V4 model: one fixed-size record per attention layer.

Spec section 2. Per sequence (row) and layer:
* every layer: a ring of the last `sliding_window` KV vectors (after norm + RoPE); slot p % W
  holds position p, so the prompt beyond the window is dropped as soon as it is written;
* HCA layers: the compressed entries (one per m' tokens) and the compressor state (the partial
  window's fp32 projections and gates);
* CSA layers: the same at m, plus the overlap state (the previous full window), plus the
  lightning-indexer keys and the indexer compressor's state.

`pos[b]` counts the tokens row b has consumed. Multi-token calls (prefill, chunked prefill)
need all rows at the same position; single-token calls (decode) accept a different position
per row, which is what continuous batching needs. Everything is preallocated for `max_len`
tokens, so decode never allocates. `nbytes()` reports the memory actually held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CSA, HCA, ModelConfig


@dataclass
class CompressorState:
    kv: torch.Tensor  # [B, coff*m, coff*d] fp32 projections of buffered tokens
    gate: torch.Tensor  # [B, coff*m, coff*d] fp32 gates (+ape) of buffered tokens; -inf = empty
    entries: torch.Tensor  # [B, max_len // m, d] compressed entries

    @classmethod
    def allocate(cls, batch: int, rate: int, head_dim: int, overlap: bool, max_len: int, dtype, device):
        coff = 2 if overlap else 1
        return cls(
            kv=torch.zeros(batch, coff * rate, coff * head_dim, dtype=torch.float32, device=device),
            gate=torch.full((batch, coff * rate, coff * head_dim), float("-inf"), dtype=torch.float32, device=device),
            entries=torch.zeros(batch, max_len // rate, head_dim, dtype=dtype, device=device),
        )

    def tensors(self):
        return [self.kv, self.gate, self.entries]


@dataclass
class LayerCache:
    window: torch.Tensor  # [B, W, head_dim] ring
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def tensors(self):
        out = [self.window]
        for s in (self.compressor, self.indexer):
            if s is not None:
                out += s.tensors()
        return out


@dataclass
class DecodeCache:
    layers: list[LayerCache]
    pos: torch.Tensor  # [B] tokens consumed per row
    max_len: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def allocate(cls, config: ModelConfig, layer_types: list[str], batch: int, max_len: int,
                 dtype=torch.float32, device=None) -> "DecodeCache":
        layers = []
        for t in layer_types:
            lc = LayerCache(window=torch.zeros(batch, config.sliding_window, config.head_dim, dtype=dtype, device=device))
            if t in (CSA, HCA):
                rate = config.compress_rate(t)
                lc.compressor = CompressorState.allocate(batch, rate, config.head_dim, t == CSA, max_len, dtype, device)
                if t == CSA:
                    lc.indexer = CompressorState.allocate(batch, rate, config.index_head_dim, True, max_len, dtype, device)
            layers.append(lc)
        return cls(layers=layers, pos=torch.zeros(batch, dtype=torch.long, device=device), max_len=max_len)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())

    def uniform_start(self) -> int:
        """The common position of all rows (required for multi-token calls)."""
        p = self.pos
        if p.numel() and bool((p != p[0]).any()):
            raise ValueError(
                "multi-token forward with a cache needs all rows at the same position "
                f"(got positions {p.tolist()}); feed tokens one at a time or prefill rows separately"
            )
        return int(p[0]) if p.numel() else 0

    def copy_row_(self, dst: int, src: "DecodeCache", src_row: int = 0) -> None:
        """Copy one row of another cache (e.g. a request prefilled alone) into row `dst`."""
        for a, b in zip(self.layers, src.layers):
            for ta, tb in zip(a.tensors(), b.tensors()):
                ta[dst].copy_(tb[src_row])
        self.pos[dst] = src.pos[src_row]

    def reset_row_(self, row: int) -> None:
        for lc in self.layers:
            lc.window[row].zero_()
            for s in (lc.compressor, lc.indexer):
                if s is not None:
                    s.kv[row].zero_()
                    s.gate[row].fill_(float("-inf"))
                    s.entries[row].zero_()
        self.pos[row] = 0
