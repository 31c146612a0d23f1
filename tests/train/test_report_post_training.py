"""The report's post-training section (nanoseek/train/report.py: RUN/post_training.json)."""

from __future__ import annotations

import json

from nanoseek.train.report import write_report


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_post_training_section_shows_the_numbers(tmp_path):
    run, sft = tmp_path / "train", tmp_path / "sft"
    run.mkdir()
    sft.mkdir()
    _jsonl(run / "metrics.jsonl", [{"event": "start", "step": 0},
                                   {"step": 1, "loss": 5.0, "ce": 4.0, "tokens": 10}])
    _jsonl(sft / "metrics.jsonl", [{"step": s, "loss": 3.0 / s, "ce": 2.0 / s} for s in range(1, 6)]
           + [{"event": "eval", "step": 5, "val_loss": 0.9, "val_bpb": 0.3}])
    info = {"tasks": {"held_out": 77},
            "stages": [{"name": "SFT", "run_dir": str(sft), "n_tasks": 40,
                        "summary": {"steps": 5, "tokens": 1234, "train_seconds": 9.5, "tok_per_s": 130.0,
                                    "val": {"val_loss": 0.9}, "sft_data": {"examples": 300, "val_examples": 12}},
                        "before": {"chat": {"pass@1": 0.0, "syntax_valid": 0.125},
                                   "completion": {"pass@1": 0.025, "syntax_valid": 0.5}},
                        "after": {"chat": {"pass@1": 0.05, "syntax_valid": 0.875}},
                        "samples": [{"task_id": "mined/7", "answer": "```python\ndef f():\n    return 1\n```"}]}]}
    (run / "post_training.json").write_text(json.dumps(info))
    report = write_report(run).read_text()
    assert "## SFT" in report and "(40 of 77; greedy)" in report
    assert "| chat | 0.0% | 5.0% | 12.5% | 87.5% |" in report
    assert "| completion | 2.5% | - | 50.0% | - |" in report
    assert "300 training conversations, 12 held out" in report
    assert "](sft_loss.png)" in report and (run / "sft_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "def f():" in report and "`mined/7`" in report
