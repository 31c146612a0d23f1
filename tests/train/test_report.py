"""`nanoseek train` + `nanoseek report` through the CLI (nanoseek/train/cli.py, report.py)."""

from __future__ import annotations

import json
import re

from nanoseek.cli import main


def test_cli_train_then_report(train_data, tmp_path, capsys):
    shards, tok = train_data
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--shards", str(shards), "--tokenizer", str(tok), "--model", "tiny",
            "--seq-len", "64", "--micro-batch", "2", "--steps", "3", "--eval-every", "2", "--peak-tflops", "1",
            "--prompt", "def f(x):\n", "--no-progress"]
    assert main(argv) == 0
    assert "val bpb" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    # the table carries the run's real numbers
    assert f"**{summary['val']['val_bpb']:.4g}**" in report
    assert re.search(r"\| steps / tokens \| 3 / 384 \|", report)
    for png in ("loss.png", "bpb.png", "expert_load.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    assert "def f(x):" in report                          # the final greedy sample
    # evaluation results inside the run directory join the report
    from nanoseek.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    assert main(["eval", "bpb", "--model", str(ckpt), "--tokenizer", str(tok), "--shards", str(shards),
                 "--seq-len", "64", "--out", str(run / "eval_bpb"), "--no-progress"]) == 0
    bpb = json.loads((run / "eval_bpb" / "summary.json").read_text())["bpb"]
    assert main(["report", str(run)]) == 0
    assert f"bits per byte **{bpb:.4f}**" in (run / "report.md").read_text()
    # a second fresh run into the same directory would mix two runs' checkpoints: refused
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_cli_errors_are_clear(train_data, tmp_path, capsys):
    shards, _ = train_data
    assert main(["train", "--out", str(tmp_path / "r"), "--shards", str(shards), "--model", "tiny"]) == 2
    assert "--steps or --minutes" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--shards", str(shards), "--model", "nope",
                 "--steps", "1"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--shards", str(tmp_path / "missing"), "--steps", "1"]) == 2
    assert "index.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
