"""The page sizes of a Parquet column chunk, read from its page headers before Arrow reads it.

    from nanoseek.data.parquet_pages import largest_page
    with open(path, "rb") as f:
        size = largest_page(f, start, length)   # bytes the largest page decompresses to

Why: Arrow decompresses each data or dictionary page whole, into a buffer of the size the page's
own header states (up to 2 GiB a page). A few KB of zstd can claim and fill that, so a hostile
file could make a data-build worker allocate gigabytes however small the batches it reads are
(data/sources.py streams a row group in batches of a few rows). The footer's column-chunk sizes
do not bound it: Arrow allocates by the page headers. So `_read_parquet` walks the headers of
every column chunk it will read and skips a row group whose largest page is over its cap.

How: a page header is a Thrift struct in the compact protocol (Parquet's format spec,
`PageHeader`: field 2 the uncompressed size, field 3 the compressed size that follows the
header), written immediately before its page; the pages of a chunk follow one another from its
first page (the dictionary page, where there is one) to the chunk's end. Only the headers are
read (a few hundred bytes each); every other field, statistics and nested structs included, is
skipped by type. The walk must land exactly on the chunk's end, so a misread header cannot go
unnoticed, and anything malformed -- an unknown type, a header over 16 MiB (Arrow's own limit),
a size out of range, a chunk past the end of the file -- raises PageWalkError.
"""

from __future__ import annotations

MAX_HEADER = 16 << 20   # the largest page header read (Arrow's default limit)
# parquet-mr up to 1.2.8 left a dictionary page's header out of the chunk's stated length
# (PARQUET-816): Arrow reads up to 100 bytes past it, and so may a walk given this slack
OLD_WRITER_SLACK = 100
_FIRST_READ = 512       # bytes read for a header first (statistics can make it longer)
_MAX_DEPTH = 64         # nesting of Thrift structs and containers


class PageWalkError(ValueError):
    """A column chunk whose page headers cannot be read as Parquet's."""


class _Short(Exception):
    """The header runs past the bytes read so far."""


class _Compact:
    """Reads Thrift compact-protocol values from a byte buffer."""

    def __init__(self, buf: bytes):
        self.buf, self.i = buf, 0

    def byte(self) -> int:
        if self.i >= len(self.buf):
            raise _Short
        self.i += 1
        return self.buf[self.i - 1]

    def skip(self, n: int) -> None:
        if n < 0:
            raise PageWalkError("negative Thrift length")
        if self.i + n > len(self.buf):
            raise _Short
        self.i += n

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise PageWalkError("Thrift varint over 64 bits")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def fields(self):
        """(field id, type) of a struct's fields, until its stop byte; the caller reads or
        skips each value before asking for the next."""
        fid = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            fid = fid + delta if delta else self.zigzag()
            yield fid, kind

    def skip_value(self, kind: int, depth: int, in_container: bool = False) -> None:
        if depth > _MAX_DEPTH:
            raise PageWalkError("Thrift values nested too deeply")
        if kind in (1, 2):            # bool: in a field header the value is the type itself
            if in_container:
                self.skip(1)
        elif kind == 3:               # byte
            self.skip(1)
        elif kind in (4, 5, 6):       # i16, i32, i64
            self.varint()
        elif kind == 7:               # double
            self.skip(8)
        elif kind == 8:               # binary
            self.skip(self.varint())
        elif kind in (9, 10):         # list, set
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            self._elements(size, (elem,), depth)
        elif kind == 11:              # map
            size = self.varint()
            if size:
                kv = self.byte()
                self._elements(size, (kv >> 4, kv & 0x0F), depth)
        elif kind == 12:              # struct
            for _, k in self.fields():
                self.skip_value(k, depth + 1)
        else:
            raise PageWalkError(f"unknown Thrift type {kind}")

    def _elements(self, size: int, kinds: tuple, depth: int) -> None:
        if size * len(kinds) > len(self.buf) - self.i:   # each element takes at least a byte
            raise _Short
        for _ in range(size):
            for k in kinds:
                self.skip_value(k, depth + 1, in_container=True)


def parse_header(buf: bytes) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, header length) of the page header at buf's start;
    _Short when buf ends inside it."""
    r = _Compact(buf)
    sizes = {}
    for fid, kind in r.fields():
        if fid in (2, 3) and kind == 5:   # i32 uncompressed_page_size, compressed_page_size
            sizes[fid] = r.zigzag()
        else:
            r.skip_value(kind, 0)
    if 2 not in sizes or 3 not in sizes:
        raise PageWalkError("a page header without its sizes")
    if sizes[2] < 0 or sizes[3] < 0:
        raise PageWalkError(f"a page header with a negative size ({sizes[2]}, {sizes[3]})")
    return sizes[2], sizes[3], r.i


def _header_at(f, pos: int, end: int) -> tuple[int, int, int]:
    """The page header at pos, read from at most the bytes before end."""
    want = _FIRST_READ
    while True:
        f.seek(pos)
        buf = f.read(min(want, end - pos))
        try:
            return parse_header(buf)
        except _Short:
            if len(buf) < min(want, end - pos):
                raise PageWalkError("the column chunk runs past the end of the file") from None
            if pos + len(buf) >= end:
                raise PageWalkError("a page header runs past the end of its column chunk") from None
            if want >= MAX_HEADER:
                raise PageWalkError(f"a page header over {MAX_HEADER >> 20} MiB") from None
            want *= 16


def pages(f, start: int, length: int, slack: int = 0) -> list[tuple[int, int, int]]:
    """(header length, uncompressed size, compressed size) of each page of the column chunk that
    occupies [start, start + length) of the binary file f, in order; the pages must end exactly
    there, or within `slack` bytes after it (OLD_WRITER_SLACK)."""
    if start < 0 or length < 0 or slack < 0:
        raise PageWalkError(f"a column chunk at {start} of length {length}")
    pos, end, out = start, start + length, []
    while pos < end:
        uncompressed, compressed, header = _header_at(f, pos, end + slack)
        out.append((header, uncompressed, compressed))
        pos += header + compressed
    if not end <= pos <= end + slack:
        raise PageWalkError(f"the pages end at byte {pos}, the column chunk at {end}")
    return out


def largest_page(f, start: int, length: int, slack: int = 0) -> int:
    """The largest uncompressed page size (bytes) of that column chunk (0 for an empty one)."""
    return max((u for _, u, _ in pages(f, start, length, slack)), default=0)
