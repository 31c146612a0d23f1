"""`nanoseek speedrun` under torchrun (nanoseek/train/speedrun.py): the whole pipeline, sized
down, on 2 processes -- the file-building stages, the evaluation and the report run once (rank
0) while the training stages run on both ranks."""

from __future__ import annotations

import json

from nanoseek import Transformer

from .conftest import torchrun

STAGES = ("corpus", "tokenizer", "shards", "pre-training", "tasks", "SFT", "GRPO", "evaluation", "report")


def test_speedrun_under_torchrun_two_processes(tmp_path):
    out = tmp_path / "sr"
    r = torchrun(["speedrun", "--out", str(out), "--minutes", "0.05", "--sft-minutes", "0.05", "--rl-minutes", "0.05",
                  "--max-mb", "3", "--vocab-size", "512", "--tasks", "12", "--eval-tasks", "1"], tmp_path, 29527,
                 timeout=600)
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
