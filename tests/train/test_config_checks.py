"""Out-of-range settings of the trainer's configs are one ValueError naming each of them, before
a run builds anything (nanoseek/train/config_checks.py)."""

from __future__ import annotations

import math

import pytest

from nanoseek.cli import main
from nanoseek.train.config_checks import FLOAT, INT, check_ranges
from nanoseek.train.distill import DistillConfig
from nanoseek.train.rl import RLConfig
from nanoseek.train.sft import SFTConfig
from nanoseek.train.trainer import TrainConfig


def test_rules():
    assert INT(1).ok(1) and not INT(1).ok(0) and not INT(1).ok(True) and not INT(1).ok(2.0) and not INT(1).ok(None)
    assert INT(0, 3, optional=True).ok(None) and INT(0, 3).ok(3) and not INT(0, 3).ok(4)
    assert FLOAT(0, 1).ok(0) and FLOAT(0, 1).ok(1) and not FLOAT(0, 1).ok(1.5) and not FLOAT(0, 1).ok(-0.1)
    assert not FLOAT(0).ok(math.nan) and not FLOAT(0).ok(math.inf) and not FLOAT(0).ok("1") and not FLOAT(0).ok(True)
    assert FLOAT(0, open_lo=True).ok(1e-9) and not FLOAT(0, open_lo=True).ok(0)
    assert FLOAT(-math.inf).ok(-5.0) and not FLOAT(-math.inf).ok(-math.inf)
    assert str(INT(1)) == "an int >= 1" and str(INT(0, 3, optional=True)) == "an int in [0, 3] or None"
    assert str(FLOAT(0, 1)) == "a finite number >= 0 and <= 1"


def test_defaults_are_valid():
    TrainConfig().validate()
    RLConfig().check()
    SFTConfig().check()
    DistillConfig(teachers=["t"]).check()


def test_every_bad_setting_is_named_at_once():
    cfg = TrainConfig(micro_batch=0, seq_len=-4, log_every=0, grad_clip=math.nan, fim_rate=2.0, lr=-1.0,
                      autocast="bf61", max_steps=None, minutes=None)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert msg.startswith("invalid TrainConfig: ")
    for part in ("seq_len=-4 (an int >= 1)", "micro_batch=0 (an int >= 1)", "log_every=0 (an int >= 1)",
                 "grad_clip=nan (a finite number >= 0)", "fim_rate=2.0 (a finite number >= 0 and <= 1)",
                 "lr=-1.0 (a finite number >= 0 or None)", "autocast='bf61' (one of auto, bf16, head, off)"):
        assert part in msg, part
    assert msg.count("; ") == 6  # nothing else flagged
    with pytest.raises(ValueError, match=r"invalid RLConfig: group_size=1 \(an int >= 2\); top_p=0\.0 "
                                         r"\(a finite number > 0 and <= 1\); aggregation='mean' \(one of token, sequence\)"):
        RLConfig(group_size=1, top_p=0.0, aggregation="mean").check()
    with pytest.raises(ValueError, match=r"temperature=nan"):
        RLConfig(temperature=math.nan).check()
    with pytest.raises(ValueError, match=r"invalid DistillConfig: max_new_tokens=0 .*teacher_dtype='fp16'"):
        DistillConfig(teachers=["t"], max_new_tokens=0, teacher_dtype="fp16").check()
    with pytest.raises(ValueError, match=r"invalid SFTConfig: val_fraction=1\.5 .*epochs=0\.0"):
        SFTConfig(val_fraction=1.5, epochs=0.0).check()


def test_check_ranges_on_any_object():
    class C:
        a, b, c = 0, 0.5, "x"

    check_ranges(C(), "C", {"a": INT(0)}, {"b": FLOAT(0, 1)}, {"c": ("x", "y")})
    with pytest.raises(ValueError, match=r"^invalid C: a=0 \(an int >= 1\); c='x' \(one of y\)$"):
        check_ranges(C(), "C", {"a": INT(1)}, {"b": FLOAT(0, 1)}, {"c": ("y",)})


@pytest.mark.parametrize("flag", [["--micro-batch", "0"], ["--seq-len", "-4"], ["--log-every", "0"], ["--lr", "nan"]])
def test_train_cli_bad_setting_is_one_line(tmp_path, capsys, flag):
    rc = main(["train", "--out", str(tmp_path / "run"), "--shards", str(tmp_path / "none"), "--max-steps", "1",
               "--no-progress", *flag])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: invalid TrainConfig: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
