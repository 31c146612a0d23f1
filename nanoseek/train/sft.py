"""Supervised fine-tuning (SFT) data: chat conversations -> token ids + loss mask.

A conversation is rendered with the DeepSeek-V4 chat encoding (nanoseek.chat_format), the very
encoding the server and `nanoseek chat` prompt the model with, so fine-tuning and serving see
the same tokens. The loss mask selects what the model must learn to write: the assistant turns
(reasoning and `</think>` where the encoding keeps them, the answer, DSML tool calls and the
end-of-sentence token). Everything the model only reads (BOS, system prompt, user turns, tool
results, the tools block, the `<｜Assistant｜><think>` generation prompt) is masked out.
Message text is always tokenized as text, so a conversation that quotes a special-token string
cannot forge a control token.

    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.train.sft import render

    tok = load_tokenizer("runs/tokenizer")
    ids, loss_mask = render([{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "add"}],
                            tok, thinking_mode="thinking")
    # tok.decode(ids) == chat_format.encode_messages(messages, "thinking")
    # loss_mask[i] is True where ids[i] is a target (predicted from position i-1):
    # here the tokens of "add", "</think>", "4" and "<｜end▁of▁sentence｜>".

See docs/chat_format.md ("Token ids and the loss mask") for the exact rules.

Training (`nanoseek sft MODEL --data FILE.jsonl[:WEIGHT] ... --out DIR`): SFTData renders every
conversation once (thinking mode for a --thinking-ratio share of those with reasoning; a
conversation longer than a row is cut at turn boundaries, a turn longer than a row dropped),
SFTLoader packs whole conversations into rows with per-document attention (the `doc_ids` path
of pre-training), and SFTObjective is the pre-training loss on those rows with labels only on
the assistant tokens -- one more objective on the one trainer loop (trainer.py).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from .. import chat_format
from ..jsonl import INVALID, scan_jsonl
from .config_checks import FLOAT, INT, check_ranges
from .objectives import Objective, model_loss_terms, step_share

if TYPE_CHECKING:
    from .trainer import TrainConfig


def render(messages: list[dict[str, Any]], tokenizer: Any, thinking_mode: str = "chat",
           tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and its loss mask (two lists of the same length).

    messages: OpenAI-style messages as chat_format.encode_messages takes them (assistant turns
        may carry "reasoning_content" and "tool_calls"; tool results are "tool" messages).
    tokenizer: a nanoseek Tokenizer (or any object with `special_tokens` and an `encode(text)`
        that treats special-token strings as text).
    thinking_mode: "chat" or "thinking", as in chat_format.
    tools: request-level OpenAI tools, rendered into the (masked) tools block.

    loss_mask[i] True means token i is a training target, i.e. the logits at position i-1 are
    trained to predict ids[i]. Raises TypeError/ValueError on malformed messages.
    """
    return chat_format.encode_ids(messages, tokenizer, thinking_mode=thinking_mode, tools=tools)


# ---------------------------------------------------------------------------------------------
# SFT data: JSONL files -> rendered examples -> packed rows (the SFT objective's batch source)

IGNORE_INDEX = -100
# SFT learning rate as a share of the pre-training LR of the same width (presets.py): a fine-tune
# moves the weights less than pre-training does; 0.3 keeps a CPU-sized model learning the chat
# format within a few hundred steps without washing out what pre-training taught it.
SFT_LR_FRACTION = 0.3


@dataclass
class SFTConfig:
    """What `nanoseek sft` reads and how it renders it (the loop's settings are a TrainConfig)."""

    data: list[str] = field(default_factory=list)  # "file.jsonl" or "file.jsonl:WEIGHT"
    thinking_ratio: float = 0.0      # share of examples (with reasoning) rendered in thinking mode
    val_fraction: float = 0.05       # held-out share of the examples (at most max_val), for val loss
    max_val: int = 256
    min_val_pool: int = 20           # fewer examples than this: no held-out split
    epochs: float | None = None      # horizon in passes over the (weighted) data, if no steps/minutes

    def check(self) -> None:
        """ValueError naming every out-of-range setting (config_checks.py)."""
        check_ranges(self, "SFTConfig", {"max_val": INT(0), "min_val_pool": INT(0)},
                     {"thinking_ratio": FLOAT(0, 1), "val_fraction": FLOAT(0, 1),
                      "epochs": FLOAT(0, optional=True, open_lo=True)})


def parse_data_spec(spec: str) -> tuple[str, float]:
    """'file.jsonl' -> (file, 1.0); 'file.jsonl:0.5' -> (file, 0.5). A weight w repeats each
    example of the file w times per epoch (the fractional part: a seeded random subset)."""
    path, sep, w = spec.rpartition(":")
    if sep and path and _is_number(w):
        weight = float(w)
        if not weight >= 0 or weight != weight:
            raise ValueError(f"--data {spec}: the weight must be a number >= 0")
        return path, weight
    return spec, 1.0


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_conversations(path: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, example, error) for each non-empty line of a JSONL file of
    {"messages": [...], "tools": [...]?} objects; a malformed line gives (n, None, reason)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    for ln in scan_jsonl(p):
        obj = ln.obj
        if ln.kind == INVALID:
            yield ln.lineno, None, ln.error
        elif not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
            yield ln.lineno, None, 'not an object with a non-empty "messages" list'
        elif obj.get("tools") is not None and not isinstance(obj["tools"], list):
            yield ln.lineno, None, '"tools" is not a list'
        else:
            yield ln.lineno, obj, None


def _has_reasoning(messages: list[dict]) -> bool:
    return any(m.get("role") == "assistant" and m.get("reasoning_content") for m in messages)


def _turns(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system/developer messages, turns): a turn runs from a user message up to the
    next one, so it holds the assistant reply with any tool calls and tool results."""
    head: list[dict] = []
    i = 0
    while i < len(messages) and messages[i].get("role") in ("system", "developer"):
        head.append(messages[i])
        i += 1
    turns: list[list[dict]] = []
    for m in messages[i:]:
        if m.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return head, turns


def fit_conversation(messages: list[dict], render_fn, capacity: int) -> tuple[list[tuple], int, int]:
    """Render a conversation into examples of at most `capacity` tokens: whole if it fits,
    else cut at turn boundaries (each piece keeps the system prompt). A turn that does not fit
    even alone is dropped. Returns ([(ids, mask)], pieces made by splitting, turns dropped)."""
    ids, mask = render_fn(messages)
    if len(ids) <= capacity:
        return [(ids, mask)], 0, 0
    head, turns = _turns(messages)
    out: list[tuple] = []
    dropped = 0
    cur: list[list[dict]] = []
    best = None
    for turn in turns:
        cand = render_fn(head + [m for t in cur + [turn] for m in t])
        if len(cand[0]) <= capacity:
            cur, best = cur + [turn], cand
            continue
        if best is not None:
            out.append(best)
        alone = render_fn(head + turn)
        if len(alone[0]) <= capacity:
            cur, best = [turn], alone
        else:
            cur, best = [], None
            dropped += 1
    if best is not None:
        out.append(best)
    out = [(i, m) for i, m in out if any(m)]   # a piece with nothing to learn is no example
    return out, len(out) if len(out) > 1 else 0, dropped


class SFTData:
    """Every example of an SFT run, rendered once: token ids + loss masks as numpy arrays, the
    weight of the file each came from, and the held-out split. Deterministic for a seed."""

    def __init__(self, cfg: SFTConfig, tokenizer, capacity: int, seed: int = 0, progress: bool = False):
        self.cfg, self.capacity, self.seed = cfg, capacity, seed
        self.train: list[tuple[np.ndarray, np.ndarray]] = []
        self.weights: list[float] = []
        self.val: list[tuple[np.ndarray, np.ndarray]] = []
        self.val_weights: list[float] = []
        self.stats = {"conversations": 0, "invalid": 0, "thinking": 0, "split": 0, "split_pieces": 0,
                      "dropped_turns": 0, "dropped": 0, "examples": 0, "val_examples": 0,
                      "tokens": 0, "trained_tokens": 0}
        self.errors: list[str] = []
        if not cfg.data:
            raise ValueError("give at least one --data FILE.jsonl")
        for spec in cfg.data:
            path, weight = parse_data_spec(spec)
            self._read(path, weight, tokenizer)
        if not self.train:
            raise ValueError(f"no usable SFT example in {', '.join(cfg.data)}"
                             + (f" (first problem: {self.errors[0]})" if self.errors else ""))

    def _read(self, path: str, weight: float, tokenizer) -> None:
        rng = np.random.default_rng([self.seed, 0x534654])  # "SFT"
        st = self.stats
        for n, ex, err in read_conversations(path):
            st["conversations"] += 1
            if err is None:
                thinking = self.cfg.thinking_ratio > 0 and _has_reasoning(ex["messages"]) \
                    and rng.random() < self.cfg.thinking_ratio
                mode = "thinking" if thinking else "chat"
                try:
                    pieces, split, dropped = fit_conversation(
                        ex["messages"], lambda m: render(m, tokenizer, mode, ex.get("tools")), self.capacity)
                except (TypeError, ValueError) as e:
                    err = str(e)
            if err is not None:
                st["invalid"] += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{path}:{n}: {err}")
                continue
            st["thinking"] += thinking
            st["split"] += split > 0
            st["split_pieces"] += split
            st["dropped_turns"] += dropped
            st["dropped"] += not pieces
            held_out = self._held_out(path, n)
            for ids, mask in pieces:
                item = (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))
                if held_out:
                    self.val.append(item)
                    self.val_weights.append(weight)
                    st["val_examples"] += 1
                else:
                    self.train.append(item)
                    self.weights.append(weight)
                    st["examples"] += 1
                    st["tokens"] += len(ids)
                    st["trained_tokens"] += int(item[1].sum())

    def _held_out(self, path: str, line: int) -> bool:
        """A seeded hash of (file, line) decides, so the split does not depend on file order."""
        if self.cfg.val_fraction <= 0 or len(self.val) >= self.cfg.max_val:
            return False
        h = hashlib.blake2b(f"{self.seed}:{Path(path).name}:{line}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < self.cfg.val_fraction

    def finalize(self) -> None:
        """Too few examples for a split: everything trains."""
        if self.stats["examples"] + self.stats["val_examples"] < self.cfg.min_val_pool and self.val:
            for item, w in zip(self.val, self.val_weights):
                self.train.append(item)
                self.weights.append(w)
                self.stats["tokens"] += int(item[0].size)
                self.stats["trained_tokens"] += int(item[1].sum())
            self.stats["examples"] += len(self.val)
            self.stats["val_examples"] = 0
            self.val, self.val_weights = [], []


def epoch_order(weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """Example indices of one epoch: each example floor(w) times plus once with probability
    frac(w) (seeded per epoch), shuffled."""
    rng = np.random.default_rng([seed, epoch, 0x4F524452])  # "ORDR"
    w = np.asarray(weights, dtype=np.float64)
    reps = np.floor(w).astype(np.int64) + (rng.random(w.size) < (w - np.floor(w)))
    order = np.repeat(np.arange(w.size), reps)
    return order[rng.permutation(order.size)]


def pack_rows(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Greedy next-fit packing of examples (in order) into rows of `capacity` tokens."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order.tolist():
        n = int(lengths[i])
        if cur and used + n > capacity:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def row_tensors(examples: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], seq_len: int,
                pad_id: int) -> dict:
    """input_ids / labels / doc_ids / token_mask [len(rows), seq_len] for packed rows: labels are
    the next token where the loss mask says so, else -100; each example is its own document
    (per-document attention, positions and compression); padding is a document of its own, never
    a target, and outside token_mask (so not counted in the experts' load)."""
    import torch

    B = len(rows)
    toks = np.full((B, seq_len + 1), pad_id, dtype=np.int64)
    mask = np.zeros((B, seq_len + 1), dtype=bool)
    real = np.zeros((B, seq_len + 1), dtype=bool)
    docs = np.zeros((B, seq_len + 1), dtype=np.int32)
    for r, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            ids, m = examples[i]
            toks[r, pos:pos + ids.size] = ids
            mask[r, pos:pos + ids.size] = m
            docs[r, pos:pos + ids.size] = k
            pos += ids.size
        docs[r, pos:] = len(row)
        real[r, :pos] = True
    labels = np.where(mask[:, 1:], toks[:, 1:], IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(toks[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(docs[:, :-1])),
            "token_mask": torch.from_numpy(np.ascontiguousarray(real[:, :-1]))}


class SFTLoader:
    """Endless packed SFT batches for data shard `index` of `n_data`: epoch e packs the epoch's
    shuffled (weighted) examples into rows; shard k takes rows k, k + n_data, ... A single
    process with 2 accumulation shards therefore reads what 2 ranks read. Exact resume from
    (epoch, cursor)."""

    def __init__(self, data: SFTData, micro_batch: int, seq_len: int, index: int, n_data: int, seed: int,
                 pad_id: int, loop: bool = True, split: str = "train"):
        self.data, self.micro_batch, self.seq_len = data, micro_batch, seq_len
        self.index, self.n_data, self.seed, self.pad_id, self.loop = index, n_data, seed, pad_id, loop
        self.examples = data.train if split == "train" else data.val
        self.lengths = np.array([ids.size for ids, _ in self.examples], dtype=np.int64)
        self.split = split
        self.epoch, self.cursor = 0, 0
        self._rows: tuple[int, list[list[int]]] | None = None
        self.fill = []   # token share of real (non-pad) tokens per batch, for the log

    def rows(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            if self.split == "train":
                order = epoch_order(self.data.weights, self.seed, epoch)
            else:
                order = np.arange(len(self.examples))
            self._rows = (epoch, pack_rows(order, self.lengths, self.seq_len + 1)[self.index::self.n_data])
        return self._rows[1]

    def rows_per_epoch(self) -> int:
        return len(self.rows(0))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picked: list[list[int]] = []
        empty = 0
        while len(picked) < self.micro_batch:
            rows = self.rows(self.epoch)
            if self.cursor >= len(rows):
                if not self.loop:
                    break
                # an epoch can hold no row for this shard (fractional weights drew nothing, or
                # fewer rows than data shards): go on to the next, but not forever
                empty = empty + 1 if not rows else 0
                if empty > 100:
                    raise ValueError(f"SFT data shard {self.index} of {self.n_data} got no row in 100 epochs in a "
                                     f"row: too little data for this many ranks x micro-steps (or weights near 0)")
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            take = rows[self.cursor: self.cursor + self.micro_batch - len(picked)]
            picked += take
            self.cursor += len(take)
        if not picked:
            raise StopIteration
        batch = row_tensors(self.examples, picked, self.seq_len, self.pad_id)
        self.fill.append(float(self.lengths[[i for r in picked for i in r]].sum()) / (len(picked) * (self.seq_len + 1)))
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "index": self.index,
                "n_data": self.n_data, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "index", "n_data", "examples"):
            if state.get(k) != getattr(self, k) if k != "examples" else state.get(k) != len(self.examples):
                raise ValueError(f"SFT loader state does not match this run ({k}: saved {state.get(k)})")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class SFTObjective(Objective):
    """SFT on chat conversations: the pre-training loss (CE + MTP + balance + indexer KL) on
    packed conversations whose labels are the assistant tokens only (render's loss mask)."""

    name = "sft"

    def __init__(self, cfg: SFTConfig, balance_alpha: float = 1e-4, indexer_weight: float = 1.0):
        cfg.check()
        self.cfg = cfg
        self.balance_alpha, self.indexer_weight = balance_alpha, indexer_weight
        self.data: SFTData | None = None
        self._loaders: list[SFTLoader] = []

    def prepare(self, run) -> None:
        tok = run.tokenizer
        if tok is None:
            raise ValueError("SFT needs the model's tokenizer (tokenizer files in the model directory, or --tokenizer)")
        t0 = time.perf_counter()
        self.data = SFTData(self.cfg, tok, run.cfg.seq_len + 1, seed=run.cfg.seed)
        self.data.finalize()
        st = self.data.stats
        if run.dist.is_main and run.cfg.progress:
            print(f"sft data: {st['examples']:,} examples ({st['trained_tokens']:,} of {st['tokens']:,} tokens trained), "
                  f"{st['val_examples']} held out, {st['thinking']} in thinking mode; {st['split']} split at turn "
                  f"boundaries, {st['dropped']} dropped as too long ({st['dropped_turns']} turns), {st['invalid']} "
                  f"invalid ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
            for e in self.data.errors:
                print(f"  skipped {e}", file=sys.stderr)

    def default_total_steps(self, run) -> int | None:
        if self.cfg.epochs is None:
            return None
        rows = SFTLoader(self.data, run.cfg.micro_batch, run.cfg.seq_len, 0, 1, run.cfg.seed,
                         pad_id=run.tokenizer.pad_id).rows_per_epoch()
        return max(1, math.ceil(self.cfg.epochs * rows / (run.cfg.micro_batch * run.n_data)))

    def make_loader(self, run, index: int, n_data: int, seed: int) -> SFTLoader:
        ld = SFTLoader(self.data, run.cfg.micro_batch, run.cfg.seq_len, index, n_data, seed,
                       pad_id=run.tokenizer.pad_id)
        self._loaders = [x for x in self._loaders if x.index != index] + [ld]   # (remade on resume)
        return ld

    def val_batches(self, run):
        if not self.data or not self.data.val:
            return None
        d, c, pad = run.dist, run.cfg, run.tokenizer.pad_id

        def loader(rank: int) -> SFTLoader:
            return SFTLoader(self.data, c.micro_batch, c.seq_len, rank, d.world, 0, pad_id=pad, loop=False,
                             split="val")

        # every rank runs as many forwards as the busiest one (a padding batch has no target):
        # under FSDP each forward is a collective, and ranks with fewer rows would leave it hanging
        n_max = max(math.ceil(loader(r).rows_per_epoch() / c.micro_batch) for r in range(d.world))

        def batches():
            n = 0
            if loader(d.rank).rows_per_epoch():
                for b in loader(d.rank):
                    n += 1
                    yield b
            for _ in range(n_max - n):
                yield {"input_ids": torch.full((1, c.seq_len), pad, dtype=torch.long),
                       "labels": torch.full((1, c.seq_len), IGNORE_INDEX, dtype=torch.long),
                       "doc_ids": torch.zeros((1, c.seq_len), dtype=torch.int32)}

        return batches()

    def loss_units(self, batch: dict) -> float:
        """Target (assistant) tokens: rows of one micro-batch hold different numbers of them."""
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        return model_loss_terms(model, batch, phase, self.balance_alpha, self.indexer_weight,
                                ce_share=step_share(phase, self.loss_units(batch)))

    def sample_prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """A sample prompt is a user message; the model answers in chat mode."""
        return render([{"role": "user", "content": prompt}], tokenizer, "chat")[0]

    def step_metrics(self) -> dict:
        fills = [f for ld in self._loaders for f in ld.fill]
        for ld in self._loaders:
            ld.fill = []
        return {"pack_fill": round(sum(fills) / len(fills), 4)} if fills else {}

    def summary(self) -> dict:
        return {"sft_data": dict(self.data.stats)} if self.data else {}


def sft_train_config(model_dir: str, out: str, **overrides) -> TrainConfig:
    """A TrainConfig for SFT of the model in `model_dir`, with defaults from its size: LR =
    SFT_LR_FRACTION x the pre-training LR of that width (presets.py), a short warm-up, linear
    decay over the second half, sequences up to 1024 tokens (the model's limit if lower)."""
    from nanoseek.config import ModelConfig
    from nanoseek.train.presets import pretrain_lr
    from nanoseek.train.trainer import TrainConfig

    mc = ModelConfig.from_json(Path(model_dir))
    seq_len = min(1024, mc.max_position_embeddings)
    base = dict(run_dir=out, model=str(model_dir), depth=None, init_from=str(model_dir),
                tokenizer_dir=str(model_dir), seq_len=seq_len, micro_batch=4,
                lr=SFT_LR_FRACTION * pretrain_lr(mc.hidden_size), warmup_steps=10, decay_frac=0.5,
                decay_shape="linear", eval_every=50, eval_tokens=1 << 30,
                sample_prompts=["Write a Python function that returns the n-th Fibonacci number."],
                sample_tokens=128, ckpt_every=100, keep_last=2)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)
