"""Eval tasks as plug-ins: each builds prompts and scores samples; generation is a callable.

A task exposes `build_prompts() -> [{task_id, prompt, stop, ...}]` and
`score(samples_path, out_dir) -> summary`. `run_task` connects a task to any generator with the
signature

    complete_fn(prompts: list[str], *, n, temperature, top_p, seed, max_new_tokens, stop)
        -> list[list[str]]          # n completions per prompt

so the inference engine (or an HTTP client, or a test double) plugs in without the tasks
knowing about models. Generation is resumable (prompts that already have n samples in
`samples.jsonl` are skipped) and deterministic: prompts are batched in a fixed order and batch
i is generated with seed `seed + i`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Protocol

from . import fim, humaneval, security
from .common import EvalInputError, read_jsonl
from .sandbox import Sandbox

CompleteFn = Callable[..., list[list[str]]]


class Task(Protocol):
    name: str
    max_new_tokens: int

    def build_prompts(self) -> list[dict]: ...

    def postprocess(self, completion: str, prompt: dict) -> str: ...

    def score(self, samples_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict: ...


@dataclasses.dataclass
class HumanEvalTask:
    name: str = "humaneval"
    max_new_tokens: int = 512
    sandbox: Sandbox | None = None
    timeout_s: float = humaneval.TIMEOUT_S
    ks: tuple[int, ...] = (1, 10, 100)
    workers: int | None = None
    progress: bool = True
    allow_incomplete: bool = False
    task_ids: tuple[str, ...] | None = None  # a subset of problems (a quick smoke eval)

    def _problems(self) -> dict[str, dict]:
        problems = humaneval.load_problems()
        if self.task_ids is None:
            return problems
        unknown = [t for t in self.task_ids if t not in problems]
        if unknown:
            raise EvalInputError(f"unknown HumanEval task ids: {unknown[:5]}")
        return {t: problems[t] for t in self.task_ids}

    def build_prompts(self) -> list[dict]:
        return humaneval.build_prompts(self._problems())

    def postprocess(self, completion: str, prompt: dict) -> str:
        return humaneval.truncate(completion, prompt.get("stop") or humaneval.STOP)

    def score(self, samples_path, out_dir) -> dict:
        return humaneval.score(samples_path, self._problems(), sandbox=self.sandbox,
                               timeout_s=self.timeout_s,
                               ks=self.ks, results_path=Path(out_dir) / "results.jsonl",
                               workers=self.workers, progress=self.progress,
                               allow_incomplete=self.allow_incomplete)


@dataclasses.dataclass
class HumanEvalFimTask:
    name: str = "humaneval-fim"
    max_new_tokens: int = 256
    subsets: tuple[str, ...] = tuple(fim.SUBSETS)
    fmt: fim.FimFormat = fim.FimFormat()
    sandbox: Sandbox | None = None
    timeout_s: float = humaneval.TIMEOUT_S
    ks: tuple[int, ...] = (1,)
    workers: int | None = None
    progress: bool = True
    limit: int | None = None  # the first `limit` tasks of each subset (a quick smoke eval)

    def build_prompts(self) -> list[dict]:
        if self.limit is None:
            return fim.build_prompts(self.subsets, fmt=self.fmt)
        return [p for sub in self.subsets for p in fim.build_prompts((sub,), fmt=self.fmt)[: self.limit]]

    def postprocess(self, completion: str, prompt: dict) -> str:
        return completion  # the middle ends where the model emits end-of-text

    def score(self, samples_path, out_dir) -> dict:
        return fim.score(samples_path, sandbox=self.sandbox, timeout_s=self.timeout_s, ks=self.ks,
                         results_path=Path(out_dir) / "results.jsonl", workers=self.workers,
                         progress=self.progress)


@dataclasses.dataclass
class InsecureCodeTask:
    corpus: tuple[str, ...] = ()
    prompts_path: str | None = None  # a prompts JSONL; built from `corpus` when absent
    name: str = "insecure-code"
    max_new_tokens: int = 128
    max_prompts: int | None = 1000
    seed: int = 0
    detector: security.Detector | None = None  # or security.make_detector("both" | "codeshield")
    progress: bool = True

    def build_prompts(self) -> list[dict]:
        if self.prompts_path:
            return list(security.load_prompts(self.prompts_path).values())
        if not self.corpus:
            raise EvalInputError("insecure-code needs a corpus or a prompts file")
        return security.build_prompts(self.corpus, self._detector(), self.max_prompts, self.seed)

    def _detector(self) -> security.Detector:
        if self.detector is None:
            self.detector = security.Detector()
        return self.detector

    def postprocess(self, completion: str, prompt: dict) -> str:
        return completion

    def score(self, samples_path, out_dir) -> dict:
        prompts = {p["task_id"]: p for p in self.build_prompts()}
        return security.score(samples_path, prompts, detector=self._detector(),
                              results_path=Path(out_dir) / "results.jsonl", progress=self.progress)


def run_task(task: Task, complete_fn: CompleteFn, n: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, out_dir: str | os.PathLike = "eval_out",
             max_new_tokens: int | None = None, batch_size: int = 16,
             progress: bool = True) -> dict:
    """Generate n samples per prompt with `complete_fn`, then score them. Writes
    out_dir/prompts.jsonl, samples.jsonl (resumable), results.jsonl and summary.json."""
    if n < 1:
        raise ValueError("n must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = task.build_prompts()
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    samples_path = out / "samples.jsonl"
    have: dict[str, int] = {}
    if samples_path.exists():
        for s in read_jsonl(samples_path):
            have[s["task_id"]] = have.get(s["task_id"], 0) + 1
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=f"{task.name}: generate", unit="prompt")
    with open(samples_path, "a", encoding="utf-8") as f:
        for b, batch in enumerate(batches):
            if all(have.get(p["task_id"], 0) >= n for p in batch):
                if bar is not None:
                    bar.update(len(batch))
                continue
            # The whole batch is regenerated with its own seed, so a resumed run produces the
            # same samples as an uninterrupted one; only missing ones are written.
            outs = complete_fn([p["prompt"] for p in batch], n=n, temperature=temperature,
                               top_p=top_p, seed=seed + b,
                               max_new_tokens=max_new_tokens or task.max_new_tokens,
                               stop=list(batch[0].get("stop") or []))
            if len(outs) != len(batch) or any(len(o) != n for o in outs):
                raise ValueError(f"complete_fn returned {[len(o) for o in outs]} completions for "
                                 f"{len(batch)} prompts with n={n}")
            for p, completions in zip(batch, outs):
                for c in completions[have.get(p["task_id"], 0):]:
                    if not isinstance(c, str):
                        raise ValueError("complete_fn must return strings")
                    rec: dict[str, Any] = {"task_id": p["task_id"],
                                           "completion": task.postprocess(c, p)}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                have[p["task_id"]] = n
            f.flush()
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    summary = task.score(samples_path, out)
    summary["generation"] = {"n": n, "temperature": temperature, "top_p": top_p, "seed": seed,
                             "batch_size": batch_size,
                             "max_new_tokens": max_new_tokens or task.max_new_tokens}
    write_summary(summary, out)
    return summary


def write_summary(summary: dict, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
