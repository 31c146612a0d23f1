"""Process-level settings for long CPU runs, and where nanoseek caches what it builds (bottom
layer: imports nothing of nanoseek).

    from nanoseek._runtime import keep_freed_memory, cache_root
    keep_freed_memory()          # the trainer calls it once per process
    cache_root()                 # ~/.cache/nanoseek or $NANOSEEK_CACHE

Why: glibc's malloc serves every allocation above its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh mmap and hands it back to the kernel on free. A training step allocates
and frees hundreds of multi-MiB activations, so each one is page-faulted in again, 4 KiB at a
time: about 4 ms per 16 MiB tensor on the 2-core machine, ~10% of a `small` step. Raising the
mmap threshold to 1 GiB and the trim threshold to 2 GiB keeps freed blocks in the heap for reuse
(the set-up PyTorch's CPU performance guides reach with jemalloc/tcmalloc preloads). The cost is
that the process keeps its peak heap: measured peak RSS of a `small` step is unchanged.

No-op (returns False) off glibc (macOS, musl) or with NANOSEEK_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def switched_off(name: str) -> bool:
    """Whether environment variable `name` says off (0 / false / off / no, any case); unset is on."""
    return os.environ.get(name, "").strip().lower() in ("0", "false", "off", "no")
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse; True when the settings were applied."""
    global _done
    if _done:
        return True
    if switched_off("NANOSEEK_KEEP_FREED_MEMORY"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done


def cache_root() -> Path:
    """Where nanoseek keeps what it builds for this machine (inductor's compiled graphs, the C
    kernels): $NANOSEEK_CACHE, else ~/.cache/nanoseek."""
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")
