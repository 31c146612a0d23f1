"""Rewards for RL (GRPO) on code tasks: the built-in code reward and plug-in rewards.

`nanoseek rl` samples G completions per task and needs one reward per completion. Tasks are
HumanEval-shaped dicts (task_id, prompt, entry_point, test = a `check(candidate)` function,
canonical_solution; maybe "request", the chat user message).

The code reward (`CodeReward`) scores a completion by exactly the scoring path of `nanoseek eval
humaneval`: the sandbox job is `humaneval.make_job(problem, code, timeout_s, limits=sandbox.limits)`
run by `Sandbox.run` / `Sandbox.map`, so exit-code tricks (`os._exit(0)`, `sys.exit(0)`,
`raise SystemExit`), redefining `check`, patching builtins etc. score 0, and time and memory
limits apply. Two protocols, as in `chat_code`:

  "completion"  the model continues the prompt; the program is prompt + completion (HumanEval).
                Completions should already be cut at `humaneval.STOP` (as generation with those
                stop strings does); nothing is truncated here, as in `humaneval.score`.
  "chat"        the model answers with the whole function in a fenced block; the program is
                `chat_code.stub_prompt(task)` + `chat_code.extract_code(answer)` (as
                `chat_code.score_answers`).

Every result is a dict of separately logged terms (floats):

  pass     1.0 when the whole test passes (binary all-pass), else 0.0; always computed.
  correct  = pass by default. With `partial_credit=True`: 1.0 when the whole test passes, else the
           share of the test's asserts that pass, capped at (k-1)/k so that only a real
           all-pass earns 1. The share comes from `split_test`: each top-level statement of
           `check(candidate)` holding a non-constant `assert` becomes its own check function
           (all other statements of the body, the setup, are kept in each, in order), and each
           runs as its own job through the same `make_job` path. Cost: a failing completion
           costs 1 + k sandbox runs instead of 1 (a passing one costs 1); a test with fewer
           than 2 such statements is scored binary.
  syntax   1.0 when the code parses (chat: the extracted code; completion: prompt + completion),
           as the `syntax_valid` of chat_code's evaluations.
  format   chat only: 1.0 when the answer holds a closed, non-empty ```python (py, python3)
           block. Always 0.0 for the completion protocol (a non-zero weight is refused there).
  length   -(units beyond `length_target`), <= 0: a penalty of `length` weight per unit. Units
           are the `lengths` passed to `score` / `submit` (e.g. generated tokens, which the RL
           loop knows), else characters of the raw completion.
  total    correct + syntax_w * syntax + format_w * format + length_w * length.

    >>> from nanoseek.eval.rewards import CodeReward, RewardConfig, make_reward
    >>> reward = CodeReward(RewardConfig(protocol="chat", partial_credit=True, format=0.1))
    >>> reward.score(tasks, answers)            # batch: Sandbox.map over a worker pool
    [{"total": 1.1, "correct": 1.0, "pass": 1.0, "syntax": 1.0, "format": 1.0, "length": 0.0}, ...]
    >>> futs = [reward.submit(t, a) for t, a in rows]   # as each row finishes generating
    >>> reward.gather(futs)                     # same dicts; scoring overlapped generation
    >>> reward.close()                          # or `with CodeReward(...) as reward:`

The asynchronous path (`submit` -> `concurrent.futures.Future`, `gather`) runs jobs on a thread
pool of `workers` threads whose threads call `sandbox.run(job)` (each job is a subprocess, so
threads only wait); a failing completion's split jobs are queued on the same pool from the
completion callback, never by a pool thread blocking on other jobs.

Plug-in rewards: `--reward module:function` or `--reward path/to/file.py:function` names any
`fn(task: dict, completion: str) -> float`; tasks then need only a "prompt" field.
`load_reward(spec)` imports it (the module must be importable: installed or on PYTHONPATH; the
file form loads a loose file). It is the user's own code, like a config file: trusted, run
in-process, not sandboxed. `PluginReward(fn, name)` has the same `score` / `submit` / `gather`
interface and returns {"total": v, "plugin": v}; a non-numeric or non-finite v (or an exception
in fn) raises `RewardError` naming the spec and the task.

    >>> reward = make_reward("code", RewardConfig(protocol="completion"))
    >>> reward = make_reward("my_pkg.rewards:brevity")       # or "rewards.py:brevity"
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from . import humaneval
from .chat_code import extract_code, stub_prompt, syntax_valid
from .common import SandboxError
from .sandbox import Job, Result, Sandbox

PROTOCOLS = ("chat", "completion")
CODE_TERMS = ("total", "correct", "pass", "syntax", "format", "length")
PLUGIN_TERMS = ("total", "plugin")
_REQUIRED = ("prompt", "entry_point", "test")
# A closed fenced block labelled as Python with some content: the answer format chat SFT teaches.
_PY_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL | re.IGNORECASE)


class RewardError(ValueError):
    """A reward could not be computed or loaded; the message names the reward and the task."""


@dataclasses.dataclass
class RewardConfig:
    """Options of the built-in code reward (see the module docstring for each term)."""

    protocol: str = "chat"  # "chat" or "completion"
    partial_credit: bool = False  # share of asserts passed instead of binary all-pass
    syntax: float = 0.0  # weight of the syntax-valid term
    format: float = 0.0  # weight of the code-block format term (chat only)
    length: float = 0.0  # penalty per unit beyond length_target
    length_target: int = 1024  # units (tokens if lengths are passed, else characters)
    timeout_s: float = humaneval.TIMEOUT_S  # per program, as `nanoseek eval humaneval`
    workers: int | None = None  # sandbox worker threads; None: one per core + 1

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.protocol == "completion" and self.format:
            raise ValueError("the format term (a ```python block) applies to the chat protocol only")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.length_target < 0:
            raise ValueError(f"length_target must be >= 0, got {self.length_target}")


# ----------------------------------------------------------------------------- partial credit

def _holds_real_assert(stmt: ast.stmt) -> bool:
    # `assert True, "..."` (HumanEval ends many tests with it) checks nothing: it is setup.
    return any(isinstance(n, ast.Assert) and not isinstance(n.test, ast.Constant)
               for n in ast.walk(stmt))


@functools.lru_cache(maxsize=4096)
def split_test(test: str) -> tuple[str, ...]:
    """One test source per assert unit of `check(candidate)`: the original test followed by a
    redefinition of `check` that keeps the setup statements and only that unit. Empty when the
    test has no top-level `check` function or fewer than 2 units (score it binary)."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ()
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        return ()
    check = checks[-1]  # the definition in force when `check(entry_point)` runs
    units = [i for i, s in enumerate(check.body) if _holds_real_assert(s)]
    if len(units) < 2:
        return ()
    out = []
    for u in units:
        body = [s for i, s in enumerate(check.body) if i == u or i not in units]
        one = copy.copy(check)  # same name and signature, whatever this Python's AST fields
        one.body, one.decorator_list = body, []
        # Appended, not spliced: everything else in the test stays byte for byte the same.
        out.append(test.rstrip("\n") + "\n\n\n" + ast.unparse(one) + "\n")
    return tuple(out)


# ----------------------------------------------------------------------------- the code reward

@dataclasses.dataclass
class _Item:
    """One completion, ready to run: its full-test job, its split jobs and its shaping terms."""

    full: Job
    splits: list[Job]
    shaping: dict[str, float]


class CodeReward:
    """The built-in code reward: see the module docstring. `sandbox` defaults to Sandbox()
    (the strongest isolation here, warning when it is below bwrap)."""

    terms = CODE_TERMS

    def __init__(self, config: RewardConfig | None = None, sandbox: Sandbox | None = None):
        self.config = config or RewardConfig()
        self.sandbox = sandbox or Sandbox()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._pending: set[Future] = set()  # submitted, not yet resolved: `close` waits for them

    @property
    def workers(self) -> int:
        return self.config.workers or (os.cpu_count() or 1) + 1

    # -- building jobs --------------------------------------------------------------------
    def _problem_and_code(self, task: dict, completion: str) -> tuple[dict, str]:
        """What `make_job` gets, per protocol (chat: as chat_code.score_answers)."""
        if self.config.protocol == "chat":
            return {**task, "prompt": stub_prompt(task)}, extract_code(completion)
        return task, completion

    def _job(self, problem: dict, code: str) -> Job:
        # Exactly humaneval.score's job: same make_job, timeout and the sandbox's own limits.
        return humaneval.make_job(problem, code, self.config.timeout_s, limits=self.sandbox.limits)

    def _shaping(self, task: dict, completion: str, length: int | None) -> dict[str, float]:
        cfg = self.config
        if cfg.protocol == "chat":
            syntax = syntax_valid(extract_code(completion))
            fmt = any(m.group(1).strip() for m in _PY_BLOCK.finditer(completion))
        else:
            syntax, fmt = syntax_valid(task["prompt"] + completion), False
        n = len(completion) if length is None else int(length)
        return {"syntax": float(syntax), "format": float(fmt),
                "length": float(min(0, cfg.length_target - n))}

    def _prepare(self, task: dict, completion: str, length: int | None) -> _Item:
        _check_task(task, completion)
        problem, code = self._problem_and_code(task, completion)
        splits = split_test(task["test"]) if self.config.partial_credit else ()
        return _Item(full=self._job(problem, code),
                     splits=[self._job({**problem, "test": t}, code) for t in splits],
                     shaping=self._shaping(task, completion, length))

    def _terms(self, item: _Item, passed: bool, split_passed: list[bool] | None) -> dict[str, float]:
        cfg = self.config
        correct = float(passed)
        if not passed and split_passed:
            k = len(split_passed)
            correct = min(sum(split_passed) / k, (k - 1) / k)
        sh = item.shaping
        total = correct + cfg.syntax * sh["syntax"] + cfg.format * sh["format"] + cfg.length * sh["length"]
        return {"total": total, "correct": correct, "pass": float(passed), **sh}

    # -- batch --------------------------------------------------------------------------------
    def score(self, tasks: Sequence[dict], completions: Sequence[str],
              lengths: Sequence[int] | None = None) -> list[dict[str, float]]:
        """One dict of terms per (task, completion), in order. Runs every full-test job through
        `Sandbox.map` (a worker pool), then the split jobs of the failing ones (partial credit)."""
        if len(tasks) != len(completions) or (lengths is not None and len(lengths) != len(tasks)):
            raise ValueError("tasks, completions (and lengths) must have the same length")
        lens = lengths if lengths is not None else [None] * len(tasks)
        items = [self._prepare(t, c, n) for t, c, n in zip(tasks, completions, lens)]
        passed = [r.passed for r in self._run_all([it.full for it in items])]
        need = [i for i, it in enumerate(items) if not passed[i] and it.splits]
        split_res = self._run_all([j for i in need for j in items[i].splits])
        per_item: dict[int, list[bool]] = {}
        pos = 0
        for i in need:
            k = len(items[i].splits)
            per_item[i] = [r.passed for r in split_res[pos:pos + k]]
            pos += k
        return [self._terms(it, passed[i], per_item.get(i)) for i, it in enumerate(items)]

    def _run_all(self, jobs: list[Job]) -> list[Result]:
        out: list[Result | None] = [None] * len(jobs)
        if jobs:
            for i, res in self.sandbox.map(jobs, workers=self.workers):
                out[i] = res if res.status != "error" else self._run(jobs[i])
        return out  # type: ignore[return-value]

    def _run(self, job: Job) -> Result:
        """sandbox.run, retried once when the sandbox itself failed (status "error", e.g. a
        namespace or process limit under load: no verdict on the code); a second failure raises
        SandboxError instead of scoring the completion 0."""
        res = self.sandbox.run(job)
        if res.status == "error":
            res = self.sandbox.run(job)
            if res.status == "error":
                raise SandboxError(f"the sandbox could not run a reward job (twice): {res.detail[:300]}")
        return res

    # -- asynchronous ---------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nanoseek-reward")
            return self._pool

    def submit(self, task: dict, completion: str, length: int | None = None) -> Future:
        """Start scoring one completion now; the Future's result is its dict of terms (the same
        as `score` gives). Invalid tasks raise here, at once."""
        item = self._prepare(task, completion, length)
        out: Future = Future()
        out.set_running_or_notify_cancel()
        with self._pool_lock:
            self._pending.add(out)
        out.add_done_callback(self._forget)
        try:
            first = self._executor().submit(self._run, item.full)
        except BaseException:
            self._forget(out)
            raise
        first.add_done_callback(lambda f: self._after_full(item, f, out))
        return out

    def _after_full(self, item: _Item, full: Future, out: Future) -> None:
        # Runs in the pool thread that finished the full job: it only queues more jobs.
        try:
            passed = full.result().passed
            if passed or not item.splits:
                out.set_result(self._terms(item, passed, None))
                return
            splits = [self._executor().submit(self._run, j) for j in item.splits]
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
            out.set_exception(e)
            return
        left = [len(splits)]
        lock = threading.Lock()

        def one_done(_):
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                out.set_result(self._terms(item, False, [s.result().passed for s in splits]))
            except BaseException as e:  # noqa: BLE001
                out.set_exception(e)

        for s in splits:
            s.add_done_callback(one_done)

    def _forget(self, fut: Future) -> None:
        with self._pool_lock:
            self._pending.discard(fut)

    @staticmethod
    def gather(futures: Sequence[Future]) -> list[dict[str, float]]:
        """The results of `submit` futures, in their order (waits for each)."""
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the asynchronous pool, after every submitted completion is scored (a failing
        one may still have split jobs to queue). `score` needs no pool."""
        with self._pool_lock:
            pending = list(self._pending)
        futures_wait(pending)
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> CodeReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_task(task: dict, completion: str) -> None:
    tid = task.get("task_id", "?") if isinstance(task, dict) else "?"
    if not isinstance(task, dict):
        raise RewardError(f"a task must be a dict, got {type(task).__name__}")
    missing = [f for f in _REQUIRED if not isinstance(task.get(f), str)]
    if missing:
        raise RewardError(
            f"task {tid}: the code reward needs string field(s) {', '.join(missing)} (a HumanEval-"
            f"shaped task); a plug-in reward (--reward module:function) needs only 'prompt'")
    if not isinstance(completion, str):
        raise RewardError(f"task {tid}: completion must be a string, got {type(completion).__name__}")


# ----------------------------------------------------------------------------- plug-in rewards

def load_reward(spec: str) -> Callable[[dict, str], float]:
    """The function named by "module:function" or "path/to/file.py:function" (the function part
    may be dotted, e.g. "mod:Class.method"). The file form is chosen when the part before the
    last ':' ends in .py or contains a path separator. Trusted code, imported in-process."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise RewardError(f"reward {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _load_file(spec, os.path.expanduser(target))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({e}); it must be "
                              f"installed or on PYTHONPATH, or pass path/to/file.py:{name}") from e
    fn = module
    for part in name.split("."):
        if not hasattr(fn, part):
            raise RewardError(f"reward {spec!r}: {target!r} has no attribute {name!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {name!r} is not callable")
    return fn


def _load_file(spec: str, path: str):
    if not os.path.isfile(path):
        raise RewardError(f"reward {spec!r}: no such file {path!r}")
    real = os.path.realpath(path)
    # A unique module name per file, registered in sys.modules before it runs (what dataclasses,
    # pickle and typing need); loading the same file twice reuses it.
    mod_name = "_nanoseek_reward_" + hashlib.sha1(real.encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, real)
    if loader_spec is None or loader_spec.loader is None:
        raise RewardError(f"reward {spec!r}: cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[mod_name]
        raise RewardError(f"reward {spec!r}: loading {path!r} failed: {type(e).__name__}: {e}") from e
    return module


class PluginReward:
    """A user reward `fn(task, completion) -> float` with the code reward's interface. Runs in
    the caller's thread (a plug-in need not be thread-safe): `submit` returns a done Future."""

    terms = PLUGIN_TERMS

    def __init__(self, fn: Callable[[dict, str], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def _one(self, task: dict, completion: str) -> dict[str, float]:
        tid = task.get("task_id", "?") if isinstance(task, dict) else "?"
        try:
            v = self.fn(task, completion)
        except Exception as e:
            raise RewardError(f"reward {self.name!r} raised on task {tid}: {type(e).__name__}: {e}") from e
        bad = f"reward {self.name!r} returned {v!r} ({type(v).__name__}) for task {tid}; a reward must be a finite number"
        if isinstance(v, (str, bytes, bytearray)):
            raise RewardError(bad)
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise RewardError(bad) from None
        if not math.isfinite(x):
            raise RewardError(bad)
        return {"total": x, "plugin": x}

    def score(self, tasks: Sequence[dict], completions: Sequence[str],
              lengths: Sequence[int] | None = None) -> list[dict[str, float]]:
        if len(tasks) != len(completions):
            raise ValueError("tasks and completions must have the same length")
        return [self._one(t, c) for t, c in zip(tasks, completions)]

    def submit(self, task: dict, completion: str, length: int | None = None) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(self._one(task, completion))
        except RewardError as e:
            fut.set_exception(e)
        return fut

    gather = staticmethod(CodeReward.gather)

    def close(self) -> None:
        pass

    def __enter__(self) -> PluginReward:
        return self

    def __exit__(self, *exc) -> None:
        pass


def make_reward(spec: str | Callable = "code", config: RewardConfig | None = None,
                sandbox: Sandbox | None = None) -> CodeReward | PluginReward:
    """"code" -> CodeReward(config, sandbox); a "module:function" / "file.py:function" spec (or
    a callable) -> PluginReward (config and sandbox apply to the code reward only)."""
    if callable(spec):
        return PluginReward(spec)
    if spec == "code":
        return CodeReward(config, sandbox)
    return PluginReward(load_reward(spec), name=spec)
