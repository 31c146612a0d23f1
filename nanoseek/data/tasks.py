"""Verifiable code tasks mined offline from source code: the data side of `nanoseek data tasks`.

RL (GRPO) needs problems with tests, and no task data set can be downloaded here, so we mine them
from the corpus sources (`data build`'s sources: directories, wheels/sdists, archives, `default` =
this interpreter's stdlib and site-packages). This module does everything that does **not** run
mined code; running it (the original implementation, to record its outputs, and the canonical
solution and trivial bodies against the finished test) happens only in the sandbox, in
`nanoseek/eval/verify.py`, which also holds the entry point `mine_tasks()` and is what
`nanoseek data tasks` calls:

    nanoseek data tasks --source default --out runs/tasks/tasks.jsonl --sft-out runs/tasks/sft.jsonl
    python -c "from nanoseek.eval.verify import mine_tasks; mine_tasks(['default'], 't.jsonl', max_tasks=300)"

Steps here (docs/data.md, "Mined tasks"):
  1. `extract_candidates(text, ...)`: module-level functions with a docstring, parsed with `ast`;
     static filters (decorated, async, generators, `global`, no parameters, stub bodies, tests)
     and the *purity* filter: every global name the function (and, transitively, each helper it
     needs) reads must be a builtin that does no I/O or dynamic code, a module-level constant,
     function or small class of the same module, or an import of an allow-listed pure stdlib
     module (`ALLOWED_MODULES`); attribute names that read files, network, clocks or randomness
     (`BANNED_ATTRS`) disqualify. The prompt is the needed imports + helpers + the function's own
     signature and docstring (HumanEval's shape); `canonical_solution` is the rest of its body.
  2. `make_cases(cand, seed)`: call expressions to run: the docstring's doctest examples and
     seeded generated inputs. Parameter types come from annotations, docstring type fields,
     doctest arguments, defaults and names; parameters with no clue are tried under several
     type *profiles* and the profile the original accepts most often is kept.
  3. `assemble_task(cand, cases, runs)`: from the original's recorded outputs (two runs in two
     processes), keep deterministic cases with plain values (None/bool/int/float/str/bytes and
     lists/tuples/dicts/sets of them), check doctest expectations, pick up to `MAX_ASSERTS`
     cases favouring distinct outputs, and write `check(candidate)` with type-strict
     comparisons (floats with a relative tolerance).
  4. `trivial_bodies(task)`, `split_tasks`, `sft_example`: the bodies the test must reject,
     the seeded by-package train / held-out split, and SFT conversations.

Nothing here imports `nanoseek.eval` (data sits below eval; see the layering rule).
"""

from __future__ import annotations

import ast
import builtins
import doctest
import hashlib
import json
import random
import re
import symtable
import textwrap
from collections import Counter
from dataclasses import dataclass, field

from nanoseek.data import dedup, licenses

__all__ = [
    "ALLOWED_MODULES", "BANNED_ATTRS", "BANNED_BUILTINS", "MAX_ASSERTS", "TEST_HEAD", "Candidate", "Case",
    "Param", "assemble_task", "build_test", "extract_candidates", "literal", "make_cases", "public_record",
    "sft_example", "split_tasks", "trivial_bodies",
]

# --------------------------------------------------------------------------------------------
# Purity rules

# Pure stdlib modules a task may import: nothing here reads files, the network, the clock or
# randomness by itself (where a module has such functions, e.g. `codecs.open`, the attribute
# filter below catches the call). Everything else (os, sys, io, time, random, socket, pathlib,
# third-party packages, ...) disqualifies a function: tasks must run anywhere, fast, and be
# solvable from the prompt alone.
ALLOWED_MODULES = frozenset({
    "__future__", "abc", "array", "base64", "binascii", "bisect", "calendar", "cmath", "codecs",
    "collections", "collections.abc", "colorsys", "contextlib", "copy", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "errno", "fnmatch", "fractions", "functools", "graphlib",
    "hashlib", "heapq", "hmac", "html", "html.entities", "ipaddress", "itertools", "json", "keyword",
    "math", "numbers", "operator", "pprint", "quopri", "re", "reprlib", "shlex", "stat",
    "statistics", "string", "struct", "textwrap", "types", "typing", "unicodedata", "urllib.parse",
    "warnings", "zlib",
})
# Attribute names whose use means files, network, processes, clocks or randomness.
BANNED_ATTRS = frozenset({
    "now", "today", "utcnow", "time", "time_ns", "perf_counter", "monotonic", "process_time",
    "sleep", "random", "randint", "randrange", "choice", "choices", "shuffle", "sample", "uniform",
    "gauss", "urandom", "getrandbits", "seed", "open", "read", "readline", "readlines", "write",
    "writelines", "system", "popen", "getenv", "environ", "getcwd", "listdir", "scandir", "walk",
    "remove", "unlink", "mkdir", "makedirs", "rmdir", "rename", "connect", "send", "sendall",
    "recv", "urlopen", "exists", "isfile", "isdir", "getpid", "fork", "kill", "exit", "stdout",
    "stderr", "stdin", "fromtimestamp", "localtime", "gmtime", "mktime", "strftime", "ctime",
    "asctime", "getrandom",
})
# Builtins that do I/O, run dynamic code, inspect frames or depend on the process (id, hash of
# strings), so their results cannot be checked by a test.
BANNED_BUILTINS = frozenset({
    "open", "input", "print", "eval", "exec", "compile", "__import__", "globals", "locals", "vars",
    "id", "hash", "breakpoint", "help", "exit", "quit", "super", "memoryview", "__build_class__",
})
_BUILTIN_NAMES = frozenset(dir(builtins)) - {"__name__", "__doc__", "__spec__", "__loader__", "__package__"}

MAX_PROMPT_CHARS = 4000      # imports + helpers + signature + docstring
MAX_BODY_CHARS = 3000
MAX_BODY_LINES = 80
MAX_HELPERS = 10
MAX_CLASS_LINES = 25         # helper classes (typically an exception type) must be small
MIN_DOC_CHARS = 20
MAX_ASSERTS = 10
MAX_EXAMPLES = 8             # doctest examples used per function
_TEST_DIRS = frozenset({"test", "tests", "testing", "unittests"})


# --------------------------------------------------------------------------------------------
# Candidates

@dataclass
class Param:
    name: str
    kind: str               # "pos" (positional or keyword), "posonly", "kw" (keyword-only)
    annotation: str | None
    has_default: bool
    default: object = None  # literal default (when `default_known`)
    default_known: bool = False


@dataclass
class Candidate:
    """One function that passed the static filters, with everything needed to make a task."""

    key: str                # unique and stable: "<group>/<path>::<name>"
    name: str
    module: str             # dotted module name (for the task id)
    group: str              # package / repository (the split unit)
    path: str
    where: str              # where a person finds it
    source: str             # the source label (`stdlib`, `site-packages`, `dir:...`)
    license: str
    context: str            # imports + helper definitions the function needs ("" if none)
    header: str             # `def ...:` + docstring, as in the source
    body: str               # the rest of the function: the canonical solution
    indent: str             # indentation of the body's first line
    params: list[Param]
    doc: str                # the cleaned docstring
    examples: list[tuple[str, str]] = field(default_factory=list)  # doctest (expression, want)
    hints: dict = field(default_factory=dict)     # param -> type spec from the docstring
    sig: object = None                             # MinHash signature (near-dedup)
    digest: bytes = b""                            # exact-dedup digest

    @property
    def prompt(self) -> str:
        return (self.context + "\n\n" if self.context else "") + self.header

    @property
    def program(self) -> str:
        """The original function, standalone: what the sandbox runs to record its outputs."""
        return self.prompt + self.body


@dataclass
class Case:
    expr: str                  # a Python expression calling the function by its name
    kind: str                  # "doctest" or "generated"
    profile: int = 0           # type profile of a generated case
    want: str | None = None    # the doctest's expected output


def module_name(path: str) -> str:
    """`sympy/core/numbers.py` -> `sympy.core.numbers`; leading non-identifier parts (an sdist's
    `name-1.0/` root, `src/`) are dropped."""
    parts = path.replace("\\", "/").split("/")
    parts[-1] = parts[-1].rsplit(".", 1)[0]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    while len(parts) > 1 and (not parts[0].isidentifier() or parts[0] == "src"):
        parts.pop(0)
    return ".".join(parts)


def path_reason(path: str) -> str | None:
    """Python files whose functions are not tasks: tests (their functions are test helpers) and
    type stubs (no bodies)."""
    parts = path.replace("\\", "/").split("/")
    name = parts[-1]
    if any(p in _TEST_DIRS for p in parts[:-1]) or name.startswith("test_") or name.endswith("_test.py") \
            or name in ("conftest.py", "setup.py"):
        return "test_file"
    if name.endswith(".pyi"):
        return "type_stub"
    return None


_TOP_DEF = re.compile(r"^def \w", re.MULTILINE)


class _Drops:
    """Counts of drop reasons with a few example locations each."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)

    def merge(self, other: _Drops) -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            ex = self.examples.setdefault(k, [])
            ex.extend(v[: 3 - len(ex)])


def extract_candidates(text: str, *, group: str, path: str, license: str | None, source: str = "",
                       where: str = "", allowed: tuple[str, ...] = licenses.DEFAULT_POLICY,
                       decontaminator=None) -> tuple[list[Candidate], int, _Drops]:
    """Candidates of one module's source. Returns (candidates, functions_seen, drops) where
    functions_seen counts module-level functions with a docstring and every one of them that is
    not a candidate is in `drops` under exactly one reason."""
    drops = _Drops()
    where = where or f"{group}/{path}"
    # One newline convention, so that ast's line numbers index `lines` (str.splitlines would also
    # split at form feeds and U+2028, which ast does not).
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not _TOP_DEF.search(text):
        return [], 0, drops
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [], 0, drops
    funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and ast.get_docstring(n, clean=False)]
    if not funcs:
        return [], 0, drops
    lic = licenses.from_spdx_header(text) or license
    cat = licenses.classify(lic)
    if cat not in allowed:
        drops.add(f"license_{cat}", f"{where}: {lic or 'no license found'}", len(funcs))
        return [], len(funcs), drops
    lines = [ln + "\n" for ln in text.split("\n")]
    index = _module_index(tree)
    out = []
    for node in funcs:
        loc = f"{where}::{node.name}"
        try:
            cand = _candidate(node, lines, index, group=group, path=path, license=lic, source=source,
                              where=loc)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            cand = f"unparsable_{type(e).__name__}"
        if isinstance(cand, str):
            drops.add(cand, loc)
            continue
        if decontaminator is not None:
            bench = decontaminator.match(dedup.token_hashes(cand.program))
            if bench:
                drops.add("contaminated", f"{loc} ({bench})")
                continue
        out.append(cand)
    return out, len(funcs), drops



def _module_index(tree: ast.Module) -> dict[str, tuple]:
    """Name -> ("import", module, statement) | ("def", node) | ("bad", reason) for module scope."""
    index: dict[str, tuple] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                stmt = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
                index[bound] = ("import", a.name, stmt)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                for a in node.names:
                    index[a.asname or a.name] = ("bad", "relative_import")
                continue
            for a in node.names:
                if a.name == "*":
                    continue
                stmt = f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
                index[a.asname or a.name] = ("import", node.module or "", stmt)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            index[node.name] = ("def", node)
        elif isinstance(node, ast.AsyncFunctionDef):
            index[node.name] = ("bad", "async")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            simple = len(targets) == 1 and isinstance(targets[0], ast.Name) and node.value is not None
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        index[n.id] = ("def", node) if simple else ("bad", "complex_assignment")
        else:
            # Names bound inside if/try/for/with blocks depend on the import-time environment.
            for n in ast.walk(node):
                name = None
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = n.name
                elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    name = n.id
                elif isinstance(n, ast.alias):
                    name = n.asname or n.name.split(".")[0]
                if name:
                    index[name] = ("bad", "conditional_definition")
    # A value changed after its assignment (`T = [-1]` then `for ...: T.append(...)`, `T[k] = v`,
    # `T += ...`) would differ in the standalone prompt, which only has the assignment.
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and all(
                isinstance(t, ast.Name) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            continue
        for n in ast.walk(node):
            base = n.value if isinstance(n, (ast.Attribute, ast.Subscript)) else n.target \
                if isinstance(n, ast.AugAssign) else None
            if isinstance(base, ast.Name) and index.get(base.id, ("",))[0] == "def":
                index[base.id] = ("bad", "mutated_at_import")
    return index


def _global_refs(src: str) -> set[str]:
    """Global names a snippet of module-level code reads (symtable: exact Python scoping)."""
    top = symtable.symtable(src, "<mined>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    out = {s.get_name() for s in top.get_symbols() if s.is_referenced() and s.get_name() not in bound}
    stack = list(top.get_children())
    while stack:
        t = stack.pop()
        out.update(s.get_name() for s in t.get_symbols() if s.is_global() and s.is_referenced())
        stack.extend(t.get_children())
    return out - bound


def _impure(node: ast.AST) -> str | None:
    """Why a definition cannot be a task (or a task's helper), judged from its own code."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in BANNED_ATTRS:
            return "touches_io_time_random"
        if isinstance(n, (ast.Global, ast.Nonlocal)):
            return "global_state"
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            if isinstance(n, ast.ImportFrom) and n.level:
                return "relative_import"
            mods = [n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            bad = _import_reason(mods)
            if bad:
                return bad
        if isinstance(n, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return "async"
    return None


_IO_MODULES = frozenset({
    "os", "sys", "io", "time", "random", "secrets", "uuid", "socket", "ssl", "select", "selectors",
    "subprocess", "multiprocessing", "threading", "_thread", "concurrent", "asyncio", "urllib",
    "http", "ftplib", "smtplib", "poplib", "imaplib", "socketserver", "xmlrpc", "pathlib", "tempfile",
    "shutil", "glob", "fileinput", "filecmp", "zipfile", "tarfile", "gzip", "bz2", "lzma", "sqlite3",
    "dbm", "shelve", "pickle", "marshal", "ctypes", "signal", "resource", "platform", "getpass",
    "pwd", "grp", "locale", "logging", "webbrowser", "mmap", "fcntl", "termios", "pty", "tty",
    "zoneinfo", "importlib", "pkgutil", "inspect", "gc", "atexit", "traceback", "sched", "timeit",
})


def _import_reason(modules: list[str]) -> str | None:
    for m in modules:
        if m in ALLOWED_MODULES:
            continue
        return "touches_io_time_random" if m.split(".")[0] in _IO_MODULES else "import_not_allowed"
    return None


def _is_stub(body: list[ast.stmt]) -> bool:
    if len(body) != 1:
        return False
    s = body[0]
    if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
        return True
    if isinstance(s, ast.Raise):
        exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return isinstance(s, ast.Return) and (s.value is None or isinstance(s.value, ast.Constant))


def _own_nodes(node):
    """The nodes of a function's own scope (not those of nested functions, lambdas, classes)."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(n))


def _static_reason(node) -> str | None:
    """Cheap filters on the function itself, before any name resolution."""
    if isinstance(node, ast.AsyncFunctionDef):
        return "async"
    if node.name.startswith("test") or (node.name.startswith("__") and node.name.endswith("__")):
        return "test_or_dunder"
    if node.decorator_list:
        return "decorated"
    a = node.args
    named = a.posonlyargs + a.args
    if not named and not a.kwonlyargs:
        return "no_params"
    if named and named[0].arg in ("self", "cls"):
        return "unsupported_signature"
    if any(d is None for d in a.kw_defaults) and a.kwonlyargs:
        return "unsupported_signature"   # required keyword-only parameters
    doc = ast.get_docstring(node) or ""
    if len(doc) < MIN_DOC_CHARS:
        return "short_docstring"
    if len(node.body) < 2:
        return "no_body"
    if _is_stub(node.body[1:]):
        return "stub_body"
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _own_nodes(node)):
        return "generator"
    if node.end_lineno - node.body[0].end_lineno > MAX_BODY_LINES:
        return "too_long"
    return None


def _segment(lines: list[str], node: ast.AST) -> str:
    """Source text of a node (ast.get_source_segment re-splits the whole file on every call,
    which was 80% of the extraction time). Column offsets are UTF-8 byte offsets."""
    first, last = node.lineno - 1, node.end_lineno - 1
    head = lines[first].encode("utf-8", "surrogatepass")
    if first == last:
        return head[node.col_offset: node.end_col_offset].decode("utf-8", "surrogatepass")
    tail = lines[last].encode("utf-8", "surrogatepass")[: node.end_col_offset]
    return "".join([head[node.col_offset:].decode("utf-8", "surrogatepass"), *lines[first + 1: last],
                    tail.decode("utf-8", "surrogatepass")])


def _resolve(node, index: dict, lines: list[str]) -> tuple[list[str], list[ast.stmt], str | None]:
    """The imports and module-level definitions `node` needs, transitively.
    Returns (import statements, definitions in source order, drop reason or None)."""
    imports: dict[str, str] = {}
    defs: dict[str, ast.stmt] = {}
    todo = [node]
    seen = {node.name}
    while todo:
        item = todo.pop()
        names = _global_refs(_segment(lines, item))
        for name in sorted(names):
            if name in seen:
                continue
            seen.add(name)
            entry = index.get(name)
            if entry is None:
                if name in _BUILTIN_NAMES:
                    if name in BANNED_BUILTINS:
                        return [], [], "io_or_dynamic_builtin"
                    continue
                return [], [], "unresolved_name"
            if entry[0] == "bad":
                return [], [], entry[1]
            if entry[0] == "import":
                why = _import_reason([entry[1]])
                if why:
                    return [], [], why
                imports[name] = entry[2]
                continue
            d = entry[1]
            why = _helper_reason(d)
            if why:
                return [], [], why
            defs[name] = d
            todo.append(d)
        if len(defs) > MAX_HELPERS:
            return [], [], "context_too_large"
    ordered = sorted({id(d): d for d in defs.values()}.values(), key=lambda d: d.lineno)
    return list(imports.values()), ordered, None


def _helper_reason(d: ast.stmt) -> str | None:
    if isinstance(d, ast.ClassDef):
        if d.decorator_list or d.end_lineno - d.lineno + 1 > MAX_CLASS_LINES or d.keywords:
            return "needs_class"
    elif isinstance(d, ast.FunctionDef) and d.decorator_list:
        return "decorated_helper"
    return _impure(d)


def _params(node) -> list[Param]:
    a = node.args
    out = []
    pos = a.posonlyargs + a.args
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(pos, defaults)):
        out.append(_param(arg, "posonly" if i < len(a.posonlyargs) else "pos", d))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append(_param(arg, "kw", d))
    return out


def _param(arg: ast.arg, kind: str, default) -> Param:
    p = Param(arg.arg, kind, ast.unparse(arg.annotation) if arg.annotation is not None else None,
              default is not None)
    if default is not None:
        try:
            p.default = ast.literal_eval(default)
            p.default_known = True
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return p


def _candidate(node, lines: list[str], index: dict, *, group, path, license, source,
               where) -> Candidate | str:
    why = _static_reason(node)
    if why:
        return why
    why = _impure(node)
    if why:
        return why
    doc_node = node.body[0]
    tail = lines[doc_node.end_lineno - 1][doc_node.end_col_offset:].strip()
    if doc_node.lineno == node.lineno or (tail and not tail.startswith("#")) \
            or node.body[1].lineno <= doc_node.end_lineno:
        return "inline_body"
    imports, defs, why = _resolve(node, index, lines)
    if why:
        return why
    header = "".join(lines[node.lineno - 1: doc_node.end_lineno])
    body = "".join(lines[doc_node.end_lineno: node.end_lineno])
    if not header.endswith("\n"):
        header += "\n"
    if not body.endswith("\n"):
        body += "\n"
    first = next((ln for ln in body.splitlines() if ln.strip()), "")
    indent = first[: len(first) - len(first.lstrip())]
    if not indent:
        return "inline_body"
    parts = []
    if index.get("annotations", ("",))[0] == "import" and index["annotations"][1] == "__future__":
        parts.append("from __future__ import annotations")
    parts += sorted(set(imports), key=lambda s: (s.startswith("from"), s))
    context = "\n".join(parts)
    if defs:
        context += ("\n\n\n" if context else "") + "\n\n\n".join(
            _segment(lines, d) if not isinstance(d, (ast.FunctionDef, ast.ClassDef))
            else "".join(lines[d.lineno - 1: d.end_lineno]).rstrip("\n") for d in defs)
    if len(context) + len(header) > MAX_PROMPT_CHARS:
        return "context_too_large"
    if len(body) > MAX_BODY_CHARS:
        return "too_long"
    doc = ast.get_docstring(node) or ""
    cand = Candidate(
        key=f"{group}/{path}::{node.name}", name=node.name, module=module_name(path), group=group, path=path,
        where=where, source=source, license=license or "unknown", context=context, header=header, body=body,
        indent=indent, params=_params(node), doc=doc, examples=_doctest_examples(doc, node.name),
        hints=_doc_hints(doc))
    full = cand.header + cand.body
    cand.sig = dedup.signature(full)
    cand.digest = hashlib.blake2b(" ".join(full.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return cand



def _doctest_examples(doc: str, name: str) -> list[tuple[str, str]]:
    """(expression, want) of doctest examples that are one expression using the function."""
    try:
        examples = doctest.DocTestParser().get_examples(doc)
    except ValueError:
        return []
    out = []
    for ex in examples:
        src = ex.source.strip()
        want = ex.want.strip()
        if not want or want.startswith("Traceback") or "\n" in src:
            continue
        try:
            tree = ast.parse(src, mode="eval")
        except SyntaxError:
            continue
        if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(tree)):
            out.append((src, want))
        if len(out) >= MAX_EXAMPLES:
            break
    return out


# --------------------------------------------------------------------------------------------
# Parameter types and generated inputs
#
# A type spec is a tuple: ("int",) ("float",) ("str",) ("bool",) ("bytes",) ("none",)
# ("list", elem) ("tuple", elem) ("tup", (e1, e2, ...)) ("dict", key, value) ("set", elem), where
# elem may be None (unknown: inferred from examples or names, else int).

_SCALAR_ANN = {"int": ("int",), "float": ("float",), "str": ("str",), "bool": ("bool",), "bytes": ("bytes",),
               "Text": ("str",), "AnyStr": ("str",), "None": ("none",), "NoneType": ("none",)}
_SEQ_ANN = {"list", "List", "Sequence", "MutableSequence", "Iterable", "Collection", "Iterator", "Reversible"}
_TUPLE_ANN = {"tuple", "Tuple"}
_DICT_ANN = {"dict", "Dict", "Mapping", "MutableMapping"}
_SET_ANN = {"set", "Set", "AbstractSet", "MutableSet"}


def spec_from_annotation(ann: str | ast.AST | None):
    """Type spec of an annotation (a string or its AST), or None if it says nothing usable."""
    if ann is None:
        return None
    node = ann
    if isinstance(ann, str):
        try:
            node = ast.parse(ann, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(node, ast.Constant):
        if node.value is None:
            return ("none",)
        return spec_from_annotation(node.value) if isinstance(node.value, str) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([node.left, node.right])
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
    if name is not None:
        if name in _SCALAR_ANN:
            return _SCALAR_ANN[name]
        return (("list", None) if name in _SEQ_ANN else ("tuple", None) if name in _TUPLE_ANN
                else ("dict", None, None) if name in _DICT_ANN else ("set", None) if name in _SET_ANN else None)
    if not isinstance(node, ast.Subscript):
        return None
    base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
    args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if base == "Optional":
        return spec_from_annotation(args[0])
    if base == "Union":
        return _union(args)
    if base in _SEQ_ANN:
        return ("list", spec_from_annotation(args[0]))
    if base in _SET_ANN:
        return ("set", spec_from_annotation(args[0]))
    if base in _DICT_ANN and len(args) == 2:
        return ("dict", spec_from_annotation(args[0]), spec_from_annotation(args[1]))
    if base in _TUPLE_ANN:
        if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
            return ("tuple", spec_from_annotation(args[0]))
        specs = tuple(spec_from_annotation(a) for a in args)
        return ("tup", specs) if all(specs) else ("tuple", None)
    return None


def _union(args):
    specs = [spec_from_annotation(a) for a in args]
    real = [s for s in specs if s and s != ("none",)]
    return real[0] if real else None


def spec_of_value(v):
    """Type spec of a literal value (from a doctest argument or a default)."""
    t = type(v)
    if t in (bool, int, float, str, bytes):
        return (t.__name__,)
    if v is None:
        return None
    if t in (list, tuple, set, frozenset):
        elem = next((spec_of_value(x) for x in _ordered_items(v) if spec_of_value(x)), None)
        return ("list" if t is list else "tuple" if t is tuple else "set", elem)
    if t is dict:
        k = next((spec_of_value(x) for x in v), None)
        val = next((spec_of_value(x) for x in v.values() if spec_of_value(x)), None)
        return ("dict", k, val)
    return None


_NAME_TYPES = [
    (re.compile(r"^(n|k|m|i|j|num|number|count|size|length|len|width|height|depth|level|index|idx|pos|"
                r"position|start|stop|end|step|offset|limit|year|month|day|hour|minute|second|bits|digits|"
                r"ndigits|precision|places|times|repeat|base|radix|indent|columns?|rows?|cols?|n_\w+|"
                r"num_\w+|\w+_count|\w+_size|\w+_len|\w+_index|max_\w+|min_\w+)$"), ("int",)),
    (re.compile(r"^(s|st|string|text|txt|name|word|line|prefix|suffix|sep|separator|delimiter|delim|char|"
                r"ch|c|pattern|pat|fmt|format|msg|message|label|title|ident|identifier|token|sentence|"
                r"content|chars|value_str|\w+_str|\w+_name|\w+_text|string_\w+|s\d|text\d|word\d)$"), ("str",)),
    (re.compile(r"^(lines|words|names|strings|tokens|labels|parts|keys|fields|columns_names)$"), ("list", ("str",))),
    (re.compile(r"^(lst|list_\w*|items|values|vals|seq|sequence|xs|ys|nums|numbers|ints|elements|elems|"
                r"arr|array|iterable|it|data|a_list|l|li|sizes|counts|weights|scores|points)$"), ("list", None)),
    (re.compile(r"^(flag|strict|reverse|verbose|quiet|case_sensitive|ignore_case|ignorecase|inclusive|"
                r"is_\w+|has_\w+|allow_\w+|use_\w+|keep_\w+|include_\w+|\w+_only)$"), ("bool",)),
    (re.compile(r"^(ratio|rate|alpha|beta|gamma|factor|scale|weight|prob|probability|angle|theta|degrees|"
                r"radians|temperature|mu|sigma|tol|tolerance|eps|epsilon|amount|price|fraction|percent|lat|lon|"
                r"latitude|longitude|seconds_float)$"), ("float",)),
    (re.compile(r"^(d|dct|dic|dict_\w*|mapping|table|counts_by_\w+|lookup)$"), ("dict", None, None)),
    (re.compile(r"^(buf|buffer|raw|payload|blob|octets|byts|bytestring|bstr)$"), ("bytes",)),
]
_DOC_WORDS = {
    "int": ("int",), "integer": ("int",), "integers": ("int",), "float": ("float",), "number": ("float",),
    "str": ("str",), "string": ("str",), "text": ("str",), "bool": ("bool",), "boolean": ("bool",),
    "bytes": ("bytes",), "list": ("list", None), "sequence": ("list", None), "iterable": ("list", None),
    "tuple": ("tuple", None), "dict": ("dict", None, None), "mapping": ("dict", None, None),
    "set": ("set", None), "dictionary": ("dict", None, None),
}
_DOC_TYPE_RES = (
    # prose: "Given an integer x and a nonnegative integer shift", "the string s"
    re.compile(r"\b(?:an?|the|given)\s+(?:non-?negative\s+|positive\s+|)(integer|int|string|str|float|number|"
               r"boolean|bool|list|tuple|sequence|dict|dictionary|mapping|bytes)\s+[`'*]*(\w+)"),
    re.compile(r"^\s*\**(\w+)\s*:\s*(?:an?\s+)?(\w+)", re.MULTILINE),                 # numpy: name : int
    re.compile(r":param\s+(\w+)\s+(\w+)\s*:"),                                      # :param int n:
    re.compile(r":type\s+(\w+)\s*:\s*(\w+)"),                                       # :type n: int
    re.compile(r"^\s*(\w+)\s*\(\s*(\w+)[^)]*\)\s*:", re.MULTILINE),                    # google: n (int):
)


def _doc_hints(doc: str) -> dict:
    hints = {}
    for rx in _DOC_TYPE_RES:
        for m in rx.finditer(doc):
            a, b = m.group(1), m.group(2)
            name, word = (b, a) if rx.pattern.startswith((":param", "\\b(?:an?")) else (a, b)
            spec = _DOC_WORDS.get(word.lower())
            if spec and name not in hints:
                hints[name] = spec
    return hints


def _name_spec(name: str):
    low = name.lower()
    for rx, spec in _NAME_TYPES:
        if rx.match(low):
            return spec
    return None


_SMALL = re.compile(r"^(n|k|m|i|j|num|number|count|size|length|len|width|height|depth|level|times|repeat|"
                    r"bits|digits|ndigits|precision|places|indent|n_\w+|num_\w+|\w+_count|\w+_size|\w+_len|"
                    r"columns?|rows?|cols?|max_\w+|min_\w+|limit)$")

_INTS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 20, 21, 25, 31, 32, 42, 64, 99, 100, 101, 127,
         128, 255, 256, 1000, 1024, 1234, 2024, -1, -2, -3, -7, -10, -100]
_FLOATS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -1.0, -0.5, -2.75, 3.14159, 10.0, 0.1, 0.25, 100.0, 0.001, 2.718281828,
           7.5, 12.34, 1e-6, 1e6, -100.5]
_STRS = ["", "a", "ab", "abc", "hello", "Hello, World!", "hello world", "foo bar baz", "  padded  ", "CamelCase",
         "camelCaseString", "snake_case_name", "kebab-case-name", "UPPER", "MiXeD cAsE", "123", "3.14", "-42",
         "a1b2c3", "x,y,z", "key=value", "The quick brown fox jumps over the lazy dog", "line one\nline two",
         "tab\tseparated", "(a (b) c)", "[1, 2, 3]", "café", "naïve résumé", "a.b.c", "/usr/local/bin",
         "http://example.com/a?b=1&c=2", "aaa", "abcabc", "racecar", "Hello World", "  ", "'quoted'", "%s and %d",
         "0x1F", "1,234", "A", "z", "hello_world_42", "TitleCase Words", "a-b_c d", "{key}", "<b>bold</b>",
         "spam & eggs", "UTF-8", "x" * 12, "a=1; b=2", "text/html; charset=utf-8", "k1=v1&k2=v2", "x:y",
         "1.2.3", "2024-01-15", "user@example.com", "name.ext", "a/b/c.txt", "$HOME/x", "  leading", "trailing  "]
_BYTES = [b"", b"a", b"abc", b"hello world", b"\x00\x01\x02", b"\xff\xfe\xfd", bytes(range(16)), b"Hello, World!",
          b"AAAA", b"\n\r\t", b"0123456789"]


class _ParamPlan:
    """How to generate values for one parameter: a type spec, example values, strings quoted in
    the docstring, a size hint."""

    def __init__(self, param: Param, spec, seeds: list, small: bool, doc_strs: list[str]):
        self.param = param
        self.spec = spec
        self.seeds = seeds
        self.small = small
        self.doc_strs = doc_strs


_QUOTED = re.compile(r"``([^`\n]{1,40})``|`([^`\n]{1,40})`|'([^'\n]{1,40})'|\"([^\"\n]{1,40})\"")


def _doc_strings(doc: str) -> list[str]:
    """Short strings quoted in a docstring ('=AB', ``text/plain``): often the inputs it is about."""
    out = []
    for m in _QUOTED.finditer(doc):
        v = next(g for g in m.groups() if g is not None)
        if v not in out:
            out.append(v)
    return out[:12]


def _elem_default(spec, seeds, name: str):
    """Fill an unknown element type from example values, then the name, then int."""
    if spec is None:
        return None
    head = spec[0]
    if head in ("list", "tuple", "set") and spec[1] is None:
        elem = next((spec_of_value(x) for s in seeds if isinstance(s, (list, tuple, set)) for x in _ordered_items(s)
                     if spec_of_value(x)), None)
        if elem is None:
            elem = ("str",) if name.lower() in ("lines", "words", "names", "strings", "tokens", "labels",
                                                "parts", "keys", "fields") else ("int",)
        return (head, elem)
    if head == "dict" and (spec[1] is None or spec[2] is None):
        return ("dict", spec[1] or ("str",), spec[2] or ("int",))
    return spec


_RANGES = {"month": (1, 12), "day": (1, 28), "year": (1900, 2100), "hour": (0, 23), "minute": (0, 59),
           "second": (0, 59), "weekday": (0, 6), "bits": (0, 16), "ndigits": (0, 6), "precision": (0, 6),
           "places": (0, 6), "digits": (0, 8)}


def _rand_value(spec, rng: random.Random, small: bool, depth: int = 0, name: str = ""):
    head = spec[0] if spec else "int"
    if head == "int":
        if name in _RANGES:
            return rng.randint(*_RANGES[name])
        if name in ("base", "radix"):
            return rng.choice([2, 8, 10, 16, 3, 36])
        return rng.randint(0, 12) if small else (rng.choice(_INTS) if rng.random() < 0.7 else rng.randint(-50, 500))
    if head == "float":
        return rng.choice(_FLOATS) if rng.random() < 0.7 else round(rng.uniform(-100, 100), 3)
    if head == "str":
        if rng.random() < 0.75:
            return rng.choice(_STRS)
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ABC_-.,0123") for _ in range(rng.randint(1, 14)))
    if head == "bool":
        return rng.random() < 0.5
    if head == "bytes":
        return rng.choice(_BYTES) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
    if head == "none":
        return None
    if depth > 2:
        return 0
    n = rng.choice([0, 1, 2, 3, 3, 4, 5, 6, 8])
    if head in ("list", "tuple", "set"):
        elem = spec[1] or ("int",)
        if rng.random() < 0.3:      # repeated elements: what dedup / count / group functions are about
            pool = [_rand_value(elem, rng, small, depth + 1) for _ in range(2)]
            vals = [rng.choice(pool) for _ in range(n + 1)]
        else:
            vals = [_rand_value(elem, rng, small, depth + 1) for _ in range(n)]
        if rng.random() < 0.25:     # sorted input: what bisect / merge functions expect
            try:
                vals.sort()
            except TypeError:
                pass
        if head == "set":
            try:
                return set(vals)
            except TypeError:
                return set()
        return vals if head == "list" else tuple(vals)
    if head == "tup":
        return tuple(_rand_value(s, rng, small, depth + 1) for s in spec[1])
    if head == "dict":
        out = {}
        for _ in range(min(n, 5)):
            k = _rand_value(spec[1] or ("str",), rng, small, depth + 1)
            try:
                out[k] = _rand_value(spec[2] or ("int",), rng, small, depth + 1)
            except TypeError:
                pass
        return out
    return rng.choice(_INTS)


def _mutate(v, rng: random.Random):
    """A value near an example value: the examples show what inputs the function expects."""
    t = type(v)
    if t is bool:
        return not v if rng.random() < 0.5 else v
    if t is int:
        return rng.choice([v, v + 1, v - 1, v * 2, v // 2, -v, v + rng.randint(2, 9), abs(v) % 13])
    if t is float:
        return rng.choice([v, v * 2, v / 2, -v, v + 1.0, round(v + rng.uniform(-3, 3), 3)])
    if t is str:
        ops = [lambda s: s, str.upper, str.lower, str.title, lambda s: s[::-1], lambda s: s[1:], lambda s: s[:-1],
               lambda s: s + s, lambda s: s.replace(" ", ""), lambda s: s + " x", lambda s: " " + s,
               lambda s: s[: len(s) // 2], lambda s: s.swapcase()]
        return rng.choice(ops)(v)
    if t is bytes:
        return rng.choice([v, v[::-1], v[1:], v + v, v.upper(), v[: len(v) // 2]])
    if t in (list, tuple):
        items = list(v)
        op = rng.randrange(6)
        if op == 1:
            items.reverse()
        elif op == 2 and items:
            items.pop(rng.randrange(len(items)))
        elif op == 3 and items:
            items.append(_mutate(rng.choice(items), rng))
        elif op == 4:
            items = [_mutate(x, rng) for x in items]
        elif op == 5:
            try:
                items = sorted(items)
            except TypeError:
                pass
        return items if t is list else tuple(items)
    if t is dict and v:
        d = dict(v)
        k = rng.choice(list(d))
        if rng.random() < 0.5:
            del d[k]
        else:
            d[k] = _mutate(d[k], rng)
        return d
    return v


def _doctest_args(cand: Candidate) -> dict[str, list]:
    """Literal arguments the doctest examples pass, per parameter name."""
    seeds: dict[str, list] = {}
    names = [p.name for p in cand.params]
    for src, _ in cand.examples:
        for n in ast.walk(ast.parse(src, mode="eval")):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == cand.name):
                continue
            for i, a in enumerate(n.args):
                if i < len(names) and not isinstance(a, ast.Starred):
                    _add_literal(seeds, names[i], a)
            for kw in n.keywords:
                if kw.arg in names:
                    _add_literal(seeds, kw.arg, kw.value)
    return seeds


def _add_literal(seeds: dict, name: str, node) -> None:
    try:
        v = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return
    seeds.setdefault(name, []).append(v)


# Type profiles for parameters with no clue, as (first such parameter, the others).
_PROFILES = [(("int",), ("int",)), (("str",), ("str",)), (("list", ("int",)), ("int",)),
             (("list", ("int",)), ("list", ("int",))), (("float",), ("float",)), (("str",), ("int",)),
             (("list", ("str",)), ("str",))]


def _plans(cand: Candidate) -> list[list[_ParamPlan]]:
    """One plan per type profile; parameters with no type clue differ between profiles."""
    seeds = _doctest_args(cand)
    known, unknown = {}, []
    for p in cand.params:
        s = seeds.get(p.name, [])
        spec = (spec_from_annotation(p.annotation) or cand.hints.get(p.name)
                or next((spec_of_value(v) for v in s if spec_of_value(v)), None)
                or (spec_of_value(p.default) if p.default_known else None) or _name_spec(p.name))
        if spec is None and p.has_default:
            continue      # an optional parameter we know nothing about: leave it at its default
        if spec is None:
            unknown.append(p.name)
        known[p.name] = _elem_default(spec, s, p.name)
    doc_strs = _doc_strings(cand.doc)
    profiles = _PROFILES if unknown else [None]
    if len(unknown) == 1:   # (first, others) profiles that differ only in "others" are the same
        profiles = [pr for i, pr in enumerate(_PROFILES) if all(pr[0] != q[0] for q in _PROFILES[:i])]
    out = []
    for prof in profiles:
        plan = []
        for p in cand.params:
            if p.name not in known:
                continue
            spec = known[p.name] or (prof[0] if p.name == unknown[0] else prof[1])
            plan.append(_ParamPlan(p, spec, seeds.get(p.name, []), bool(_SMALL.match(p.name.lower())), doc_strs))
        out.append(plan)
    return out


_SCALAR_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bytes": (bytes,)}


def _related(spec, prev: list, rng: random.Random):
    """A value built from the case's earlier arguments (an element of an earlier list, a piece
    of an earlier string, a mix of an earlier list), so that `index(seq, item)`, `startswith(s,
    prefix)` or `common(a, b)` see inputs where their arguments relate. None if there is none."""
    head = spec[0] if spec else None
    types = _SCALAR_TYPES.get(head)
    pool = []
    for v in prev:
        if types:
            if type(v) in types:
                pool.append(v)
                if head == "str" and v:
                    i, j = sorted(rng.sample(range(len(v) + 1), 2))
                    pool += [v[:j], v[i:], v[i:j]]
            if type(v) in (list, tuple, set):
                pool += [x for x in _ordered_items(v) if type(x) in types]
        elif head in ("list", "tuple", "set") and type(v) in (list, tuple, set) and v:
            items = _ordered_items(v)
            mix = rng.sample(items, rng.randint(1, len(items))) + [_rand_value(spec[1], rng, False)
                                                                    for _ in range(rng.randint(0, 2))]
            pool.append(mix if head == "list" else tuple(mix) if head == "tuple" else set(mix))
    return rng.choice(pool) if pool else None


def _value(plan: _ParamPlan, rng: random.Random, prev: list):
    if plan.seeds and rng.random() < 0.5:
        return _mutate(rng.choice(plan.seeds), rng)
    if prev and rng.random() < 0.35:
        v = _related(plan.spec, prev, rng)
        if v is not None:
            return v
    if plan.doc_strs and plan.spec and plan.spec[0] == "str" and rng.random() < 0.3:
        return rng.choice(plan.doc_strs)
    return _rand_value(plan.spec, rng, plan.small, name=plan.param.name.lower())


def make_cases(cand: Candidate, seed: int = 0, per_profile: int | None = None) -> list[Case]:
    """Doctest expressions, then generated calls (deterministic for `seed` and the function)."""
    cases = [Case(src, "doctest", want=want) for src, want in cand.examples]
    rng = random.Random(hashlib.blake2b(f"{seed}\0{cand.key}".encode("utf-8", "surrogatepass"),
                                        digest_size=8).digest())
    plans = _plans(cand)
    n = per_profile or (24 if len(plans) == 1 else 8)
    seen = {c.expr for c in cases}
    for k, plan in enumerate(plans):
        made = 0
        for _ in range(n * 4):
            if made >= n:
                break
            args, kwargs, prev = [], [], []
            skipped = False
            for pp in plan:
                p = pp.param
                if p.has_default and rng.random() < 0.6:
                    skipped = True
                    continue
                try:
                    v = _value(pp, rng, prev)
                except TypeError:     # e.g. a set of unhashable elements
                    v = _rand_value(pp.spec, rng, pp.small, name=p.name.lower())
                prev.append(v)
                text = literal(v, empty_set="set()")
                if p.kind == "kw" or (skipped and p.kind == "pos"):
                    kwargs.append(f"{p.name}={text}")
                elif p.kind == "posonly" and skipped:
                    break
                else:
                    args.append(text)
            expr = f"{cand.name}({', '.join(args + kwargs)})"
            if expr in seen or len(expr) > 600:
                continue
            seen.add(expr)
            cases.append(Case(expr, "generated", profile=k))
            made += 1
    return cases


# --------------------------------------------------------------------------------------------
# From recorded outputs to a task

# An outcome recorded by the sandbox for one case: (status, payload, seconds) with status
# "ok" (payload = repr of a plain value), "raise" (payload = exception type), "timeout",
# "opaque" (a value that is not plain data), "big" (repr too long), "skipped".

TEST_HEAD = '''import builtins as _b
import math as _math


def _same(got, exp):
    """`got` equals `exp` with the same built-in types all the way down (floats: rel. 1e-6)."""
    t = _b.type(exp)
    if t is _b.float:
        return _b.type(got) in (_b.int, _b.float) and _math.isclose(got, exp, rel_tol=1e-6, abs_tol=1e-9)
    if _b.type(got) is not t:
        return False
    if t is _b.list or t is _b.tuple:
        return _b.len(got) == _b.len(exp) and _b.all(_same(g, e) for g, e in _b.zip(got, exp))
    if t is _b.dict or t is _b.set:
        if _b.len(got) != _b.len(exp) or not _b.all(_b.any(_same(g, e) for e in exp) for g in got):
            return False
        return t is _b.set or _b.all(_same(got[k], exp[k]) for k in exp)
    return got == exp


def check(candidate):
'''


def literal(v, empty_set: str = "_b.set()") -> str:
    """Source text of a plain value. Set elements are sorted: `repr` of a set of strings depends
    on the process's hash seed, and the output must not. In tests `set()` is spelled `_b.set()`:
    a solution may rebind module-level names, never the test's own `_b`."""
    t = type(v)
    if t is list:
        return "[" + ", ".join(literal(x, empty_set) for x in v) + "]"
    if t is tuple:
        return "(" + ", ".join(literal(x, empty_set) for x in v) + ("," if len(v) == 1 else "") + ")"
    if t is dict:
        return "{" + ", ".join(f"{literal(k, empty_set)}: {literal(x, empty_set)}" for k, x in v.items()) + "}"
    if t is set:
        return "{" + ", ".join(sorted(literal(x, empty_set) for x in v)) + "}" if v else empty_set
    return repr(v)


def _ordered_items(v) -> list:
    """Elements of a collection in an order that does not depend on the hash seed."""
    return sorted(v, key=repr) if type(v) in (set, frozenset) else list(v)


def _parse(payload: str):
    try:
        return True, ast.literal_eval(payload)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _same(a, b) -> bool:
    """The test's comparison, in the miner (to judge determinism and distinct outputs)."""
    t = type(b)
    if t is float:
        import math

        return type(a) in (int, float) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if type(a) is not t:
        return False
    if t in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if t in (dict, set):
        if len(a) != len(b) or not all(any(_same(x, y) for y in b) for x in a):
            return False
        return t is set or all(_same(a[k], b[k]) for k in b)
    return a == b


def _rename(expr: str, name: str) -> str:
    """A case expression for the test: the function is `candidate`, `set()` is `_b.set()`."""
    tree = ast.parse(expr, mode="eval")
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id == name:
            n.id = "candidate"
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "set" and not n.args:
            n.func = ast.Attribute(ast.Name("_b", ast.Load()), "set", ast.Load())
    return ast.unparse(tree)


@dataclass
class _Kept:
    expr: str
    value: object
    seconds: float
    doctest: bool


def _resource_failure(outcome: tuple) -> bool:
    return outcome[0] in ("timeout", "skipped") or (outcome[0] == "raise" and outcome[1] in (
        "MemoryError", "RecursionError", "_Slow"))


def _usable_cases(cases: list[Case], runs: list[dict]) -> tuple[list[_Kept], str | None]:
    """Cases with the same plain value in every run; doctest cases must match their `want`."""
    kept: list[_Kept] = []
    per_profile = Counter()
    for i, case in enumerate(cases):
        outs = [r.get(i) for r in runs]
        if any(o is None or _resource_failure(o) for o in outs):
            continue        # limits depend on the machine's load, not on the function: no evidence
        statuses = {o[0] for o in outs}
        if statuses != {"ok"}:
            if len(statuses) > 1 and "ok" in statuses:
                return [], "nondeterministic"
            continue
        parsed = [_parse(o[1]) for o in outs]
        if not all(ok for ok, _ in parsed):
            continue
        vals = [v for _, v in parsed]
        if not all(_same(v, vals[0]) and _same(vals[0], v) for v in vals[1:]):
            return [], "nondeterministic"
        if case.kind == "doctest":
            ok, want = _parse(case.want)
            if ok and not _same(vals[0], want) and outs[0][1] != case.want:
                return [], "doctest_mismatch"
            if not ok and outs[0][1] != case.want:
                continue        # the doctest prints something that is not a literal: not usable
        else:
            per_profile[case.profile] += 1
        kept.append(_Kept(case.expr, vals[0], max(o[2] for o in outs), case.kind == "doctest"))
    if per_profile:
        best = max(sorted(per_profile), key=lambda k: per_profile[k])
        profile_of = {c.expr: c.profile for c in cases}
        kept = [k for k in kept if k.doctest or profile_of[k.expr] == best]
    return kept, None


def _select(kept: list[_Kept]) -> list[_Kept]:
    """Up to MAX_ASSERTS cases: doctests first, then cases with outputs not seen yet."""
    chosen = [k for k in kept if k.doctest][: MAX_ASSERTS // 2]
    rest = [k for k in kept if not k.doctest]
    for k in rest:
        if len(chosen) >= MAX_ASSERTS:
            break
        if not any(_same(k.value, c.value) for c in chosen):
            chosen.append(k)
    for k in rest:
        if len(chosen) >= MAX_ASSERTS:
            break
        if k not in chosen:
            chosen.append(k)
    return chosen


def build_test(cases: list[tuple[str, object]]) -> str:
    """`check(candidate)` asserting each (expression using `candidate`, expected value)."""
    return TEST_HEAD + "".join(f"    assert _same({expr}, {literal(v)})\n" for expr, v in cases)


def assemble_task(cand: Candidate, cases: list[Case], runs: list[dict], *, max_seconds: float = 1.0,
                  min_cases: int = 3) -> dict | str:
    """A HumanEval-shaped task from the original's outcomes (`runs`: one {case index: outcome}
    per sandbox run), or the reason there is none."""
    kept, why = _usable_cases(cases, runs)
    if why:
        return why
    chosen = _select(kept)
    if len(chosen) < min_cases:
        return "too_few_cases"
    distinct = []
    for k in chosen:
        if not any(_same(k.value, d) for d in distinct):
            distinct.append(k.value)
    if len(distinct) < 2:
        return "constant_output"
    if sum(k.seconds for k in chosen) > max_seconds:
        return "slow"
    first = next((p for p in cand.params if p.kind != "kw"), None)
    if first is not None and all(k.value is None for k in chosen):
        return "returns_none"
    test = build_test([(_rename(k.expr, cand.name), k.value) for k in chosen])
    return {
        "task_id": "", "prompt": cand.prompt, "entry_point": cand.name, "canonical_solution": cand.body,
        "test": test, "source": cand.where, "license": cand.license,
        "_meta": {"key": cand.key, "group": cand.group, "module": cand.module, "indent": cand.indent,
                  "params": [p.name for p in cand.params if p.kind != "kw"],
                  "constant": literal(_most_common(chosen)),
                  "asserts": len(chosen), "doctests": sum(k.doctest for k in chosen),
                  "ref_seconds": round(sum(k.seconds for k in chosen), 4)},
    }


def _most_common(chosen: list[_Kept]):
    counts = Counter(literal(k.value) for k in chosen)
    best = counts.most_common(1)[0][0]
    return next(k.value for k in chosen if literal(k.value) == best)


def trivial_bodies(task: dict) -> list[str]:
    """Bodies the test must reject: `return None`, `pass`, returning the first argument and
    returning the most common expected value."""
    meta = task["_meta"]
    ind = meta["indent"]
    out = [f"{ind}return None\n", f"{ind}pass\n"]
    if meta["params"]:
        out.append(f"{ind}return {meta['params'][0]}\n")
    out.append(f"{ind}return {meta['constant']}\n")
    return out


# --------------------------------------------------------------------------------------------
# Split and SFT

def _h(*parts) -> bytes:
    return hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8).digest()


def split_tasks(tasks: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / held-out by package (`group`), so a held-out function never shares its package
    (and thus its helpers) with a training one. Whole groups, in seeded order, go to held-out
    until it holds about `fraction` of the tasks; with fewer than 4 groups the unit is the
    module, then the task. Input order is kept inside each split."""
    if fraction <= 0 or len(tasks) < 2:
        return list(tasks), []
    for unit in ("group", "module", "key"):
        units = Counter(t["_meta"][unit] for t in tasks)
        if len(units) >= 4 or unit == "key":
            break
    target = fraction * len(tasks)
    held, n = set(), 0
    for u in sorted(units, key=lambda u: _h(seed, "split", u)):
        if n >= target:
            break
        if n + units[u] <= 1.5 * target or not held:
            held.add(u)
            n += units[u]
    train = [t for t in tasks if t["_meta"][unit] not in held]
    heldout = [t for t in tasks if t["_meta"][unit] in held]
    return train, heldout


_REQUESTS = [
    "Write a Python function `{sig}`.\n\n{doc}",
    "Implement the following Python function.\n\n```python\n{header}```",
    "I need a Python function named `{name}` with the signature `{sig}`. Here is what it should do:\n\n{doc}",
    "Please write `{name}` in Python.\n\nSpecification:\n{doc}\n\nSignature: `{sig}`",
    "Complete this function so that it does what its docstring says:\n\n```python\n{header}```",
    "Can you implement `{sig}` for me? {doc}",
]


def sft_example(task: dict, seed: int = 0) -> dict:
    """A conversation from a task: the user asks for the function (from its signature and
    docstring, one of several phrasings), the assistant answers with the function in a fenced
    block. Helper definitions the function needs are given in the request."""
    prompt = task["prompt"]
    name = task["entry_point"]
    m = re.search(rf"^def {re.escape(name)}\b", prompt, re.MULTILINE)
    context, header = (prompt[: m.start()].strip(), prompt[m.start():]) if m else ("", prompt)
    tree = ast.parse(header + task["canonical_solution"])
    fn = tree.body[0]
    doc = textwrap.dedent(ast.get_docstring(fn) or "").strip()
    sig = f"{name}({ast.unparse(fn.args)})" + (f" -> {ast.unparse(fn.returns)}" if fn.returns else "")
    k = int.from_bytes(_h(seed, "sft", task["task_id"]), "little") % len(_REQUESTS)
    user = _REQUESTS[k].format(sig=sig, doc=doc, header=header, name=name)
    imports = "\n".join(ln for ln in context.splitlines() if ln.startswith(("import ", "from ")))
    helpers = context[len(imports):].strip() if context.startswith(imports) else context
    if helpers:
        user += f"\n\nYou can use these definitions:\n\n```python\n{helpers}\n```"
    code = (imports + "\n\n\n" if imports else "") + header + task["canonical_solution"]
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": f"```python\n{code.rstrip()}\n```"}],
            "task_id": task["task_id"], "source": task["source"], "license": task["license"]}


def public_record(task: dict, split: str) -> dict:
    """The JSONL line of a task: HumanEval's fields plus provenance and split."""
    return {k: task[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution", "test", "source",
                                 "license")} | {"split": split}


def dumps(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"
