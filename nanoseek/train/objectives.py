"""Training objectives plugged into the one trainer loop (nanoseek/train/trainer.py).

Pre-training, SFT, RL and distillation differ only in the objective and the data: an objective
maps (model, batch, phase) to a dict of scalar tensors whose "loss" entry is minimised; every
other entry is logged as is. The trainer handles everything else (accumulation, DDP,
clipping, schedules, checkpoints, metrics).

    class MyObjective(Objective):
        def __call__(self, model, batch, phase):
            ...
            return {"loss": loss, "my_term": term}

`phase` carries what changes over training: {"mtp_weight": 0.3 or 0.1, "step": int}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Objective:
    """Base class: subclasses implement __call__ returning {"loss": ..., other terms...}."""

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass
class PretrainObjective(Objective):
    """Next-token cross-entropy + MTP + sequence-wise balance loss + indexer KL (spec 1.6-1.7, 3).

    The MTP weight comes from `phase` (the trainer lowers it from 0.3 to 0.1 when LR decay
    starts, as V4 does)."""

    balance_alpha: float = 1e-4
    indexer_weight: float = 1.0

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        # doc_ids: packed documents attend and compress only within themselves (V4 report 3.5.3, 4.1)
        t = model.loss(batch["input_ids"], batch.get("labels"), doc_ids=batch.get("doc_ids"),
                       mtp_weight=phase.get("mtp_weight", 0.3),
                       balance_alpha=self.balance_alpha, indexer_weight=self.indexer_weight)
        out = {"loss": t.loss, "ce": t.ce.detach(), "mtp": t.mtp.detach(), "balance": t.balance.detach(),
               "indexer": t.indexer.detach()}
        if t.indexer_recall is not None:  # present on every step of a model with CSA layers
            out["indexer_recall"] = t.indexer_recall
        return out
