"""Where source code comes from: directories, git checkouts, wheels/sdists, JSONL/Parquet tables,
and the embedded default corpus (this interpreter's standard library + site-packages).

Used by `nanoseek data build --source ...` (docs/data.md). A source is turned into *tasks* in
the main process (cheap: directory walks, stat calls, archive/table names) and each task is
read into `RawDoc`s by a worker process (`read_task`), so the expensive reading and cleaning
runs in parallel while the order of documents stays deterministic.

Source specs accepted by `parse_source` (a prefix forces the kind, otherwise it is inferred):
    default                       the embedded default: stdlib + site-packages of this Python
    stdlib | site-packages        one half of it
    dir:PATH    / PATH (a dir)    a project, a git checkout, or a folder of projects / archives
    archive:PATH / *.whl *.zip *.tar.gz *.tgz *.tar.bz2 *.tar.xz *.tar
    table:PATH  / *.parquet *.jsonl *.jsonl.gz, or a directory holding only such files

Every document carries a *group* (its repository or package): the train/val split is made by
group, never by file. Language is detected from the extension, or from the shebang line of an
extension-less file.
"""

from __future__ import annotations

import bisect
import bz2
import csv
import gzip
import lzma
import os
import re
import shutil
import site
import subprocess
import sysconfig
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data import licenses
from nanoseek.data.parquet_pages import OLD_WRITER_SLACK, largest_page
from nanoseek.jsonl import TOO_LONG, iter_lines

# --------------------------------------------------------------------------------------------
# Languages

EXT_LANG = {
    ".py": "python", ".pyi": "python", ".pyw": "python",
    ".pyx": "cython", ".pxd": "cython", ".pxi": "cython",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
    ".h++": "cpp", ".ipp": "cpp", ".tpp": "cpp", ".inl": "cpp",
    ".cu": "cuda", ".cuh": "cuda",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".rs": "rust", ".go": "go", ".java": "java",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".ksh": "shell",
    ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".swift": "swift", ".cs": "csharp",
    ".rb": "ruby", ".php": "php", ".lua": "lua", ".jl": "julia", ".zig": "zig", ".sql": "sql",
}
LANGUAGES = tuple(sorted(set(EXT_LANG.values())))
_SHEBANG_LANG = {
    "python": "python", "python2": "python", "python3": "python", "pypy": "python", "pypy3": "python",
    "sh": "shell", "bash": "shell", "zsh": "shell", "ksh": "shell", "dash": "shell",
    "node": "javascript", "nodejs": "javascript", "deno": "typescript", "ts-node": "typescript",
    "ruby": "ruby", "php": "php", "lua": "lua",
}
# Names used for languages by table datasets (The Stack: "Python", "C++", "C#", ...).
_LANG_ALIASES = {"c++": "cpp", "c#": "csharp", "js": "javascript", "ts": "typescript", "bash": "shell",
                 "sh": "shell", "shellscript": "shell", "golang": "go", "py": "python", "cuda c++": "cuda"}


def lang_from_path(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    return EXT_LANG.get(name[dot:]) if dot > 0 else None


def lang_from_shebang(head: bytes) -> str | None:
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("latin-1").strip().split()
    if not line:
        return None
    prog = line[0].rsplit("/", 1)[-1]
    if prog == "env":
        args = [a for a in line[1:] if not a.startswith("-") and "=" not in a]
        prog = args[0] if args else ""
    prog = re.sub(r"[\d.]+$", "", prog) or prog
    return _SHEBANG_LANG.get(prog) or _SHEBANG_LANG.get(prog.rstrip("0123456789."))


def normalize_lang(name: str | None) -> str | None:
    if not name:
        return None
    low = name.strip().lower()
    low = _LANG_ALIASES.get(low, low)
    return low if low in LANGUAGES else None


# --------------------------------------------------------------------------------------------
# Path rules: vendored / minified / generated files

VENDORED_DIRS = frozenset({
    "node_modules", "bower_components", "vendor", "vendored", "_vendor", "third_party", "third-party",
    "thirdparty", "3rdparty", "site-packages", "dist-packages", "__pycache__",
})
_MINIFIED = re.compile(r"[.\-]min\.(js|mjs|css)$|\.bundle\.js$|\.packed\.js$", re.IGNORECASE)
_GENERATED_NAME = re.compile(r"_pb2(_grpc)?\.pyi?$|\.pb\.(go|h|cc)$|\.pb\.gw\.go$|_generated\.\w+$|\.g\.dart$"
                             r"|\.designer\.cs$|_string\.go$", re.IGNORECASE)


def path_reason(rel: str) -> str | None:
    """Why a file is skipped from its path alone (vendored / minified / generated), or None."""
    parts = rel.split("/")
    for d in parts[:-1]:
        if d in VENDORED_DIRS or (d.startswith(".") and d not in (".", "..")) or d.endswith((".dist-info", ".egg-info")):
            return "vendored"
    name = parts[-1]
    if _MINIFIED.search(name):
        return "minified"
    if _GENERATED_NAME.search(name):
        return "auto_generated"
    return None


# --------------------------------------------------------------------------------------------
# Documents and tasks

@dataclass
class RawDoc:
    """A file as read from a source, before cleaning. `data` is bytes (files) or str (tables)."""

    group: str
    path: str
    lang: str
    license: str | None
    source: str
    data: bytes | str
    size: int
    where: str = ""     # where a person finds it: a path, ARCHIVE!member or TABLE row


@dataclass
class Skip:
    """A file dropped while reading (reason as in the manifest), with a human-readable message."""

    reason: str
    size: int
    where: str
    message: str = ""


@dataclass
class FileRef:
    path: str      # absolute path on disk
    rel: str       # path recorded in the corpus (relative to the group root)
    group: str
    license: str | None
    source: str
    size: int
    lang: str
    mtime_ns: int = 0    # for the build's signature of its inputs (build.inputs_digest)


@dataclass
class Task:
    """A unit of work for one worker: a batch of files, an archive, or a slice of a table."""

    kind: str                  # "files" | "archive" | "parquet" | "jsonl"
    source: str
    files: list[FileRef] = field(default_factory=list)
    path: str = ""
    part: int = 0              # parquet row group
    start: int = 0             # jsonl byte range
    end: int = -1
    est_bytes: int = 0


@dataclass
class SourceSpec:
    kind: str    # "default" | "stdlib" | "site-packages" | "dir" | "archive" | "table"
    path: str = ""

    @property
    def label(self) -> str:
        return self.kind if not self.path else f"{self.kind}:{self.path}"


ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".ndjson")


def parse_source(spec: str) -> SourceSpec:
    """Turn a `--source` argument into a SourceSpec (see module docstring)."""
    if spec in ("default", "stdlib", "site-packages"):
        return SourceSpec(spec)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("dir", "archive", "table", "git"):
        path = os.path.abspath(os.path.expanduser(rest))
        kind = "dir" if kind == "git" else kind
    else:
        path = os.path.abspath(os.path.expanduser(spec))
        low = path.lower()
        if not os.path.exists(path):
            raise FileNotFoundError(f"source not found: {path}")
        if os.path.isdir(path):
            kind = "table" if _is_table_dir(path) else "dir"
        elif low.endswith(ARCHIVE_SUFFIXES):
            kind = "archive"
        elif low.endswith(TABLE_SUFFIXES):
            kind = "table"
        else:
            raise ValueError(f"cannot tell what kind of source {spec!r} is: expected a directory, an archive "
                             f"({', '.join(ARCHIVE_SUFFIXES)}), a table ({', '.join(TABLE_SUFFIXES)}) or 'default'")
    if not os.path.exists(path):
        raise FileNotFoundError(f"source not found: {path}")
    return SourceSpec(kind, path)


def _is_table_dir(path: str) -> bool:
    tables = code = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            low = f.lower()
            if low.endswith(TABLE_SUFFIXES):
                tables += 1
            elif lang_from_path(low) or low.endswith(ARCHIVE_SUFFIXES):
                code += 1
    return tables > 0 and code == 0


# --------------------------------------------------------------------------------------------
# Directory walking (.gitignore aware)

_PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py", "setup.cfg", "package.json", "Cargo.toml", "go.mod",
                    "pom.xml", "build.gradle", "CMakeLists.txt", "Makefile", "README.md", "README.rst", "README")


def _is_project_root(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n in _PROJECT_MARKERS or licenses.LICENSE_FILE_RE.match(n) for n in names)


def _git_files(root: str) -> list[str] | None:
    """Tracked + untracked-but-not-ignored files of a git checkout (None if git can't say)."""
    if not os.path.exists(os.path.join(root, ".git")) or shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=300, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return sorted({p for p in out.decode("utf-8", "surrogateescape").split("\0") if p})


def _walk(root: str):
    """Yield relative paths of regular files under root, honouring nested .gitignore files."""
    git = _git_files(root)
    if git is not None:
        yield from git
        return
    try:
        from pathspec import GitIgnoreSpec
    except ImportError:  # pragma: no cover - pathspec is a runtime dependency
        GitIgnoreSpec = None

    def rec(d: str, rel: str, specs: list):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        if GitIgnoreSpec is not None and any(e.name == ".gitignore" for e in entries):
            # a regular file only, at most 1 MB (a link to /dev/zero or a FIFO is not read)
            data = _read_regular(os.path.join(d, ".gitignore"), 1 << 20)
            if data is not None:
                specs = specs + [(rel, GitIgnoreSpec.from_lines(data.decode("utf-8", "replace").splitlines()))]
        for e in entries:
            r = f"{rel}{e.name}"
            is_dir = e.is_dir(follow_symlinks=False)
            if is_dir and (e.name == ".git" or os.path.exists(os.path.join(e.path, "pyvenv.cfg"))):
                continue  # git metadata and virtualenvs are never part of a project's source
            ignored = False
            for base, spec in specs:
                sub = r[len(base):] + ("/" if is_dir else "")
                if spec.match_file(sub):
                    ignored = True
            if ignored:
                continue
            if is_dir:
                yield from rec(e.path, r + "/", specs)
            elif e.is_file(follow_symlinks=False) or e.is_symlink():
                yield r   # links are yielded so that the caller counts them as skipped

    yield from rec(root, "", [])


def _read_regular(path: str, limit: int) -> bytes | None:
    """At most `limit` bytes of a regular file, never through a symbolic link (None otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            import stat

            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(limit)
        except OSError:
            return None


def _dir_license(root: str) -> str | None:
    """License of a project from its license file(s) or manifest (regular files only, 1 MB each)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for n in names:
        if n in ("pyproject.toml", "package.json", "Cargo.toml", "setup.cfg"):
            data = _read_regular(os.path.join(root, n), 1 << 20)
            lic = licenses.from_manifest(n, data.decode("utf-8", "replace")) if data is not None else None
            if lic:
                return lic
    for n in names:
        if licenses.LICENSE_FILE_RE.match(n):
            data = _read_regular(os.path.join(root, n), 1 << 20)
            lic = licenses.from_text(data.decode("utf-8", "replace")) if data is not None else None
            if lic:
                return lic
    return None


def _outside(path: str, real_root: str) -> bool:
    """True if `path` is a symbolic link or resolves outside `real_root` (a linked parent)."""
    if os.path.islink(path):
        return True
    real = os.path.realpath(path)
    return real != real_root and not real.startswith(real_root + os.sep)


@dataclass
class Enumerated:
    """What the main process learns while listing a source."""

    tasks: list[Task] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)     # decided from the path / size alone
    not_code: int = 0                                     # files that are not source code at all


def _add_file(out: Enumerated, abs_path: str, rel: str, group: str, lic: str | None, source: str,
              limits: "SizeLimits", shebang: bool = True) -> FileRef | None:
    lang = lang_from_path(rel)
    if lang is None:
        name = rel.rsplit("/", 1)[-1]
        if not shebang or "." in name:
            out.not_code += 1
            return None
    try:
        st = os.lstat(abs_path)
    except OSError as e:
        out.skips.append(Skip("unreadable", 0, abs_path, str(e)))
        return None
    if not os.path.isfile(abs_path) or os.path.islink(abs_path):
        out.not_code += 1
        return None
    if lang is None:  # an extension-less file is code only if it is a script with a shebang
        try:
            with open(abs_path, "rb") as f:
                lang = lang_from_shebang(f.read(256))
        except OSError:
            lang = None
        if lang is None:
            out.not_code += 1
            return None
    reason = path_reason(rel)
    if reason:
        out.skips.append(Skip(reason, st.st_size, abs_path))
        return None
    if st.st_size > limits.max_bytes:
        out.skips.append(Skip("too_large", st.st_size, abs_path))
        return None
    if st.st_size < limits.min_bytes and lang is not None:
        out.skips.append(Skip("too_small", st.st_size, abs_path))
        return None
    return FileRef(abs_path, rel, group, lic, source, st.st_size, lang, st.st_mtime_ns)


@dataclass(frozen=True)
class SizeLimits:
    min_bytes: int = 32
    max_bytes: int = 1 << 20


def _enumerate_dir(spec: SourceSpec, limits: SizeLimits, out: Enumerated) -> list[FileRef]:
    root = spec.path.rstrip("/") or "/"
    real_root = os.path.realpath(root)
    refs: list[FileRef] = []
    label = spec.label

    def link_skip(p: str) -> None:
        out.skips.append(Skip("symlink", 0, p, "symbolic link (or path through one) not followed: "
                                              "nothing outside the source root is read"))

    if _is_project_root(root):
        projects = [(root, os.path.basename(root))]
    else:
        projects = []
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            if e.name.startswith(".") or e.name in VENDORED_DIRS:
                continue
            if e.is_symlink():
                link_skip(e.path)
            elif e.is_dir(follow_symlinks=False):
                projects.append((e.path, e.name))
    for proj, group in projects:
        lic = _dir_license(proj)
        for rel in _walk(proj):
            abs_path = os.path.join(proj, rel)
            if _outside(abs_path, real_root):   # git lists tracked symlinks like files
                link_skip(abs_path)
                continue
            if rel.lower().endswith(ARCHIVE_SUFFIXES):  # a wheelhouse: read each archive in place
                out.tasks.append(Task("archive", label, path=abs_path, est_bytes=_file_size(abs_path)))
                continue
            ref = _add_file(out, abs_path, rel, group, lic, label, limits)
            if ref:
                refs.append(ref)
    if not projects or projects[0][0] != root:
        # Loose files directly under a folder of projects form their own group.
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            if e.is_symlink():
                link_skip(e.path)
            elif e.is_file(follow_symlinks=False):
                if e.name.lower().endswith(ARCHIVE_SUFFIXES):
                    out.tasks.append(Task("archive", label, path=e.path, est_bytes=_file_size(e.path)))
                    continue
                ref = _add_file(out, e.path, e.name, os.path.basename(root), None, label, limits)
                if ref:
                    refs.append(ref)
    return refs


def _file_size(p: str) -> int:
    try:
        return os.path.getsize(p)
    except OSError:
        return 0


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def site_packages_dirs() -> list[str]:
    dirs = []
    for d in list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []):
        d = os.path.realpath(d)
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def _enumerate_stdlib(limits: SizeLimits, out: Enumerated) -> list[FileRef]:
    root = stdlib_dir()
    refs = []
    # Installed packages and compiled extension modules are not the standard library's source;
    # config-3.x holds the interpreter's build files.
    skip_top = {"site-packages", "dist-packages", "lib-dynload", "__pycache__"}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        if not rel_dir:
            dirs[:] = [d for d in dirs if d not in skip_top and not d.startswith("config-")]
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            rel = rel_dir + f
            top = rel.split("/", 1)[0]
            group = "stdlib/" + (top.rsplit(".", 1)[0] if "/" not in rel else top)
            ref = _add_file(out, os.path.join(dirpath, f), rel, group, "PSF-2.0", "stdlib", limits, shebang=False)
            if ref:
                refs.append(ref)
    return refs


def _dist_name(meta_text: str, fallback: str) -> str:
    m = re.search(r"^Name:\s*(.+)$", meta_text, re.MULTILINE)
    name = m.group(1).strip() if m else fallback
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_dists(sp: str) -> tuple[dict[str, tuple[str, str | None]], dict[str, tuple[str, str | None]]]:
    """Map each installed file (relative path) and top-level name -> (distribution, license)."""
    by_file: dict[str, tuple[str, str | None]] = {}
    by_top: dict[str, tuple[str, str | None]] = {}
    for info in sorted(Path(sp).glob("*.dist-info")) + sorted(Path(sp).glob("*.egg-info")):
        meta_path = info / ("METADATA" if info.suffix == ".dist-info" else "PKG-INFO")
        try:
            meta = meta_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        dist = _dist_name(meta, info.name.split("-")[0])
        lic = licenses.from_metadata(meta)
        if not lic:
            for lf in sorted(info.rglob("*")):
                if lf.is_file() and licenses.LICENSE_FILE_RE.match(lf.name):
                    lic = licenses.from_text(lf.read_text(encoding="utf-8", errors="replace"))
                    if lic:
                        break
        record = info / "RECORD"
        if record.is_file():
            with open(record, newline="", encoding="utf-8", errors="replace") as f:
                for row in csv.reader(f):
                    if row and not row[0].startswith(".."):
                        by_file[row[0].replace("\\", "/")] = (dist, lic)
        top = info / "top_level.txt"
        if top.is_file():
            for t in top.read_text(encoding="utf-8", errors="replace").split():
                by_top.setdefault(t, (dist, lic))
    return by_file, by_top


def _enumerate_site_packages(limits: SizeLimits, out: Enumerated) -> list[FileRef]:
    refs = []
    for sp in site_packages_dirs():
        by_file, by_top = _installed_dists(sp)
        for dirpath, dirs, files in os.walk(sp):
            rel_dir = os.path.relpath(dirpath, sp)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.endswith((".dist-info", ".egg-info")))
            for f in sorted(files):
                rel = rel_dir + f
                top = rel.split("/", 1)[0]
                dist, lic = by_file.get(rel) or by_top.get(top.split(".")[0]) or (top.split(".")[0], None)
                ref = _add_file(out, os.path.join(dirpath, f), rel, dist, lic, "site-packages", limits, shebang=False)
                if ref:
                    refs.append(ref)
    return refs


def _enumerate_table(spec: SourceSpec, out: Enumerated, chunk_bytes: int) -> None:
    paths = []
    if os.path.isdir(spec.path):
        for dirpath, dirs, files in os.walk(spec.path):   # (directory links are not walked)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                if not f.lower().endswith(TABLE_SUFFIXES):
                    continue
                if os.path.islink(p):   # as for source directories: nothing outside the root is read
                    out.skips.append(Skip("symlink", 0, p, "symbolic link not followed: nothing outside the "
                                                          "source root is read"))
                elif not os.path.isfile(p):   # a FIFO or a device would block or never end
                    out.skips.append(Skip("unreadable", 0, p, "not a regular file"))
                else:
                    paths.append(p)
    else:
        paths = [spec.path]
    for p in paths:
        size = _file_size(p)
        if p.lower().endswith(".parquet"):
            try:
                import pyarrow.parquet as pq

                n = pq.ParquetFile(p).metadata.num_row_groups
            except Exception as e:  # noqa: BLE001 - any pyarrow failure means a broken file
                out.skips.append(Skip("unreadable", size, p, f"cannot open Parquet file: {e}"))
                continue
            for rg in range(n):
                out.tasks.append(Task("parquet", spec.label, path=p, part=rg, est_bytes=size // max(n, 1)))
        elif p.lower().endswith(".gz"):
            out.tasks.append(Task("jsonl", spec.label, path=p, start=0, end=-1, est_bytes=size * 4))
        else:
            for start in range(0, max(size, 1), chunk_bytes):
                out.tasks.append(Task("jsonl", spec.label, path=p, start=start, end=min(size, start + chunk_bytes),
                                      est_bytes=min(size, start + chunk_bytes) - start))


def enumerate_sources(specs: list[SourceSpec], limits: SizeLimits, chunk_bytes: int = 4 << 20,
                      chunk_files: int = 512) -> tuple[list[FileRef], Enumerated]:
    """List every source. Returns loose file refs (to be batched by the caller) and the rest."""
    out = Enumerated()
    refs: list[FileRef] = []
    for spec in specs:
        if spec.kind in ("default", "stdlib"):
            refs += _enumerate_stdlib(limits, out)
        if spec.kind in ("default", "site-packages"):
            refs += _enumerate_site_packages(limits, out)
        if spec.kind == "dir":
            refs += _enumerate_dir(spec, limits, out)
        elif spec.kind == "archive":
            out.tasks.append(Task("archive", spec.label, path=spec.path, est_bytes=_file_size(spec.path)))
        elif spec.kind == "table":
            _enumerate_table(spec, out, chunk_bytes)
    return refs, out


def batch_files(refs: list[FileRef], chunk_bytes: int = 4 << 20, chunk_files: int = 512) -> list[Task]:
    tasks, cur, size = [], [], 0
    for r in refs:
        cur.append(r)
        size += r.size
        if size >= chunk_bytes or len(cur) >= chunk_files:
            tasks.append(Task("files", cur[0].source, files=cur, est_bytes=size))
            cur, size = [], 0
    if cur:
        tasks.append(Task("files", cur[0].source, files=cur, est_bytes=size))
    return tasks


# --------------------------------------------------------------------------------------------
# Reading (runs in worker processes)

def read_task(task: Task, limits: SizeLimits):
    """Yield RawDoc / Skip items for one task. Never raises on bad input."""
    if task.kind == "files":
        yield from _read_files(task, limits)
    elif task.kind == "archive":
        yield from _read_archive(task, limits)
    elif task.kind == "parquet":
        yield from _read_parquet(task, limits)
    elif task.kind == "jsonl":
        yield from _read_jsonl(task, limits)
    else:  # pragma: no cover
        raise ValueError(task.kind)


def _read_files(task: Task, limits: SizeLimits):
    for ref in task.files:
        try:   # O_NOFOLLOW: a file swapped for a link after listing is not followed
            fd = os.open(ref.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read(limits.max_bytes + 1)
        except OSError as e:
            yield Skip("unreadable", ref.size, ref.path, str(e))
            continue
        if len(data) > limits.max_bytes:  # grew since it was listed
            yield Skip("too_large", len(data), ref.path)
            continue
        yield RawDoc(ref.group, ref.rel, ref.lang, ref.license, ref.source, data, len(data), ref.path)


def _archive_group(name: str, meta: str | None) -> str:
    base = os.path.basename(name)
    for suf in ARCHIVE_SUFFIXES:
        if base.lower().endswith(suf):
            base = base[: -len(suf)]
            break
    fallback = re.split(r"-(?=\d)", base, maxsplit=1)[0]
    return _dist_name(meta, fallback) if meta else re.sub(r"[-_.]+", "-", fallback).lower()


_SIDE_MAX = 1 << 20          # bytes read from a metadata / license file inside an archive
# A package has one METADATA / PKG-INFO, a manifest or two and a few license files (tens in a
# wheel that bundles its dependencies' licenses), a few hundred KB in all. The caps below keep a
# hostile archive (100,000 members named LICENSE-00001, ... of 1 MB each) from being held whole:
# memory for side files stays under _SIDE_TOTAL + _SIDE_MAX whatever the archive holds.
_SIDE_TOTAL = 4 << 20        # bytes of metadata / license files kept per archive
_SIDE_COUNT = 256            # metadata / license files kept per archive
_META_NAMES = ("METADATA", "PKG-INFO")
_MANIFEST_NAMES = ("pyproject.toml", "package.json", "Cargo.toml", "setup.cfg")
_STREAM_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, ValueError, RuntimeError,
                  zlib.error, lzma.LZMAError, NotImplementedError)


def _compressed_opener(path: str):
    """The stream decompressor for a compressed tar / table by its magic bytes, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    if head.startswith(b"\x1f\x8b"):
        return gzip.open
    if head.startswith(b"BZh"):
        return bz2.open
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.open
    return None


def verify_stream(path: str) -> str | None:
    """Decompress a gzip / bzip2 / xz file to its end in bounded memory, checking every CRC.

    Returns None if the stream is intact (or not compressed), else what is wrong with it. A
    compressed stream's checksum is only verified at its end, so a reader that stops early (tar
    stops at the end-of-archive block) would keep garbled data from a damaged stream.
    """
    opener = _compressed_opener(path)
    if opener is None:
        return None
    try:
        with opener(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except _STREAM_ERRORS as e:
        return f"damaged compressed stream: {type(e).__name__}: {e}"
    return None


# A pax ('x', 'g') or GNU long-name / long-link ('L', 'K') header is read whole by tarfile before
# the member it describes: a few KB of gzip can declare one of gigabytes. Real ones hold a path
# and a few attributes; 1 MB is far beyond any of them.
_TAR_META_MAX = 1 << 20
# tarfile's rule for which headers are followed by data (tarfile._proc_builtin): regular files,
# and types it does not know; links, directories, devices and FIFOs have none.
_TAR_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")


def tar_stream_problem(path: str) -> str | None:
    """Check a tar file (plain or compressed) before tarfile reads it, in bounded memory: every
    compressed stream's CRC to its end (verify_stream), and every metadata header's size
    (_TAR_META_MAX). None if both hold, else what is wrong. Headers are walked with tarfile's
    own rules (sizes in octal or base-256, a pax `size` record for the next member, GNU sparse
    extension blocks); at a header whose checksum fails the walk stops and tarfile judges it."""
    opener = _compressed_opener(path) or open
    try:
        with opener(path, "rb") as f:
            problem = _walk_tar_headers(f)
            while f.read(1 << 20):   # (to the end: a compressed stream's CRC is checked there)
                pass
    except _STREAM_ERRORS as e:
        return f"damaged compressed stream: {type(e).__name__}: {e}"
    return problem


def _walk_tar_headers(f) -> str | None:
    pax_size = None    # a pax header's `size` record: the next member's data size
    at = 0
    while True:
        block = f.read(512)
        if len(block) < 512 or not block.strip(b"\0") or not _tar_checksum_ok(block):
            return None
        at += 512
        kind, size = block[156:157], _tar_number(block[124:136])
        if size is None:
            return None
        if size < 0:   # (base-256 allows it; tarfile would then read a metadata header to the end)
            return f"tar header with a negative size at byte {at - 512}"
        if kind in (b"x", b"g", b"L", b"K"):
            if size > _TAR_META_MAX:
                return (f"tar metadata header ({kind.decode()!r}) of {size} bytes at byte {at - 512}: more "
                        f"than {_TAR_META_MAX} (tarfile would read it whole into memory)")
            data = f.read(-(-size // 512) * 512)
            at += len(data)
            if kind == b"x":
                pax_size = _pax_size(data[:size])
                if pax_size is not None and pax_size < 0:
                    return f"tar pax header with a negative size at byte {at - 512 - len(data)}"
            continue
        if kind == b"S" and block[482]:   # GNU sparse: extension headers follow, each may chain
            while True:
                ext = f.read(512)
                at += len(ext)
                if len(ext) < 512 or not ext[504]:
                    break
        if pax_size is not None:
            size, pax_size = pax_size, None
        if kind in _TAR_NO_DATA:
            continue
        skip = -(-size // 512) * 512
        while skip > 0:
            n = len(f.read(min(skip, 1 << 20)))
            if n == 0:
                return None    # truncated: tarfile reports it
            skip -= n
            at += n


def _tar_number(field: bytes) -> int | None:
    """A tar header's numeric field: octal text, or base-256 (first byte 0x80, or 0xFF: negative)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _tar_checksum_ok(block: bytes) -> bool:
    stored = _tar_number(block[148:156])
    unsigned = sum(block[:148]) + 256 + sum(block[156:])     # the checksum field counted as spaces
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)   # (as C's signed char)
    return stored in (unsigned, signed)


def _pax_size(data: bytes) -> int | None:
    """The `size` record of a pax header's "LEN key=value\n" records, if any."""
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            return None
        try:
            length = int(data[pos:sp])
        except ValueError:
            return None
        if length <= 0:
            return None
        key, _, value = data[sp + 1 : pos + length].rstrip(b"\n").partition(b"=")
        if key == b"size":
            try:
                return int(value)
            except ValueError:
                return None
        pos += length
    return None


class _Spool:
    """Member contents held in a spooled temporary file (memory stays flat for big archives)."""

    def __init__(self):
        self.f = tempfile.SpooledTemporaryFile(max_size=16 << 20)
        self.items: list[tuple[str, int, int]] = []

    def add(self, name: str, data: bytes) -> None:
        self.items.append((name, self.f.tell(), len(data)))
        self.f.write(data)

    def __iter__(self):
        for name, off, n in self.items:
            self.f.seek(off)
            yield name, self.f.read(n)

    def close(self) -> None:
        self.f.close()


def _read_archive(task: Task, limits: SizeLimits):
    """Read a wheel / sdist / source archive in place (nothing is extracted to disk).

    Every read is bounded (a member is read up to max_bytes + 1, a side file up to 1 MB, side
    files together up to _SIDE_TOTAL), so a decompression bomb costs time, not memory. A damaged
    zip member is dropped alone (each has its own CRC); a damaged tar stream drops the whole
    archive, since nothing read from it can be trusted (the stream is verified to its end before
    any member is kept).
    """
    path = task.path
    scan = _ArchiveScan(path, limits)
    try:
        yield from (_scan_zip(scan) if path.lower().endswith((".whl", ".zip")) else _scan_tar(scan))
    except _STREAM_ERRORS as e:
        scan.members.close()
        yield Skip("unreadable", _file_size(path), path, f"cannot read archive: {type(e).__name__}: {e}")
        return
    for name, n, why in scan.damaged:
        yield Skip("unreadable", n, f"{path}!{name}", f"damaged archive member: {why}")
    lic, meta = _archive_license(scan.side.data)
    group = _archive_group(path, meta)
    label = f"{task.source}!{os.path.basename(path)}" if task.source != f"archive:{path}" else task.source
    for name, n in scan.too_big:
        if path_reason(name) is None:
            yield Skip("too_large", n, f"{path}!{name}")
    for name, data in scan.members:
        reason = path_reason(name)
        if reason:
            yield Skip(reason, len(data), f"{path}!{name}")
            continue
        if len(data) < limits.min_bytes:
            yield Skip("too_small", len(data), f"{path}!{name}")
            continue
        yield RawDoc(group, name, lang_from_path(name), lic, label, data, len(data), f"{path}!{name}")
    scan.members.close()


class _SideFiles:
    """The metadata and license files of one archive: at most _SIDE_COUNT files, _SIDE_TOTAL bytes.

    Files are ranked as `_archive_license` reads them (METADATA / PKG-INFO, then manifests, then
    license files; by name within each). Past a cap the lowest-ranked files are not read, or are
    let go again (a tar is read in stream order), and once a file is let go nothing ranked after
    it is kept (`cut`), even a small one that would fit: the files kept are always exactly the
    first ones the search would read without the caps. So it finds the same license, or (only in
    an archive with hundreds of license files, or MBs of them) none -- never another one.
    """

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self._ranks: list[tuple[int, str]] = []     # sorted
        self.nbytes = 0
        self.cut: tuple[int, str] | None = None     # the best rank let go so far

    def wants(self, rank: tuple[int, str], size: int) -> bool:
        """Whether a file of `size` bytes with this rank would be kept (read it only then)."""
        if self.cut is not None and rank >= self.cut:
            return False
        if not self._ranks or rank > self._ranks[-1]:     # the usual case: files come in rank order
            ahead, nbytes = len(self._ranks), self.nbytes
        else:
            ahead = bisect.bisect_left(self._ranks, rank)
            nbytes = sum(len(self.data[r[1]]) for r in self._ranks[:ahead])
        return ahead < _SIDE_COUNT and nbytes + min(size, _SIDE_MAX) <= _SIDE_TOTAL

    def add(self, rank: tuple[int, str], data: bytes) -> list[tuple[str, int]]:
        """Keep `data`; return (name, size) of each file this pushes past the caps (maybe itself)."""
        if rank[1] in self.data:         # a name twice in an archive: the later copy wins
            self._drop(rank)
        bisect.insort(self._ranks, rank)
        self.data[rank[1]] = data
        self.nbytes += len(data)
        out = []
        while len(self._ranks) > _SIDE_COUNT or self.nbytes > _SIDE_TOTAL:
            out += self.refuse(self._ranks[-1])
        return out

    def refuse(self, rank: tuple[int, str]) -> list[tuple[str, int]]:
        """Let go of the file of this rank (if kept) and of every kept one ranked after it, and
        keep nothing ranked after it from now on; return (name, size) of those let go."""
        self.cut = rank if self.cut is None else min(self.cut, rank)
        out = []
        while self._ranks and self._ranks[-1] >= self.cut:
            out.append(self._drop(self._ranks[-1]))
        return out

    def _drop(self, rank: tuple[int, str]) -> tuple[str, int]:
        self._ranks.remove(rank)
        n = len(self.data.pop(rank[1]))
        self.nbytes -= n
        return rank[1], n


def _side_rank(name: str) -> tuple[int, str] | None:
    """Rank of an archive member in the license search (lower: read first), None if not read."""
    parts = name.split("/")
    leaf = parts[-1]
    shallow = len(parts) <= 2 or (len(parts) == 3 and parts[1].endswith((".dist-info", ".egg-info")))
    if not shallow and ".dist-info/licenses/" not in name:
        return None
    if leaf in _META_NAMES:
        return 0, name
    if leaf in _MANIFEST_NAMES:
        return 1, name
    return (2, name) if licenses.LICENSE_FILE_RE.match(leaf) else None


@dataclass
class _ArchiveScan:
    """What one pass over an archive collects.

    `too_big` and `damaged` hold a short tuple per member, as `members` holds an offset per kept
    one: proportional to the archive's member list, which zipfile holds whole anyway (its
    central directory, as ZipInfo objects several times larger); in a tar each entry stands for
    at least a 512-byte header in the stream. The member *contents* are what must not grow with
    the archive: code members are spooled to disk, side files capped (_SideFiles).
    """

    path: str
    limits: SizeLimits
    members: _Spool = field(default_factory=_Spool)
    side: _SideFiles = field(default_factory=_SideFiles)
    too_big: list[tuple[str, int]] = field(default_factory=list)
    damaged: list[tuple[str, int, str]] = field(default_factory=list)
    budget: int = field(init=False)    # bytes still allowed to be read from this archive (zip bombs)

    def __post_init__(self):
        self.budget = 512 * self.limits.max_bytes

    def read_side(self, rank: tuple[int, str], size: int, read):
        """Read one metadata / license file (`read(n)`: its first n bytes) if the caps let it in;
        yield a Skip for each side file left unread or let go."""
        if not self.side.wants(rank, size) or self.budget < min(size, _SIDE_MAX):
            yield from self._side_skip(rank[1], size)
            for name, n in self.side.refuse(rank):
                yield from self._side_skip(name, n)
            return
        data = read(_SIDE_MAX)
        self.budget -= len(data)            # side files count against the read budget too
        for name, n in self.side.add(rank, data):
            yield from self._side_skip(name, n)

    def admit(self, name: str, size: int):
        """Whether a code member of `size` bytes (as its header says) may be read: one over
        max_bytes goes to too_big, and each one read is charged to the read budget; yields the
        Skip of one past the budget. Returns True when the member is to be read."""
        if size > self.limits.max_bytes:
            self.too_big.append((name, size))
            return False
        self.budget -= size
        if self.budget < 0:
            yield Skip("too_large", size, f"{self.path}!{name}", "archive read budget exhausted")
            return False
        return True

    def _side_skip(self, name: str, size: int):
        if lang_from_path(name) is None:    # (a LICENSE.py is still read as code: counted there)
            yield Skip("too_large", size, f"{self.path}!{name}",
                       f"license/metadata file not read: past this archive's caps ({_SIDE_COUNT} such files, "
                       f"{_SIDE_TOTAL >> 20} MB, or its read budget)")


def _scan_zip(scan: _ArchiveScan):
    limits = scan.limits
    with zipfile.ZipFile(scan.path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        # Side files first, in the license search's order, so the caps keep the ones it reads first.
        sides = sorted(((r, i) for i in infos if (r := _side_rank(i.filename)) is not None), key=lambda t: t[0])
        bad = set()
        for rank, info in sides:
            try:
                with zf.open(info) as f:
                    yield from scan.read_side(rank, info.file_size, f.read)
            except _STREAM_ERRORS as e:
                scan.damaged.append((info.filename, info.compress_size, f"{type(e).__name__}: {e}"))
                bad.add(id(info))
        for info in infos:
            name = info.filename
            if lang_from_path(name) is None or id(info) in bad:
                continue
            if not (yield from scan.admit(name, info.file_size)):
                continue
            try:
                with zf.open(info) as f:   # checks the member's CRC when read to its end
                    data = f.read(limits.max_bytes + 1)
                    if len(data) <= limits.max_bytes:
                        f.read(1)
            except _STREAM_ERRORS as e:
                scan.damaged.append((name, info.compress_size, f"{type(e).__name__}: {e}"))
                continue
            if len(data) > limits.max_bytes:
                scan.too_big.append((name, len(data)))
                continue
            scan.members.add(name, data)


def _scan_tar(scan: _ArchiveScan):
    limits = scan.limits
    problem = tar_stream_problem(scan.path)
    if problem:
        raise tarfile.ReadError(problem)
    with tarfile.open(scan.path, mode="r:*") as tf:
        while (m := tf.next()) is not None:   # streaming: one pass over the compressed file
            # tarfile keeps every header it has read (for getmember): a stream of millions of
            # empty members would grow that list without bound. Nothing here looks one up.
            tf.members.clear()
            if not m.isfile():
                continue
            name = m.name
            rank = _side_rank(name)
            if rank is not None:
                yield from scan.read_side(rank, m.size, tf.extractfile(m).read)
            if lang_from_path(name) is None:
                continue
            if not (yield from scan.admit(name, m.size)):
                continue
            data = tf.extractfile(m).read(limits.max_bytes + 1)
            if len(data) != m.size:
                raise tarfile.ReadError(f"member {name} is truncated")
            scan.members.add(name, data)
        # tarfile stops silently at a damaged header after the first: whatever follows the
        # last member must be the end-of-archive marker (zero blocks) or nothing.
        tf.fileobj.seek(tf.offset)
        tail = tf.fileobj.read(512)
        if tail.strip(b"\0"):
            raise tarfile.ReadError(f"damaged tar header at byte {tf.offset}: members after it are lost")


def _archive_license(side: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(license, METADATA text) of an archive from its side files: the package metadata first,
    then a manifest (pyproject.toml, ...), then a license file; by name within each."""
    meta = next((v.decode("utf-8", "replace") for k, v in sorted(side.items())
                 if k.rsplit("/", 1)[-1] in _META_NAMES), None)
    lic = licenses.from_metadata(meta) if meta else None
    if not lic:
        for k in sorted(side):
            leaf = k.rsplit("/", 1)[-1]
            if leaf in _MANIFEST_NAMES:
                lic = licenses.from_manifest(leaf, side[k].decode("utf-8", "replace"))
                if lic:
                    break
    if not lic:
        for k in sorted(side):
            if licenses.LICENSE_FILE_RE.match(k.rsplit("/", 1)[-1]):
                lic = licenses.from_text(side[k].decode("utf-8", "replace"))
                if lic:
                    break
    return lic, meta


_COLUMNS = {
    "content": ("content", "text", "code", "source"),
    "path": ("path", "max_stars_repo_path", "file_path", "filepath", "filename"),
    "repo": ("repo", "repo_name", "max_stars_repo_name", "repository", "package"),
    "license": ("license", "licenses", "max_stars_repo_licenses", "detected_licenses", "license_type"),
    "lang": ("lang", "language"),
}


def _pick(columns, role: str) -> str | None:
    return next((c for c in _COLUMNS[role] if c in columns), None)


def _row_license(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        parts = [licenses.normalize(str(x)) for x in v if x]
        if not parts or any(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else " AND ".join(f"({p})" if " " in p else p for p in parts)
    return licenses.normalize(str(v))


def _table_rows(task: Task, rows, where: str, limits: SizeLimits):
    for i, rec in rows:
        yield from _table_row(task, i, rec, where, limits)


def _table_row(task: Task, i: int, rec: dict, where: str, limits: SizeLimits, size: int | None = None):
    """One table row as a RawDoc or a Skip. `size`, when given, is the content's length in UTF-8
    bytes and rec["content"] only its first 256 characters: a value too large to be converted,
    which gets the same reason as it would whole (not_code, vendored, ... or too_large)."""
    content = rec.get("content")
    if not isinstance(content, str):
        yield Skip("unreadable", 0, f"{where} row {i}", "missing or non-text content column")
        return
    table = os.path.basename(task.path).split(".")[0]
    path, repo = str(rec.get("path") or f"row{i}"), rec.get("repo")
    if not repo:
        repo = f"{table}/{path.split('/', 1)[0]}" if "/" in path else table
    try:   # (JSON can spell lone surrogates: not text, and not writable as UTF-8)
        n = len(content.encode("utf-8"))
        path.encode("utf-8"), str(repo).encode("utf-8")
    except UnicodeEncodeError:
        yield Skip("unreadable", 0, f"{where} row {i}", "content, path or repo is not valid Unicode "
                                                     "(a lone surrogate)")
        return
    size = n if size is None else size
    named = rec.get("lang")
    lang = (normalize_lang(named if isinstance(named, str) else None) or lang_from_path(path)
            or lang_from_shebang(content[:256].encode()))
    if lang is None:
        yield Skip("not_code", size, f"{where} row {i}")
        return
    reason = path_reason(path)
    if reason:
        yield Skip(reason, size, f"{where}:{path}")
    elif size > limits.max_bytes:
        yield Skip("too_large", size, f"{where}:{path}")
    elif size < limits.min_bytes:
        yield Skip("too_small", size, f"{where}:{path}")
    else:
        yield RawDoc(str(repo), path, lang, _row_license(rec.get("license")), task.source, content, size,
                     f"{where}:{path}")


# A Parquet row group is read in batches of at most _PARQUET_BATCH_ROWS rows and about
# _PARQUET_BATCH_BYTES decoded bytes (sized from the row group's metadata: the read columns'
# uncompressed bytes per row). The metadata can mislead (a dictionary-encoded value repeated in
# every row looks small there), so the row cap is what bounds a batch whatever the file says: 16
# values. Small batches cost little: reading a 200 MB row group of 5 KB rows took 0.7 s (1.8 s
# read whole), and ~5 us more per row for 150-byte rows, against ~30 s to clean 200 MB.
_PARQUET_BATCH_BYTES = 4 << 20
_PARQUET_BATCH_ROWS = 16
# Arrow decompresses a page whole, into what its header says (data/parquet_pages.py): a row group
# any of whose read columns has a page over this many bytes (or 8 x max_bytes, if more) is
# skipped as too_large before Arrow reads it. Writers make pages of about 1 MiB (pyarrow,
# parquet-mr); one value makes a page of its own size, and a value over max_bytes is skipped
# anyway.
_PARQUET_MAX_PAGE = 64 << 20


def _read_parquet(task: Task, limits: SizeLimits):
    """Read one row group of a Parquet file, streamed in batches (see _PARQUET_BATCH_BYTES).

    Memory is one batch, not the row group: a content value over max_bytes is measured in Arrow
    (`binary_length`) and skipped as too_large without being converted to a Python string. The
    row group is decoded and validated (UTF-8 included) once before any row is yielded, so a
    row group that fails part-way is skipped whole as unreadable, as when it was read at once.
    Arrow decompresses a page whole, so before that the read columns' page headers are walked
    and a row group with a page over _PARQUET_MAX_PAGE (or 8 x max_bytes) is skipped as
    too_large: a few KB of zstd cannot claim gigabytes. Still within that bound: a batch holds
    its rows decoded, so a dictionary-encoded value repeated in every row costs
    _PARQUET_BATCH_ROWS copies of it.
    """
    where = f"{task.path}#rg{task.part}"
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(task.path)
        names = pf.schema_arrow.names
        cols = {role: _pick(names, role) for role in _COLUMNS}
        if cols["content"] is None:
            yield Skip("unreadable", _file_size(task.path), task.path,
                       f"Parquet file has no content column (looked for {', '.join(_COLUMNS['content'])})")
            return
        cap = max(_PARQUET_MAX_PAGE, 8 * limits.max_bytes)
        largest = _largest_parquet_page(task.path, pf, task.part, cols)
        if largest > cap:
            yield Skip("too_large", task.est_bytes, where,
                       f"a Parquet page decompresses to {largest / 2**20:.0f} MiB, over the {cap / 2**20:.0f} MiB "
                       "a page may take (Arrow decompresses pages whole)")
            return
        for _ in _parquet_batches(pf, task.part, cols):     # first pass: decode and validate only
            pass
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        yield Skip("unreadable", task.est_bytes, where, f"broken Parquet data: {e}")
        return
    first = task.part << 32   # row numbers as when the row group was read whole: part << 32 + row
    try:
        for batch in _parquet_batches(pf, task.part, cols):
            yield from _parquet_rows(task, batch, cols, first, where, limits)
            first += batch.num_rows
    except Exception as e:  # noqa: BLE001 - the file changed since the first pass
        yield Skip("unreadable", task.est_bytes, where, f"broken Parquet data (on the second pass): {e}")


def _largest_parquet_page(path: str, pf, part: int, cols: dict) -> int:
    """The largest uncompressed page (bytes) of the read columns in row group `part`, from the
    page headers (data/parquet_pages.py; PageWalkError for malformed ones). Each column chunk is
    walked over the bytes Arrow reads for it: from its dictionary page where that comes first,
    for the chunk's total compressed size (plus the slack Arrow gives old parquet-mr files)."""
    names = {c for c in cols.values() if c}
    rg = pf.metadata.row_group(part)
    largest = 0
    with open(path, "rb") as f:
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema.split(".")[0] not in names:
                continue
            start, first = col.data_page_offset, col.dictionary_page_offset
            if col.has_dictionary_page and first and 0 < first < start:
                start = first
            largest = max(largest, largest_page(f, start, col.total_compressed_size, OLD_WRITER_SLACK))
    return largest


def _parquet_batches(pf, part: int, cols: dict):
    names = [c for c in cols.values() if c]
    rg = pf.metadata.row_group(part)
    unpacked = sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                   if rg.column(j).path_in_schema.split(".")[0] in names)
    per_row = max(unpacked / max(rg.num_rows, 1), 1.0)
    rows = max(1, min(_PARQUET_BATCH_ROWS, int(_PARQUET_BATCH_BYTES / per_row)))
    for batch in pf.iter_batches(batch_size=rows, row_groups=[part], columns=names, use_threads=False):
        batch.validate(full=True)    # invalid UTF-8 in a string column: to_pylist would raise later
        yield batch


def _parquet_rows(task: Task, batch, cols: dict, first: int, where: str, limits: SizeLimits):
    """The rows of one Parquet batch. Content values are converted one at a time, and one over
    max_bytes not at all (its length is measured in Arrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    other = {role: batch.column(c).to_pylist() for role, c in cols.items() if c and role != "content"}
    content = batch.column(cols["content"])
    if pa.types.is_dictionary(content.type):
        content = content.dictionary_decode()
    t = content.type
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view()
    # A binary column's rows are skipped as non-text; a number or list column's (nothing else
    # holds text) are too, without converting them.
    text_like = is_str or pa.types.is_binary(t) or pa.types.is_large_binary(t) or t == pa.binary_view()
    sizes = pc.binary_length(content).to_pylist() if text_like else [None] * len(content)
    for i, size in enumerate(sizes):
        rec = {role: col[i] for role, col in other.items()}
        if size is not None and size > limits.max_bytes:
            # the first 256 characters decide a shebang language, as for a value read whole
            rec["content"] = pc.utf8_slice_codeunits(content.slice(i, 1), 0, 256)[0].as_py() if is_str else None
            yield from _table_row(task, first + i, rec, where, limits, size=size)
        else:
            rec["content"] = content[i].as_py() if text_like else None
            yield from _table_row(task, first + i, rec, where, limits)


def _max_line_bytes(limits: SizeLimits) -> int:
    # A record holds one file of at most max_bytes; JSON escapes (\\uXXXX) can inflate it 6x.
    return 6 * limits.max_bytes + (64 << 10)


def _read_jsonl(task: Task, limits: SizeLimits):
    """Stream the lines of a JSONL chunk (or a whole .jsonl.gz) one at a time.

    Memory is bounded whatever the input: a line longer than a record can legitimately be is
    skipped in pieces (reported as too_large), never held whole. A .jsonl.gz is verified to its
    end first (its CRC is only checked there), so nothing from a damaged stream is kept.
    """
    gz = task.path.lower().endswith(".gz")
    if gz:
        problem = verify_stream(task.path)
        if problem:
            yield Skip("unreadable", _file_size(task.path), task.path, f"cannot read JSONL: {problem}")
            return
    where = task.path
    # A chunk owns the lines that *start* inside [start, end); a .jsonl.gz is one whole chunk.
    start, end = (0, None) if gz or task.end < 0 else (task.start, task.end)
    try:
        with (gzip.open(task.path, "rb") if gz else open(task.path, "rb")) as f:
            for ln in iter_lines(f, start=start, end=end, max_bytes=_max_line_bytes(limits)):
                at = f"{where} @byte {ln.offset}"
                if ln.kind == TOO_LONG:
                    yield Skip("too_large", ln.size, at, "JSONL line longer than any record")
                elif ln.error is not None:
                    yield Skip("unreadable", 0, at, f"bad JSONL line: {ln.error}")
                else:
                    out = {}
                    for role in _COLUMNS:
                        c = _pick(ln.obj, role)
                        out[role] = ln.obj.get(c) if c else None
                    yield from _table_rows(task, [(ln.offset, out)], where, limits)
    except _STREAM_ERRORS as e:
        yield Skip("unreadable", task.est_bytes, task.path, f"cannot read JSONL: {type(e).__name__}: {e}")
