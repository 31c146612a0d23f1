"""Hostile corpora: damaged archives, decompression bombs and links out of the source root never
crash the build, never cost unbounded memory, and never let foreign or garbled bytes in
(docs/data.md, "Hardening")."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from nanoseek.data.build import build_corpus
from nanoseek.data import sources
from nanoseek.data.sources import RawDoc, SizeLimits, Skip, Task, enumerate_sources, parse_source, read_task
from tests.data.fixture_corpus import py_code, read_corpus

REPO = Path(__file__).resolve().parents[2]
OPTS = {"decontaminate": False, "near_dedup": False, "license_policy": "any", "max_bytes": 100_000}
MIT_META = "Metadata-Version: 2.1\nName: hurt\nVersion: 1.0\nClassifier: License :: OSI Approved :: MIT License\n"


def _build(tmp_path: Path, *sources) -> tuple[dict, list[dict]]:
    out = tmp_path / "corpus"
    m = build_corpus(out, [str(s) for s in sources], workers=1, progress=False, **OPTS)
    return m, read_corpus(out)


# ---------------------------------------------------------------------------------------------
# Item 6: damaged archives are dropped with a reason, the build goes on, nothing garbled is kept

def _damaged_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(3):
            z.writestr(f"hurt/m{i}.py", py_code(100 + i))
        z.writestr("hurt-1.0.dist-info/METADATA", MIT_META)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("hurt/m1.py")
    # Local header: 30 bytes + name + extra; the first deflate byte 0x07 is BFINAL=1 with the
    # reserved block type 11 -> zlib.error("invalid block type").
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    raw[info.header_offset + 30 + name_len + extra_len] = 0x07
    path.write_bytes(bytes(raw))


def test_damaged_wheel_member_is_dropped_and_the_build_goes_on(tmp_path):
    whl = tmp_path / "src" / "hurt-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    _damaged_wheel(whl)
    good = tmp_path / "src" / "proj"
    good.mkdir()
    (good / "ok.py").write_text(py_code(7))
    (good / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person")
    m, docs = _build(tmp_path, whl, good)
    assert sorted(d["path"] for d in docs) == ["hurt/m0.py", "hurt/m2.py", "ok.py"]
    un = m["dropped"]["unreadable"]
    assert un["files"] == 1 and "hurt/m1.py" in un["examples"][0] and "damaged archive member" in un["examples"][0]


def _tar_members(n: int = 40) -> list[tuple[str, bytes]]:
    return [(f"pkg-1.0/pkg/m{i:02d}.py", py_code(200 + i).encode()) for i in range(n)]


def _write_tar(path: Path, mode: str) -> None:
    with tarfile.open(path, mode) as tf:
        for name, data in _tar_members():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("suffix,mode", [("tar.gz", "w:gz"), ("tar.xz", "w:xz"), ("tar.bz2", "w:bz2")])
def test_tar_corrupted_mid_stream_is_dropped_whole(tmp_path, suffix, mode):
    path = tmp_path / f"pkg-1.0.{suffix}"
    _write_tar(path, mode)
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    for k in range(mid, mid + 16):
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))
    items = list(read_task(Task("archive", "archive", path=str(path)), SizeLimits()))
    assert not [i for i in items if isinstance(i, RawDoc)]          # nothing from a damaged stream
    assert [(i.reason, i.where) for i in items] == [("unreadable", str(path))]
    assert "cannot read archive" in items[0].message


def test_plain_tar_with_a_damaged_header_is_not_read_partly(tmp_path):
    path = tmp_path / "pkg-1.0.tar"
    _write_tar(path, "w")
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[12].offset
    raw[offset + 148: offset + 156] = b"0000000\0"                    # wrong header checksum
    path.write_bytes(bytes(raw))
    items = list(read_task(Task("archive", "archive", path=str(path)), SizeLimits()))
    assert [(i.reason, i.where) for i in items] == [("unreadable", str(path))]
    assert "damaged tar header" in items[0].message


def test_truncated_jsonl_gz_keeps_nothing(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(40):
            f.write(json.dumps({"content": py_code(300 + i), "path": f"m{i}.py"}) + "\n")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    refs, enum = enumerate_sources([parse_source(str(path))], SizeLimits())
    items = [i for t in enum.tasks for i in read_task(t, SizeLimits())]
    assert [(i.reason, i.where) for i in items] == [("unreadable", str(path))]


# ---------------------------------------------------------------------------------------------
# Item 7: decompression bombs cost time, not memory

_PROBE = textwrap.dedent("""
    import resource, sys
    from nanoseek.data.build import _init_worker, _process_task, BuildConfig
    from nanoseek.data.sources import enumerate_sources, parse_source, batch_files, SizeLimits
    cfg = BuildConfig(decontaminate=False, near_dedup=False, license_policy="any")
    _init_worker(cfg, None)
    refs, enum = enumerate_sources([parse_source(sys.argv[1])], SizeLimits())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    drops, kept = {}, 0
    for t in batch_files(refs) + enum.tasks:
        r = _process_task(t)
        kept += len(r.docs)
        for k, v in r.drops.items():
            drops[k] = drops.get(k, 0) + v[0]
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grew_mb": grew / 1024, "kept": kept, "drops": drops}))
""").replace("import resource, sys", "import json, resource, sys")


def _probe(path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


BOMB = 400 << 20   # decompressed bytes of each bomb (about 0.4 MB compressed)


def _zeros(f, n: int) -> None:
    chunk = b"\0" * (1 << 20)
    for _ in range(n // len(chunk)):
        f.write(chunk)


def test_zip_bomb_license_is_read_bounded(tmp_path):
    path = tmp_path / "bomb-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("bomb/ok.py", py_code(1))
        z.writestr("bomb-1.0.dist-info/METADATA", MIT_META)
        with z.open("bomb-1.0.dist-info/LICENSE", "w", force_zip64=True) as f:
            _zeros(f, BOMB)
        with z.open("bomb/huge.py", "w", force_zip64=True) as f:
            _zeros(f, BOMB)
    assert path.stat().st_size < 4 << 20
    r = _probe(path)
    assert r["grew_mb"] < 100, r
    assert r["kept"] == 1 and r["drops"] == {"too_large": 1}, r


def test_jsonl_gz_bomb_is_streamed(tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write((json.dumps({"content": py_code(1), "path": "a.py"}) + "\n").encode())
        f.write(b'{"path": "b.py", "content": "')
        chunk = b"a" * (1 << 20)
        for _ in range(BOMB // len(chunk)):
            f.write(chunk)
        f.write(b'"}\n')
        f.write((json.dumps({"content": py_code(2), "path": "c.py"}) + "\n").encode())
    assert path.stat().st_size < 4 << 20
    r = _probe(path)
    assert r["grew_mb"] < 100, r
    assert r["kept"] == 2 and r["drops"] == {"too_large": 1}, r


def _traced_read(path: Path, limits: SizeLimits = SizeLimits()) -> tuple[list, float]:
    """read_task's items for one archive and the peak of Python memory while reading (MB)."""
    tracemalloc.start()
    try:
        items = list(read_task(Task("archive", "archive", path=str(path)), limits))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return items, peak / 1e6


MIT_TEXT = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy"


def _side_skips(items) -> list[Skip]:
    return [i for i in items if isinstance(i, Skip) and "license/metadata file not read" in i.message]


def test_a_thousand_license_files_are_not_all_held(tmp_path):
    """A wheel with 1,000 members named LICENSE-NNNNN, each inflating to 1 MB (1 GB in all, 6 MB
    on disk), is read with a few MB of memory (before: every one was held, 1 GB). The real
    license file, last in the archive but first in the license search, is still the one read;
    each license file left unread is counted."""
    path = tmp_path / "hurt-1.0-py3-none-any.whl"
    junk = b"Copyright (c) nobody, all rights unclear.\n" * ((1 << 20) // 42)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for i in range(3):
            z.writestr(f"hurt/m{i}.py", py_code(400 + i))
        for i in range(1000):
            z.writestr(f"hurt/LICENSE-{i:05d}", junk)
        z.writestr("hurt/LICENSE", MIT_TEXT)
    assert path.stat().st_size < 8 << 20
    items, peak_mb = _traced_read(path)
    assert peak_mb < 16, peak_mb
    docs = [i for i in items if isinstance(i, RawDoc)]
    assert [(d.path, d.license) for d in docs] == [(f"hurt/m{i}.py", "MIT") for i in range(3)]
    skipped = _side_skips(items)
    assert len(skipped) >= 1000 - (sources._SIDE_TOTAL >> 20)       # about 4 of 1 MB fit the cap
    assert len(skipped) == len(items) - 3 and all(s.reason == "too_large" for s in skipped)


def test_a_tar_stream_of_license_files_and_empty_members_is_read_bounded(tmp_path):
    """In a tar (read in stream order) the license files come last-ranked first, so each new one
    pushes a kept one out; 20,000 empty members follow (tarfile's own list of headers grew with
    them). The side files kept stay at the count cap, and the real license is the one kept."""
    path = tmp_path / "hurt-1.0.tar.gz"
    junk = b"Copyright (c) nobody, all rights unclear.\n" * 200          # 8.4 KB: the count cap binds
    n_junk = 1500

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        add(tf, "hurt-1.0/hurt/m0.py", py_code(410).encode())
        for i in reversed(range(n_junk)):
            add(tf, f"hurt-1.0/LICENSE-{i:05d}", junk)
        add(tf, "hurt-1.0/LICENSE", MIT_TEXT.encode())
        for i in range(20_000):
            add(tf, f"hurt-1.0/data/{i:05d}.txt", b"")
    items, peak_mb = _traced_read(path)
    assert peak_mb < 10, peak_mb                    # before: 13 MB of side files + 9 MB of headers
    docs = [i for i in items if isinstance(i, RawDoc)]
    assert [(d.path, d.license) for d in docs] == [("hurt-1.0/hurt/m0.py", "MIT")]
    assert len(_side_skips(items)) == n_junk + 1 - sources._SIDE_COUNT


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, kind
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_huge_tar_metadata_header_is_refused_before_tarfile_reads_it(tmp_path, kind):
    """tarfile reads a pax / GNU long-name header whole: 64 KB of gzip declaring a 64 MB one would
    be 64 MB in memory (before: peak 75 MB). The archive is refused as unreadable, with why."""
    path = tmp_path / "bomb-1.0.tar.gz"
    code = py_code(300).encode()
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_tar_header("././@PaxHeader", 64 << 20, kind))
        for _ in range(64):
            f.write(b"\0" * (1 << 20))
        f.write(_tar_header("bomb-1.0/m.py", len(code)) + _pad(code) + b"\0" * 1024)
    items, peak_mb = _traced_read(path)
    assert peak_mb < 8, peak_mb
    assert [(i.reason, "metadata header" in i.message) for i in items] == [("unreadable", True)], items


def test_pax_and_gnu_long_names_and_pax_sizes_still_read(tmp_path):
    """Real metadata headers pass the header walk: long names in pax and GNU format, and a pax
    `size` record that overrides the member's own size field (what tarfile writes past 8 GiB).
    The member after that one holds bytes that are a valid header declaring a 64 MB pax header:
    a walk that ignored the pax size would land on them and refuse the archive."""
    long = "pkg-1.0/" + "d" * 120 + "/m.py"
    code = py_code(300).encode()
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar.gz"
        with tarfile.open(path, "w:gz", format=fmt) as tf:
            ti = tarfile.TarInfo(long)
            ti.size = len(code)
            tf.addfile(ti, io.BytesIO(code))
        assert sources.tar_stream_problem(str(path)) is None
        docs = [i for i in _traced_read(path)[0] if isinstance(i, RawDoc)]
        assert [d.path for d in docs] == [long]
    decoy = _pad(_tar_header("decoy", 64 << 20, tarfile.XHDTYPE) + code)
    record = f"size={len(decoy)}\n"
    record = f"{len(record) + 3} {record}"      # "NN size=...\n": NN counts itself
    path = tmp_path / "paxsize.tar.gz"
    with gzip.open(path, "wb") as f:
        f.write(_tar_header("././@PaxHeader", len(record), tarfile.XHDTYPE) + _pad(record.encode()))
        f.write(_tar_header("pkg-1.0/data.bin", 0) + decoy)
        f.write(_tar_header("pkg-1.0/m.py", len(code)) + _pad(code) + b"\0" * 1024)
    assert sources.tar_stream_problem(str(path)) is None
    with tarfile.open(path) as tf:      # (tarfile agrees: the data member is len(decoy) long)
        assert [(m.name, m.size) for m in tf] == [("pkg-1.0/data.bin", len(decoy)), ("pkg-1.0/m.py", len(code))]
    docs = [i for i in _traced_read(path)[0] if isinstance(i, RawDoc)]
    assert [d.path for d in docs] == ["pkg-1.0/m.py"]


PARQUET_HUGE = 2_100_000      # bytes of each oversized value (over the default max_bytes, 1 MiB)


def test_a_huge_parquet_row_group_is_streamed(tmp_path):
    """Two Parquet files of one row group each, a few hundred KB on disk, decoding to ~1.1 GB:
    300 rows of 2.1 MB (plain-encoded, skipped as too_large without being converted) and 2,000
    rows sharing one dictionary-encoded 256 KB value (so the metadata says ~0.5 KB a row). The
    worker's memory grows by under 100 MB (before: the whole row group, as Arrow data and as
    Python strings: +1.7 GB and +1.3 GB measured)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "tables"
    src.mkdir()
    good = pa.array([py_code(600 + i) for i in range(6)])
    big = pa.array(["x = 1\n" * (PARQUET_HUGE // 6)])       # chunks share one buffer: cheap to write
    content = pa.chunked_array([good.slice(0, 3)] + [big] * 300 + [good.slice(3)])
    paths = [f"g{i}.py" for i in range(3)] + [f"big{i}.py" for i in range(300)] + [f"g{i}.py" for i in range(3, 6)]
    pq.write_table(pa.table({"content": content, "path": paths}), src / "huge.parquet", compression="zstd",
                   use_dictionary=False, row_group_size=1 << 20)
    rep = pa.array(["y" * (256 << 10)])
    pq.write_table(pa.table({"content": pa.chunked_array([rep] * 2000), "path": [f"n{i}.txt" for i in range(2000)]}),
                   src / "rep.parquet", compression="zstd", row_group_size=1 << 20)
    for name in ("huge.parquet", "rep.parquet"):
        meta = pq.ParquetFile(src / name).metadata
        assert meta.num_row_groups == 1 and (src / name).stat().st_size < 1 << 20
    r = _probe(src)
    assert r["grew_mb"] < 100, r
    assert r["kept"] == 6 and r["drops"] == {"too_large": 300}, r


# ---------------------------------------------------------------------------------------------
# Item 8: nothing outside the source root is read, skipped links are counted

@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_checkout_symlinks_out_of_the_root_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with zipfile.ZipFile(outside / "evil-1.0-py3-none-any.whl", "w") as z:
        z.writestr("evil/stolen.py", "STOLEN_FROM_OUTSIDE = 1\n" + py_code(9))
        z.writestr("evil-1.0.dist-info/METADATA", MIT_META)
    (outside / "private.py").write_text("PRIVATE_OUTSIDE = 1\n" + py_code(10))
    (outside / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "ok.py").write_text(py_code(11))
    os.symlink(outside / "evil-1.0-py3-none-any.whl", repo / "wheels.whl")
    os.symlink(outside / "private.py", repo / "src" / "linked.py")
    os.symlink(outside, repo / "linkdir")
    os.symlink(outside / "LICENSE", repo / "LICENSE")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    m, docs = _build(tmp_path, repo)
    assert [d["path"] for d in docs] == ["src/ok.py"]
    assert all("OUTSIDE" not in d["content"] for d in docs)
    assert docs[0]["license"] is None            # the linked LICENSE was not read either
    assert m["dropped"]["symlink"]["files"] == 4


def test_table_links_fifos_and_a_hostile_gitignore_are_not_read(tmp_path):
    """A table directory's links (out of the root) and FIFOs, and a .gitignore that is a link to
    /dev/zero or a FIFO, are skipped or ignored: the build neither reads outside the root nor
    blocks nor reads without bound (run in a subprocess with a timeout: a FIFO would hang it)."""
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"path": "stolen.py", "content": "STOLEN = 1\n" + py_code(30)}) + "\n")
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "a.jsonl").write_text(json.dumps({"path": "a.py", "content": py_code(31)}) + "\n")
    os.symlink(outside, tables / "b.jsonl")
    os.mkfifo(tables / "c.jsonl")
    proj = tmp_path / "repos"
    for name, make in (("zero", lambda p: os.symlink("/dev/zero", p)), ("fifo", os.mkfifo)):
        (proj / name).mkdir(parents=True)
        (proj / name / "m.py").write_text(py_code(32 if name == "zero" else 33))
        make(proj / name / ".gitignore")
    code = ("import json, sys; from nanoseek.data.build import build_corpus; "
            f"m = build_corpus(sys.argv[1], ['table:{tables}', sys.argv[2]], workers=1, progress=False, "
            f"**{OPTS!r}); print(json.dumps(m['dropped']))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus"), str(proj)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    dropped = json.loads(run.stdout.strip().splitlines()[-1])
    docs = read_corpus(tmp_path / "corpus")
    assert sorted(d["path"] for d in docs) == ["a.py", "m.py", "m.py"]   # (paths are per project)
    assert all("STOLEN" not in d["content"] for d in docs)
    assert dropped["symlink"]["files"] == 2 and dropped["unreadable"]["files"] == 1   # (the .gitignore link counts)


def test_a_hostile_row_is_skipped_alone(tmp_path):
    """Rows whose lang is not a string, or whose content / path / repo hold a lone surrogate (JSON
    can spell one), are skipped one by one with a reason: the rows around them are kept, in a
    plain JSONL chunk and in a .jsonl.gz (read as one task)."""
    def rows(tag: str, seed: int) -> str:
        good = [{"path": f"{tag}{i}.py", "content": py_code(seed + i)} for i in range(6)]
        bad = [{"path": f"{tag}x.py", "content": py_code(seed + 10), "lang": 5},
               {"path": f"{tag}y.py", "content": py_code(seed + 11), "lang": ["python"]},
               {"path": "noext", "content": "#!/bin/sh\n\ud800" + f"echo {tag}\n" * 10},
               {"path": f"{tag}\ud800.py", "content": py_code(seed + 12)},
               {"path": f"{tag}w.py", "content": py_code(seed + 13), "repo": "r\udfff"}]
        return "\n".join(json.dumps(r) for r in good[:3] + bad + good[3:]) + "\n"

    src = tmp_path / "t"
    src.mkdir()
    (src / "rows.jsonl").write_text(rows("g", 50))
    with gzip.open(src / "more.jsonl.gz", "wt") as f:
        f.write(rows("h", 80))
    m, docs = _build(tmp_path, f"table:{src}")
    want = [f"{t}{i}.py" for t in "gh" for i in range(6)] + [f"{t}{c}.py" for t in "gh" for c in "xy"]
    assert sorted(d["path"] for d in docs) == sorted(want)
    assert m["dropped"]["unreadable"]["files"] == 2 * 3


# ---------------------------------------------------------------------------------------------
# Item 9 (part): groups.tsv is escaped; file names never put raw control sequences on the terminal

def test_groups_tsv_is_escaped_and_warnings_are_printable(tmp_path, capsys):
    root = tmp_path / "repos"
    (root / "evil\tval\t9\t9").mkdir(parents=True)
    (root / "evil\tval\t9\t9" / "m.py").write_text(py_code(41))
    (root / "ok").mkdir()
    (root / "ok" / "m.py").write_text(py_code(42))
    bad = root / "ok" / "x\x1b[2Jbad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not gzip")
    _build(tmp_path, root)
    rows = (tmp_path / "corpus" / "groups.tsv").read_text().splitlines()
    assert all(len(r.split("\t")) == 4 for r in rows)
    assert "evil\\tval\\t9\\t9" in {r.split("\t")[0] for r in rows}
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2Jbad.tar.gz" in err
