"""Process-level settings for long CPU runs, where nanoseek caches what it builds, and how much
memory is left (bottom layer: imports nothing of nanoseek).

    from nanoseek._runtime import keep_freed_memory, cache_root, available_memory
    keep_freed_memory()          # the trainer calls it once per process
    cache_root()                 # ~/.cache/nanoseek or $NANOSEEK_CACHE
    available_memory("cpu")      # bytes a new allocation can take (None: unknown)

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


def available_memory(device) -> int | None:
    """Bytes a new allocation on `device` can take without the kernel's OOM killer (CPU) or an
    out-of-memory error (CUDA); None where this cannot be told (other devices, no /proc).

    CPU: the kernel's MemAvailable, or less where this process's memory cgroup (v2 memory.max,
    v1 memory.limit_in_bytes) leaves less. CUDA: the device's free memory plus what PyTorch's
    caching allocator holds unused."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    avail = _meminfo_available()
    room = _cgroup_room()
    if avail is None or room is None:
        return avail if room is None else room
    return min(avail, room)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", sys_root: str = "/sys/fs/cgroup") -> int | None:
    """The least room (limit minus usage) among this process's memory cgroup and its ancestors
    (v2, or v1's memory controller); None when none of them is limited or they are unreadable."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        hier, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hier == "0" and controllers == "":
            root, names = sys_root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            root, names = f"{sys_root}/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each ancestor
            d = Path(root, *parts[:depth])
            try:
                limit, usage = ((d / n).read_text().strip() for n in names)
                if limit != "max" and int(limit) < 1 << 60:  # (v1's "unlimited" is a huge number)
                    rooms.append(max(0, int(limit) - int(usage)))
            except (OSError, ValueError):
                continue
    return min(rooms) if rooms else None
