"""Per-call state threaded through the blocks of one forward pass (no global state).

`positions` are absolute token positions [B, S]. `cache` is None for an uncached forward
(training, scoring) or a DecodeCache; `start` is then the common start position of a
multi-token chunk, or None for a one-token step with per-row positions. With `doc_ids`
(uncached only), attention and compression stay inside each document and positions restart
at every document's first token. `token_mask` marks the real tokens of padded rows (training).
The `collect_*` flags
ask blocks to record auxiliary training quantities into `aux`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import DecodeCache


class AuxTerms:
    """Per-call collector of auxiliary loss terms. A plain object on purpose: FSDP2's pre-forward
    hook rebuilds dataclass / dict / list arguments of every wrapped block, which would hand each
    block a private copy; an opaque object is passed through by reference."""

    def __init__(self):
        self.balance: list = []  # sequence-wise balance terms, one per routed MoE layer
        self.indexer: list = []  # indexer KL terms, one per CSA layer
        self.indexer_recall: list = []  # share of the true top-k entries the indexer picked, per CSA layer


@dataclass
class ForwardContext:
    positions: torch.Tensor
    input_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None  # [B,S] document id per position (packed training rows)
    # [B,S] bool, True at real tokens (None: every position): padding is left out of the routed
    # experts' load (the aux-loss-free bias update) and of the sequence-wise balance loss
    token_mask: torch.Tensor | None = None
    cache: DecodeCache | None = None
    start: int | None = 0
    dense_csa: bool = False  # indexer warm-up: CSA attends to every complete entry
    collect_balance: bool = False  # record router statistics for the sequence-wise balance loss
    collect_indexer: bool = False  # record indexer KL terms
    aux: "AuxTerms" = field(default_factory=lambda: AuxTerms())
