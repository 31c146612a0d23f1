"""The compiled decode step without dynamo's per-call guard evaluation, while nothing it guards can change.

    from nanoseek.model import dispatch
    dispatch.enabled = False       # every compiled decode step checks dynamo's guards (the default: True)

Why: a compiled decode step (`Transformer._compiled_step`) enters a few torch.compile'd graphs
(five for `small`), and every entry pays dynamo's frame handling and guard evaluation -- a check
of the dtype, shape, strides and device of each of the ~60 tensors a graph reads (mostly
parameters), plus the global state -- about 0.15 ms an entry on the 2-core CPU we measure on,
~0.8 ms of a ~5 ms step. Between two steps of one decode loop none of it changes.

How (what vLLM does for its compiled models): the first step of a decode loop runs through dynamo
with every guard checked. Then, for each graph, a cache entry that accepts these very arguments
is found with dynamo's own guard manager (the oldest: the static-shape graph where there is
one, see compiled_code_for), and its transformed bytecode -- a plain Python function whose body
calls the compiled graph -- is kept. Later steps call those functions
directly, as long as nothing the guards check has changed: the step's `key`
(Transformer._step_key: the input's shape, dtype and device, grad / inference mode, autocast, the
default dtype, the thread count, deterministic algorithms, TF32, the torch-function mode stack,
the model's training, dense-CSA and collection flags and the fast-path switches the graphs were
traced under), the cache object (by identity, through a weak reference), the dtype, device
and shape of each of its tensors (read afresh every step: ~40 for `small`), and the dtype and
device of every parameter and buffer the graphs read (~265, read in one C++ pass: _meta). That
costs ~130 us of a ~4.5 ms `small` step where it runs (right after the graphs, whose weight reads
have evicted these objects from the caches; ~50 us in a loop of its own). Anything
else -- a new cache (every `generate` call allocates one), another batch size, a parameter cast
with `.to()`, a switch flipped -- sends the step through dynamo again, which recompiles if it
must. Steps that record gradients always go through dynamo.

What is not watched (as in any serving engine): a parameter *object* replaced by one of another
dtype (`module.weight = nn.Parameter(...)`) between two steps of one decode loop; casting in
place (`.to()`, `.half()`, `p.data = ...`) is seen. Transformed code that would resume after a
graph break (`__resume_at_*`, which would then run uncompiled) is never called directly.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

enabled = True  # False: every step goes through dynamo's guards (the A/B of bench_compile.py --guarded)

# the depth of the torch-function mode stack (part of dynamo's global-state guard); a torch
# without this counter gets no direct calls rather than an unchecked one
_mode_stack_depth = getattr(torch._C, "_len_torch_function_stack", None)

try:  # dynamo's cache entries and their guard managers (torch >= 2.6)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
except ImportError:  # pragma: no cover -- another torch layout: always guarded
    _debug_get_cache_entry_list = None


def compiled_code_for(fn: Callable, args: tuple) -> Callable | None:
    """A function that runs `fn(*args)` as compiled (the transformed bytecode of a cache entry
    whose guards accept these arguments; it calls that entry's graph), or None: no entry accepts
    them, the code would resume eagerly after a graph break, or this torch has no such interface.

    Of several entries that accept the arguments, the oldest: dynamo compiles shapes statically
    first and adds a dynamic-shape entry when they change (a second cache length, a second batch
    size), and prefers the newest; the static graph is the faster one (a `small` decode step
    with the cache length dynamic measured 4-7% slower)."""
    if _debug_get_cache_entry_list is None or _mode_stack_depth is None:
        return None
    code = fn.__code__
    f_locals = dict(zip(code.co_varnames[: code.co_argcount], args))
    try:
        entries = _debug_get_cache_entry_list(code)  # newest first
        entry = next((e for e in reversed(entries) if e.guard_manager.check(f_locals)), None)
    except Exception:  # noqa: BLE001 -- dynamo internals we do not control: keep the guarded path
        return None
    if entry is None or any(name.startswith("__resume_at") for name in entry.code.co_names):
        return None
    return types.FunctionType(entry.code, fn.__globals__, code.co_name)


def mode_stack_depth() -> int:
    """How many torch-function modes are active (-1 where this torch cannot tell: then
    compiled_code_for returns nothing and every step is guarded)."""
    return _mode_stack_depth() if _mode_stack_depth is not None else -1


# torch's grouping of tensors by (device, dtype) for its foreach optimizers: one C++ pass
_group_by_device_and_dtype = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)


def _meta(tensors: list[torch.Tensor]):
    """Every tensor's dtype and device as one comparable value: which tensors (by index) have each
    (device, dtype). Read in one C++ pass: within a decode step, after the graphs have streamed
    the weights through the caches, reading ~265 parameters' dtype and device in Python took
    ~140 us (~3% of a `small` step), this ~60."""
    if _group_by_device_and_dtype is None:  # pragma: no cover -- another torch: the same, in Python
        return tuple((t.dtype, t.device) for t in tensors)
    return {key: indices for key, (_, indices) in _group_by_device_and_dtype([tensors], True).items()}


def _state_meta(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.dtype, t.device, t.shape) for t in tensors)


@dataclass
class _Learned:
    cache: weakref.ref
    key: tuple
    weights: list[torch.Tensor]  # the parameters and buffers the graphs read ...
    meta: object  # ... and their dtypes and devices when the guards last passed (_meta)
    state_meta: tuple  # the cache tensors' dtypes, devices and shapes then
    calls: list[Callable]


class StepDispatch:
    """One compiled model's direct calls, valid for one key (the latest guarded step's).

    `calls(cache, key, state)` -> the direct functions of the step's graphs, in order, or None
    (run the step through dynamo, then `learn`); `state` is the cache's tensors, read afresh
    every step (a tensor of the cache may be replaced). `direct_steps` / `guarded_steps` count
    the steps each way (tests and benchmarks read them)."""

    def __init__(self) -> None:
        self._learned: _Learned | None = None
        self.direct_steps = 0
        self.guarded_steps = 0

    def calls(self, cache, key: tuple | None, state: list[torch.Tensor]) -> list[Callable] | None:
        learned = self._learned  # one read: another thread may replace it, never mutate it
        if (not enabled or key is None or learned is None or learned.cache() is not cache or learned.key != key
                or _state_meta(state) != learned.state_meta or _meta(learned.weights) != learned.meta):
            self.guarded_steps += 1
            return None
        self.direct_steps += 1
        return learned.calls

    def learn(self, cache, key: tuple | None, state: list[torch.Tensor], weights: list[torch.Tensor],
              calls: list[Callable | None]) -> None:
        """Keep `calls` for later steps with this cache, key and tensor metadata (all of the
        step's graphs, or nothing)."""
        if key is None or any(c is None for c in calls):
            self._learned = None
            return
        weights = list(weights)
        self._learned = _Learned(weakref.ref(cache), key, weights, _meta(weights), _state_meta(state), list(calls))
