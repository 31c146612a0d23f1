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
