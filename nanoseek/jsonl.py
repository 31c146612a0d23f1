"""JSON Lines reading, defined once: every layer's JSONL reader is this one (bottom layer: it
imports nothing of nanoseek).

    for rec in read_jsonl("samples.jsonl"):                       # strict: ValueError naming file:line
    for rec in read_jsonl(p, error=EvalInputError, line_key="_line"):   # the caller's error type
    recs = list(read_jsonl(p, skip_invalid=True))                 # a log a kill may have cut mid-line

Blank lines are skipped; a path ending in .gz is read through gzip; every record is a JSON object.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


def read_jsonl(path: str | os.PathLike, *, error: type[Exception] = ValueError, skip_invalid: bool = False,
               line_key: str | None = None) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one per non-blank line.
    error: the exception raised (message "path:line: ...") for a missing file, a line that is not
    JSON or not an object; skip_invalid=True skips such lines instead (a torn last line of a log).
    line_key: store each record's 1-based line number under this key."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        f = opener(path, "rt", encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_invalid:
                    continue
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                if skip_invalid:
                    continue
                raise error(f"{path}:{lineno}: expected a JSON object per line")
            if line_key:
                obj[line_key] = lineno
            yield obj
