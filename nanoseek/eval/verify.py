"""Verified code tasks mined from source code: the sandbox half of `nanoseek data tasks`, and
the entry point `mine_tasks()`.

    nanoseek data tasks --source default --out runs/tasks/tasks.jsonl --sft-out runs/tasks/sft.jsonl
    python -c "from nanoseek.eval.verify import mine_tasks; mine_tasks(['default'], 't.jsonl', max_tasks=300)"

`nanoseek/data/tasks.py` finds candidate functions and writes tests without running anything;
every piece of mined code runs here, in the sandbox (`sandbox.py`), never in this process:

  1. `record_outputs`: the original implementation (the function standalone: its prompt + body)
     is run on each case expression, in two sandboxed processes (two hash seeds, different
     neighbours in the batch); each case gets (status, repr of the value, seconds). Many
     functions share one sandbox job (one interpreter start for ~12 functions); every case has
     its own timer (SIGALRM), and results stream out line by line, so a function that hangs or
     crashes the interpreter is identified from the partial output, dropped, and the rest of
     its batch re-run without it.
  2. `data.tasks.assemble_task`: deterministic plain-data cases become `check(candidate)`.
  3. `screen_tasks`: per task, the canonical solution must pass the test and the trivial bodies
     (`return None`, `pass`, return the first argument, return the most common expected value)
     must fail it; batched like step 1, under HumanEval's namespace conventions.
  4. `confirm_tasks`: every surviving task is scored exactly as `nanoseek eval humaneval
     --problems` scores it (`humaneval.make_job`: its own guarded process, 3 s timeout).

`mine_tasks` streams candidates from worker processes (bounded look-ahead), deduplicates them
(exact + MinHash near-duplicates, first copy wins), verifies them in rounds, stops early at
`max_tasks`, and writes the train / held-out split, the SFT conversations and a manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import secrets
import sys
import time
from pathlib import Path

from nanoseek.data import dedup, licenses
from nanoseek.data import sources as srcs
from nanoseek.data import tasks as mt

from . import humaneval
from .sandbox import Job, Sandbox
from .tasks import HumanEvalTask

PIPELINE_VERSION = 1

# --------------------------------------------------------------------------------------------
# Batched sandbox programs
#
# Every harness below is a plain script (not a guarded test job): it reads its work list from a
# JSON literal, runs each item in a fresh namespace, and writes one JSON line per result with
# os.write to the real stdout (the item's own prints go to a sink). Lines carry a per-job tag.

_PRELUDE = r'''
import json as _json, math as _math, os as _os, signal as _signal, sys as _sys, time as _time
_W = _json.loads(_PAYLOAD)
_TAG = _W["tag"]


class _Slow(BaseException):
    pass


def _alarm(signum, frame):
    raise _Slow()


_signal.signal(_signal.SIGALRM, _alarm)


def _emit(*fields):
    _os.write(1, (_json.dumps([_TAG, *fields]) + "\n").encode("utf-8", "backslashreplace"))


def _arm(seconds):
    _signal.setitimer(_signal.ITIMER_REAL, seconds)


def _disarm():
    _signal.setitimer(_signal.ITIMER_REAL, 0)


class _Sink:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


_sys.stdout = _sys.stderr = _Sink()
'''

# Step 1: record the original's outputs. "ok" only for plain data (what a test can compare).
_REFERENCE = _PRELUDE + r'''
_SCALARS = (type(None), bool, str, bytes)


def _plain(v, depth=0):
    t = type(v)
    if t in _SCALARS:
        return True
    if t is int:
        return v.bit_length() < 512
    if t is float:
        return _math.isfinite(v)
    if depth > 6:
        return False
    if t is list or t is tuple or t is set:
        return all(_plain(x, depth + 1) for x in v)
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _case(ns, code, tmo, limit):
    t0 = _time.perf_counter()
    _arm(tmo)
    try:
        v = eval(code, ns)
        if not _plain(v):
            status, out = "opaque", type(v).__name__
        else:
            out = repr(v)
            status = "ok" if len(out) <= limit else "big"
    except _Slow:
        status, out = "timeout", ""
    except BaseException as e:
        status, out = "raise", type(e).__name__
    finally:
        _disarm()
    return status, out, _time.perf_counter() - t0


for _it in _W["items"]:
    _ns = {}
    try:
        _arm(_W["case_timeout"] * 4)
        try:
            exec(compile(_it["program"], "<string>", "exec"), _ns)
        finally:
            _disarm()
    except BaseException as _e:
        _emit(_it["id"], -1, "error", type(_e).__name__, 0.0)
        _emit(_it["id"], -2, "done", "", 0.0)
        continue
    _spent = 0.0
    for _i, _c in enumerate(_it["cases"]):
        if _spent > _W["budget"]:
            _emit(_it["id"], _i, "skipped", "", 0.0)
            continue
        try:
            _code = compile(_c, "<case>", "eval")
        except BaseException as _e:
            _emit(_it["id"], _i, "raise", type(_e).__name__, 0.0)
            continue
        _r = _case(_ns, _code, _W["case_timeout"], _W["limit"])
        _spent += _r[2]
        _emit(_it["id"], _i, *_r)
    _emit(_it["id"], -2, "done", "", _spent)
'''

# Step 3: canonical solution and trivial bodies against the test, as the HumanEval harness runs
# them (solution in a fresh namespace, test in a copy of it, then check(entry_point)).
_SCREEN = _PRELUDE + r'''
for _it in _W["items"]:
    for _i, _body in enumerate(_it["bodies"]):
        _t0 = _time.perf_counter()
        _ns = {}
        _arm(_W["timeout"])
        try:
            exec(compile(_it["prompt"] + _body + "\n", "<string>", "exec"), _ns)
            exec(compile(_it["test"] + "\ncheck(" + _it["entry_point"] + ")\n", "<test>", "exec"), dict(_ns))
            _status = "passed"
        except _Slow:
            _status = "timeout"
        except BaseException as _e:
            _status = "failed"
        finally:
            _disarm()
        _emit(_it["id"], _i, _status, "", _time.perf_counter() - _t0)
    _emit(_it["id"], -2, "done", "", 0.0)
'''


def _program(harness: str, payload: dict) -> str:
    return f"_PAYLOAD = {json.dumps(json.dumps(payload))}\n" + harness


def _parse_lines(stdout: str, tag: str) -> list[list]:
    out = []
    for line in stdout.splitlines():
        if not line.startswith(f'["{tag}"'):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, list) and len(rec) == 6:
            out.append(rec[1:])
    return out


def _run_batched(batches: list[list[dict]], harness: str, settings: dict, sandbox: Sandbox, *,
                 timeout_s, workers: int | None, stats: collections.Counter):
    """Run batches of items through `harness`. Returns ({batch number: {item id: {index: (status,
    payload, seconds)}}}, {item id: failure reason}). When a job dies while an item runs, the
    items after it are run again in a new job, and the item itself gets one more try alone (a
    job can die for reasons outside the function, e.g. memory pressure on the machine); dying
    again makes it failed ("crashed" or "hung")."""
    results: dict[int, dict[str, dict[int, tuple]]] = collections.defaultdict(dict)
    failed: dict[str, str] = {}
    retried: set[str] = set()
    pending = [(b, items) for b, items in enumerate(batches) if items]
    for _wave in range(16):
        if not pending:
            break
        jobs, tags = [], []
        for _, items in pending:
            tag = secrets.token_hex(6)
            tags.append(tag)
            payload = {"tag": tag, "items": items, **settings}
            lim = dataclasses.replace(sandbox.limits, timeout_s=timeout_s(items), grace_s=2.0,
                                      max_output_bytes=16 << 20, file_mb=32)
            jobs.append(Job(source=_program(harness, payload), limits=lim))
        stats["sandbox_jobs"] += len(jobs)
        again = []
        for (b, items), tag, res in zip(pending, tags, sandbox.run_many(jobs, workers=workers)):
            got: dict[str, dict[int, tuple]] = collections.defaultdict(dict)
            done = set()
            for iid, idx, status, payload, sec in _parse_lines(res.stdout, tag):
                if idx == -2:
                    done.add(iid)
                else:
                    got[iid][idx] = (status, payload, sec)
            left = [it for it in items if it["id"] not in done]
            for it in items:
                if it["id"] in done:
                    results[b][it["id"]] = got[it["id"]]
            if left:
                culprit = left[0]["id"]
                if culprit in retried:
                    failed[culprit] = "hung" if res.status == "timeout" else "crashed"
                else:
                    retried.add(culprit)
                    again.append((b, left[:1]))
                if len(left) > 1:
                    again.append((b, left[1:]))
        pending = again
    for _, items in pending:
        for it in items:
            failed.setdefault(it["id"], "crashed")
    return results, failed


def record_outputs(items: list[dict], sandbox: Sandbox, *, runs: int = 2, batch_size: int = 12,
                   case_timeout_s: float = 0.5, budget_s: float = 3.0, repr_limit: int = 600,
                   workers: int | None = None, stats: collections.Counter | None = None):
    """Run originals ({"id", "program", "cases": [expr]}) `runs` times in separate sandbox
    processes. Returns ({id: [{case index: outcome} per run]}, {id: failure reason})."""
    stats = stats if stats is not None else collections.Counter()
    batches = []
    for r in range(runs):
        order = items if r % 2 == 0 else items[::-1]   # other neighbours in the second run
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    settings = {"case_timeout": case_timeout_s, "budget": budget_s, "limit": repr_limit}
    res, failed = _run_batched(batches, _REFERENCE, settings, sandbox, workers=workers, stats=stats,
                               timeout_s=lambda its: min(120.0, 5.0 + len(its) * (budget_s + 4 * case_timeout_s)))
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for b in sorted(res):
        for iid, cases in res[b].items():
            if any(v[0] == "error" for v in cases.values()):
                failed.setdefault(iid, "reference_error")
            out[iid].append({k: v for k, v in cases.items() if k >= 0})
    return {k: v for k, v in out.items() if k not in failed and len(v) == runs}, failed


def screen_tasks(tasks: list[dict], sandbox: Sandbox, *, batch_size: int = 10, timeout_s: float = 2.0,
                 workers: int | None = None, stats: collections.Counter | None = None) -> dict[str, str | None]:
    """{task key: None (canonical passes, every trivial body fails) or the drop reason}."""
    stats = stats if stats is not None else collections.Counter()
    items = [{"id": t["_meta"]["key"], "prompt": t["prompt"], "test": t["test"], "entry_point": t["entry_point"],
              "bodies": [t["canonical_solution"]] + mt.trivial_bodies(t)} for t in tasks]
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    res, failed = _run_batched(batches, _SCREEN, {"timeout": timeout_s}, sandbox, workers=workers, stats=stats,
                               timeout_s=lambda its: min(120.0, 5.0 + len(its) * 5 * timeout_s))
    verdict: dict[str, str | None] = {k: "canonical_failed" for k in failed}
    for b in res.values():
        for iid, outs in b.items():
            if outs.get(0, ("",))[0] != "passed":
                verdict[iid] = "canonical_failed"
            elif any(outs.get(i, ("passed",))[0] == "passed" for i in range(1, len(outs))):
                verdict[iid] = "trivial_body_passes"
            else:
                verdict[iid] = None
    return verdict


def confirm_tasks(tasks: list[dict], sandbox: Sandbox, *, timeout_s: float = humaneval.TIMEOUT_S,
                  workers: int | None = None, stats: collections.Counter | None = None) -> dict[str, bool]:
    """{task key: passed} for the canonical solutions, scored exactly like `eval humaneval`."""
    if stats is not None:
        stats["sandbox_jobs"] += len(tasks)
    jobs = [humaneval.make_job(t, t["canonical_solution"], timeout_s, limits=sandbox.limits) for t in tasks]
    return {t["_meta"]["key"]: r.passed for t, r in zip(tasks, sandbox.run_many(jobs, workers=workers))}


# --------------------------------------------------------------------------------------------
# Scoring mined problems (`nanoseek eval humaneval --problems FILE`)

_PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "test")


def load_problem_file(path: str | os.PathLike) -> dict[str, dict]:
    """task_id -> problem from a HumanEval-shaped JSONL (e.g. `data tasks` output), in file
    order; a malformed line raises EvalInputError naming the file and line."""
    from .common import EvalInputError, read_jsonl

    problems: dict[str, dict] = {}
    for obj in read_jsonl(path):
        line = obj.pop("_line")
        for f in _PROBLEM_FIELDS:
            if not isinstance(obj.get(f), str):
                raise EvalInputError(f"{path}:{line}: field {f!r} missing or not a string "
                                     f"(need {', '.join(_PROBLEM_FIELDS)})")
        if obj["task_id"] in problems:
            raise EvalInputError(f"{path}:{line}: duplicate task_id {obj['task_id']!r}")
        problems[obj["task_id"]] = obj
    if not problems:
        raise EvalInputError(f"{path}: no problems")
    return problems


@dataclasses.dataclass
class ProblemFileTask(HumanEvalTask):
    """`HumanEvalTask` over the problems of a JSONL file instead of HumanEval's 164."""

    name: str = "problems"
    problems_path: str = ""
    limit: int | None = None       # the first `limit` problems, in file order

    def _problems(self) -> dict[str, dict]:
        problems = load_problem_file(self.problems_path)
        if self.limit:
            problems = dict(list(problems.items())[: self.limit])
        return problems

    def score(self, samples_path, out_dir) -> dict:
        return super().score(samples_path, out_dir) | {"problems": self.problems_path}


# --------------------------------------------------------------------------------------------
# Extraction workers

_W: dict = {}


def _init_worker(policy: tuple[str, ...], decontaminator, limits: srcs.SizeLimits) -> None:
    _W.update(policy=policy, decontaminator=decontaminator, limits=limits)


@dataclasses.dataclass
class _Extracted:
    candidates: list
    functions: int
    files: int
    drops: mt._Drops
    file_drops: mt._Drops


def _extract(task: srcs.Task) -> _Extracted:
    res = _Extracted([], 0, 0, mt._Drops(), mt._Drops())
    for item in srcs.read_task(task, _W["limits"]):
        if isinstance(item, srcs.Skip):
            if item.reason != "not_code" and (item.where.endswith(".py")):
                res.files += 1
                res.file_drops.add(item.reason, item.where)
            continue
        if item.lang != "python":
            continue
        res.files += 1
        why = mt.path_reason(item.path)
        if why:
            res.file_drops.add(why, item.where or item.path)
            continue
        data = item.data
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError:
            res.file_drops.add("invalid_utf8", item.where)
            continue
        text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        cands, n, drops = mt.extract_candidates(
            text, group=item.group, path=item.path, license=item.license, source=item.source,
            where=f"{item.source}:{item.path}", allowed=_W["policy"], decontaminator=_W["decontaminator"])
        res.candidates += cands
        res.functions += n
        res.drops.merge(drops)
    return res


def _ordered(tasks: list, workers: int, init_args: tuple):
    """Results of `_extract` over tasks, in order, with at most 2 * workers tasks in flight (a
    capped run stops early without having extracted everything in the background)."""
    if workers <= 1:
        _init_worker(*init_args)
        for t in tasks:
            yield _extract(t)
        return
    from nanoseek.data.build import mp_context

    with mp_context().Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        window = collections.deque()
        it = iter(tasks)
        for t in it:
            window.append(pool.apply_async(_extract, (t,)))
            if len(window) >= 2 * workers:
                break
        while window:
            r = window.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.apply_async(_extract, (nxt,)))
            yield r


def _file_order_key(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{name}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _plan(specs, seed: int, pre_drops: mt._Drops) -> tuple[list[srcs.Task], int]:
    """Extraction tasks: Python files in a seeded order (a capped run samples every package, not
    the alphabetically first), in small batches, then archives and tables. Also returns the
    number of Python files listed (archive members are counted when read)."""
    refs, enum = srcs.enumerate_sources(specs, srcs.SizeLimits())
    files = 0
    for s in enum.skips:
        if s.where.endswith(".py"):
            files += 1
            pre_drops.add(s.reason, s.where)
    py = []
    for r in refs:
        if r.lang != "python":
            continue
        files += 1
        why = mt.path_reason(r.rel)
        if why:
            pre_drops.add(why, r.path)
        else:
            py.append(r)
    py.sort(key=lambda r: _file_order_key(seed, f"{r.group}/{r.rel}"))
    return srcs.batch_files(py, chunk_bytes=1 << 20, chunk_files=24) + enum.tasks, files


# --------------------------------------------------------------------------------------------
# The miner

@dataclasses.dataclass
class MineConfig:
    sources: list[str]
    seed: int = 0
    max_tasks: int | None = None
    held_out_fraction: float = 0.1
    license_policy: str = "permissive"
    decontaminate: bool = True
    near_dup_threshold: float = dedup.DEFAULT_THRESHOLD
    case_timeout_s: float = 0.5
    round_size: int = 160

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self) | {"version": PIPELINE_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """`runs/tasks.jsonl` -> train `runs/tasks.jsonl`, held-out `runs/tasks.heldout.jsonl`,
    manifest `runs/tasks.manifest.json`."""
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return {"train": out, "heldout": out.with_name(stem + ".heldout.jsonl"),
            "manifest": out.with_name(stem + ".manifest.json")}


def _verify_round(cands: list, cfg: MineConfig, sandbox: Sandbox, workers, drops: mt._Drops,
                  stats: collections.Counter, timing: collections.Counter) -> list[dict]:
    """Candidates -> verified tasks (in candidate order); every loss is counted in `drops`."""
    t0 = time.perf_counter()
    workers = workers + 1   # sandbox threads only wait on children: one more than cores overlaps start-up
    cases = {c.key: mt.make_cases(c, cfg.seed) for c in cands}
    items = [{"id": c.key, "program": c.program, "cases": [k.expr for k in cases[c.key]]} for c in cands]
    runs, failed = record_outputs(items, sandbox, case_timeout_s=cfg.case_timeout_s, workers=workers, stats=stats)
    stats["cases_run"] += 2 * sum(len(it["cases"]) for it in items)
    t1 = time.perf_counter()
    timing["reference_s"] += t1 - t0
    tasks = []
    for c in cands:
        if c.key in failed:
            drops.add(failed[c.key] if failed[c.key] != "crashed" else "reference_crashed", c.where)
            continue
        t = mt.assemble_task(c, cases[c.key], runs[c.key])
        if isinstance(t, str):
            drops.add(t, c.where)
        else:
            tasks.append(t)
    verdict = screen_tasks(tasks, sandbox, workers=workers, stats=stats) if tasks else {}
    screened = []
    for t in tasks:
        why = verdict.get(t["_meta"]["key"], "canonical_failed")
        if why:
            drops.add(why, t["source"])
        else:
            screened.append(t)
    t2 = time.perf_counter()
    timing["screen_s"] += t2 - t1
    ok = confirm_tasks(screened, sandbox, workers=workers, stats=stats) if screened else {}
    kept = []
    for t in screened:
        if ok.get(t["_meta"]["key"]):
            kept.append(t)
        else:
            drops.add("confirm_failed", t["source"])
    timing["confirm_s"] += time.perf_counter() - t2
    return kept


def _assign_ids(tasks: list[dict]) -> None:
    seen: collections.Counter = collections.Counter()
    for t in tasks:
        base = f"Mined/{t['_meta']['module']}.{t['entry_point']}"
        tid = base if not seen[base] else f"{base}@{t['_meta']['group']}"
        while seen[tid]:
            tid = f"{base}#{seen[tid] + 1}"
        seen[base] += 1
        seen[tid] += 1
        t["task_id"] = tid


def _write_jsonl(path: Path, lines) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in lines:
            f.write(mt.dumps(rec))
            n += 1
    os.replace(tmp, path)
    return n


def _reuse(paths: dict, sft_out, cfg: MineConfig, force: bool) -> dict | None:
    if force or not paths["manifest"].is_file():
        return None
    try:
        old = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = [paths["train"], paths["heldout"]] + ([Path(sft_out)] if sft_out else [])
    same_sft = (old.get("files", {}).get("sft") == (str(sft_out) if sft_out else None))
    if old.get("fingerprint") == cfg.fingerprint() and same_sft and all(p.is_file() for p in files):
        return old
    return None


def mine_tasks(sources=("default",), out: str | os.PathLike = "tasks.jsonl", *, sft_out=None, seed: int = 0,
               max_tasks: int | None = None, held_out_fraction: float = 0.1, workers: int | None = None,
               progress: bool = True, license_policy: str = "permissive", decontaminate: bool = True,
               isolation: str = "auto", sandbox: Sandbox | None = None, force: bool = False) -> dict:
    """Mine verified HumanEval-shaped tasks from `sources` into `out` (train split),
    `<stem>.heldout.jsonl` and `<stem>.manifest.json`, plus SFT conversations from the train
    split into `sft_out`. Returns the manifest. A finished run with the same settings is reused
    (`force=True` redoes it). Output is deterministic for a seed (up to timeouts under load)."""
    if license_policy not in licenses.POLICIES:
        raise ValueError(f"unknown license policy {license_policy!r}; choose from {sorted(licenses.POLICIES)}")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be positive, got {max_tasks}")
    sources = list(sources or ["default"])
    specs = [srcs.parse_source(s) for s in sources]
    cfg = MineConfig(sources=[s.label for s in specs], seed=seed, max_tasks=max_tasks,
                     held_out_fraction=held_out_fraction, license_policy=license_policy,
                     decontaminate=decontaminate)
    paths = output_paths(out)
    old = _reuse(paths, sft_out, cfg, force)
    if old is not None:
        if progress:
            print(f"tasks in {paths['train']} are complete for these settings; reusing them", file=sys.stderr)
        return old
    sandbox = sandbox or Sandbox(isolation)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    t_start = time.perf_counter()
    decontaminator = None
    if decontaminate:
        from nanoseek.data import clean

        decontaminator = clean.Decontaminator([clean.humaneval_benchmark()])
    file_drops, drops = mt._Drops(), mt._Drops()
    plan, files_listed = _plan(specs, seed, file_drops)
    stats: collections.Counter = collections.Counter(files_listed=files_listed)
    timing: collections.Counter = collections.Counter()
    kept = _mine_loop(plan, cfg, sandbox, workers, progress, decontaminator, drops, file_drops, stats, timing)
    if max_tasks is not None and len(kept) > max_tasks:
        for t in kept[max_tasks:]:
            drops.add("over_max_tasks", t["source"])
        kept = kept[:max_tasks]
    _assign_ids(kept)
    train, heldout = mt.split_tasks(kept, held_out_fraction, seed)
    return _write_outputs(paths, sft_out, cfg, train, heldout, drops, file_drops, stats, timing,
                          time.perf_counter() - t_start, sandbox, workers)


def _mine_loop(plan, cfg: MineConfig, sandbox, workers, progress, decontaminator, drops, file_drops, stats,
               timing) -> list[dict]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="data tasks", unit="batch", file=sys.stderr, smoothing=0.05)
    exact: set[bytes] = set()
    near = dedup.NearDupIndex(cfg.near_dup_threshold)
    pending, kept = [], []
    t_extract = time.perf_counter()
    allowed = tuple(licenses.POLICIES[cfg.license_policy])
    try:
        for res in _ordered(plan, workers, (allowed, decontaminator, srcs.SizeLimits())):
            stats["files_read"] += res.files
            stats["functions_seen"] += res.functions
            drops.merge(res.drops)
            file_drops.merge(res.file_drops)
            for c in res.candidates:
                if c.digest in exact:
                    drops.add("exact_duplicate", c.where)
                    continue
                exact.add(c.digest)
                if c.sig is not None and near.add(stats["candidates"], c.sig) is not None:
                    drops.add("near_duplicate", c.where)
                    continue
                stats["candidates"] += 1
                pending.append(c)
            if bar is not None:
                bar.update(1)
            if len(pending) >= cfg.round_size:
                timing["extract_s"] += time.perf_counter() - t_extract
                kept += _verify_round(pending, cfg, sandbox, workers, drops, stats, timing)
                pending = []
                t_extract = time.perf_counter()
                if bar is not None:
                    bar.set_postfix(kept=len(kept), candidates=stats["candidates"])
                if cfg.max_tasks is not None and len(kept) >= cfg.max_tasks:
                    stats["stopped_early"] = 1
                    break
        timing["extract_s"] += time.perf_counter() - t_extract
        if pending and (cfg.max_tasks is None or len(kept) < cfg.max_tasks):
            kept += _verify_round(pending, cfg, sandbox, workers, drops, stats, timing)
    finally:
        if bar is not None:
            bar.set_postfix(kept=len(kept), candidates=stats["candidates"])
            bar.close()
    return kept


def _write_outputs(paths, sft_out, cfg: MineConfig, train, heldout, drops, file_drops, stats, timing, elapsed,
                   sandbox, workers) -> dict:
    n_train = _write_jsonl(paths["train"], (mt.public_record(t, "train") for t in train))
    n_held = _write_jsonl(paths["heldout"], (mt.public_record(t, "heldout") for t in heldout))
    n_sft = _write_jsonl(Path(sft_out), (mt.sft_example(t, cfg.seed) for t in train)) if sft_out else 0
    kept = train + heldout
    fs = max(stats["functions_seen"], 1)
    manifest = {
        "format": "nanoseek-tasks", "version": PIPELINE_VERSION, "fingerprint": cfg.fingerprint(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": dataclasses.asdict(cfg),
        "python": sys.version.split()[0],
        "files": {"train": str(paths["train"]), "heldout": str(paths["heldout"]),
                  "sft": str(sft_out) if sft_out else None},
        "counts": {"files_listed": stats["files_listed"], "files_read": stats["files_read"],
                   "functions_seen": stats["functions_seen"],
                   "candidates": stats["candidates"], "verified": len(kept), "train": n_train,
                   "heldout": n_held, "sft_examples": n_sft, "stopped_early": bool(stats["stopped_early"])},
        "kept_share": {"of_functions": round(len(kept) / fs, 4),
                       "of_candidates": round(len(kept) / max(stats["candidates"], 1), 4)},
        "dropped_files": {k: {"files": v, "examples": file_drops.examples[k]}
                          for k, v in sorted(file_drops.counts.items())},
        "dropped": {k: {"functions": v, "examples": drops.examples[k]} for k, v in sorted(drops.counts.items())},
        "licenses": dict(collections.Counter(t["license"] for t in kept).most_common()),
        "groups": len({t["_meta"]["group"] for t in kept}),
        "tests": {"asserts_mean": round(sum(t["_meta"]["asserts"] for t in kept) / max(len(kept), 1), 2),
                  "with_doctests": sum(1 for t in kept if t["_meta"]["doctests"])},
        "split": {"by": "group (package), then module", "seed": cfg.seed,
                  "held_out_fraction": cfg.held_out_fraction, "train": n_train, "heldout": n_held},
        "sandbox": {"isolation": sandbox.isolation, "jobs": stats["sandbox_jobs"], "cases_run": stats["cases_run"]},
        "timing": {**{k: round(v, 2) for k, v in timing.items()}, "total_s": round(elapsed, 2), "workers": workers,
                   "tasks_per_min": round(len(kept) / max(elapsed, 1e-9) * 60, 1)},
    }
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    tmp = paths["manifest"].with_name(paths["manifest"].name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, paths["manifest"])
    return manifest
