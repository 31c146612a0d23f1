"""The Parquet page-header walk (nanoseek/data/parquet_pages.py) and the page cap it gives the
data build (sources._read_parquet): each page's sizes against the column-chunk totals pyarrow's
writer put in the footer, over the writer's options; malformed chunks refused; a row group with
an oversized page skipped as too_large before Arrow reads it."""

from __future__ import annotations

import random

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from nanoseek.data import parquet_pages, sources  # noqa: E402
from nanoseek.data.parquet_pages import PageWalkError, largest_page, pages  # noqa: E402
from nanoseek.data.sources import RawDoc, SizeLimits, Skip, Task  # noqa: E402


def _chunks(path):
    """(column name, start, length, footer uncompressed total) of every column chunk."""
    md = pq.ParquetFile(path).metadata
    for g in range(md.num_row_groups):
        for j in range(md.num_columns):
            c = md.row_group(g).column(j)
            start = c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
            yield c.path_in_schema, start, c.total_compressed_size, c.total_uncompressed_size


def _table(n=2000, big=3 << 20):
    vals = [("x = %d\n" % i) * (i % 40 + 1) for i in range(n)] + ["y" * big]
    return pa.table({"content": vals, "path": [f"p{i % 300}.py" for i in range(len(vals))],
                     "stars": list(range(len(vals))), "tags": [["a", "b"][: i % 3] for i in range(len(vals))]})


@pytest.mark.parametrize("options", [
    {}, {"use_dictionary": False}, {"data_page_version": "2.0"}, {"compression": "zstd", "data_page_size": 4096},
    {"compression": "gzip", "write_statistics": False}, {"compression": "snappy", "use_dictionary": ["path"]},
    {"compression": "none", "row_group_size": 700}])
def test_the_walk_reads_every_page_header(tmp_path, options):
    """Every chunk's pages, headers included, add up to the footer's compressed and uncompressed
    totals (the walk lands on the chunk's end, or it raises), and the largest page of the content
    column is the one that holds the 3 MiB value."""
    path = tmp_path / "t.parquet"
    pq.write_table(_table(), path, **options)
    content = []
    with open(path, "rb") as f:
        for name, start, length, unpacked in _chunks(path):
            got = pages(f, start, length)
            assert sum(h + c for h, _, c in got) == length
            assert sum(h + u for h, u, _ in got) == unpacked, name
            if name == "content":
                content.append(largest_page(f, start, length))
    # (the value's own data page, or the dictionary page that holds it and the row group's rest)
    assert 3 << 20 < max(content) < 4 << 20


def test_malformed_chunks_are_refused(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(_table(200, 1000), path, compression="zstd")
    (name, start, length, _), *_ = _chunks(path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(raw[: start + length // 2])
    with open(cut, "rb") as f, pytest.raises(PageWalkError, match="past the end"):
        pages(f, start, length)
    with open(path, "rb") as f:
        with pytest.raises(PageWalkError, match="end at byte"):     # a chunk length off by one
            pages(f, start, length - 1)
        assert pages(f, start, length - 1, slack=1) == pages(f, start, length)   # (old parquet-mr files)
        with pytest.raises(PageWalkError):
            pages(f, -1, length)
    rng = random.Random(0)
    noise = tmp_path / "noise.bin"
    for _ in range(200):      # random bytes: refused (or, rarely, a header that happens to parse), never a hang
        noise.write_bytes(bytes(rng.randrange(256) for _ in range(600)))
        with open(noise, "rb") as f:
            try:
                pages(f, 0, 600)
            except PageWalkError:
                pass
    for bad in (bytes([0x1D]), bytes([0x19, 0xFC, 0xFF, 0xFF, 0xFF, 0x0F]) + b"\0" * 64):
        with pytest.raises((PageWalkError, parquet_pages._Short)):   # unknown type 13; a list of 2^32 structs
            parquet_pages.parse_header(bad)


def test_a_row_group_with_an_oversized_page_is_skipped_unread(tmp_path, monkeypatch):
    """A 12 MB value (a few KB on disk) makes a 12 MB page; with the page cap at 8 MiB the row
    group is skipped as too_large with the page's size named, and Arrow never reads its rows;
    under the default cap it is read (the value then dropped as too_large, the others kept)."""
    path = tmp_path / "t.parquet"
    vals = ["def f():\n    return 1\n" * 4, "z" * (12 << 20), "def g():\n    return 2\n" * 4]
    pq.write_table(pa.table({"content": vals, "path": ["a.py", "big.py", "b.py"]}), path, compression="zstd",
                   use_dictionary=False)
    assert path.stat().st_size < 1 << 20
    task = Task("parquet", "tables", path=str(path), part=0, est_bytes=123)

    def unread(*a, **k):
        raise AssertionError("Arrow read the row group")

    with monkeypatch.context() as m:
        m.setattr(sources, "_PARQUET_MAX_PAGE", 1 << 20)     # cap = max(1 MiB, 8 x max_bytes) = 8 MiB
        m.setattr(sources, "_parquet_batches", unread)
        items = list(sources.read_task(task, SizeLimits()))
    assert len(items) == 1 and isinstance(items[0], Skip), items
    assert items[0].reason == "too_large" and "12 MiB" in items[0].message and "8 MiB" in items[0].message
    items = list(sources.read_task(task, SizeLimits()))
    assert [i.path for i in items if isinstance(i, RawDoc)] == ["a.py", "b.py"]
    assert [i.reason for i in items if isinstance(i, Skip)] == ["too_large"]
