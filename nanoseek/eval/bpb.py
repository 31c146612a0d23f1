"""Bits per byte on a held-out split: the tokenizer-independent language-modelling metric.

    bpb = sum over target tokens of -ln p(token)  /  (ln 2 * sum of the tokens' UTF-8 bytes)

Targets that decode to zero bytes (special tokens such as EOS, BOS, FIM markers) are left out
of both sums, so bpb measures how well the model compresses the text itself and is comparable
across tokenizers and vocabulary sizes (the nanochat convention). Documents are evaluated with
per-document attention (`doc_ids` from the packing loader), i.e. each document sees only itself.

    nanoseek eval bpb --model CKPT --shards data/shards [--tokenizer DIR] [--split val]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bits_per_byte_sums(token_nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor):
    """(sum of nats, sum of bytes) as float64 tensors over targets that stand for >= 1 byte of
    text; -100 targets and zero-byte (special) targets are left out of both sums."""
    t = targets.reshape(-1)
    nb = token_bytes.to(t.device)[t.clamp_min(0)] * (t != -100)
    keep = nb > 0
    return token_nats.reshape(-1)[keep].double().sum(), nb.double().sum()


def bpb_sums(logits: torch.Tensor, labels: torch.Tensor, token_bytes: torch.Tensor) -> tuple[float, int, int]:
    """(sum of nats, sum of bytes, counted tokens) for one batch of logits; labels -100 are ignored."""
    nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    n, b = bits_per_byte_sums(nats, labels, token_bytes)
    counted = int(((token_bytes.to(labels.device)[labels.clamp(min=0)] > 0) & (labels != -100)).sum())
    return float(n), int(b), counted


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes, max_tokens: int | None = None, progress: bool = False, *,
                 device=None, autocast=None, reduce=None) -> dict:
    """bpb of `model` over an iterable of loader batches (dicts with input_ids, labels, doc_ids).

    The one evaluation loop of nanoseek (`nanoseek eval bpb` and the trainer's validation):
      bpb, nats_per_token, tokens, bytes   over targets that stand for text (>= 1 byte)
      loss, supervised_tokens              mean nats over every supervised target (-100 left out)
    device: where batches go (default: where they are); autocast: a context factory wrapped
    around the forward; reduce: called on the float64 vector of sums before the ratios are
    taken (the trainer all-reduces it over data-parallel ranks)."""
    import contextlib

    token_bytes = torch.as_tensor(token_bytes)
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # nats(text), bytes, text tokens, nats(all), supervised
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="bpb", unit="tok", total=max_tokens)
    try:
        for batch in batches:
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items() if v is not None}
            labels = batch["labels"]
            with autocast():
                logits = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
            nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   reduction="none")
            n, b = bits_per_byte_sums(nats, labels, token_bytes)
            counted = ((token_bytes.to(labels.device)[labels.clamp(min=0)] > 0) & (labels != -100)).sum()
            sums += torch.stack([n.cpu(), b.cpu(), counted.double().cpu(), nats.double().sum().cpu(),
                                 (labels != -100).sum().double().cpu()])
            if bar is not None:
                bar.update(int(counted))
            if max_tokens is not None and sums[2] >= max_tokens:
                break
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if reduce is not None:
        reduce(sums)
    nats_text, nbytes, tokens, nats_all, supervised = sums.tolist()
    return {"bpb": nats_text / (math.log(2) * nbytes) if nbytes else float("nan"),
            "nats_per_token": nats_text / tokens if tokens else float("nan"),
            "tokens": int(tokens), "bytes": int(nbytes),
            "loss": nats_all / supervised if supervised else float("nan"), "supervised_tokens": int(supervised)}


def run_bpb(model_dir, shard_dir, tokenizer_dir=None, split: str = "val", batch_size: int = 4,
            seq_len: int = 512, max_tokens: int | None = None, progress: bool = True) -> dict:
    from ..data.shards import TokenLoader
    from ..engine.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, tokenizer_dir)
    loader = TokenLoader(shard_dir, split, batch_size=batch_size, seq_len=seq_len, tokenizer=tok,
                         shuffle=False, loop=False, rank=0, world_size=1)
    res = evaluate_bpb(model, loader, tok.token_byte_lengths(), max_tokens=max_tokens, progress=progress)
    res.update({"task": "bpb", "split": split, "model": str(model_dir), "shards": str(shard_dir),
                "seq_len": seq_len})
    return res
