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


def test_scan_reports_every_bad_line_with_its_reason_and_reads_on(tmp_path):
    from nanoseek.jsonl import INVALID, NOT_OBJECT, scan_jsonl

    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"a": 1}\n\n{"a": \n[1, 2]\n{"s": "\xff"}\n' + b"[" * 100_000 + b"\n" + b'{"a": 2}')
    lines = list(scan_jsonl(p))
    assert [(ln.lineno, ln.obj, ln.kind) for ln in lines] == [
        (1, {"a": 1}, None), (3, None, INVALID), (4, None, NOT_OBJECT), (5, None, INVALID), (6, None, INVALID),
        (7, {"a": 2}, None)]
    assert [ln.error for ln in lines[1:5]] == ["not valid JSON (Expecting value)", "not a JSON object",
                                               "not valid UTF-8", "not valid JSON (nested too deeply)"]
    assert [ln.offset for ln in lines[:2]] == [0, 10] and lines[0].size == 9
    # read_jsonl names the first bad line; objects=False takes any JSON value
    with pytest.raises(ValueError, match=r"mixed\.jsonl:3: not valid JSON"):
        list(read_jsonl(p))
    assert list(read_jsonl(p, skip_invalid=True)) == [{"a": 1}, {"a": 2}]
    q = tmp_path / "values.jsonl"
    q.write_text('"text"\n{"a": 1}\n3\n', encoding="utf-8")
    assert list(read_jsonl(q, objects=False, line_key="n")) == ["text", {"a": 1, "n": 2}, 3]


def test_byte_ranges_read_every_line_exactly_once(tmp_path):
    from nanoseek.jsonl import iter_lines

    recs = [{"i": i, "pad": "x" * (i * 7 % 23)} for i in range(40)]
    p = tmp_path / "r.jsonl"
    p.write_text("".join(__import__("json").dumps(r) + "\n" + ("\n" if i % 9 == 0 else "")
                         for i, r in enumerate(recs)), encoding="utf-8")
    size = p.stat().st_size
    for step in (1, 7, 50, 333, size):
        got = []
        for start in range(0, size, step):
            with open(p, "rb") as f:
                got += [(ln.offset, ln.obj) for ln in iter_lines(f, start=start, end=min(size, start + step))]
        assert [o for _, o in got] == recs, step
        assert all(p.read_bytes()[off:off + 6] == b'{"i": ' for off, _ in got)


class _Recording(__import__("io").BytesIO):
    """Records the longest piece handed out, to show that a long line is never held whole."""

    longest = 0

    def readline(self, size=-1):
        out = super().readline(size)
        self.longest = max(self.longest, len(out))
        return out


def test_an_over_long_line_is_skipped_in_pieces(tmp_path):
    from nanoseek.jsonl import TOO_LONG, iter_lines

    long = b'{"a": "' + b"y" * (5 << 20) + b'"}\n'
    f = _Recording(b'{"a": 1}\n' + long + b'{"a": 2}\n' + b"z" * 200)
    lines = list(iter_lines(f, max_bytes=100))
    assert [(ln.kind, ln.obj) for ln in lines] == [(None, {"a": 1}), (TOO_LONG, None), (None, {"a": 2}),
                                                   (TOO_LONG, None)]
    assert lines[1].size == len(long) and lines[1].offset == 9 and lines[3].size == 200
    assert "longer than 100 bytes" in lines[1].error
    assert f.longest <= 1 << 20


def test_callers_report_bad_lines(tmp_path):
    from nanoseek.data.clean import jsonl_benchmark
    from nanoseek.data.shards import _corpus_records
    from nanoseek.train.sft import read_conversations

    p = tmp_path / "conv.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": \n[1]\n'
                 '{"messages": [{"role": "user", "content": "x"}], "tools": 3}\n', encoding="utf-8")
    got = list(read_conversations(str(p)))
    assert [(n, ex is not None, err) for n, ex, err in got] == [
        (1, True, None), (2, False, "not valid JSON (Expecting value)"),
        (3, False, 'not an object with a non-empty "messages" list'), (4, False, '"tools" is not a list')]
    with pytest.raises(FileNotFoundError, match="--data"):
        list(read_conversations(str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match=r"conv\.jsonl:2: not valid JSON"):
        jsonl_benchmark(p)
    with pytest.raises(ValueError, match=r"conv\.jsonl @byte 50: not valid JSON"):
        list(_corpus_records(str(p), 0, p.stat().st_size))
