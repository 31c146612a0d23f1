"""A diverging or damaged run never passes as a success (issue "Reliability and security", items
10-12): non-finite steps stop the run (or are skipped) and never reach a checkpoint; resume
skips damaged checkpoints and says why; an untrusted config.json is checked against the weights
before anything is allocated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.train.checkpoint import checkpoint_dirs, checkpoint_problem, load_model_state
from nanoseek.train.objectives import PretrainObjective
from nanoseek.train.trainer import NonFiniteError, TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


def cfg(train_data, run_dir, **kw) -> TrainConfig:
    shards, _ = train_data
    base = dict(run_dir=str(run_dir), shard_dir=str(shards), tokenizer_dir=None, model="tiny", depth=None,
                seq_len=64, micro_batch=2, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=0,
                progress=False, tensorboard=False, peak_tflops=1.0, sample_prompts=[])
    base.update(kw)
    return TrainConfig(**base)


def all_finite(ckpt) -> bool:
    return all(torch.isfinite(v).all() for v in load_model_state(ckpt).values() if v.is_floating_point())


class _NaNAt(PretrainObjective):
    """The pre-training loss, made NaN at the given steps (a damaged batch / a numerical blow-up)."""

    def __init__(self, steps):
        super().__init__()
        self.bad = set(steps)

    def __call__(self, model, batch, phase):
        out = super().__call__(model, batch, phase)
        if phase["step"] in self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_a_diverging_run_stops_with_an_error_and_keeps_its_finite_checkpoints(train_data, tmp_path, capsys):
    shards, _ = train_data
    run = tmp_path / "lr50"
    rc = main(["train", "--out", str(run), "--shards", str(shards), "--model", "tiny", "--seq-len", "64",
               "--micro-batch", "2", "--max-steps", "30", "--lr", "50", "--warmup-steps", "1", "--eval-every", "0",
               "--ckpt-every", "1", "--keep-last", "2", "--peak-tflops", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite loss" in err and "Traceback" not in err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"nonfinite"' in x]
    assert len(events) == 1 and events[0]["action"] == "stop"
    ckpts = checkpoint_dirs(run)
    assert ckpts and all(all_finite(c) for c in ckpts)          # nothing non-finite was ever written
    assert int(ckpts[-1].name.split("-")[1]) == events[0]["step"] - 1   # the last good one is kept
    assert not (run / "summary.json").exists()                  # the run did not pass as finished


def test_a_nonfinite_checkpoint_is_never_written_even_mid_run(train_data, tmp_path):
    with pytest.raises(NonFiniteError, match="step 3"):
        train(cfg(train_data, tmp_path / "r", max_steps=6, ckpt_every=1), objective=_NaNAt({2}))
    assert [c.name for c in checkpoint_dirs(tmp_path / "r")] == ["step-00000001", "step-00000002"]


def test_skip_policy_drops_the_update_and_goes_on(train_data, tmp_path):
    s = train(cfg(train_data, tmp_path / "r", max_steps=5, on_nonfinite="skip"), objective=_NaNAt({1, 3}))
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r and "event" not in r}
    assert s["steps"] == 5 and s["skipped_steps"] == 2
    assert steps[2].get("skipped") == 1 and steps[4].get("skipped") == 1 and "skipped" not in steps[3]
    assert all_finite(checkpoint_dirs(tmp_path / "r")[-1])
    # too many in a row: stops
    with pytest.raises(NonFiniteError, match="in a row"):
        train(cfg(train_data, tmp_path / "r2", max_steps=8, on_nonfinite="skip", max_nonfinite_skips=2),
              objective=_NaNAt({1, 2, 3, 4}))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_skips_a_damaged_newest_checkpoint(train_data, tmp_path, capsys, damage):
    run = tmp_path / "run"
    train(cfg(train_data, run, max_steps=4, ckpt_every=2))
    newest = checkpoint_dirs(run)[-1]
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    why = checkpoint_problem(newest)
    assert why and {"truncate": "bytes", "flip": "checksum", "delete": "missing"}[damage] in why
    s = train(cfg(train_data, run, max_steps=6, ckpt_every=2, resume=True))
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}" in err
    assert s["steps"] == 6
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]       # steps 3-4 were redone from step 2


def test_an_absurd_config_is_refused_before_allocating(tmp_path):
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    c = json.loads(cfg_path.read_text())
    c.update(hidden_size=1 << 16, vocab_size=1 << 22, moe_intermediate_size=1 << 16)   # terabytes if built
    cfg_path.write_text(json.dumps(c))
    code = ("import resource, sys\n"
            "from nanoseek import Transformer\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n"
            f"    Transformer.from_pretrained({str(tmp_path / 'm')!r})\n"
            "except ValueError as e:\n"
            "    print('REFUSED', str(e).splitlines()[0][:300])\n"
            "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "REFUSED" in r.stdout and "in the checkpoint, config.json implies" in r.stdout, r.stdout + r.stderr
    growth_kb = int(r.stdout.split("GROWTH_KB")[1])
    assert growth_kb < 300_000, growth_kb          # a real build would need far more than 300 MB


def test_an_index_cannot_point_outside_the_model_directory(tmp_path):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny"))
    m.save_pretrained(tmp_path / "outside")                  # a real weights file elsewhere
    m.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    weights = {k: "../outside/model.safetensors" for k in ("embed.weight",)}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weights}))
    with pytest.raises(ValueError, match="not a file of the model directory"):
        Transformer.from_pretrained(tmp_path / "m")
