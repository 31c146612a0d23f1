"""HumanEval infilling (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle", section 4 / the HumanEval-Infilling benchmark).

Tasks are built deterministically from the HumanEval canonical solutions:
  single-line  every non-blank line of a canonical solution is masked in turn      (1,033 tasks)
  multi-line   every contiguous span of lines that starts and ends on a non-blank
               line is masked in turn                                              (5,815 tasks)
For a span of lines a..b, prefix = prompt + the solution before line a, middle = lines a..b,
suffix = the rest; the line break before line a belongs to the middle and the one after line b
to the suffix, so prefix + middle + suffix is exactly prompt + canonical solution. The model
sees prefix and suffix in the FIM format and writes the middle; the program
prefix + middle + suffix is scored by the problem's HumanEval tests in the sandbox, and pass@1
is reported per subset.

Task ids: "SingleLineInfilling/HumanEval/<n>/L<a>" and "MultiLineInfilling/HumanEval/<n>/L<a>_L<b>"
(a, b: 0-based line numbers in the canonical solution).

    nanoseek eval humaneval-fim --write-prompts prompts.jsonl      # for an external generator
    nanoseek eval humaneval-fim --samples fim_samples.jsonl --out results/
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Iterable

from ..chat_format import FIM_BEGIN, FIM_END, FIM_HOLE
from .common import EvalInputError, load_samples, score_with_sandbox
from .humaneval import TIMEOUT_S, load_problems, make_job, reference_result
from .passk import pass_at_ks
from .sandbox import Result, Sandbox

SUBSETS = {"single-line": "SingleLineInfilling", "multi-line": "MultiLineInfilling"}
PUBLISHED_SIZES = {"single-line": 1033, "multi-line": 5815}


@dataclasses.dataclass(frozen=True)
class FimFormat:
    """How prefix and suffix are shown to the model (prefix-suffix-middle order). The defaults
    are DeepSeek's FIM special tokens; pass the ones of your tokenizer if they differ."""

    begin: str = FIM_BEGIN
    hole: str = FIM_HOLE
    end: str = FIM_END

    def __call__(self, prefix: str, suffix: str) -> str:
        return f"{self.begin}{prefix}{self.hole}{suffix}{self.end}"


def _spans(solution: str, subset: str) -> list[tuple[int, int]]:
    lines = solution.split("\n")
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if subset == "single-line":
        return [(i, i) for i in nonblank]
    if subset == "multi-line":
        return [(a, b) for x, a in enumerate(nonblank) for b in nonblank[x:]]
    raise ValueError(f"subset must be one of {list(SUBSETS)}, got {subset!r}")


def _split(solution: str, a: int, b: int) -> tuple[str, str, str]:
    lines = solution.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    start = starts[a] - 1 if a > 0 else 0  # include the line break that ends line a-1
    end = starts[b] + len(lines[b])  # up to the end of line b, its line break excluded
    return solution[:start], solution[start:end], solution[end:]


def build_tasks(subset: str, problems: dict[str, dict] | None = None) -> list[dict]:
    """All infilling tasks of one subset, in problem order then span order."""
    problems = problems or load_problems()
    name = SUBSETS.get(subset)
    if name is None:
        raise ValueError(f"subset must be one of {list(SUBSETS)}, got {subset!r}")
    tasks = []
    for tid, p in problems.items():
        sol = p["canonical_solution"]
        for a, b in _spans(sol, subset):
            before, middle, after = _split(sol, a, b)
            span = f"L{a}" if subset == "single-line" else f"L{a}_L{b}"
            tasks.append({
                "task_id": f"{name}/{tid}/{span}", "problem_id": tid, "subset": subset,
                "entry_point": p["entry_point"], "prompt": p["prompt"] + before,
                "suffix": after, "canonical_solution": middle, "test": p["test"],
            })
    return tasks


def build_prompts(subsets: Iterable[str] = tuple(SUBSETS), problems: dict[str, dict] | None = None,
                  fmt: FimFormat = FimFormat()) -> list[dict]:
    """One {task_id, prompt, prefix, suffix} per task; `prompt` is already in FIM format."""
    out = []
    for subset in subsets:
        for t in build_tasks(subset, problems):
            out.append({"task_id": t["task_id"], "prompt": fmt(t["prompt"], t["suffix"]),
                        "prefix": t["prompt"], "suffix": t["suffix"], "stop": []})
    return out


def _record(sample: dict, res: Result) -> dict:
    return {
        "task_id": sample["task_id"], "completion_id": sample["completion_id"],
        "completion": sample["completion"], "passed": res.passed, "result": reference_result(res),
        "status": res.status, "detail": res.detail, "duration": round(res.duration, 4),
    }


def score(samples: list[dict] | str | os.PathLike, problems: dict[str, dict] | None = None, *,
          sandbox: Sandbox | None = None, timeout_s: float = TIMEOUT_S, ks: Iterable[int] = (1,),
          results_path: str | os.PathLike | None = None, workers: int | None = None,
          progress: bool = True) -> dict:
    """Score {task_id, completion} samples (the middles). pass@k per subset, over the tasks
    that have samples (the benchmark is often run on a subset; `n_tasks` says how many)."""
    problems = problems or load_problems()
    tasks = {t["task_id"]: t for s in SUBSETS for t in build_tasks(s, problems)}
    if not isinstance(samples, list):
        samples = load_samples(samples, known_tasks=tasks)
    else:
        counts: dict[str, int] = {}
        numbered = []
        for i, s in enumerate(samples):
            if s.get("task_id") not in tasks or not isinstance(s.get("completion"), str):
                raise EvalInputError(f"sample {i}: unknown task_id or missing completion")
            cid = counts.get(s["task_id"], 0)
            counts[s["task_id"]] = cid + 1
            numbered.append({**s, "completion_id": cid})
        samples = numbered
    sandbox = sandbox or Sandbox()
    signature = {"isolation": sandbox.isolation, "timeout_s": timeout_s}

    def job(s):
        t = tasks[s["task_id"]]
        return make_job(problems[t["problem_id"]], s["completion"], timeout_s,
                        prefix=t["prompt"], suffix=t["suffix"], limits=sandbox.limits)

    records = score_with_sandbox(samples, job, _record, sandbox, results_path, signature,
                                 workers, progress="humaneval-fim" if progress else False)
    by_subset: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_subset[tasks[r["task_id"]]["subset"]][r["task_id"]].append(bool(r["passed"]))
    summary: dict = {"task": "humaneval-fim", "isolation": sandbox.isolation,
                     "process_limit": sandbox.process_limit, "memory_limit": sandbox.memory_limit,
                     "timeout_s": timeout_s, "n_samples": len(records),
                     "results_path": str(results_path) if results_path else None, "subsets": {}}
    for subset, per_task in by_subset.items():
        ns = [len(v) for v in per_task.values()]
        cs = [sum(v) for v in per_task.values()]
        summary["subsets"][subset] = {**pass_at_ks(ns, cs, ks), "n_tasks": len(per_task),
                                      "n_tasks_published": PUBLISHED_SIZES[subset]}
    return summary
