"""Benchmark: the decode loop's per-token sampling work against what it replaced, same run.

* Greedy pick + logits check. Each decode step of `BatchRunner` checks every row's logits (no
  NaN, at least one finite value) and picks the greedy token. It used to run
  `isnan(...).any()`, `isfinite(...).any()` and an argmax; now one `max(dim=-1)` gives every
  row's max (NaN if the row has one, which decides the check, `sampling.check_logits`) and its
  argmax. Batch 1 and 8; the two must pick the same tokens.
* Top-p. `sampling.nucleus` sorts only the head of the distribution (growing top-k
  candidates) where the filter sorted the whole row; on a flat row (randn x 3: thousands of
  tokens in the nucleus) and a peaked one (Zipf-like, as a trained model's: tens), top_p 0.95;
  the two must keep the same number of tokens.
* Drawing the token. `sampling.draw` runs torch.multinomial's exponential race with its
  exponential variates as -log of uniform ones (PyTorch's own exponential draws are slow);
  the two must draw alike in distribution (checked on the head of the row: 5-sigma bands).

Vocabulary sizes: `small`'s 8,192, 32,768 and V4's 129,280. Medians of alternating rounds.

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --reps 5000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.engine.sampling import check_logits, draw, nucleus


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


def sorted_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p filter before `nucleus`: a full descending sort of the row, softmax, cumsum."""
    sorted_x, order = torch.sort(x, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    drop = torch.cumsum(probs, dim=-1) - probs >= top_p
    drop[0] = False
    return x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def alternate(fns: dict, reps: int, rounds: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            runs[name].append(median_us(fn, reps))
    return {name: statistics.median(v) for name, v in runs.items()}


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
    print(f"per-step greedy pick + check, median of {args.reps} calls x {args.rounds} alternating rounds, "
          f"threads={torch.get_num_threads()}")
    for vocab in (8192, 32768, 129280):
        for batch in (1, 8):
            logits = torch.randn(batch, vocab)
            logits[:, ::97] = logits.max()  # ties: both must pick the first maximum
            assert before(logits) == after(logits), "the two picks differ"
            t = alternate({"before": lambda: before(logits), "after": lambda: after(logits)}, args.reps, args.rounds)
            print(f"  vocab {vocab:6d}, batch {batch}: isnan + isfinite + argmax {t['before']:7.1f} us, "
                  f"one max {t['after']:7.1f} us: {t['before'] / t['after']:.2f}x")
    print(f"top-p 0.95 filter of one row, median of {max(1, args.reps // 10)} calls x {args.rounds} rounds")
    for vocab in (8192, 32768, 129280):
        rank = torch.randperm(vocab).double() + 1
        rows = {"flat": torch.randn(vocab) * 3, "peaked": (-2.0 * rank.log()).float()}
        for kind, x in rows.items():
            kept = int(torch.isfinite(nucleus(x, 0.95)).sum())
            assert abs(kept - int(torch.isfinite(sorted_top_p(x, 0.95)).sum())) <= 2, "the two cuts differ"
            t = alternate({"sort": lambda: sorted_top_p(x, 0.95), "nucleus": lambda: nucleus(x, 0.95)},
                          max(1, args.reps // 10), args.rounds)
            print(f"  vocab {vocab:6d}, {kind:6s} ({kept:5d} tokens kept): full sort {t['sort']:8.1f} us, "
                  f"nucleus {t['nucleus']:8.1f} us: {t['sort'] / t['nucleus']:.2f}x")
    draws(max(1, args.reps // 10), args.rounds)


def draws(reps: int, rounds: int) -> None:
    print(f"drawing one token from a row of probabilities, median of {reps} calls x {rounds} rounds")
    g = torch.Generator().manual_seed(0)
    for vocab in (8192, 32768, 129280):
        probs = torch.softmax(torch.randn(vocab) * 3, -1)
        n = 4000  # same distribution: the most likely token's frequency under both, 5 sigma apart at most
        top = int(torch.argmax(probs))
        f_draw = sum(draw(probs, g) == top for _ in range(n)) / n
        f_multi = sum(int(torch.multinomial(probs, 1, generator=g)) == top for _ in range(n)) / n
        p = float(probs[top])
        assert abs(f_draw - f_multi) <= 5 * (2 * p * (1 - p) / n) ** 0.5 + 1e-3, (f_draw, f_multi, p)
        t = alternate({"multinomial": lambda: torch.multinomial(probs, 1, generator=g),
                       "draw": lambda: draw(probs, g)}, reps, rounds)
        print(f"  vocab {vocab:6d}: torch.multinomial {t['multinomial']:7.1f} us, draw {t['draw']:7.1f} us: "
              f"{t['multinomial'] / t['draw']:.2f}x")


if __name__ == "__main__":
    main()
