"""Benchmark of `nanoseek data tasks`: verified tasks mined per minute, and the share kept.

    python benchmarks/bench_tasks.py                          # --source default, every task
    python benchmarks/bench_tasks.py --max-tasks 300          # the speedrun's capped run
    python benchmarks/bench_tasks.py --source ~/src --out runs/bench_tasks

Runs `mine_tasks` once (with `force=True`, so nothing is reused) and reports
  * verified tasks per wall-clock minute and per CPU-minute (this process, its extraction
    workers and the sandboxed programs, from `getrusage`: other load on the machine changes the
    wall clock a lot and CPU time little);
  * the share kept: of all module-level documented functions read, and of the candidates that
    passed the static filters and reached the sandbox;
  * the time of each stage (extraction, reference runs, screening, confirmation) and the top
    drop reasons.
Results are printed and saved to OUT/bench_tasks.json (the mined files stay in OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(sources: list[str], out: Path, max_tasks: int | None, workers: int | None, seed: int) -> dict:
    from nanoseek.eval.verify import mine_tasks

    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    c0, t0 = _cpu(), time.perf_counter()
    m = mine_tasks(sources, out / "tasks.jsonl", sft_out=out / "sft.jsonl", seed=seed, max_tasks=max_tasks,
                   workers=workers, progress=True, force=True)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    c = m["counts"]
    top = sorted(m["dropped"].items(), key=lambda kv: -kv[1]["functions"])[:12]
    return {
        "sources": sources, "max_tasks": max_tasks, "seed": seed, "workers": m["timing"]["workers"],
        "cpu_count": os.cpu_count(), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
        "isolation": m["sandbox"]["isolation"],
        "verified_tasks": c["verified"], "train": c["train"], "heldout": c["heldout"], "sft": c["sft_examples"],
        "functions_seen": c["functions_seen"], "candidates": c["candidates"], "files_listed": c["files_listed"],
        "files_read": c["files_read"],
        "kept_share_of_functions": m["kept_share"]["of_functions"],
        "kept_share_of_candidates": m["kept_share"]["of_candidates"],
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "tasks_per_min": round(c["verified"] / wall * 60, 1),
        "tasks_per_cpu_min": round(c["verified"] / max(cpu, 1e-9) * 60, 1),
        "stages_s": {k: v for k, v in m["timing"].items() if k.endswith("_s")},
        "sandbox_jobs": m["sandbox"]["jobs"], "cases_run": m["sandbox"]["cases_run"],
        "top_drop_reasons": {k: v["functions"] for k, v in top},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", help="as `data tasks --source` (default: default)")
    ap.add_argument("--out", default="runs/bench_tasks", help="output directory (default: %(default)s)")
    ap.add_argument("--max-tasks", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res = run(args.source or ["default"], Path(args.out), args.max_tasks, args.workers, args.seed)
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
    path = Path(args.out) / "bench_tasks.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
