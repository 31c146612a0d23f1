"""Training checkpoints (nanoseek/train/checkpoint.py): state trees, atomicity, pruning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[2]


def test_state_tree_roundtrip(tmp_path):
    state = {"optimizer": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                            "param_groups": [{"betas": (0.9, 0.95), "params": [0, 1], "name": "x", "lr": 1e-3}]}],
             "rng": {"cpu": torch.get_rng_state()}, "trainer": {"step": 7, "total_steps": None}, "ok": True}
    ck.save_tree(state, tmp_path / "s.safetensors")
    back = ck.load_tree(tmp_path / "s.safetensors")
    assert back["trainer"] == {"step": 7, "total_steps": None} and back["ok"] is True
    g = back["optimizer"][0]
    assert list(g["state"]) == [0]                         # int keys stay ints (optimizer indices)
    assert g["param_groups"][0]["betas"] == (0.9, 0.95)   # tuples stay tuples
    assert torch.equal(g["state"][0]["exp_avg"], state["optimizer"][0]["state"][0]["exp_avg"])
    assert torch.equal(back["rng"]["cpu"], state["rng"]["cpu"])
    with pytest.raises(TypeError):
        ck.save_tree({"f": object()}, tmp_path / "bad.safetensors")


def test_not_a_state_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="not a nanoseek training-state file"):
        ck.load_tree(tmp_path / "m.safetensors")
    # a state file whose tree is not JSON, nested past the parser's depth, or missing: one
    # ValueError naming the file (a RecursionError or KeyError traceback before)
    for tree in ("{oops", "[" * 5000 + "]" * 5000, None):
        meta = {"format": "nanoseek-train-state", **({"tree": tree} if tree is not None else {})}
        save_file({"x": torch.zeros(1)}, str(tmp_path / "t.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=r"t\.safetensors: malformed checkpoint tree"):
            ck.load_tree(tmp_path / "t.safetensors")


def _tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny"))


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _tiny()
    ck.save_checkpoint(tmp_path, 1, model, {"trainer": {"step": 1}})
    saved = model.embed.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight.add_(1.0)

    def dying_save_tree(obj, path):            # the model files are written, then the process "dies"
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_tree", dying_save_tree)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, {"trainer": {"step": 2}})
    monkeypatch.undo()
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))          # debris is there ...
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"                           # ... but ignored
    assert ck.load_tree(latest / ck.STATE_FILE)["trainer"]["step"] == 1
    back = Transformer.from_pretrained(latest)
    assert torch.equal(back.embed.weight, saved)
    ck.save_checkpoint(tmp_path, 2, model, {"trainer": {"step": 2}})  # the next save sweeps the debris
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ck.latest_checkpoint(tmp_path).name == "step-00000002"


def test_keep_last_prunes_oldest(tmp_path):
    model = _tiny()
    for s in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, s, model, {"trainer": {"step": s}}, keep_last=2)
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004"]


_WRITER = """
import sys, torch
from nanoseek import ModelConfig, Transformer
from nanoseek.train.checkpoint import save_checkpoint
torch.manual_seed(0)
m = Transformer(ModelConfig.from_preset("tiny"))
step = 0
while True:
    step += 1
    with torch.no_grad():
        m.embed.weight.fill_(float(step))
    save_checkpoint(sys.argv[1], step, m, {"trainer": {"step": step}, "blob": torch.full((1 << 20,), float(step))},
                    keep_last=2)
    print(step, flush=True)
"""


def test_kill_9_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "1"   # at least one finished checkpoint
        time.sleep(0.7)                                 # then kill it wherever it is
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = ck.latest_checkpoint(tmp_path)
    step = ck.load_tree(latest / ck.STATE_FILE)["trainer"]["step"]
    assert latest.name == f"step-{step:08d}"
    model = Transformer.from_pretrained(latest)
    assert float(model.embed.weight.detach()[0, 0]) == float(step)
    assert float(ck.load_tree(latest / ck.STATE_FILE)["blob"][-1]) == float(step)
