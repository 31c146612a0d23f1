"""Sources: language detection, .gitignore handling (with and without git), archives read in
place, JSONL/Parquet tables, and the embedded default corpus."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import pytest

from nanoseek.data import sources
from nanoseek.data.sources import (RawDoc, SizeLimits, Skip, Task, enumerate_sources, lang_from_path, lang_from_shebang,
                                   parse_source, path_reason, read_task)
from tests.data.fixture_corpus import py_code


@pytest.mark.parametrize("path,lang", [
    ("a/b.py", "python"), ("x.PYI", "python"), ("m.c", "c"), ("m.h", "c"), ("k.cpp", "cpp"), ("k.hpp", "cpp"),
    ("app.js", "javascript"), ("app.mjs", "javascript"), ("t.ts", "typescript"), ("t.tsx", "typescript"),
    ("lib.rs", "rust"), ("main.go", "go"), ("Main.java", "java"), ("run.sh", "shell"), ("README.md", None),
    ("Makefile", None), (".bashrc", None),
])
def test_lang_from_path(path, lang):
    assert lang_from_path(path) == lang


@pytest.mark.parametrize("head,lang", [
    (b"#!/usr/bin/env python3\n", "python"), (b"#!/bin/sh\n", "shell"), (b"#!/usr/bin/bash -e\n", "shell"),
    (b"#!/usr/bin/env -S node --flag\n", "javascript"), (b"#!/usr/bin/python3.11\n", "python"),
    (b"#!/usr/bin/perl\n", None), (b"echo hi\n", None),
])
def test_lang_from_shebang(head, lang):
    assert lang_from_shebang(head) == lang


@pytest.mark.parametrize("rel,reason", [
    ("pkg/node_modules/x/y.js", "vendored"), ("pip/_vendor/rich/a.py", "vendored"), ("a/.git/hooks/x.sh", "vendored"),
    ("a/third_party/x.c", "vendored"), ("static/app.min.js", "minified"), ("proto/x_pb2.py", "auto_generated"),
    ("api/x.pb.go", "auto_generated"), ("src/ok.py", None),
])
def test_path_reason(rel, reason):
    assert path_reason(rel) == reason


def _rels(root, limits=SizeLimits()):
    refs, enum = enumerate_sources([parse_source(str(root))], limits)
    return {r.rel for r in refs}, enum


def _project(root):
    root.mkdir()
    (root / "LICENSE").write_text("MIT License\nPermission is hereby granted, free of charge, to any person obtaining")
    (root / ".gitignore").write_text("*.log.py\nbuild/\n!keep.log.py\n")
    (root / "src").mkdir()
    (root / "src" / "a.py").write_text(py_code(1))
    (root / "src" / "debug.log.py").write_text(py_code(2))
    (root / "src" / "keep.log.py").write_text(py_code(3))
    (root / "build").mkdir()
    (root / "build" / "gen.py").write_text(py_code(4))
    (root / "src" / ".gitignore").write_text("local_*.py\n")
    (root / "src" / "local_cfg.py").write_text(py_code(5))
    (root / "tool").write_text("#!/bin/sh\necho hello world from the tool script\n")
    return {"src/a.py", "src/keep.log.py", "tool"}


def test_gitignore_without_git(tmp_path):
    expected = _project(tmp_path / "proj")
    rels, _ = _rels(tmp_path / "proj")
    assert rels == expected


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_gitignore_with_git(tmp_path):
    root = tmp_path / "repo"
    expected = _project(root)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    rels, _ = _rels(root)
    assert rels == expected


def test_folder_of_projects_gives_one_group_each(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / "repos" / name).mkdir(parents=True)
        (tmp_path / "repos" / name / "m.py").write_text(py_code(len(name)))
    refs, _ = enumerate_sources([parse_source(str(tmp_path / "repos"))], SizeLimits())
    assert {(r.group, r.rel) for r in refs} == {("alpha", "m.py"), ("beta", "m.py")}


def test_wheel_and_sdist_are_read_in_place(tmp_path):
    whl = tmp_path / "cool_lib-0.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("cool_lib/__init__.py", py_code(1))
        z.writestr("cool_lib/_vendor/six.py", py_code(2))
        z.writestr("cool_lib/big.py", "x = 1\n" * 50000)
        z.writestr("cool_lib-0.3.dist-info/METADATA", "Name: Cool_Lib\nClassifier: License :: OSI Approved :: MIT License\n")
    items = list(read_task(Task("archive", "archive", path=str(whl)), SizeLimits(max_bytes=100_000)))
    docs = [i for i in items if isinstance(i, RawDoc)]
    skips = {(i.reason, i.where.rsplit("!", 1)[1]) for i in items if isinstance(i, Skip)}
    assert [(d.group, d.path, d.license, d.lang) for d in docs] == [("cool-lib", "cool_lib/__init__.py", "MIT", "python")]
    assert skips == {("vendored", "cool_lib/_vendor/six.py"), ("too_large", "cool_lib/big.py")}
    assert not any(p.name != whl.name for p in tmp_path.iterdir())      # nothing extracted


def test_broken_inputs_are_skipped_not_raised(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    items = list(read_task(Task("archive", "a", path=str(bad)), SizeLimits()))
    assert len(items) == 1 and items[0].reason == "unreadable" and "cannot read archive" in items[0].message
    pq = tmp_path / "t.parquet"
    pq.write_bytes(b"PAR1garbagePAR1")
    refs, enum = enumerate_sources([parse_source(str(pq))], SizeLimits())
    assert [s.reason for s in enum.skips] == ["unreadable"] and not enum.tasks


def test_tables(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    # The Stack's column names.
    pq.write_table(pa.table({"content": [py_code(1), "fn main() {}\n" * 5], "lang": ["Python", "Rust"],
                             "max_stars_repo_path": ["a/x.py", "src/main.rs"],
                             "max_stars_repo_name": ["o/r", "o/s"],
                             "max_stars_repo_licenses": [["MIT"], ["MIT", "GPL-3.0"]]}),
                   tmp_path / "stack.parquet", row_group_size=1)
    refs, enum = enumerate_sources([parse_source(str(tmp_path / "stack.parquet"))], SizeLimits())
    assert len(enum.tasks) == 2                          # one task per row group
    docs = [d for t in enum.tasks for d in read_task(t, SizeLimits())]
    assert [(d.lang, d.group, d.path, d.license) for d in docs] == [
        ("python", "o/r", "a/x.py", "MIT"), ("rust", "o/s", "src/main.rs", "MIT AND GPL-3.0-only")]
    lines = [json.dumps({"text": py_code(i), "path": f"m{i}.py"}) for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    refs, enum = enumerate_sources([sources.SourceSpec("table", str(tmp_path / "d.jsonl"))], SizeLimits())
    # Tiny chunks: every line is read exactly once across byte-range tasks.
    from nanoseek.data.sources import _enumerate_table

    out = sources.Enumerated()
    _enumerate_table(sources.SourceSpec("table", str(tmp_path / "d.jsonl")), out, chunk_bytes=100)
    docs = [d for t in out.tasks for d in read_task(t, SizeLimits())]
    assert len(out.tasks) > 5 and sorted(d.path for d in docs) == [f"m{i}.py" for i in range(5)]
    assert all(d.license is None and d.group == "d" for d in docs)


def test_default_corpus_is_stdlib_and_site_packages():
    refs, enum = enumerate_sources([parse_source("stdlib")], SizeLimits())
    groups = {r.group for r in refs}
    assert {"stdlib/json", "stdlib/asyncio", "stdlib/os"} <= groups
    assert all(r.license == "PSF-2.0" and r.source == "stdlib" for r in refs)
    assert not any("site-packages" in r.path for r in refs)
    refs, enum = enumerate_sources([parse_source("site-packages")], SizeLimits())
    by_group = {}
    for r in refs:
        by_group.setdefault(r.group, r)
    assert "numpy" in by_group and by_group["numpy"].license and "BSD-3-Clause" in by_group["numpy"].license
    assert not any("/_vendor/" in r.rel for r in refs)


def _parquet_items(path, limits):
    refs, enum = enumerate_sources([parse_source(str(path))], limits)
    return [i for t in enum.tasks for i in read_task(t, limits)]


def test_parquet_row_groups_are_read_in_batches_with_the_same_results(tmp_path):
    """Rows are read in batches of at most _PARQUET_BATCH_ROWS; rows keep their numbers (row group
    << 32 + row) across batches, and a value over max_bytes (never converted to a str) gets the
    reason it would get read whole: too_large, or vendored / not_code first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limits = SizeLimits(max_bytes=2000)
    big = "x = 1\n" * 1000                                      # 6,000 bytes
    rows = [(py_code(i, 2), f"m{i}.py") for i in range(100)]
    rows[20] = (big, "big.py")
    rows[30] = (big, "vendor/x.py")
    rows[40] = ("hello " * 1000, "notes.txt")
    rows[50] = ("#!/bin/sh\n" + "echo hi\n" * 1000, "tool")        # language from the shebang
    rows[60] = ("#!/usr/bin/env python3\n# héllo ✓\n" + big, "run")  # 256 characters, not bytes
    rows[75] = (None, "none.py")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": [c for c, _ in rows], "path": [p for _, p in rows]}), path,
                   row_group_size=70)
    assert 100 > 70 > sources._PARQUET_BATCH_ROWS
    got = [(type(i).__name__, getattr(i, "reason", ""), i.where, i.size) for i in _parquet_items(path, limits)]
    where = [f"{path}#rg0", f"{path}#rg1"]
    n = len(big.encode())
    expected = {20: ("Skip", "too_large", f"{where[0]}:big.py", n),
                30: ("Skip", "vendored", f"{where[0]}:vendor/x.py", n),
                40: ("Skip", "not_code", f"{where[0]} row 40", 6000),
                50: ("Skip", "too_large", f"{where[0]}:tool", len(rows[50][0])),
                60: ("Skip", "too_large", f"{where[0]}:run", len(rows[60][0].encode())),
                75: ("Skip", "unreadable", f"{where[1]} row {(1 << 32) + 5}", 0)}
    want = [expected.get(i) or ("RawDoc", "", f"{where[i >= 70]}:{p}", len(c.encode()))
            for i, (c, p) in enumerate(rows)]
    assert got == want


def test_parquet_bad_row_group_or_non_text_column(tmp_path):
    """A row group with invalid UTF-8 is skipped whole (the other one is read); a content column
    that is not text skips each row, as when the row group was read whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [py_code(i, 2).encode() for i in range(6)]
    values[4] = b"x = '\xff\xfe'\n" * 10
    content = pa.array(values, pa.binary()).view(pa.string())     # a string column, with bad bytes
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": content, "path": [f"m{i}.py" for i in range(6)]}), path, row_group_size=3)
    items = _parquet_items(path, SizeLimits())
    assert [i.path for i in items if isinstance(i, RawDoc)] == ["m0.py", "m1.py", "m2.py"]
    skips = [i for i in items if isinstance(i, Skip)]
    assert [(s.reason, s.where) for s in skips] == [("unreadable", f"{path}#rg1")]
    assert "broken Parquet data" in skips[0].message
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"content": [1, 2, 3], "path": ["a.py", "b.py", "c.py"]}), path)
    items = _parquet_items(path, SizeLimits())
    assert [(i.reason, i.where) for i in items] == [("unreadable", f"{path}#rg0 row {r}") for r in range(3)]


def test_archive_license_search_past_the_caps_finds_the_same_license_or_none(tmp_path, monkeypatch):
    """Past the caps on side files, the license search sees only its first candidates: a license
    file that did not fit is never skipped over for a later one (which could name another
    license). Here LICENSE-5 (GPL) does not fit after 3.5 MB of license files naming none, so the
    small MIT LICENSE-6 after it must not decide: the license is unknown, not MIT."""
    from tests.data.fixture_corpus import GPL_TEXT, MIT_TEXT

    mb = 1 << 20
    junk = ["x\n" * (mb // 2)] * 3 + ["x\n" * (mb // 4)]
    path = tmp_path / "p-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("p/m.py", py_code(1))
        for i, text in enumerate(junk):
            z.writestr(f"p/LICENSE-{i + 1}", text)
        z.writestr("p/LICENSE-5", GPL_TEXT + " " * (9 * mb // 10))
        z.writestr("p/LICENSE-6", MIT_TEXT)
    assert sources._SIDE_TOTAL == 4 * mb                  # (the sizes above are chosen for it)
    items = list(read_task(Task("archive", "archive", path=str(path)), SizeLimits()))
    assert [(d.path, d.license) for d in items if isinstance(d, RawDoc)] == [("p/m.py", None)]
    assert sorted(s.where.rsplit("/", 1)[1] for s in items if isinstance(s, Skip)) == ["LICENSE-5", "LICENSE-6"]
    monkeypatch.setattr(sources, "_SIDE_TOTAL", 8 * mb)    # with room for it, LICENSE-5 decides
    items = list(read_task(Task("archive", "archive", path=str(path)), SizeLimits()))
    assert [d.license for d in items if isinstance(d, RawDoc)] == ["GPL-3.0-or-later"]
