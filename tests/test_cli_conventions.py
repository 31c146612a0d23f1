"""One spelling per idea across subcommands: every alias parses to the canonical flag's dest, the
training loop's flags are generated from TrainConfig, and `--help` shows defaults."""

from __future__ import annotations

import dataclasses

import pytest

from nanoseek.cli import build_parser, main

# (command line prefix, canonical spelling, old spelling, value or None for a switch)
ALIASES = [
    ("train --out o --shards s", "--max-steps", "--steps", "5"),
    ("train --out o --shards s", "--seq-len", "--max-seq-len", "64"),
    ("train --out o --shards s", "--no-progress", "--quiet", None),
    ("sft m --data d --out o", "--no-progress", "--quiet", None),
    ("rl m --tasks t --out o", "--max-steps", "--steps", "5"),
    ("distill m --teacher t --prompts p --out o", "--student", "--model", "m2"),
    ("speedrun", "--max-tasks", "--tasks", "7"),
    ("speedrun", "--corpus-mb", "--max-mb", "3"),
    ("generate --model m", "--max-new-tokens", "--max-new-tokens", "3"),
    ("serve m", "--max-num-seqs", "--max-batch", "3"),
    ("serve m", "--max-model-len", "--max-len", "512"),
    ("serve m", "--served-model-name", "--model-name", "coder"),
    ("eval humaneval", "--seed", "--gen-seed", "3"),
    ("eval humaneval", "--max-num-seqs", "--batch-size", "3"),
    ("eval humaneval-fim", "--seed", "--gen-seed", "3"),
    ("eval humaneval-fim", "--no-progress", "--quiet", None),
    ("eval insecure-code", "--max-num-seqs", "--batch-size", "3"),
    ("eval bpb --model m --shards s", "--micro-batch", "--batch-size", "3"),
    ("eval bpb --model m --shards s", "--no-progress", "--quiet", None),
    ("data build --out o", "--no-progress", "--quiet", None),
    ("data tokenize --corpus c --tokenizer t --out o", "--no-progress", "--quiet", None),
    ("data tasks --out o", "--no-progress", "--quiet", None),
    ("tokenizer train --corpus c --out o", "--no-progress", "--quiet", None),
    ("info tiny", "--max-model-len", "--context", "1024"),
]


def _parse(line: str):
    ns = vars(build_parser().parse_args(line.split()))
    ns.pop("func", None)                         # a fresh lambda per parser
    return ns


@pytest.mark.parametrize("prefix,canonical,alias,value", ALIASES)
def test_alias_parses_like_the_canonical_flag(prefix, canonical, alias, value):
    tail = [] if value is None else [value]
    a = _parse(" ".join([prefix, canonical, *tail]))
    b = _parse(" ".join([prefix, alias, *tail]))
    base = _parse(prefix)
    assert a == b
    assert a != base, f"{canonical} changed nothing"


def test_data_build_max_bytes_is_max_kb_in_bytes():
    a = _parse("data build --out o --max-bytes 2048")
    b = _parse("data build --out o --max-kb 2")
    assert a["max_kb"] == b["max_kb"] == 2
    assert _parse("data build --out o")["max_kb"] == 1024


def test_every_train_config_field_has_a_flag():
    from nanoseek.train import cli as tcli
    from nanoseek.train.trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    mirrored = set(tcli._LOOP_FLAGS) | set(tcli._TRAIN_FLAGS)
    assert mirrored <= names                     # no flag for a field that no longer exists
    assert names - mirrored == set(tcli.NOT_FLAGS)
    dests = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for name, spec in {**tcli._LOOP_FLAGS, **tcli._TRAIN_FLAGS}.items():
        assert spec.get("dest", name) in dests, name


def test_loop_flags_keep_trainconfig_defaults_unless_given():
    from nanoseek.train.cli import config_from_args
    from nanoseek.train.trainer import TrainConfig

    cfg = config_from_args(build_parser().parse_args("train --out o --shards s".split()))
    assert cfg == TrainConfig(run_dir="o", shard_dir="s")
    cfg = config_from_args(build_parser().parse_args(
        "train --out o --shards s --steps 3 --quiet --compile --prompt x --final-lr-frac 0.05".split()))
    assert (cfg.max_steps, cfg.progress, cfg.compile, cfg.sample_prompts, cfg.final_lr_frac) == (
        3, False, "inductor", ["x"], 0.05)


@pytest.mark.parametrize("cmd,expected", [
    (["train"], ["(default: 0.1)", "(default: 256)", "(default: from the model's width)", "(default: cosine)"]),
    (["sft"], ["(default: from the sft recipe and the model)"]),
    (["rl"], ["(default: 0.28)", "(default: mask)", "(default: from the rl recipe and the model)"]),
    (["distill"], ["--prompts-per-step PROMPTS_PER_STEP over all ranks (default: 8)"]),
    (["serve"], ["(default: 8000)", "(default: 8)"]),
    (["generate"], ["(default: 128)"]),
    (["eval", "humaneval"], ["(default: 1,10,100)", "(default: 8)"]),
    (["data", "build"], ["(default: 32)"]),
])
def test_help_shows_defaults(cmd, expected, capsys):
    with pytest.raises(SystemExit):
        main([*cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for e in expected:
        assert e in out, (cmd, e)


def test_rl_flags_are_generated_from_rlconfig():
    from nanoseek.train import cli as tcli
    from nanoseek.train.rl import RLConfig

    names = {f.name for f in dataclasses.fields(RLConfig)}
    assert names - set(tcli._RL_FLAGS) == set(tcli.RL_NOT_FLAGS)
    args = build_parser().parse_args("rl m --tasks t.jsonl --out o".split())
    assert tcli.config_from_flags(RLConfig, args, tcli._RL_FLAGS) == RLConfig(tasks="t.jsonl")
    args = build_parser().parse_args("rl m --tasks t --out o --group-size 4 --scale-by-std --overlong none "
                                     "--tis-cap 3 --reward-workers 2 --mtp-weight 0.5".split())
    rl = tcli.config_from_flags(RLConfig, args, tcli._RL_FLAGS)
    assert (rl.group_size, rl.scale_by_std, rl.overlong, rl.tis_cap, rl.reward_workers, rl.mtp_weight) == (
        4, True, "none", 3.0, 2, 0.0)
    assert tcli._loop_overrides(args)["mtp_weight"] == 0.5     # the loop's flag, as before
