"""Benchmark: the lightning indexer's top-k selection against a stable sort, in one run.

    python benchmarks/bench_indexer.py              # the shapes below, medians of 5 alternating runs
    python benchmarks/bench_indexer.py --reps 9 --threads 1

`nanoseek.model.indexer.select_topk` keeps each query's k best visible entries, ties going to the
latest entry (so that a cached decode selects what the full forward does). The baseline here is
that rule written as a stable descending sort of the whole row over the reversed entry axis,
O(N log N) (the implementation before); the library's is a `topk` of k + 1 with the tie rule
applied only to rows whose k-th and (k+1)-th scores tie (docs/model.md "Speed", "Long
contexts"). Both masks are checked equal on every shape before timing. Scores are ReLU'd
normals (about half exactly zero: ties, as the indexer's ReLU makes them), 80% of entries
visible, the multi-query shapes causal as well (the last S of 4N tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.model.indexer import select_topk

# (label, [B, S queries, N entries], k)
SHAPES = [
    ("decode step, 64K context, V4's k", (1, 1, 16384), 512),
    ("decode step, 8K context, small's k", (1, 1, 2048), 32),
    ("prefill 2K queries over 4K entries", (1, 2048, 4096), 512),
    ("prefill 8K tokens (small)", (1, 8192, 2048), 32),
    ("training step (small, 4 x 512)", (4, 512, 128), 32),
]


def sort_select(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule as a stable sort of every row (the baseline)."""
    n = scores.shape[-1]
    if n <= k:
        return visible
    masked = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(masked.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(visible).scatter_(-1, n - 1 - order, True) & visible


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="alternating rounds (median)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}, medians of {args.reps} alternating rounds")
    g = torch.Generator().manual_seed(0)
    for label, shape, k in SHAPES:
        scores = torch.randn(shape, generator=g).relu_()
        visible = torch.rand(shape, generator=g) < 0.8
        b, s, n = shape
        if s > 1:   # causal: the queries are the last s of 4N tokens; entry j is complete at token 4j + 3
            pos = torch.arange(4 * n - s, 4 * n).unsqueeze(1)
            visible &= (torch.arange(n) + 1) * 4 <= pos + 1
        if not torch.equal(sort_select(scores, visible, k), select_topk(scores, visible, k)):
            raise SystemExit(f"{label}: the two selections differ")
        runs = {"sort": [], "topk": []}
        inner = max(1, int(2e7 // scores.numel()))   # small shapes: several calls a timing
        for _ in range(args.reps):
            runs["sort"].append(timed(lambda: sort_select(scores, visible, k), inner))
            runs["topk"].append(timed(lambda: select_topk(scores, visible, k), inner))
        base, ours = statistics.median(runs["sort"]), statistics.median(runs["topk"])
        print(f"{label:38s} {str(list(shape)):18s} k={k:<4d} sort {base * 1e3:8.2f} ms  "
              f"select_topk {ours * 1e3:8.2f} ms  {base / ours:5.2f}x")


if __name__ == "__main__":
    main()
