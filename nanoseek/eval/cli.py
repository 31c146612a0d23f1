"""`nanoseek eval ...`: score pre-generated samples, export prompts, inspect the sandbox.

    nanoseek eval sandbox                                   # isolation levels on this machine
    nanoseek eval humaneval --samples s.jsonl --out results/humaneval
    nanoseek eval humaneval --write-prompts prompts.jsonl
    nanoseek eval humaneval-fim --samples fim.jsonl --out results/fim
    nanoseek eval insecure-code --corpus data/ --write-prompts sec_prompts.jsonl
    nanoseek eval insecure-code --prompts sec_prompts.jsonl --samples sec.jsonl --out results/sec

Generating samples from a model is not wired here yet (the engine plugs into
`nanoseek.eval.tasks.run_task`); until then, generate with any tool from the exported prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sandbox_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sandbox")
    g.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "unshare", "none"],
                   help="isolation level (default: the strongest that works here)")
    g.add_argument("--require-isolation", choices=["bwrap", "unshare", "none"], default=None,
                   help="fail instead of running with a weaker isolation level")
    g.add_argument("--workers", type=int, default=None, help="parallel programs (default: cores+1)")
    g.add_argument("--timeout", type=float, default=3.0,
                   help="per-program timeout in seconds (reference harness: 3.0)")
    g.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per program")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", help="JSONL of {task_id, completion} to score")
    p.add_argument("--write-prompts", metavar="FILE", help="write the task's prompts as JSONL and exit")
    p.add_argument("--out", help="output directory for results.jsonl and summary.json "
                                 "(default: <samples>_results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_subcommands(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate samples: humaneval, humaneval-fim, insecure-code",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ev.add_subparsers(dest="eval_task", metavar="TASK")
    ev.set_defaults(func=lambda a: (ev.print_help(), 2)[1])

    p = sub.add_parser("sandbox", help="show which isolation levels work on this machine")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("humaneval", help="HumanEval pass@k (164 problems)")
    _common(p)
    _sandbox_args(p)
    p.add_argument("--k", default="1,10,100", help="comma-separated k values for pass@k")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="score even if some problems have no sample")
    p.set_defaults(func=cmd_humaneval)

    p = sub.add_parser("humaneval-fim", help="HumanEval infilling, single-line and multi-line")
    _common(p)
    _sandbox_args(p)
    p.add_argument("--subset", nargs="+", default=["single-line", "multi-line"],
                   choices=["single-line", "multi-line"])
    p.add_argument("--fim-begin", default="<｜fim▁begin｜>")
    p.add_argument("--fim-hole", default="<｜fim▁hole｜>")
    p.add_argument("--fim-end", default="<｜fim▁end｜>")
    p.set_defaults(func=cmd_fim)

    p = sub.add_parser("insecure-code", help="insecure-code rate of autocomplete samples (bandit)")
    _common(p)
    p.add_argument("--corpus", nargs="+", help="directories / .py / JSONL corpus files to build prompts from")
    p.add_argument("--prompts", help="prompts JSONL (from --write-prompts) the samples continue")
    p.add_argument("--max-prompts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sample")
    p.add_argument("--min-severity", default="MEDIUM", choices=["LOW", "MEDIUM", "HIGH"])
    p.add_argument("--min-confidence", default="LOW", choices=["LOW", "MEDIUM", "HIGH"])
    p.set_defaults(func=cmd_insecure)


# ------------------------------------------------------------------------------ commands

def _fail(msg: str) -> int:
    print(f"nanoseek eval: error: {msg}", file=sys.stderr)
    return 2


def _out_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    s = Path(args.samples)
    return s.with_name(s.name.split(".")[0] + "_results")


def _write_prompts(prompts: list[dict], path: str) -> int:
    from .common import write_jsonl

    write_jsonl(path, prompts)
    print(f"wrote {len(prompts)} prompts to {path}")
    return 0


def _make_sandbox(args):
    from .sandbox import IsolationUnavailable, Limits, Sandbox

    try:
        return Sandbox(args.isolation, require=args.require_isolation,
                       limits=Limits(timeout_s=args.timeout, memory_mb=args.memory_mb))
    except IsolationUnavailable as e:
        raise SystemExit(_fail(str(e)))


def _finish(summary: dict, out: Path) -> int:
    from .tasks import write_summary

    summary = dict(summary)
    path = write_summary(summary, out)
    summary.pop("per_problem", None)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"summary: {path}", file=sys.stderr)
    return 0


def cmd_sandbox(args) -> int:
    from .sandbox import describe, process_limit

    d = describe()
    d["process_limit"] = process_limit(d["best"])
    print(json.dumps(d, indent=2))
    return 0


def cmd_humaneval(args) -> int:
    from . import humaneval
    from .common import EvalInputError

    if args.write_prompts:
        return _write_prompts(humaneval.build_prompts(), args.write_prompts)
    if not args.samples:
        return _fail("pass --samples FILE (generation from a model is not wired yet) or --write-prompts FILE")
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        return _fail(f"--k must be comma-separated integers, got {args.k!r}")
    sb = _make_sandbox(args)
    out = _out_dir(args)
    try:
        summary = humaneval.score(args.samples, sandbox=sb, timeout_s=args.timeout, ks=ks,
                                  results_path=out / "results.jsonl", workers=args.workers,
                                  progress=not args.no_progress,
                                  allow_incomplete=args.allow_incomplete)
    except EvalInputError as e:
        return _fail(str(e))
    return _finish(summary, out)


def cmd_fim(args) -> int:
    from . import fim
    from .common import EvalInputError

    fmt = fim.FimFormat(args.fim_begin, args.fim_hole, args.fim_end)
    if args.write_prompts:
        return _write_prompts(fim.build_prompts(args.subset, fmt=fmt), args.write_prompts)
    if not args.samples:
        return _fail("pass --samples FILE (generation from a model is not wired yet) or --write-prompts FILE")
    sb = _make_sandbox(args)
    out = _out_dir(args)
    try:
        summary = fim.score(args.samples, sandbox=sb, timeout_s=args.timeout,
                            results_path=out / "results.jsonl", workers=args.workers,
                            progress=not args.no_progress)
    except EvalInputError as e:
        return _fail(str(e))
    return _finish(summary, out)


def cmd_insecure(args) -> int:
    from . import security
    from .common import EvalInputError

    try:
        det = security.Detector(args.min_severity, args.min_confidence)
        if args.write_prompts:
            if not args.corpus:
                return _fail("--write-prompts needs --corpus PATH...")
            prompts = security.build_prompts(args.corpus, det, args.max_prompts, args.seed,
                                             progress=not args.no_progress)
            return _write_prompts(prompts, args.write_prompts)
        if not args.samples:
            return _fail("pass --samples FILE with --prompts FILE (or --corpus), or --write-prompts FILE")
        if args.prompts:
            prompts = security.load_prompts(args.prompts)
        elif args.corpus:
            prompts = {p["task_id"]: p for p in security.build_prompts(
                args.corpus, det, args.max_prompts, args.seed)}
        else:
            return _fail("scoring needs the prompts the samples continue: --prompts FILE or --corpus PATH")
        out = _out_dir(args)
        summary = security.score(args.samples, prompts, detector=det,
                                 results_path=out / "results.jsonl", progress=not args.no_progress)
    except EvalInputError as e:
        return _fail(str(e))
    return _finish(summary, out)
