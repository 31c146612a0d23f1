"""Benchmark: quality per compute -- nanoseek's V4 `small` vs a dense Llama with the same
activated parameters, same data, same wall-clock budget (issue 4, "quality-per-compute").

    python benchmarks/bench_quality.py                       # 4 min of training each (~10 min in all)
    python benchmarks/bench_quality.py --minutes 10 --data runs/speedrun --json runs/quality.json
    python benchmarks/bench_quality.py --with-adamw          # + nanoseek trained with AdamW only

What is compared:
  * nanoseek: the `small` preset (V4: mHC, CSA/HCA attention, MoE with 16 routed experts top-2,
    MTP) trained with the trainer's core -- PretrainObjective (CE + MTP 0.3->0.1 + balance +
    indexer KL), Muon + AdamW (nanoseek.train.optim), gradient clipping, the router-bias update,
    the trainer's LR schedule (warm-up, constant, cosine to 10%);
  * llama: transformers' LlamaForCausalLM, dense, the same width (512), depth (8), heads (8 x 64)
    and vocabulary, untied head like nanoseek's, with the MLP width chosen so that its
    non-embedding parameter count equals nanoseek's *activated* non-embedding count (top-2 of 16
    routed experts + shared expert; MTP excluded; both counts are printed). Trained the usual
    way: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), the same LR schedule, clipping.
Both read the same batches in the same order (the data pipeline's shards: the corpus,
tokenizer and shards `nanoseek speedrun` builds, reused if present), with per-document
attention and positions for packed rows (nanoseek via doc_ids, Llama via a block-diagonal 4-D
mask). The two models take turns, one optimizer step each, so that load from other processes
on a shared machine hits both alike; each stops when its own training time reaches the
budget. Then both are evaluated with nanoseek's bits-per-byte (nanoseek/eval/bpb.py) on the
same held-out tokens. The horizon of the LR schedule is fixed after 3 timed steps, as the
trainer does for `--minutes`.

Prints a table and writes it as JSON (--json). Measured numbers: docs/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import ModelConfig, Transformer
from nanoseek.eval.bpb import evaluate_bpb
from nanoseek.model import count_parameters
from nanoseek.train.objectives import PretrainObjective
from nanoseek.train.optim import OptimConfig, build_optimizer, decay_start, lr_schedule


# ---------------------------------------------------------------------------------------------
# data

def prepare_data(root: Path, corpus_mb: float, vocab_size: int) -> tuple[Path, Path]:
    """(shard_dir, tokenizer_dir) under `root`: the speedrun's data stages, each reused if finished."""
    shards, tok = root / "shards", root / "tokenizer"
    if (shards / "index.json").is_file() and (tok / "tokenizer.json").is_file():
        return shards, tok
    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    workers = os.cpu_count() or 1
    build_corpus(root / "corpus", ["default"], workers=workers, max_mb=corpus_mb, check_inputs=False)  # (a finished one is kept: its tokenizer was made from it)
    train_tokenizer(root / "corpus", vocab_size, tok)
    tokenize_corpus(root / "corpus", tok, shards, workers=workers)
    return shards, tok


# ---------------------------------------------------------------------------------------------
# the dense baseline

def doc_mask_and_positions(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask [B, 1, S, S] (True = attend) and per-document positions [B, S]."""
    s = doc_ids.shape[1]
    idx = torch.arange(s, device=doc_ids.device)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = same & (idx[:, None] >= idx[None, :])
    first = torch.ones_like(doc_ids[:, :1], dtype=torch.bool)
    starts = torch.cat([first, doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    start_idx = torch.where(starts, idx, 0).cummax(dim=1).values
    return mask[:, None], idx - start_idx


class LlamaLM(nn.Module):
    """LlamaForCausalLM behind nanoseek's call signature: model(ids, doc_ids=None) -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, doc_ids=None):
        if doc_ids is None:
            return self.hf(input_ids).logits
        mask, pos = doc_mask_and_positions(doc_ids)
        return self.hf(input_ids, attention_mask=mask, position_ids=pos).logits


def llama_config(nano: ModelConfig, seq_len: int):
    """Dense Llama with nanoseek's width/depth/heads/vocab and an MLP width that matches nanoseek's
    activated non-embedding parameters."""
    from transformers import LlamaConfig

    target = count_parameters(nano, activated=True, include_mtp=False)   # head included, embedding not
    h, layers, v = nano.hidden_size, nano.num_hidden_layers, nano.vocab_size
    fixed = layers * (4 * h * h + 2 * h) + h + v * h      # attention + 2 norms per layer, final norm, head
    inter = max(8, round((target - fixed) / (3 * h * layers) / 8) * 8)   # SwiGLU: 3 h x inter matrices
    return LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=nano.num_attention_heads, num_key_value_heads=nano.num_attention_heads,
                       head_dim=h // nano.num_attention_heads, max_position_embeddings=seq_len,
                       rms_norm_eps=nano.rms_norm_eps, tie_word_embeddings=False, attention_dropout=0.0,
                       bos_token_id=nano.bos_token_id, eos_token_id=nano.eos_token_id)


def non_embedding_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)


# ---------------------------------------------------------------------------------------------
# runners: one optimizer step at a time, each with its own clock

class Runner:
    def __init__(self, name: str, optimizer: str, model: nn.Module, step_fn, opt, lr_groups, minutes: float,
                 warmup: int, calibrate: int = 3):
        self.name, self.optimizer, self.model, self.step_fn, self.opt = name, optimizer, model, step_fn, opt
        self.lr_groups = lr_groups            # [(param_group, peak lr)]
        self.budget = minutes * 60
        self.warmup, self.calibrate = warmup, calibrate
        self.seconds, self.steps, self.total = 0.0, 0, None
        self.times: list[float] = []
        self.ce: list[float] = []

    @property
    def done(self) -> bool:
        return self.seconds >= self.budget or (self.total is not None and self.steps >= self.total)

    def step(self, batch: dict) -> None:
        total = self.total or 10**9
        mult = lr_schedule(self.steps, total, warmup_steps=min(self.warmup, max(1, total // 5)))
        for g, lr in self.lr_groups:
            g["lr"] = lr * mult
        in_decay = self.total is not None and self.steps >= decay_start(self.total, 0.2)
        t0 = time.perf_counter()
        ce = self.step_fn(batch, 0.1 if in_decay else 0.3)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.steps += 1
        self.ce.append(ce)
        if self.total is None and self.steps > 1:
            self.times.append(dt)
            if len(self.times) >= self.calibrate:   # fixed after 3 timed steps (the trainer re-estimates until its decay)
                mean = statistics.mean(self.times)
                self.total = self.steps + max(1, int((self.budget - self.seconds) / mean))


def nanoseek_runner(model, minutes: float, lr: float, warmup: int) -> Runner:
    opt = build_optimizer(model, OptimConfig(lr=lr))
    objective = PretrainObjective()

    def step(batch, mtp_weight):
        terms = objective(model, batch, {"mtp_weight": mtp_weight})
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias(1e-3)
        return float(terms["ce"])

    return Runner("nanoseek small", "Muon+AdamW", model, step, opt,
                  [(g, g["initial_lr"]) for g in opt.param_groups], minutes, warmup)


def adamw_runner(name: str, model: nn.Module, loss_fn, minutes: float, lr: float, warmup: int,
                 after_step=None) -> Runner:
    """AdamW for every parameter (weight decay 0.1 on matrices, 0 on vectors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def step(batch, mtp_weight):
        loss, ce = loss_fn(batch, mtp_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return ce

    return Runner(name, "AdamW", model, step, opt, [(g, lr) for g in opt.param_groups], minutes, warmup)


# ---------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0, help="training-time budget of each model")
    ap.add_argument("--data", default="runs/speedrun",
                    help="directory with shards/ and tokenizer/ (speedrun layout); built there if missing")
    ap.add_argument("--corpus-mb", type=float, default=16.0, help="corpus size when the data must be built")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size when the data must be built")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak LR of all three (the trainer's default for presets)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps (capped at a fifth of the run)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for bits per byte")
    ap.add_argument("--with-adamw", action="store_true", help="also train nanoseek with AdamW only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/bench_quality.json", help="where to write the results")
    return ap.parse_args()


def build_runners(args, vocab: int, llama_cls) -> tuple[list[Runner], dict, nn.Module]:
    """nanoseek `small` (Muon, the trainer's objective), the parameter-matched dense Llama
    (AdamW) and, with --with-adamw, nanoseek with AdamW: (runners, {name: (total, activated /
    non-embedding parameters)}, the Llama)."""
    nano_cfg = ModelConfig.from_preset("small").replace(vocab_size=vocab)
    if nano_cfg.max_position_embeddings < args.seq:
        nano_cfg = nano_cfg.replace(max_position_embeddings=args.seq)
    torch.manual_seed(args.seed)
    nano = Transformer(nano_cfg).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(args.seed)
        llama = LlamaLM(llama_cls(llama_config(nano_cfg, args.seq))).train()

    def llama_loss(batch, _mtp_weight):
        logits = llama(batch["input_ids"], doc_ids=batch["doc_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return loss, float(loss.detach())

    runners = [nanoseek_runner(nano, args.minutes, args.lr, args.warmup),
               adamw_runner("llama (dense)", llama, llama_loss, args.minutes, args.lr, args.warmup)]
    counts = {"nanoseek small": (sum(p.numel() for p in nano.parameters()),
                                 count_parameters(nano_cfg, activated=True, include_mtp=False)),
              "llama (dense)": (sum(p.numel() for p in llama.parameters()), non_embedding_params(llama))}
    if args.with_adamw:
        torch.manual_seed(args.seed)
        nano_adamw = Transformer(nano_cfg).train()

        def nano_adamw_loss(batch, mtp_weight):
            t = PretrainObjective()(nano_adamw, batch, {"mtp_weight": mtp_weight})
            return t["loss"], float(t["ce"])

        runners.append(adamw_runner("nanoseek small (AdamW)", nano_adamw, nano_adamw_loss, args.minutes, args.lr,
                                    args.warmup, after_step=lambda: nano_adamw.update_router_bias(1e-3)))
        counts["nanoseek small (AdamW)"] = counts["nanoseek small"]
    return runners, counts, llama


def train_in_turns(runners: list[Runner], loader) -> float:
    """Step the runners in turns until each has spent its budget; every runner sees batch i at
    its step i. Returns the wall-clock seconds."""
    from tqdm import tqdm

    batches: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(desc="training (turns)", unit="step", file=sys.stderr, dynamic_ncols=True)
    while not all(r.done for r in runners):
        for r in runners:
            if r.done:
                continue
            while len(batches) <= r.steps:
                batches.append(next(loader))
            r.step(batches[r.steps])
            bar.update(1)
        bar.set_postfix({f"ce{i}": f"{r.ce[-1]:.2f}" for i, r in enumerate(runners)})
        # batches every runner has passed are no longer needed
        low = min(r.steps for r in runners)
        for i in range(low):
            batches[i] = None
    bar.close()
    return time.perf_counter() - t_start


def held_out(loader, eval_tokens: int) -> list[dict]:
    """Validation batches until they hold `eval_tokens` scored tokens."""
    val: list[dict] = []
    n = 0
    for b in loader:
        val.append(b)
        n += int((b["labels"] != -100).sum())
        if n >= eval_tokens:
            break
    return val


def result_rows(runners: list[Runner], counts: dict, val: list[dict], token_bytes, args) -> tuple[list[dict], int]:
    """One row per runner (held-out bits per byte, throughput, train CE at the step all of them
    reached) and that common step."""
    rows = []
    common = min(r.steps for r in runners)
    for r in runners:
        label = r.name
        t0 = time.perf_counter()
        ev = evaluate_bpb(r.model, val, token_bytes)
        window = r.ce[max(0, common - 5):common]
        rows.append({"model": label, "optimizer": r.optimizer, "params": counts[label][0],
                     "activated_params": counts[label][1], "steps": r.steps, "tokens": r.steps * args.batch * args.seq,
                     "train_seconds": round(r.seconds, 1), "tok_per_s": round(r.steps * args.batch * args.seq / r.seconds, 1),
                     "schedule_steps": r.total, "final_train_ce": round(statistics.mean(r.ce[-5:]), 4),
                     "train_ce_at_common_step": round(statistics.mean(window), 4),
                     "val_bpb": round(ev["bpb"], 4), "val_tokens": ev["tokens"],
                     "eval_seconds": round(time.perf_counter() - t0, 1)})
    return rows, common


def print_table(rows: list[dict], common: int, minutes: float) -> None:
    print(f"\n{'model':<24} {'optimizer':<11} {'activated':>10} {'steps':>6} {'tokens':>9} {'train s':>8} "
          f"{'tok/s':>7} {'CE@' + str(common):>8} {'val bpb':>8}")
    for row in rows:
        print(f"{row['model']:<24} {row['optimizer']:<11} {row['activated_params']:>10,} {row['steps']:>6} "
              f"{row['tokens']:>9,} {row['train_seconds']:>8.1f} {row['tok_per_s']:>7.1f} "
              f"{row['train_ce_at_common_step']:>8.3f} {row['val_bpb']:>8.4f}")
    print(f"(CE@{common}: mean train cross-entropy in nats over steps {max(0, common - 5) + 1}-{common}, "
          f"the same batches for every model; val bpb on {rows[0]['val_tokens']:,} held-out tokens "
          f"after the same {minutes:g}-minute budget)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        sys.exit("bench_quality needs transformers (pip install nanoseek[dev])")
    from nanoseek.data.shards import TokenLoader, load_index
    from nanoseek.data.tokenizer import load_tokenizer

    shard_dir, tok_dir = prepare_data(Path(args.data), args.corpus_mb, args.vocab_size)
    vocab = int(load_index(shard_dir)["vocab_size"])
    token_bytes = torch.as_tensor(load_tokenizer(tok_dir).token_byte_lengths())
    runners, counts, llama = build_runners(args, vocab, LlamaForCausalLM)
    print(f"data: {shard_dir} (vocab {vocab}); batch {args.batch} x {args.seq} tokens; budget "
          f"{args.minutes:g} min of training each; threads {torch.get_num_threads()}")
    print(f"parameters: nanoseek small {counts['nanoseek small'][0]:,} total, {counts['nanoseek small'][1]:,} "
          f"activated (non-embedding, MTP excluded); llama intermediate {llama.hf.config.intermediate_size}: "
          f"{counts['llama (dense)'][0]:,} total, {counts['llama (dense)'][1]:,} non-embedding", flush=True)
    loader = TokenLoader(shard_dir, "train", args.batch, args.seq, rank=0, world_size=1, seed=args.seed)
    wall = train_in_turns(runners, loader)
    val = held_out(TokenLoader(shard_dir, "val", args.batch, args.seq, rank=0, world_size=1, shuffle=False,
                               loop=False), args.eval_tokens)
    rows, common = result_rows(runners, counts, val, token_bytes, args)
    print_table(rows, common, args.minutes)
    out = {"benchmark": "quality_per_compute", "minutes": args.minutes, "batch": args.batch, "seq": args.seq,
           "lr": args.lr, "threads": torch.get_num_threads(), "data": str(shard_dir), "vocab_size": vocab,
           "llama_intermediate_size": llama.hf.config.intermediate_size, "wall_seconds": round(wall, 1),
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
