"""Evaluation results rendered for the run report."""

import json

from nanoseek.eval.passk import mean_pass_at_k
from nanoseek.eval.report import eval_section


def test_eval_section_tables_and_plots(tmp_path):
    per = {f"HumanEval/{i}": {"n": 4, "correct": c} for i, c in enumerate([0, 1, 4, 2])}
    he = {"task": "humaneval", "n_problems": 4, "n_samples": 16, "isolation": "bwrap", "per_problem": per,
          "pass@1": mean_pass_at_k([4] * 4, [0, 1, 4, 2], 1)}
    (tmp_path / "eval_humaneval").mkdir()
    (tmp_path / "eval_humaneval" / "summary.json").write_text(json.dumps(he))
    (tmp_path / "eval_bpb").mkdir()
    (tmp_path / "eval_bpb" / "summary.json").write_text(json.dumps({"task": "bpb", "bpb": 1.25, "split": "val",
                                                                     "tokens": 10, "bytes": 40}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"steps": 3}))  # a training summary: ignored
    lines, pngs = eval_section(tmp_path)
    text = "\n".join(lines)
    assert "### humaneval" in text and "### bpb" in text and "other" not in text
    assert "| 4 | 16 | 0.4375 | bwrap |" in text  # pass@1 = (0 + 1 + 4 + 2) / 16
    assert "1.2500" in text
    assert sorted(pngs) == ["eval_humaneval_pass_rate_hist.png", "eval_humaneval_passk.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert eval_section(empty) == ([], [])
