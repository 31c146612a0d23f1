"""JSON Lines reading, defined once: every layer's JSONL reader is this one (bottom layer: it
imports nothing of nanoseek).

    for rec in read_jsonl("samples.jsonl"):                       # strict: ValueError naming file:line
    for rec in read_jsonl(p, error=EvalInputError, line_key="_line"):   # the caller's error type
    recs = list(read_jsonl(p, skip_invalid=True))                 # a log a kill may have cut mid-line

    for ln in scan_jsonl(p):                                      # every line, bad ones with a reason
        if ln.error:
            report(f"{p}:{ln.lineno}: {ln.error}")
        else:
            use(ln.obj)

    cfg = read_json("model/config.json")                          # one JSON document: ValueError naming
                                                                  # the file when it is not one
    with open(p, "rb") as f:                                      # a byte range of a big file, lines
        for ln in iter_lines(f, start=a, end=b, max_bytes=1 << 20):   # of at most 1 MiB held at once
            ...

Blank lines are skipped; a path ending in .gz is read through gzip; a record is a JSON object
(objects=False: any JSON value). A bad line -- not JSON, not UTF-8, nested too deeply, not an
object, or longer than max_bytes -- is never dropped silently: scan_jsonl / iter_lines yield it
with the reason, read_jsonl raises (or, with skip_invalid, skips it on purpose). Memory is one
line at a time; with max_bytes, an over-long line is skipped in 1 MiB pieces, never held whole.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, BinaryIO, Iterator, NamedTuple

# Line.kind values: why a line has no record.
TOO_LONG = "too_long"          # longer than max_bytes (Line.size says how long)
INVALID = "invalid"            # not JSON (or not UTF-8, or nested deeper than the parser goes)
NOT_OBJECT = "not_object"      # JSON, but not an object (only when objects=True)

_DRAIN = 1 << 20               # piece size when skipping an over-long line


class Line(NamedTuple):
    """One non-blank line of a JSONL stream: its record, or why it has none."""

    lineno: int                # 1-based, counted from where reading began (the file's start unless start > 0)
    offset: int                # byte offset of the line's first byte in the (decompressed) stream
    size: int                  # bytes of the line, newline included
    obj: Any                   # the record; None when the line is bad
    error: str | None = None   # why the line is bad, e.g. "not valid JSON (Expecting value)"
    kind: str | None = None    # TOO_LONG / INVALID / NOT_OBJECT; None for a good line


def parse_line(line: bytes | str, objects: bool = True) -> tuple[Any, str | None, str | None]:
    """(record, error, kind) of one JSONL line: (obj, None, None) or (None, reason, kind)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg})", INVALID
    except UnicodeDecodeError:
        return None, "not valid UTF-8", INVALID
    except RecursionError:
        return None, "not valid JSON (nested too deeply)", INVALID
    if objects and not isinstance(obj, dict):
        return None, "not a JSON object", NOT_OBJECT
    return obj, None, None


def _drain(f: BinaryIO) -> int:
    """Read to the end of the current line without holding it; the bytes read."""
    n = 0
    while True:
        piece = f.readline(_DRAIN)
        n += len(piece)
        if not piece or piece.endswith(b"\n"):
            return n


def iter_lines(f: BinaryIO, *, start: int = 0, end: int | None = None, max_bytes: int | None = None,
               objects: bool = True) -> Iterator[Line]:
    """The non-blank lines of a binary stream `f` (at its start), parsed.

    start / end: read the lines that *start* inside [start, end) (f must be seekable when start > 0),
    so that consecutive ranges split a file into whole lines, each read once. end None: to the end.
    max_bytes: a longer line is yielded as a TOO_LONG Line without being held in memory.
    """
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            start += _drain(f)          # the rest of a line the previous range owns
    offset, lineno = start, 0
    while end is None or offset < end:
        line = f.readline(-1 if max_bytes is None else max_bytes + 1)
        if not line:
            return
        at = offset
        offset += len(line)
        lineno += 1
        if max_bytes is not None and len(line) > max_bytes and not line.endswith(b"\n"):
            offset += _drain(f)
            yield Line(lineno, at, offset - at, None, f"longer than {max_bytes:,} bytes", TOO_LONG)
            continue
        if line.isspace():
            continue
        obj, error, kind = parse_line(line, objects)
        yield Line(lineno, at, offset - at, obj, error, kind)


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def scan_jsonl(path: str | os.PathLike, *, max_bytes: int | None = None, objects: bool = True) -> Iterator[Line]:
    """Every non-blank line of a JSONL file (.gz: through gzip) as a Line, bad ones with their
    reason. FileNotFoundError (at the first next()) if there is no such file."""
    with _open(os.fspath(path)) as f:
        yield from iter_lines(f, max_bytes=max_bytes, objects=objects)


def read_jsonl(path: str | os.PathLike, *, error: type[Exception] = ValueError, skip_invalid: bool = False,
               line_key: str | None = None, objects: bool = True) -> Iterator[Any]:
    """The JSON objects of a JSONL file, one per non-blank line.
    error: the exception raised (message "path:line: ...") for a missing file, a line that is not
    JSON or not an object; skip_invalid=True skips such lines instead (a torn last line of a log).
    line_key: store each record's 1-based line number under this key.
    objects=False: any JSON value is a record (line_key then applies to the objects only)."""
    path = os.fspath(path)
    try:
        f = _open(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    with f:
        for ln in iter_lines(f, objects=objects):
            if ln.error is not None:
                if skip_invalid:
                    continue
                reason = "expected a JSON object per line" if ln.kind == NOT_OBJECT else ln.error
                raise error(f"{path}:{ln.lineno}: {reason}")
            if line_key and isinstance(ln.obj, dict):
                ln.obj[line_key] = ln.lineno
            yield ln.obj


MAX_JSON_FILE = 64 << 20  # read_json's default cap: config.json and weight indexes are far smaller


def read_json(path: str | os.PathLike, *, objects: bool = True, max_bytes: int = MAX_JSON_FILE,
              error: type[Exception] = ValueError) -> Any:
    """One JSON document from a file someone else may have written (a model directory's
    config.json or weight index): `error` naming the file when it is missing, larger than
    max_bytes (checked before reading), not UTF-8, not JSON, nested deeper than the parser goes
    (json raises RecursionError there, not a JSONDecodeError) or, with objects, not an object."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    if size > max_bytes:
        raise error(f"{path}: {size:,} bytes, more than the {max_bytes:,} a JSON file here may have")
    with open(path, "rb") as f:
        obj, why, kind = parse_line(f.read(max_bytes + 1), objects)
    if why is not None:
        raise error(f"{path}: {'expected a JSON object' if kind == NOT_OBJECT else why}")
    return obj
