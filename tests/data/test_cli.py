"""The `nanoseek data` / `nanoseek tokenizer` commands end to end on the fixture corpus."""

from __future__ import annotations

import json

from nanoseek.cli import main


def test_pipeline_through_the_cli(tmp_path, fixture_sources, capsys):
    corpus, tok, shards = tmp_path / "corpus", tmp_path / "tok", tmp_path / "shards"
    args = ["data", "build", "--out", str(corpus), "--workers", "1", "--quiet", "--max-kb", "100",
            "--val-fraction", "0.3", "--languages", "python,shell"]
    for s in fixture_sources:
        args += ["--source", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "summary.md" in out
    m = json.loads((corpus / "manifest.json").read_text())
    assert set(m["languages"]) == {"python", "shell"}

    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "400", "--out", str(tok), "--quiet"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert main(["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(shards),
                 "--workers", "1", "--quiet"]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["data", "inspect", str(shards), "--tokenizer", str(tok), "--split", "train"]) == 0
    printed = capsys.readouterr().out
    assert "train document 0" in printed and '"dtype": "uint16"' in printed
    # Running a finished stage again reuses it.
    assert main(["data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(shards),
                 "--quiet"]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path / "c"), "--source", str(tmp_path / "nope"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: source not found") and "Traceback" not in err
    assert main(["data", "tokenize", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path), "--out",
                 str(tmp_path / "s"), "--quiet"]) == 1
    assert "not a finished corpus" in capsys.readouterr().err
    assert main(["data"]) == 2
