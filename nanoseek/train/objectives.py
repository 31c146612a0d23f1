"""Training objectives plugged into the one trainer loop (nanoseek/train/trainer.py).

Pre-training, SFT, RL and distillation differ only in their objective: an objective is
  * a batch source -- `make_loader(run, index, n_data, seed)` returns an iterator of batches
    (dicts of tensors) with `state_dict()` / `load_state_dict()` for exact resume; the trainer
    creates one per accumulation micro-step and rank, `index` of `n_data` (a data shard);
  * a loss -- `__call__(model, batch, phase)` returns a dict of scalar tensors whose "loss"
    entry is minimised; every other entry is logged as is (averaged over micro-steps and ranks);
  * metrics -- `val_batches(run)` (held-out batches for the validation loss / bits-per-byte),
    `step_metrics()` (extra per-step numbers) and `summary()` (extra numbers for summary.json).
The trainer does everything else: accumulation, DDP / FSDP2, clipping, schedules, the MoE bias
update, checkpoints with exact resume, the progress bar, JSONL / TensorBoard metrics, the report.

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
    """Base class: subclasses implement __call__ and the batch source (module docstring)."""

    name = "objective"

    def vocab_size(self, cfg) -> int | None:
        """The vocabulary the data is written in (checked against the model), if known."""
        return None

    def prepare(self, run) -> None:
        """Called once on every rank after the model is built, before loaders are made."""

    def make_loader(self, run, index: int, n_data: int, seed: int):
        raise NotImplementedError

    def val_batches(self, run):
        """Held-out batches for this rank (an iterable), or None for no validation."""
        return None

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}


def model_loss_terms(model, batch: dict, phase: dict, balance_alpha: float, indexer_weight: float,
                     mtp_weight: float | None = None) -> dict[str, torch.Tensor]:
    """Next-token CE on batch["labels"] (-100 = not a target) + MTP + balance + indexer KL,
    each reported separately (the pre-training loss; SFT is the same with masked labels)."""
    # doc_ids: packed documents attend and compress only within themselves (V4 report 3.5.3, 4.1)
    t = model.loss(batch["input_ids"], batch.get("labels"), doc_ids=batch.get("doc_ids"),
                   mtp_weight=phase.get("mtp_weight", 0.3) if mtp_weight is None else mtp_weight,
                   balance_alpha=balance_alpha, indexer_weight=indexer_weight)
    out = {"loss": t.loss, "ce": t.ce.detach(), "mtp": t.mtp.detach(), "balance": t.balance.detach(),
           "indexer": t.indexer.detach()}
    if t.indexer_recall is not None:  # present on every step of a model with CSA layers
        out["indexer_recall"] = t.indexer_recall
    return out


@dataclass
class PretrainObjective(Objective):
    """Next-token cross-entropy + MTP + sequence-wise balance loss + indexer KL (spec 1.6-1.7, 3)
    over packed token shards (`TrainConfig.shard_dir`, nanoseek.data.shards.TokenLoader).

    The MTP weight comes from `phase` (the trainer lowers it from 0.3 to 0.1 when LR decay
    starts, as V4 does)."""

    balance_alpha: float = 1e-4
    indexer_weight: float = 1.0
    name = "pretrain"

    def vocab_size(self, cfg) -> int:
        from nanoseek.data.shards import load_index

        self._index = load_index(cfg.shard_dir)
        return int(self._index["vocab_size"])

    def make_loader(self, run, index: int, n_data: int, seed: int):
        from nanoseek.data.shards import TokenLoader

        c = run.cfg
        return TokenLoader(c.shard_dir, "train", c.micro_batch, c.seq_len, rank=index, world_size=n_data,
                           seed=seed, fim_rate=c.fim_rate)

    def val_batches(self, run):
        from nanoseek.data.shards import TokenLoader, load_index

        c, d = run.cfg, run.dist
        index = getattr(self, "_index", None) or load_index(c.shard_dir)
        if "val" not in index["splits"] or index["splits"]["val"]["docs"] < d.world:
            return None
        limit = max(1, c.eval_tokens // (c.micro_batch * c.seq_len * d.world))

        def gen():
            ld = TokenLoader(c.shard_dir, "val", c.micro_batch, c.seq_len, rank=d.rank, world_size=d.world,
                             shuffle=False, loop=False)
            for i, b in enumerate(ld):
                if i >= limit:
                    break
                yield b

        return gen()

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        return model_loss_terms(model, batch, phase, self.balance_alpha, self.indexer_weight)
