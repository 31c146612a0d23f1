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

from .._runtime import available_memory
from ..config import CSA, HCA, ModelConfig


@dataclass
class CompressorState:
    kv: torch.Tensor  # [B, coff*m, coff*d] fp32 projections of buffered tokens
    gate: torch.Tensor  # [B, coff*m, coff*d] fp32 gates (+ape) of buffered tokens; -inf = empty
    entries: torch.Tensor  # [B, max_len // m, d] compressed entries
    last_chunk: tuple | None = None  # (start, kv, gate) of the last multi-token chunk, for rollback

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
    spec_tokens: int = 0  # extra ring slots so that this many rejected tokens can be rolled back
    mtp_layers: list[LayerCache] = field(default_factory=list)  # one sliding-window ring per MTP depth
    mtp_pos: list[torch.Tensor] = field(default_factory=list)  # [B] positions consumed per MTP depth

    @classmethod
    def allocate(cls, config: ModelConfig, layer_types: list[str], batch: int, max_len: int,
                 dtype=torch.float32, device=None, spec_tokens: int = 0,
                 mtp_layer_types: list[str] = ()) -> "DecodeCache":
        """The cache, zero-filled. Raises ValueError, before allocating anything, when it would
        not fit in the memory available on `device` (an absurd max_len must end in a clear
        error, not in the kernel's OOM killer)."""
        need = cache_nbytes(config, layer_types, batch, max_len, dtype.itemsize, spec_tokens, mtp_layer_types)
        ensure_fits(need, f"a decode cache of {batch} x {max_len:,} tokens", max_len, config, device)
        ring = config.sliding_window + spec_tokens
        layers = []
        for t in list(layer_types) + list(mtp_layer_types):
            lc = LayerCache(window=torch.zeros(batch, ring, config.head_dim, dtype=dtype, device=device))
            if t in (CSA, HCA):
                rate = config.compress_rate(t)
                lc.compressor = CompressorState.allocate(batch, rate, config.head_dim, t == CSA, max_len, dtype, device)
                if t == CSA:
                    lc.indexer = CompressorState.allocate(batch, rate, config.index_head_dim, True, max_len, dtype, device)
            layers.append(lc)
        n_main = len(layer_types)
        return cls(layers=layers[:n_main], pos=torch.zeros(batch, dtype=torch.long, device=device),
                   max_len=max_len, spec_tokens=spec_tokens, mtp_layers=layers[n_main:],
                   mtp_pos=[torch.zeros(batch, dtype=torch.long, device=device) for _ in mtp_layer_types])

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        """Bytes held (cache_nbytes says the same before allocating)."""
        return sum(t.numel() * t.element_size() for lc in self.layers + self.mtp_layers for t in lc.tensors())

    def states(self) -> list[CompressorState]:
        return [s for lc in self.layers for s in (lc.compressor, lc.indexer) if s is not None]

    def snapshot(self) -> dict:
        """What a rollback needs: positions and the (small) compressor buffers. The window ring
        needs no copy as long as at most `spec_tokens` tokens are rolled back."""
        return {"pos": self.pos.clone(), "mtp_pos": [p.clone() for p in self.mtp_pos],
                "states": [(s.kv.clone(), s.gate.clone()) for s in self.states()]}

    def copy_row_(self, dst: int, src: "DecodeCache", src_row: int = 0) -> None:
        """Copy one row of another cache (e.g. a request prefilled alone) into row `dst`."""
        for a, b in zip(self.layers + self.mtp_layers, src.layers + src.mtp_layers):
            for ta, tb in zip(a.tensors(), b.tensors()):
                ta[dst].copy_(tb[src_row])
        self.pos[dst] = src.pos[src_row]
        for a, b in zip(self.mtp_pos, src.mtp_pos):
            a[dst] = b[src_row]

    def reset_row_(self, row: int) -> None:
        for p in self.mtp_pos:
            p[row] = 0
        for lc in self.layers + self.mtp_layers:
            lc.window[row].zero_()
            for s in (lc.compressor, lc.indexer):
                if s is not None:
                    s.kv[row].zero_()
                    s.gate[row].fill_(float("-inf"))
                    s.entries[row].zero_()
        self.pos[row] = 0


def cache_nbytes(config: ModelConfig, layer_types, batch: int, max_len: int, dtype_bytes: int = 4,
                 spec_tokens: int = 0, mtp_layer_types=()) -> int:
    """The bytes DecodeCache.allocate(config, layer_types, batch, max_len, ...) would hold (its
    nbytes()), from the layout alone: `dtype_bytes` for the window rings and compressed entries,
    fp32 for the compressor states."""
    ring = config.sliding_window + spec_tokens
    row = 0
    for t in list(layer_types) + list(mtp_layer_types):
        row += ring * config.head_dim * dtype_bytes
        if t in (CSA, HCA):
            rate = config.compress_rate(t)
            row += _state_nbytes(rate, config.head_dim, t == CSA, max_len, dtype_bytes)
            if t == CSA:
                row += _state_nbytes(rate, config.index_head_dim, True, max_len, dtype_bytes)
    return batch * row


def _state_nbytes(rate: int, head_dim: int, overlap: bool, max_len: int, dtype_bytes: int) -> int:
    """One row of CompressorState.allocate: fp32 kv and gate, and the entries."""
    coff = 2 if overlap else 1
    return 2 * (coff * rate) * (coff * head_dim) * 4 + (max_len // rate) * head_dim * dtype_bytes


CHECK_BYTES = 256 << 20  # smaller caches are not checked (reading the free memory costs ~0.2 ms)


def ensure_fits(need: int, what: str, max_len: int, config: ModelConfig, device) -> None:
    """ValueError when `need` bytes of decode caches (`what`, for the message; rows of up to
    `max_len` tokens) exceed what `device` has available (unknown: no check)."""
    if need < CHECK_BYTES:
        return
    avail = available_memory(device if device is not None else "cpu")
    if avail is None or need <= avail:
        return
    trained = config.max_position_embeddings
    beyond = f"; the model was built for {trained:,} positions" if max_len > trained else ""
    raise ValueError(f"{what} needs {_size(need)}, more than the {_size(avail)} of memory available: ask for "
                     f"fewer tokens or rows{beyond}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 1 << 30 else f"{n / 2**20:.1f} MiB"
