"""Shared plumbing of the eval tasks: JSONL I/O with clear errors, resumable result files, and
scoring many programs through the sandbox pool.

Resumability: per-sample results are appended (and flushed) to `<out>.partial` as they finish;
a rerun reads that file and re-runs only samples it has no result for (same task_id,
completion_id, completion text, isolation level and timeout). When every sample is scored, the
results are written in input order to `<out>` and the partial file is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..jsonl import read_jsonl as _read_jsonl
from .sandbox import Job, Result, Sandbox


class EvalInputError(ValueError):
    """A samples/prompts file is malformed; the message names the file and line."""


class SandboxError(RuntimeError):
    """The sandbox itself could not run some programs (status "error": it failed to start, e.g.
    under user-namespace or process limits). That is no verdict on the code, so it is neither
    scored as a failure nor stored: a rerun retries those samples (the others are kept)."""


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a samples/prompts JSONL file (nanoseek.jsonl.read_jsonl), each with its line
    number under "_line"; EvalInputError naming file:line for anything malformed."""
    return _read_jsonl(path, error=EvalInputError, line_key="_line")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomic write (temp file + rename): an interrupted write never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_samples(path: str | os.PathLike, fields: tuple[str, ...] = ("task_id", "completion"),
                 known_tasks: Iterable[str] | None = None) -> list[dict]:
    """Read a samples JSONL ({task_id, completion} per line). completion_id is the sample's
    ordinal among lines of the same task, as in the reference harness."""
    known = set(known_tasks) if known_tasks is not None else None
    out, counts = [], {}
    for obj in read_jsonl(path):
        for f in fields:
            if f not in obj:
                raise EvalInputError(f"{path}:{obj['_line']}: missing field {f!r}")
            if not isinstance(obj[f], str):
                raise EvalInputError(f"{path}:{obj['_line']}: field {f!r} must be a string")
        tid = obj["task_id"]
        if known is not None and tid not in known:
            raise EvalInputError(f"{path}:{obj['_line']}: unknown task_id {tid!r}")
        obj["completion_id"] = counts.get(tid, 0)
        counts[tid] = obj["completion_id"] + 1
        out.append(obj)
    if not out:
        raise EvalInputError(f"{path}: no samples")
    return out


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ResultStore:
    """Append-only store of per-sample results keyed by (task_id, completion_id)."""

    def __init__(self, out_path: str | os.PathLike | None, signature: dict):
        self.out_path = Path(out_path) if out_path else None
        self.partial = (self.out_path.with_name(self.out_path.name + ".partial")
                        if self.out_path else None)
        self.signature = signature  # e.g. {"isolation": "bwrap", "timeout_s": 3.0}
        self.done: dict[tuple[str, int], dict] = {}
        self._f = None
        for path in (self.out_path, self.partial):
            if path is not None and path.exists():
                try:
                    for r in read_jsonl(path):
                        r.pop("_line", None)
                        if all(r.get(k) == v for k, v in signature.items()):
                            self.done[(r["task_id"], r["completion_id"])] = r
                except (EvalInputError, KeyError):
                    # A truncated last line from a killed run: keep what parsed, rescore the rest.
                    pass

    def get(self, sample: dict) -> dict | None:
        r = self.done.get((sample["task_id"], sample["completion_id"]))
        if r is not None and r.get("completion_sha") == _digest(sample["completion"]) and r.get("status") != "error":
            return r
        return None

    def add(self, record: dict) -> None:
        self.done[(record["task_id"], record["completion_id"])] = record
        if self.partial is None:
            return
        if self._f is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.partial, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def finish(self, ordered: list[dict]) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.out_path is not None:
            write_jsonl(self.out_path, ordered)
            if self.partial.exists():
                self.partial.unlink()


def score_with_sandbox(samples: list[dict], make_job: Callable[[dict], Job],
                       make_record: Callable[[dict, Result], dict], sandbox: Sandbox,
                       results_path: str | os.PathLike | None, signature: dict,
                       workers: int | None = None, progress: bool | str = True) -> list[dict]:
    """Run every sample not already in the result store; returns records in input order.
    Raises SandboxError if the sandbox could not run some of them (after running all the others,
    whose results stay in the store for a rerun)."""
    store = ResultStore(results_path, signature)
    records: list[dict | None] = [store.get(s) for s in samples]
    todo = [i for i, r in enumerate(records) if r is None]
    harness_errors: list[dict] = []
    if todo:
        jobs = [make_job(samples[i]) for i in todo]
        try:
            for j, res in sandbox.map(jobs, workers=workers, progress=progress):
                i = todo[j]
                rec = make_record(samples[i], res)
                rec.update(signature)
                rec["completion_sha"] = _digest(samples[i]["completion"])
                records[i] = rec
                if res.status == "error":   # the harness, not the program: no verdict, not stored
                    harness_errors.append(rec)
                else:
                    store.add(rec)
        except BaseException:
            if store._f is not None:
                store._f.close()
            raise
    if harness_errors:
        if store._f is not None:
            store._f.close()
        kept = f"the other results are kept in {store.partial}: rerun to retry" if store.partial else "rerun"
        raise SandboxError(f"the sandbox could not run {len(harness_errors)} of {len(samples)} samples "
                           f"(first: {harness_errors[0].get('detail', '')[:300]}); no score is reported; {kept}")
    store.finish(records)  # type: ignore[arg-type]
    return records  # type: ignore[return-value]
