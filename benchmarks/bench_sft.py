"""Benchmark: SFT tokens/s through the shared trainer loop vs pre-training tokens/s, same model.

Both runs go through `nanoseek.train.trainer.train` -- the one loop -- with the same model
(depth 3, the speedrun's CPU size), the same row geometry (micro-batch x seq_len) and the same
optimizer; only the objective differs:

  pretrain  PretrainObjective on packed token shards (a continuous stream of documents);
  sft       SFTObjective on packed chat conversations (whole conversations per row, padded,
            labels on the assistant tokens only).

Printed: median step time and tokens/s of each (row tokens, padding included), the SFT/pre-
training ratio (the loop's overhead for SFT: rendering is done once up front, so the ratio is
near 1 when rows are equally long), the share of SFT row tokens that are real (pack fill) and
that are trained (assistant tokens), trained tokens/s, and MFU against a matmul peak measured
in the same run.

    python benchmarks/bench_sft.py                          # builds a small corpus first (~1-2 min)
    python benchmarks/bench_sft.py --sft runs/speedrun/tasks/sft.jsonl --steps 30
    python benchmarks/bench_sft.py --work /tmp/bench_sft    # reuses the data stages of an earlier run

Only the ratio measured within one run means something on a shared machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import statistics
import textwrap
from pathlib import Path

import torch


def build_data(work: Path, corpus_mb: float) -> tuple[Path, Path, Path]:
    """(shards, tokenizer, corpus) from this interpreter's stdlib (data stages are reused)."""
    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    build_corpus(work / "corpus", ["default"], workers=2, max_mb=corpus_mb, progress=False, check_inputs=False)  # (a finished one is kept: its tokenizer was made from it)
    train_tokenizer(work / "corpus", 4096, work / "tokenizer", progress=False)
    tokenize_corpus(work / "corpus", work / "tokenizer", work / "shards", workers=2, progress=False)
    return work / "shards", work / "tokenizer", work / "corpus"


def conversations_from_corpus(corpus: Path, n: int, seed: int = 0) -> list[dict]:
    """Chat examples from functions with docstrings in the corpus (a stand-in for mined SFT data)."""
    from nanoseek.eval.common import read_jsonl

    out: list[dict] = []
    for path in sorted((corpus / "train").glob("part-*.jsonl")):
        for doc in read_jsonl(path):
            try:
                tree = ast.parse(doc.get("content", ""))
            except (SyntaxError, ValueError):
                continue
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                    code = ast.get_source_segment(doc["content"], node) or ""
                    if 100 < len(code) < 1500:
                        doc1 = ast.get_docstring(node).strip().splitlines()[0]
                        out.append({"messages": [
                            {"role": "user", "content": f"Write a Python function `{node.name}`: {doc1}"},
                            {"role": "assistant", "content": f"```python\n{textwrap.dedent(code)}\n```"}]})
            if len(out) >= 4 * n:
                break
        if len(out) >= 4 * n:
            break
    random.Random(seed).shuffle(out)
    return out[:n]


def step_stats(run_dir: Path, skip: int) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r and "event" not in r][skip:]
    dt = statistics.median(r["dt"] for r in steps)
    out = {"dt": dt, "tok_per_s": statistics.median(r["tok_per_s"] for r in steps),
           "mfu": statistics.median(r["mfu"] for r in steps)}
    if all("pack_fill" in r for r in steps):
        out["pack_fill"] = statistics.mean(r["pack_fill"] for r in steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/nanoseek_bench_sft", help="data stages and runs (reused)")
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    ap.add_argument("--sft", default=None, help="SFT JSONL (default: conversations made from corpus functions)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4, help="micro-steps per optimizer step (both runs)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from nanoseek.train.metrics import measure_peak_flops
    from nanoseek.train.sft import SFTConfig, SFTObjective, sft_train_config
    from nanoseek.train.trainer import TrainConfig, train

    work = Path(args.work)
    shards, tok, corpus = build_data(work, args.corpus_mb)
    sft_file = Path(args.sft) if args.sft else work / "sft.jsonl"
    if not args.sft:
        convs = conversations_from_corpus(corpus, 2000)
        sft_file.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    peak = measure_peak_flops(torch.device("cpu"))
    # the same optimizer-step geometry for both: Muon's cost per step is amortised alike
    common = dict(seq_len=args.seq_len, micro_batch=args.micro_batch,
                  batch_tokens=args.seq_len * args.micro_batch * args.accum, max_steps=args.steps,
                  lr=1e-3, warmup_steps=2, eval_every=0, eval_tokens=4096, progress=False, tensorboard=False,
                  peak_tflops=peak / 1e12, sample_prompts=[], ckpt_every=0)
    import shutil

    for d in ("pt", "sft"):
        shutil.rmtree(work / d, ignore_errors=True)
    pt = train(TrainConfig(run_dir=str(work / "pt"), shard_dir=str(shards), tokenizer_dir=str(tok), depth=3,
                           **common))
    sft_cfg = sft_train_config(pt["model_dir"], str(work / "sft"), **common)
    sft = train(sft_cfg, SFTObjective(SFTConfig(data=[str(sft_file)], val_fraction=0.0)))
    a, b = step_stats(work / "pt", 3), step_stats(work / "sft", 3)
    data = sft["sft_data"]
    trained = data["trained_tokens"] / max(1, data["tokens"])
    print(f"model: depth 3, {pt['activated_params']:,} activated params; rows {args.micro_batch} x {args.seq_len} "
          f"x {args.accum} micro-steps; "
          f"threads {torch.get_num_threads()}; peak {peak / 1e9:.0f} GFLOP/s")
    print(f"pretrain : {a['dt'] * 1e3:8.1f} ms/step  {a['tok_per_s']:8.0f} tok/s  MFU {100 * a['mfu']:.1f}%")
    print(f"sft      : {b['dt'] * 1e3:8.1f} ms/step  {b['tok_per_s']:8.0f} tok/s  MFU {100 * b['mfu']:.1f}%  "
          f"pack fill {100 * b.get('pack_fill', 0):.1f}%, assistant share of real tokens {100 * trained:.1f}%")
    print(f"sft / pretrain tokens/s: {b['tok_per_s'] / a['tok_per_s']:.2f}x   "
          f"trained (assistant) tokens/s: {b['tok_per_s'] * b.get('pack_fill', 1) * trained:.0f}")


if __name__ == "__main__":
    main()
