"""`nanoseek speedrun` under torchrun (nanoseek/train/speedrun.py): the whole pipeline, sized
down, on 2 processes -- the file-building stages, the evaluation and the report run once (rank
0) while the training stages run on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nanoseek import Transformer

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("corpus", "tokenizer", "shards", "pre-training", "tasks", "SFT", "GRPO", "evaluation", "report")


def test_speedrun_under_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "sr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29527",
           "-m", "nanoseek.cli", "speedrun", "--out", str(out), "--minutes", "0.05", "--sft-minutes", "0.05",
           "--rl-minutes", "0.05", "--max-mb", "3", "--vocab-size", "512", "--tasks", "12", "--eval-tasks", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    heads = [ln for ln in r.stderr.splitlines() if ln.startswith("== ")]
    # every stage announced once, by rank 0, in order (the other rank waited for its file stages)
    assert [h[3:].split(":")[0].split(" ")[0] for h in heads] == list(STAGES), heads
    assert "on 2 ranks" in heads[3]
    assert r.stderr.count("data build:   0%") == 1 and r.stderr.count("data tokenize:   0%") == 1   # built once
    for stage in ("train", "sft", "rl"):               # the training stages ran data-parallel
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["world"] == 2 and summary["steps"] >= 1, (stage, summary)
    assert json.loads((out / "train" / "summary.json").read_text())["val"]["val_bpb"] > 0
    post = json.loads((out / "train" / "post_training.json").read_text())
    assert [s["name"] for s in post["stages"]] == ["SFT", "GRPO"]
    assert (out / "train" / "report.md").is_file()
    assert r.stdout.count("nanoseek chat --model") == 1        # results printed once
    Transformer.from_pretrained(out / "rl" / "model")          # the final model loads
