"""`nanoseek speedrun`: the whole pipeline in one command, sized for a laptop CPU -- from source
code to a chat model: corpus, tokenizer, pre-training, mined tasks, SFT, GRPO, evaluation.

    nanoseek speedrun                      # ~10 min pre-training + ~2.5 SFT + ~2.5 GRPO on 2 CPU cores
    nanoseek speedrun --minutes 30 --out runs/sr30
    nanoseek speedrun --depth 6            # a bigger model (the dial of presets.py)
    nanoseek speedrun --no-rl              # stop after SFT (--no-sft: after pre-training)

Stages, each in its own directory under --out and each reused when already finished (so a
re-run, or a run after Ctrl-C, continues where it stopped):
  corpus/     `build_corpus` on the embedded default sources (this Python's stdlib and
              site-packages), capped at --corpus-mb of source text
  tokenizer/  byte-level BPE trained on the corpus' train split
  shards/     token shards (train + val)
  train/      pre-training with the V4 recipe for --minutes of training time (RUN/model is the
              base model); validation bits-per-byte, report.md with plots, a greedy sample
  tasks/      verified code tasks mined from the same default sources (nanoseek data tasks,
              capped at --tasks): tasks.jsonl (train), tasks.heldout.jsonl, sft.jsonl
  sft/        chat SFT on the mined conversations for --sft-minutes (sft/model)
  rl/         GRPO on the mined tasks' unit tests, shaped reward, for --rl-minutes (rl/model)
Then held-out pass@1 and the syntax-valid rate before and after each post-training stage (greedy,
chat protocol; the base model also in its own completion protocol) go into train/report.md,
and the last lines print the `nanoseek chat` command of the final model.
On a CUDA machine the same command picks a larger model, corpus and batch.

Under torchrun every stage that trains runs data-parallel on all ranks (DDP, as `nanoseek train`
/ `sft` / `rl` under torchrun); the stages that build files (corpus, tokenizer, shards, mined
tasks), the before / after evaluation, the report and the printed results run on rank 0 while
the other ranks wait for it:

    torchrun --nproc-per-node 8 -m nanoseek.cli speedrun     # one node, 8 GPUs
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from nanoseek.train.parallelize import Dist, setup_distributed

SAMPLE_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


class _Ranks:
    """The speedrun's view of torchrun: `main` stages run on rank 0 while the others wait."""

    # waiting for rank 0 can take as long as a whole corpus build or evaluation: those waits go
    # through a gloo group of their own with this timeout, and the training collectives keep theirs
    WAIT_TIMEOUT_H = 6

    def __init__(self, d: Dist):
        self.d, self.group = d, None
        if d.enabled:
            from datetime import timedelta

            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=self.WAIT_TIMEOUT_H))

    @property
    def is_main(self) -> bool:
        return self.d.is_main

    def main(self, fn, *args, **kw):
        """fn(*args, **kw) on rank 0 (its result there, None elsewhere); every rank returns once it
        is done. If it raises on rank 0, that rank exits with the error and torchrun stops the rest."""
        out = fn(*args, **kw) if self.is_main else None
        if self.group is not None:
            torch.distributed.barrier(group=self.group)
        return out

    def stage(self, t0: float, name: str) -> None:
        if self.is_main:
            print(f"\n== {name} ({time.perf_counter() - t0:.0f}s elapsed)", file=sys.stderr)


def _pretrain(root: Path, depth: int, minutes: float, force: bool, gpu: bool, ranks: _Ranks) -> dict:
    from nanoseek.train.trainer import TrainConfig, train

    run_dir = root / "train"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and (run_dir / "model" / "config.json").is_file() and not force:
        return json.loads(summary_path.read_text())
    if force and (run_dir / "checkpoints").is_dir():   # --retrain: the user asked to start over
        ranks.main(shutil.rmtree, run_dir / "checkpoints")
    # CPU: 4K tokens per step gives ~100+ optimizer steps in 10 minutes (split over the ranks
    # where they divide it; else one micro-batch per rank and step)
    seq_len, rows = (1024, 16) if gpu else (256, 4)
    per_step = rows * seq_len * ranks.d.world
    cfg = TrainConfig(run_dir=str(run_dir), shard_dir=str(root / "shards"), tokenizer_dir=str(root / "tokenizer"),
                      depth=depth, seq_len=seq_len, micro_batch=rows,
                      batch_tokens=None if gpu or 4096 % per_step else 4096,
                      minutes=minutes, eval_every=25, eval_tokens=32768 if not gpu else 1 << 20,
                      sample_prompts=[SAMPLE_PROMPT], sample_tokens=64, ckpt_every=50, keep_last=2,
                      indexer_warmup_steps=20,  # V4 trains CSA densely first, then sparse top-k
                      resume=not force)
    return train(cfg)


def _finished(run_dir: Path) -> dict | None:
    p = run_dir / "summary.json"
    if p.is_file() and (run_dir / "model" / "config.json").is_file():
        return json.loads(p.read_text())
    return None


def _sft(root: Path, base: Path, minutes: float, gpu: bool) -> dict:
    from nanoseek.train.sft import SFTConfig, SFTObjective, sft_train_config
    from nanoseek.train.trainer import train

    run_dir = root / "sft"
    done = _finished(run_dir)
    if done is not None:
        return done
    cfg = sft_train_config(str(base), str(run_dir), minutes=minutes, eval_every=25, ckpt_every=25,
                           micro_batch=8 if gpu else 4, resume=(run_dir / "checkpoints").is_dir())
    return train(cfg, SFTObjective(SFTConfig(data=[str(root / "tasks" / "sft.jsonl")])))


def _rl(root: Path, init: Path, minutes: float, world: int) -> dict:
    from nanoseek.train.rl import RLConfig, RLObjective, rl_train_config
    from nanoseek.train.trainer import train

    run_dir = root / "rl"
    done = _finished(run_dir)
    if done is not None:
        return done
    # shaped reward: all tests pass (1) + 0.2 for code that parses + 0.1 for the ```python block;
    # answers cut by the token limit are masked out (a CPU-sized model often runs on: a length
    # penalty would teach it to stop at once rather than to write code)
    # 4 prompts a step, rounded up to a multiple of the ranks (each samples its own share)
    rl = RLConfig(tasks=str(root / "tasks" / "tasks.jsonl"), protocol="chat", group_size=8,
                  prompts_per_step=-(-4 // world) * world,
                  max_new_tokens=192, syntax_weight=0.2, format_weight=0.1, overlong="mask", eval_tasks=16,
                  eval_samples=4)
    cfg = rl_train_config(str(init), str(run_dir), rl, minutes=minutes, eval_every=0, ckpt_every=10,
                          resume=(run_dir / "checkpoints").is_dir())
    obj = RLObjective(rl, cfg.balance_alpha, cfg.indexer_weight)
    try:
        return train(cfg, obj)
    finally:
        obj.close()


def _evaluate(model_dir: Path, problems: dict, protocols: tuple[str, ...], cache: Path) -> dict:
    """Greedy held-out pass@1 and syntax-valid rate per protocol (cached in `cache`)."""
    from nanoseek.engine.loading import load_model_and_tokenizer
    from nanoseek.eval.chat_code import evaluate_chat, evaluate_completion

    if cache.is_file():
        return json.loads(cache.read_text())
    # eager: a compiled decode step (the loader's default, for chat and serving) would be traced
    # again for each stage's model, ~7 s each with a warm cache and far more with a cold one, for
    # one batch of 192 tokens (eager: ~1 s a task batch on 2 cores)
    model, tok = load_model_and_tokenizer(model_dir, compile=False)
    out = {}
    for proto in protocols:
        fn = evaluate_chat if proto == "chat" else evaluate_completion
        r = fn(model, tok, problems, max_new_tokens=192, batch_size=len(problems))
        out[proto] = {k: r[k] for k in ("pass@1", "syntax_valid", "n")}
        out[proto]["samples"] = r["samples"][:2]
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _post_training_report(root: Path, stages: list[tuple[str, Path, dict]], n_eval: int) -> list[dict]:
    """Before/after evaluations of each stage on the first n_eval held-out tasks ->
    train/post_training.json (read by the report)."""
    from nanoseek.eval.verify import load_problem_file

    heldout = load_problem_file(root / "tasks" / "tasks.heldout.jsonl")
    problems = dict(list(heldout.items())[:n_eval])
    evals = {"base": _evaluate(root / "train" / "model", problems, ("chat", "completion"),
                               root / "train" / "heldout_eval.json")}
    out = []
    prev = "base"
    for name, run_dir, summary in stages:
        evals[name] = _evaluate(run_dir / "model", problems, ("chat", "completion") if name == "SFT" else ("chat",),
                                run_dir / "heldout_eval.json")
        after = evals[name]
        out.append({"name": name, "run_dir": str(run_dir), "summary": summary, "n_tasks": len(problems),
                    "before": {p: {k: v for k, v in r.items() if k != "samples"} for p, r in evals[prev].items()},
                    "after": {p: {k: v for k, v in r.items() if k != "samples"} for p, r in after.items()},
                    "samples": after["chat"]["samples"]})
        prev = name
    manifest = json.loads((root / "tasks" / "tasks.manifest.json").read_text())
    info = {"tasks": {"train": manifest.get("counts", {}).get("train"), "held_out": len(heldout)}, "stages": out}
    (root / "train" / "post_training.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def speedrun(out: str | os.PathLike = "runs/speedrun", minutes: float = 10.0, depth: int | None = None,
             corpus_mb: float | None = None, vocab_size: int | None = None, force_train: bool = False,
             sft: bool = True, rl: bool = True, sft_minutes: float | None = None, rl_minutes: float | None = None,
             tasks: int | None = None, eval_tasks: int = 32) -> dict:
    from nanoseek.data.build import build_corpus
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.eval.verify import mine_tasks
    from nanoseek.train.report import write_report

    ranks = _Ranks(setup_distributed("auto"))   # alone: one rank, no process group
    gpu = ranks.d.device.type == "cuda"
    # CPU: depth 3 (width 192: one sliding, one CSA, one HCA layer -- every V4 layer type) is
    # the size that learns most in ~10 minutes on 2 cores; the GPU default is depth 8.
    depth = depth or (8 if gpu else 3)
    corpus_mb = corpus_mb or (400.0 if gpu else 16.0)
    vocab_size = vocab_size or (16384 if gpu else 4096)
    sft_minutes = sft_minutes if sft_minutes is not None else (10.0 if gpu else 2.5)
    rl_minutes = rl_minutes if rl_minutes is not None else (10.0 if gpu else 2.5)
    tasks = tasks or (2000 if gpu else 400)
    rl = rl and sft                      # GRPO starts from the SFT model
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)   # (every rank: exist_ok makes it safe)
    t0 = time.perf_counter()
    workers = os.cpu_count() or 1

    ranks.stage(t0, "corpus: embedded default sources")
    # (a finished corpus is this run's, whatever was installed since: its tokenizer, shards and
    # models were made from it, and a rebuild would leave them to another corpus)
    ranks.main(build_corpus, root / "corpus", ["default"], workers=workers, max_mb=corpus_mb, check_inputs=False)
    ranks.stage(t0, "tokenizer")
    ranks.main(train_tokenizer, root / "corpus", vocab_size, root / "tokenizer")
    ranks.stage(t0, "shards")
    ranks.main(tokenize_corpus, root / "corpus", root / "tokenizer", root / "shards", workers=workers)
    ranks.stage(t0, f"pre-training: depth {depth}, {minutes:g} minutes"
                    f"{f' on {ranks.d.world} ranks' if ranks.d.enabled else ''} (a finished run is reused; --retrain)")
    summary = _pretrain(root, depth, minutes, force_train, gpu, ranks)
    stages: list[tuple[str, Path, dict]] = []
    final = root / "train" / "model"
    if sft:
        ranks.stage(t0, f"tasks: verified code tasks mined from the default sources (up to {tasks})")
        ranks.main(mine_tasks, ["default"], root / "tasks" / "tasks.jsonl", sft_out=root / "tasks" / "sft.jsonl",
                   max_tasks=tasks, workers=workers)
        ranks.stage(t0, f"SFT: {sft_minutes:g} minutes on the mined conversations")
        stages.append(("SFT", root / "sft", _sft(root, final, sft_minutes, gpu)))
        final = root / "sft" / "model"
    if rl:
        ranks.stage(t0, f"GRPO: {rl_minutes:g} minutes on the mined tasks' unit tests (shaped reward)")
        stages.append(("GRPO", root / "rl", _rl(root, final, rl_minutes, ranks.d.world)))
        final = root / "rl" / "model"
    if stages:
        ranks.stage(t0, f"evaluation: held-out mined tasks before / after each stage ({eval_tasks} tasks, greedy)")
        ranks.main(_post_training_report, root, stages, eval_tasks)
    ranks.stage(t0, "report")
    report = ranks.main(write_report, root / "train")
    if ranks.is_main:
        _print_results(summary, report, stages, root, final)
    return summary


def _print_results(summary: dict, report: Path, stages: list, root: Path, final: Path) -> None:
    val = summary.get("val") or {}
    print(f"\nval bits per byte: {val.get('val_bpb', float('nan')):.4f}   "
          f"({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tok_per_s']:.0f} tok/s)")
    completion = (summary.get("samples") or {}).get(SAMPLE_PROMPT)
    if completion is not None:
        print("\nsample (greedy):\n" + SAMPLE_PROMPT + completion)
    post = root / "train" / "post_training.json"
    if stages and post.is_file():
        for st in json.loads(post.read_text())["stages"]:
            b, a = st["before"]["chat"], st["after"]["chat"]
            print(f"{st['name']:>5}: held-out pass@1 {100 * b['pass@1']:.1f}% -> {100 * a['pass@1']:.1f}%, "
                  f"syntax-valid {100 * b['syntax_valid']:.1f}% -> {100 * a['syntax_valid']:.1f}% "
                  f"({st['n_tasks']} tasks, chat)")
    print(f"report: {report}")
    print(f"\nchat with the model:\n  nanoseek chat --model {shlex.quote(str(final))}")
