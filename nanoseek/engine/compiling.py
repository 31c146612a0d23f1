"""When the engine compiles the decode step by default, and where the compiled code is cached.

    from nanoseek.engine.compiling import resolve_compile
    resolve_compile(None)    # "auto": True where torch.compile can build CPU/GPU kernels
    resolve_compile(False)   # never (the CLI's --enforce-eager)

A one-token decode step of a V4 model is thousands of tiny ops in eager mode (mHC Sinkhorn,
norms, RoPE, routing); `Transformer.compile_blocks` fuses each run of two blocks into one
inductor graph, ~5x faster on the `small` config (docs/engine.md). So `generate`, `chat`, `serve`
and the Python `nanoseek.generate*` compile the decode step unless told not to -- decode only,
with compile=True as well: prefill, training and scoring stay eager (`compile_blocks(decode_only=True)`).

First use compiles (about a minute for `small` on 2 cores). The graphs are specialised on the
cache's shape, so a call that sizes its cache itself (`generate`, `chat`, RL rollouts) rounds
the size up to a few buckets (`decode_capacity`: powers of two from 1024 tokens) and reuses
their graphs; a second bucket in one process compiles the graphs once more with the length
dynamic, after which every length is served (steady decode loops keep using the static graphs
where they apply, model/dispatch.py). Inductor's on-disk caches (FX graph + AOTAutograd) make
every later process start in seconds (~6-7 s for `small`, mostly dynamo re-tracing the graphs;
model/precision.py keeps them cacheable) -- for a bucket it has compiled before. On CPU the graphs are called
through inductor's C++ wrapper (decode_compile_options). They live in
~/.cache/nanoseek/inductor (or $NANOSEEK_CACHE/inductor; an explicit $TORCHINDUCTOR_CACHE_DIR
wins), not in /tmp where a reboot would empty them. torch keys the entries by graph, config and
torch version, so a new model shape or torch release compiles once more.

"auto" is off when $NANOSEEK_COMPILE is 0/false/off (the test suite sets it: tests exercise the
compiled path explicitly), and on a CPU machine without a C++ compiler (inductor's CPU backend
needs one). Should compilation still fail at the first step, the model warns once and runs
eagerly (Transformer._compiled_call).
"""

from __future__ import annotations

import os
import shutil

from .._runtime import cache_root, switched_off

def use_persistent_cache() -> None:
    """Point inductor's caches at ~/.cache/nanoseek/inductor unless the user chose a directory.
    (Importing dynamo already fills in torch's /tmp default, so that value counts as unset;
    inductor reads the variable again at every cache access.)"""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = default_cache_dir()
    except (ImportError, AttributeError):  # another torch layout: only an unset variable is ours
        torch_default = None
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or current == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


def has_cxx_compiler() -> bool:
    cxx = os.environ.get("CXX")
    return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"])


def resolve_compile(compile: bool | None, device_type: str = "cpu") -> bool:
    """None ("auto") -> whether to compile the decode step here; True/False pass through."""
    if compile is not None:
        return bool(compile)
    if switched_off("NANOSEEK_COMPILE"):
        return False
    return device_type == "cuda" or has_cxx_compiler()


def compile_for_decoding(model, compile: bool | None) -> bool:
    """Compile `model`'s decode step in place when `compile` (None = auto) says so; returns
    whether it is compiled. A model already compiled (by the user, any mode) is left as it is.

    Only the decode step, for an explicit True too: compiling uncached calls as well made a
    model that had once generated with compile=True train and score through compiled graphs,
    starting with minutes of compilation at its next training step, and no faster afterwards
    (`small` in bf16: 0.99x, docs/train.md "--compile"). `model.compile_blocks()` compiles those
    for whoever wants them."""
    if getattr(model, "blocks_compiled", False):
        return True
    device = next(model.parameters()).device.type
    if not resolve_compile(compile, device):
        return False
    use_persistent_cache()
    model.compile_blocks(decode_only=True, **decode_compile_options(device))
    return True


DECODE_MIN_CAPACITY = 1024  # the smallest cache `decode_capacity` allocates for a compiled decode step
DECODE_CAPACITY_STEP = 8192  # above this many tokens, capacities are multiples of it (not powers of two)


def decode_capacity(model, need: int) -> int:
    """Cache capacity (tokens) for a call that needs `need`: exactly `need` when the model's
    decode step runs eagerly; when it is compiled, `need` rounded up to a bucket -- the next power
    of two, at least DECODE_MIN_CAPACITY, or a multiple of DECODE_CAPACITY_STEP beyond that.

    Why: the compressed-entry tables (one entry per m tokens) follow the capacity, and the
    compiled graphs are specialised on their shapes. Sized to each call's prompt + new tokens,
    every new length was a new graph: a fresh process meeting a length it had not compiled
    before spent ~50 s compiling (`small`, 2 cores) before its first token, however warm the
    on-disk cache was for other lengths. With buckets a handful of shapes cover every call up to
    8k tokens. The cost is memory (at most 2x the compressed tables below 8k tokens, 8k tokens'
    worth above) and a decode step ~0-5% slower at 1024 than at 576 (a 512 + 64 call; within the
    machine's noise in 3 process pairs). Outputs do not depend on the capacity: entries past a
    row's position are masked."""
    if need < 1:
        raise ValueError(f"need must be >= 1, got {need}")
    if not getattr(model, "blocks_compiled", False):
        return need
    if need <= DECODE_CAPACITY_STEP:
        return max(DECODE_MIN_CAPACITY, 1 << (need - 1).bit_length())
    return -(-need // DECODE_CAPACITY_STEP) * DECODE_CAPACITY_STEP


def decode_compile_options(device_type: str) -> dict:
    """torch.compile options for the decode step. On CPU:

    * inductor's C++ wrapper: each compiled graph is called from generated C++ instead of a
      generated Python function, which removes most of the launch overhead a one-token step pays
      for each of its graphs (`small`, same process, warm caches: 1.06-1.16x a step, identical
      tokens, `bench_compile.py decode --python-wrapper`; a process with warm caches starts in
      6 s instead of 10; the first compile ever takes ~45 s instead of ~25 s);
    * memory planning: a graph's intermediate buffers come from one pooled allocation per call
      instead of ~100 separate ones (1.07-1.19x a batch-1 step, 1.05x at batch 8, identical
      logits; `bench_compile.py decode --no-memory-planning`)."""
    return {"options": {"cpp_wrapper": True, "memory_planning": True}} if device_type == "cpu" else {}
