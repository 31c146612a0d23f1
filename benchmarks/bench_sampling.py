"""Benchmark: the decode loop's per-step token pick, one max per row vs the checks it replaced.

Each decode step of `BatchRunner` checks every row's logits (no NaN, at least one finite value)
and picks the greedy token. It used to run `isnan(...).any()`, `isfinite(...).any()` and an
argmax; now one `max(dim=-1)` gives every row's max (NaN if the row has one, which decides the
check, `sampling.check_logits`) and its argmax. This times both, same process, alternating, on
logits rows of a few vocabulary sizes (`small` 8,192; 32,768; V4's 129,280) at batch 1 and 8,
and checks the two pick the same tokens.

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --reps 5000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.engine.sampling import check_logits


def before(logits: torch.Tensor) -> list[int]:
    """The old step: per row an isnan and an isfinite pass (each with a host read), one argmax."""
    for row in logits:
        if bool(torch.isnan(row).any()) or not bool(torch.isfinite(row).any()):
            raise ValueError("non-finite logits")
    return torch.argmax(logits, dim=-1).tolist()


def after(logits: torch.Tensor) -> list[int]:
    """The step now (BatchRunner._decode): one max per row; the check reads it."""
    tops, picks = (t.tolist() for t in logits.max(dim=-1))
    for row, top in zip(logits, tops):
        check_logits(row, top)
    return picks


def median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="timed calls per variant and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.reps < 1 or args.rounds < 1:
        ap.error("--reps and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"per-step pick + check, median of {args.reps} calls x {args.rounds} alternating rounds, "
          f"threads={torch.get_num_threads()}")
    for vocab in (8192, 32768, 129280):
        for batch in (1, 8):
            logits = torch.randn(batch, vocab)
            logits[:, ::97] = logits.max()  # ties: both must pick the first maximum
            assert before(logits) == after(logits), "the two picks differ"
            runs: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                runs["before"].append(median_us(lambda: before(logits), args.reps))
                runs["after"].append(median_us(lambda: after(logits), args.reps))
            b, a = statistics.median(runs["before"]), statistics.median(runs["after"])
            print(f"  vocab {vocab:6d}, batch {batch}: isnan + isfinite + argmax {b:7.1f} us, "
                  f"one max {a:7.1f} us: {b / a:.2f}x")


if __name__ == "__main__":
    main()
