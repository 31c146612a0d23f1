"""nanoseek.jsonl.read_jsonl: the one JSONL reader (strict with file:line errors, or tolerant)."""

from __future__ import annotations

import gzip

import pytest

from nanoseek.eval.common import EvalInputError, read_jsonl as eval_read_jsonl
from nanoseek.jsonl import read_jsonl


def test_strict_reading_names_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n[1]\n', encoding="utf-8")
    it = read_jsonl(p, line_key="n")
    assert next(it) == {"a": 1, "n": 1} and next(it) == {"a": 2, "n": 3}
    with pytest.raises(ValueError, match=r"a\.jsonl:4: expected a JSON object"):
        next(it)
    p.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(EvalInputError, match=r":2: not valid JSON"):
        list(eval_read_jsonl(p))
    with pytest.raises(EvalInputError, match="no such file"):
        list(eval_read_jsonl(tmp_path / "missing.jsonl"))


def test_tolerant_reading_skips_a_torn_line_and_reads_gzip(tmp_path):
    p = tmp_path / "log.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"ste')
    assert list(read_jsonl(p, skip_invalid=True)) == [{"step": 1}, {"step": 2}]
