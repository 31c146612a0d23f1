"""`nanoseek speedrun`: the whole pre-training pipeline in one command, sized for a laptop CPU.

    nanoseek speedrun                      # ~10 minutes of training on 2 CPU cores (+ data stages)
    nanoseek speedrun --minutes 30 --out runs/sr30
    nanoseek speedrun --depth 6            # a bigger model (the dial of presets.py)

Stages, each in its own directory under --out and each reused when already finished (so a
re-run, or a run after Ctrl-C, continues where it stopped):
  corpus/     `build_corpus` on the embedded default sources (this Python's stdlib and
              site-packages), capped at --corpus-mb of source text so the data stages take a
              minute or two
  tokenizer/  byte-level BPE trained on the corpus' train split
  shards/     token shards (train + val)
  train/      pre-training with the V4 recipe for --minutes of training time; an interrupted
              run resumes from its last checkpoint; then validation bits-per-byte, report.md
              with plots, and a greedy completion of a Python function header.
On a CUDA machine the same command picks a larger model, corpus and batch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

SAMPLE_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def speedrun(out: str | os.PathLike = "runs/speedrun", minutes: float = 10.0, depth: int | None = None,
             corpus_mb: float | None = None, vocab_size: int | None = None, force_train: bool = False) -> dict:
    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.report import write_report
    from nanoseek.train.trainer import TrainConfig, train

    gpu = torch.cuda.is_available()
    # CPU: depth 3 (width 192: one sliding, one CSA, one HCA layer -- every V4 layer type) is
    # the size that learns most in ~10 minutes on 2 cores; the GPU default is depth 8.
    depth = depth or (8 if gpu else 3)
    corpus_mb = corpus_mb or (400.0 if gpu else 16.0)
    vocab_size = vocab_size or (16384 if gpu else 4096)
    seq_len = 1024 if gpu else 256
    micro_batch = 16 if gpu else 4
    # CPU: 4K tokens per step gives ~100+ optimizer steps in 10 minutes; the GPU batch follows the dial
    batch_tokens = None if gpu else 4096
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    workers = os.cpu_count() or 1

    def stage(name: str) -> None:
        print(f"\n== {name} ({time.perf_counter() - t0:.0f}s elapsed)", file=sys.stderr)

    stage("corpus: embedded default sources")
    build_corpus(root / "corpus", ["default"], workers=workers, max_mb=corpus_mb)
    stage("tokenizer")
    train_tokenizer(root / "corpus", vocab_size, root / "tokenizer")
    stage("shards")
    tokenize_corpus(root / "corpus", root / "tokenizer", root / "shards", workers=workers)

    run_dir = root / "train"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and not force_train:
        stage("training: finished run found, reusing it (pass --retrain to train again)")
        summary = json.loads(summary_path.read_text())
    else:
        if force_train and (run_dir / "checkpoints").is_dir():
            import shutil

            shutil.rmtree(run_dir / "checkpoints")   # --retrain: the user asked to start over
        stage(f"pre-training: depth {depth}, {minutes:g} minutes")
        cfg = TrainConfig(run_dir=str(run_dir), shard_dir=str(root / "shards"), tokenizer_dir=str(root / "tokenizer"),
                          depth=depth, seq_len=seq_len, micro_batch=micro_batch, batch_tokens=batch_tokens,
                          minutes=minutes, eval_every=25, eval_tokens=32768 if not gpu else 1 << 20,
                          sample_prompts=[SAMPLE_PROMPT], sample_tokens=64, ckpt_every=50, keep_last=2,
                          indexer_warmup_steps=20,  # V4 trains CSA densely first, then sparse top-k
                          resume=not force_train)
        summary = train(cfg)
    stage("report")
    report = write_report(run_dir)
    val = summary.get("val") or {}
    print(f"\nval bits per byte: {val.get('val_bpb', float('nan')):.4f}   "
          f"({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tok_per_s']:.0f} tok/s)")
    print(f"report: {report}")
    completion = (summary.get("samples") or {}).get(SAMPLE_PROMPT)
    if completion is not None:
        print("\nsample (greedy):\n" + SAMPLE_PROMPT + completion)
    return summary
